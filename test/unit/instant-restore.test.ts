// Unit tests for instant restore without QEMU: the NBD <backingStore> a
// restored disk declares (parsed, formatted, dropped, refused in other
// shapes), the QEMU nodes it becomes (an explicit nbd node, never a backing
// file from an image header), the plan (names, UUIDs, overlays, left-out
// disks), and the server's command line.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { refuseUnsupportedDisk } from '../../src/domain/images.js';
import { isQbackupError } from '../../src/errors.js';
import { formatDomainXml, parseDomainXml } from '../../src/model/definition-xml.js';
import { backingNodeSpec, blockdevSpecs } from '../../src/qemu/nodes.js';
import { buildQemuArgs } from '../../src/qemu/process.js';
import { serverArgv } from '../../src/instant/server.js';
import { planInstantRestore, zeroRanges } from '../../src/instant/restore.js';
import type { Manifest } from '../../src/repository/manifest.js';

const NBD_DISK = `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/o/sda.qcow2'/>
  <backingStore type='network'><format type='raw'/><source protocol='nbd' name='sda'><host transport='unix' socket='/s/backup.sock'/></source></backingStore>
  <target dev='sda' bus='scsi'/></disk>`;

function domain(disks: string, name = 'vm', uuid = '11111111-2222-3333-4444-555555555555'): string {
  return `<domain type='kvm'><name>${name}</name><uuid>${uuid}</uuid><memory unit='MiB'>64</memory><devices>${disks}<interface type='user'/></devices></domain>`;
}

describe('NBD backingStore in domain XML', () => {
  it('parses an NBD export on a unix socket as nbdBacking, not as a refused chain', () => {
    const d = parseDomainXml(domain(NBD_DISK)).disks[0];
    assert.deepEqual(d?.nbdBacking, { socket: '/s/backup.sock', exportName: 'sda' });
    assert.equal(d?.backingStore, undefined);
    assert.doesNotThrow(() => refuseUnsupportedDisk('vm', d ?? assert.fail()));
  });

  it('formats it back, and drops only it when the backing goes', () => {
    const def = parseDomainXml(domain(NBD_DISK));
    const again = parseDomainXml(formatDomainXml(def));
    assert.deepEqual(again.disks[0]?.nbdBacking, def.disks[0]?.nbdBacking);
    const { nbdBacking: _n, ...plain } = def.disks[0] ?? assert.fail();
    const xml = formatDomainXml({ ...def, disks: [plain] });
    assert.doesNotMatch(xml, /backingStore/);
    assert.match(xml, /<interface type="user"\/>/, 'unknown elements stay');
    assert.equal(parseDomainXml(xml).disks[0]?.nbdBacking, undefined);
  });

  it('refuses NBD over TCP, a non-raw NBD backing, a file chain, and an NBD backing under a raw or read-only disk', () => {
    const tcp = NBD_DISK.replace(`<host transport='unix' socket='/s/backup.sock'/>`, `<host name='h' port='10809'/>`);
    assert.throws(() => parseDomainXml(domain(tcp)), (e: unknown) => isQbackupError(e, 'INVALID_XML') && /unix socket/.test((e as Error).message));
    assert.throws(() => parseDomainXml(domain(NBD_DISK.replace(`<format type='raw'/>`, `<format type='qcow2'/>`))), (e: unknown) => isQbackupError(e, 'INVALID_XML'));
    const chain = parseDomainXml(domain(NBD_DISK.replace(/<backingStore[\s\S]*<\/backingStore>/, `<backingStore type='file'><format type='raw'/><source file='/etc/shadow'/></backingStore>`))).disks[0];
    assert.throws(() => refuseUnsupportedDisk('vm', chain ?? assert.fail()), (e: unknown) => isQbackupError(e, 'NOT_SUPPORTED'));
    const rawDisk = parseDomainXml(domain(NBD_DISK.replace(`type='qcow2'`, `type='raw'`))).disks[0];
    assert.throws(() => refuseUnsupportedDisk('vm', rawDisk ?? assert.fail()), /writable qcow2/);
  });
});

describe('QEMU nodes of an NBD-backed disk', () => {
  const disk = { diskId: 'dk0000000a', target: 'sda', source: '/o/sda.qcow2', format: 'qcow2', bus: 'scsi', readonly: false, nbdBacking: { socket: '/s/b.sock', exportName: 'sda' } } as const;

  it('is an explicit read-only nbd node that the qcow2 node names as its backing', () => {
    const nbd = backingNodeSpec(disk);
    assert.deepEqual({ ...nbd, 'reconnect-delay': undefined }, { driver: 'nbd', 'node-name': 'dk0000000a-nbd', server: { type: 'unix', path: '/s/b.sock' }, export: 'sda', 'read-only': true, 'reconnect-delay': undefined });
    assert.ok(typeof nbd?.['reconnect-delay'] === 'number' && nbd['reconnect-delay'] > 0, 'guest reads wait for a restarted server');
    assert.equal(blockdevSpecs(disk)[1]['backing'], 'dk0000000a-nbd');
    const { nbdBacking: _n, ...plain } = disk;
    assert.equal(backingNodeSpec(plain), undefined);
    assert.equal(blockdevSpecs(plain)[1]['backing'], null);
  });

  it('comes before the qcow2 node on the command line', () => {
    const args = buildQemuArgs({ name: 'vm', uuid: '00000000-0000-0000-0000-000000000001', memoryKiB: 65536, vcpus: 1, disks: [disk], qmpSocket: '/q', logFile: '/l', accel: 'tcg' });
    const drivers = args.filter((_, i) => args[i - 1] === '-blockdev').map((a) => (JSON.parse(a) as { driver: string }).driver);
    assert.deepEqual(drivers, ['nbd', 'file', 'qcow2']);
  });
});

describe('planInstantRestore', () => {
  const xml = domain(
    `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='sda' bus='scsi'/></disk>
     <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/v/b.raw'/><target dev='vdb' bus='virtio'/><serial>S1</serial></disk>
     <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/v/iso.raw'/><target dev='sdc' bus='scsi'/><readonly/></disk>`,
  );
  const m = {
    id: '20261129T120000.000Z-abcd', domain: 'vm', domainXml: xml,
    disks: [{ target: 'sda', virtualSize: 1 << 30 }, { target: 'vdb', virtualSize: 8 << 20 }],
  } as unknown as Manifest;

  it('makes every backed-up disk a writable qcow2 overlay over the export of its target; other disks are left out', () => {
    const plan = planInstantRestore(m, { name: 'vm', overlayDir: '/r', socket: '/s/b.sock', uuidTaken: false });
    assert.deepEqual(plan.dropped, ['sdc']);
    assert.deepEqual(plan.disks, [
      { target: 'sda', sizeBytes: 1 << 30, overlay: '/r/sda.qcow2', jobId: 'instant-sda' },
      { target: 'vdb', sizeBytes: 8 << 20, overlay: '/r/vdb.qcow2', jobId: 'instant-vdb' },
    ]);
    const [a, b] = plan.definition.disks;
    assert.deepEqual([a?.source, a?.format, a?.nbdBacking], ['/r/sda.qcow2', 'qcow2', { socket: '/s/b.sock', exportName: 'sda' }]);
    assert.deepEqual([b?.bus, b?.serial, b?.format, b?.nbdBacking?.exportName], ['virtio', 'S1', 'qcow2', 'vdb']);
    assert.equal(plan.definition.uuid, '11111111-2222-3333-4444-555555555555', 'the same domain keeps its UUID');
    const reparsed = parseDomainXml(formatDomainXml(plan.definition));
    assert.deepEqual(reparsed.disks.map((d) => d.target), ['sda', 'vdb']);
  });

  it('gives a renamed copy, or a UUID already in use, a new UUID', () => {
    const renamed = planInstantRestore(m, { name: 'copy', overlayDir: '/r', socket: '/s', uuidTaken: false });
    assert.equal(renamed.definition.name, 'copy');
    assert.notEqual(renamed.definition.uuid, '11111111-2222-3333-4444-555555555555');
    assert.notEqual(planInstantRestore(m, { name: 'vm', overlayDir: '/r', socket: '/s', uuidTaken: true }).definition.uuid, '11111111-2222-3333-4444-555555555555');
  });
});

describe('the backup server command line', () => {
  it('asks serve-backup for exactly the recorded backup, disks and socket, without block status (the overlays mark the holes)', () => {
    const argv = serverArgv({ repo: '/repo', domain: 'vm', backupId: 'B', disks: ['sda', 'vdb'], socket: '/s/b.sock', outFile: '/o', logFile: '/l', command: ['qb'], stateDir: '/st', environment: {} });
    assert.deepEqual(argv, ['qb', '--state-dir', '/st', '--json', 'serve-backup', '--repo', '/repo', 'vm', '--backup', 'B', '--disk', 'sda', '--disk', 'vdb', '--socket', '/s/b.sock', '--no-block-status']);
  });
});

describe('zeroRanges', () => {
  it('merges runs of zero chunks into byte ranges, the last one cut at the disk size', () => {
    const chunk = 64 * 1024;
    const ids = Buffer.alloc(6 * 32);
    for (const slot of [1, 4]) ids.fill(0xab, slot * 32, slot * 32 + 32); // data at slots 1 and 4
    const size = 5 * chunk + 4096; // a partial sixth chunk, zero
    assert.deepEqual(zeroRanges({ kind: 'full', chunkSize: chunk, virtualSize: size, ids }), [
      { offset: 0, length: chunk },
      { offset: 2 * chunk, length: 2 * chunk },
      { offset: 5 * chunk, length: 4096 },
    ]);
    ids.fill(0xcd);
    assert.deepEqual(zeroRanges({ kind: 'full', chunkSize: chunk, virtualSize: size, ids }), []);
  });
});

