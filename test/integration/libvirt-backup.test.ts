// Repository backups of a domain libvirt runs, through the libvirt driver
// (qbackup --connect qemu:///system), against the real libvirtd (started by
// the tests when none runs): a full then incrementals of a running two-disk
// domain with guest writes (HMP qemu-io through libvirt's monitor
// passthrough), each restored and compared byte for byte with what the
// guest had written at backup time; bytes read ≈ the dirty clusters; a
// hot-plugged disk full, the others incremental; our checkpoint deleted by
// an admin → full with the reason; the domain restarted → incremental; a
// shut-off domain backed up without starting it → incremental; a
// resize → full with the reason; one qb- checkpoint in libvirt per
// repository; an orphaned job of a killed qbackup ended by the next backup;
// and the errors a user meets, each in one sentence.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LibvirtDriver } from '../../src/drivers/libvirt/driver.js';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { isQbackupError } from '../../src/errors.js';
import { Qbackup } from '../../src/qbackup.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { repoRoot } from '../helpers/env.js';
import { createTestDisks, guestWrite, libvirtTestDir, removeTestDomain, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, tool, virsh, type LibvirtDaemon } from '../helpers/libvirt.js';

const execFileAsync = promisify(execFile);
const MiB = 1 << 20;
const DISK_BYTES = 8 * MiB;

/** What each disk holds, as the guest wrote it. */
class DiskModel {
  bytes = Buffer.alloc(DISK_BYTES);
  write(pattern: number, offset: number, length: number): string {
    this.bytes.fill(pattern, offset, offset + length);
    return `write -P 0x${pattern.toString(16)} ${offset} ${length}`;
  }
  resize(size: number): void {
    const grown = Buffer.alloc(size);
    this.bytes.copy(grown);
    this.bytes = grown;
  }
}

describe('repository backups of libvirt domains (libvirt driver)', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  let repo: string;
  const name = testDomainName('repo');
  const { dir, remove } = libvirtTestDir();
  const models = new Map<string, DiskModel>();
  let dom: LibvirtDomainRef;

  const write = async (target: string, pattern: number, offset: number, length: number): Promise<void> => {
    const model = models.get(target);
    assert.ok(model !== undefined);
    await guestWrite(client, dom, target, model.write(pattern, offset, length));
  };

  /** Restores backup `m` to raw files and compares each with the model as it was at backup time. */
  const contentAt = new Map<string, Map<string, Buffer>>();
  const assertRestores = async (m: Manifest, expected: Map<string, Buffer>): Promise<void> => {
    contentAt.set(m.id, expected);
    const to = mkdtempSync(join(work, 'restore-'));
    const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw' });
    assert.deepEqual(r.disks.map((d) => d.target).sort(), [...expected.keys()].sort());
    for (const d of r.disks) {
      const want = expected.get(d.target);
      assert.ok(want !== undefined);
      assert.ok(readFileSync(d.file).equals(want), `disk ${d.target} of backup ${m.id} restores byte-exact`);
    }
    rmSync(to, { recursive: true, force: true });
  };

  const snapshot = (): Map<string, Buffer> => new Map([...models].map(([t, m]) => [t, Buffer.from(m.bytes)]));
  const disk = (m: Manifest, target: string) => {
    const d = m.disks.find((x) => x.target === target);
    assert.ok(d !== undefined, `backup ${m.id} has disk ${target}`);
    return d;
  };
  const ourCheckpoints = async (): Promise<string[]> => (await virsh(['checkpoint-list', name, '--name'])).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qb-'));

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvrepo-'));
    repo = join(work, 'repo');
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    const disks = await createTestDisks(dir, ['sda', 'sdb'], DISK_BYTES);
    dom = await client.create(await client.defineXml(testDomainXml(name, disks)));
    for (const t of ['sda', 'sdb']) models.set(t, new DiskModel());
  });

  after(async () => {
    await tearDownLibvirtTest({ qb, client, domains: [name], daemon, remove, dirs: [work] });
  });

  it('lists libvirt domains through the driver, with their state', async () => {
    const listed = await qb.driver.listDomains();
    assert.equal(listed.find((d) => d.name === name)?.state, 'running');
    const disks = await qb.driver.disks(name);
    assert.deepEqual(disks.map((d) => d.target), ['sda', 'sdb']);
    assert.match(await qb.driver.domainXml(name), new RegExp(`<name>${name}</name>`));
  });

  let last: Manifest;

  it('a full, then incrementals that read about what the guest wrote, each restoring byte-exact; one qb- checkpoint', async () => {
    await write('sda', 0xab, 0, 64 << 10);
    await write('sdb', 0x5c, 3 * MiB, 256 << 10);
    const full = await qb.repository.backup(name, { repo });
    assert.deepEqual(full.disks.map((d) => d.level), ['full', 'full']);
    await assertRestores(full, snapshot());
    assert.deepEqual(await ourCheckpoints(), [full.checkpoint]);

    let prev = full;
    for (let round = 1; round <= 3; round++) {
      await write('sda', 0x10 + round, round * MiB, 64 << 10);
      await write('sdb', 0x20 + round, (round + 4) * MiB + 4096, 4096);
      const inc = await qb.repository.backup(name, { repo });
      for (const target of ['sda', 'sdb']) {
        const d = disk(inc, target);
        assert.equal(d.level, 'incremental', `${target} in round ${round}: ${String(d.fullReason)}`);
        // One 64 KiB cluster dirty on each disk (two on sdb when the 4 KiB write straddles none): far below the disk.
        assert.ok(d.bytesRead >= 4096 && d.bytesRead <= 256 << 10, `${target} read ${d.bytesRead} bytes in round ${round}`);
      }
      await assertRestores(inc, snapshot());
      // The previous checkpoint is merged away once this backup committed.
      assert.deepEqual(await ourCheckpoints(), [inc.checkpoint]);
      prev = inc;
    }
    last = prev;
  });

  it('a hot-plugged disk is backed up full, the others incremental', async () => {
    const [sdc] = await createTestDisks(dir, ['sdc'], DISK_BYTES);
    assert.ok(sdc !== undefined);
    await virsh(['attach-disk', name, sdc.file, 'sdc', '--driver', 'qemu', '--subdriver', 'qcow2', '--targetbus', 'scsi', '--live']);
    models.set('sdc', new DiskModel());
    await write('sdc', 0x77, 2 * MiB, 128 << 10);
    await write('sda', 0x31, 5 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    assert.equal(disk(m, 'sdc').level, 'full');
    assert.match(String(disk(m, 'sdc').fullReason), /no earlier backup/);
    assert.equal(disk(m, 'sda').level, 'incremental');
    assert.equal(disk(m, 'sdb').level, 'incremental');
    await assertRestores(m, snapshot());
    await virsh(['detach-disk', name, 'sdc', '--live']);
    models.delete('sdc');
    last = m;
  });

  it('our checkpoint deleted by an admin: the next backup is full and says why', async () => {
    await virsh(['checkpoint-delete', name, last.checkpoint]);
    await write('sdb', 0x42, 6 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    for (const target of ['sda', 'sdb']) {
      assert.equal(disk(m, target).level, 'full');
      assert.match(String(disk(m, target).fullReason), new RegExp(`checkpoint "${last.checkpoint}".*no longer exists`));
    }
    await assertRestores(m, snapshot());
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    last = m;
  });

  it('the domain restarted between backups: incremental', async () => {
    await client.destroy(dom, LIBVIRT.VIR_DOMAIN_DESTROY_GRACEFUL);
    dom = await client.create(await client.lookupDomainByName(name));
    await write('sda', 0x55, 7 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    await assertRestores(m, snapshot());
    last = m;
  });

  it('a disk resized with virsh blockresize is backed up full with the reason, the other incremental', async () => {
    await virsh(['blockresize', name, 'sda', `${12 * MiB}B`]);
    models.get('sda')?.resize(12 * MiB);
    await write('sda', 0x66, 10 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    assert.equal(disk(m, 'sda').level, 'full');
    assert.match(String(disk(m, 'sda').fullReason), /resized/);
    assert.equal(disk(m, 'sda').virtualSize, 12 * MiB);
    assert.equal(disk(m, 'sdb').level, 'incremental');
    await assertRestores(m, snapshot());
    last = m;
  });

  it('--quiesce through libvirt: optional without a guest agent is crash-consistent, required fails in one sentence and leaves no checkpoint', async () => {
    await write('sdb', 0x19, 7 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo, quiesce: 'optional' });
    assert.equal(m.consistency, 'crash');
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    await assertRestores(m, snapshot());
    await assert.rejects(qb.repository.backup(name, { repo, quiesce: 'required' }), (err: unknown) => isQbackupError(err, 'GUEST_AGENT') && /Cannot quiesce domain/.test((err as Error).message));
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    last = m;
  });

  it('a shut-off domain is backed up (incremental) without starting it, and the next backup of it running is incremental', async () => {
    await client.destroy(dom, LIBVIRT.VIR_DOMAIN_DESTROY_GRACEFUL);
    const callback = await client.registerDomainEvent(LIBVIRT.VIR_DOMAIN_EVENT_ID_LIFECYCLE, dom);
    const cursor = client.eventCursor();
    const states = new Set<number>();
    let watching = true;
    const watch = (async () => {
      while (watching) {
        states.add((await client.getState(dom)).state);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    let m: Manifest;
    try {
      m = await qb.repository.backup(name, { repo });
    } finally {
      watching = false;
      await watch;
    }
    await client.deregisterDomainEvent(callback);
    assert.deepEqual([...states], [LIBVIRT.VIR_DOMAIN_SHUTOFF], 'libvirt shows the domain shut off throughout');
    assert.equal(client.connection.eventCursor(), cursor, 'no lifecycle event of the domain');
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.deepEqual(m.disks.map((d) => d.bytesRead), [0, 0]);
    await assertRestores(m, snapshot());
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    dom = await client.create(await client.lookupDomainByName(name));
    await write('sda', 0x1f, 2 * MiB, 4096);
    const online = await qb.repository.backup(name, { repo });
    assert.deepEqual(online.disks.map((d) => d.level), ['incremental', 'incremental']);
    await assertRestores(online, snapshot());
    last = online;
  });

  it('a disk whose source was replaced (a new image under the same target) is backed up full with the reason', async () => {
    const [sdd] = await createTestDisks(dir, ['sdd'], DISK_BYTES);
    const [sde] = await createTestDisks(dir, ['sde'], DISK_BYTES);
    assert.ok(sdd !== undefined && sde !== undefined);
    await virsh(['attach-disk', name, sdd.file, 'sdd', '--driver', 'qemu', '--subdriver', 'qcow2', '--targetbus', 'scsi', '--live']);
    await qb.repository.backup(name, { repo });
    await virsh(['detach-disk', name, 'sdd', '--live']);
    await virsh(['attach-disk', name, sde.file, 'sdd', '--driver', 'qemu', '--subdriver', 'qcow2', '--targetbus', 'scsi', '--live']);
    models.set('sdd', new DiskModel());
    await write('sdd', 0x4e, 1 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    assert.equal(disk(m, 'sdd').level, 'full');
    assert.match(String(disk(m, 'sdd').fullReason), /image under "sdd" was replaced/);
    assert.equal(disk(m, 'sda').level, 'incremental');
    await assertRestores(m, snapshot());
    await virsh(['detach-disk', name, 'sdd', '--live']);
    models.delete('sdd');
    last = m;
  });

  it('a backup job of libvirt that is not ours is refused in one sentence and left running', async () => {
    const socket = join(dir, 'sock', 'foreign.sock');
    await client.backupBegin(dom, `<domainbackup mode='pull'><server transport='unix' socket='${socket}'/></domainbackup>`);
    try {
      await assert.rejects(qb.repository.backup(name, { repo }), (err: unknown) => isQbackupError(err, 'BACKUP_RUNNING') && /that qbackup did not start/.test((err as Error).message));
      assert.equal((await client.getJobStats(dom)).type, LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
    } finally {
      await client.abortJob(dom);
    }
  });

  it('a qbackup killed with its backup job running: the next backup ends the orphaned job and works', async () => {
    // A process that begins a pull backup as qbackup does and is killed -9 while it holds it.
    const script = `
      import { LibvirtDriver } from ${JSON.stringify(join(repoRoot, 'dist', 'src', 'drivers', 'libvirt', 'driver.js'))};
      const d = new LibvirtDriver({ uri: ${JSON.stringify(daemon.uri)}, socketParentDir: ${JSON.stringify(tmpdir())} });
      await d.beginPullBackup(${JSON.stringify(name)}, { checkpoint: 'qb-orphan', disks: [{ target: 'sda' }, { target: 'sdb', since: ${JSON.stringify(last.checkpoint)} }] });
      console.log('begun');
      setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (b: Buffer) => (b.toString().includes('begun') ? resolve() : undefined));
      child.on('exit', (code) => reject(new Error(`the backup process exited ${String(code)} before beginning`)));
    });
    const exited = new Promise((r) => child.on('exit', r));
    child.kill('SIGKILL');
    await exited;
    assert.equal((await client.getJobStats(dom)).type, LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
    await write('sdb', 0x71, 1 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    await assertRestores(m, snapshot());
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    assert.equal((await client.getJobStats(dom)).type, LIBVIRT.VIR_DOMAIN_JOB_NONE);
  });

  it('restore --define makes a new libvirt domain on the restored images that runs; --into-domain writes an older backup into it', async () => {
    const older = last;
    await write('sda', 0x3c, 2 * MiB, 64 << 10);
    const m = await qb.repository.backup(name, { repo });
    const want = snapshot();
    const copy = `${name}-copy`;
    const to = mkdtempSync(join(dir, 'define-'));
    // libvirt's QEMU user must reach the images (libvirt relabels the files, not their directory).
    chmodSync(to, 0o755);
    try {
      const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw', define: copy });
      const xml = await virsh(['dumpxml', copy]);
      assert.doesNotMatch(xml, new RegExp(`<uuid>${(await qb.driver.describeDomain(name)).uuid}</uuid>`));
      for (const d of r.disks) assert.match(xml, new RegExp(`<source file='${d.file}'`));
      await qb.driver.startDomain(copy);
      assert.equal((await qb.driver.describeDomain(copy)).state, 'running');
      await client.destroy(await client.lookupDomainByName(copy));
      for (const d of r.disks) assert.ok(readFileSync(d.file).equals(want.get(d.target) ?? Buffer.alloc(0)), `disk ${d.target} of the defined domain equals backup ${m.id}`);
      // Into the new, shut-off domain: the older backup, byte-exact.
      await qb.repository.restore(name, { repo, backup: older.id, intoDomain: copy, disks: ['sda', 'sdb'] });
      for (const d of r.disks) {
        const expected = contentAt.get(older.id)?.get(d.target);
        assert.ok(expected !== undefined && readFileSync(d.file).equals(expected), `disk ${d.target} holds backup ${older.id} after --into-domain`);
      }
      await assert.rejects(qb.repository.restore(name, { repo, backup: older.id, intoDomain: name }), (err: unknown) => isQbackupError(err, 'DOMAIN_RUNNING'));
    } finally {
      await removeTestDomain(client, copy).catch(() => undefined);
    }
    last = m;
  });

  it('bad input gets one sentence: a domain libvirt does not know, no libvirt at the URI, a checkpoint not ours', async () => {
    await assert.rejects(qb.repository.backup('qbt-lv-no-such-domain', { repo }), (err: unknown) => isQbackupError(err, 'DOMAIN_NOT_FOUND') && /qbt-lv-no-such-domain/.test((err as Error).message));
    const nowhere = new LibvirtDriver({ uri: `qemu+unix:///system?socket=${join(work, 'no.sock')}`, socketParentDir: tmpdir() });
    await assert.rejects(nowhere.listDomains(), (err: unknown) => isQbackupError(err, 'LIBVIRT_UNAVAILABLE'));
    await nowhere.close();
    await assert.rejects(qb.driver.deleteCheckpoint(name, 'admins-own'), (err: unknown) => isQbackupError(err, 'NOT_SUPPORTED') && /did not create it/.test((err as Error).message));
  });

  it('the CLI with QBACKUP_CONNECT: a full then an incremental into a second repository, which keeps its own one qb- checkpoint', async () => {
    const repo2 = join(work, 'repo2');
    const cli = async (args: string[]): Promise<Manifest> => {
      const { stdout } = await execFileAsync(join(repoRoot, 'bin', 'qbackup'), ['--state-dir', join(work, 'state'), '--json', ...args], { env: { ...process.env, QBACKUP_CONNECT: daemon.uri } });
      return JSON.parse(stdout) as Manifest;
    };
    const before = await ourCheckpoints();
    const full = await cli(['backup', name, '--repo', repo2]);
    assert.deepEqual(full.disks.map((d) => d.level), ['full', 'full']);
    await write('sda', 0x5a, 4 * MiB, 4096);
    const inc = await cli(['backup', name, '--repo', repo2]);
    assert.deepEqual(inc.disks.map((d) => d.level), ['incremental', 'incremental']);
    const rOld = repo;
    repo = repo2;
    try {
      await assertRestores(inc, snapshot());
    } finally {
      repo = rOld;
    }
    // The first repository's checkpoint stays; the second has exactly its latest.
    assert.deepEqual((await ourCheckpoints()).sort(), [...before, inc.checkpoint].sort());

    // qbackup backup killed (SIGKILL) with its libvirt job running: the next backup ends the orphaned job and is incremental.
    // (A write first: with nothing dirty no job would begin.)
    await write('sdb', 0x6a, 6 * MiB, 4096);
    await assert.rejects(execFileAsync(join(repoRoot, 'bin', 'qbackup'), ['--state-dir', join(work, 'state'), 'backup', name, '--repo', repo2], { env: { ...process.env, QBACKUP_CONNECT: daemon.uri, QBACKUP_CRASH_AT: 'libvirt-backup-begun' } }));
    assert.equal((await client.getJobStats(dom)).type, LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
    await write('sdb', 0x6b, 5 * MiB, 4096);
    const after = await cli(['backup', name, '--repo', repo2]);
    assert.deepEqual(after.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.equal((await client.getJobStats(dom)).type, LIBVIRT.VIR_DOMAIN_JOB_NONE);
    repo = repo2;
    try {
      await assertRestores(after, snapshot());
    } finally {
      repo = rOld;
    }
    assert.deepEqual((await ourCheckpoints()).sort(), [...before, after.checkpoint].sort());
  });

  it('libvirtd restarted: the driver connects again and the next backup is incremental', async (t) => {
    if (!daemon.started) {
      t.skip('libvirtd was not started by the tests, so they do not restart it');
      return;
    }
    await daemon.restart();
    await client.close();
    client = await LibvirtClient.connect(daemon.uri);
    dom = await client.lookupDomainByName(name);
    await write('sdb', 0x2d, 2 * MiB, 4096);
    const m = await qb.repository.backup(name, { repo });
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    await assertRestores(m, snapshot());
  });

  it('qbackup list --connect lists libvirt domains', async () => {
    const out = await tool(join(repoRoot, 'bin', 'qbackup'), ['--state-dir', join(work, 'state'), '--connect', daemon.uri, 'list', '--json']);
    const mine = (JSON.parse(out) as Array<{ name: string; state: string; connection: string }>).find((d) => d.name === name);
    assert.equal(mine?.state, 'running');
    assert.equal(mine?.connection, daemon.uri);
    // A command of qbackup's own engine refuses another connection instead of answering for the wrong hypervisor.
    await assert.rejects(tool(join(repoRoot, 'bin', 'qbackup'), ['--state-dir', join(work, 'state'), '--connect', daemon.uri, 'dumpxml', name]), (err: unknown) => /not through "qemu:\/\/\/system"/.test(String((err as { stderr?: string }).stderr)));
  });
});
