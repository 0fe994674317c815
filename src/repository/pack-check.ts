// Checking one whole pack (Store.checkPack, for verify --read-data), on a
// decode worker (decode.ts) or inline for small packs: its bytes against its
// id (the SHA-256 of salt, chunks and trailer) and every chunk its header
// lists decoded and checked against the chunk's own id (decodeChunk). Only
// what is damaged comes back: verify needs no plaintext, so none is copied
// or handed over.
//
// Invariants:
// - Every byte of the pack is hashed exactly once and in order, whatever the
//   header says (entries out of order, overlapping or past the end: the
//   header is hostile input); each chunk is hashed into the pack's hash just
//   before it is decoded, while its bytes are still in the CPU's cache, so
//   the pack is read from memory once.
// - One damaged chunk never hides the others; its message is decodeChunk's,
//   the same a restore of that chunk would give.

import { createHash } from 'node:crypto';
import { decodeChunk } from './chunk.js';
import type { DecodeEntry } from './chunk-worker.js';
import type { ChunkCompressor } from './compress.js';

export interface CheckPackRequest {
  op: 'check';
  seq: number;
  /** The whole pack. */
  bytes: Uint8Array;
  /** Every chunk the pack's header lists, in the header's order. */
  entries: DecodeEntry[];
  dataKey?: Uint8Array | undefined;
  idKey?: Uint8Array | undefined;
  packId: string;
}

export interface CheckPackReply {
  op: 'checked';
  seq: number;
  /** The damaged chunks: their index in the request's entries and why (one sentence). */
  damaged: Array<{ index: number; error: string }>;
  /** Undefined when the pack hashes to its id, else why not. */
  packError?: string | undefined;
}

/** Checks a whole pack in one pass over its bytes (see the module's invariants). */
export function checkPackBytes(msg: CheckPackRequest, compressor: ChunkCompressor): CheckPackReply {
  const bytes = Buffer.from(msg.bytes.buffer, msg.bytes.byteOffset, msg.bytes.byteLength);
  const key = msg.dataKey !== undefined && msg.idKey !== undefined ? { dataKey: Buffer.from(msg.dataKey), idKey: Buffer.from(msg.idKey) } : undefined;
  const hash = createHash('sha256');
  let hashed = 0;
  const hashTo = (end: number): void => {
    const to = Math.min(end, bytes.length);
    if (to <= hashed) return;
    hash.update(bytes.subarray(hashed, to));
    hashed = to;
  };
  const order = msg.entries.map((_, i) => i).sort((a, b) => (msg.entries[a] as DecodeEntry).at - (msg.entries[b] as DecodeEntry).at);
  const damaged: CheckPackReply['damaged'] = [];
  for (const index of order) {
    const e = msg.entries[index] as DecodeEntry;
    hashTo(e.at + e.length);
    const blob = bytes.subarray(e.at, e.at + e.length);
    if (blob.length !== e.length) {
      damaged.push({ index, error: `${e.what} is damaged: its pack is shorter than its index says` });
      continue;
    }
    try {
      decodeChunk(blob, Buffer.from(e.id.buffer, e.id.byteOffset, e.id.byteLength), e.rawLength, { compressor, key }, e.what);
    } catch (err) {
      damaged.push({ index, error: err instanceof Error ? err.message : String(err) });
    }
  }
  hashTo(bytes.length);
  const actual = hash.digest('hex');
  damaged.sort((a, b) => a.index - b.index);
  return { op: 'checked', seq: msg.seq, damaged, packError: actual !== msg.packId ? `its bytes hash to ${actual}, not to its id` : undefined };
}
