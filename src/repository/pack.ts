// Pack files: many stored chunks in one object, because millions of 64 KiB
// objects are slow on every filesystem and costly on object storage
// (restic's layout).
//
//   pack   = salt (16 random bytes) ‖ blob₀ ‖ blob₁ ‖ … ‖ header ‖ u32le(header length)
//   header = "QBP2" ‖ u32le count ‖ count × (id 32 ‖ u32le offset ‖ u32le length ‖ u32le rawLength)
//
// The header is sealed when the repository is encrypted. The same header is
// also written as the pack's index object (index/<pack id>) so that opening a
// repository reads one small object per pack; a lost index can be rebuilt
// from the pack's own trailer. A pack's id is the SHA-256 of its bytes; the
// salt makes every pack written a new object, even with the same chunks in
// the same order: gc (gc.ts) relies on a chunk stored again (by a backup that
// ignores a condemned pack, or by a repack) landing in a pack that is not the
// old one, which it may be about to delete. Readers go by the header's
// offsets, so packs without a salt read the same.
//
// Invariants:
// - Parsing is hostile-input safe: counts, offsets and lengths are checked
//   against the pack size and the repository's chunk size before use.

import { createHash, randomBytes } from 'node:crypto';
import { QbackupError } from '../errors.js';
import { SEAL_OVERHEAD, seal, unseal, type MasterKey } from './crypto.js';

const MAGIC = Buffer.from('QBP2');
const ENTRY_BYTES = 44;
/** Packs are closed once they reach this size. */
export const PACK_TARGET_BYTES = 16 * 1024 * 1024;
export const PACK_ID = /^[0-9a-f]{64}$/;
const SALT_BYTES = 16;

export interface PackEntry {
  id: Buffer;
  offset: number;
  length: number;
  rawLength: number;
}

export function packKey(packId: string): string {
  return `data/${packId.slice(0, 2)}/${packId}`;
}

export function packIndexKey(packId: string): string {
  return `index/${packId}`;
}

/** Collects stored chunks until a pack is full; `finish` returns the pack's bytes, id and header. */
export class PackBuilder {
  private readonly blobs: Buffer[] = [randomBytes(SALT_BYTES)];
  readonly entries: PackEntry[] = [];
  private size = SALT_BYTES;

  get bytes(): number {
    return this.size;
  }

  get count(): number {
    return this.entries.length;
  }

  add(id: Buffer, blob: Buffer, rawLength: number): void {
    this.entries.push({ id, offset: this.size, length: blob.length, rawLength });
    this.blobs.push(blob);
    this.size += blob.length;
  }

  finish(key: MasterKey | undefined): { packId: string; pack: Buffer; header: Buffer } {
    const { parts, header } = this.finishParts(key);
    const pack = Buffer.concat(parts);
    return { packId: createHash('sha256').update(pack).digest('hex'), pack, header };
  }

  /** The pack's bytes as parts (salt, blobs, header, trailer length) and its header, for a worker to put together and hash. */
  finishParts(key: MasterKey | undefined): { parts: Buffer[]; header: Buffer } {
    const header = formatHeader(this.entries, key);
    const length = Buffer.alloc(4);
    length.writeUInt32LE(header.length);
    return { parts: [...this.blobs, header, length], header };
  }
}

export function formatHeader(entries: readonly PackEntry[], key: MasterKey | undefined): Buffer {
  const plain = Buffer.alloc(8 + entries.length * ENTRY_BYTES);
  MAGIC.copy(plain, 0);
  plain.writeUInt32LE(entries.length, 4);
  entries.forEach((e, i) => {
    const at = 8 + i * ENTRY_BYTES;
    e.id.copy(plain, at);
    plain.writeUInt32LE(e.offset, at + 32);
    plain.writeUInt32LE(e.length, at + 36);
    plain.writeUInt32LE(e.rawLength, at + 40);
  });
  return key !== undefined ? seal(key.dataKey, plain) : plain;
}

/**
 * Parses a pack header (from the index object or the pack's trailer).
 * `dataBytes` bounds the entries (the pack's size without its header, when
 * known); `maxRawLength` is the repository's chunk size.
 */
export function parseHeader(stored: Buffer, key: MasterKey | undefined, what: string, maxRawLength: number, dataBytes?: number): PackEntry[] {
  const plain = key !== undefined ? unseal(key.dataKey, stored, what) : stored;
  const bad = (why: string): QbackupError => new QbackupError('REPO_DAMAGED', `${what} is damaged: ${why}`);
  if (plain.length < 8 || !plain.subarray(0, 4).equals(MAGIC)) throw bad('not a pack header');
  const count = plain.readUInt32LE(4);
  if (plain.length !== 8 + count * ENTRY_BYTES) throw bad(`${count} entries do not fit its ${plain.length} bytes`);
  const entries: PackEntry[] = [];
  let end = 0;
  for (let i = 0; i < count; i++) {
    const at = 8 + i * ENTRY_BYTES;
    const e = { id: Buffer.from(plain.subarray(at, at + 32)), offset: plain.readUInt32LE(at + 32), length: plain.readUInt32LE(at + 36), rawLength: plain.readUInt32LE(at + 40) };
    if (e.rawLength === 0 || e.rawLength > maxRawLength) throw bad(`entry ${i} claims ${e.rawLength} bytes of data`);
    if (e.length === 0 || e.length > maxRawLength + 1 + SEAL_OVERHEAD) throw bad(`entry ${i} is ${e.length} bytes long`);
    if (dataBytes !== undefined && e.offset + e.length > dataBytes) throw bad(`entry ${i} lies beyond the pack's data`);
    end = Math.max(end, e.offset + e.length);
    entries.push(e);
  }
  return entries;
}

/** Splits a whole pack into its header entries, checking the trailer (used by verify and index rebuild). */
export function parsePack(pack: Buffer, key: MasterKey | undefined, what: string, maxRawLength: number): PackEntry[] {
  if (pack.length < 4) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: too short`);
  const headerLength = pack.readUInt32LE(pack.length - 4);
  if (headerLength > pack.length - 4) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: its trailer names a header longer than the pack`);
  const dataBytes = pack.length - 4 - headerLength;
  return parseHeader(pack.subarray(dataBytes, pack.length - 4), key, what, maxRawLength, dataBytes);
}
