// Keys and encryption of a format 2 repository.
//
// An encrypted repository has one random master key: 32 bytes for AES-256-GCM
// (every chunk, pack header, index and manifest) and 32 bytes for HMAC-SHA-256
// chunk ids (equal content deduplicates, but ids reveal nothing about it).
// The master key is stored only wrapped: each key file holds it sealed under a
// key derived from a passphrase with scrypt, so a passphrase can be added,
// changed or removed without touching data (restic's scheme).
//
// Invariants:
// - A sealed blob is nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes); the nonce
//   is random per blob. Opening a blob that fails authentication is
//   REPO_DAMAGED, never garbage handed on.
// - Unencrypted repositories address chunks by plain SHA-256.

import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes, scryptSync } from 'node:crypto';
import { QbackupError } from '../errors.js';

export interface MasterKey {
  dataKey: Buffer;
  idKey: Buffer;
}

export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES;

/** scrypt cost: 2^15 × 8 × 128 B = 32 MiB and about 0.1 s per try. */
const SCRYPT = { N: 1 << 15, r: 8, p: 1 } as const;

export interface KeyFile {
  version: 1;
  kdf: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string;
  /** The master key (dataKey ‖ idKey), sealed under the derived key, base64. */
  wrapped: string;
  created: string;
  host: string;
}

export function newMasterKey(): MasterKey {
  return { dataKey: randomBytes(32), idKey: randomBytes(32) };
}

/** A chunk's id: SHA-256 of its plaintext, or HMAC-SHA-256 under the id key when encrypted. */
export function chunkId(data: Uint8Array, key: MasterKey | undefined): Buffer {
  return key === undefined ? createHash('sha256').update(data).digest() : createHmac('sha256', key.idKey).update(data).digest();
}

/** Encrypts the plaintext (given whole, or as parts read in order) into nonce ‖ ciphertext ‖ tag. */
export function seal(key: Buffer, plaintext: Uint8Array | readonly Uint8Array[]): Buffer {
  const parts = plaintext instanceof Uint8Array ? [plaintext] : plaintext;
  const nonce = randomBytes(NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  const body = parts.map((p) => cipher.update(p));
  return Buffer.concat([nonce, ...body, cipher.final(), cipher.getAuthTag()]);
}

/** Opens a sealed blob; `what` names it in the error when it is damaged or under another key. */
export function unseal(key: Buffer, sealed: Buffer, what: string): Buffer {
  if (sealed.length < SEAL_OVERHEAD) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: too short to be encrypted data`);
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, sealed.subarray(0, NONCE_BYTES));
    decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
    const body = decipher.update(sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES));
    // GCM's final() only checks the tag and adds no bytes: the plaintext is not copied a second time.
    const tail = decipher.final();
    return tail.length === 0 ? body : Buffer.concat([body, tail]);
  } catch (err) {
    throw new QbackupError('REPO_DAMAGED', `${what} is damaged: it does not authenticate under the repository key`, { cause: err });
  }
}

function deriveKey(password: string, salt: Buffer, params: { N: number; r: number; p: number }): Buffer {
  return scryptSync(password.normalize('NFC'), salt, 32, { ...params, maxmem: 256 * params.N * params.r });
}

/** A key file that opens `master` with `password`. */
export function wrapMasterKey(master: MasterKey, password: string, host: string): KeyFile {
  const salt = randomBytes(32);
  const kek = deriveKey(password, salt, SCRYPT);
  return {
    version: 1,
    kdf: 'scrypt',
    ...SCRYPT,
    salt: salt.toString('base64'),
    wrapped: seal(kek, Buffer.concat([master.dataKey, master.idKey])).toString('base64'),
    created: new Date().toISOString(),
    host,
  };
}

/** The master key if `password` opens this key file, else undefined. */
export function unwrapMasterKey(file: KeyFile, password: string): MasterKey | undefined {
  if (file.N > 1 << 20 || file.r > 32 || file.p > 16) {
    throw new QbackupError('REPO_DAMAGED', 'A key file of the repository asks for an unreasonable scrypt cost');
  }
  const kek = deriveKey(password, Buffer.from(file.salt, 'base64'), file);
  let raw: Buffer;
  try {
    raw = unseal(kek, Buffer.from(file.wrapped, 'base64'), 'key file');
  } catch {
    return undefined; // a wrong passphrase and a damaged key file look the same; the caller tries the next key
  }
  if (raw.length !== 64) throw new QbackupError('REPO_DAMAGED', 'A key file of the repository holds a key of the wrong size');
  return { dataKey: raw.subarray(0, 32), idKey: raw.subarray(32) };
}

/** Parses a stored key file, checking its shape. */
export function parseKeyFile(text: string, name: string): KeyFile {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new QbackupError('REPO_DAMAGED', `Key file "${name}" of the repository is not valid JSON`, { cause: err });
  }
  const o = v as Partial<KeyFile> | null;
  if (
    o === null ||
    typeof o !== 'object' ||
    o.version !== 1 ||
    o.kdf !== 'scrypt' ||
    ![o.N, o.r, o.p].every((n) => Number.isSafeInteger(n) && (n as number) > 0) ||
    typeof o.salt !== 'string' ||
    typeof o.wrapped !== 'string'
  ) {
    throw new QbackupError('REPO_DAMAGED', `Key file "${name}" of the repository is malformed`);
  }
  return o as KeyFile;
}
