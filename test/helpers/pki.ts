// Certificates for TLS tests, made with openssl at test time in the layout
// QEMU, libvirt and libnbd read (ca-cert.pem, server-cert.pem, server-key.pem,
// client-cert.pem, client-key.pem): a CA of its own per call, a server
// certificate for 127.0.0.1 and localhost (QEMU checks the CA and key-usage
// extensions), and a client certificate. EC P-256 keys: quick to make.

import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface Pki {
  dir: string;
  /** The CA's key, kept out of `dir` so the directory looks like a deployed one. */
  caKey: string;
}

function openssl(args: readonly string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** Makes a CA and a server and a client certificate signed by it, in `dir` (created). */
export function makePki(dir: string, options: { serverNames?: readonly string[] } = {}): Pki {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const work = `${dir}.work`;
  mkdirSync(work, { recursive: true });
  const caKey = join(work, 'ca-key.pem');
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl(['req', '-x509', ...ec, '-keyout', caKey, '-out', join(dir, 'ca-cert.pem'), '-days', '2', '-subj', '/CN=qbackup test CA',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], work);
  const names = options.serverNames ?? ['IP:127.0.0.1', 'DNS:localhost'];
  const sign = (role: 'server' | 'client', extensions: string): void => {
    const csr = join(work, `${role}.csr`);
    const ext = join(work, `${role}.ext`);
    writeFileSync(ext, extensions);
    openssl(['req', ...ec, '-keyout', join(dir, `${role}-key.pem`), '-out', csr, '-subj', `/CN=qbackup test ${role}`], work);
    openssl(['x509', '-req', '-in', csr, '-CA', join(dir, 'ca-cert.pem'), '-CAkey', caKey, '-CAcreateserial', '-out', join(dir, `${role}-cert.pem`), '-days', '2', '-extfile', ext], work);
  };
  const leaf = 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n';
  sign('server', `${leaf}extendedKeyUsage=serverAuth\nsubjectAltName=${names.join(',')}\n`);
  sign('client', `${leaf}extendedKeyUsage=clientAuth\n`);
  for (const f of ['server.csr', 'client.csr', 'server.ext', 'client.ext']) rmSync(join(work, f), { force: true });
  return { dir, caKey };
}
