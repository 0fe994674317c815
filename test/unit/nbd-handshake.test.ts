// The NBD handshake state machine (src/nbd/handshake.ts) without a socket:
// server bytes are built here independently of src/nbd/codec.ts and fed in,
// and the bytes the client would send are read back and checked, step by
// step. Good handshakes, refusals and hostile servers each end in a known
// state with a typed error.
//
// The mutation loop is seeded; replay a failure with
// NBD_HANDSHAKE_SEED=<seed> node --test dist/test/unit/nbd-handshake.test.js

import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';
import { isQbackupError, QbackupError } from '../../src/errors.js';
import {
  MAX_OPTION_REPLY_BYTES,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_INFO_BLOCK_SIZE,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NbdHandshake,
  NbdProtocolError,
  type NbdProtocolReason,
} from '../../src/nbd/index.js';
import { randomSplit, withSeed } from './seeded.js';

const EXPORT = 'disk0';
const ADDRESS = 'unix:/test/nbd.sock';
const MiB = 1024 * 1024;

// ---- Server bytes --------------------------------------------------------------

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REP_MAGIC = 0x3e889045565a9n;
const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const ERR_UNSUP = 0x80000001;
const ERR_POLICY = 0x80000002;
const ERR_INVALID = 0x80000003;
const ERR_TLS_REQD = 0x80000005;
const ERR_UNKNOWN = 0x80000006;
const ERR_SHUTDOWN = 0x80000007;

function greeting(flags = 3, second = IHAVEOPT, first = NBDMAGIC): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(first, 0);
  b.writeBigUInt64BE(second, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

function u32(...values: number[]): Buffer {
  const b = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => b.writeUInt32BE(v >>> 0, 4 * i));
  return b;
}

function reply(option: number, type: number, payload: Buffer = Buffer.alloc(0), length = payload.length, magic = REP_MAGIC): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(magic, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(length, 16);
  return Buffer.concat([h, payload]);
}

function infoExport(size: number, flags = NBD_FLAG_HAS_FLAGS): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(0, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return reply(NBD_OPT_GO, REP_INFO, b);
}

function infoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(3, 0);
  return reply(NBD_OPT_GO, REP_INFO, Buffer.concat([b, u32(minimum, preferred, maximum)]));
}

function infoText(type: 1 | 2, text: string): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(type, 0);
  return reply(NBD_OPT_GO, REP_INFO, Buffer.concat([b, Buffer.from(text)]));
}

function metaContext(id: number, name: string): Buffer {
  return reply(NBD_OPT_SET_META_CONTEXT, REP_META_CONTEXT, Buffer.concat([u32(id), Buffer.from(name)]));
}

/** What a well-behaved server sends for a handshake with structured replies, two contexts and GO. */
function goodServer(): Buffer {
  return Buffer.concat([
    greeting(),
    reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK),
    metaContext(1, 'base:allocation'),
    metaContext(5, 'qemu:dirty-bitmap:b0'),
    reply(NBD_OPT_SET_META_CONTEXT, REP_ACK),
    infoExport(4 * MiB),
    infoBlockSize(512, 4096, 32 * MiB),
    infoText(1, 'canonical'),
    infoText(2, 'a disk'),
    reply(NBD_OPT_GO, REP_ACK),
  ]);
}

// ---- Client bytes ----------------------------------------------------------------

interface SentOption {
  option: number;
  data: Buffer;
}

/** Decodes what the client sent: 4 bytes of client flags (when `withFlags`), then options. */
function sentOptions(bytes: Buffer, withFlags: boolean): { clientFlags: number | undefined; options: SentOption[] } {
  let pos = 0;
  let clientFlags: number | undefined;
  if (withFlags) {
    clientFlags = bytes.readUInt32BE(0);
    pos = 4;
  }
  const options: SentOption[] = [];
  while (pos < bytes.length) {
    assert.equal(bytes.readBigUInt64BE(pos), IHAVEOPT, 'every option starts with IHAVEOPT');
    const option = bytes.readUInt32BE(pos + 8);
    const length = bytes.readUInt32BE(pos + 12);
    options.push({ option, data: bytes.subarray(pos + 16, pos + 16 + length) });
    pos += 16 + length;
  }
  assert.equal(pos, bytes.length, 'no partial option');
  return { clientFlags, options };
}

function handshake(metaContexts: string[] = ['base:allocation', 'qemu:dirty-bitmap:b0']): NbdHandshake {
  return new NbdHandshake({ exportName: EXPORT, metaContexts, address: ADDRESS });
}

/** Feeds all of `bytes` and returns everything the client sent in response. */
function feed(h: NbdHandshake, ...parts: Buffer[]): Buffer {
  const out: Buffer[] = [];
  for (const part of parts) {
    h.push(part);
    out.push(h.takeOutput());
  }
  return Buffer.concat(out);
}

function expectFailure(h: NbdHandshake, code: string, pattern: RegExp, reason?: NbdProtocolReason): QbackupError {
  assert.equal(h.status, 'failed', `status is ${h.status}, step ${h.step.name}`);
  const error = h.error;
  assert.ok(error instanceof QbackupError);
  assert.equal(error.code, code, error.message);
  assert.match(error.message, pattern);
  if (reason !== undefined) {
    assert.ok(error instanceof NbdProtocolError);
    assert.equal(error.reason, reason);
    assert.equal(error.exportName, EXPORT);
    assert.match(error.message, /export "disk0"/);
  }
  // A failed handshake ignores whatever comes next and sends nothing more.
  h.push(goodServer());
  assert.equal(h.takeOutput().length, 0);
  assert.equal(h.status, 'failed');
  return error;
}

/** Runs a handshake up to the point where NBD_OPT_GO was sent (structured replies on, no contexts). */
function atGo(): NbdHandshake {
  const h = handshake([]);
  feed(h, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK));
  assert.deepEqual(h.step, { name: 'option-reply-header', option: NBD_OPT_GO });
  return h;
}

// ---- Tests -----------------------------------------------------------------------

describe('NbdHandshake: good servers', () => {
  it('walks every step and sends each option once the previous reply is complete', () => {
    const h = handshake();
    assert.deepEqual(h.step, { name: 'greeting' });
    assert.equal(feed(h, greeting().subarray(0, 16)).length, 0);
    assert.deepEqual(h.step, { name: 'handshake-flags' });

    const afterFlags = sentOptions(feed(h, greeting().subarray(16)), true);
    assert.equal(afterFlags.clientFlags, 3, 'fixed newstyle and no zeroes, as the server offered both');
    assert.deepEqual(afterFlags.options, [{ option: NBD_OPT_STRUCTURED_REPLY, data: Buffer.alloc(0) }]);
    assert.equal(h.optionsStarted, true);

    const afterStructured = sentOptions(feed(h, reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK)), false).options;
    assert.equal(afterStructured.length, 1);
    assert.equal(afterStructured[0]?.option, NBD_OPT_SET_META_CONTEXT);
    const queries = afterStructured[0]?.data.toString('latin1') ?? '';
    assert.ok(queries.includes('base:allocation') && queries.includes('qemu:dirty-bitmap:b0'));

    assert.equal(feed(h, metaContext(1, 'base:allocation'), metaContext(5, 'qemu:dirty-bitmap:b0')).length, 0);
    const afterContexts = sentOptions(feed(h, reply(NBD_OPT_SET_META_CONTEXT, REP_ACK)), false).options;
    assert.equal(afterContexts[0]?.option, NBD_OPT_GO);
    const go = afterContexts[0]?.data ?? Buffer.alloc(0);
    assert.equal(go.readUInt32BE(0), EXPORT.length);
    assert.equal(go.toString('utf8', 4, 4 + EXPORT.length), EXPORT);
    assert.deepEqual([go.readUInt16BE(4 + EXPORT.length), go.readUInt16BE(6 + EXPORT.length)], [1, NBD_INFO_BLOCK_SIZE]);

    feed(h, infoExport(4 * MiB, NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY), infoBlockSize(512, 4096, 32 * MiB), infoText(1, 'canonical'));
    assert.equal(h.status, 'running');
    assert.equal(feed(h, infoText(2, 'a disk'), reply(NBD_OPT_GO, REP_ACK)).length, 0);
    assert.equal(h.status, 'done');
    assert.deepEqual(h.result, {
      exportName: EXPORT,
      size: 4 * MiB,
      transmissionFlags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY,
      blockSizes: { minimum: 512, preferred: 4096, maximum: 32 * MiB },
      blockSizesAdvertised: true,
      structuredReplies: true,
      tls: false,
      contexts: new Map([
        ['base:allocation', 1],
        ['qemu:dirty-bitmap:b0', 5],
      ]),
      canonicalName: 'canonical',
      description: 'a disk',
    });
  });

  it('gives the same result and sends the same bytes however the server bytes are split', () => {
    const reference = handshake();
    const sentReference = feed(reference, goodServer());
    assert.equal(reference.status, 'done');
    const server = goodServer();
    for (let cut = 0; cut <= server.length; cut++) {
      const h = handshake();
      const sent = feed(h, server.subarray(0, cut), server.subarray(cut));
      assert.equal(h.status, 'done', `split at ${cut}`);
      assert.deepEqual(h.result, reference.result);
      assert.deepEqual(sent, sentReference);
    }
    const oneByOne = handshake();
    const sent = feed(oneByOne, ...Array.from(server, (b) => Buffer.from([b])));
    assert.deepEqual(oneByOne.result, reference.result);
    assert.deepEqual(sent, sentReference);
  });

  it('keeps bytes that follow the handshake for the transmission phase', () => {
    const h = handshake();
    const early = Buffer.from([0x67, 0x44, 0x66, 0x98, 1, 2]);
    feed(h, Buffer.concat([goodServer(), early]));
    assert.equal(h.status, 'done');
    assert.deepEqual(h.takeLeftover(), early);
    assert.equal(h.takeLeftover().length, 0);
  });

  it('goes on without structured replies or contexts when the server refuses them', () => {
    const h = handshake();
    const sent = sentOptions(feed(h, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, ERR_UNSUP)), true).options;
    assert.deepEqual(
      sent.map((o) => o.option),
      [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO],
      'no NBD_OPT_SET_META_CONTEXT without structured replies',
    );
    feed(h, infoExport(MiB), reply(NBD_OPT_GO, REP_ACK));
    assert.equal(h.result.structuredReplies, false);
    assert.equal(h.result.contexts.size, 0);
    assert.equal(h.result.blockSizesAdvertised, false);
    assert.deepEqual(h.result.blockSizes, { minimum: 1, preferred: 4096, maximum: 32 * MiB });
  });

  it('connects without contexts when their selection is refused', () => {
    const h = handshake();
    feed(h, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), reply(NBD_OPT_SET_META_CONTEXT, ERR_POLICY, Buffer.from('no')));
    assert.deepEqual(h.step, { name: 'option-reply-header', option: NBD_OPT_GO });
    feed(h, infoExport(MiB), reply(NBD_OPT_GO, REP_ACK));
    assert.equal(h.result.contexts.size, 0);
    assert.equal(h.result.structuredReplies, true);
  });

  it('falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported, with and without zero padding', () => {
    for (const flags of [3, 1]) {
      const h = handshake([]);
      feed(h, greeting(flags), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK));
      const sent = sentOptions(feed(h, reply(NBD_OPT_GO, ERR_UNSUP)), false).options;
      assert.deepEqual(sent, [{ option: NBD_OPT_EXPORT_NAME, data: Buffer.from(EXPORT) }]);
      const size = Buffer.alloc(10);
      size.writeBigUInt64BE(BigInt(2 * MiB), 0);
      size.writeUInt16BE(NBD_FLAG_HAS_FLAGS, 8);
      feed(h, size);
      if (flags === 1) {
        assert.deepEqual(h.step.name, 'export-name-zeroes', 'without NBD_FLAG_NO_ZEROES the server pads with 124 bytes');
        feed(h, Buffer.alloc(124));
      }
      assert.equal(h.status, 'done');
      assert.equal(h.result.size, 2 * MiB);
      assert.equal(h.result.blockSizesAdvertised, false);
    }
  });
});

describe('NbdHandshake: hostile servers', () => {
  it('refuses a greeting with the wrong magic', () => {
    const h = handshake();
    feed(h, greeting(3, IHAVEOPT, 0x4e42444d41474945n));
    expectFailure(h, 'NBD_PROTOCOL', /not NBDMAGIC; this is not an NBD server/, 'bad-magic');
    assert.equal(h.optionsStarted, false);
  });

  it('refuses an unknown second magic, an oldstyle server and one without fixed newstyle', () => {
    const unknown = handshake();
    feed(unknown, greeting(3, 0x1234n));
    expectFailure(unknown, 'NBD_PROTOCOL', /unknown second magic/, 'bad-magic');

    const oldstyle = handshake();
    feed(oldstyle, greeting(3, 0x00420281861253n));
    expectFailure(oldstyle, 'NBD_HANDSHAKE', /uses the oldstyle handshake, which cannot select export "disk0"/);

    const notFixed = handshake();
    assert.equal(feed(notFixed, greeting(0)).length, 0, 'no client flags go to a server without fixed newstyle');
    expectFailure(notFixed, 'NBD_HANDSHAKE', /does not support fixed newstyle negotiation/);
    assert.equal(notFixed.optionsStarted, false);
  });

  it('refuses an option reply with the wrong magic', () => {
    const h = handshake();
    feed(h, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK, Buffer.alloc(0), 0, 0xdeadbeefn));
    expectFailure(h, 'NBD_PROTOCOL', /option reply has magic 0xdeadbeef/, 'bad-magic');
  });

  it('refuses an oversize option reply length from the header alone', () => {
    for (const length of [MAX_OPTION_REPLY_BYTES + 1, 0xffffffff]) {
      const h = atGo();
      // Only the 20-byte header: the payload is refused before a byte of it is awaited.
      feed(h, reply(NBD_OPT_GO, REP_INFO, Buffer.alloc(0), length));
      expectFailure(h, 'NBD_PROTOCOL', new RegExp(`has length ${length}, more than ${MAX_OPTION_REPLY_BYTES}`), 'bad-length');
      assert.equal(h.bufferedBytes, 0, 'nothing is held after the failure');
    }
  });

  it('refuses a reply to an option that was not sent', () => {
    const h = atGo();
    feed(h, reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK));
    expectFailure(h, 'NBD_PROTOCOL', /option reply is for NBD_OPT_STRUCTURED_REPLY, but NBD_OPT_GO was sent/, 'unexpected-reply');
  });

  it('refuses reply types that do not belong to the option', () => {
    const cases: Array<[Buffer[], RegExp]> = [
      [[greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_INFO)], /unexpected NBD_REP_INFO in reply to NBD_OPT_STRUCTURED_REPLY/],
      [[greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), reply(NBD_OPT_SET_META_CONTEXT, REP_SERVER)], /unexpected NBD_REP_SERVER in reply to NBD_OPT_SET_META_CONTEXT/],
      [[greeting(), reply(NBD_OPT_STRUCTURED_REPLY, ERR_UNSUP), reply(NBD_OPT_GO, REP_META_CONTEXT)], /unexpected NBD_REP_META_CONTEXT in reply to NBD_OPT_GO/],
      [[greeting(), reply(NBD_OPT_STRUCTURED_REPLY, ERR_UNSUP), reply(NBD_OPT_GO, 0x42)], /unexpected reply type 0x42 in reply to NBD_OPT_GO/],
    ];
    for (const [parts, pattern] of cases) {
      const h = handshake();
      feed(h, ...parts);
      expectFailure(h, 'NBD_PROTOCOL', pattern, 'unexpected-reply');
    }
  });

  it('refuses malformed replies: ACK with payload, GO without NBD_INFO_EXPORT, bad block sizes', () => {
    const ack = handshake();
    feed(ack, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK, Buffer.from([1])));
    expectFailure(ack, 'NBD_PROTOCOL', /NBD_REP_ACK to NBD_OPT_STRUCTURED_REPLY carries 1 bytes/, 'bad-length');

    const noExport = atGo();
    feed(noExport, reply(NBD_OPT_GO, REP_ACK));
    expectFailure(noExport, 'NBD_PROTOCOL', /NBD_OPT_GO succeeded without NBD_INFO_EXPORT/, 'incomplete-reply');

    const sizes = atGo();
    feed(sizes, infoExport(MiB), infoBlockSize(3, 4096, MiB));
    expectFailure(sizes, 'NBD_PROTOCOL', /minimum block size 3 is not a power of 2/, 'invalid-field');

    const flags = atGo();
    feed(flags, infoExport(MiB, 0));
    expectFailure(flags, 'NBD_PROTOCOL', /lack NBD_FLAG_HAS_FLAGS/, 'invalid-field');
  });

  it('refuses metadata contexts that were not asked for, or selected twice', () => {
    const unasked = handshake();
    feed(unasked, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), metaContext(1, 'qemu:dirty-bitmap:other'));
    expectFailure(unasked, 'NBD_PROTOCOL', /"qemu:dirty-bitmap:other", which was not requested/, 'bad-context');

    const reused = handshake();
    feed(reused, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), metaContext(1, 'base:allocation'), metaContext(1, 'qemu:dirty-bitmap:b0'));
    expectFailure(reused, 'NBD_PROTOCOL', /twice or reused its id/, 'bad-context');
  });
});

describe('NbdHandshake: server refusals', () => {
  it('reports an unknown export as NBD_EXPORT_NOT_FOUND with the server text', () => {
    const h = atGo();
    feed(h, reply(NBD_OPT_GO, ERR_UNKNOWN, Buffer.from('no such export\n')));
    const error = expectFailure(h, 'NBD_EXPORT_NOT_FOUND', /^NBD export "disk0" not found on unix:\/test\/nbd.sock: no such export$/);
    assert.equal(error.details['option'], 'NBD_OPT_GO');
    assert.equal(h.optionsStarted, true, 'the connection answers a refusal with NBD_OPT_ABORT');
  });

  it('reports other NBD_OPT_GO errors as NBD_HANDSHAKE naming the cause', () => {
    const cases: Array<[number, RegExp]> = [
      [ERR_POLICY, /Cannot open NBD export "disk0" on unix:\/test\/nbd.sock: the server refused it by policy: go away/],
      [ERR_SHUTDOWN, /the server is shutting down: go away/],
      [ERR_TLS_REQD, /the server requires TLS, and this connection was not asked to use it \(give TLS credentials, e.g. a certificate directory\): go away/],
      [0x80000009, /the server replied NBD_REP_ERR_TOO_BIG: go away/],
    ];
    for (const [type, pattern] of cases) {
      const h = atGo();
      feed(h, reply(NBD_OPT_GO, type, Buffer.from('go away')));
      expectFailure(h, 'NBD_HANDSHAKE', pattern);
    }
  });

  it('stops at once when TLS is required or the server shuts down, whatever the option', () => {
    for (const type of [ERR_TLS_REQD, ERR_SHUTDOWN]) {
      const structured = handshake();
      feed(structured, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, type));
      expectFailure(structured, 'NBD_HANDSHAKE', /Cannot open NBD export "disk0"/);
      const contexts = handshake();
      feed(contexts, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), reply(NBD_OPT_SET_META_CONTEXT, type));
      expectFailure(contexts, 'NBD_HANDSHAKE', /Cannot open NBD export "disk0"/);
    }
  });
});

describe('NbdHandshake: STARTTLS', () => {
  function tlsHandshake(): NbdHandshake {
    return new NbdHandshake({ exportName: EXPORT, metaContexts: ['base:allocation'], address: ADDRESS, tls: true });
  }

  it('sends NBD_OPT_STARTTLS first, waits for the connection after the ACK, then negotiates from the start', () => {
    const h = tlsHandshake();
    const first = sentOptions(feed(h, greeting()), true);
    assert.deepEqual(first.options, [{ option: NBD_OPT_STARTTLS, data: Buffer.alloc(0) }], 'nothing but STARTTLS goes out in the clear');
    assert.equal(feed(h, reply(NBD_OPT_STARTTLS, REP_ACK)).length, 0);
    assert.deepEqual(h.step, { name: 'tls-upgrade' });
    assert.equal(h.status, 'running');
    h.tlsEstablished();
    assert.deepEqual(sentOptions(h.takeOutput(), false).options, [{ option: NBD_OPT_STRUCTURED_REPLY, data: Buffer.alloc(0) }]);
    feed(h, reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), metaContext(1, 'base:allocation'), reply(NBD_OPT_SET_META_CONTEXT, REP_ACK), infoExport(4 * MiB), reply(NBD_OPT_GO, REP_ACK));
    assert.equal(h.status, 'done');
    assert.equal(h.result.tls, true);
    assert.equal(h.result.size, 4 * MiB);
    const plain = handshake([]);
    feed(plain, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK), infoExport(MiB), reply(NBD_OPT_GO, REP_ACK));
    assert.equal(plain.result.tls, false);
  });

  it('a refused STARTTLS ends the handshake with NBD_TLS and never goes on in the clear', () => {
    const cases: Array<[number, RegExp]> = [
      [ERR_UNSUP, /^Cannot open NBD export "disk0" on unix:\/test\/nbd.sock with TLS: the server does not support TLS, and qbackup does not fall back to an unencrypted connection \(server: nope\)$/],
      [ERR_POLICY, /the server refused TLS by policy/],
      [ERR_INVALID, /the server refused NBD_OPT_STARTTLS as invalid/],
      [ERR_SHUTDOWN, /the server answered NBD_OPT_STARTTLS with NBD_REP_ERR_SHUTDOWN/],
    ];
    for (const [type, pattern] of cases) {
      const h = tlsHandshake();
      feed(h, greeting());
      assert.equal(feed(h, reply(NBD_OPT_STARTTLS, type, Buffer.from('nope'))).length, 0, 'no option follows a refusal');
      const error = expectFailure(h, 'NBD_TLS', pattern);
      assert.equal(error.details['option'], 'NBD_OPT_STARTTLS');
      assert.equal(h.optionsStarted, true, 'the connection answers with NBD_OPT_ABORT');
    }
  });

  it('bytes in the clear after the ACK, an ACK with a payload, or a reply to another option break the protocol', () => {
    const sameChunk = tlsHandshake();
    feed(sameChunk, greeting(), Buffer.concat([reply(NBD_OPT_STARTTLS, REP_ACK), Buffer.from('plain')]));
    expectFailure(sameChunk, 'NBD_PROTOCOL', /sent 5 bytes in the clear after accepting NBD_OPT_STARTTLS/, 'unexpected-reply');
    const later = tlsHandshake();
    feed(later, greeting(), reply(NBD_OPT_STARTTLS, REP_ACK), Buffer.from('x'));
    expectFailure(later, 'NBD_PROTOCOL', /sent 1 bytes in the clear/, 'unexpected-reply');
    const payload = tlsHandshake();
    feed(payload, greeting(), reply(NBD_OPT_STARTTLS, REP_ACK, Buffer.from('hi')));
    expectFailure(payload, 'NBD_PROTOCOL', /NBD_REP_ACK to NBD_OPT_STARTTLS carries 2 bytes/, 'bad-length');
    const other = tlsHandshake();
    feed(other, greeting(), reply(NBD_OPT_STRUCTURED_REPLY, REP_ACK));
    expectFailure(other, 'NBD_PROTOCOL', /is for NBD_OPT_STRUCTURED_REPLY, but NBD_OPT_STARTTLS was sent/, 'unexpected-reply');
    const info = tlsHandshake();
    feed(info, greeting(), reply(NBD_OPT_STARTTLS, REP_INFO, Buffer.alloc(2)));
    expectFailure(info, 'NBD_PROTOCOL', /unexpected NBD_REP_INFO in reply to NBD_OPT_STARTTLS/, 'unexpected-reply');
  });

  it('tlsEstablished() outside the upgrade step is a bug', () => {
    const h = tlsHandshake();
    assert.throws(() => h.tlsEstablished(), /tlsEstablished\(\) follows an accepted NBD_OPT_STARTTLS/);
    const plain = handshake();
    feed(plain, greeting());
    assert.throws(() => plain.tlsEstablished(), /AssertionError|follows an accepted/);
  });
});

describe('NbdHandshake: mutated server bytes (seeded)', () => {
  it('ends done, failed with a QbackupError, or still waiting; never anything else', { timeout: 10_000 }, () => {
    withSeed('NBD_HANDSHAKE_SEED', 20240601, 'nbd-handshake.test.js', (random) => {
      const good = goodServer();
      const outcomes = { done: 0, failed: 0, running: 0 };
      for (let round = 0; round < 1500; round++) {
        const bytes = Buffer.from(good);
        for (let m = 1 + random.int(3); m > 0; m--) bytes[random.int(bytes.length)] = random.int(256);
        const stream = random.chance(0.2) ? Buffer.concat([bytes, random.bytes(random.int(64))]) : bytes;
        const h = handshake();
        for (const piece of randomSplit(random, stream, 48)) {
          h.push(piece);
          h.takeOutput();
        }
        outcomes[h.status]++;
        if (h.status === 'failed') assert.ok(isQbackupError(h.error), `round ${round}: ${String(h.error)}`);
        if (h.status === 'done') assert.ok(Number.isSafeInteger(h.result.size));
      }
      assert.ok(outcomes.failed > 0 && outcomes.done > 0, JSON.stringify(outcomes));
    });
  });
});
