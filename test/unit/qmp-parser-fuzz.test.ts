// Seeded randomized tests of the QMP wire layer (src/qmp/message.ts):
// valid messages split at random points come out exactly as sent, and
// random or mangled bytes only ever produce objects or QmpProtocolErrors,
// after which the parser resynchronises at the next newline.
//
// Deterministic by default; explore or replay another seed with
// QMP_PARSER_SEED=<seed> node --test dist/test/unit/qmp-parser-fuzz.test.js

import { strict as assert } from 'node:assert';
import { test } from 'node:test';
import { QmpLineParser, QmpProtocolError, classifyMessage, isPlainObject, type QmpProtocolErrorReason } from '../../src/qmp/message.js';
import { randomSplit, withSeed, type Random } from './seeded.js';

const SEED_VAR = 'QMP_PARSER_SEED';
const FILE = 'qmp-parser-fuzz.test.js';
const REASONS: ReadonlySet<QmpProtocolErrorReason> = new Set(['line-too-long', 'malformed-json', 'not-an-object', 'invalid-message', 'unexpected-message']);

interface Collected {
  parser: QmpLineParser;
  messages: Array<Record<string, unknown>>;
  errors: unknown[];
}

function collector(maxLineBytes?: number): Collected {
  const messages: Array<Record<string, unknown>> = [];
  const errors: unknown[] = [];
  const options = { onMessage: (m: Record<string, unknown>) => messages.push(m), onError: (e: QmpProtocolError) => errors.push(e) };
  const parser = new QmpLineParser(maxLineBytes === undefined ? options : { ...options, maxLineBytes });
  return { parser, messages, errors };
}

const WORDS = ['block-job', 'drive0', 'ready', 'é', '日本', '🙂', 'a"b', 'back\\slash', 'new\nline', 'tab\t', '\u0000nul', '{', '}', ''];

function randomString(random: Random): string {
  let out = '';
  for (let n = random.int(4); n >= 0; n--) out += random.pick(WORDS);
  return out;
}

function randomValue(random: Random, depth: number): unknown {
  const kind = random.int(depth > 2 ? 4 : 6);
  switch (kind) {
    case 0:
      return random.int(2 ** 31) - 2 ** 30;
    case 1:
      return randomString(random);
    case 2:
      return random.chance(0.5);
    case 3:
      return null;
    case 4:
      return Array.from({ length: random.int(4) }, () => randomValue(random, depth + 1));
    default:
      return randomObject(random, depth + 1);
  }
}

function randomObject(random: Random, depth: number): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (let n = random.int(4); n > 0; n--) out[randomString(random)] = randomValue(random, depth);
  return out;
}

/** One message of each QMP shape, with random content. */
function randomMessage(random: Random): Record<string, unknown> {
  const timestamp = { seconds: random.int(2 ** 31), microseconds: random.int(1_000_000) };
  switch (random.int(4)) {
    case 0:
      return { QMP: { version: { qemu: { major: random.int(10), minor: random.int(3), micro: 0 }, package: randomString(random) }, capabilities: ['oob'] } };
    case 1:
      return { return: randomValue(random, 0), id: random.int(1000) };
    case 2:
      return { error: { class: 'GenericError', desc: randomString(random) }, id: random.int(1000) };
    default:
      return { event: 'JOB_STATUS_CHANGE', data: randomObject(random, 0), timestamp };
  }
}

/** Classifies what the parser produced: a QmpMessage or a QmpProtocolError, nothing else. */
function checkClassifies(message: Record<string, unknown>): void {
  try {
    classifyMessage(message);
  } catch (err) {
    assert.ok(err instanceof QmpProtocolError, `classifyMessage threw ${String(err)}`);
  }
}

test('valid messages split at random points come out exactly as sent', { timeout: 10_000 }, () => {
  withSeed(SEED_VAR, 7_042_001, FILE, (random) => {
    for (let round = 0; round < 300; round++) {
      const sent = Array.from({ length: 1 + random.int(8) }, () => randomMessage(random));
      // CRLF endings and blank lines are allowed on the wire and carry nothing.
      const stream = Buffer.from(
        sent.map((m) => `${random.chance(0.2) ? '\n' : ''}${JSON.stringify(m)}${random.chance(0.3) ? '\r\n' : '\n'}`).join(''),
        'utf8',
      );
      const c = collector();
      for (const piece of randomSplit(random, stream, random.pick([1, 3, 17, 200]))) c.parser.push(piece);
      assert.deepEqual(c.errors, [], `round ${round}`);
      assert.deepEqual(c.messages, sent, `round ${round}`);
      assert.equal(c.parser.bufferedBytes, 0);
      for (const m of c.messages) assert.doesNotThrow(() => classifyMessage(m));
    }
  });
});

test('random and mangled bytes yield only objects or typed errors, and the parser resynchronises', { timeout: 10_000 }, () => {
  withSeed(SEED_VAR, 7_042_002, FILE, (random) => {
    const alphabet = Buffer.from('{}[]":,\n\r \\0123456789-.eEtrufalsnQMPreturn', 'latin1');
    for (let round = 0; round < 600; round++) {
      const maxLineBytes = random.pick([32, 64, 4096]);
      const c = collector(maxLineBytes);
      let garbage: Buffer;
      if (random.chance(0.4)) {
        garbage = random.bytes(random.int(300));
      } else if (random.chance(0.5)) {
        garbage = Buffer.from(Array.from({ length: random.int(300) }, () => random.pick([...alphabet])));
      } else {
        // A valid stream with a few bytes overwritten, inserted or cut.
        const valid = Buffer.from(`${JSON.stringify(randomMessage(random))}\n${JSON.stringify(randomMessage(random))}\n`);
        for (let m = 1 + random.int(4); m > 0; m--) valid[random.int(valid.length)] = random.int(256);
        garbage = valid.subarray(0, random.int(valid.length + 1));
      }
      for (const piece of randomSplit(random, garbage, 40)) c.parser.push(piece);
      for (const error of c.errors) {
        assert.ok(error instanceof QmpProtocolError, `round ${round}: ${String(error)}`);
        assert.equal(error.code, 'QMP_PROTOCOL');
        assert.ok(REASONS.has(error.reason));
      }
      for (const message of c.messages) {
        assert.ok(isPlainObject(message));
        checkClassifies(message);
      }
      assert.ok(c.parser.bufferedBytes <= maxLineBytes + 1, 'a line is never held beyond its limit');

      // After a newline the next line is read on its own, whatever came before
      // (the newline may also complete a valid line the garbage ended with).
      const count = c.messages.length;
      c.parser.push(Buffer.from('\n{"return":{},"id":1}\n'));
      assert.ok(c.messages.length - count <= 2);
      assert.deepEqual(c.messages.at(-1), { return: {}, id: 1 }, `round ${round}: no resynchronisation`);
    }
  });
});
