// The daemon's service parts without QEMU: the task manager (queue, global
// limit, one task per domain, cancellation, persistence and the marking of
// interrupted tasks), schedule parsing and the scheduler on a fake clock,
// tokens (hashed, read-only, revoked), and the error → status table.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { ERROR_CODES, type ErrorCode } from '../../src/errors.js';
import { HTTP_STATUS, httpError } from '../../src/http/errors.js';
import { RateLimiter } from '../../src/http/rate-limit.js';
import { Scheduler, Schedules, cronFor } from '../../src/service/schedules.js';
import { TaskManager } from '../../src/service/tasks.js';
import { openDatabase, type Db } from '../../src/store/db.js';
import { ScheduleStore } from '../../src/store/schedules.js';
import { TaskStore } from '../../src/store/tasks.js';
import { TokenStore } from '../../src/store/tokens.js';
import { QbackupError } from '../../src/errors.js';

const dirs: string[] = [];
function db(): Db {
  const dir = mkdtempSync(join(tmpdir(), 'qbt-svc-'));
  dirs.push(dir);
  return openDatabase(join(dir, 'qbackup.db'));
}
after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

/** A promise with its resolve, to hold a task running until the test lets it go. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open = (): void => undefined;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

describe('TaskManager', () => {
  test('runs under the global limit, one task per domain at a time, and keeps results', async () => {
    const tasks = new TaskManager(new TaskStore(db()), { maxConcurrent: 2 });
    const g = gate();
    const a1 = tasks.submit({ kind: 'k', domain: 'a', run: async (ctx) => (ctx.progress({ phase: 'p', doneBytes: 5, totalBytes: 10 }), await g.promise, 'one') });
    const a2 = tasks.submit({ kind: 'k', domain: 'a', run: async () => 'two' });
    const b = tasks.submit({ kind: 'k', domain: 'b', run: async () => 'three' });
    const c = tasks.submit({ kind: 'k', run: async () => 'four' });
    assert.equal(tasks.get(a1.id).state, 'running');
    assert.equal(tasks.get(a1.id).progress?.doneBytes, 5);
    assert.equal(tasks.get(a2.id).state, 'queued', 'the second task of domain a waits for the first');
    assert.equal((await tasks.wait(b.id)).result, 'three');
    assert.equal((await tasks.wait(c.id)).result, 'four');
    assert.equal(tasks.get(a2.id).state, 'queued');
    g.open();
    assert.equal((await tasks.wait(a2.id)).result, 'two');
    assert.equal(tasks.get(a1.id).state, 'succeeded');
  });

  test('a domain is a name on a connection: same-named domains of two connections run together, the connection is kept', async () => {
    const store = new TaskStore(db());
    const tasks = new TaskManager(store, { maxConcurrent: 3 });
    const g = gate();
    const own = tasks.submit({ kind: 'k', domain: 'vm', connection: 'qbackup:///', run: async () => (await g.promise, 'own') });
    const lv = tasks.submit({ kind: 'k', domain: 'vm', connection: 'qemu:///system', run: async () => (await g.promise, 'libvirt') });
    const lv2 = tasks.submit({ kind: 'k', domain: 'vm', connection: 'qemu:///system', run: async () => 'libvirt again' });
    // A task recorded without a connection may be on any: it waits for both.
    const any = tasks.submit({ kind: 'k', domain: 'vm', run: async () => 'any' });
    assert.deepEqual([own, lv, lv2, any].map((t) => tasks.get(t.id).state), ['running', 'running', 'queued', 'queued']);
    assert.deepEqual(tasks.active({ domain: 'vm', connection: 'qemu:///system' }).map((t) => t.id), [lv.id, lv2.id, any.id]);
    assert.deepEqual(tasks.active({ domain: 'vm', connection: 'qbackup:///' }).map((t) => t.id), [own.id, any.id]);
    g.open();
    assert.equal((await tasks.wait(lv2.id)).result, 'libvirt again');
    assert.equal((await tasks.wait(any.id)).result, 'any');
    assert.deepEqual([own, lv, any].map((t) => tasks.get(t.id).connection), ['qbackup:///', 'qemu:///system', null]);
    // Kept in the store: a new manager (a restarted daemon) lists each task with its connection.
    const again = new TaskManager(store);
    assert.equal(again.get(lv.id).connection, 'qemu:///system');
    assert.equal(again.list().find((t) => t.id === own.id)?.connection, 'qbackup:///');
  });

  test('an interrupted task names its connection', () => {
    const store = new TaskStore(db());
    const first = new TaskManager(store);
    const stuck = first.submit({ kind: 'repository.backup', domain: 'vm', connection: 'qemu:///system', run: () => new Promise(() => undefined) });
    const [info] = new TaskManager(store).recoverInterrupted();
    assert.deepEqual([info?.id, info?.connection], [stuck.id, 'qemu:///system']);
    assert.match(info?.error?.message ?? '', /\(repository\.backup of domain "vm" \(qemu:\/\/\/system\)\) did not finish/);
  });

  test('a failed task keeps the error code and message; cancel: queued at once, running only when it can stop', async () => {
    const tasks = new TaskManager(new TaskStore(db()), { maxConcurrent: 1 });
    const failed = await tasks.wait(tasks.submit({ kind: 'k', run: async () => { throw new QbackupError('DOMAIN_NOT_FOUND', 'Domain "x" does not exist'); } }).id);
    assert.deepEqual([failed.state, failed.error], ['failed', { code: 'DOMAIN_NOT_FOUND', message: 'Domain "x" does not exist' }]);
    const g = gate();
    const running = tasks.submit({ kind: 'slow', run: () => g.promise });
    const queued = tasks.submit({ kind: 'k', run: async () => 'never' });
    assert.equal(tasks.cancel(queued.id).state, 'cancelled');
    assert.throws(() => tasks.cancel(running.id), (e: unknown) => e instanceof QbackupError && e.code === 'TASK_NOT_CANCELLABLE' && /running slow cannot stop mid-way/.test(e.message));
    g.open();
    await tasks.wait(running.id);
    const stoppable = tasks.submit({ kind: 'k', cancellable: true, run: (ctx) => new Promise((_r, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason))) });
    await new Promise((r) => setImmediate(r));
    tasks.cancel(stoppable.id);
    assert.equal((await tasks.wait(stoppable.id)).state, 'cancelled');
    assert.throws(() => tasks.cancel(stoppable.id), /already been cancelled/);
    assert.throws(() => tasks.get('t0-00000000'), (e: unknown) => e instanceof QbackupError && e.code === 'TASK_NOT_FOUND');
  });

  test('a task left running by a dead process is failed with the reason by the next manager; finished ones are kept, bounded', async () => {
    const d = db();
    const first = new TaskManager(new TaskStore(d), { keepFinished: 3 });
    for (let i = 0; i < 5; i++) await first.wait(first.submit({ kind: 'k', run: async () => i }).id);
    const stuck = first.submit({ kind: 'repository.backup', domain: 'vm1', run: () => new Promise(() => undefined) });
    // the process "dies": a new manager opens the same database
    const second = new TaskManager(new TaskStore(d));
    const interrupted = second.recoverInterrupted();
    assert.deepEqual(interrupted.map((t) => t.id), [stuck.id]);
    const t = second.get(stuck.id);
    assert.equal(t.state, 'failed');
    assert.equal(t.error?.code, 'TASK_INTERRUPTED');
    assert.match(t.error?.message ?? '', /Task ".*" \(repository.backup of domain "vm1"\) did not finish: the daemon stopped while it was running/);
    assert.equal(second.list().filter((x) => x.id !== stuck.id).length, 3, 'at most keepFinished finished tasks were kept');
    assert.equal(second.list()[0]?.id, stuck.id, 'newest first');
  });
});

describe('schedules', () => {
  test('"daily", "weekly", "hourly" and cron patterns; others are refused with one sentence', () => {
    assert.equal(cronFor('daily 02:00'), '0 2 * * *');
    assert.equal(cronFor('weekly sun 03:30'), '30 3 * * 0');
    assert.equal(cronFor('hourly :15'), '15 * * * *');
    assert.equal(cronFor('*/10 1-5 * * mon'), '*/10 1-5 * * mon');
    for (const bad of ['daily 25:00', 'weekly xyz 01:00', 'at teatime', '* * *', '99 * * * *']) {
      assert.throws(() => cronFor(bad), (e: unknown) => e instanceof QbackupError && e.code === 'INVALID_ARGUMENT' && e.message.startsWith(`Invalid schedule "${bad}"`), bad);
    }
  });

  test('the scheduler runs a due schedule once per tick, skips a busy domain, and a missed run runs once', () => {
    const schedules = new Schedules(new ScheduleStore(db()));
    const start = Date.parse('2026-01-01T12:00:00Z');
    let now = start;
    let busy = false;
    const ran: string[] = [];
    const logs: string[] = [];
    const scheduler = new Scheduler(schedules, { now: () => now }, (s) => ran.push(s.domain ?? '-'), () => busy, (m) => logs.push(m));
    const s = schedules.add({ domain: 'vm1', when: 'hourly', repo: '/r' }, start);
    assert.deepEqual(scheduler.tick(), []);
    now = start + 3_600_000;
    assert.deepEqual(scheduler.tick(), [s.id]);
    assert.deepEqual(scheduler.tick(), []);
    now += 10 * 3_600_000; // ten slots missed: one run
    assert.deepEqual(scheduler.tick(), [s.id]);
    now += 3_600_000;
    busy = true;
    assert.deepEqual(scheduler.tick(), []);
    assert.match(logs.at(-1) ?? '', /skipped .* a backup of domain "vm1" is under way/);
    assert.deepEqual(ran, ['vm1', 'vm1']);
    assert.throws(() => schedules.add({ domain: '../etc', when: 'hourly', repo: '/r' }), (e: unknown) => e instanceof QbackupError && e.code === 'INVALID_NAME');
    assert.throws(() => schedules.add({ domain: 'vm1', when: 'hourly', repo: 'relative' }), /give an absolute path/);
    assert.throws(() => schedules.add({ when: 'hourly', repo: '/r' }), /A backup schedule needs a domain/);
    assert.throws(() => schedules.add({ action: 'gc', domain: 'vm1', when: 'hourly', repo: '/r' }), /whole repository/);
    assert.throws(() => schedules.add({ action: 'verify', when: 'hourly', repo: '/r', retention: { keepLast: 1 } }), /belong to backup schedules/);
    assert.equal(schedules.add({ action: 'gc', when: 'weekly sun 04:00', repo: '/r' }).cron, '0 4 * * 0');
    // copy: a target is required, belongs to copy only, and is absolute or s3://
    assert.throws(() => schedules.add({ action: 'copy', when: 'hourly', repo: '/r' }), /A copy schedule needs a target repository/);
    assert.throws(() => schedules.add({ action: 'backup', domain: 'vm1', when: 'hourly', repo: '/r', to: '/t' }), /belongs to copy schedules/);
    assert.throws(() => schedules.add({ action: 'copy', when: 'hourly', repo: '/r', to: 'rel' }), /target repository "rel": give an absolute path or an s3:\/\/ URL/);
    assert.throws(() => schedules.add({ action: 'copy', when: 'hourly', repo: '/r', to: '/r' }), /into itself/);
    const copy = schedules.add({ action: 'copy', domain: 'vm1', when: 'daily 03:00', repo: '/r', to: 's3://bucket/copies', toPasswordFile: '/pw' });
    assert.deepEqual([copy.action, copy.domain, copy.to, copy.toPasswordFile], ['copy', 'vm1', 's3://bucket/copies', '/pw']);
  });
});

describe('tokens', () => {
  test('stored hashed, read-only flag, revocation', () => {
    const d = db();
    const tokens = new TokenStore(d);
    const { token, info } = tokens.create('ops');
    assert.equal(info.readOnly, false);
    assert.equal(tokens.authenticate(token)?.name, 'ops');
    const stored = d.prepare('SELECT hash FROM api_tokens').all() as Array<{ hash: string }>;
    assert.ok(stored.every((r) => !r.hash.includes(token) && r.hash.length === 64), 'only a hash is stored');
    assert.equal(tokens.create('view', { readOnly: true }).info.readOnly, true);
    assert.throws(() => tokens.create('ops'), /a token of that name exists/);
    assert.throws(() => tokens.create('../x'), (e: unknown) => e instanceof QbackupError && e.code === 'INVALID_NAME');
    tokens.revoke('ops');
    assert.equal(tokens.authenticate(token), undefined);
    assert.throws(() => tokens.revoke('ops'), /no token of that name/);
  });
});

describe('HTTP error table', () => {
  test('every error code has a 4xx or 5xx status; a QbackupError keeps its message', () => {
    for (const code of Object.keys(ERROR_CODES) as ErrorCode[]) {
      const status = HTTP_STATUS[code];
      assert.ok(status >= 400 && status < 600, code);
    }
    assert.deepEqual(httpError(new QbackupError('DOMAIN_LOCKED', 'Domain "a" is busy')), { status: 409, body: { code: 'DOMAIN_LOCKED', message: 'Domain "a" is busy' }, internal: false });
    assert.equal(httpError(new Error('boom')).status, 500);
    assert.equal(httpError(new Error('boom')).internal, true);
  });
});

describe('rate limit', () => {
  test('a burst is allowed, then requests wait for tokens to come back', () => {
    const limiter = new RateLimiter({ ratePerSec: 2, burst: 3 });
    for (let i = 0; i < 3; i++) limiter.take('a', 0);
    assert.throws(() => limiter.take('a', 0), (e: unknown) => e instanceof QbackupError && e.code === 'RATE_LIMITED' && /Too many requests from a/.test(e.message));
    limiter.take('b', 0);
    limiter.take('a', 500);
    assert.throws(() => limiter.take('a', 500));
  });
});
