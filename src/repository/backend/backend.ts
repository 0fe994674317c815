// The small interface every repository backend offers (a local directory
// now, S3-compatible object storage next), and the key rules they share.
//
// Invariants:
// - Keys are relative, '/'-separated, and every segment matches KEY_SEGMENT
//   (letters, digits, '.', '_', '+', '-', no leading '.'), so no key can
//   name a parent directory, an absolute path or a hidden temporary file. The
//   store derives every key from validated ids, never from file contents.
// - putIfAbsent is atomic: a reader sees the whole object or none, and of
//   several writers racing on one key exactly one wins; the others get false.
// - Objects are never rewritten in place; delete is idempotent.
// - Every backend passes the one conformance suite
//   (test/helpers/backend-conformance.ts).

import type { FileHandle } from 'node:fs/promises';
import { QbackupError } from '../../errors.js';

export interface ObjectInfo {
  key: string;
  size: number;
  /** When the object was written, by the store's own clock (file mtime, S3 LastModified), when the backend lists it. */
  modifiedMs?: number;
}

/** A range of an object to read, and optionally where to read it (see Backend.get). */
export interface ByteRange {
  offset: number;
  length: number;
  into?: Buffer | undefined;
}

export interface Backend {
  /** Where the repository lives, for messages (never with credentials). */
  readonly location: string;
  /** Stores `data` under `key` unless the key exists; false when it existed (nothing written). */
  putIfAbsent(key: string, data: Buffer): Promise<boolean>;
  /**
   * The object's bytes, or `length` bytes from `offset`. With `into` (at
   * least `length` bytes), a backend that can reads the range into it and
   * returns its first `length` bytes; others return memory of their own.
   * Missing: REPO_OBJECT_NOT_FOUND.
   */
  get(key: string, range?: ByteRange): Promise<Buffer>;
  /**
   * Local backends only: the object opened for positional reads, so that
   * worker threads read ranges of it into memory of their own (restore's
   * copy path); the caller closes it. Missing: REPO_OBJECT_NOT_FOUND.
   */
  openForReading?(key: string): Promise<FileHandle>;
  /** Size of the object, or undefined when it does not exist. */
  stat(key: string): Promise<ObjectInfo | undefined>;
  /** Every object whose key starts with `prefix` (a whole segment path, e.g. "data/"), in no particular order. */
  list(prefix: string): Promise<ObjectInfo[]>;
  /** Removes the object; removing a missing one is fine. */
  delete(key: string): Promise<void>;
  /** Creates the container the repository lives in (an S3 bucket) unless it exists; only `init` calls it. */
  createContainer?(): Promise<void>;
  /** Releases connections; idempotent. */
  close?(): void;
  /** Removes half-written objects of writers that died, older than `ageMs` (under `prefix` when given); how many went. */
  sweepTemporary?(ageMs: number, prefix?: string): Promise<number>;
}

export const KEY_SEGMENT = /^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$/;

/** Throws INVALID_ARGUMENT unless `key` follows the key rules. */
export function assertKey(key: string): void {
  const segments = key.split('/');
  if (segments.length === 0 || segments.length > 8 || !segments.every((s) => KEY_SEGMENT.test(s))) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid repository object name ${JSON.stringify(key)}`);
  }
}

/** Throws INVALID_ARGUMENT unless `prefix` is '' or keys' leading segments followed by '/'. */
export function assertPrefix(prefix: string): void {
  if (prefix === '') return;
  if (!prefix.endsWith('/')) throw new QbackupError('INVALID_ARGUMENT', `Invalid repository listing prefix ${JSON.stringify(prefix)}: it must end with "/"`);
  assertKey(prefix.slice(0, -1));
}

export function objectNotFound(location: string, key: string, cause?: unknown): QbackupError {
  return new QbackupError('REPO_OBJECT_NOT_FOUND', `Repository "${location}" has no object "${key}"`, { details: { key }, ...(cause !== undefined ? { cause } : {}) });
}
