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

import { createHash, randomFillSync } from 'node:crypto';
import { QbackupError } from '../errors.js';
import { alignedBuffer } from '../util/direct-io.js';
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

/**
 * Room for a pack as it fills: its target size, one more chunk and a header.
 * Packs are put together in buffers of this size that are reused from one
 * pack to the next (packBuffers): memory whose pages are already mapped is
 * copied into several times faster than fresh memory, and a full backup
 * otherwise allocates (and collects) its whole size in 16 MiB buffers.
 */
const PACK_BUFFER_BYTES = PACK_TARGET_BYTES + 2 * 1024 * 1024;
/** Pack buffers kept for reuse (a pack filling and a few being stored). */
const PACK_BUFFERS_KEPT = 6;
const packBuffers: Buffer[] = [];

/**
 * A buffer for a pack: a reused one, else a new one. Pack buffers are shared
 * memory: a worker hashes a full pack where it lies, with nothing moved.
 * (Moving 16 MiB buffers between threads and back made V8 count each return
 * as new external memory, and collect garbage every few packs.) They are
 * also page aligned, so the local backend writes a pack with direct I/O.
 */
function takePackBuffer(atLeast: number): Buffer {
  return (atLeast <= PACK_BUFFER_BYTES ? packBuffers.pop() : undefined) ?? alignedBuffer(Math.max(atLeast, PACK_BUFFER_BYTES), { shared: true });
}

/**
 * Gives a pack's buffer back for reuse once nothing reads it any more (its
 * pack is stored). `pack` may be a view of it: the whole memory is kept.
 */
export function releasePackBuffer(pack: Uint8Array): void {
  if (!(pack.buffer instanceof SharedArrayBuffer) || pack.buffer.byteLength !== PACK_BUFFER_BYTES || packBuffers.length >= PACK_BUFFERS_KEPT) return;
  packBuffers.push(Buffer.from(pack.buffer, 0, PACK_BUFFER_BYTES));
}

/**
 * Collects stored chunks until a pack is full, copying each into the pack's
 * own buffer as it comes (the chunk's memory is the caller's again at once);
 * `complete` or `finish` ends the pack.
 */
export class PackBuilder {
  private buf: Buffer;
  readonly entries: PackEntry[] = [];
  private size = SALT_BYTES;

  constructor() {
    this.buf = takePackBuffer(0);
    randomFillSync(this.buf, 0, SALT_BYTES);
  }

  get bytes(): number {
    return this.size;
  }

  get count(): number {
    return this.entries.length;
  }

  /** Adds a stored chunk: one blob, or its parts in order (see encodedParts in chunk.ts). */
  add(id: Buffer, blob: Uint8Array | readonly Uint8Array[], rawLength: number): void {
    const parts = blob instanceof Uint8Array ? [blob] : blob;
    const length = parts.reduce((n, p) => n + p.byteLength, 0);
    this.reserve(length);
    this.entries.push({ id, offset: this.size, length, rawLength });
    for (const p of parts) {
      this.buf.set(p, this.size);
      this.size += p.byteLength;
    }
  }

  /**
   * Ends the pack: its whole bytes (salt, blobs, header, trailer length) as a
   * view of the builder's buffer, which is the caller's from now on (give it
   * back with releasePackBuffer once stored), and its header alone.
   */
  complete(key: MasterKey | undefined): { pack: Buffer; header: Buffer } {
    const header = formatHeader(this.entries, key);
    this.reserve(header.length + 4);
    header.copy(this.buf, this.size);
    this.buf.writeUInt32LE(header.length, this.size + header.length);
    const pack = this.buf.subarray(0, this.size + header.length + 4);
    this.buf = Buffer.alloc(0);
    return { pack, header };
  }

  /** Ends the pack and hashes it here (complete() leaves the hash to the caller, e.g. a worker). */
  finish(key: MasterKey | undefined): { packId: string; pack: Buffer; header: Buffer } {
    const { pack, header } = this.complete(key);
    return { packId: createHash('sha256').update(pack).digest('hex'), pack, header };
  }

  /** Room for `more` bytes after what is there (a larger buffer when a pack outgrows the usual one). */
  private reserve(more: number): void {
    if (this.size + more <= this.buf.length) return;
    const bigger = takePackBuffer(Math.max(this.size + more, 2 * this.buf.length));
    this.buf.copy(bigger, 0, 0, this.size);
    releasePackBuffer(this.buf);
    this.buf = bigger;
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
