// The transmission-phase push parser (src/nbd/parser.ts): replies are built
// here byte by byte as a server would send them, fed in every possible
// split, and hostile replies must be refused with an NbdProtocolError that
// names the export, after which the parser ignores its input.
//
// Randomized splits use a seed printed on failure; replay one with
// NBD_PARSER_SEED=<seed> node --test dist/test/unit/nbd-parser.test.js

import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';
import {
  ByteQueue,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NbdProtocolError,
  NbdReplyParser,
  type NbdProtocolReason,
  type NbdReply,
  type NbdReplyParserOptions,
  type NbdRequestInfo,
} from '../../src/nbd/index.js';

const EXPORT = 'disk0';
const MiB = 1024 * 1024;

// ---- Server-side encoders, written independently of src/nbd/codec.ts ----

function simple(cookie: bigint, error: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(16);
  header.writeUInt32BE(0x67446698, 0);
  header.writeUInt32BE(error, 4);
  header.writeBigUInt64BE(cookie, 8);
  return Buffer.concat([header, data]);
}

function chunk(cookie: bigint, flags: number, type: number, payload: Buffer, length = payload.length): Buffer {
  const header = Buffer.alloc(20);
  header.writeUInt32BE(0x668e33ef, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(cookie, 8);
  header.writeUInt32BE(length, 16);
  return Buffer.concat([header, payload]);
}

function u64(value: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(value));
  return b;
}

function u32(...values: number[]): Buffer {
  const b = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => b.writeUInt32BE(v, 4 * i));
  return b;
}

const done = (last: boolean): number => (last ? NBD_REPLY_FLAG_DONE : 0);
const dataChunk = (cookie: bigint, offset: number, bytes: Buffer, last = false): Buffer =>
  chunk(cookie, done(last), NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(offset), bytes]));
const holeChunk = (cookie: bigint, offset: number, length: number, last = false): Buffer =>
  chunk(cookie, done(last), NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(offset), u32(length)]));
const noneChunk = (cookie: bigint): Buffer => chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(0));
const statusChunk = (cookie: bigint, contextId: number, descriptors: Array<[number, number]>, last = false): Buffer =>
  chunk(cookie, done(last), NBD_REPLY_TYPE_BLOCK_STATUS, u32(contextId, ...descriptors.flat()));
function errorChunk(cookie: bigint, error: number, message: string, last = true, offset?: number): Buffer {
  const text = Buffer.from(message);
  const fixed = Buffer.alloc(6);
  fixed.writeUInt32BE(error, 0);
  fixed.writeUInt16BE(text.length, 4);
  const type = offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET;
  return chunk(cookie, done(last), type, Buffer.concat([fixed, text, offset === undefined ? Buffer.alloc(0) : u64(offset)]));
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

// ---- Harness ----

interface Harness {
  parser: NbdReplyParser;
  replies: NbdReply[];
  errors: NbdProtocolError[];
}

function harness(options: Partial<NbdReplyParserOptions> = {}, requests: Array<[bigint, NbdRequestInfo]> = []): Harness {
  const replies: NbdReply[] = [];
  const errors: NbdProtocolError[] = [];
  const parser = new NbdReplyParser({
    exportName: EXPORT,
    exportSize: 1 * MiB,
    structuredReplies: true,
    contextIds: [1, 2],
    onReply: (r) => replies.push(r),
    onError: (e) => errors.push(e),
    ...options,
  });
  for (const [cookie, request] of requests) parser.expect(cookie, request);
  return { parser, replies, errors };
}

const read = (offset: number, length: number): NbdRequestInfo => ({ command: NBD_CMD_READ, flags: 0, offset, length });
const status = (offset: number, length: number, flags = 0): NbdRequestInfo => ({ command: NBD_CMD_BLOCK_STATUS, flags, offset, length });
const write = (offset: number, length: number): NbdRequestInfo => ({ command: NBD_CMD_WRITE, flags: 0, offset, length });

/** Feeds `stream` and expects exactly one protocol error with `reason`, naming the export. */
function expectViolation(h: Harness, stream: Buffer, reason: NbdProtocolReason, pattern?: RegExp): NbdProtocolError {
  h.parser.push(stream);
  assert.equal(h.errors.length, 1, `expected one protocol error, got ${h.errors.length} (replies: ${h.replies.length})`);
  const error = h.errors[0];
  assert.ok(error !== undefined);
  assert.equal(error.code, 'NBD_PROTOCOL');
  assert.equal(error.reason, reason, error.message);
  assert.equal(error.exportName, EXPORT);
  assert.match(error.message, /export "disk0"/);
  if (pattern !== undefined) assert.match(error.message, pattern);
  assert.ok(h.parser.isStopped);
  // Nothing more comes out, however much is pushed.
  const count = h.replies.length;
  h.parser.push(simple(1n, 0));
  assert.equal(h.errors.length, 1);
  assert.equal(h.replies.length, count);
  return error;
}

/** A stream exercising every reply kind, with chunks of different requests interleaved. */
function mixedStream(): { requests: Array<[bigint, NbdRequestInfo]>; stream: Buffer } {
  const requests: Array<[bigint, NbdRequestInfo]> = [
    [1n, read(4096, 8192)],
    [2n, write(0, 512)],
    [3n, status(0, 65536)],
    [4n, read(0, 1024)],
    [5n, { command: NBD_CMD_FLUSH, flags: 0, offset: 0, length: 0 }],
    [0xfedcba9876543210n, read(1000, 24)],
  ];
  const stream = Buffer.concat([
    dataChunk(1n, 8192, pattern(4096, 1)),
    statusChunk(3n, 2, [
      [4096, 3],
      [61440, 0],
    ]),
    simple(2n, 0),
    holeChunk(1n, 4096, 4096),
    dataChunk(4n, 0, pattern(512, 4)),
    statusChunk(3n, 1, [[131072, 1]], true),
    noneChunk(1n),
    errorChunk(4n, 5, 'disk on fire', true, 600),
    chunk(5n, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(0)),
    dataChunk(0xfedcba9876543210n, 1000, pattern(24, 9), true),
  ]);
  return { requests, stream };
}

function reference(): NbdReply[] {
  const { requests, stream } = mixedStream();
  const h = harness({}, requests);
  h.parser.push(stream);
  assert.deepEqual(h.errors, []);
  return h.replies;
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('NbdReplyParser: framing', () => {
  it('emits every reply kind with its request', () => {
    const replies = reference();
    assert.deepEqual(
      replies.map((r) => [r.cookie, r.final, r.chunk.type]),
      [
        [1n, false, 'data'],
        [3n, false, 'block-status'],
        [2n, true, 'none'],
        [1n, false, 'hole'],
        [4n, false, 'data'],
        [3n, true, 'block-status'],
        [1n, true, 'none'],
        [4n, true, 'error'],
        [5n, true, 'none'],
        [0xfedcba9876543210n, true, 'data'],
      ],
    );
    const error = replies[7]?.chunk;
    assert.deepEqual(error, { type: 'error', replyType: NBD_REPLY_TYPE_ERROR_OFFSET, error: 5, message: 'disk on fire', offset: 600 });
    assert.deepEqual(replies[0]?.chunk, { type: 'data', offset: 8192, data: pattern(4096, 1) });
    assert.deepEqual(replies[1]?.chunk, { type: 'block-status', contextId: 2, descriptors: [{ length: 4096, flags: 3 }, { length: 61440, flags: 0 }] });
    assert.deepEqual(replies[0]?.request, read(4096, 8192));
  });

  it('gives the same replies when the stream is split at any byte', () => {
    const expected = reference();
    const { requests, stream } = mixedStream();
    for (let i = 0; i <= stream.length; i++) {
      const h = harness({}, requests);
      h.parser.push(stream.subarray(0, i));
      h.parser.push(stream.subarray(i));
      assert.deepEqual(h.errors, [], `split at ${i}`);
      assert.deepEqual(h.replies, expected, `split at ${i}`);
      assert.equal(h.parser.inFlightCount, 0);
      assert.equal(h.parser.bufferedBytes, 0);
    }
  });

  it('gives the same replies fed one byte at a time', () => {
    const expected = reference();
    const { requests, stream } = mixedStream();
    const h = harness({}, requests);
    for (let i = 0; i < stream.length; i++) h.parser.push(stream.subarray(i, i + 1));
    assert.deepEqual(h.replies, expected);
  });

  it('gives the same replies for random splits (seeded)', () => {
    const seed = Number(process.env['NBD_PARSER_SEED'] ?? Date.now() % 1_000_000);
    const random = mulberry32(seed);
    const expected = reference();
    const { requests, stream } = mixedStream();
    try {
      for (let round = 0; round < 300; round++) {
        const h = harness({}, requests);
        let pos = 0;
        while (pos < stream.length) {
          const n = Math.floor(random() * 64);
          h.parser.push(stream.subarray(pos, pos + n));
          pos += n;
        }
        assert.deepEqual(h.replies, expected);
      }
    } catch (err) {
      console.error(`nbd-parser random split failed; replay with NBD_PARSER_SEED=${seed}`);
      throw err;
    }
  });

  it('delivers simple read data at every split when structured replies are off', () => {
    const data = pattern(300, 7);
    const stream = Buffer.concat([simple(9n, 0, data), simple(10n, 22), simple(11n, 0, data.subarray(0, 10))]);
    for (let i = 0; i <= stream.length; i++) {
      const h = harness({ structuredReplies: false, contextIds: [] }, [
        [9n, read(512, 300)],
        [10n, read(0, 4096)],
        [11n, read(0, 10)],
      ]);
      h.parser.push(stream.subarray(0, i));
      h.parser.push(stream.subarray(i));
      assert.deepEqual(h.errors, []);
      assert.deepEqual(
        h.replies.map((r) => r.chunk),
        [
          { type: 'data', offset: 512, data },
          { type: 'error', replyType: undefined, error: 22, message: '', offset: undefined },
          { type: 'data', offset: 0, data: data.subarray(0, 10) },
        ],
      );
    }
  });

  it('accepts a last block status extent that ends past the request but inside the export', () => {
    const h = harness({ contextIds: [1] }, [[1n, status(4096, 4096)]]);
    h.parser.push(statusChunk(1n, 1, [[65536, 0]], true));
    assert.deepEqual(h.errors, []);
    assert.equal(h.replies.length, 1);
  });

  it('treats unknown error chunk types as errors of the request', () => {
    const h = harness({}, [[1n, write(0, 512)]]);
    h.parser.push(chunk(1n, NBD_REPLY_FLAG_DONE, 0x8077, Buffer.concat([u32(95), Buffer.from([0, 0]), Buffer.from('extra')])));
    assert.deepEqual(h.errors, []);
    assert.equal(h.replies[0]?.chunk.type, 'error');
  });

  it('accepts an error in place of a short read and forgets the cookie after DONE', () => {
    const h = harness({}, [[1n, read(0, 4096)]]);
    h.parser.push(Buffer.concat([dataChunk(1n, 0, pattern(512, 1)), errorChunk(1n, 5, 'bad sector', true)]));
    assert.deepEqual(h.errors, []);
    assert.equal(h.parser.inFlightCount, 0);
    expectViolation(h, noneChunk(1n), 'unknown-cookie');
  });
});

describe('NbdReplyParser: hostile replies', () => {
  it('refuses unknown magic', () => {
    expectViolation(harness({}, [[1n, read(0, 512)]]), Buffer.from('HTTP/1.1 200 OK\r\n'), 'bad-magic', /0x48545450/);
    expectViolation(harness({}, [[1n, read(0, 512)]]), u32(0x6e8a278c, 0, 0, 0), 'bad-magic', /extended headers/);
  });

  it('refuses replies for cookies not in flight', () => {
    expectViolation(harness({}, [[1n, read(0, 512)]]), simple(2n, 0), 'unknown-cookie', /cookie 2/);
    expectViolation(harness({}, [[1n, read(0, 512)]]), dataChunk(7n, 0, pattern(512, 0), true), 'unknown-cookie');
    expectViolation(harness(), noneChunk(1n), 'unknown-cookie');
  });

  it('refuses structured replies that were not negotiated', () => {
    expectViolation(harness({ structuredReplies: false, contextIds: [] }, [[1n, write(0, 1)]]), noneChunk(1n), 'unexpected-reply', /not negotiated/);
  });

  it('refuses an oversized chunk from its header alone', () => {
    const h = harness({}, [[1n, read(0, 32 * MiB)]]);
    const header = chunk(1n, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.alloc(0), 64 * MiB + 9);
    expectViolation(h, header, 'bad-length', /67108873/);
    // Even an error chunk may not be huge.
    const e = harness({}, [[1n, write(0, 1)]]);
    expectViolation(e, chunk(1n, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, Buffer.alloc(0), 1 * MiB), 'bad-length');
  });

  it('refuses a data chunk longer than its read before buffering it', () => {
    const h = harness({}, [[1n, read(0, 4096)]]);
    expectViolation(h, chunk(1n, 0, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.alloc(0), 8 + 8192), 'out-of-range', /8192 bytes for a read of 4096/);
  });

  it('refuses content outside the requested range', () => {
    expectViolation(harness({}, [[1n, read(4096, 4096)]]), dataChunk(1n, 0, pattern(512, 0)), 'out-of-range', /outside the read \[4096, 8192\)/);
    expectViolation(harness({}, [[1n, read(4096, 4096)]]), dataChunk(1n, 8000, pattern(512, 0)), 'out-of-range');
    expectViolation(harness({}, [[1n, read(4096, 4096)]]), holeChunk(1n, 8192, 1), 'out-of-range');
    expectViolation(harness({}, [[1n, read(4096, 4096)]]), holeChunk(1n, 4095, 2), 'out-of-range');
  });

  it('refuses overlapping content chunks', () => {
    const h = harness({}, [[1n, read(0, 4096)]]);
    expectViolation(h, Buffer.concat([holeChunk(1n, 1024, 1024), dataChunk(1n, 2047, pattern(10, 0))]), 'overlap');
    const g = harness({}, [[1n, read(0, 4096)]]);
    expectViolation(g, Buffer.concat([dataChunk(1n, 2048, pattern(1024, 0)), holeChunk(1n, 0, 2049)]), 'overlap');
  });

  it('refuses a successful read that left bytes undescribed', () => {
    const h = harness({}, [[1n, read(0, 4096)]]);
    expectViolation(h, Buffer.concat([dataChunk(1n, 0, pattern(1024, 0)), holeChunk(1n, 2048, 2048), noneChunk(1n)]), 'incomplete-reply', /3072 bytes/);
  });

  it('refuses chunk types that do not belong to the command', () => {
    expectViolation(harness({}, [[1n, write(0, 512)]]), dataChunk(1n, 0, pattern(512, 0), true), 'unexpected-reply', /NBD_CMD_WRITE/);
    expectViolation(harness({}, [[1n, read(0, 512)]]), statusChunk(1n, 1, [[512, 0]], true), 'unexpected-reply');
    expectViolation(harness({}, [[1n, status(0, 512)]]), holeChunk(1n, 0, 512, true), 'unexpected-reply');
    expectViolation(harness({}, [[1n, read(0, 512)]]), chunk(1n, NBD_REPLY_FLAG_DONE, 3, Buffer.alloc(4)), 'unexpected-reply', /unknown reply chunk type 3/);
  });

  it('refuses malformed NBD_REPLY_TYPE_NONE and hole chunks', () => {
    expectViolation(harness({}, [[1n, write(0, 1)]]), chunk(1n, 0, NBD_REPLY_TYPE_NONE, Buffer.alloc(0)), 'invalid-field', /without NBD_REPLY_FLAG_DONE/);
    expectViolation(harness({}, [[1n, write(0, 1)]]), chunk(1n, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, Buffer.alloc(4)), 'bad-length');
    expectViolation(harness({}, [[1n, read(0, 512)]]), chunk(1n, 0, NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.alloc(16)), 'bad-length');
    expectViolation(harness({}, [[1n, read(0, 512)]]), holeChunk(1n, 0, 0), 'invalid-field', /hole size 0/);
  });

  it('refuses simple replies where the spec demands structured ones', () => {
    expectViolation(harness({}, [[1n, read(0, 512)]]), simple(1n, 0), 'unexpected-reply', /NBD_CMD_READ/);
    expectViolation(harness({}, [[1n, read(0, 512)]]), simple(1n, 22), 'unexpected-reply');
    expectViolation(harness({}, [[1n, status(0, 512)]]), simple(1n, 0), 'unexpected-reply', /BLOCK_STATUS/);
  });

  it('refuses block status for contexts not negotiated, or twice for one', () => {
    expectViolation(harness({}, [[1n, status(0, 4096)]]), statusChunk(1n, 3, [[4096, 0]]), 'bad-context', /context id 3/);
    expectViolation(
      harness({}, [[1n, status(0, 4096)]]),
      Buffer.concat([statusChunk(1n, 1, [[4096, 0]]), statusChunk(1n, 1, [[4096, 0]])]),
      'bad-context',
      /second/,
    );
    expectViolation(harness({}, [[1n, status(0, 4096)]]), statusChunk(1n, 1, [[4096, 0]], true), 'incomplete-reply', /1 of the 2/);
  });

  it('refuses block status descriptors beyond the request or the export', () => {
    expectViolation(
      harness({}, [[1n, status(0, 4096)]]),
      statusChunk(1n, 1, [
        [4096, 0],
        [512, 1],
      ]),
      'out-of-range',
      /descriptor 1 starts at 4096/,
    );
    expectViolation(harness({}, [[1n, status(MiB - 4096, 4096)]]), statusChunk(1n, 1, [[8192, 0]]), 'out-of-range', /past the end of the export/);
    expectViolation(harness({}, [[1n, status(0, 4096)]]), statusChunk(1n, 1, [[0, 0]]), 'invalid-field', /length 0/);
    expectViolation(
      harness({}, [[1n, status(0, 4096, NBD_CMD_FLAG_REQ_ONE)]]),
      statusChunk(1n, 1, [
        [512, 0],
        [512, 1],
      ]),
      'invalid-field',
      /REQ_ONE/,
    );
    expectViolation(harness({}, [[1n, status(0, 4096, NBD_CMD_FLAG_REQ_ONE)]]), statusChunk(1n, 1, [[8192, 0]]), 'out-of-range', /REQ_ONE/);
    expectViolation(harness({ maxDescriptors: 2 }, [[1n, status(0, 4096)]]), statusChunk(1n, 1, [[1, 0], [1, 1], [1, 0]]), 'bad-length', /3 descriptors/);
    expectViolation(harness({}, [[1n, status(0, 4096)]]), chunk(1n, 0, NBD_REPLY_TYPE_BLOCK_STATUS, u32(1, 512, 0, 7)), 'bad-length');
  });

  it('refuses error chunks with bad fields', () => {
    expectViolation(harness({}, [[1n, read(4096, 512)]]), errorChunk(1n, 5, '', true, 0), 'out-of-range', /error offset 0/);
    expectViolation(harness({}, [[1n, read(0, 512)]]), errorChunk(1n, 0, 'ok?'), 'invalid-field', /error value 0/);
    const lying = chunk(1n, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, Buffer.concat([u32(5), Buffer.from([0, 200]), Buffer.from('short')]));
    expectViolation(harness({}, [[1n, read(0, 512)]]), lying, 'bad-length');
  });

  it('refuses a second final reply for the same cookie', () => {
    const h = harness({}, [[1n, write(0, 1)]]);
    expectViolation(h, Buffer.concat([simple(1n, 0), simple(1n, 0)]), 'unknown-cookie');
    assert.equal(h.replies.length, 1);
  });

  it('reports only the first violation, even mid-push', () => {
    const h = harness({}, [[1n, read(0, 512)]]);
    expectViolation(h, Buffer.concat([dataChunk(1n, 0, pattern(512, 0), true), simple(1n, 0), Buffer.from('garbage')]), 'unknown-cookie');
    assert.equal(h.replies.length, 1);
  });
});

describe('ByteQueue', () => {
  it('takes exact pieces across chunk boundaries, as views when possible', () => {
    const q = new ByteQueue();
    const a = Buffer.from([1, 2, 3]);
    q.push(a);
    q.push(Buffer.alloc(0));
    q.push(Buffer.from([4]));
    q.push(Buffer.from([5, 6, 7, 8, 9]));
    assert.equal(q.length, 9);
    assert.equal(q.peekUInt32BE(), 0x01020304);
    assert.equal(q.take(10), undefined);
    const view = q.take(2);
    assert.deepEqual(view, Buffer.from([1, 2]));
    assert.equal(view?.buffer, a.buffer);
    assert.equal(q.peekUInt32BE(), 0x03040506);
    assert.deepEqual(q.take(5), Buffer.from([3, 4, 5, 6, 7]));
    assert.equal(q.peekUInt32BE(), undefined);
    assert.deepEqual(q.takeAll(), Buffer.from([8, 9]));
    assert.equal(q.length, 0);
    assert.deepEqual(q.take(0), Buffer.alloc(0));
  });
});
