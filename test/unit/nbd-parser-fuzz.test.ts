// Seeded randomized tests of the NBD reply parser (src/nbd/parser.ts):
// random conversations (reads answered by data and hole chunks in any order,
// block status per context, errors, simple replies) parse the same however
// the stream is split, and random or mutated bytes only ever produce replies
// for requests in flight or one NbdProtocolError naming the export.
//
// Deterministic by default; explore or replay another seed with
// NBD_PARSER_FUZZ_SEED=<seed> node --test dist/test/unit/nbd-parser-fuzz.test.js

import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';
import {
  NBD_CMD_BLOCK_STATUS,
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
  type NbdReply,
  type NbdRequestInfo,
} from '../../src/nbd/index.js';
import { randomSplit, withSeed, type Random } from './seeded.js';

const SEED_VAR = 'NBD_PARSER_FUZZ_SEED';
const FILE = 'nbd-parser-fuzz.test.js';
const EXPORT = 'fuzz0';
const EXPORT_SIZE = 1024 * 1024;
const CONTEXT_IDS = [1, 2];

// ---- Server-side encoders (independent of src/nbd/codec.ts) ----------------------

function simple(cookie: bigint, error: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(0x67446698, 0);
  h.writeUInt32BE(error, 4);
  h.writeBigUInt64BE(cookie, 8);
  return Buffer.concat([h, data]);
}

function chunk(cookie: bigint, final: boolean, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(0x668e33ef, 0);
  h.writeUInt16BE(final ? NBD_REPLY_FLAG_DONE : 0, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
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

function errorPayload(error: number, message: string, offset?: number): Buffer {
  const text = Buffer.from(message);
  const fixed = Buffer.alloc(6);
  fixed.writeUInt32BE(error, 0);
  fixed.writeUInt16BE(text.length, 4);
  return Buffer.concat([fixed, text, offset === undefined ? Buffer.alloc(0) : u64(offset)]);
}

// ---- Random conversations --------------------------------------------------------

interface Conversation {
  structured: boolean;
  requests: Array<[bigint, NbdRequestInfo]>;
  stream: Buffer;
}

/** Cuts [offset, offset + length) into 1 to `most` consecutive pieces. */
function pieces(random: Random, offset: number, length: number, most: number): Array<[number, number]> {
  const cuts = new Set<number>();
  for (let n = random.int(most); n > 0 && length > 1; n--) cuts.add(1 + random.int(length - 1));
  const points = [0, ...[...cuts].sort((a, b) => a - b), length];
  return points.slice(1).map((end, i) => [offset + (points[i] ?? 0), end - (points[i] ?? 0)]);
}

/** Data that tells pieces apart without paying for a random number per byte. */
function fill(random: Random, size: number): Buffer {
  const step = 1 + random.int(250);
  const start = random.int(256);
  const out = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) out[i] = (start + i * step) & 0xff;
  return out;
}

function shuffle<T>(random: Random, items: T[]): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = random.int(i + 1);
    [items[i], items[j]] = [items[j] as T, items[i] as T];
  }
  return items;
}

function structuredRead(random: Random, cookie: bigint, offset: number, length: number): Buffer[] {
  if (random.chance(0.1)) {
    const at = random.chance(0.5) ? offset + random.int(length) : undefined;
    return [chunk(cookie, true, at === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET, errorPayload(5, 'bad sector', at))];
  }
  const parts = shuffle(
    random,
    pieces(random, offset, length, 5).map(([start, size]) =>
      random.chance(0.6)
        ? (final: boolean): Buffer => chunk(cookie, final, NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(start), fill(random, size)]))
        : (final: boolean): Buffer => chunk(cookie, final, NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(start), u32(size)])),
    ),
  );
  const separateNone = random.chance(0.3);
  const out = parts.map((make, i) => make(!separateNone && i === parts.length - 1));
  if (separateNone) out.push(chunk(cookie, true, NBD_REPLY_TYPE_NONE, Buffer.alloc(0)));
  return out;
}

function structuredStatus(random: Random, cookie: bigint, offset: number, length: number): Buffer[] {
  const ids = shuffle(random, [...CONTEXT_IDS]);
  return ids.map((id, i) => {
    const extents = pieces(random, offset, length, 3);
    const last = extents[extents.length - 1];
    // The last extent may run past the request, never past the export.
    if (last !== undefined) last[1] += random.int(EXPORT_SIZE - (last[0] + last[1]) + 1);
    return chunk(cookie, i === ids.length - 1, NBD_REPLY_TYPE_BLOCK_STATUS, u32(id, ...extents.flatMap(([, size]) => [size, random.int(4)])));
  });
}

/** The reply chunks of one request, final last. */
function replyFor(random: Random, structured: boolean, cookie: bigint, request: NbdRequestInfo): Buffer[] {
  const { command, offset, length } = request;
  if (!structured) {
    if (random.chance(0.1)) return [simple(cookie, 5)];
    return [simple(cookie, 0, command === NBD_CMD_READ ? fill(random, length) : Buffer.alloc(0))];
  }
  if (command === NBD_CMD_READ) return structuredRead(random, cookie, offset, length);
  if (command === NBD_CMD_BLOCK_STATUS) return structuredStatus(random, cookie, offset, length);
  if (random.chance(0.3)) return [chunk(cookie, true, NBD_REPLY_TYPE_NONE, Buffer.alloc(0))];
  return [simple(cookie, random.chance(0.1) ? 28 : 0)];
}

function randomRequest(random: Random, structured: boolean): NbdRequestInfo {
  const offset = random.int(EXPORT_SIZE - 4096);
  const length = 1 + random.int(random.chance(0.5) ? 64 : 4096);
  const command = random.pick(structured ? [NBD_CMD_READ, NBD_CMD_READ, NBD_CMD_BLOCK_STATUS, NBD_CMD_WRITE, NBD_CMD_FLUSH] : [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH]);
  return command === NBD_CMD_FLUSH ? { command, flags: 0, offset: 0, length: 0 } : { command, flags: 0, offset, length };
}

/** Requests with fresh random cookies, and their replies interleaved at random (each request's own chunks stay in order). */
function randomConversation(random: Random): Conversation {
  const structured = random.chance(0.8);
  const requests: Array<[bigint, NbdRequestInfo]> = [];
  const queues: Buffer[][] = [];
  const cookies = new Set<bigint>();
  for (let n = 1 + random.int(6); n > 0; n--) {
    const cookie = (BigInt(random.int(2 ** 32)) << 32n) | BigInt(random.int(2 ** 32));
    if (cookies.has(cookie)) continue;
    cookies.add(cookie);
    const request = randomRequest(random, structured);
    requests.push([cookie, request]);
    queues.push(replyFor(random, structured, cookie, request));
  }
  const stream: Buffer[] = [];
  while (queues.some((q) => q.length > 0)) {
    const open = queues.filter((q) => q.length > 0);
    const next = random.pick(open).shift();
    if (next !== undefined) stream.push(next);
  }
  return { structured, requests, stream: Buffer.concat(stream) };
}

// ---- Harness -----------------------------------------------------------------------

interface Run {
  parser: NbdReplyParser;
  replies: NbdReply[];
  errors: unknown[];
}

/**
 * Pushes each piece as the socket's reused read buffer would deliver it:
 * copied into one scratch buffer, pushed as transient, then overwritten.
 */
function runTransient(conversation: Conversation, pushes: Buffer[]): Run {
  const scratch = Buffer.alloc(Math.max(1, ...pushes.map((p) => p.length)));
  const transient = pushes.map((p) => {
    p.copy(scratch);
    return scratch.subarray(0, p.length);
  });
  return run(conversation, transient, (parser, piece) => {
    parser.push(piece, true);
    scratch.fill(0xa5);
  }, pushes);
}

function run(conversation: Conversation, pushes: Buffer[], push?: (parser: NbdReplyParser, piece: Buffer) => void, sources?: Buffer[]): Run {
  const replies: NbdReply[] = [];
  const errors: unknown[] = [];
  const parser = new NbdReplyParser({
    exportName: EXPORT,
    exportSize: EXPORT_SIZE,
    structuredReplies: conversation.structured,
    contextIds: conversation.structured ? CONTEXT_IDS : [],
    onReply: (r) => replies.push(r),
    onError: (e) => errors.push(e),
  });
  for (const [cookie, request] of conversation.requests) parser.expect(cookie, request);
  pushes.forEach((piece, i) => {
    if (push === undefined) parser.push(piece);
    else {
      sources?.[i]?.copy(piece);
      push(parser, piece);
    }
  });
  return { parser, replies, errors };
}

/** A few random edits: overwritten, inserted, deleted or repeated bytes, or a cut. */
function mutate(random: Random, bytes: Buffer): Buffer {
  let out = Buffer.from(bytes);
  for (let n = 1 + random.int(3); n > 0; n--) {
    const at = random.int(out.length + 1);
    switch (random.int(5)) {
      case 0:
        if (out.length > 0) out[Math.min(at, out.length - 1)] = random.int(256);
        break;
      case 1:
        out = Buffer.concat([out.subarray(0, at), random.bytes(1 + random.int(8)), out.subarray(at)]);
        break;
      case 2:
        out = Buffer.concat([out.subarray(0, at), out.subarray(at + 1 + random.int(24))]);
        break;
      case 3:
        out = Buffer.concat([out.subarray(0, at), out.subarray(at, at + 1 + random.int(40)), out.subarray(at)]);
        break;
      default:
        out = out.subarray(0, at);
    }
  }
  return out;
}

// ---- Tests ---------------------------------------------------------------------------

describe('NbdReplyParser (seeded)', () => {
  it('parses random valid conversations identically however they are split', { timeout: 10_000 }, () => {
    withSeed(SEED_VAR, 31_337, FILE, (random) => {
      for (let round = 0; round < 200; round++) {
        const conversation = randomConversation(random);
        const reference = run(conversation, [conversation.stream]);
        assert.deepEqual(reference.errors, [], `round ${round}: the generator made an invalid conversation`);
        assert.equal(reference.parser.inFlightCount, 0, `round ${round}: every request got its final reply`);
        assert.equal(reference.replies.filter((r) => r.final).length, conversation.requests.length);
        for (let split = 0; split < 3; split++) {
          const pieces = randomSplit(random, conversation.stream, random.pick([2, 7, 64, 1000]));
          const again = run(conversation, pieces);
          assert.deepEqual(again.errors, [], `round ${round}`);
          assert.deepEqual(again.replies, reference.replies, `round ${round}, split ${split}`);
        }
      }
    });
  });

  it('parses random valid and mutated conversations the same when every piece is a reused (transient) buffer', { timeout: 10_000 }, () => {
    withSeed(SEED_VAR, 31_339, FILE, (random) => {
      for (let round = 0; round < 300; round++) {
        const conversation = randomConversation(random);
        const bytes = random.chance(0.5) ? conversation.stream : mutate(random, conversation.stream);
        const pieces = randomSplit(random, bytes, random.pick([2, 7, 64, 1000]));
        const owned = run(conversation, pieces);
        const transient = runTransient(conversation, pieces);
        assert.deepEqual(transient.replies, owned.replies, `round ${round}`);
        assert.deepEqual(transient.errors.map(String), owned.errors.map(String), `round ${round}`);
      }
    });
  });

  it('answers random and mutated bytes only with replies in flight or one NbdProtocolError', { timeout: 10_000 }, () => {
    withSeed(SEED_VAR, 31_338, FILE, (random) => {
      let violations = 0;
      for (let round = 0; round < 600; round++) {
        const conversation = randomConversation(random);
        const bytes = random.chance(0.15) ? random.bytes(random.int(200)) : mutate(random, conversation.stream);
        const result = run(conversation, randomSplit(random, bytes, random.pick([3, 50, 500])));
        assert.ok(result.errors.length <= 1, `round ${round}: ${result.errors.length} errors`);
        const error = result.errors[0];
        if (error !== undefined) {
          violations++;
          assert.ok(error instanceof NbdProtocolError, `round ${round}: ${String(error)}`);
          assert.equal(error.code, 'NBD_PROTOCOL');
          assert.equal(error.exportName, EXPORT);
          assert.ok(result.parser.isStopped);
        }
        const cookies = new Set(conversation.requests.map(([cookie]) => cookie));
        const finals = new Set<bigint>();
        for (const reply of result.replies) {
          assert.ok(cookies.has(reply.cookie), `round ${round}: reply for cookie ${reply.cookie}, never asked`);
          assert.ok(!finals.has(reply.cookie), `round ${round}: reply after the final one`);
          if (reply.final) finals.add(reply.cookie);
        }
      }
      assert.ok(violations > 50, `only ${violations} mutations were caught; the mutator is too gentle`);
    });
  });
});
