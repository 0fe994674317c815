// The NBD client's allocation-free read path (src/nbd/parser.ts, connection.ts):
// - transient input (a read buffer the socket reuses): whatever the parser
//   emits or keeps is its own copy, so overwriting the buffer after push()
//   changes nothing;
// - large payloads are gathered into their own buffer as they arrive, and
//   readTarget() lets the socket read the rest of one straight into it;
// - reads with `into`: data lands in the caller's buffer at its offset,
//   holes are left to the caller, a chunk outside the read is refused before
//   a byte of it is written;
// all fed in seeded random splits (the seed is printed on failure; replay
// with NBD_READ_PATH_SEED=<seed>).

import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';
import { NBD_CMD_READ, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NbdReplyParser, type NbdProtocolError, type NbdReply, type NbdRequestInfo } from '../../src/nbd/index.js';

const KiB = 1024;

function chunk(cookie: bigint, last: boolean, type: number, payload: Buffer): Buffer {
  const header = Buffer.alloc(20);
  header.writeUInt32BE(0x668e33ef, 0);
  header.writeUInt16BE(last ? NBD_REPLY_FLAG_DONE : 0, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(cookie, 8);
  header.writeUInt32BE(payload.length, 16);
  return Buffer.concat([header, payload]);
}
const u64 = (v: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const data = (cookie: bigint, offset: number, bytes: Buffer, last = false): Buffer => chunk(cookie, last, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(offset), bytes]));
const hole = (cookie: bigint, offset: number, length: number, last = false): Buffer => {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(BigInt(offset));
  p.writeUInt32BE(length, 8);
  return chunk(cookie, last, NBD_REPLY_TYPE_OFFSET_HOLE, p);
};
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
}
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const SEED = Number(process.env['NBD_READ_PATH_SEED'] ?? 20261129);

function parserWith(requests: Array<[bigint, NbdRequestInfo]>): { parser: NbdReplyParser; replies: NbdReply[]; errors: NbdProtocolError[] } {
  const replies: NbdReply[] = [];
  const errors: NbdProtocolError[] = [];
  const parser = new NbdReplyParser({ exportName: 'disk0', exportSize: 16 * 1024 * KiB, structuredReplies: true, contextIds: [], onReply: (r) => replies.push(r), onError: (e) => errors.push(e) });
  for (const [c, r] of requests) parser.expect(c, r);
  return { parser, replies, errors };
}

/**
 * Feeds `stream` as a socket with a reused read buffer would: random-sized
 * reads into one scratch buffer (pushed as transient, then scribbled over),
 * or straight into readTarget() when the parser offers one.
 */
function feedLikeSocket(parser: NbdReplyParser, stream: Buffer, next: () => number, maxRead: number): { direct: number } {
  const scratch = Buffer.alloc(maxRead);
  let at = 0;
  let direct = 0;
  while (at < stream.length && !parser.isStopped) {
    const target = parser.readTarget() ?? scratch;
    const n = Math.min(stream.length - at, target.length, 1 + Math.floor(next() * maxRead));
    stream.copy(target, 0, at, at + n);
    at += n;
    if (target === scratch) {
      parser.push(scratch.subarray(0, n), true);
      scratch.fill(0xee); // the socket's next read reuses it
    } else {
      direct += n;
      parser.push(target.subarray(0, n));
    }
  }
  return { direct };
}

describe('NBD read path without per-read allocations', () => {
  it('transient input: emitted data and kept bytes are copies; large payloads go straight into their buffer', () => {
    const next = rng(SEED);
    for (let round = 0; round < 40; round++) {
      const big = pattern(300 * KiB, round);
      const small = pattern(3000, round + 1);
      const stream = Buffer.concat([data(1n, 0, big, true), data(2n, 4 * 1024 * KiB, small), hole(2n, 4 * 1024 * KiB + 3000, 1096, true)]);
      const { parser, replies, errors } = parserWith([
        [1n, { command: NBD_CMD_READ, flags: 0, offset: 0, length: big.length }],
        [2n, { command: NBD_CMD_READ, flags: 0, offset: 4 * 1024 * KiB, length: 4096 }],
      ]);
      const { direct } = feedLikeSocket(parser, stream, next, 1 + Math.floor(next() * 70 * KiB));
      assert.deepEqual(errors, [], `seed ${SEED} round ${round}`);
      const chunks = replies.map((r) => r.chunk);
      assert.deepEqual(chunks.map((c) => c.type), ['data', 'data', 'hole'], `seed ${SEED} round ${round}`);
      const [c0, c1] = chunks;
      assert.ok(c0?.type === 'data' && c0.data.equals(big), `seed ${SEED} round ${round}: the large payload survives its read buffer's reuse`);
      assert.ok(c1?.type === 'data' && c1.data.equals(small), `seed ${SEED} round ${round}: the small payload too`);
      assert.ok(direct > 0 || stream.length < 70 * KiB, `seed ${SEED} round ${round}: some of the large payload was read straight into its buffer`);
    }
  });

  it('reads with `into`: data lands in the caller buffer in place, holes are untouched, any split', () => {
    const next = rng(SEED + 1);
    for (let round = 0; round < 40; round++) {
      const a = pattern(100 * KiB, round);
      const b = pattern(20 * KiB, round + 3);
      const into = Buffer.alloc(128 * KiB, 0x55);
      const base = 1024 * KiB;
      // Chunks out of order: b at +108 KiB, a hole of 8 KiB at +100 KiB, a at +0.
      const stream = Buffer.concat([data(9n, base + 108 * KiB, b), hole(9n, base + 100 * KiB, 8 * KiB), data(9n, base, a, true)]);
      const { parser, replies, errors } = parserWith([[9n, { command: NBD_CMD_READ, flags: 0, offset: base, length: into.length, into }]]);
      feedLikeSocket(parser, stream, next, 1 + Math.floor(next() * 40 * KiB));
      assert.deepEqual(errors, [], `seed ${SEED} round ${round}`);
      assert.ok(into.subarray(0, 100 * KiB).equals(a), `seed ${SEED} round ${round}`);
      assert.ok(into.subarray(108 * KiB).equals(b), `seed ${SEED} round ${round}`);
      assert.ok(into.subarray(100 * KiB, 108 * KiB).every((x) => x === 0x55), 'the parser leaves holes to the caller');
      for (const r of replies) {
        if (r.chunk.type !== 'data') continue;
        assert.equal(r.chunk.data.buffer, into.buffer, 'data is a view of the caller buffer');
        assert.equal(r.chunk.data.byteOffset, into.byteOffset + r.chunk.offset - base);
      }
    }
  });

  it('a data chunk outside a read with `into` is refused before it is written', () => {
    const into = Buffer.alloc(64 * KiB, 0x55);
    const { parser, replies, errors } = parserWith([[3n, { command: NBD_CMD_READ, flags: 0, offset: 64 * KiB, length: into.length, into }]]);
    parser.push(data(3n, 100 * KiB, pattern(32 * KiB, 1), true));
    assert.equal(replies.length, 0);
    assert.equal(errors.length, 1);
    assert.equal(errors[0]?.reason, 'out-of-range');
    assert.ok(into.every((x) => x === 0x55), 'nothing was written into the caller buffer');
  });
});
