// Repository backups of a shut-off libvirt domain without starting it (the
// libvirt driver opens its images in a qemu-storage-daemon of its own),
// against the real libvirtd: a two-disk domain never started is backed up
// full while libvirt's state stays shut off, no lifecycle event fires and no
// QEMU of the domain runs; after guest writes and a graceful stop, an offline
// incremental reads about the dirty clusters while `virsh start` fails on the
// images it holds; each backup restores byte-exact, libvirt lists one qb-
// checkpoint (the previous one deleted offline, its bitmap gone from the
// images), and the next online backup is incremental from the offline
// checkpoint; a cancelled backup lists nothing and changes no checkpoint; a
// qbackup killed mid-backup leaves a daemon that the next backup stops
// before it backs up incrementally; a disk resized, or whose bitmap was
// removed, while shut off is backed up full with the reason; a domain
// started just before its images are opened is refused in one sentence.

import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { LibvirtDriver } from '../../src/drivers/libvirt/driver.js';
import { OFFLINE_DIR_PREFIX, OfflineExports } from '../../src/drivers/libvirt/offline.js';
import { isQbackupError } from '../../src/errors.js';
import { Qbackup } from '../../src/qbackup.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { repoRoot } from '../helpers/env.js';
import { createTestDisks, guestWrite, libvirtTestDir, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, tool, virsh, type LibvirtDaemon, type TestDisk } from '../helpers/libvirt.js';

const execFileAsync = promisify(execFile);
const MiB = 1 << 20;
const DISK_BYTES = 8 * MiB;

/** Pids of the QEMUs libvirt runs for `name` (its command line names the guest). */
function qemuOf(name: string): number[] {
  return readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').some((a) => a.startsWith(`guest=${name},`) || a === `guest=${name}`);
    } catch {
      return false;
    }
  }).map(Number);
}

describe('backups of shut-off libvirt domains without starting them', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  let repo: string;
  let dom: LibvirtDomainRef;
  let disks: TestDisk[];
  const name = testDomainName('offline');
  const { dir, remove } = libvirtTestDir();
  const models = new Map<string, Buffer>();

  /** Writes as the guest would (the domain runs) and in the model. */
  const write = async (target: string, pattern: number, offset: number, length: number): Promise<void> => {
    models.get(target)?.fill(pattern, offset, offset + length);
    await guestWrite(client, dom, target, `write -P 0x${pattern.toString(16)} ${offset} ${length}`);
  };
  const assertRestores = async (m: Manifest): Promise<void> => {
    const to = mkdtempSync(join(work, 'restore-'));
    const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw' });
    assert.deepEqual(r.disks.map((d) => d.target).sort(), ['sda', 'sdb']);
    for (const d of r.disks) assert.ok(readFileSync(d.file).equals(models.get(d.target) ?? Buffer.alloc(0)), `disk ${d.target} of backup ${m.id} restores byte-exact`);
    rmSync(to, { recursive: true, force: true });
  };
  const ourCheckpoints = async (): Promise<string[]> => (await virsh(['checkpoint-list', name, '--name'])).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qb-'));
  const imageBitmaps = async (file: string): Promise<string[]> => {
    const info = JSON.parse(await tool('qemu-img', ['info', '-U', '--output=json', file])) as { 'format-specific': { data: { bitmaps?: Array<{ name: string }> } } };
    return (info['format-specific'].data.bitmaps ?? []).map((b) => b.name).sort();
  };
  /** No daemon directory of ours and no qemu-storage-daemon of this process stays. */
  const assertNothingLeft = (): void => {
    assert.deepEqual(readdirSync(tmpdir()).filter((n) => n.startsWith(`${OFFLINE_DIR_PREFIX}${process.pid}-`)), []);
    const children = readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
        return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === process.pid;
      } catch {
        return false;
      }
    });
    assert.deepEqual(children, [], 'no child process of this test runs');
  };
  /** Runs a backup of the shut-off domain, watching that libvirt never runs it: its state, its lifecycle events, QEMU processes. */
  const backupWatched = async (onProgress?: () => void): Promise<Manifest> => {
    const cursor = client.eventCursor();
    const seen = new Set<number>();
    const qemus: number[] = [];
    let watching = true;
    const watch = (async () => {
      while (watching) {
        seen.add((await client.getState(dom)).state);
        qemus.push(...qemuOf(name));
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    let m: Manifest;
    try {
      m = await qb.repository.backup(name, { repo, onProgress });
    } finally {
      watching = false;
      await watch;
    }
    // A lifecycle event of ours would have arrived before the answer to this call.
    await client.getState(dom);
    assert.deepEqual([...seen], [LIBVIRT.VIR_DOMAIN_SHUTOFF], 'libvirt shows the domain shut off throughout');
    assert.deepEqual(qemus, [], 'no QEMU of the domain ran');
    await assert.rejects(client.waitForEvent((e) => e.kind === 'lifecycle' && e.dom.name === name, 1, cursor), /did not arrive/);
    return m;
  };

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvoff-'));
    repo = join(work, 'repo');
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    disks = await createTestDisks(dir, ['sda', 'sdb'], DISK_BYTES);
    // Data written before the domain ever ran (as an installer would leave it).
    for (const [i, d] of disks.entries()) {
      const model = Buffer.alloc(DISK_BYTES);
      model.fill(0x30 + i, MiB, 2 * MiB);
      models.set(d.target, model);
      await tool('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${(0x30 + i).toString(16)} ${MiB} ${MiB}`, d.file]);
    }
    dom = await client.defineXml(testDomainXml(name, disks));
    await client.registerDomainEvent(LIBVIRT.VIR_DOMAIN_EVENT_ID_LIFECYCLE, dom);
  });

  after(async () => {
    await tearDownLibvirtTest({ qb, client, domains: [name], daemon, remove, dirs: [work] });
  });

  let last: Manifest;

  it('a domain never started is backed up full without starting it; its checkpoint is in libvirt and its bitmaps in the images', async () => {
    const m = await backupWatched();
    assert.deepEqual(m.disks.map((d) => d.level), ['full', 'full']);
    await assertRestores(m);
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [m.checkpoint]);
    last = m;
  });

  it('after guest writes and a graceful stop: an offline incremental reads about the dirty clusters while virsh start fails on its images; one qb- checkpoint', async () => {
    const cursor = client.eventCursor();
    await client.create(dom, LIBVIRT.VIR_DOMAIN_START_PAUSED);
    // The watch sees lifecycle events: a start is one.
    await client.waitForEvent((e) => e.kind === 'lifecycle' && e.dom.name === name && e.event === LIBVIRT.VIR_DOMAIN_EVENT_STARTED, 30_000, cursor);
    await write('sda', 0xa1, 3 * MiB, 64 << 10);
    await write('sdb', 0xb2, 5 * MiB + 4096, 4096);
    await qb.driver.shutdownDomain(name);
    let startError = '';
    const m = await backupWatched(() => {
      if (startError !== '') return;
      try {
        execFileSync('virsh', ['-c', daemon.uri, 'start', name], { stdio: ['ignore', 'ignore', 'pipe'] });
        startError = 'virsh start succeeded';
      } catch (err) {
        startError = String((err as { stderr?: Buffer }).stderr ?? err);
      }
    });
    assert.match(startError, /Failed to get "write" lock/);
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    for (const d of m.disks) assert.ok(d.bytesRead >= 4096 && d.bytesRead <= 256 << 10, `${d.target} read ${d.bytesRead} bytes`);
    await assertRestores(m);
    // The previous checkpoint was deleted offline: gone from libvirt and from the images.
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [m.checkpoint]);
    last = m;
  });

  it('the next online backup, the domain started, is incremental from the offline checkpoint', async () => {
    await client.create(dom, LIBVIRT.VIR_DOMAIN_START_PAUSED);
    await write('sdb', 0xc3, 6 * MiB, 64 << 10);
    const m = await qb.repository.backup(name, { repo });
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental'], m.disks.map((d) => String(d.fullReason)).join('; '));
    for (const d of m.disks) assert.ok(d.bytesRead <= 256 << 10, `${d.target} read ${d.bytesRead} bytes`);
    await assertRestores(m);
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    // Images a running QEMU holds are not opened: one sentence, and nothing of ours stays.
    await assert.rejects(
      OfflineExports.open({ parentDir: tmpdir(), domain: name, uuid: 'test', checkpoint: 'qb-held', disks: disks.map((d) => ({ target: d.target, source: d.file, since: undefined })) }),
      (err: unknown) => isQbackupError(err, 'DOMAIN_RUNNING') && /is in use by another process/.test((err as Error).message),
    );
    assertNothingLeft();
    await qb.driver.shutdownDomain(name);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [m.checkpoint]);
    last = m;
  });

  it('a cancelled offline backup lists nothing, leaves the previous checkpoint as it was, and no daemon', async () => {
    const ac = new AbortController();
    const before = (await qb.repository.list({ repo }, name)).length;
    await assert.rejects(qb.repository.backup(name, { repo, full: true, signal: ac.signal, onProgress: () => ac.abort() }));
    assert.equal((await qb.repository.list({ repo }, name)).length, before);
    assert.deepEqual(await ourCheckpoints(), [last.checkpoint]);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [last.checkpoint]);
    assertNothingLeft();
  });

  it('a qbackup killed during an offline backup leaves its daemon holding the images; the next backup stops it and is incremental', async () => {
    const state = join(work, 'state');
    await assert.rejects(execFileAsync(join(repoRoot, 'bin', 'qbackup'), ['--state-dir', state, 'backup', name, '--repo', repo], { env: { ...process.env, QBACKUP_CONNECT: daemon.uri, QBACKUP_CRASH_AT: 'libvirt-backup-begun' } }));
    await assert.rejects(virsh(['start', name]), /lock/);
    assert.equal((await qb.driver.checkpoints(name)).filter((c) => c.startsWith('qb-')).length, 1, 'the dead backup\'s checkpoint is discarded');
    const m = await backupWatched();
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.deepEqual(m.disks.map((d) => d.bytesRead), [0, 0]);
    await assertRestores(m);
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [m.checkpoint]);
    assert.notEqual(m.checkpoint, last.checkpoint);
    last = m;
  });

  it('coverage of a shut-off domain reads its images: a disk resized or whose bitmap was removed is backed up full with the reason', async () => {
    const sda = disks.find((d) => d.target === 'sda');
    const sdb = disks.find((d) => d.target === 'sdb');
    assert.ok(sda !== undefined && sdb !== undefined);
    await tool('qemu-img', ['resize', '-f', 'qcow2', sda.file, String(12 * MiB)]);
    const grown = Buffer.alloc(12 * MiB);
    models.get('sda')?.copy(grown);
    models.set('sda', grown);
    await tool('qemu-img', ['bitmap', '--remove', sdb.file, last.checkpoint]);
    const m = await backupWatched();
    const [a, b] = m.disks;
    assert.equal(a?.level, 'full');
    assert.match(String(a?.fullReason), /resized/);
    assert.equal(a?.virtualSize, 12 * MiB);
    assert.equal(b?.level, 'full');
    assert.match(String(b?.fullReason), new RegExp(`BITMAP_MISSING: image ".*sdb.qcow2" of disk "sdb" has no bitmap "${last.checkpoint}"`));
    await assertRestores(m);
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [m.checkpoint]);
    last = m;
  });

  it('a domain libvirt starts just before the images are opened: refused in one sentence, nothing created, nothing left', async () => {
    // A storage daemon that libvirt's start of the domain precedes.
    const wrapper = join(work, 'late-daemon.sh');
    writeFileSync(wrapper, `#!/bin/sh\nvirsh -q -c ${daemon.uri} start ${name} >/dev/null || exit 1\nexec qemu-storage-daemon "$@"\n`);
    chmodSync(wrapper, 0o755);
    const driver = new LibvirtDriver({ uri: daemon.uri, socketParentDir: tmpdir(), storageDaemon: wrapper });
    try {
      await assert.rejects(
        driver.beginPullBackup(name, { checkpoint: 'qb-late', disks: [{ target: 'sda', since: last.checkpoint }, { target: 'sdb', since: last.checkpoint }] }),
        (err: unknown) => isQbackupError(err, 'DOMAIN_RUNNING') && /libvirt started it meanwhile/.test((err as Error).message),
      );
    } finally {
      await driver.close();
    }
    assert.equal((await client.getState(dom)).state, LIBVIRT.VIR_DOMAIN_RUNNING);
    assert.deepEqual(await ourCheckpoints(), [last.checkpoint]);
    for (const d of disks) assert.deepEqual(await imageBitmaps(d.file), [last.checkpoint]);
    assertNothingLeft();
  });
});
