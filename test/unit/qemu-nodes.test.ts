// Unit tests for src/qemu/nodes.ts and the QEMU command line: every disk is
// opened with an explicit driver, and a qcow2 never follows a backing file its
// header names (backing: null), so an image cannot make QEMU open a host file.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { blockdevSpecs } from '../../src/qemu/nodes.js';
import { buildQemuArgs } from '../../src/qemu/process.js';

const qcow2 = { diskId: 'dk00000001', target: 'sda', source: '/i/a.qcow2', format: 'qcow2', bus: 'scsi', readonly: false } as const;
const raw = { diskId: 'dk00000002', target: 'vdb', source: '/i/b.raw', format: 'raw', bus: 'virtio', readonly: true } as const;

describe('blockdevSpecs', () => {
  it('opens qcow2 with backing: null and an explicit driver on both nodes', () => {
    const [file, format] = blockdevSpecs(qcow2);
    assert.equal(file['driver'], 'file');
    assert.equal(format['driver'], 'qcow2');
    assert.ok('backing' in format && format['backing'] === null, JSON.stringify(format));
  });

  it('opens raw with the raw driver (never probed) and no backing option', () => {
    const [, format] = blockdevSpecs(raw);
    assert.equal(format['driver'], 'raw');
    assert.ok(!('backing' in format));
  });

  it('puts backing: null on the QEMU command line', () => {
    const args = buildQemuArgs({ name: 'vm', uuid: '00000000-0000-0000-0000-000000000001', memoryKiB: 65536, vcpus: 1, disks: [qcow2, raw], qmpSocket: '/s', logFile: '/l', accel: 'tcg' });
    const blockdevs = args.filter((_, i) => args[i - 1] === '-blockdev').map((a) => JSON.parse(a) as Record<string, unknown>);
    assert.deepEqual(blockdevs.map((b) => [b['driver'], b['backing']]), [['file', undefined], ['qcow2', null], ['file', undefined], ['raw', undefined]]);
  });

  it('adds the console, direct kernel boot and the agent port', () => {
    const args = buildQemuArgs({
      name: 'vm', uuid: '00000000-0000-0000-0000-000000000001', memoryKiB: 262144, vcpus: 1, disks: [], qmpSocket: '/s', logFile: '/l', accel: 'tcg',
      consoleLog: '/c,1', kernelBoot: { kernel: '/k', initrd: '/i', cmdline: 'console=ttyS0' }, agentSocket: '/a',
    });
    const text = args.join(' ');
    assert.match(text, /-chardev file,id=console0,path=\/c,,1 -serial chardev:console0/);
    assert.match(text, /-kernel \/k -initrd \/i -append console=ttyS0/);
    assert.match(text, /-chardev socket,id=qga0,path=\/a,server=on,wait=off/);
    assert.match(text, /virtserialport,bus=virtio-serial0\.0,chardev=qga0,name=org\.qemu\.guest_agent\.0/);
  });
});
