// Repository locks as leases: renewal, a dead host's lease taken over once it
// runs out, a live one from another host honoured, and a holder that lost its
// lease told so before it commits anything.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { acquireLock, CLOCK_SKEW_MS, LEASE_MS, liveLocks, type LockInfo } from '../../src/repository/locks.js';

const fresh = (): LocalBackend => new LocalBackend(mkdtempSync(join(tmpdir(), 'qb-locks-')));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function otherHost(overrides: Partial<LockInfo>): Buffer {
  const now = Date.now();
  const info: LockInfo = { kind: 'backup', domain: 'web', host: 'host-b.invalid', boot: 'other-boot', pid: 4242, pidStart: '1', takenMs: now - 60_000, leaseMs: now + 60_000, ...overrides };
  return Buffer.from(JSON.stringify(info));
}

describe('a gc and the backups that begin while it runs', () => {
  it('a backup or reader waits for a running gc before it looks at the packs; a gc never waits', async () => {
    const b = fresh();
    const gc = await acquireLock(b, 'gc', null);
    const waits: string[] = [];
    let backupTaken = false;
    const backup = acquireLock(b, 'backup', 'web', { gcPollMs: 20, onWait: (w) => waits.push(w) }).then((l) => {
      backupTaken = true;
      return l;
    });
    const serve = acquireLock(b, 'serve', 'web', { gcPollMs: 20 });
    // Wait until the backup reports that it waits (not a fixed pause: a loaded machine may be late).
    for (let i = 0; i < 200 && waits.length === 0; i++) await sleep(50);
    assert.equal(backupTaken, false, 'the backup waits while the gc runs');
    assert.equal(waits.length, 1);
    assert.match(waits[0] ?? '', /waiting for a gc of repository/);
    // Its lock is written already: a gc beginning now would see it.
    assert.ok((await liveLocks(b)).some((l) => l.info.kind === 'backup'));
    await gc.release();
    const [held, served] = await Promise.all([backup, serve]);
    assert.equal(held.info.kind, 'backup');
    await held.release();
    await served.release();
    // With a backup running, a gc starts at once (it condemns rather than deletes).
    const running = await acquireLock(b, 'backup', 'web');
    const second = await acquireLock(b, 'gc', null);
    await second.release();
    await running.release();
  });
});

describe('repository locks as leases', () => {
  it('renews the lease by a new object, keeping when the lock was taken', async () => {
    const b = fresh();
    // A lease long enough that a loaded machine cannot let it run out between renewals.
    const lock = await acquireLock(b, 'backup', 'web', { leaseMs: 2000 });
    try {
      const firstId = lock.id;
      const { takenMs, leaseMs } = lock.info;
      // Renewed every 500 ms; a loaded machine may be late, so look for up to 10 s.
      for (let i = 0; i < 200 && lock.id === firstId; i++) await sleep(50);
      assert.notEqual(lock.id, firstId, 'renewed under a new id');
      assert.equal(lock.info.takenMs, takenMs);
      assert.ok(lock.info.leaseMs > leaseMs);
      const keys = (await b.list('locks/')).map((o) => o.key);
      assert.deepEqual(keys, [`locks/${lock.id}`], 'the old lease object is gone');
      await lock.assertHeld();
    } finally {
      await lock.release();
    }
    assert.deepEqual(await b.list('locks/'), []);
  });

  it('a live lease of another host blocks a second backup of the domain and counts for gc', async () => {
    const b = fresh();
    await b.putIfAbsent('locks/00000000000000aa', otherHost({}));
    await assert.rejects(acquireLock(b, 'backup', 'web'), (err: unknown) => isQbackupError(err, 'REPO_LOCKED') && /process 4242 on host-b\.invalid/.test((err as Error).message));
    const other = await acquireLock(b, 'backup', 'db');
    await other.release();
    assert.equal((await liveLocks(b)).length, 1);
  });

  it('the lease of a dead host is taken over once it ran out (beyond the clock-skew margin)', async () => {
    const b = fresh();
    await b.putIfAbsent('locks/00000000000000bb', otherHost({ leaseMs: Date.now() - CLOCK_SKEW_MS - 1 }));
    await b.putIfAbsent('locks/00000000000000cc', otherHost({ domain: 'db', leaseMs: Date.now() - 1000 }));
    const lock = await acquireLock(b, 'backup', 'web');
    try {
      const left = (await b.list('locks/')).map((o) => o.key).sort();
      assert.deepEqual(left, ['locks/00000000000000cc', `locks/${lock.id}`].sort(), 'the expired lease went; one inside the skew margin stays');
    } finally {
      await lock.release();
    }
  });

  it('a holder whose lease object was removed as expired is told before it commits', async () => {
    const b = fresh();
    const lock = await acquireLock(b, 'backup', 'web', { leaseMs: 60_000 });
    await b.delete(`locks/${lock.id}`); // what a gc on another host does to a lease it thinks ran out
    await assert.rejects(lock.assertHeld(), (err: unknown) => isQbackupError(err, 'REPO_LOCKED') && /Lost the backup lock/.test((err as Error).message));
    await lock.release();
  });

  it('a lease that could not be renewed in time is lost, and not renewed later', async () => {
    const b = fresh();
    const lock = await acquireLock(b, 'backup', 'web', { leaseMs: 100 });
    // Block the renewals: the event loop is busy past the whole lease.
    const until = Date.now() + 150;
    while (Date.now() < until) {
      // busy
    }
    await sleep(60);
    await assert.rejects(lock.assertHeld(), (err: unknown) => isQbackupError(err, 'REPO_LOCKED') && /ran out/.test((err as Error).message));
    await lock.release();
    assert.deepEqual(await b.list('locks/'), []);
  });
});

describe('temporary lock files left by a killed writer', () => {
  it('the next lock scan removes a locks/.tmp-* file once its writer is gone (older than a lease), and keeps a fresh one', async () => {
    const b = fresh();
    const stale = join(b.root, 'locks', '.tmp-00112233aabbccdd');
    const fresh1 = join(b.root, 'locks', '.tmp-99887766aabbccdd');
    mkdirSync(join(b.root, 'locks'), { recursive: true });
    writeFileSync(stale, 'half a lock');
    writeFileSync(fresh1, 'a lock being written');
    const old = new Date(Date.now() - LEASE_MS - CLOCK_SKEW_MS - 1000);
    utimesSync(stale, old, old);
    await liveLocks(b);
    assert.ok(!existsSync(stale), 'the stale temporary file is removed');
    assert.ok(existsSync(fresh1), 'a writer that may still be alive keeps its file');
    const lock = await acquireLock(b, 'gc', null);
    await lock.release();
  });
});
