// The oracle's pure parts without QEMU: the generator is a function of its
// seed, every action survives its text form, the model's coverage rules, and
// the shrinker (with a stand-in run) finds the actions a failure needs.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatAction, formatScenario, generateScenario, parseAction, parseScenario, RESIZE_PATHS, type Action, type Scenario } from '../fuzz/actions.js';
import { MAX_DISK_BYTES, MIN_DISK_BYTES, Model } from '../fuzz/model.js';
import type { RunResult } from '../fuzz/scenario.js';
import { shrink } from '../fuzz/shrink.js';

test('a scenario is a function of its seed and survives its text form', () => {
  for (let seed = 1; seed <= 30; seed++) {
    const s = generateScenario(seed, 60, { repoFull: true });
    assert.deepEqual(generateScenario(seed, 60, { repoFull: true }), s);
    assert.deepEqual(parseScenario(formatScenario(s, 'x')), s);
    assert.deepEqual(parseScenario(JSON.stringify(s)), s);
    for (const a of s.actions) assert.equal(formatAction(a).includes('\n'), false);
  }
  assert.equal(generateScenario(5, 200).actions.some((a) => a.kind === 'repo-full'), false, 'no repo-full where it cannot be staged');
});

test('repository maintenance: prune keeps fewer than there are and is mostly followed by gc; gc and verify only once there are backups', () => {
  const kinds = new Map<string, number>();
  let pruneThenGc = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const { actions } = generateScenario(seed, 60, { repoFull: true });
    let backups = 0;
    actions.forEach((a, i) => {
      kinds.set(a.kind, (kinds.get(a.kind) ?? 0) + 1);
      if (a.kind === 'repo') backups++;
      if (a.kind === 'repo-gc' || a.kind === 'repo-verify') assert.ok(backups > 0, `seed ${seed}: ${a.kind} before any backup`);
      if (a.kind === 'repo-prune') {
        assert.ok(a.keep >= 1 && a.keep <= 3 && a.keep < backups, `seed ${seed}: keep ${a.keep} of ${backups}`);
        backups = a.keep;
        if (actions[i + 1]?.kind === 'repo-gc') pruneThenGc++;
      }
    });
  }
  for (const k of ['repo', 'repo-full', 'repo-prune', 'repo-gc', 'repo-verify']) assert.ok((kinds.get(k) ?? 0) > 0, `no ${k} in 40 seeds`);
  assert.ok(pruneThenGc > 0, 'no prune followed by gc');
});

test('resizes: whole clusters within the bounds, every path, shrinks sometimes grown back at once; guest I/O stays inside the disk', () => {
  const paths = new Set<string>();
  let grows = 0;
  let shrinks = 0;
  let growBack = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const s = generateScenario(seed, 60, { repoFull: true });
    const sizes = new Map(s.setup.map((d) => [d.name, d]));
    s.actions.forEach((a, i) => {
      if (a.kind === 'attach') sizes.set(a.disk, { name: a.disk, sizeBytes: a.size, clusterSizeBytes: a.cluster });
      const d = 'disk' in a ? sizes.get(a.disk) : undefined;
      if (a.kind === 'write' || a.kind === 'zero' || a.kind === 'discard') assert.ok(d !== undefined && a.offset + a.length <= d.sizeBytes, `seed ${seed}: ${formatAction(a)} past the end`);
      if (a.kind !== 'resize' || d === undefined) return;
      assert.ok(a.size >= MIN_DISK_BYTES && a.size <= MAX_DISK_BYTES && a.size % d.clusterSizeBytes === 0 && a.size !== d.sizeBytes, `seed ${seed}: ${formatAction(a)} of ${d.sizeBytes}/${d.clusterSizeBytes}`);
      paths.add(a.via);
      if (a.size > d.sizeBytes) grows++;
      else shrinks++;
      const next = s.actions[i + 1];
      if (a.size < d.sizeBytes && next?.kind === 'resize' && next.disk === a.disk && next.size === d.sizeBytes) growBack++;
      d.sizeBytes = a.size;
    });
  }
  assert.deepEqual([...paths].sort(), [...RESIZE_PATHS].sort());
  assert.ok(grows > 0 && shrinks > 0 && growBack > 0, `${grows} grows, ${shrinks} shrinks, ${growBack} grown back`);
});

test('parseAction refuses what it does not know', () => {
  assert.throws(() => parseAction('explode disk=disk0'), /unknown action/);
  assert.throws(() => parseAction('write disk=disk0 offset=0 length=512'), /missing field "pattern"/);
  assert.throws(() => parseAction('checkpoint name=c1 colour=red'), /unknown field/);
  assert.deepEqual(parseAction('push since=c1'), { kind: 'push', since: 'c1' });
  assert.deepEqual(parseAction('repo-prune keep=2'), { kind: 'repo-prune', keep: 2 });
  assert.deepEqual(parseAction('repo-gc'), { kind: 'repo-gc' });
  assert.deepEqual(parseAction('resize disk=disk1 size=3145728 via=qmp'), { kind: 'resize', disk: 'disk1', size: 3145728, via: 'qmp' });
  assert.throws(() => parseAction('resize disk=disk1 size=3145728'), /missing field "via"/);
  assert.throws(() => parseAction('repo mode=push alias=r1'), /unknown field/, 'format 2 has no push/pull mode');
});

test('the model: a detach loses coverage, a delete keeps it for earlier checkpoints, a crash loses all', () => {
  const m = new Model();
  const a = m.addDisk({ name: 'disk0', sizeBytes: 1 << 20, clusterSizeBytes: 65536 });
  const b = m.addDisk({ name: 'disk1', sizeBytes: 1 << 20, clusterSizeBytes: 65536 });
  m.attach(a);
  m.attach(b);
  m.addCheckpoint('c1');
  m.write(a, 70000, 10, 7);
  m.addCheckpoint('c2');
  m.write(a, 0, 1, 9);
  assert.deepEqual([...(m.checkpoint('c1')?.disks.get('disk0')?.dirty ?? [])].sort(), [0, 1]);
  m.deleteCheckpoint('c2', false);
  assert.equal(m.expectedFull('c1', a), undefined);
  m.detach(b);
  m.attach(b);
  assert.deepEqual([...(m.expectedFull('c1', b) ?? [])], ['detached-since']);
  assert.deepEqual([...(m.expectedFull('c9', a) ?? [])], ['checkpoint-missing']);
  m.crash();
  assert.ok(m.expectedFull('c1', a)?.has('bitmap-missing'));
});

test('the model: a resize cuts or zero-extends the content (a regrown area reads zeroes) and loses coverage of earlier checkpoints only', () => {
  const m = new Model();
  const a = m.addDisk({ name: 'disk0', sizeBytes: 2 << 20, clusterSizeBytes: 65536 });
  const b = m.addDisk({ name: 'disk1', sizeBytes: 1 << 20, clusterSizeBytes: 65536 });
  m.attach(a);
  m.attach(b);
  m.write(a, 0, 2 << 20, 0xab);
  m.addCheckpoint('c1');
  m.addRepoBackup('r1');
  m.resize(a, 1 << 20);
  assert.equal(a.content.length, 1 << 20);
  assert.equal(a.sizeBytes, 1 << 20);
  m.addCheckpoint('c2');
  m.resize(a, 2 << 20);
  assert.equal(a.content.length, 2 << 20);
  assert.equal(a.content[(1 << 20) - 1], 0xab);
  assert.ok(a.content.subarray(1 << 20).every((x) => x === 0), 'the regrown area reads zeroes');
  for (const cp of ['c1', 'r1', 'c2']) assert.deepEqual([...(m.expectedFull(cp, a) ?? [])], ['resized'], cp);
  assert.equal(m.expectedFull('c1', b), undefined, 'the other disk keeps its coverage');
  assert.deepEqual([...(m.expectedRepoFull(a) ?? [])], ['resized']);
  m.addCheckpoint('c3');
  assert.equal(m.expectedFull('c3', a), undefined, 'a later checkpoint starts clean');
  m.resize(a, 2 << 20);
  assert.equal(m.expectedFull('c3', a), undefined, 'the same size is no resize');
});

test('the model of the repository: level and dirty clusters since a disk\'s last backup, prune merges checkpoints away', () => {
  const m = new Model();
  const a = m.addDisk({ name: 'disk0', sizeBytes: 1 << 20, clusterSizeBytes: 65536 });
  const b = m.addDisk({ name: 'disk1', sizeBytes: 1 << 20, clusterSizeBytes: 65536 });
  m.attach(a);
  m.attach(b);
  assert.deepEqual([...(m.expectedRepoFull(a) ?? [])], ['no-earlier-backup']);
  m.addRepoBackup('r1');
  m.write(a, 0, 70000, 3);
  assert.equal(m.expectedRepoLevel(a), 'incremental');
  assert.deepEqual([...m.dirtySinceRepo(a)].sort(), [0, 1]);
  m.detach(b);
  m.addRepoBackup('r2'); // without disk1
  m.attach(b);
  assert.equal(m.lastRepo(b)?.alias, 'r1');
  assert.ok(m.expectedRepoFull(b)?.has('detached-since'));
  assert.equal(m.dirtySinceRepo(a).size, 0);
  assert.deepEqual(m.pruneRepo(1).map((x) => x.alias), ['r1']);
  assert.equal(m.checkpoint('r1'), undefined);
  assert.deepEqual([...(m.expectedRepoFull(b) ?? [])], ['no-earlier-backup']);
  assert.equal(m.expectedRepoLevel(a), 'incremental');
});

test('the shrinker keeps only the actions the failure needs', async () => {
  const actions: Action[] = Array.from({ length: 30 }, (_, i) => ({ kind: 'checkpoint', name: `c${i}` }));
  const needed = new Set(['c3', 'c17', 'c22']);
  // Stand-in run: fails with "content" at c22 when c3 and c17 came before it.
  const run = (s: Scenario): Promise<RunResult> => {
    const names = s.actions.map((a) => (a.kind === 'checkpoint' ? a.name : ''));
    const at = names.indexOf('c22');
    const fails = at >= 0 && names.slice(0, at).includes('c3') && names.slice(0, at).includes('c17');
    const r: RunResult = { scenario: s, stepsRun: s.actions.length, skipped: 0, backupsChecked: 0 };
    if (fails) r.failure = { index: at, action: 'checkpoint name=c22', check: 'content', message: 'x' };
    return Promise.resolve(r);
  };
  const s: Scenario = { seed: 1, setup: [{ name: 'disk0', sizeBytes: 1 << 20, clusterSizeBytes: 65536 }], actions };
  const first = await run(s);
  assert.ok(first.failure !== undefined);
  const r = await shrink(s, first.failure, run, { maxAttempts: 200, deadlineMs: 60_000, log: () => undefined });
  assert.deepEqual(
    r.scenario.actions.map((a) => (a.kind === 'checkpoint' ? a.name : '')),
    ['c3', 'c17', 'c22'],
  );
  assert.ok(r.attempts < 60, `${r.attempts} attempts`);
  assert.ok([...needed].every((n) => r.scenario.actions.some((a) => a.kind === 'checkpoint' && a.name === n)));
});
