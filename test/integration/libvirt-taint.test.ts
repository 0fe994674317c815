// Against the real libvirtd: backing up a running domain never taints it.
// libvirt marks a domain on which its monitor passthrough was used as tainted
// ("custom-monitor"), which support tools treat as unsupported; a normal full
// and incremental must use libvirt's own API only. The oracle is libvirt's
// own record of taints (virDomainGetMessages, shown by `virsh dominfo`),
// read after the backups (no timing); the test then taints the domain itself
// to show the oracle sees it.
//
// The same domain then loses one disk's checkpoint bitmap in QEMU (an admin's
// `block-dirty-bitmap-remove`): libvirt refuses that disk's incremental when
// the backup begins, so that disk is backed up full with libvirt's sentence
// as the reason and the other incrementally; every backup restores
// byte-exact, and the refused begin left nothing behind (one qb- checkpoint,
// no job, no private directory).

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LIBVIRT, LibvirtClient } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { createTestDisks, guestWrite, libvirtTestDir, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, tool, virsh, type LibvirtDaemon } from '../helpers/libvirt.js';

const MiB = 1 << 20;
const DISK_BYTES = 4 * MiB;

describe('libvirt: backups of a running domain leave it untainted; a disk whose bitmap QEMU lost is full with libvirt\'s reason', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  const { dir, remove } = libvirtTestDir();
  const names: string[] = [];

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvtaint-'));
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
  });

  after(() => tearDownLibvirtTest({ qb, client, domains: names, daemon, remove, dirs: [work] }));

  it('full and incremental leave the domain untainted; then one disk\'s lost bitmap makes that disk full, the other incremental', async () => {
    const name = testDomainName('taint');
    names.push(name);
    const repo = join(work, 'repo');
    const sub = join(dir, 'taint');
    mkdirSync(sub, { mode: 0o755 });
    const disks = await createTestDisks(sub, ['sda', 'sdb'], DISK_BYTES);
    const models = new Map(disks.map((d) => [d.target, Buffer.alloc(DISK_BYTES)] as const));
    const model = (target: string): Buffer => {
      const m = models.get(target);
      assert.ok(m !== undefined);
      return m;
    };
    // Data written into the images before the domain runs (a guest write would need the passthrough, which taints).
    for (const [i, d] of disks.entries()) {
      model(d.target).fill(0x31 + i, MiB, 2 * MiB);
      await tool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${(0x31 + i).toString(16)} ${MiB} ${MiB}`, d.file]);
    }
    const dom = await client.defineXml(testDomainXml(name, disks));
    await client.create(dom, LIBVIRT.VIR_DOMAIN_START_PAUSED);

    const restored = async (m: Manifest): Promise<Map<string, Buffer>> => {
      const to = mkdtempSync(join(work, 'restore-'));
      try {
        const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw' });
        return new Map(r.disks.map((d) => [d.target, readFileSync(d.file)] as const));
      } finally {
        rmSync(to, { recursive: true, force: true });
      }
    };
    const assertRestores = async (m: Manifest): Promise<void> => {
      const got = await restored(m);
      for (const d of disks) assert.ok(got.get(d.target)?.equals(model(d.target)), `backup ${m.id}: disk ${d.target} restores to the disk's bytes at backup time`);
    };
    const level = (m: Manifest, target: string): string | undefined => m.disks.find((d) => d.target === target)?.level;
    const reason = (m: Manifest, target: string): string => String(m.disks.find((d) => d.target === target)?.fullReason);
    /** libvirt's own record of the domain's taints (virDomainGetMessages). */
    const taints = async (): Promise<string[]> => (await virsh(['dominfo', name])).split('\n').filter((l) => /tainted:/i.test(l));
    const ourCheckpoints = async (): Promise<string[]> => (await virsh(['checkpoint-list', name, '--name'])).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qb-'));
    const privateDirs = (): string[] => readdirSync(tmpdir()).filter((f) => f.startsWith(`qbackup-lv-${process.pid}-`));

    assert.deepEqual(await taints(), [], 'the domain starts untainted');
    const first = await qb.repository.backup(name, { repo });
    assert.deepEqual(first.disks.map((d) => d.level), ['full', 'full']);
    await assertRestores(first);
    const second = await qb.repository.backup(name, { repo });
    assert.deepEqual(second.disks.map((d) => d.level), ['incremental', 'incremental'], second.disks.map((d) => d.fullReason).join('; '));
    await assertRestores(second);
    assert.deepEqual(await taints(), [], 'a full and an incremental of a running domain leave it untainted');

    // The oracle sees a taint: what an admin does through the monitor (remove sdb's bitmap from its image's node), then guest writes.
    const sdb = disks[1];
    assert.ok(sdb !== undefined);
    const nodes = JSON.parse(await client.qemuMonitorCommand(dom, JSON.stringify({ execute: 'query-named-block-nodes', arguments: { flat: true } }))) as { return: Array<{ 'node-name': string; drv: string; file: string; 'dirty-bitmaps'?: Array<{ name: string }> }> };
    const node = nodes.return.find((n) => n.drv === 'qcow2' && n.file === sdb.file);
    assert.ok(node !== undefined && (node['dirty-bitmaps'] ?? []).some((b) => b.name === second.checkpoint), `QEMU's node of ${sdb.file} has bitmap ${second.checkpoint}`);
    const reply = JSON.parse(await client.qemuMonitorCommand(dom, JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node: node['node-name'], name: second.checkpoint } }))) as { error?: unknown };
    assert.equal(reply.error, undefined);
    assert.ok((await taints()).some((l) => /custom monitor/i.test(l)), 'libvirt records the passthrough as a taint');
    for (const [i, d] of disks.entries()) {
      model(d.target).fill(0x41 + i, 3 * MiB, 3 * MiB + 64 * 1024);
      await guestWrite(client, dom, d.target, `write -P 0x${(0x41 + i).toString(16)} ${3 * MiB} ${64 * 1024}`);
    }

    // libvirt refuses sdb's incremental when the backup begins: sdb full with libvirt's sentence, sda incremental.
    const third = await qb.repository.backup(name, { repo });
    assert.equal(level(third, 'sda'), 'incremental', reason(third, 'sda'));
    assert.equal(level(third, 'sdb'), 'full');
    assert.match(reason(third, 'sdb'), new RegExp(`^BITMAP_INCONSISTENT: libvirt refused the incremental of disk "sdb" since checkpoint "${second.checkpoint}": checkpoint inconsistent: missing or broken bitmap '${second.checkpoint}' for disk 'sdb'$`));
    await assertRestores(third);
    // Nothing of the refused begin is left: one qb- checkpoint (the new one), no job, no private directory.
    assert.deepEqual(await ourCheckpoints(), [third.checkpoint]);
    assert.match(await virsh(['domjobinfo', name]), /Job type:\s+None/);
    assert.deepEqual(privateDirs(), []);

    // And the next backup is incremental on both disks again.
    for (const [i, d] of disks.entries()) {
      model(d.target).fill(0x51 + i, 0, 4096);
      await guestWrite(client, dom, d.target, `write -P 0x${(0x51 + i).toString(16)} 0 4096`);
    }
    const fourth = await qb.repository.backup(name, { repo });
    assert.deepEqual(fourth.disks.map((d) => d.level), ['incremental', 'incremental'], fourth.disks.map((d) => d.fullReason).join('; '));
    await assertRestores(fourth);
    assert.deepEqual(await ourCheckpoints(), [fourth.checkpoint]);
  });
});
