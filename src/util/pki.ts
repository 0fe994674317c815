// x509 certificate directories in the layout shared by QEMU's tls-creds-x509,
// libvirt's backup_tls_x509_cert_dir and libnbd's tls-certificates=DIR:
//
//   ca-cert.pem                      the CA that signed both sides' certificates
//   server-cert.pem, server-key.pem  the NBD server's (QEMU's) identity
//   client-cert.pem, client-key.pem  an NBD client's identity
//
// One directory may hold all five (the server side reads only server-*, the
// client side only client-*), which is how qbackup's own repository backups
// use it.
//
// Invariants:
// - Every problem is found before anything is started, and reported as
//   TLS_CREDENTIALS naming the directory and the first file that is missing
//   or unreadable: QEMU's own error for a bad directory comes only after the
//   job has changed QEMU's state, and a client that cannot prove who it is
//   must not get as far as a connection.
// - Paths are made absolute here: QEMU resolves a relative `dir` against its
//   own working directory, which is not the caller's.

import { accessSync, constants, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { QbackupError } from '../errors.js';

export const PKI_FILES = {
  ca: 'ca-cert.pem',
  serverCert: 'server-cert.pem',
  serverKey: 'server-key.pem',
  clientCert: 'client-cert.pem',
  clientKey: 'client-key.pem',
} as const;

/** What a TLS client needs: the CA to trust and, when the server verifies clients, its own certificate and key. */
export interface TlsClientCredentials {
  ca: Buffer;
  cert?: Buffer;
  key?: Buffer;
  /** Where they were read from, for messages. */
  dir?: string;
}

/**
 * Checks that `dir` holds readable server credentials (CA, server certificate
 * and key) and returns it as an absolute path. `what` opens the message:
 * `Cannot serve the exports of domain "vm" with TLS`.
 */
export function checkServerCredentials(dir: string, what: string): string {
  const abs = checkDirectory(dir, what, `${PKI_FILES.ca}, ${PKI_FILES.serverCert} and ${PKI_FILES.serverKey}`);
  for (const file of [PKI_FILES.ca, PKI_FILES.serverCert, PKI_FILES.serverKey]) checkReadable(abs, file, what);
  return abs;
}

/**
 * Reads a client's credentials from `dir`: the CA (required) and the client
 * certificate and key (both or neither; a server that verifies its clients,
 * as QEMU's exports do, refuses a client without them).
 */
export function readClientCredentials(dir: string, what: string): TlsClientCredentials {
  const abs = checkDirectory(dir, what, `${PKI_FILES.ca} (and ${PKI_FILES.clientCert} and ${PKI_FILES.clientKey} for servers that verify clients)`);
  const ca = readPem(abs, PKI_FILES.ca, what);
  const hasCert = exists(join(abs, PKI_FILES.clientCert));
  const hasKey = exists(join(abs, PKI_FILES.clientKey));
  if (hasCert !== hasKey) {
    const missing = hasCert ? PKI_FILES.clientKey : PKI_FILES.clientCert;
    throw credentialsError(what, `certificate directory "${abs}" has ${hasCert ? PKI_FILES.clientCert : PKI_FILES.clientKey} but no ${missing}`, abs);
  }
  if (!hasCert) return { ca, dir: abs };
  return { ca, cert: readPem(abs, PKI_FILES.clientCert, what), key: readPem(abs, PKI_FILES.clientKey, what), dir: abs };
}

function checkDirectory(dir: string, what: string, needs: string): string {
  if (dir === '') throw credentialsError(what, 'the certificate directory is an empty path', dir);
  const abs = resolve(dir);
  let st;
  try {
    st = statSync(abs, { throwIfNoEntry: false });
  } catch (err) {
    throw credentialsError(what, `certificate directory "${abs}" cannot be read (${errnoOf(err)})`, abs, err);
  }
  if (st === undefined) throw credentialsError(what, `certificate directory "${abs}" does not exist (it must hold ${needs})`, abs);
  if (!st.isDirectory()) throw credentialsError(what, `"${abs}" is not a directory (it must hold ${needs})`, abs);
  return abs;
}

function checkReadable(dir: string, file: string, what: string): void {
  const path = join(dir, file);
  try {
    accessSync(path, constants.R_OK);
    if (!statSync(path).isFile()) throw Object.assign(new Error('not a file'), { code: 'not a regular file' });
  } catch (err) {
    throw credentialsError(what, describeProblem(dir, file, err), dir, err);
  }
}

function readPem(dir: string, file: string, what: string): Buffer {
  try {
    const bytes = readFileSync(join(dir, file));
    if (!bytes.includes('-----BEGIN ')) throw Object.assign(new Error('not PEM'), { code: 'not a PEM file' });
    return bytes;
  } catch (err) {
    throw credentialsError(what, describeProblem(dir, file, err), dir, err);
  }
}

function describeProblem(dir: string, file: string, err: unknown): string {
  const code = errnoOf(err);
  if (code === 'ENOENT') return `certificate directory "${dir}" has no ${file}`;
  return `${file} in certificate directory "${dir}" cannot be read (${code})`;
}

function exists(path: string): boolean {
  return statSync(path, { throwIfNoEntry: false }) !== undefined;
}

function errnoOf(err: unknown): string {
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : String(err);
}

function credentialsError(what: string, problem: string, dir: string, cause?: unknown): QbackupError {
  return new QbackupError('TLS_CREDENTIALS', `${what}: ${problem}`, { details: { dir }, ...(cause !== undefined ? { cause } : {}) });
}
