// Hostile bytes from a libvirt daemon, seeded: every reply decoder of the
// procedure table and every event decoder, fed valid replies with random
// corruption (bit flips, truncation, extra bytes, huge counts), and the
// frame parser fed random streams in random pieces, must either decode or
// throw LibvirtProtocolError: never another exception, never an allocation
// beyond the declared limits. Replay: LIBVIRT_FUZZ_SEED=N node --test dist/test/unit/libvirt-rpc-fuzz.test.js

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  EVENTS,
  LibvirtFrameParser,
  LibvirtProtocolError,
  PROCEDURES,
  XdrReader,
  encodeMessage,
  encodeXdr,
  type XdrType,
} from '../../src/drivers/libvirt/index.js';
import { randomSplit, withSeed, type Random } from './seeded.js';

const DOM = { name: 'vm1', uuid: Buffer.alloc(16, 7), id: 3 };
const CP = { name: 'c1', dom: DOM };
const PARAMS = [
  { field: 'a', type: 'int' as const, value: 1 },
  { field: 'b', type: 'ullong' as const, value: 5n },
  { field: 'c', type: 'string' as const, value: 'x' },
];

/** A valid reply body for each procedure that has one. */
const SAMPLES: Array<[string, XdrType<unknown>, unknown]> = [
  ['auth-list', PROCEDURES.authList.ret, { types: [0, 2] }],
  ['connect-list-all-domains', PROCEDURES.connectListAllDomains.ret, { domains: [DOM, DOM], ret: 2 }],
  ['domain-lookup-by-name', PROCEDURES.domainLookupByName.ret, { dom: DOM }],
  ['domain-get-xml-desc', PROCEDURES.domainGetXmlDesc.ret, { xml: '<domain/>' }],
  ['domain-get-info', PROCEDURES.domainGetInfo.ret, { state: 1, maxMem: 1n, memory: 1n, nrVirtCpu: 1, cpuTime: 0n }],
  ['domain-list-all-checkpoints', PROCEDURES.domainListAllCheckpoints.ret, { checkpoints: [CP], ret: 1 }],
  ['domain-get-job-stats', PROCEDURES.domainGetJobStats.ret, { type: 2, params: PARAMS }],
  ['domain-get-block-job-info', PROCEDURES.domainGetBlockJobInfo.ret, { found: 1, type: 2, bandwidth: 0n, cur: 1n, end: 2n }],
  ['qemu-domain-monitor-command', PROCEDURES.qemuDomainMonitorCommand.ret, { result: 'ok' }],
] as Array<[string, XdrType<unknown>, unknown]>;


function corrupt(random: Random, bytes: Buffer): Buffer {
  // Always a fresh buffer, so callers may keep the result.
  const out = Buffer.from(bytes);
  switch (random.int(4)) {
    case 0:
      for (let i = 0; i < 1 + random.int(4) && out.length > 0; i++) {
        const at = random.int(out.length);
        out[at] = (out[at] ?? 0) ^ (1 << random.int(8));
      }
      return out;
    case 1:
      return out.subarray(0, random.int(out.length + 1));
    case 2:
      return Buffer.concat([out, random.bytes(1 + random.int(8))]);
    default: {
      // A 4-byte word (often a count or length) replaced with a large value.
      if (out.length >= 4) out.writeUInt32BE(random.pick([0xffffffff, 0x7fffffff, 1 << 20, 1 << 24, 65]), 4 * random.int(Math.floor(out.length / 4)));
      return out;
    }
  }
}

function decodesOrRefuses(codec: XdrType<unknown>, bytes: Buffer): void {
  try {
    const r = new XdrReader(bytes);
    codec.decode(r);
    r.end('fuzzed body');
  } catch (err) {
    if (!(err instanceof LibvirtProtocolError)) throw err;
  }
}

describe('libvirt RPC decoders (seeded)', () => {
  it('decode corrupted replies and events or refuse them as protocol errors', () => {
    withSeed('LIBVIRT_FUZZ_SEED', 20261206, 'libvirt-rpc-fuzz.test.js', (random) => {
      const events = [...EVENTS.values()];
      for (let i = 0; i < 3000; i++) {
        const [, codec, value] = random.pick(SAMPLES);
        decodesOrRefuses(codec, corrupt(random, encodeXdr(codec, value)));
        decodesOrRefuses(random.pick(events), random.bytes(random.int(96)));
      }
    });
  });

  it('frame parser: random streams in random pieces end in whole frames or one protocol error', () => {
    withSeed('LIBVIRT_FUZZ_SEED', 20261206, 'libvirt-rpc-fuzz.test.js', (random) => {
      const header = { program: 0x20008086, version: 1, procedure: 1, type: 1, serial: 1, status: 0 };
      for (let i = 0; i < 500; i++) {
        const valid = Array.from({ length: 1 + random.int(4) }, () => encodeMessage({ ...header, serial: random.int(1000) }, random.bytes(random.int(64))));
        let stream: Buffer = Buffer.concat(valid);
        if (random.chance(0.5)) stream = corrupt(random, stream);
        let frames = 0;
        let errors = 0;
        const parser = new LibvirtFrameParser({
          onFrame: (f) => {
            assert.ok(f.body.length <= stream.length);
            frames += 1;
          },
          onError: (e) => {
            assert.ok(e instanceof LibvirtProtocolError);
            errors += 1;
          },
        });
        for (const piece of randomSplit(random, stream, 40)) parser.push(piece);
        assert.ok(errors <= 1, 'at most one error is reported');
        if (errors === 0) assert.ok(frames <= valid.length + 1);
      }
    });
  });
});
