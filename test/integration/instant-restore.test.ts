// Instant restore against real QEMU (TCG) and a real server process:
// - a domain backed up with known data is restored instantly under a new
//   name; the guest writes while the copy runs and checkpoints, backups and
//   disk changes are refused (the copy is held back with a tiny --bandwidth,
//   which no load can outrun, and the cap lifted once the checks are done);
//   when the copy is done the server is gone,
//   the definition has no backing, and the local image holds exactly the
//   backup's bytes plus those writes (qemu-img compare against a raw image
//   the test builds from the reference copy and the same writes);
// - the server killed mid-copy: the next command brings it back on the same
//   socket serving the same backup, and the copy completes with the right bytes;
// - QEMU killed mid-copy: starting the domain again serves the backup again
//   and the copy completes;
// - an encrypted repository: the passphrase reaches the server, and a
//   restart without it is refused with one sentence saying what to do;
// - name clashes are refused with one sentence, nothing created; a domain
//   declaring an NBD backing that nothing serves (and no restore recorded)
//   does not start, with one sentence.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runTool } from '../../src/image/tools.js';
import type { InstantRecord, InstantRestoreInfo } from '../../src/instant/restore.js';
import type { Manifest } from '../../src/repository/repository.js';
import { isProcessAlive, sleep } from '../../src/util/proc.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, imageDiffers, referenceCopy, waitFor } from '../helpers/repo.js';

describe('instant restore (real QEMU)', () => {
  let env: TestEnv;
  let repo: string;
  let backup: Manifest;
  /** The raw bytes of sda and sdb at backup time. */
  const ref = new Map<string, string>();

  before(async () => {
    env = new TestEnv('qbt-instant-', { accel: 'tcg' });
    repo = env.path('repo');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 32 * MiB }, { target: 'sdb', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm');
    for (const [target, cmd] of [
      // ~30 MiB of data, so that a copy capped at 2–4 MiB/s lasts long enough to act during it.
      ['sda', 'write -P 0x11 0 12M'],
      ['sda', 'write -P 0x22 14M 8M'],
      ['sda', 'write -P 0x5a 31M 1M'],
      ['sdb', 'write -P 0x33 1M 8M'],
    ] as const) {
      await guestWrite(env.qb, 'vm', target, cmd);
    }
    for (const t of ['sda', 'sdb']) ref.set(t, await referenceCopy(env, 'vm', t, env.path(`ref-${t}.raw`)));
    backup = await env.qb.repository.backup('vm', { repo });
  });

  after(async () => {
    for (const d of env.qb.domains.list({ all: true })) {
      const record = env.qb.instant.loadRecord(d.name);
      if (record?.server != null) {
        try {
          process.kill(record.server.pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
    }
    await env.cleanup();
  });

  /** The reference of `target` with `writes` (qemu-io commands) applied: what the restored disk must hold. */
  async function expected(target: string, name: string, writes: readonly string[]): Promise<string> {
    const file = env.path(`exp-${name}-${target}.raw`);
    await runTool('cp', [ref.get(target) ?? '', file]);
    if (writes.length > 0) await runTool('qemu-io', ['-f', 'raw', ...writes.flatMap((w) => ['-c', w]), file]);
    return file;
  }

  /**
   * Copies in these tests start at HELD (bytes per second): after the first
   * chunk each disk's job sleeps about a minute per further 512 KiB chunk of
   * data, so a disk still reads from the backup for as long as a test acts
   * mid-copy, however loaded the machine. `release` then lifts the cap
   * (QMP block-job-set-speed 0 wakes the sleeping job) so the copy ends.
   */
  const HELD = 10 * 1024;
  const HELD_MIB = String(HELD / MiB);

  async function release(name: string): Promise<void> {
    const record = env.qb.instant.loadRecord(name) as InstantRecord;
    for (const d of record.disks) {
      await env.qb.domains.monitorCommand(name, JSON.stringify({ execute: 'block-job-set-speed', arguments: { device: d.jobId, speed: 0 } }));
    }
  }

  async function waitDone(name: string): Promise<InstantRestoreInfo> {
    const result = await env.qb.instant.wait(name, { pollMs: 200 });
    assert.equal(result.state, 'completed');
    return result;
  }

  function assertFinalized(name: string, serverPid: number): void {
    assert.equal(env.qb.instant.loadRecord(name), undefined, 'the record is gone');
    assert.doesNotMatch(env.qb.domains.dumpXml(name), /backingStore/, 'the definition has no backing');
    assert.ok(!isProcessAlive(serverPid), 'the server stopped');
  }

  test('runs at once, takes guest writes while the data moves, ends with backup + writes locally and no server', async () => {
    const r = await env.cli(['--json', 'restore', 'vm', '--repo', repo, '--instant', '--as', 'copy1', '--bandwidth', HELD_MIB, '--to', env.path('copy1')]);
    assert.equal(r.code, 0, r.stderr);
    const started = JSON.parse(r.stdout) as InstantRestoreInfo;
    assert.equal(started.backup, backup.id);
    assert.equal(env.qb.domains.info('copy1').state, 'running');
    assert.match(env.qb.domains.dumpXml('copy1'), /<source protocol="nbd" name="sda">/);
    const serverPid = started.serverPid ?? -1;
    assert.ok(isProcessAlive(serverPid));

    // Writes while the copy runs: over data, over a hole, and across the copy's front.
    const writes = new Map([
      ['sda', ['write -P 0x77 1M 64k', 'write -P 0x78 24M 1M', 'write -P 0x79 31M 4k']],
      ['sdb', ['write -P 0x7a 0 128k']],
    ]);
    for (const [t, cmds] of writes) for (const c of cmds) await guestWrite(env.qb, 'copy1', t, c);
    const mid = await env.cli(['domjobinfo', 'copy1']);
    assert.match(mid.stdout, /Instant restore \(streaming\)/);
    assert.ok((await env.qb.instant.info('copy1'))?.disks.some((d) => d.doneBytes < d.totalBytes), 'the copy was still running while the guest wrote');
    // While disks still read from the backup: no checkpoint, no backup, no change of disks.
    for (const args of [['checkpoint-create-as', 'copy1', '--name', 'c1'], ['backup', 'copy1', '--repo', env.path('repo2')], ['blockresize', 'copy1', 'sda', '64M']]) {
      const refused = await env.cli(args);
      assert.equal(refused.code, 1, `${args.join(' ')}: ${refused.stderr}`);
      assert.match(refused.stderr, /still reads from its backup while an instant restore copies the data in/);
    }
    assert.ok((await env.qb.instant.info('copy1'))?.disks.some((d) => d.doneBytes < d.totalBytes), 'the copy was still running after the refusals');

    await release('copy1');
    const done = await waitDone('copy1');
    assert.ok(done.disks.every((d) => d.status === 'completed'));
    assertFinalized('copy1', serverPid);
    await env.qb.domains.shutdown('copy1');
    for (const t of ['sda', 'sdb']) {
      const image = env.path(`copy1/${t}.qcow2`);
      assert.equal(await imageDiffers(image, 'qcow2', await expected(t, 'copy1', writes.get(t) ?? [])), undefined);
      const info = JSON.parse((await runTool('qemu-img', ['info', '--output=json', '-f', 'qcow2', image])).stdout) as Record<string, unknown>;
      assert.equal(info['backing-filename'], undefined, 'the image header names no backing file');
    }
    // It starts on its own now.
    await env.qb.domains.start('copy1');
    assert.equal(await env.qb.instant.info('copy1'), undefined);
    await env.qb.domains.destroy('copy1');
  });

  test('the server killed mid-copy is restarted by the next command with the same backup, and the copy completes', async () => {
    const started = await env.qb.instant.restore('vm', { repo, as: 'copy2', to: env.path('copy2'), speedBytesPerSec: HELD });
    const first = env.qb.instant.loadRecord('copy2') as InstantRecord;
    assert.ok(first.server !== null);
    await guestWrite(env.qb, 'copy2', 'sda', 'write -P 0x61 2M 64k');
    process.kill(first.server.pid, 'SIGKILL');
    const firstPid = first.server.pid;
    assert.ok(await waitFor(() => !isProcessAlive(firstPid), 10_000), 'the server is gone');
    // Any command on the domain settles it.
    const info = await env.qb.instant.info('copy2');
    const second = env.qb.instant.loadRecord('copy2') as InstantRecord;
    assert.ok(info !== undefined && second.server !== null);
    assert.notEqual(second.server.pid, first.server.pid, 'a new server');
    assert.equal(second.backupId, started.backup);
    assert.equal(second.socket, first.socket, 'on the same socket');
    await release('copy2');
    const done = await waitDone('copy2');
    assertFinalized('copy2', second.server.pid);
    await env.qb.domains.shutdown('copy2');
    assert.equal(done.backup, backup.id);
    assert.equal(await imageDiffers(env.path('copy2/sda.qcow2'), 'qcow2', await expected('sda', 'copy2', ['write -P 0x61 2M 64k'])), undefined);
    assert.equal(await imageDiffers(env.path('copy2/sdb.qcow2'), 'qcow2', await expected('sdb', 'copy2', [])), undefined);
  });

  test('QEMU killed mid-copy: the next start serves the backup again and the copy completes', async () => {
    await env.qb.instant.restore('vm', { repo, as: 'copy3', to: env.path('copy3'), speedBytesPerSec: HELD });
    await guestWrite(env.qb, 'copy3', 'sdb', 'write -P 0x62 5M 64k');
    await guestWrite(env.qb, 'copy3', 'sdb', 'flush');
    const record = env.qb.instant.loadRecord('copy3') as InstantRecord;
    await env.qb.domains.destroy('copy3');
    if (record.server !== null) {
      const pid = record.server.pid;
      process.kill(pid, 'SIGKILL');
      assert.ok(await waitFor(() => !isProcessAlive(pid), 10_000));
    }
    await env.qb.domains.start('copy3');
    const again = env.qb.instant.loadRecord('copy3') as InstantRecord;
    assert.ok(again.server !== null && isProcessAlive(again.server.pid, again.server.pidStart));
    await release('copy3');
    await waitDone('copy3');
    await env.qb.domains.shutdown('copy3');
    assert.equal(await imageDiffers(env.path('copy3/sda.qcow2'), 'qcow2', await expected('sda', 'copy3', [])), undefined);
    assert.equal(await imageDiffers(env.path('copy3/sdb.qcow2'), 'qcow2', await expected('sdb', 'copy3', ['write -P 0x62 5M 64k'])), undefined);
  });

  test('encrypted repository: the server gets the passphrase; a restart without it is refused with one sentence, with it the copy completes', async () => {
    const secure = env.path('secure');
    const pw = { QBACKUP_PASSWORD: 'instant secret' };
    assert.equal((await env.cli(['init', '--repo', secure, '--encrypt'], { env: pw })).code, 0);
    const b = await env.cli(['--json', 'backup', 'vm', '--repo', secure, '--full'], { env: pw });
    assert.equal(b.code, 0, b.stderr);
    const r = await env.cli(['restore', 'vm', '--repo', secure, '--instant', '--as', 'copy4', '--to', env.path('copy4'), '--bandwidth', HELD_MIB], { env: pw });
    assert.equal(r.code, 0, r.stderr);
    const record = env.qb.instant.loadRecord('copy4') as InstantRecord;
    assert.ok(record.encrypted && record.server !== null);
    const serverPid = record.server.pid;
    process.kill(serverPid, 'SIGKILL');
    assert.ok(await waitFor(() => !isProcessAlive(serverPid), 10_000));
    const without = await env.cli(['domjobinfo', 'copy4'], { env: { QBACKUP_PASSWORD: '' } });
    assert.equal(without.code, 1);
    assert.match(without.stderr, /^error: The server of backup ".*" for domain "copy4" is not running and the repository is encrypted: run the command again with the passphrase in QBACKUP_PASSWORD/);
    const withPw = await env.cli(['domjobinfo', 'copy4'], { env: pw });
    assert.equal(withPw.code, 0, withPw.stderr);
    assert.match(withPw.stdout, /Instant restore \(streaming\)/);
    const w = await env.cli(['restore', 'vm', '--repo', secure, '--instant', '--as', 'copy4', '--wait'], { env: pw });
    assert.match(w.stderr, /a domain of that name exists/, 'a second restore under the same name is refused even while the first copies');
    await release('copy4');
    await waitDone('copy4');
    await env.qb.domains.shutdown('copy4');
    for (const t of ['sda', 'sdb']) assert.equal(await imageDiffers(env.path(`copy4/${t}.qcow2`), 'qcow2', await expected(t, 'copy4', [])), undefined);
  });

  test('killed after creating its overlays (before the domain exists): the same restore run again reaps them and completes', async () => {
    const to = env.path('copy5');
    const args = ['restore', 'vm', '--repo', repo, '--instant', '--as', 'copy5', '--to', to];
    const killed = await env.cli(args, { env: { QBACKUP_CRASH_AT: 'instant-restore:after-overlays' } });
    assert.equal(killed.signal, 'SIGKILL');
    assert.ok(existsSync(join(to, 'sda.qcow2')), 'the killed restore left its overlay');
    const again = await env.cli(args);
    assert.equal(again.code, 0, again.stderr);
    await waitDone('copy5');
    await env.qb.domains.shutdown('copy5');
    for (const t of ['sda', 'sdb']) assert.equal(await imageDiffers(join(to, `${t}.qcow2`), 'qcow2', ref.get(t) ?? ''), undefined);
  });

  test('a name that is taken is refused with one sentence, and nothing is made; an NBD backing nothing serves is refused at start', async () => {
    // A shut-off domain of its own whose name the restore asks for.
    await env.defineDomain('taken', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    const running = await env.cli(['restore', 'vm', '--repo', repo, '--instant', '--to', env.path('clash1')]);
    assert.equal(running.code, 1);
    assert.match(running.stderr, /^error: Cannot restore backup ".*" instantly as domain "vm": a domain of that name exists \(running\); give the restored domain another name with --as/);
    const taken = await env.cli(['restore', 'vm', '--repo', repo, '--instant', '--as', 'taken', '--to', env.path('clash2')]);
    assert.equal(taken.code, 1);
    assert.match(taken.stderr, /domain "taken": a domain of that name exists \(shut off\); choose another name with --as/);
    assert.ok(!existsSync(env.path('clash1')) && !existsSync(env.path('clash2')));
    // A definition declaring an NBD backing that nothing serves, with no restore recorded: start refuses.
    const overlay = await env.image('orphan.qcow2', 16 * MiB);
    await env.qb.domains.define(env.domainXml('orphan', [{ target: 'sda', file: overlay }]).replace(
      "<target dev='sda'",
      `<backingStore type='network'><format type='raw'/><source protocol='nbd' name='sda'><host transport='unix' socket='${env.path('none.sock')}'/></source></backingStore><target dev='sda'`,
    ));
    const orphan = await env.cli(['start', 'orphan']);
    assert.equal(orphan.code, 1);
    assert.match(orphan.stderr, /^error: Cannot start domain "orphan": disk "sda" is backed by NBD export "sda" on ".*none\.sock", where nothing serves and no instant restore of qbackup is recorded/);
    assert.equal(env.qb.domains.info('orphan').state, 'shut off');
    const flags = await env.cli(['restore', 'vm', '--repo', repo, '--to', env.path('x'), '--as', 'y']);
    assert.match(flags.stderr, /Option --as needs --instant/);
  });
});
