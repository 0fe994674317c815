// How a chunk is stored: its id (chunkId in crypto.ts), then a codec byte and
// the payload (zstd, or raw when that is not smaller), sealed with AES-256-GCM
// when the repository is encrypted. Reading reverses it and checks the
// plaintext against the id, so a damaged or swapped chunk is always caught.

import { QbackupError } from '../errors.js';
import type { ChunkCompressor } from './compress.js';
import { chunkId, seal, unseal, type MasterKey } from './crypto.js';

export const CODEC_RAW = 0;
export const CODEC_ZSTD = 1;

/** The id every all-zero chunk would have: never stored, a hole in indexes. */
export const ZERO_ID = Buffer.alloc(32);

export interface ChunkCodec {
  compressor: ChunkCompressor;
  key: MasterKey | undefined;
}

/** True when every byte is zero (such chunks are holes, never stored). */
export function isZero(data: Uint8Array): boolean {
  const view = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  // Compare in 64 KiB slices against a shared zero buffer (fast memcmp).
  for (let off = 0; off < view.length; off += ZEROES.length) {
    const n = Math.min(ZEROES.length, view.length - off);
    if (view.compare(ZEROES, 0, n, off, off + n) !== 0) return false;
  }
  return true;
}
const ZEROES = Buffer.alloc(64 * 1024);

/**
 * A chunk's stored form in two parts, `codec` (a codec byte, absent once
 * sealed) then `body`: the chunk's own bytes when stored raw (no copy), the
 * compressed bytes, or the whole sealed blob of an encrypted repository.
 */
export interface EncodedChunk {
  codec: number | undefined;
  body: Uint8Array;
}

/** The codec bytes, shared (never to be transferred or written to). */
export const CODEC_BYTES: readonly Buffer[] = [Buffer.of(CODEC_RAW), Buffer.of(CODEC_ZSTD)];

/** The stored form of a chunk whose id is already known, as parts (see EncodedChunk). */
export function encodeChunkParts(data: Uint8Array, codec: ChunkCodec): EncodedChunk {
  const packed = codec.compressor.compress(data);
  const tag = packed !== undefined ? CODEC_ZSTD : CODEC_RAW;
  const body = packed ?? data;
  if (codec.key === undefined) return { codec: tag, body };
  return { codec: undefined, body: seal(codec.key.dataKey, [CODEC_BYTES[tag] as Buffer, body]) };
}

/** The parts of an encoded chunk, in the order they are stored. */
export function encodedParts(e: EncodedChunk): Uint8Array[] {
  return e.codec === undefined ? [e.body] : [CODEC_BYTES[e.codec] as Buffer, e.body];
}

/** The stored form of a chunk whose id is already known, in one buffer. */
export function encodeChunk(data: Uint8Array, codec: ChunkCodec): Buffer {
  return Buffer.concat(encodedParts(encodeChunkParts(data, codec)));
}

/** The chunk's plaintext from its stored form, checked against its id; `what` names it in errors. */
export function decodeChunk(blob: Buffer, id: Buffer, rawLength: number, codec: ChunkCodec, what: string): Buffer {
  const plain = codec.key !== undefined ? unseal(codec.key.dataKey, blob, what) : blob;
  const kind = plain[0];
  let data: Buffer;
  if (kind === CODEC_RAW) data = plain.subarray(1);
  else if (kind === CODEC_ZSTD) data = codec.compressor.decompress(plain.subarray(1), rawLength, what);
  else throw new QbackupError('REPO_DAMAGED', `${what} is damaged: unknown codec ${kind ?? 'none'}`);
  if (data.length !== rawLength) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: ${data.length} bytes, expected ${rawLength}`);
  if (!chunkId(data, codec.key).equals(id)) throw new QbackupError('REPO_DAMAGED', `${what} is damaged: its content does not match its id`);
  return data;
}
