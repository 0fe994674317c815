import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  QmpLineParser,
  QmpProtocolError,
  classifyMessage,
  encodeCommand,
  type QmpProtocolErrorReason,
} from '../../src/qmp/index.js';
import { QbackupError } from '../../src/errors.js';

interface Collected {
  parser: QmpLineParser;
  messages: Record<string, unknown>[];
  errors: QmpProtocolError[];
}

function collect(maxLineBytes?: number): Collected {
  const messages: Record<string, unknown>[] = [];
  const errors: QmpProtocolError[] = [];
  const callbacks = { onMessage: (m: Record<string, unknown>) => messages.push(m), onError: (e: QmpProtocolError) => errors.push(e) };
  const parser = new QmpLineParser(maxLineBytes === undefined ? callbacks : { ...callbacks, maxLineBytes });
  return { parser, messages, errors };
}

const GREETING = { QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'Debian' }, capabilities: ['oob'] } };
const STREAM_OBJECTS: Record<string, unknown>[] = [
  GREETING,
  { return: {}, id: 1 },
  { event: 'STOP', timestamp: { seconds: 1, microseconds: 2 } },
  { return: { text: 'ünïcødé ✓ \n inside a string' }, id: 2 },
  { error: { class: 'GenericError', desc: 'nope' }, id: 3 },
];
const STREAM = Buffer.from(STREAM_OBJECTS.map((o) => `${JSON.stringify(o)}\n`).join(''), 'utf8');

test('a stream split into two chunks at every byte boundary parses identically', () => {
  for (let cut = 0; cut <= STREAM.length; cut++) {
    const { parser, messages, errors } = collect();
    parser.push(STREAM.subarray(0, cut));
    parser.push(STREAM.subarray(cut));
    assert.deepEqual(errors, [], `cut at ${cut}`);
    assert.deepEqual(messages, STREAM_OBJECTS, `cut at ${cut}`);
    assert.equal(parser.bufferedBytes, 0);
  }
});

test('a stream fed one byte at a time parses identically, including split UTF-8 sequences', () => {
  const { parser, messages, errors } = collect();
  for (let i = 0; i < STREAM.length; i++) parser.push(STREAM.subarray(i, i + 1));
  assert.deepEqual(errors, []);
  assert.deepEqual(messages, STREAM_OBJECTS);
});

test('the parser copies retained bytes, so the caller may reuse its buffer', () => {
  const { parser, messages } = collect();
  const chunk = Buffer.from('{"return": 1');
  parser.push(chunk);
  chunk.fill(0x20);
  parser.push(Buffer.from(', "id": 1}\n'));
  assert.deepEqual(messages, [{ return: 1, id: 1 }]);
});

test('several messages in one chunk are emitted in order', () => {
  const { parser, messages } = collect();
  parser.push(STREAM);
  assert.deepEqual(messages, STREAM_OBJECTS);
});

test('CRLF line endings are accepted and blank lines skipped', () => {
  const { parser, messages, errors } = collect();
  parser.push(Buffer.from('{"return": {}, "id": 1}\r\n\r\n\n{"return"'));
  parser.push(Buffer.from(': 2, "id": 2}\r'));
  parser.push(Buffer.from('\n'));
  assert.deepEqual(errors, []);
  assert.deepEqual(messages, [
    { return: {}, id: 1 },
    { return: 2, id: 2 },
  ]);
});

test('a line of exactly maxLineBytes is accepted, with or without CR', () => {
  const line = '{"return":"' + 'x'.repeat(20) + '"}';
  const { parser, messages, errors } = collect(line.length);
  parser.push(Buffer.from(`${line}\n${line}\r\n`));
  assert.deepEqual(errors, []);
  assert.equal(messages.length, 2);
});

test('an oversized line is reported once as line-too-long before its end arrives, then parsing resumes', () => {
  const { parser, messages, errors } = collect(64);
  parser.push(Buffer.from('{"return": "' + 'a'.repeat(40)));
  assert.equal(errors.length, 0);
  parser.push(Buffer.from('b'.repeat(40)));
  assert.equal(errors.length, 1, 'reported without waiting for the newline');
  assert.equal(parser.bufferedBytes, 0, 'the oversized line is not kept');
  parser.push(Buffer.from('c'.repeat(100_000)));
  parser.push(Buffer.from('"}\n{"return": 1, "id": 1}\n'));
  assert.equal(errors.length, 1);
  const [error] = errors;
  assert.ok(error instanceof QmpProtocolError);
  assert.ok(error instanceof QbackupError);
  assert.equal(error.code, 'QMP_PROTOCOL');
  assert.equal(error.reason, 'line-too-long');
  assert.deepEqual(messages, [{ return: 1, id: 1 }]);
});

test('an oversized line arriving whole in one chunk is reported', () => {
  const { parser, messages, errors } = collect(24);
  parser.push(Buffer.from(`{"return": "${'z'.repeat(30)}"}\n{"return": 2, "id": 2}\n`));
  assert.deepEqual(
    errors.map((e) => e.reason),
    ['line-too-long'],
  );
  assert.deepEqual(messages, [{ return: 2, id: 2 }]);
});

test('malformed JSON and invalid UTF-8 are reported as malformed-json', () => {
  const { parser, messages, errors } = collect();
  parser.push(Buffer.from('{"return": \n'));
  parser.push(Buffer.from('not json at all\n'));
  parser.push(Buffer.concat([Buffer.from('{"return": "'), Buffer.from([0xff, 0xfe]), Buffer.from('"}\n')]));
  parser.push(Buffer.from('{"return": 3, "id": 3}\n'));
  assert.deepEqual(
    errors.map((e) => e.reason),
    ['malformed-json', 'malformed-json', 'malformed-json'],
  );
  assert.deepEqual(messages, [{ return: 3, id: 3 }]);
});

test('absurdly nested JSON is reported, not thrown', () => {
  const { parser, errors } = collect();
  parser.push(Buffer.from(`${'['.repeat(200_000)}${']'.repeat(200_000)}\n`));
  assert.equal(errors.length, 1);
});

test('JSON that is not an object is reported as not-an-object', () => {
  const { parser, messages, errors } = collect();
  for (const line of ['[1,2]', '"text"', '42', 'null', 'true']) parser.push(Buffer.from(`${line}\n`));
  assert.deepEqual(
    errors.map((e) => e.reason),
    Array<QmpProtocolErrorReason>(5).fill('not-an-object'),
  );
  assert.deepEqual(messages, []);
});

test('an invalid maxLineBytes is refused', () => {
  assert.throws(() => collect(0), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => collect(1.5), { code: 'INVALID_ARGUMENT' });
});

test('classifyMessage recognises the four message kinds', () => {
  assert.deepEqual(classifyMessage(GREETING), {
    kind: 'greeting',
    version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian' },
    capabilities: ['oob'],
  });
  assert.deepEqual(classifyMessage({ return: [1], id: 4 }), { kind: 'return', value: [1], id: 4 });
  assert.deepEqual(classifyMessage({ return: {} }), { kind: 'return', value: {} });
  assert.deepEqual(classifyMessage({ error: { class: 'CommandNotFound', desc: 'x' }, id: 'a' }), {
    kind: 'error',
    errorClass: 'CommandNotFound',
    desc: 'x',
    id: 'a',
  });
  assert.deepEqual(classifyMessage({ event: 'RESUME', timestamp: { seconds: 5, microseconds: 6 } }), {
    kind: 'event',
    event: 'RESUME',
    data: {},
    timestamp: { seconds: 5, microseconds: 6 },
  });
  assert.deepEqual(
    classifyMessage({ event: 'JOB_STATUS_CHANGE', data: { id: 'j', status: 'ready' }, timestamp: { seconds: 1, microseconds: 0 } })
      .kind,
    'event',
  );
});

test('classifyMessage rejects hostile shapes as invalid-message', () => {
  const bad: Record<string, unknown>[] = [
    {},
    { hello: 1 },
    { return: {}, event: 'X', timestamp: { seconds: 1, microseconds: 1 } },
    { QMP: 'x' },
    { QMP: { version: { qemu: { major: '7', minor: 2, micro: 0 }, package: '' }, capabilities: [] } },
    { QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: '' }, capabilities: [1] } },
    { QMP: { version: { qemu: { major: 7, minor: 2, micro: -1 }, package: '' }, capabilities: [] } },
    { error: 'bad' },
    { error: { class: 1, desc: 'x' } },
    { error: { class: 'GenericError' } },
    { event: 42, timestamp: { seconds: 1, microseconds: 1 } },
    { event: '', timestamp: { seconds: 1, microseconds: 1 } },
    { event: 'X', data: [1], timestamp: { seconds: 1, microseconds: 1 } },
    { event: 'X' },
    { event: 'X', timestamp: { seconds: 'now', microseconds: 1 } },
  ];
  for (const value of bad) {
    assert.throws(
      () => classifyMessage(value),
      (err: unknown) => err instanceof QmpProtocolError && err.reason === 'invalid-message',
      JSON.stringify(value),
    );
  }
});

test('classifyMessage only looks at own properties', () => {
  const value = JSON.parse('{"__proto__": {"return": 1}}') as Record<string, unknown>;
  assert.throws(() => classifyMessage(value), { code: 'QMP_PROTOCOL' });
});

test('encodeCommand produces one newline-terminated JSON line', () => {
  assert.equal(encodeCommand(1, 'query-version'), '{"execute":"query-version","id":1}\n');
  const line = encodeCommand(7, 'human-monitor-command', { 'command-line': 'info\nversion' });
  assert.equal(line.indexOf('\n'), line.length - 1);
  assert.deepEqual(JSON.parse(line), { execute: 'human-monitor-command', arguments: { 'command-line': 'info\nversion' }, id: 7 });
  assert.throws(() => encodeCommand(1, ''), { code: 'INVALID_ARGUMENT' });
  const cyclic: Record<string, unknown> = {};
  cyclic['self'] = cyclic;
  assert.throws(() => encodeCommand(1, 'x', cyclic), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => encodeCommand(1, 'x', { n: 1n }), { code: 'INVALID_ARGUMENT' });
});
