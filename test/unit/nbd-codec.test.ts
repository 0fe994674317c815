// Byte layouts of src/nbd/codec.ts: what we encode is checked field by field
// against the spec's layout, what we decode is built here independently (not
// with our encoders) and decoded back, and hostile inputs are rejected with
// NbdProtocolError naming the rule.

import { strict as assert } from 'node:assert';
import { describe, it } from 'node:test';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REP_ERR_UNKNOWN,
  NbdProtocolError,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeExportNameReply,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOffsetData,
  decodeOffsetHole,
  decodeOptionErrorMessage,
  decodeOptionReplyHeader,
  decodeServerHello,
  decodeSimpleReplyHeader,
  decodeStructuredReplyHeader,
  encodeClientFlags,
  encodeExportNameOption,
  encodeGoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeRequest,
  encodeStructuredReplyOption,
  readU64,
  type NbdProtocolReason,
} from '../../src/nbd/index.js';
import { isQbackupError } from '../../src/errors.js';

function hex(text: string): Buffer {
  return Buffer.from(text.replace(/\s+/g, ''), 'hex');
}

function rejects(fn: () => unknown, reason: NbdProtocolReason, pattern?: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof NbdProtocolError, `expected NbdProtocolError, got ${String(err)}`);
    assert.equal(err.code, 'NBD_PROTOCOL');
    assert.equal(err.reason, reason, err.message);
    if (pattern !== undefined) assert.match(err.message, pattern);
    return true;
  });
}

function invalidArgument(fn: () => unknown): void {
  assert.throws(fn, (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
}

describe('NBD codec: encoding', () => {
  it('encodes client flags as 32 bits', () => {
    assert.deepEqual(encodeClientFlags(3), hex('00000003'));
    invalidArgument(() => encodeClientFlags(2 ** 32));
  });

  it('encodes an option with IHAVEOPT, number, length and data', () => {
    assert.deepEqual(encodeOption(9, Buffer.from('ab')), hex('49484156454f5054 00000009 00000002 6162'));
    assert.deepEqual(encodeStructuredReplyOption(), hex('49484156454f5054 00000008 00000000'));
  });

  it('encodes NBD_OPT_GO with the name and info requests', () => {
    const option = encodeGoOption('sda', [NBD_INFO_BLOCK_SIZE]);
    assert.deepEqual(option, hex('49484156454f5054 00000007 0000000b 00000003 736461 0001 0003'));
    assert.equal(encodeGoOption('', [], NBD_OPT_INFO).readUInt32BE(8), NBD_OPT_INFO);
    invalidArgument(() => encodeGoOption('x', [3, 3]));
  });

  it('encodes NBD_OPT_SET_META_CONTEXT with each query length-prefixed', () => {
    const option = encodeMetaContextOption('d', ['base:allocation', 'qemu:dirty-bitmap:b']);
    assert.equal(option.readUInt32BE(8), NBD_OPT_SET_META_CONTEXT);
    const data = option.subarray(16);
    assert.equal(option.readUInt32BE(12), data.length);
    assert.equal(data.readUInt32BE(0), 1);
    assert.equal(data.toString('utf8', 4, 5), 'd');
    assert.equal(data.readUInt32BE(5), 2);
    assert.equal(data.readUInt32BE(9), 15);
    assert.equal(data.toString('utf8', 13, 28), 'base:allocation');
    assert.equal(data.readUInt32BE(28), 19);
    assert.equal(data.toString('utf8', 32), 'qemu:dirty-bitmap:b');
  });

  it('rejects strings the spec forbids', () => {
    invalidArgument(() => encodeGoOption('a\0b', []));
    invalidArgument(() => encodeGoOption('x'.repeat(4097), []));
    invalidArgument(() => encodeGoOption('\ud800', []));
    invalidArgument(() => encodeMetaContextOption('d', ['allocation']));
    invalidArgument(() => encodeMetaContextOption('d', [':x']));
    assert.equal(encodeExportNameOption('x'.repeat(4096)).length, 16 + 4096);
  });

  it('encodes a request header in 28 bytes', () => {
    const request = encodeRequest({ flags: NBD_CMD_FLAG_REQ_ONE, type: NBD_CMD_BLOCK_STATUS, cookie: 0x0102030405060708n, offset: 2 ** 40 + 5, length: 0xfffffffe });
    assert.deepEqual(request, hex('25609513 0008 0007 0102030405060708 0000010000000005 fffffffe'));
    invalidArgument(() => encodeRequest({ flags: 0, type: 0, cookie: -1n, offset: 0, length: 1 }));
    invalidArgument(() => encodeRequest({ flags: 0, type: 0, cookie: 1n << 64n, offset: 0, length: 1 }));
    invalidArgument(() => encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 2 ** 32 }));
    invalidArgument(() => encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: -1, length: 1 }));
    invalidArgument(() => encodeRequest({ flags: 0x10000, type: 0, cookie: 1n, offset: 0, length: 1 }));
    invalidArgument(() => encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: 1n, offset: 0, length: 1 }));
  });
});

describe('NBD codec: handshake decoding', () => {
  it('tells newstyle from oldstyle and rejects other magic', () => {
    assert.equal(decodeServerHello(hex('4e42444d41474943 49484156454f5054')), 'newstyle');
    assert.equal(decodeServerHello(hex('4e42444d41474943 0000420281861253')), 'oldstyle');
    rejects(() => decodeServerHello(hex('485454502f312e31 20323030204f4b0d')), 'bad-magic', /not an NBD server/);
    rejects(() => decodeServerHello(hex('4e42444d41474943 0000000000000000')), 'bad-magic');
    rejects(() => decodeServerHello(hex('4e42444d41474943')), 'bad-length');
  });

  it('decodes option reply headers', () => {
    const header = decodeOptionReplyHeader(hex('0003e889045565a9 00000007 80000006 00000010'));
    assert.deepEqual(header, { option: NBD_OPT_GO, reply: NBD_REP_ERR_UNKNOWN, length: 16 });
    rejects(() => decodeOptionReplyHeader(hex('0003e889045565a8 00000007 00000001 00000000')), 'bad-magic');
  });

  it('decodes NBD_INFO_EXPORT and requires NBD_FLAG_HAS_FLAGS', () => {
    const info = decodeInfoReply(hex('0000 0000000100000000 0003'));
    assert.deepEqual(info, { info: NBD_INFO_EXPORT, size: 2 ** 32, transmissionFlags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY });
    rejects(() => decodeInfoReply(hex('0000 0000000100000000 0002')), 'invalid-field', /NBD_FLAG_HAS_FLAGS/);
    rejects(() => decodeInfoReply(hex('0000 0000000100000000 000300')), 'bad-length');
    rejects(() => decodeInfoReply(hex('0000 0020000000000000 0001')), 'out-of-range');
  });

  it('decodes NBD_INFO_BLOCK_SIZE and checks the spec constraints', () => {
    assert.deepEqual(decodeInfoReply(hex('0003 00000200 00001000 02000000')), {
      info: NBD_INFO_BLOCK_SIZE,
      minimum: 512,
      preferred: 4096,
      maximum: 32 * 1024 * 1024,
    });
    assert.equal((decodeInfoReply(hex('0003 00000001 00001000 ffffffff')) as { maximum: number }).maximum, 0xffffffff);
    rejects(() => decodeInfoReply(hex('0003 00000300 00001000 02000000')), 'invalid-field', /minimum/);
    rejects(() => decodeInfoReply(hex('0003 00020000 00020000 02000000')), 'invalid-field', /minimum/);
    rejects(() => decodeInfoReply(hex('0003 00000001 00000100 02000000')), 'invalid-field', /preferred/);
    rejects(() => decodeInfoReply(hex('0003 00000200 00001000 00000800')), 'invalid-field', /maximum/);
    rejects(() => decodeInfoReply(hex('0003 00000200 00001000 02000001')), 'invalid-field', /multiple/);
    rejects(() => decodeInfoReply(hex('0003 00000200 00001000')), 'bad-length');
  });

  it('decodes names, ignores unknown info types, rejects bad UTF-8', () => {
    assert.deepEqual(decodeInfoReply(Buffer.concat([hex('0001'), Buffer.from('día')])), { info: NBD_INFO_NAME, name: 'día' });
    assert.deepEqual(decodeInfoReply(hex('0042 0102')), { info: 'unknown', type: 0x42 });
    rejects(() => decodeInfoReply(hex('0001 ff')), 'invalid-field', /UTF-8/);
    rejects(() => decodeInfoReply(hex('0002 6100')), 'invalid-field', /NUL/);
    rejects(() => decodeInfoReply(hex('00')), 'bad-length');
  });

  it('decodes meta context replies', () => {
    assert.deepEqual(decodeMetaContextReply(Buffer.concat([hex('00000005'), Buffer.from('base:allocation')])), { contextId: 5, name: 'base:allocation' });
    rejects(() => decodeMetaContextReply(hex('00000005')), 'bad-length');
  });

  it('decodes the NBD_OPT_EXPORT_NAME reply', () => {
    assert.deepEqual(decodeExportNameReply(hex('0000000000100000 0001')), { size: 1 << 20, transmissionFlags: 1 });
    rejects(() => decodeExportNameReply(hex('0000000000100000 0000')), 'invalid-field');
  });

  it('makes server error text printable', () => {
    assert.equal(decodeOptionErrorMessage(Buffer.from('no such\nexport\x1b[31m')), 'no such export [31m');
    assert.equal(decodeOptionErrorMessage(hex('ff61')), '\ufffda');
  });
});

describe('NBD codec: transmission decoding', () => {
  it('decodes simple and structured reply headers', () => {
    assert.deepEqual(decodeSimpleReplyHeader(hex('67446698 00000005 ffffffffffffffff')), { error: 5, cookie: 0xffffffffffffffffn });
    rejects(() => decodeSimpleReplyHeader(hex('67446699 00000005 ffffffffffffffff')), 'bad-magic');
    assert.deepEqual(decodeStructuredReplyHeader(hex('668e33ef 0001 0001 0000000000000007 00001008')), {
      flags: NBD_REPLY_FLAG_DONE,
      type: NBD_REPLY_TYPE_OFFSET_DATA,
      cookie: 7n,
      length: 0x1008,
    });
    rejects(() => decodeStructuredReplyHeader(hex('668e33ef 0001 0001 0000000000000007 000010')), 'bad-length');
  });

  it('decodes data and hole payloads', () => {
    const data = decodeOffsetData(hex('0000000000001000 aabbcc'));
    assert.equal(data.offset, 4096);
    assert.deepEqual(data.data, hex('aabbcc'));
    rejects(() => decodeOffsetData(hex('0000000000001000')), 'bad-length');
    assert.deepEqual(decodeOffsetHole(hex('0000000000002000 00000200')), { offset: 8192, length: 512 });
    rejects(() => decodeOffsetHole(hex('0000000000002000 00000000')), 'invalid-field', /hole size 0/);
    rejects(() => decodeOffsetHole(hex('0000000000002000 0000020000')), 'bad-length');
    rejects(() => decodeOffsetHole(hex('ffffffffffffffff 00000200')), 'out-of-range');
  });

  it('decodes block status descriptors', () => {
    assert.deepEqual(decodeBlockStatus(hex('00000002 00010000 00000003 00000200 00000000')), {
      contextId: 2,
      descriptors: [
        { length: 65536, flags: 3 },
        { length: 512, flags: 0 },
      ],
    });
    rejects(() => decodeBlockStatus(hex('00000002')), 'bad-length');
    rejects(() => decodeBlockStatus(hex('00000002 00010000 00000003 0000')), 'bad-length');
    rejects(() => decodeBlockStatus(hex('00000002 00000000 00000003')), 'invalid-field', /length 0/);
  });

  it('decodes error chunks with and without offset', () => {
    assert.deepEqual(decodeErrorChunk(NBD_REPLY_TYPE_ERROR, Buffer.concat([hex('00000005 0002'), Buffer.from('io')])), {
      error: 5,
      message: 'io',
      offset: undefined,
    });
    assert.deepEqual(decodeErrorChunk(NBD_REPLY_TYPE_ERROR_OFFSET, hex('0000001c 0000 0000000000000400')), {
      error: 28,
      message: '',
      offset: 1024,
    });
    // An unknown error type keeps the common fields and skips what follows.
    assert.equal(decodeErrorChunk(0x8005, hex('00000016 0000 010203')).error, 22);
    rejects(() => decodeErrorChunk(NBD_REPLY_TYPE_ERROR, hex('00000000 0000')), 'invalid-field', /error value 0/);
    rejects(() => decodeErrorChunk(NBD_REPLY_TYPE_ERROR, hex('00000005 0003 6162')), 'bad-length');
    rejects(() => decodeErrorChunk(NBD_REPLY_TYPE_ERROR_OFFSET, hex('00000005 0000 00000000')), 'bad-length');
    rejects(() => decodeErrorChunk(NBD_REPLY_TYPE_ERROR_OFFSET, hex('00000005 0000 0000000000000400 00')), 'bad-length');
    const long = Buffer.alloc(6 + 5000);
    long.writeUInt32BE(5, 0);
    long.writeUInt16BE(5000, 4);
    rejects(() => decodeErrorChunk(NBD_REPLY_TYPE_ERROR, long), 'bad-length', /4096/);
  });

  it('reads 64-bit values only when exact', () => {
    assert.equal(readU64(hex('001fffffffffffff'), 0, 'x'), Number.MAX_SAFE_INTEGER);
    rejects(() => readU64(hex('0020000000000000'), 0, 'offset'), 'out-of-range', /offset/);
  });

  it('round-trips option replies built byte by byte', () => {
    for (const option of [NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, 0xffffffff]) {
      for (const reply of [1, 3, 0x80000001, 0xffffffff]) {
        for (const length of [0, 1, 4096]) {
          const bytes = Buffer.alloc(20);
          bytes.writeBigUInt64BE(0x3e889045565a9n, 0);
          bytes.writeUInt32BE(option, 8);
          bytes.writeUInt32BE(reply, 12);
          bytes.writeUInt32BE(length, 16);
          assert.deepEqual(decodeOptionReplyHeader(bytes), { option, reply, length });
        }
      }
    }
  });
});
