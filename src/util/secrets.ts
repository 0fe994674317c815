// Passphrases of libvirt-style secrets, one file per secret: DIR/<uuid>, the
// file's bytes exactly (no newline is stripped, as QEMU's `secret` object
// reads them), where DIR is the library's secrets directory
// (STATE_DIR/secrets by default). A <secret type='passphrase' uuid=…/> in a
// backup description names such a file.
//
// Invariants:
// - The UUID was validated before it gets here (a lower-case UUID), so the
//   path never leaves DIR.
// - A missing, empty, unreadable or group/other-accessible file is refused
//   (SECRET_NOT_FOUND) before anything starts: a passphrase others can read
//   protects nothing, and QEMU's own error would come only mid-job.

import { accessSync, constants, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { QbackupError } from '../errors.js';

/** The passphrase file of secret `uuid` in `dir` (absolute). */
export function secretFilePath(dir: string, uuid: string): string {
  return join(resolve(dir), uuid);
}

/** Checks that secret `uuid` has a usable passphrase file in `dir`; returns its path. `what` opens the message. */
export function checkSecretFile(dir: string, uuid: string, what: string): string {
  const path = secretFilePath(dir, uuid);
  const fail = (why: string, cause?: unknown): never => {
    throw new QbackupError('SECRET_NOT_FOUND', `${what}: ${why}`, { details: { secret: uuid, path }, ...(cause !== undefined ? { cause } : {}) });
  };
  let st;
  try {
    st = statSync(path, { throwIfNoEntry: false });
    if (st !== undefined) accessSync(path, constants.R_OK);
  } catch (err) {
    return fail(`the passphrase file "${path}" of secret ${uuid} cannot be read (${String((err as { code?: unknown }).code ?? err)})`, err);
  }
  if (st === undefined) return fail(`secret ${uuid} has no passphrase file "${path}"`);
  if (!st.isFile()) return fail(`the passphrase file "${path}" of secret ${uuid} is not a regular file`);
  if (st.size === 0) return fail(`the passphrase file "${path}" of secret ${uuid} is empty`);
  if ((st.mode & 0o077) !== 0) return fail(`the passphrase file "${path}" of secret ${uuid} is readable by other users (make it 0600)`);
  return path;
}
