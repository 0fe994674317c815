// x509 credentials for TLS tests, made with openssl in the layout QEMU,
// libvirt and libnbd read: a CA, a server directory (ca-cert.pem,
// server-cert.pem, server-key.pem) and a client directory (ca-cert.pem,
// client-cert.pem, client-key.pem). The server certificate names 127.0.0.1
// and localhost. Keys are P-256 (quick to make).

import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runTool } from '../../src/image/tools.js';

export interface TestCertificates {
  serverDir: string;
  clientDir: string;
  /** A client directory whose certificate comes from another CA. */
  strangerDir: string;
}

async function ca(dir: string, name: string): Promise<void> {
  await runTool('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, `${name}-key.pem`), '-out', join(dir, `${name}-cert.pem`), '-days', '2', '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
}

async function leaf(dir: string, caName: string, name: string, cn: string, ext: string, outDir: string, prefix: string): Promise<void> {
  const key = join(outDir, `${prefix}-key.pem`);
  const csr = join(dir, `${name}.csr`);
  const extFile = join(dir, `${name}.ext`);
  writeFileSync(extFile, ext);
  await runTool('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`]);
  await runTool('openssl', ['x509', '-req', '-in', csr, '-CA', join(dir, `${caName}-cert.pem`), '-CAkey', join(dir, `${caName}-key.pem`), '-CAcreateserial', '-out', join(outDir, `${prefix}-cert.pem`), '-days', '2', '-extfile', extFile]);
}

export async function makeCertificates(dir: string): Promise<TestCertificates> {
  const work = join(dir, 'pki-work');
  const serverDir = join(dir, 'pki-server');
  const clientDir = join(dir, 'pki-client');
  const strangerDir = join(dir, 'pki-stranger');
  for (const d of [work, serverDir, clientDir, strangerDir]) mkdirSync(d, { recursive: true, mode: 0o700 });
  await ca(work, 'ca');
  await ca(work, 'other-ca');
  const usage = 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n';
  await leaf(work, 'ca', 'server', 'localhost', `${usage}extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n`, serverDir, 'server');
  await leaf(work, 'ca', 'client', 'qbackup-test-client', `${usage}extendedKeyUsage=clientAuth\n`, clientDir, 'client');
  await leaf(work, 'other-ca', 'stranger', 'stranger', `${usage}extendedKeyUsage=clientAuth\n`, strangerDir, 'client');
  copyFileSync(join(work, 'ca-cert.pem'), join(serverDir, 'ca-cert.pem'));
  copyFileSync(join(work, 'ca-cert.pem'), join(clientDir, 'ca-cert.pem'));
  copyFileSync(join(work, 'ca-cert.pem'), join(strangerDir, 'ca-cert.pem'));
  return { serverDir, clientDir, strangerDir };
}
