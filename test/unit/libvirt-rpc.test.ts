// libvirt's RPC wire format, checked with hand-built bytes: XDR primitives
// and limits, typed parameters, the header and framing (including hostile
// lengths and headers), and the procedure table round-tripping arguments and
// replies whose bytes are written out here field by field from
// remote_protocol.x.

import { dacBaseLabel } from '../../src/drivers/libvirt/driver.js';
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  EVENTS,
  EVENT_BODIES,
  LIBVIRT,
  LibvirtCallError,
  LibvirtFrameParser,
  LibvirtProtocolError,
  PROCEDURES,
  XdrReader,
  XdrWriter,
  encodeMessage,
  encodeXdr,
  remoteError,
  remoteTypedParam,
  typedParamsRecord,
  type LibvirtFrame,
  type LibvirtProcedure,
  type LibvirtTypedParam,
  type XdrType,
} from '../../src/drivers/libvirt/index.js';
import { isQbackupError } from '../../src/errors.js';

// -- an independent little XDR builder, so expectations are not our encoder's output
const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
const i32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
};
const u64 = (n: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(n);
  return b;
};
const str = (s: string): Buffer => {
  const bytes = Buffer.from(s);
  return Buffer.concat([u32(bytes.length), bytes, Buffer.alloc((4 - (bytes.length % 4)) % 4)]);
};
const cat = (...parts: Buffer[]): Buffer => Buffer.concat(parts);
const UUID = Buffer.from('0123456789abcdef0123456789abcdef', 'hex');
const DOM = { name: 'vm1', uuid: UUID, id: 7 };
const domBytes = cat(str('vm1'), UUID, i32(7));


function decode<T>(codec: XdrType<T>, bytes: Buffer): T {
  const r = new XdrReader(bytes);
  const v = codec.decode(r);
  r.end('test value');
  return v;
}

function roundTrip<A, R>(proc: LibvirtProcedure<A, R>, args: A, argBytes: Buffer, ret: R, retBytes: Buffer): void {
  assert.deepEqual(encodeXdr(proc.args, args), argBytes, `${proc.name} arguments`);
  assert.deepEqual(decode(proc.args, argBytes), args, `${proc.name} arguments decoded`);
  assert.deepEqual(encodeXdr(proc.ret, ret), retBytes, `${proc.name} reply`);
  assert.deepEqual(decode(proc.ret, retBytes), ret, `${proc.name} reply decoded`);
}

function isProtocol(reason: string) {
  return (err: unknown): boolean => err instanceof LibvirtProtocolError && err.reason === reason && isQbackupError(err, 'LIBVIRT_PROTOCOL');
}

describe('XDR', () => {
  it('encodes primitives big-endian with 4-byte padding', () => {
    const w = new XdrWriter().int(-2).uint(0xffffffff).hyper(-1n).uhyper(1n << 40n).bool(true).double(1.5).string('abcde', 10).opaque(Buffer.from([1]), 4);
    assert.deepEqual(
      Buffer.from(w.finish()),
      cat(i32(-2), u32(0xffffffff), Buffer.alloc(8, 0xff), u64(1n << 40n), u32(1), Buffer.from('3ff8000000000000', 'hex'), str('abcde'), u32(1), Buffer.from([1, 0, 0, 0])),
    );
    const r = new XdrReader(Buffer.from(w.finish()));
    assert.deepEqual([r.int(), r.uint(), r.hyper(), r.uhyper(), r.bool(), r.double(), r.string(10), [...r.opaque(4)]], [-2, 0xffffffff, -1n, 1n << 40n, true, 1.5, 'abcde', [1]]);
    r.end('primitives');
  });

  it('refuses values out of range before anything is sent', () => {
    assert.throws(() => new XdrWriter().int(2 ** 31), (e: unknown) => isQbackupError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => new XdrWriter().uint(-1), (e: unknown) => isQbackupError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => new XdrWriter().uhyper(-1n), (e: unknown) => isQbackupError(e, 'INVALID_ARGUMENT'));
    assert.throws(() => new XdrWriter().string('abcdef', 5), (e: unknown) => isQbackupError(e, 'INVALID_ARGUMENT'));
  });

  it('rejects hostile bytes: short data, lengths over the limit, nonzero padding, bad booleans, trailing bytes', () => {
    assert.throws(() => new XdrReader(Buffer.alloc(3)).int(), isProtocol('bad-xdr'));
    assert.throws(() => new XdrReader(u32(11)).string(10), isProtocol('bad-xdr'));
    assert.throws(() => new XdrReader(cat(u32(5), Buffer.from('abcde'))).string(10), isProtocol('bad-xdr'));
    assert.throws(() => new XdrReader(cat(u32(1), Buffer.from([0x61, 0, 1, 0]))).string(10), isProtocol('bad-xdr'));
    assert.throws(() => new XdrReader(u32(2)).bool(), isProtocol('bad-xdr'));
    assert.throws(() => decode(PROCEDURES.domainGetState.ret, cat(i32(1), i32(1), i32(0))), isProtocol('bad-xdr'));
    // An array count above its limit, or above what the bytes could hold, is refused before allocating.
    assert.throws(() => decode(PROCEDURES.connectListAllDomains.ret, cat(u32(LIBVIRT.REMOTE_DOMAIN_LIST_MAX + 1))), isProtocol('bad-xdr'));
    assert.throws(() => decode(PROCEDURES.connectListAllDomains.ret, cat(u32(1000), u32(0))), isProtocol('bad-xdr'));
  });

  it('typed parameters of all seven types round-trip', () => {
    const cases: Array<[LibvirtTypedParam, Buffer]> = [
      [{ field: 'a', type: 'int', value: -5 }, cat(str('a'), i32(1), i32(-5))],
      [{ field: 'b', type: 'uint', value: 5 }, cat(str('b'), i32(2), u32(5))],
      [{ field: 'c', type: 'llong', value: -(1n << 40n) }, cat(str('c'), i32(3), Buffer.from('ffffff0000000000', 'hex'))],
      [{ field: 'd', type: 'ullong', value: 1n << 63n }, cat(str('d'), i32(4), u64(1n << 63n))],
      [{ field: 'e', type: 'double', value: 0.25 }, cat(str('e'), i32(5), Buffer.from('3fd0000000000000', 'hex'))],
      [{ field: 'f', type: 'boolean', value: true }, cat(str('f'), i32(6), i32(1))],
      [{ field: 'g', type: 'string', value: 'xyz' }, cat(str('g'), i32(7), str('xyz'))],
    ];
    for (const [param, bytes] of cases) {
      assert.deepEqual(encodeXdr(remoteTypedParam, param), bytes, param.field);
      assert.deepEqual(decode(remoteTypedParam, bytes), param, param.field);
    }
    assert.throws(() => decode(remoteTypedParam, cat(str('h'), i32(8), i32(0))), isProtocol('bad-xdr'));
    assert.deepEqual(typedParamsRecord(cases.map((c) => c[0])), { a: -5, b: 5, c: -(2 ** 40), d: 1n << 63n, e: 0.25, f: true, g: 'xyz' });
  });
});

describe('framing', () => {
  const header = { program: LIBVIRT.REMOTE_PROGRAM, version: 1, procedure: 23, type: LIBVIRT.VIR_NET_CALL, serial: 9, status: LIBVIRT.VIR_NET_OK };

  it('writes the length word (counting itself) and the 24-byte header', () => {
    const body = str('vm1');
    assert.deepEqual(encodeMessage(header, body), cat(u32(28 + body.length), u32(0x20008086), u32(1), i32(23), i32(0), u32(9), i32(0), body));
  });

  it('parses messages split anywhere and several in one chunk', () => {
    const frames: LibvirtFrame[] = [];
    const parser = new LibvirtFrameParser({ onFrame: (f) => frames.push(f), onError: (e) => assert.fail(e) });
    const a = encodeMessage(header, str('one'));
    const b = encodeMessage({ ...header, serial: 10, type: LIBVIRT.VIR_NET_REPLY }, Buffer.alloc(0));
    const all = cat(a, b);
    for (let i = 0; i < all.length; i += 3) parser.push(all.subarray(i, i + 3));
    parser.push(cat(a, b));
    assert.deepEqual(frames.map((f) => [f.header.serial, f.body.length]), [[9, 8], [10, 0], [9, 8], [10, 0]]);
    assert.equal(parser.bufferedBytes, 0);
  });

  it('rejects a length below the header or above 32 MiB before buffering, and unknown types and statuses', () => {
    for (const [bytes, reason] of [
      [u32(27), 'bad-length'],
      [u32(LIBVIRT.VIR_NET_MESSAGE_MAX + 5), 'bad-length'],
      [encodeMessage({ ...header, type: 7 }, Buffer.alloc(0)), 'bad-header'],
      [encodeMessage({ ...header, status: 3 }, Buffer.alloc(0)), 'bad-header'],
    ] as const) {
      const errors: LibvirtProtocolError[] = [];
      const parser = new LibvirtFrameParser({ onFrame: () => assert.fail('no frame expected'), onError: (e) => errors.push(e) });
      parser.push(bytes);
      parser.push(encodeMessage(header, Buffer.alloc(0)));
      assert.deepEqual(errors.map((e) => e.reason), [reason]);
    }
  });
});

describe('procedures', () => {
  it('carry the numbers of remote_protocol.x and qemu_protocol.x', () => {
    const numbers = Object.fromEntries(Object.values(PROCEDURES).map((p) => [p.name, [p.program, p.procedure]]));
    assert.deepEqual(numbers['connect-open'], [0x20008086, 1]);
    assert.deepEqual(numbers['auth-list'], [0x20008086, 66]);
    assert.deepEqual(numbers['connect-list-all-domains'], [0x20008086, 273]);
    assert.deepEqual(numbers['domain-checkpoint-create-xml'], [0x20008086, 411]);
    assert.deepEqual(numbers['domain-backup-begin'], [0x20008086, 421]);
    assert.deepEqual(numbers['domain-get-job-stats'], [0x20008086, 298]);
    assert.deepEqual(numbers['connect-domain-event-callback-register-any'], [0x20008086, 316]);
    assert.deepEqual(numbers['connect-get-capabilities'], [0x20008086, 7]);
    assert.deepEqual(numbers['domain-resume'], [0x20008086, 28]);
    assert.deepEqual(numbers['domain-suspend'], [0x20008086, 34]);
    assert.deepEqual(numbers['qemu-domain-monitor-command'], [0x20008087, 1]);
    const keys = Object.values(PROCEDURES).map((p) => `${p.program}:${p.procedure}`);
    assert.equal(new Set(keys).size, keys.length, 'no number twice');
  });

  it('round-trip arguments and replies byte for byte', () => {
    roundTrip(PROCEDURES.connectOpen, { name: 'qemu:///system', flags: 0 }, cat(u32(1), str('qemu:///system'), u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.authList, undefined, Buffer.alloc(0), { types: [0, 2] }, cat(u32(2), i32(0), i32(2)));
    roundTrip(PROCEDURES.connectGetLibVersion, undefined, Buffer.alloc(0), { libVer: 9_000_000n }, u64(9_000_000n));
    roundTrip(PROCEDURES.connectListAllDomains, { needResults: 1, flags: 3 }, cat(i32(1), u32(3)), { domains: [DOM], ret: 1 }, cat(u32(1), domBytes, u32(1)));
    roundTrip(PROCEDURES.domainLookupByName, { name: 'vm1' }, str('vm1'), { dom: DOM }, domBytes);
    roundTrip(PROCEDURES.domainLookupByUuid, { uuid: UUID }, UUID, { dom: DOM }, domBytes);
    roundTrip(PROCEDURES.domainGetXmlDesc, { dom: DOM, flags: 2 }, cat(domBytes, u32(2)), { xml: '<domain/>' }, str('<domain/>'));
    roundTrip(PROCEDURES.domainGetState, { dom: DOM, flags: 0 }, cat(domBytes, u32(0)), { state: 1, reason: 1 }, cat(i32(1), i32(1)));
    roundTrip(
      PROCEDURES.domainGetInfo,
      { dom: DOM },
      domBytes,
      { state: 5, maxMem: 131072n, memory: 131072n, nrVirtCpu: 1, cpuTime: 0n },
      cat(u32(5), u64(131072n), u64(131072n), u32(1), u64(0n)),
    );
    roundTrip(PROCEDURES.domainDefineXmlFlags, { xml: '<domain/>', flags: 1 }, cat(str('<domain/>'), u32(1)), { dom: DOM }, domBytes);
    roundTrip(PROCEDURES.domainCreateWithFlags, { dom: DOM, flags: 0 }, cat(domBytes, u32(0)), { dom: DOM }, domBytes);
    roundTrip(PROCEDURES.domainDestroyFlags, { dom: DOM, flags: 0 }, cat(domBytes, u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainShutdownFlags, { dom: DOM, flags: 0 }, cat(domBytes, u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainAttachDeviceFlags, { dom: DOM, xml: '<disk/>', flags: 3 }, cat(domBytes, str('<disk/>'), u32(3)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainDetachDeviceFlags, { dom: DOM, xml: '<disk/>', flags: 1 }, cat(domBytes, str('<disk/>'), u32(1)), undefined, Buffer.alloc(0));
    roundTrip(
      PROCEDURES.domainGetBlockInfo,
      { dom: DOM, path: 'sda', flags: 0 },
      cat(domBytes, str('sda'), u32(0)),
      { allocation: 1n, capacity: 2n, physical: 3n },
      cat(u64(1n), u64(2n), u64(3n)),
    );
    roundTrip(PROCEDURES.domainBlockResize, { dom: DOM, disk: 'sda', size: 1n << 30n, flags: 1 }, cat(domBytes, str('sda'), u64(1n << 30n), u32(1)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainUndefineFlags, { dom: DOM, flags: 16 }, cat(domBytes, u32(16)), undefined, Buffer.alloc(0));
    const cp = { name: 'c1', dom: DOM };
    const cpBytes = cat(str('c1'), domBytes);
    roundTrip(PROCEDURES.domainCheckpointCreateXml, { dom: DOM, xmlDesc: '<x/>', flags: 1 }, cat(domBytes, str('<x/>'), u32(1)), { checkpoint: cp }, cpBytes);
    roundTrip(PROCEDURES.domainListAllCheckpoints, { dom: DOM, needResults: 1, flags: 0 }, cat(domBytes, i32(1), u32(0)), { checkpoints: [cp], ret: 1 }, cat(u32(1), cpBytes, i32(1)));
    roundTrip(PROCEDURES.domainCheckpointLookupByName, { dom: DOM, name: 'c1', flags: 0 }, cat(domBytes, str('c1'), u32(0)), { checkpoint: cp }, cpBytes);
    roundTrip(PROCEDURES.domainCheckpointGetXmlDesc, { checkpoint: cp, flags: 4 }, cat(cpBytes, u32(4)), { xml: '<c/>' }, str('<c/>'));
    roundTrip(PROCEDURES.domainCheckpointDelete, { checkpoint: cp, flags: 0 }, cat(cpBytes, u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainBackupBegin, { dom: DOM, backupXml: '<b/>', checkpointXml: '<c/>', flags: 0 }, cat(domBytes, str('<b/>'), u32(1), str('<c/>'), u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainBackupBegin, { dom: DOM, backupXml: '<b/>', checkpointXml: undefined, flags: 0 }, cat(domBytes, str('<b/>'), u32(0), u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainBackupGetXmlDesc, { dom: DOM, flags: 0 }, cat(domBytes, u32(0)), { xml: '<b/>' }, str('<b/>'));
    roundTrip(
      PROCEDURES.domainGetJobStats,
      { dom: DOM, flags: 1 },
      cat(domBytes, u32(1)),
      { type: 3, params: [{ field: 'time_elapsed', type: 'ullong', value: 12n }] },
      cat(i32(3), u32(1), str('time_elapsed'), i32(4), u64(12n)),
    );
    roundTrip(PROCEDURES.domainAbortJob, { dom: DOM }, domBytes, undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainAbortJobFlags, { dom: DOM, flags: 1 }, cat(domBytes, u32(1)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainBlockPull, { dom: DOM, path: 'sda', bandwidth: 0n, flags: 0 }, cat(domBytes, str('sda'), u64(0n), u32(0)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainBlockRebase, { dom: DOM, path: 'sda', base: undefined, bandwidth: 1n, flags: 8 }, cat(domBytes, str('sda'), u32(0), u64(1n), u32(8)), undefined, Buffer.alloc(0));
    roundTrip(
      PROCEDURES.domainBlockCopy,
      { dom: DOM, path: 'sda', destxml: '<disk/>', params: [{ field: 'bandwidth', type: 'ullong', value: 0n }], flags: 2 },
      cat(domBytes, str('sda'), str('<disk/>'), u32(1), str('bandwidth'), i32(4), u64(0n), u32(2)),
      undefined,
      Buffer.alloc(0),
    );
    roundTrip(
      PROCEDURES.domainGetBlockJobInfo,
      { dom: DOM, path: 'sda', flags: 0 },
      cat(domBytes, str('sda'), u32(0)),
      { found: 1, type: 1, bandwidth: 0n, cur: 5n, end: 10n },
      cat(i32(1), i32(1), u64(0n), u64(5n), u64(10n)),
    );
    roundTrip(PROCEDURES.domainBlockJobAbort, { dom: DOM, path: 'sda', flags: 2 }, cat(domBytes, str('sda'), u32(2)), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.domainFsfreeze, { dom: DOM, mountpoints: ['/'], flags: 0 }, cat(domBytes, u32(1), str('/'), u32(0)), { filesystems: 1 }, i32(1));
    roundTrip(PROCEDURES.domainFsthaw, { dom: DOM, mountpoints: [], flags: 0 }, cat(domBytes, u32(0), u32(0)), { filesystems: 1 }, i32(1));
    roundTrip(PROCEDURES.connectDomainEventCallbackRegisterAny, { eventID: 21, dom: DOM }, cat(i32(21), u32(1), domBytes), { callbackID: 3 }, i32(3));
    roundTrip(PROCEDURES.connectDomainEventCallbackRegisterAny, { eventID: 16, dom: undefined }, cat(i32(16), u32(0)), { callbackID: 4 }, i32(4));
    roundTrip(PROCEDURES.connectDomainEventCallbackDeregisterAny, { callbackID: 3 }, i32(3), undefined, Buffer.alloc(0));
    roundTrip(PROCEDURES.qemuDomainMonitorCommand, { dom: DOM, cmd: 'info block', flags: 1 }, cat(domBytes, str('info block'), u32(1)), { result: 'ok' }, str('ok'));
  });

  it('decode the events qbackup registers for', () => {
    const jobCompleted = cat(i32(3), domBytes, u32(1), str('type'), i32(1), i32(3));
    assert.deepEqual(EVENTS.get(LIBVIRT.REMOTE_PROC_DOMAIN_EVENT_CALLBACK_JOB_COMPLETED)?.decode(new XdrReader(jobCompleted)), {
      kind: 'job-completed',
      callbackID: 3,
      dom: DOM,
      params: [{ field: 'type', type: 'int', value: 3 }],
    });
    const blockJob2 = encodeXdr(EVENT_BODIES.blockJob2Msg, { callbackID: 4, dom: DOM, dst: 'sda', type: 1, status: 0 });
    assert.deepEqual(blockJob2, cat(i32(4), domBytes, str('sda'), i32(1), i32(0)));
    assert.deepEqual(EVENTS.get(LIBVIRT.REMOTE_PROC_DOMAIN_EVENT_BLOCK_JOB_2)?.decode(new XdrReader(blockJob2)), { kind: 'block-job-2', callbackID: 4, dom: DOM, dst: 'sda', type: 1, status: 0 });
  });
});

describe('libvirt errors', () => {
  const error = (code: number, message: string | undefined) => ({
    code,
    domain: 10,
    message,
    level: 2,
    dom: undefined,
    str1: message,
    str2: undefined,
    str3: undefined,
    int1: -1,
    int2: -1,
    net: undefined,
  });

  it('remote_error decodes from its bytes', () => {
    const bytes = cat(i32(42), i32(10), u32(1), str("Domain not found: no domain with matching name 'x'"), i32(2), u32(0), u32(1), str('s1'), u32(0), u32(0), i32(-1), i32(-1), u32(0));
    assert.deepEqual(decode(remoteError, bytes), { ...error(42, "Domain not found: no domain with matching name 'x'"), str1: 's1' });
  });

  it('map to qbackup codes and keep libvirt message', () => {
    const cases: Array<[number, string]> = [
      [LIBVIRT.VIR_ERR_NO_DOMAIN, 'DOMAIN_NOT_FOUND'],
      [LIBVIRT.VIR_ERR_NO_DOMAIN_CHECKPOINT, 'CHECKPOINT_NOT_FOUND'],
      [LIBVIRT.VIR_ERR_NO_DOMAIN_BACKUP, 'JOB_NOT_FOUND'],
      [LIBVIRT.VIR_ERR_XML_ERROR, 'INVALID_XML'],
      [LIBVIRT.VIR_ERR_OPERATION_UNSUPPORTED, 'NOT_SUPPORTED'],
      [LIBVIRT.VIR_ERR_ACCESS_DENIED, 'LIBVIRT_ACCESS_DENIED'],
      [LIBVIRT.VIR_ERR_AGENT_UNRESPONSIVE, 'GUEST_AGENT'],
      [LIBVIRT.VIR_ERR_OPERATION_INVALID, 'LIBVIRT_ERROR'],
    ];
    for (const [code, ours] of cases) {
      const err = new LibvirtCallError('domain-x', error(code, 'requested operation is not valid: domain is not running'));
      assert.equal(err.code, ours, `libvirt error ${code}`);
      assert.equal(err.message, 'Requested operation is not valid: domain is not running');
      assert.equal(err.libvirtMessage, 'requested operation is not valid: domain is not running');
    }
    assert.equal(new LibvirtCallError('domain-x', error(1, undefined)).message, 'libvirt refused domain-x (error 1) without a message');
  });
});

describe('capabilities', () => {
  it("give the DAC label QEMU runs under (instant restore lets that user reach its socket and overlays)", () => {
    const caps = `<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel><secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+108</baselabel><baselabel type='qemu'>+64055:+108</baselabel></secmodel></host></capabilities>`;
    assert.deepEqual(dacBaseLabel(caps), { uid: 64055, gid: 108 });
    assert.equal(dacBaseLabel('<capabilities><host><secmodel><model>none</model></secmodel></host></capabilities>'), undefined);
  });
});
