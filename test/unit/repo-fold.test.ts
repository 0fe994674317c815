// Folding index chains on prune (src/repository/fold.ts, prune.ts pruneStore):
// - planFold as a pure function: what is folded onto what, when a full index
//   is written, and that nothing is planned when every link is kept;
// - on a real local store: a kept backup whose chain ran through removed ones
//   resolves to the same slots afterwards, its chain holds only kept
//   backups' indexes, and gc then frees exactly the chunks and indexes only
//   removed backups used;
// - crash points: a prune killed after each of its writes or deletes leaves
//   every listed backup resolving exactly (before and after a gc), and the
//   next prune + gc finish the job.

import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { FaultingBackend } from '../../src/repository/backend/faulting.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { ZERO_ID } from '../../src/repository/chunk.js';
import { planFold, type FoldInput } from '../../src/repository/fold.js';
import { isQbackupError } from '../../src/errors.js';
import { collectGarbage } from '../../src/repository/gc.js';
import { acquireLock } from '../../src/repository/locks.js';
import type { Manifest } from '../../src/repository/manifest.js';
import { pruneStore } from '../../src/repository/prune.js';
import { Store } from '../../src/repository/store.js';
import { verifyStore } from '../../src/repository/verify.js';
import type { Faults } from '../../src/util/faults.js';

const C = 4096;
const SLOTS = 8;
const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'qb-fold-'));
  dirs.push(d);
  return d;
}

describe('planFold', () => {
  const input = (kept: Array<[string, string]>, links: Array<[string, string | undefined]>): FoldInput => ({
    kept: kept.map(([id, index]) => ({ id, disks: [{ target: 'sda', index }] })),
    parents: new Map(links),
  });
  // Chain i1 (full) ← i2 ← i3 ← i4 ← i5, backup b<n> owns i<n>.
  const chain: Array<[string, string | undefined]> = [['i1', undefined], ['i2', 'i1'], ['i3', 'i2'], ['i4', 'i3'], ['i5', 'i4']];

  it('plans nothing when every link is a kept backup', () => {
    assert.deepEqual(planFold(input([['b1', 'i1'], ['b2', 'i2'], ['b3', 'i3'], ['b4', 'i4'], ['b5', 'i5']], chain)), []);
    assert.deepEqual(planFold(input([['b1', 'i1']], chain)), []);
  });

  it('folds removed middle links into a delta on the nearest kept ancestor', () => {
    const steps = planFold(input([['b1', 'i1'], ['b4', 'i4'], ['b5', 'i5']], chain));
    assert.deepEqual(steps, [{ backup: 'b4', target: 'sda', index: 'i4', folded: ['i4', 'i3', 'i2'], base: { backup: 'b1', target: 'sda' }, kind: 'delta' }, { backup: 'b5', target: 'sda', index: 'i5', folded: ['i5'], base: { backup: 'b4', target: 'sda' }, kind: 'delta' }]);
  });

  it('writes a full index when no kept ancestor remains, and rebases the kept backups on it', () => {
    const steps = planFold(input([['b4', 'i4'], ['b5', 'i5']], chain));
    assert.deepEqual(
      steps.map((s) => [s.backup, s.kind, s.folded, s.base?.backup]),
      [
        ['b4', 'full', ['i4', 'i3', 'i2', 'i1'], undefined],
        ['b5', 'delta', ['i5'], 'b4'],
      ],
    );
  });

  it('writes a full index instead of a delta that would make the chain longer than allowed', () => {
    // With at most 2 deltas: b1 full, b2, b3 deltas; removing nothing but b4
    // puts b5 at depth 3 on b3 — too long, so b5 gets a full index.
    const steps = planFold(input([['b1', 'i1'], ['b2', 'i2'], ['b3', 'i3'], ['b5', 'i5']], chain), 2);
    assert.deepEqual(steps.map((s) => [s.backup, s.kind, s.folded]), [['b5', 'full', ['i5', 'i4']]]);
  });

  it('plans each disk of a backup on its own', () => {
    const kept: FoldInput['kept'] = [
      { id: 'b1', disks: [{ target: 'sda', index: 'a1' }, { target: 'sdb', index: 'x1' }] },
      { id: 'b3', disks: [{ target: 'sda', index: 'a3' }, { target: 'sdb', index: 'x3' }] },
    ];
    // sda: a1 ← a2 ← a3 (a2 removed); sdb: x3 is a new full index.
    const parents = new Map<string, string | undefined>([['a1', undefined], ['a2', 'a1'], ['a3', 'a2'], ['x1', undefined], ['x3', undefined]]);
    assert.deepEqual(planFold({ kept, parents }).map((s) => [s.backup, s.target, s.kind, s.folded]), [['b3', 'sda', 'delta', ['a3', 'a2']]]);
  });
});

/** A repository with a chain of backups of one 8-slot disk and what each must resolve to. */
interface Fixture {
  dir: string;
  ids: string[];
  /** Backup id → its slot table (hex chunk id per slot). */
  tables: Map<string, string[]>;
  /** Chunk hex → the backups whose table names it. */
  users: Map<string, Set<string>>;
}

function manifestOf(id: string, time: string, index: string, level: 'full' | 'incremental'): Manifest {
  return {
    format: 2, id, domain: 'vm', uuid: '00000000-0000-0000-0000-000000000000', time, endTime: time, checkpoint: `qb-${id}`, consistency: 'crash', domainXml: '<domain/>',
    disks: [{ target: 'sda', diskId: 'dk00000001', virtualSize: SLOTS * C, level, fullReason: level === 'full' ? 'first' : null, index, bytesRead: 0, bytesStored: 0, chunks: 0, newChunks: 0 }],
  };
}

/** Backup 0 is full; each later one is a delta writing a few slots with new content (and a hole). */
async function buildFixture(count: number): Promise<Fixture> {
  const dir = tempDir();
  const store = await Store.init(new LocalBackend(dir), { chunkSize: C });
  const ids: string[] = [];
  const tables = new Map<string, string[]>();
  let table: string[] = Array.from({ length: SLOTS }, () => ZERO_ID.toString('hex'));
  let parent: string | undefined;
  let fill = 1;
  for (let b = 0; b < count; b++) {
    const writer = store.chunkWriter();
    const changed = new Map<number, Buffer>();
    const slots = b === 0 ? [0, 1, 2, 3, 4, 5] : [b % SLOTS, (b * 3) % SLOTS, (b * 5 + 1) % SLOTS];
    for (const s of slots) {
      const data = Buffer.alloc(C, fill++);
      const id = store.chunkId(data);
      await writer.add(id, data);
      changed.set(s, id);
    }
    if (b === 3) changed.set(7, ZERO_ID); // a discard
    await writer.flush();
    table = [...table];
    for (const [s, id] of changed) table[s] = id.toString('hex');
    let index: string;
    if (parent === undefined) {
      index = await store.putIndex({ kind: 'full', chunkSize: C, virtualSize: SLOTS * C, ids: Buffer.concat(table.map((h) => Buffer.from(h, 'hex'))) });
    } else {
      const sorted = [...changed.keys()].sort((x, y) => x - y);
      index = await store.putIndex({ kind: 'delta', chunkSize: C, virtualSize: SLOTS * C, parent, slots: Uint32Array.from(sorted), ids: Buffer.concat(sorted.map((s) => changed.get(s) ?? ZERO_ID)) });
    }
    const id = `2026010${b + 1}T000000.000Z-000${b}`;
    await store.putManifest(manifestOf(id, `2026-01-0${b + 1}T00:00:00.000Z`, index, b === 0 ? 'full' : 'incremental'));
    ids.push(id);
    tables.set(id, table);
    parent = index;
  }
  const users = new Map<string, Set<string>>();
  for (const [id, t] of tables) for (const h of t) if (h !== ZERO_ID.toString('hex')) users.set(h, (users.get(h) ?? new Set()).add(id));
  return { dir, ids, tables, users };
}

/** Every listed backup resolves to its table; returns the listed ids. */
async function assertListedResolve(dir: string, fx: Fixture, readChunks: boolean): Promise<string[]> {
  const store = await Store.open(new LocalBackend(dir));
  await store.loadChunks();
  const listed = await store.manifests('vm');
  for (const m of listed) {
    const d = m.disks[0];
    assert.ok(d !== undefined);
    const table = await store.resolveIndex(d.index);
    const want = fx.tables.get(m.id);
    assert.ok(want !== undefined, `listed backup ${m.id} is one of the fixture's`);
    for (let s = 0; s < SLOTS; s++) {
      const id = table.ids.subarray(s * 32, s * 32 + 32);
      assert.equal(id.toString('hex'), want[s], `backup ${m.id} slot ${s}`);
      if (readChunks) await store.readChunk(id); // checks the chunk against its id
    }
  }
  return listed.map((m) => m.id);
}

/** Lets the first `budget` repository writes and deletes through and fails every later one: a process killed there. */
class KilledAfter implements Faults {
  mutations = 0;
  constructor(private readonly budget: number) {}
  at(point: string): void {
    if (point === 'repo-write' && ++this.mutations > this.budget) throw new Error('killed');
  }
}

describe('prune folds index chains (local store)', () => {
  it('keep-last 2 of 6: the kept backups resolve as before, their chains hold only kept indexes, gc frees exactly what only removed backups used', async () => {
    const fx = await buildFixture(6);
    const store = await Store.open(new LocalBackend(fx.dir));
    const { plan } = await pruneStore(store, 'vm', { keepLast: 2 });
    const kept = fx.ids.slice(-2);
    assert.deepEqual(plan.keep.map((k) => k.id).sort(), kept);
    assert.deepEqual(plan.folds.map((f) => [f.backup, f.kind, f.folded.length]), [[kept[0], 'full', 5], [kept[1], 'delta', 1]]);
    assert.deepEqual(await assertListedResolve(fx.dir, fx, true), kept);
    // Each kept backup's chain is made of kept backups' own indexes only.
    const manifests = await store.manifests('vm');
    const own = new Set(manifests.map((m) => m.disks[0]?.index));
    for (const m of manifests) {
      assert.equal(m.generation, 2, 'a folded backup has a new manifest generation');
      let at: string | undefined = m.disks[0]?.index;
      while (at !== undefined) {
        assert.ok(own.has(at), `link ${at} of ${m.id} belongs to a kept backup`);
        const index = await store.getIndex(at);
        at = index.kind === 'delta' ? index.parent : undefined;
      }
    }
    assert.equal((await store.backend.list('snapshots/')).length, 2, 'no old generation is left');
    const report = await collectGarbage(store);
    assert.equal(report.indexesDeleted, 6, 'the six old indexes (the kept ones were replaced)');
    const again = await Store.open(new LocalBackend(fx.dir));
    await again.loadChunks();
    for (const [hex, users] of fx.users) {
      const live = kept.some((k) => users.has(k));
      assert.equal(again.locate(Buffer.from(hex, 'hex')) !== undefined, live, `chunk ${hex.slice(0, 8)} (used by ${[...users].join(',')}) ${live ? 'stays' : 'goes'}`);
    }
    assert.deepEqual(await assertListedResolve(fx.dir, fx, true), kept);
    assert.deepEqual((await verifyStore(again, { readData: true })).problems, []);
    // Nothing more to fold: a second prune writes nothing.
    const second = await pruneStore(again, 'vm', { keepLast: 2 });
    assert.deepEqual(second.plan.folds, []);
  });

  it('prune and gc exclude each other (a gc would take a folded index for garbage before its manifest lands)', async () => {
    const fx = await buildFixture(3);
    const store = await Store.open(new LocalBackend(fx.dir));
    {
      await using _prune = await acquireLock(store.backend, 'prune', 'vm');
      await assert.rejects(collectGarbage(store), (err: unknown) => isQbackupError(err, 'REPO_LOCKED') && /a prune of domain "vm" runs/.test((err as Error).message));
    }
    {
      await using _gc = await acquireLock(store.backend, 'gc', null);
      await assert.rejects(pruneStore(store, 'vm', { keepLast: 1 }), (err: unknown) => isQbackupError(err, 'REPO_LOCKED') && /a gc runs/.test((err as Error).message));
      // A dry run takes no lock.
      assert.equal((await pruneStore(store, 'vm', { keepLast: 1 }, { dryRun: true })).plan.remove.length, 2);
    }
    assert.equal((await store.manifests('vm')).length, 3, 'nothing was removed');
  });

  it('a dry run plans the folds and changes nothing', async () => {
    const fx = await buildFixture(4);
    const store = await Store.open(new LocalBackend(fx.dir));
    const before = (await store.backend.list('')).map((o) => o.key).sort();
    const { plan } = await pruneStore(store, 'vm', { keepLast: 1 }, { dryRun: true });
    assert.deepEqual(plan.folds.map((f) => [f.backup, f.kind]), [[fx.ids[3], 'full']]);
    assert.deepEqual((await store.backend.list('')).map((o) => o.key).sort(), before);
  });

  it('a prune killed after any of its writes or deletes leaves every listed backup exact; the next prune and gc finish', async () => {
    const fx = await buildFixture(6);
    // How many writes and deletes a whole prune makes (lock, deletes, indexes, manifests, unlock).
    const probe = new KilledAfter(Infinity);
    await pruneStore(await Store.open(new FaultingBackend(new LocalBackend(cpDir(fx.dir)), probe)), 'vm', { keepLast: 2 });
    assert.ok(probe.mutations >= 10, `a prune makes ${probe.mutations} writes and deletes`);
    // The last one is the lock's release, whose failure a prune shrugs off (an unreleased lease expires on its own).
    for (let budget = 0; budget < probe.mutations - 1; budget++) {
      const dir = cpDir(fx.dir);
      const crashing = new FaultingBackend(new LocalBackend(dir), new KilledAfter(budget));
      await assert.rejects(pruneStore(await Store.open(crashing), 'vm', { keepLast: 2 }));
      rmSync(join(dir, 'locks'), { recursive: true, force: true }); // the killed process's lock: its holder is dead
      const listed = await assertListedResolve(dir, fx, false);
      assert.ok(fx.ids.slice(-2).every((k) => listed.includes(k)), `budget ${budget}: the kept backups are listed`);
      // gc right after the crash keeps every listed backup whole.
      await collectGarbage(await Store.open(new LocalBackend(dir)));
      assert.deepEqual(await assertListedResolve(dir, fx, true), listed, `budget ${budget}: gc after the crash`);
      // The next prune and gc complete the job.
      await pruneStore(await Store.open(new LocalBackend(dir)), 'vm', { keepLast: 2 });
      await collectGarbage(await Store.open(new LocalBackend(dir)));
      assert.deepEqual(await assertListedResolve(dir, fx, true), fx.ids.slice(-2), `budget ${budget}: after recovery`);
      const store = await Store.open(new LocalBackend(dir));
      assert.equal((await store.backend.list('indexes/')).length, 2, `budget ${budget}: only the two kept indexes remain`);
      assert.equal((await store.backend.list('snapshots/')).length, 2);
    }
  });
});

function cpDir(src: string): string {
  const dst = tempDir();
  cpSync(src, dst, { recursive: true, preserveTimestamps: true }); // gc reads objects' times (gc.ts step 7)
  return dst;
}
