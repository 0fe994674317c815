// An incremental with nothing dirty through the libvirt driver (real
// libvirtd): the driver reads the parent checkpoint's size, makes the new
// checkpoint alone and starts no backup job. What must hold:
// - no write since the last backup: no job begins, and the backup restores
//   byte-exact equal to the full (the disk as it was);
// - a write after it: the job runs and the next backup has that write;
// - a write landing just after the new checkpoint was made alone: the
//   checkpoint is taken back, the job runs, and the backup has the write and
//   one landing just after the take-back;
// - a backup killed right after its checkpoint was made alone lists
//   nothing; the next backup discards that checkpoint (one qb- checkpoint
//   left), starts a job for the write made meanwhile and restores byte-exact.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { Qbackup } from '../../src/qbackup.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { repoRoot } from '../helpers/env.js';
import { createTestDisks, guestWrite, libvirtTestDir, startLibvirt, tearDownLibvirtTest, testDomainName, testDomainXml, virsh, type LibvirtDaemon } from '../helpers/libvirt.js';

const execFileAsync = promisify(execFile);
const MiB = 1 << 20;
const DISK_BYTES = 4 * MiB;
const TARGETS = ['sda', 'sdb'];

describe('libvirt: an incremental with nothing dirty makes no backup job', () => {
  let daemon: LibvirtDaemon;
  let client: LibvirtClient;
  let qb: Qbackup;
  let work: string;
  let repo: string;
  let dom: LibvirtDomainRef;
  const name = testDomainName('unchanged');
  const { dir, remove } = libvirtTestDir();
  /** Each disk as the guest wrote it. */
  const model = new Map(TARGETS.map((t) => [t, Buffer.alloc(DISK_BYTES)]));
  /** Each backup with the disks it must restore. */
  const taken: Array<{ m: Manifest; want: Map<string, Buffer> }> = [];
  /** Backup jobs libvirt was asked to begin (every LibvirtClient of this process). */
  let begins = 0;
  const realBegin = LibvirtClient.prototype.backupBegin;

  const write = async (target: string, pattern: number, offset: number, length: number): Promise<void> => {
    model.get(target)?.fill(pattern, offset, offset + length);
    await guestWrite(client, dom, target, `write -P 0x${pattern.toString(16)} ${offset} ${length}`);
  };
  const backup = async (): Promise<Manifest> => {
    const want = new Map([...model].map(([t, b]) => [t, Buffer.from(b)]));
    const m = await qb.repository.backup(name, { repo });
    taken.push({ m, want });
    return m;
  };
  const assertRestores = async (m: Manifest, want: Map<string, Buffer>): Promise<void> => {
    const to = mkdtempSync(join(work, 'restore-'));
    const r = await qb.repository.restore(name, { repo, backup: m.id, to, format: 'raw' });
    assert.deepEqual(r.disks.map((d) => d.target).sort(), TARGETS);
    for (const d of r.disks) assert.ok(readFileSync(d.file).equals(want.get(d.target) ?? Buffer.alloc(0)), `disk ${d.target} of backup ${m.id} restores byte-exact`);
    rmSync(to, { recursive: true, force: true });
  };
  const ourCheckpoints = async (): Promise<string[]> => (await virsh(['checkpoint-list', name, '--name'])).split('\n').map((l) => l.trim()).filter((l) => l.startsWith('qb-'));

  before(async () => {
    daemon = await startLibvirt();
    client = await LibvirtClient.connect(daemon.uri);
    work = mkdtempSync(join(tmpdir(), 'qbt-lvunchanged-'));
    repo = join(work, 'repo');
    qb = Qbackup.open({ stateDir: join(work, 'state'), connect: daemon.uri });
    dom = await client.create(await client.defineXml(testDomainXml(name, await createTestDisks(dir, TARGETS, DISK_BYTES))));
    LibvirtClient.prototype.backupBegin = function (this: LibvirtClient, ...args: Parameters<LibvirtClient['backupBegin']>) {
      begins++;
      return realBegin.apply(this, args);
    };
  });

  after(async () => {
    LibvirtClient.prototype.backupBegin = realBegin;
    await tearDownLibvirtTest({ qb, client, domains: [name], daemon, remove, dirs: [work] });
  });

  it('no write since the full: no job, and the backup restores equal to the full', async () => {
    await write('sda', 0xa1, 0, 1 * MiB);
    await write('sdb', 0xb2, 2 * MiB, 64 << 10);
    const full = await backup();
    assert.equal(begins, 1);
    const empty = await backup();
    assert.equal(begins, 1, 'no backup job began');
    assert.deepEqual(empty.disks.map((d) => [d.level, d.bytesRead]), [['incremental', 0], ['incremental', 0]]);
    assert.deepEqual(await ourCheckpoints(), [empty.checkpoint]);
    await assertRestores(empty, taken[0]?.want ?? new Map());
    await assertRestores(full, taken[0]?.want ?? new Map());
  });

  it('a write after the empty backup: the job runs and the next backup has it', async () => {
    await write('sdb', 0xc3, 3 * MiB, 4096);
    const inc = await backup();
    assert.equal(begins, 2, 'the backup job began');
    assert.deepEqual(inc.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.ok((inc.disks[1]?.bytesRead ?? 0) >= 4096, 'sdb read its dirty cluster');
    assert.deepEqual(await ourCheckpoints(), [inc.checkpoint]);
    for (const { m, want } of taken) await assertRestores(m, want);
  });

  it('writes just after the checkpoint was made alone and just after it was taken back: the job runs, with both', async () => {
    const realCreate = LibvirtClient.prototype.checkpointCreateXml;
    let injected = 0;
    LibvirtClient.prototype.checkpointCreateXml = async function (this: LibvirtClient, ...args: Parameters<LibvirtClient['checkpointCreateXml']>) {
      const made = await realCreate.apply(this, args);
      // The new checkpoint exists; the driver has not yet looked at the sizes again.
      if (injected++ === 0) await write('sda', 0xe5, 1 * MiB, 4096);
      return made;
    };
    // And one more just after it is taken back: its bitmap merged into the parent's, which records again.
    const realDelete = LibvirtClient.prototype.checkpointDelete;
    let deleted = 0;
    LibvirtClient.prototype.checkpointDelete = async function (this: LibvirtClient, ...args: Parameters<LibvirtClient['checkpointDelete']>) {
      await realDelete.apply(this, args);
      if (deleted++ === 0) await write('sdb', 0xf6, 1 * MiB, 4096);
    };
    let m: Manifest;
    try {
      m = await backup();
    } finally {
      LibvirtClient.prototype.checkpointCreateXml = realCreate;
      LibvirtClient.prototype.checkpointDelete = realDelete;
    }
    assert.equal(injected, 1, 'the checkpoint was made alone once');
    assert.ok(deleted >= 1, 'and taken back');
    assert.equal(begins, 3, 'the backup job began');
    assert.ok((m.disks[0]?.bytesRead ?? 0) >= 4096 && (m.disks[1]?.bytesRead ?? 0) >= 4096, 'each disk read its dirty cluster');
    assert.deepEqual(await ourCheckpoints(), [m.checkpoint]);
    // The write landed before the job's instant: the backup holds the disks as the model has them now.
    const last = taken.at(-1);
    assert.ok(last !== undefined);
    last.want = new Map([...model].map(([t, b]) => [t, Buffer.from(b)]));
    await assertRestores(m, last.want);
  });

  it('killed right after its checkpoint was made alone: the next backup discards it and restores byte-exact', async () => {
    const before = await ourCheckpoints();
    const listed = (await qb.repository.list({ repo }, name)).length;
    await assert.rejects(execFileAsync(join(repoRoot, 'bin', 'qbackup'), ['--state-dir', join(work, 'state'), 'backup', name, '--repo', repo], { env: { ...process.env, QBACKUP_CONNECT: daemon.uri, QBACKUP_CRASH_AT: 'libvirt-unchanged-created' } }));
    assert.equal((await qb.repository.list({ repo }, name)).length, listed, 'the killed backup lists nothing');
    assert.equal((await ourCheckpoints()).length, before.length + 1, 'its checkpoint was made');
    await write('sda', 0xd4, 2 * MiB, 4096);
    const next = await backup();
    assert.equal(begins, 4, 'the backup job began for the write');
    assert.deepEqual(next.disks.map((d) => d.level), ['incremental', 'incremental']);
    assert.deepEqual(await ourCheckpoints(), [next.checkpoint]);
    for (const { m, want } of taken) await assertRestores(m, want);
  });
});
