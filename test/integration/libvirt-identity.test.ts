// Against the real libvirtd: a backup's parent is a backup of the same domain
// (libvirt's domain UUID), and a checkpoint whose bitmap is gone from an
// image is still deleted.
//
// Identity: a domain is undefined and another (new UUID, other data) is
// defined under its name on the same image path, carrying the old
// checkpoint's metadata and an empty bitmap of its name (metadata left behind
// or copied between hosts). Its backup is full, the reason naming the other
// domain's UUID, and restores to its own bytes, not the other's. A domain of
// our own QEMU driver under the same name, backing up into the same
// repository, does the same; each domain's next backup is incremental on its
// own last one, whichever is newest.
//
// Missing bitmap: an admin removes our bitmap from an image (`qemu-img bitmap
// --remove` while shut off, `block-dirty-bitmap-remove` through the monitor
// while running); deleting the checkpoint works, libvirt keeps one qb-
// checkpoint, and the next backup is full with the reason and restores
// byte-exact.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LIBVIRT, LibvirtClient } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { TestEnv } from '../helpers/env.js';
import { createTestDisks, guestWrite, libvirtTestDir, removeTestDomain, startLibvirt, testDomainName, testDomainXml, tool, virsh, type LibvirtDaemon, type TestDisk } from '../helpers/libvirt.js';

const MiB = 1 << 20;
const DISK_BYTES = 4 * MiB;

describe('libvirt: backup parents are of the same domain; checkpoints whose bitmap is gone are deleted', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  /** Our own QEMU driver, beside libvirt. */
  let own: TestEnv;
  const { dir, remove } = libvirtTestDir();
  const names: string[] = [];

  const restoreBytes = async (name: string, repo: string, m: Manifest): Promise<Buffer> => {
    const to = mkdtempSync(join(work, 'restore-'));
    try {
      const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw' });
      assert.equal(r.disks.length, 1);
      return readFileSync(r.disks[0]?.file ?? '');
    } finally {
      rmSync(to, { recursive: true, force: true });
    }
  };
  const ourCheckpoints = async (name: string): Promise<string[]> => (await virsh(['checkpoint-list', name, '--name'])).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qb-'));
  /** Writes into a shut-off domain's image (as a guest would have) and into the model. */
  const writeImage = async (disk: TestDisk, model: Buffer, pattern: number, offset: number, length: number): Promise<void> => {
    model.fill(pattern, offset, offset + length);
    await tool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${pattern.toString(16)} ${offset} ${length}`, disk.file]);
  };

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvid-'));
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    own = new TestEnv('qbt-lvid-own-');
  });

  after(async () => {
    qb?.close();
    await qb?.driver.close?.();
    await own?.cleanup();
    for (const n of names) if (client !== undefined) await removeTestDomain(client, n).catch(() => undefined);
    await client?.close();
    await daemon?.stop();
    remove();
    if (work !== undefined) rmSync(work, { recursive: true, force: true });
  });

  it('another domain defined under the same name is backed up full, naming the other UUID, and restores to its own bytes', async () => {
    const name = testDomainName('ident');
    names.push(name);
    const repo = join(work, 'repo-ident');
    const [disk] = await createTestDisks(dir, ['sda'], DISK_BYTES);
    assert.ok(disk !== undefined);
    const modelA = Buffer.alloc(DISK_BYTES);
    await writeImage(disk, modelA, 0xa1, 0, MiB);
    const domA = await client.defineXml(testDomainXml(name, [disk]));
    const uuidA = (await qb.driver.describeDomain(name)).uuid;
    const first = await qb.repository.backup(name, { repo });
    assert.equal(first.uuid, uuidA);
    assert.equal(first.connection, daemon.uri);
    assert.ok((await restoreBytes(name, repo, first)).equals(modelA));
    const checkpointXml = await virsh(['checkpoint-dumpxml', name, first.checkpoint, '--no-domain']);
    await client.undefine(domA, LIBVIRT.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA);

    // Another domain: a new image at the same path (same inode, as qemu-img create leaves it), other data,
    // and the old checkpoint's metadata and an (empty) bitmap of its name.
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', disk.file, String(DISK_BYTES)]);
    const modelB = Buffer.alloc(DISK_BYTES);
    await writeImage(disk, modelB, 0xb2, 2 * MiB, MiB);
    await tool('qemu-img', ['bitmap', '--add', disk.file, first.checkpoint]);
    await client.defineXml(testDomainXml(name, [disk]));
    const uuidB = (await qb.driver.describeDomain(name)).uuid;
    assert.notEqual(uuidB, uuidA);
    const cpFile = join(work, 'checkpoint.xml');
    writeFileSync(cpFile, checkpointXml);
    await virsh(['checkpoint-create', name, cpFile, '--redefine']);

    const second = await qb.repository.backup(name, { repo });
    assert.equal(second.uuid, uuidB);
    assert.equal(second.disks[0]?.level, 'full');
    assert.match(String(second.disks[0]?.fullReason), new RegExp(`the last backup of "${name}" in the repository \\("${first.id}"\\) was of another domain \\(UUID ${uuidA}\\), and this one is UUID ${uuidB}`));
    assert.ok((await restoreBytes(name, repo, second)).equals(modelB), 'the backup holds the new domain\'s bytes');
    assert.ok((await restoreBytes(name, repo, first)).equals(modelA), 'the old domain\'s backup still restores');
    // The old domain's checkpoint (carried over) is not ours to keep for this domain: one qb- checkpoint stays, the new one.
    assert.deepEqual(await ourCheckpoints(name), [second.checkpoint]);

    // The next backup of the same domain is incremental from its own.
    await writeImage(disk, modelB, 0xb3, 3 * MiB, 64 << 10);
    const third = await qb.repository.backup(name, { repo });
    assert.equal(third.disks[0]?.level, 'incremental', String(third.disks[0]?.fullReason));
    assert.ok((await restoreBytes(name, repo, third)).equals(modelB));

    // Our own driver's domain of the same name backs up into the same repository: full, naming the libvirt domain; and
    // each domain's next backup is incremental on its own last one, though the other's is newer.
    const ownDisk = own.path('own-sda.qcow2');
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', ownDisk, String(DISK_BYTES)]);
    const modelOwn = Buffer.alloc(DISK_BYTES);
    await writeImage({ target: 'sda', file: ownDisk }, modelOwn, 0xe1, MiB, MiB);
    await own.qb.domains.define(own.domainXml(name, [{ target: 'sda', file: ownDisk }]));
    const uuidOwn = (await own.qb.driver.describeDomain(name)).uuid;
    const ownFirst = await own.qb.repository.backup(name, { repo });
    assert.equal(ownFirst.connection, 'qbackup:///');
    assert.equal(ownFirst.disks[0]?.level, 'full');
    assert.match(String(ownFirst.disks[0]?.fullReason), new RegExp(`\\("${third.id}"\\) was of another domain \\(UUID ${uuidB} through ${daemon.uri}\\), and this one is UUID ${uuidOwn}`));
    assert.ok((await restoreBytes(name, repo, ownFirst)).equals(modelOwn));
    await writeImage(disk, modelB, 0xb4, 0, 4096);
    const fourth = await qb.repository.backup(name, { repo });
    assert.equal(fourth.disks[0]?.level, 'incremental', String(fourth.disks[0]?.fullReason));
    assert.ok((await restoreBytes(name, repo, fourth)).equals(modelB));
    await writeImage({ target: 'sda', file: ownDisk }, modelOwn, 0xe2, 0, 4096);
    const ownSecond = await own.qb.repository.backup(name, { repo });
    assert.equal(ownSecond.disks[0]?.level, 'incremental', String(ownSecond.disks[0]?.fullReason));
    assert.ok((await restoreBytes(name, repo, ownSecond)).equals(modelOwn));

    const listed = await qb.repository.list({ repo }, name);
    assert.deepEqual(listed.map((m) => m.uuid), [uuidA, uuidB, uuidB, uuidOwn, uuidB, uuidOwn]);
    assert.deepEqual(listed.map((m) => m.connection), [daemon.uri, daemon.uri, daemon.uri, 'qbackup:///', daemon.uri, 'qbackup:///']);
  });

  it('a shut-off domain whose image lost our bitmap: the next backup is full with the reason and deletes the old checkpoint', async () => {
    const name = testDomainName('nobitmap-off');
    names.push(name);
    const repo = join(work, 'repo-off');
    const sub = join(dir, 'off');
    mkdirSync(sub, { mode: 0o755 });
    const [disk] = await createTestDisks(sub, ['sda'], DISK_BYTES);
    assert.ok(disk !== undefined);
    const model = Buffer.alloc(DISK_BYTES);
    await writeImage(disk, model, 0xc1, MiB, MiB);
    await client.defineXml(testDomainXml(name, [disk]));
    const first = await qb.repository.backup(name, { repo });
    assert.ok((await restoreBytes(name, repo, first)).equals(model));
    await tool('qemu-img', ['bitmap', '--remove', disk.file, first.checkpoint]);
    await writeImage(disk, model, 0xc2, 0, 64 << 10);
    // The next backup is full with the reason, and deletes the previous checkpoint (its bitmap gone): one qb- checkpoint stays.
    const second = await qb.repository.backup(name, { repo });
    assert.equal(second.disks[0]?.level, 'full');
    assert.match(String(second.disks[0]?.fullReason), new RegExp(`BITMAP_MISSING: image ".*sda.qcow2" of disk "sda" has no bitmap "${first.checkpoint}"`));
    assert.ok((await restoreBytes(name, repo, second)).equals(model));
    assert.deepEqual(await ourCheckpoints(name), [second.checkpoint]);
    // The one after it is incremental again.
    await writeImage(disk, model, 0xc3, 3 * MiB, 4096);
    const third = await qb.repository.backup(name, { repo });
    assert.equal(third.disks[0]?.level, 'incremental', String(third.disks[0]?.fullReason));
    assert.ok((await restoreBytes(name, repo, third)).equals(model));
    assert.deepEqual(await ourCheckpoints(name), [third.checkpoint]);
  });

  it('a running domain whose image lost our bitmap: the next backup is full with the reason; its checkpoint is deleted, running or shut off', async () => {
    const name = testDomainName('nobitmap-run');
    names.push(name);
    const repo = join(work, 'repo-run');
    const sub = join(dir, 'run');
    mkdirSync(sub, { mode: 0o755 });
    const [disk] = await createTestDisks(sub, ['sda'], DISK_BYTES);
    assert.ok(disk !== undefined);
    const model = Buffer.alloc(DISK_BYTES);
    const dom = await client.defineXml(testDomainXml(name, [disk]));
    await client.create(dom, LIBVIRT.VIR_DOMAIN_START_PAUSED);
    const write = async (pattern: number, offset: number, length: number): Promise<void> => {
      model.fill(pattern, offset, offset + length);
      await guestWrite(client, dom, 'sda', `write -P 0x${pattern.toString(16)} ${offset} ${length}`);
    };
    /** What an admin does through the monitor: removes the bitmap from the image's node. */
    const removeLiveBitmap = async (bitmap: string): Promise<void> => {
      const nodes = JSON.parse(await client.qemuMonitorCommand(dom, JSON.stringify({ execute: 'query-named-block-nodes', arguments: { flat: true } }))) as { return: Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }> };
      const node = nodes.return.find((n) => (n['dirty-bitmaps'] ?? []).some((b) => b.name === bitmap));
      assert.ok(node !== undefined, `QEMU has bitmap ${bitmap}`);
      const reply = JSON.parse(await client.qemuMonitorCommand(dom, JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node: node['node-name'], name: bitmap } }))) as { error?: unknown };
      assert.equal(reply.error, undefined);
    };
    await write(0xd1, MiB, MiB);
    const first = await qb.repository.backup(name, { repo });
    assert.ok((await restoreBytes(name, repo, first)).equals(model));
    await removeLiveBitmap(first.checkpoint);
    await write(0xd2, 0, 64 << 10);
    const second = await qb.repository.backup(name, { repo });
    assert.equal(second.disks[0]?.level, 'full');
    // libvirt refused the incremental when the backup began; its sentence is the reason.
    assert.match(String(second.disks[0]?.fullReason), new RegExp(`BITMAP_INCONSISTENT: libvirt refused the incremental of disk "sda" since checkpoint "${first.checkpoint}": checkpoint inconsistent: missing or broken bitmap '${first.checkpoint}' for disk 'sda'`));
    assert.ok((await restoreBytes(name, repo, second)).equals(model));
    // The backup deleted the previous checkpoint, whose bitmap was gone.
    assert.deepEqual(await ourCheckpoints(name), [second.checkpoint]);

    // Deleted directly while running, its bitmap gone: no error, and the next backup is full with the reason.
    await removeLiveBitmap(second.checkpoint);
    await qb.driver.deleteCheckpoint(name, second.checkpoint);
    assert.deepEqual(await ourCheckpoints(name), []);
    await write(0xd3, 2 * MiB, 4096);
    const third = await qb.repository.backup(name, { repo });
    assert.equal(third.disks[0]?.level, 'full');
    assert.match(String(third.disks[0]?.fullReason), new RegExp(`checkpoint "${second.checkpoint}" of backup "${second.id}" no longer exists`));
    assert.ok((await restoreBytes(name, repo, third)).equals(model));

    // And shut off, the bitmap removed from the image: the same.
    await qb.driver.shutdownDomain(name);
    await tool('qemu-img', ['bitmap', '--remove', disk.file, third.checkpoint]);
    await qb.driver.deleteCheckpoint(name, third.checkpoint);
    assert.deepEqual(await ourCheckpoints(name), []);
  });
});
