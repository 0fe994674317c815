// decodeEntries with `inPlace`: the plaintexts put back to back in the
// request's own bytes equal those decoded into a fresh buffer, whatever the
// mix of raw, compressed and encrypted chunks and gaps between them, and a
// damaged chunk is still named without disturbing the others.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { encodeChunk } from '../../src/repository/chunk.js';
import { decodeEntries, type DecodeEntry } from '../../src/repository/chunk-worker.js';
import { ChunkCompressor } from '../../src/repository/compress.js';
import { chunkId, newMasterKey, type MasterKey } from '../../src/repository/crypto.js';

const compressor = new ChunkCompressor();

/** A pack-like buffer: the chunks' blobs with `gap` bytes of filler before each, and their entries. */
function layout(chunks: readonly Buffer[], key: MasterKey | undefined, gap: number): { bytes: Buffer; entries: DecodeEntry[] } {
  const parts: Buffer[] = [];
  const entries: DecodeEntry[] = [];
  let at = 0;
  for (const [i, c] of chunks.entries()) {
    const blob = encodeChunk(c, { compressor, key });
    parts.push(Buffer.alloc(gap, 0xee), blob);
    entries.push({ id: chunkId(c, key), at: at + gap, length: blob.length, rawLength: c.length, what: `chunk ${i}` });
    at += gap + blob.length;
  }
  return { bytes: Buffer.concat(parts), entries };
}

function decode(bytes: Buffer, entries: DecodeEntry[], key: MasterKey | undefined, inPlace: boolean): Buffer[] {
  const reply = decodeEntries({ op: 'decode', seq: 1, bytes, entries, dataKey: key?.dataKey, idKey: key?.idKey, inPlace }, compressor);
  const plain = Buffer.from(reply.plain.buffer, reply.plain.byteOffset, reply.plain.byteLength);
  return reply.results.map((r, i) => ('error' in r ? Buffer.from(`error ${i}: ${r.error}`) : Buffer.from(plain.subarray(r.at, r.at + (entries[i]?.rawLength ?? 0)))));
}

const random = (n: number): Buffer => randomBytes(n);
const text = (n: number, seed: number): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => `line ${seed} ${i % 97}\n`).join('').slice(0, n));

describe('decodeEntries in place', () => {
  const cases: Array<{ name: string; chunks: Buffer[] }> = [
    { name: 'raw chunks only', chunks: [random(65536), random(65536), random(4096), random(65536)] },
    { name: 'compressible chunks only', chunks: [text(65536, 1), text(65536, 2)] },
    { name: 'raw and compressible mixed', chunks: [random(65536), text(65536, 3), random(65536), text(8192, 4), random(65536)] },
  ];
  for (const key of [undefined, newMasterKey()]) {
    for (const gap of [0, 7, 300]) {
      for (const c of cases) {
        it(`${c.name}, ${key === undefined ? 'plain' : 'encrypted'}, gap ${gap}: the same plaintexts as a fresh buffer, each equal to its chunk`, () => {
          const { bytes, entries } = layout(c.chunks, key, gap);
          const fresh = decode(Buffer.from(bytes), entries, key, false);
          const inPlace = decode(bytes, entries, key, true);
          assert.deepEqual(inPlace, fresh);
          assert.deepEqual(inPlace, c.chunks);
        });
      }
    }
  }

  it('a damaged chunk fails alone; the others still decode exactly', () => {
    const chunks = [random(65536), random(65536), random(65536)];
    const { bytes, entries } = layout(chunks, undefined, 0);
    const second = entries[1];
    assert.ok(second !== undefined);
    bytes[second.at + 100] = (bytes[second.at + 100] ?? 0) ^ 1;
    const out = decode(bytes, entries, undefined, true);
    assert.deepEqual(out[0], chunks[0]);
    assert.match(out[1]?.toString() ?? '', /^error 1: chunk 1 is damaged/);
    assert.deepEqual(out[2], chunks[2]);
  });
});
