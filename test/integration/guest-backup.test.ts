// Backups of a real Linux guest (scripts/guest/: Debian's kernel, busybox,
// qemu-ga) while it writes files to an ext4 disk, with a checksum list that
// it replaces atomically after each file.
// - `backup --quiesce` (full, then two incrementals) freezes the guest's
//   filesystems through its agent for the checkpoint: every restored disk is
//   clean (no journal to replay, fsck.ext4 -fn finds nothing) and every file
//   in its checksum list restores with its checksum; the guest goes on
//   writing afterwards (thawed).
// - Without quiesce the backup is crash-consistent: fsck.ext4 -fy replays
//   the journal, and every file listed before the guest's last sync is intact.
// - checkpoint-create-as --quiesce and a push backup-begin with a checkpoint
//   and --quiesce record 'filesystem'; the push target is clean.
// - A restored disk boots: a new domain on it mounts the filesystem and its
//   guest checks every listed file (reader workload, on the serial console).
// - Without an agent channel --quiesce fails with one sentence, and
//   --quiesce-optional goes on and records a crash-consistent backup.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseDomainXml } from '../../src/model/definition-xml.js';
import { GuestAgentClient } from '../../src/qemu/guest-agent.js';
import { runTool } from '../../src/image/tools.js';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv } from '../helpers/env.js';
import { checkListedFiles, ext4Disk, fsck, guestBoot, guestDomainXml, needsRecovery, waitForConsole, writerProgress } from '../helpers/guest.js';

describe('a real Linux guest: quiesced backups restore clean, crash-consistent ones replay, restores boot', () => {
  let env: TestEnv;
  let repo: string;
  const quiesced: Array<{ manifest: Manifest; listed: number }> = [];

  /** Waits until the guest's writer has synced `more` files beyond what it had. */
  async function writerMovesOn(more: number): Promise<void> {
    const target = writerProgress(env, 'g1') + more;
    await waitForConsole(env, 'g1', new RegExp(`qb: synced ${target}\\b`), 120_000);
  }

  async function backup(extra: readonly string[]): Promise<Manifest> {
    return JSON.parse(await env.cliOk(['--json', 'backup', 'g1', '--repo', repo, ...extra])) as Manifest;
  }

  async function restoreRaw(m: Manifest): Promise<string> {
    const dir = env.path(`restore-${m.id}`);
    await env.cliOk(['restore', 'g1', '--repo', repo, '--backup', m.id, '--to', dir, '--format', 'raw']);
    return join(dir, 'sda.raw');
  }

  before(async () => {
    guestBoot();
    env = new TestEnv('qbg-', { accel: 'tcg' });
    repo = env.path('repo');
    const disk = await ext4Disk(env, 'g1-data');
    await env.qb.domains.define(guestDomainXml('g1', { workload: 'writer', disk }));
    await env.qb.domains.start('g1');
    await waitForConsole(env, 'g1', /qb: synced 10\b/);
  });

  after(async () => {
    await env.cleanup();
  });

  test('backup --quiesce while the guest writes: a full and two incrementals restore clean with every listed file intact', async () => {
    for (const level of ['full', 'incremental', 'incremental']) {
      await writerMovesOn(10);
      const m = await backup(['--quiesce']);
      assert.equal(m.consistency, 'filesystem');
      assert.equal(m.disks[0]?.level, level);
      const image = await restoreRaw(m);
      assert.equal(needsRecovery(image), false, `backup ${m.id}: a frozen ext4 has no journal to replay`);
      const check = fsck(image, '-fn');
      assert.equal(check.status, 0, `backup ${m.id}: fsck.ext4 -fn:\n${check.output}`);
      const files = checkListedFiles(env, image, 'sums');
      assert.deepEqual(files.bad, [], `backup ${m.id}: files whose checksum differs`);
      assert.ok(files.listed >= 10, `backup ${m.id} lists ${files.listed} files`);
      const previous = quiesced[quiesced.length - 1];
      if (previous !== undefined) assert.ok(files.listed > previous.listed, 'the writer went on between backups');
      quiesced.push({ manifest: m, listed: files.listed });
    }
    // Thawed: the agent says so and the guest goes on writing.
    const socket = env.qb.domains.guestAgentSocket(parseDomainXml(env.qb.domains.dumpXml('g1')));
    assert.ok(socket !== undefined);
    const agent = await GuestAgentClient.connect(socket, 'g1');
    try {
      assert.equal(await agent.freezeStatus(), 'thawed');
    } finally {
      agent.close();
    }
    await writerMovesOn(10);
  });

  test('backup without quiesce: crash-consistent, the journal replays and every file synced before is intact', async () => {
    await writerMovesOn(10);
    const m = await backup([]);
    assert.equal(m.consistency, 'crash');
    const image = await restoreRaw(m);
    // ext4 sets needs_recovery at mount and clears it only at unmount or freeze.
    assert.equal(needsRecovery(image), true, 'a disk taken from a mounted, unfrozen ext4 has a journal to replay');
    const repair = fsck(image, '-fy');
    assert.ok(repair.status === 0 || repair.status === 1, `fsck.ext4 -fy exited ${repair.status}:\n${repair.output}`);
    assert.equal(needsRecovery(image), false);
    assert.equal(fsck(image, '-fn').status, 0, 'clean after the replay');
    const synced = checkListedFiles(env, image, 'synced');
    assert.deepEqual(synced.bad, []);
    assert.ok(synced.listed >= 10);
  });

  test('checkpoint-create-as --quiesce and backup-begin --checkpoint --quiesce (push) freeze the guest for their instant', async () => {
    const cp = JSON.parse(await env.cliOk(['--json', 'checkpoint-create-as', 'g1', '--name', 'cq', '--quiesce'])) as { name: string; consistency: string };
    assert.equal(cp.consistency, 'filesystem');
    const refused = await env.cli(['backup-begin', 'g1', '--target-dir', env.path('push0'), '--quiesce']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /quiescing needs a checkpoint/);
    await writerMovesOn(10);
    const dir = env.path('push');
    const job = JSON.parse(await env.cliOk(['--json', 'backup-begin', 'g1', '--checkpoint', 'cp2', '--target-dir', dir, '--quiesce', '--wait'])) as { state: string; consistency: string; disks: Array<{ targetFile: string }> };
    assert.equal(job.state, 'completed');
    assert.equal(job.consistency, 'filesystem');
    const image = env.path('push-sda.raw');
    await runTool('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', job.disks[0]?.targetFile ?? '', image]);
    assert.equal(needsRecovery(image), false);
    assert.equal(fsck(image, '-fn').status, 0);
    assert.deepEqual(checkListedFiles(env, image, 'sums').bad, []);
  });

  test('a restored disk boots: the guest mounts it and every listed file checks out', async () => {
    const last = quiesced[quiesced.length - 1];
    assert.ok(last !== undefined, 'the quiesced backups ran');
    const dir = env.path('restore-boot');
    await env.cliOk(['restore', 'g1', '--repo', repo, '--backup', last.manifest.id, '--to', dir]);
    await env.qb.domains.define(guestDomainXml('g2', { workload: 'reader', disk: join(dir, 'sda.qcow2') }));
    await env.qb.domains.start('g2');
    const m = await waitForConsole(env, 'g2', /qb: reader (\d+) files, (\d+) bad/);
    assert.equal(Number(m[1]), last.listed);
    assert.equal(Number(m[2]), 0);
    await env.qb.domains.destroy('g2');
  });

  test('--quiesce without an agent channel fails with one sentence; --quiesce-optional records a crash-consistent backup', async () => {
    const disk = await ext4Disk(env, 'g3-data', 16);
    await env.qb.domains.define(guestDomainXml('g3', { workload: 'idle', disk, noAgent: true }));
    await env.qb.domains.start('g3');
    const r = await env.cli(['checkpoint-create-as', 'g3', '--name', 'c1', '--quiesce']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^[^\n]*Cannot quiesce domain "g3": it has no guest agent channel[^\n]*\n$/);
    assert.deepEqual(env.qb.checkpoints.list('g3'), []);
    const m = JSON.parse(await env.cliOk(['--json', 'backup', 'g3', '--repo', repo, '--quiesce-optional'])) as Manifest;
    assert.equal(m.consistency, 'crash');
    await env.qb.domains.destroy('g3');
  });
});
