// A backup of one disk is an index: for every chunk-sized slot of the disk,
// the id of the chunk holding it (the zero id for a hole). A full backup
// writes a full index; an incremental writes a delta (the slots that changed)
// on its parent's index, so its metadata grows with the change, not the disk.
// Indexes are content-addressed objects (indexes/<sha-256 of the stored
// bytes>) that a manifest names; a chain of deltas is resolved in memory, so
// any backup restores on its own without reading another backup's data.
//
//   index = "QBX2" ‖ u8 kind (0 full, 1 delta) ‖ u32le chunkSize ‖ u64le virtualSize
//           ‖ u32le count ‖ parent (32 bytes; zero for a full)
//           ‖ full: count × id(32)   delta: count × (u32le slot ‖ id(32)), slots ascending
//
// stored as salt (16 random bytes) ‖ flag ‖ zstd of that (or the plain bytes),
// sealed when the repository is encrypted. The salt makes every index written
// a new object: a backup never "writes" an index that merely matches one gc
// has condemned and is about to delete (gc.ts).
//
// Invariants:
// - A full index has exactly ceil(virtualSize / chunkSize) slots; a delta's
//   slots are strictly ascending and below that count.
// - Chains are at most MAX_CHAIN deltas long: the backup after that writes a
//   full index again (metadata only; no data is copied).

import { createHash, randomBytes } from 'node:crypto';
import { QbackupError } from '../errors.js';
import type { ChunkCompressor } from './compress.js';
import { seal, unseal, type MasterKey } from './crypto.js';

const MAGIC = Buffer.from('QBX2');
const HEADER_BYTES = 4 + 1 + 4 + 8 + 4 + 32;
const SALT_BYTES = 16;
export const MAX_CHAIN = 16;
export const INDEX_ID = /^[0-9a-f]{64}$/;

export function indexKey(indexId: string): string {
  return `indexes/${indexId.slice(0, 2)}/${indexId}`;
}

export interface FullIndex {
  kind: 'full';
  chunkSize: number;
  virtualSize: number;
  /** slots × 32 bytes of chunk ids. */
  ids: Buffer;
}

export interface DeltaIndex {
  kind: 'delta';
  chunkSize: number;
  virtualSize: number;
  parent: string;
  slots: Uint32Array;
  /** slots.length × 32 bytes. */
  ids: Buffer;
}

export type DiskIndex = FullIndex | DeltaIndex;

export function slotCount(virtualSize: number, chunkSize: number): number {
  return Math.ceil(virtualSize / chunkSize);
}

export function encodeIndex(index: DiskIndex, compressor: ChunkCompressor, key: MasterKey | undefined): { indexId: string; stored: Buffer } {
  const count = index.kind === 'full' ? index.ids.length / 32 : index.slots.length;
  const body = index.kind === 'full' ? index.ids : encodeDelta(index);
  const head = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(head, 0);
  head.writeUInt8(index.kind === 'full' ? 0 : 1, 4);
  head.writeUInt32LE(index.chunkSize, 5);
  head.writeBigUInt64LE(BigInt(index.virtualSize), 9);
  head.writeUInt32LE(count, 17);
  if (index.kind === 'delta') Buffer.from(index.parent, 'hex').copy(head, 21);
  const plain = Buffer.concat([head, body]);
  const packed = compressor.compress(plain);
  const framed = Buffer.concat([randomBytes(SALT_BYTES), Buffer.of(packed !== undefined ? 1 : 0), packed ?? plain]);
  const stored = key !== undefined ? seal(key.dataKey, framed) : framed;
  return { indexId: createHash('sha256').update(stored).digest('hex'), stored };
}

function encodeDelta(index: DeltaIndex): Buffer {
  const out = Buffer.alloc(index.slots.length * 36);
  for (let i = 0; i < index.slots.length; i++) {
    out.writeUInt32LE(index.slots[i] ?? 0, i * 36);
    index.ids.copy(out, i * 36 + 4, i * 32, i * 32 + 32);
  }
  return out;
}

/** Parses a stored index, checking every bound; `what` names it in errors. */
export function decodeIndex(stored: Buffer, indexId: string, compressor: ChunkCompressor, key: MasterKey | undefined, what: string, maxBytes: number): DiskIndex {
  const bad = (why: string): QbackupError => new QbackupError('REPO_DAMAGED', `${what} is damaged: ${why}`);
  if (createHash('sha256').update(stored).digest('hex') !== indexId) throw bad('its content does not match its id');
  const framed = key !== undefined ? unseal(key.dataKey, stored, what) : stored;
  if (framed.length < SALT_BYTES + 1) throw bad('too short');
  const flag = framed[SALT_BYTES];
  const body0 = framed.subarray(SALT_BYTES + 1);
  const plain = flag === 1 ? decompressBounded(body0, compressor, what, maxBytes) : body0;
  if (plain.length < HEADER_BYTES || !plain.subarray(0, 4).equals(MAGIC)) throw bad('not a disk index');
  const kind = plain.readUInt8(4);
  const chunkSize = plain.readUInt32LE(5);
  const virtualSize = Number(plain.readBigUInt64LE(9));
  const count = plain.readUInt32LE(17);
  if (chunkSize === 0 || !Number.isSafeInteger(virtualSize)) throw bad('impossible sizes');
  const slots = slotCount(virtualSize, chunkSize);
  const body = plain.subarray(HEADER_BYTES);
  if (kind === 0) {
    if (count !== slots || body.length !== count * 32) throw bad(`a full index of ${count} slots for ${slots}`);
    return { kind: 'full', chunkSize, virtualSize, ids: Buffer.from(body) };
  }
  if (kind !== 1 || body.length !== count * 36) throw bad('a delta of the wrong length');
  const delta: DeltaIndex = { kind: 'delta', chunkSize, virtualSize, parent: plain.subarray(21, 53).toString('hex'), slots: new Uint32Array(count), ids: Buffer.alloc(count * 32) };
  let last = -1;
  for (let i = 0; i < count; i++) {
    const slot = body.readUInt32LE(i * 36);
    if (slot <= last || slot >= slots) throw bad(`slot ${slot} out of order or beyond the disk`);
    last = slot;
    delta.slots[i] = slot;
    body.copy(delta.ids, i * 32, i * 36 + 4, i * 36 + 36);
  }
  return delta;
}

function decompressBounded(frame: Buffer, compressor: ChunkCompressor, what: string, maxBytes: number): Buffer {
  const declared = compressor.contentSize(frame);
  if (declared === undefined || declared > maxBytes) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: it declares an impossible size`);
  return compressor.decompress(frame, declared, what);
}

/**
 * Applies a chain of indexes (a full one first, then its deltas oldest
 * first) into the full slot table of the newest.
 */
export function resolveChain(chain: readonly DiskIndex[], what: string): FullIndex {
  const [base, ...deltas] = chain;
  if (base === undefined || base.kind !== 'full') throw new QbackupError('REPO_DAMAGED', `${what} is damaged: its index chain does not start with a full index`);
  let ids = base.ids;
  const { virtualSize } = base;
  for (const d of deltas) {
    if (d.kind !== 'delta' || d.chunkSize !== base.chunkSize) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: its index chain mixes chunk sizes`);
    // A resized disk always gets a full backup, so a chain never changes size.
    if (d.virtualSize !== virtualSize) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: its index chain changes the disk's size`);
    if (ids === base.ids) ids = Buffer.from(ids);
    for (let i = 0; i < d.slots.length; i++) d.ids.copy(ids, (d.slots[i] ?? 0) * 32, i * 32, i * 32 + 32);
  }
  return { kind: 'full', chunkSize: base.chunkSize, virtualSize, ids };
}
