// Tasks and schedules of the daemon against real QEMU: a daemon killed in
// the middle of a repository backup leaves a task that the next daemon shows
// as failed with the reason, after the library has ended the orphaned job
// (the next backup succeeds); finished tasks survive a restart; the
// scheduler (with a fake clock for its own time only) runs a backup, applies
// retention, runs a missed slot once, and runs verify and gc schedules; a
// daemon stopped with SIGTERM while a backup task runs interrupts it (failed,
// TASK_INTERRUPTED), leaves no lock, job or checkpoint, and starts clean.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startDaemon } from '../../src/http/daemon.js';
import { cliPath, TestEnv } from '../helpers/env.js';
import { ApiClient } from '../helpers/http.js';
import { eventually } from '../helpers/repo.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { acquireLock } from '../../src/repository/locks.js';

type Obj = Record<string, unknown>;
const DAY = 86_400_000;

/** Runs `qbackup serve` in a child process; resolves with its URL and bootstrap token once it listens. */
function serveChild(env: TestEnv, extraEnv: Record<string, string>): Promise<{ url: string; token: string; exited: Promise<NodeJS.Signals | null>; status: Promise<number | null>; child: ChildProcess }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cliPath, '--state-dir', env.stateDir, '--json', 'serve', '--listen', '127.0.0.1:0'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, QBACKUP_LOCK_TIMEOUT: '5', ...extraEnv },
    });
    const exited = new Promise<NodeJS.Signals | null>((r) => child.on('exit', (_code, signal) => r(signal)));
    const status = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    let out = '';
    let err = '';
    child.stderr.on('data', (b: Buffer) => (err += b.toString()));
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      try {
        const j = JSON.parse(out) as { url: string; bootstrapToken?: { token: string } };
        resolve({ url: j.url, token: j.bootstrapToken?.token ?? '', exited, status, child });
      } catch {
        // not complete yet
      }
    });
    child.on('exit', () => reject(new Error(`qbackup serve exited early: ${err}`)));
  });
}

describe('daemon tasks and schedules (real QEMU)', () => {
  let env: TestEnv;

  before(async () => {
    env = new TestEnv('qbt-httptask-');
    await env.defineDomain('vm1', [{ target: 'sda', sizeBytes: 8 << 20 }]);
  });

  after(async () => {
    await env?.cleanup();
  });

  test('a daemon killed mid-backup: the task is failed with the reason on the next start, the job is cleaned up, finished tasks survive restarts', async () => {
    const repo = env.path('repo');
    // The child kills itself (SIGKILL) once QEMU runs the backup job.
    const child = await serveChild(env, { QBACKUP_CRASH_AT: 'backup-begin:after-qemu' });
    const api = new ApiClient(child.url, child.token);
    const accepted = await api.post('/api/repository/backups', { domain: 'vm1', repo });
    assert.equal(accepted.status, 202, accepted.text);
    const taskId = String((accepted.body as Obj)['id']);
    assert.equal(await child.exited, 'SIGKILL');

    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    try {
      assert.equal(daemon.bootstrapToken, undefined, 'the token of the first start is kept');
      const api2 = new ApiClient(daemon.url, child.token);
      const task = (await api2.get(`/api/tasks/${taskId}`)).body as Obj;
      assert.equal(task['state'], 'failed');
      assert.deepEqual(Object.keys(task['error'] as Obj).sort(), ['code', 'message']);
      assert.equal((task['error'] as Obj)['code'], 'TASK_INTERRUPTED');
      assert.match(String((task['error'] as Obj)['message']), /the daemon stopped while it was running/);
      // the library ended the dead process's job and merged its checkpoint away
      assert.equal(await env.qb.backups.info('vm1'), undefined);
      assert.deepEqual(env.qb.checkpoints.list('vm1'), []);
      const again = await api2.post('/api/repository/backups', { domain: 'vm1', repo });
      const done = await api2.waitTask(String((again.body as Obj)['id']));
      assert.equal(done['state'], 'succeeded', JSON.stringify(done['error']));
      await daemon.close();

      const daemon3 = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
      try {
        const api3 = new ApiClient(daemon3.url, child.token);
        const kept = (await api3.get(`/api/tasks/${String(done['id'])}`)).body as Obj;
        assert.equal(kept['state'], 'succeeded');
        assert.ok(((kept['log'] as Obj[]) ?? []).length > 0);
        assert.ok(((await api3.get('/api/tasks')).body as Obj[]).some((t) => t['id'] === taskId));
      } finally {
        await daemon3.close();
      }
    } finally {
      await daemon.close();
    }
  });

  test('SIGTERM while a backup task runs: the daemon stops, the task ends failed (interrupted), no lock, job or checkpoint is left, the next start is clean', async () => {
    const repo = env.path('term-repo');
    await env.cliOk(['init', '--repo', repo]);
    const checkpointsBefore = env.qb.checkpoints.list('vm1').map((c) => c.name);
    // A gc lock held here keeps the task inside its run, holding its backup lock, at a point the test sees (its phase).
    const held = await acquireLock(new LocalBackend(repo), 'gc', null);
    let taskId = '';
    const token = (JSON.parse(await env.cliOk(['--json', 'token', 'create', `term-${process.pid}`])) as { token: string }).token;
    try {
      const child = await serveChild(env, {});
      const api = new ApiClient(child.url, token);
      const accepted = await api.post('/api/repository/backups', { domain: 'vm1', repo });
      assert.equal(accepted.status, 202, accepted.text);
      taskId = String((accepted.body as Obj)['id']);
      const waiting = await eventually(async () => (((await api.get(`/api/tasks/${taskId}`)).body as Obj)['progress'] as Obj | null)?.['phase'] === 'waiting for a gc to end', 60_000);
      assert.ok(waiting, 'the backup task waits for the gc');
      child.child.kill('SIGTERM');
      const stopped = await eventually(() => child.child.exitCode !== null || child.child.signalCode !== null, 60_000);
      assert.ok(stopped, 'the daemon stops on SIGTERM while the task runs');
      assert.equal(await child.status, 0);
    } finally {
      await held.release();
    }
    assert.deepEqual(readdirSync(join(repo, 'locks')), [], 'no lock is left');
    assert.equal(await env.qb.backups.info('vm1'), undefined, 'no backup job is left');
    assert.deepEqual(env.qb.checkpoints.list('vm1').map((c) => c.name), checkpointsBefore);
    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    try {
      assert.deepEqual(daemon.service.interrupted.map((t) => t.id), [], 'the stopped daemon recorded how its task ended');
      const api = new ApiClient(daemon.url, token);
      const task = (await api.get(`/api/tasks/${taskId}`)).body as Obj;
      assert.equal(task['state'], 'failed');
      assert.equal((task['error'] as Obj)['code'], 'TASK_INTERRUPTED');
      assert.match(String((task['error'] as Obj)['message']), /the daemon was stopped while it was running/);
      assert.deepEqual(await env.qb.repository.list({ repo }, 'vm1'), []);
      const again = await api.post('/api/repository/backups', { domain: 'vm1', repo });
      const done = await api.waitTask(String((again.body as Obj)['id']));
      assert.equal(done['state'], 'succeeded', JSON.stringify(done['error']));
    } finally {
      await daemon.close();
    }
  });

  test('a running backup task can be cancelled: the task ends cancelled, no backup is listed, no checkpoint or job is left, the next backup works', async () => {
    await env.defineDomain('big', [{ target: 'sda', sizeBytes: 96 << 20 }]);
    await env.qb.domains.start('big', { paused: true });
    await env.qb.domains.monitorCommand('big', 'qemu-io -d sda "write -P 0x5a 0 96M"', { hmp: true });
    const repo = env.path('cancel-repo');
    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    try {
      const before = env.qb.checkpoints.list('big').map((c) => c.name);
      // One worker and a copy the size of several packs: the task is still reading when it is cancelled.
      const task = daemon.service.backup({ domain: 'big', repo });
      const end = Date.now() + 60_000;
      while (daemon.service.tasks.get(task.id).state !== 'running' || (daemon.service.tasks.get(task.id).progress?.doneBytes ?? 0) === 0) {
        if (Date.now() > end) throw new Error('the backup task never made progress');
        await new Promise((r) => setTimeout(r, 5));
      }
      daemon.service.tasks.cancel(task.id);
      const done = await daemon.service.tasks.wait(task.id);
      assert.equal(done.state, 'cancelled', JSON.stringify(done.error));
      assert.equal(done.error?.code, 'TASK_CANCELLED');
      assert.deepEqual(await env.qb.repository.list({ repo }, 'big'), []);
      assert.deepEqual(env.qb.checkpoints.list('big').map((c) => c.name), before, 'the cancelled backup\'s checkpoint is merged away');
      assert.equal(await env.qb.backups.info('big'), undefined, 'no backup job is left');
      const again = await daemon.service.tasks.wait(daemon.service.backup({ domain: 'big', repo }).id);
      assert.equal(again.state, 'succeeded', JSON.stringify(again.error));
    } finally {
      await daemon.close();
      await env.qb.domains.destroy('big');
    }
  });

  test('the scheduler (fake clock) backs up, applies retention, runs missed slots once, and runs verify and gc schedules', async () => {
    const repo = env.path('sched-repo');
    let now = Date.now();
    const daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, clock: { now: () => now } });
    try {
      const s = daemon.service.schedules.add({ domain: 'vm1', when: 'daily 02:00', repo, retention: { keepLast: 1 } });
      assert.deepEqual(daemon.service.scheduler.tick(), [], 'nothing is due yet');
      const runs: string[] = [];
      for (const advance of [DAY, DAY, 3 * DAY]) {
        now += advance;
        const started = daemon.service.scheduler.tick();
        assert.deepEqual(started, [s.id], 'a due schedule runs once per tick, however many slots were missed');
        assert.deepEqual(daemon.service.scheduler.tick(), [], 'and not again at once');
        const task = daemon.service.tasks.list(1)[0];
        assert.ok(task !== undefined);
        const done = await daemon.service.tasks.wait(task.id);
        assert.equal(done.state, 'succeeded', JSON.stringify(done.error));
        assert.equal(done.requestedBy, `schedule ${s.id}`);
        runs.push(((done.result as Obj)['manifest'] as Obj)['id'] as string);
      }
      const left = await env.qb.repository.list({ repo }, 'vm1');
      assert.deepEqual(left.map((m) => m.id), [runs.at(-1)], 'retention keepLast=1 leaves the newest backup');
      assert.equal(daemon.service.schedules.get(s.id).lastRunMs, now);

      // verify and gc schedules run on the same repository
      daemon.service.schedules.remove(s.id);
      const verify = daemon.service.schedules.add({ action: 'verify', when: 'hourly', repo, readDataPercent: 100 });
      const gc = daemon.service.schedules.add({ action: 'gc', when: 'hourly', repo });
      now += 2 * 3_600_000;
      assert.deepEqual(daemon.service.scheduler.tick().sort(), [gc.id, verify.id].sort());
      const kinds = new Map(daemon.service.tasks.list(2).map((t) => [t.kind, t.id]));
      for (const kind of ['repository.verify', 'repository.gc']) {
        const id = kinds.get(kind);
        assert.ok(id !== undefined, kind);
        const done = await daemon.service.tasks.wait(id);
        assert.equal(done.state, 'succeeded', `${kind}: ${JSON.stringify(done.error)}`);
      }
    } finally {
      await daemon.close();
    }
  });
});
