// What goes wrong under a libvirt backup, through the CLI against the real
// libvirtd (started by the tests when none runs): `qbackup backup` killed
// with SIGKILL while it reads the disks over NBD, and libvirtd restarted while
// a backup reads them. The CLI is stopped deterministically mid-copy by the
// test-only QBACKUP_STOP_AT=backup-copying (it stops itself with SIGSTOP after
// reading its first data, and says so on stderr), so nothing here depends on
// timing. After each fault: nothing listed in the repository, no job left on
// the domain, one qb- checkpoint, and the next backup restores byte-exact.
// Also the bad input a user of the CLI meets with a real libvirt: a domain
// libvirt does not know.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { cliPath } from '../helpers/env.js';
import { createTestDisks, guestWrite, libvirtTestDir, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, virsh, type LibvirtDaemon } from '../helpers/libvirt.js';

const MiB = 1 << 20;
const DISK_BYTES = 32 * MiB;

/** A CLI process, its stderr, and whether it stopped itself at a fault point. */
interface CliRun {
  child: ChildProcess;
  stderr: () => string;
  stopped: Promise<void>;
  exited: Promise<number | null>;
}

describe('libvirt backups under faults, through the CLI', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  let repo: string;
  let dom: LibvirtDomainRef;
  const name = testDomainName('faults');
  const { dir, remove } = libvirtTestDir();
  const disks = new Map<string, Buffer>();

  const write = async (target: string, pattern: number, offset: number, length: number): Promise<void> => {
    const bytes = disks.get(target);
    assert.ok(bytes !== undefined);
    bytes.fill(pattern, offset, offset + length);
    await guestWrite(client, dom, target, `write -P 0x${pattern.toString(16)} ${offset} ${length}`);
  };
  const snapshot = (): Map<string, Buffer> => new Map([...disks].map(([t, b]) => [t, Buffer.from(b)]));

  const assertRestores = async (m: Manifest, expected: Map<string, Buffer>): Promise<void> => {
    const to = mkdtempSync(join(work, 'restore-'));
    const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw' });
    assert.deepEqual(r.disks.map((d) => d.target).sort(), [...expected.keys()].sort());
    for (const d of r.disks) assert.ok(readFileSync(d.file).equals(expected.get(d.target) ?? Buffer.alloc(0)), `disk ${d.target} of backup ${m.id} restores byte-exact`);
    rmSync(to, { recursive: true, force: true });
  };
  const ourCheckpoints = async (): Promise<string[]> => (await virsh(['checkpoint-list', name, '--name'])).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qb-'));
  const listed = async (): Promise<string[]> => (await qb.repository.list({ repo }, name)).map((m) => m.id);
  const jobType = async (): Promise<number> => (await client.getJobStats(dom)).type;

  /** `qbackup backup` of the domain into the repository, stopped by itself once it has read its first data. */
  const backupStoppedMidCopy = (): CliRun => {
    const child = spawn(process.execPath, [cliPath, '--state-dir', join(work, 'state'), 'backup', name, '--repo', repo], {
      env: { ...process.env, QBACKUP_CONNECT: daemon.uri, QBACKUP_STOP_AT: 'backup-copying' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const stopped = new Promise<void>((resolve, reject) => {
      child.stderr?.on('data', (b: Buffer) => {
        err += b.toString();
        if (err.includes('stopped at backup-copying')) resolve();
      });
      void exited.then((code) => reject(new Error(`qbackup backup exited ${String(code)} before it read anything: ${err}`)));
    });
    return { child, stderr: () => err, stopped, exited };
  };

  /** Some MiB dirty on each disk, so an incremental has many reads to do (the CLI stops after the first). */
  const dirtyBoth = async (pattern: number): Promise<void> => {
    await write('sda', pattern, 2 * MiB, 8 * MiB);
    await write('sdb', pattern + 1, 12 * MiB, 4 * MiB);
  };

  let last: Manifest;
  /** Every backup the repository should list, oldest first. */
  const ids: string[] = [];

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvfaults-'));
    repo = join(work, 'repo');
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    const images = await createTestDisks(dir, ['sda', 'sdb'], DISK_BYTES);
    dom = await client.create(await client.defineXml(testDomainXml(name, images)));
    for (const t of ['sda', 'sdb']) disks.set(t, Buffer.alloc(DISK_BYTES));
    await write('sda', 0x11, 0, 4 * MiB);
    await write('sdb', 0x22, 20 * MiB, 4 * MiB);
    last = await qb.repository.backup(name, { repo });
    ids.push(last.id);
    await assertRestores(last, snapshot());
  });

  after(async () => {
    await tearDownLibvirtTest({ qb, client, domains: [name], daemon, remove, dirs: [work] });
  });

  it('qbackup backup killed (SIGKILL) mid-copy: the next backup ends the orphaned job, leaves no stray checkpoint, and restores byte-exact', async () => {
    await dirtyBoth(0x30);
    const run = backupStoppedMidCopy();
    await run.stopped;
    // Mid-copy: libvirt's job runs, its checkpoint exists beside the last one, nothing is listed yet.
    assert.equal(await jobType(), LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
    assert.equal((await ourCheckpoints()).length, 2);
    assert.deepEqual(await listed(), ids);
    run.child.kill('SIGKILL');
    await run.exited;
    assert.equal(await jobType(), LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED, 'the killed backup left its job behind');

    await write('sdb', 0x3f, 1 * MiB, 64 << 10);
    const m = await qb.repository.backup(name, { repo });
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.equal(await jobType(), LIBVIRT.VIR_DOMAIN_JOB_NONE);
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    ids.push(m.id);
    assert.deepEqual(await listed(), ids);
    await assertRestores(m, snapshot());
    last = m;
  });

  it('libvirtd restarted mid-backup: one sentence naming the disconnect, nothing listed, no job left, and the next backup restores byte-exact', async (t) => {
    if (!daemon.started) {
      t.skip('libvirtd was not started by the tests (the system runs one), so they do not restart it');
      return;
    }
    await dirtyBoth(0x40);
    const run = backupStoppedMidCopy();
    await run.stopped;
    assert.equal(await jobType(), LIBVIRT.VIR_DOMAIN_JOB_UNBOUNDED);
    await daemon.restart();
    run.child.kill('SIGCONT');
    const code = await run.exited;
    const message = run.stderr().replace(/^qbackup: stopped at backup-copying\n/m, '').trim();
    assert.equal(code, 1, message);
    assert.match(message, /^error: [^\n]*connection to libvirt at qemu:\/\/\/system closed while its disks were read \(libvirtd stopped or restarted\)[^\n]*$/);
    assert.equal(message.split('\n').length, 1, message);

    await client.close();
    client = await LibvirtClient.connect(daemon.uri);
    dom = await client.lookupDomainByName(name);
    assert.deepEqual(await listed(), ids);
    await write('sda', 0x4f, 30 * MiB, 64 << 10);
    const m = await qb.repository.backup(name, { repo });
    assert.deepEqual(m.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.equal(await jobType(), LIBVIRT.VIR_DOMAIN_JOB_NONE);
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    ids.push(m.id);
    assert.deepEqual(await listed(), ids);
    await assertRestores(m, snapshot());
    last = m;
  });

  it('a disk replaced under its target (the old image held the previous checkpoint\'s bitmap): the previous checkpoint still goes, one qb- checkpoint', async () => {
    const [first, second] = await createTestDisks(dir, ['sdc', 'sdc2'], 8 * MiB);
    assert.ok(first !== undefined && second !== undefined);
    const attach = (file: string): Promise<string> => virsh(['attach-disk', name, file, 'sdc', '--driver', 'qemu', '--subdriver', 'qcow2', '--targetbus', 'scsi', '--live']);
    await attach(first.file);
    disks.set('sdc', Buffer.alloc(8 * MiB));
    await write('sdc', 0x51, 1 * MiB, 64 << 10);
    const m1 = await qb.repository.backup(name, { repo });
    ids.push(m1.id);
    assert.deepEqual(await ourCheckpoints(), [m1.checkpoint]);
    await virsh(['detach-disk', name, 'sdc', '--live']);
    await attach(second.file);
    disks.set('sdc', Buffer.alloc(8 * MiB));
    await write('sdc', 0x52, 2 * MiB, 64 << 10);
    const m2 = await qb.repository.backup(name, { repo });
    ids.push(m2.id);
    assert.equal(m2.disks.find((d) => d.target === 'sdc')?.level, 'full');
    assert.deepEqual(await ourCheckpoints(), [m2.checkpoint]);
    assert.equal(await jobType(), LIBVIRT.VIR_DOMAIN_JOB_NONE);
    await assertRestores(m2, snapshot());
    // The next backup is incremental on every disk, the new sdc too.
    await write('sdc', 0x53, 3 * MiB, 4096);
    const m3 = await qb.repository.backup(name, { repo });
    ids.push(m3.id);
    assert.deepEqual(m3.disks.map((d) => d.level), ['incremental', 'incremental', 'incremental']);
    assert.deepEqual(await ourCheckpoints(), [m3.checkpoint]);
    await assertRestores(m3, snapshot());
    await virsh(['detach-disk', name, 'sdc', '--live']);
    disks.delete('sdc');
    last = m3;
  });

  it('a domain libvirt does not know: one sentence from the CLI, exit 1', async () => {
    const child = spawn(process.execPath, [cliPath, '--state-dir', join(work, 'state'), '--connect', daemon.uri, 'backup', 'qbt-lv-no-such-domain', '--repo', repo], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    assert.equal(code, 1, err);
    assert.match(err.trim(), /^error: libvirt at qemu:\/\/\/system has no domain "qbt-lv-no-such-domain"$/);
    assert.deepEqual(await listed(), ids);
  });
});
