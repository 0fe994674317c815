// Cancelling repository tasks through the daemon, against real QEMU: a
// running prune, gc and restore each end "cancelled" with TASK_CANCELLED,
// leave nothing half-written listed (no restored image, every listed backup
// whole), the repository verifies clean afterwards (every pack read and
// hashed), and the same operation run again completes. Each task is
// cancelled from its own first progress event, so the cancel always lands
// while the operation still has steps to go (no timing involved).

import assert from 'node:assert/strict';
import { existsSync, openSync, readSync, closeSync, readdirSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { TestEnv } from '../helpers/env.js';
import { ApiClient } from '../helpers/http.js';

type Obj = Record<string, unknown>;
const MiB = 1 << 20;
const DISK = 96 * MiB;

/** Cancels every task of `kind` at its first progress event. */
function cancelOnFirstProgress(daemon: Daemon, kind: string): () => void {
  const seen = new Set<string>();
  return daemon.service.tasks.subscribe((e) => {
    if (e.type !== 'progress' || e.task.kind !== kind || seen.has(e.task.id)) return;
    seen.add(e.task.id);
    daemon.service.tasks.cancel(e.task.id);
  });
}

function allBytesAre(file: string, value: number): boolean {
  const fd = openSync(file, 'r');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (let at = 0; ; at += buf.length) {
      const n = readSync(fd, buf, 0, buf.length, at);
      if (n === 0) return true;
      for (let i = 0; i < n; i++) if (buf[i] !== value) return false;
    }
  } finally {
    closeSync(fd);
  }
}

describe('cancelling repository tasks through the daemon (real QEMU)', () => {
  let env: TestEnv;
  let daemon: Daemon;
  let api: ApiClient;
  let repo: string;

  before(async () => {
    env = new TestEnv('qbt-cancel-');
    repo = env.path('repo');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: DISK }]);
    await env.qb.domains.start('vm', { paused: true });
    // Three backups, each after the whole disk was overwritten: each older backup's data is its own pack.
    for (const pattern of [0x11, 0x22, 0x33]) {
      await env.qb.domains.monitorCommand('vm', `qemu-io -d sda "write -P ${pattern} 0 ${DISK}"`, { hmp: true });
      await env.qb.repository.backup('vm', { repo });
    }
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    assert.ok(daemon.bootstrapToken !== undefined);
    api = new ApiClient(daemon.url, daemon.bootstrapToken);
  });

  after(async () => {
    await daemon?.close();
    await env?.cleanup();
  });

  async function cancelled(kind: string, url: string, body: Obj): Promise<void> {
    const stop = cancelOnFirstProgress(daemon, kind);
    try {
      const r = await api.post(url, body);
      assert.equal(r.status, 202, r.text);
      const done = await api.waitTask(String((r.body as Obj)['id']));
      assert.equal(done['state'], 'cancelled', JSON.stringify(done['error']));
      assert.equal((done['error'] as Obj)['code'], 'TASK_CANCELLED');
    } finally {
      stop();
    }
  }

  async function verifiesClean(): Promise<void> {
    const report = await env.qb.repository.verify({ repo }, { readData: true });
    assert.deepEqual(report.problems, []);
  }

  test('a cancelled prune removes the backups it got to, each whole; the rest stay listed; the next prune finishes', async () => {
    const all = await env.qb.repository.list({ repo }, 'vm');
    assert.equal(all.length, 3);
    await cancelled('repository.prune', '/api/repository/prune', { domain: 'vm', repo, keepLast: 1 });
    // The first removal happened, then the cancel stopped the second.
    assert.deepEqual((await env.qb.repository.list({ repo }, 'vm')).map((m) => m.id), [all[1]?.id, all[2]?.id]);
    await verifiesClean();
    await env.qb.repository.prune('vm', { repo, keepLast: 1 });
    assert.deepEqual((await env.qb.repository.list({ repo }, 'vm')).map((m) => m.id), [all[2]?.id]);
    await verifiesClean();
  });

  test('a cancelled gc leaves a repository that verifies clean; the next gc frees the rest', async () => {
    await cancelled('repository.gc', '/api/repository/gc', { repo });
    await verifiesClean();
    const report = await env.qb.repository.gc({ repo });
    assert.ok(report.packsDeleted >= 1, JSON.stringify(report));
    await verifiesClean();
  });

  test('a cancelled restore leaves no image, finished or partial; the next restore holds the disk\'s bytes', async () => {
    const to = env.path('restored');
    await cancelled('repository.restore', '/api/repository/restore', { domain: 'vm', repo, to, format: 'raw' });
    assert.deepEqual(existsSync(to) ? readdirSync(to) : [], []);
    const r = await api.post('/api/repository/restore', { domain: 'vm', repo, to, format: 'raw' });
    const done = await api.waitTask(String((r.body as Obj)['id']));
    assert.equal(done['state'], 'succeeded', JSON.stringify(done['error']));
    assert.deepEqual(readdirSync(to), ['sda.raw']);
    assert.ok(allBytesAre(`${to}/sda.raw`, 0x33), 'the restored disk holds the newest backup\'s bytes');
    await verifiesClean();
  });

  test('backup and until together are refused by the library in one sentence, through HTTP before any task', async () => {
    const r = await api.post('/api/repository/restore', { domain: 'vm', repo, to: env.path('never'), backup: 'x', until: '2026-01-01T00:00:00Z' });
    assert.equal(r.status, 400, r.text);
    assert.match(r.text, /give either a backup id or a time \(until\), not both/);
    await assert.rejects(env.qb.repository.restore('vm', { repo, to: env.path('never'), backup: 'x', until: new Date() }), /INVALID_ARGUMENT|not both/);
  });
});
