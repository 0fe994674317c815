// The oracle's pure parts without QEMU: the generator is a function of its
// seed, every action survives its text form, the model's coverage rules, and
// the shrinker (with a stand-in run) finds the actions a failure needs.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatAction, formatScenario, generateScenario, parseAction, parseScenario, type Action, type Scenario } from '../fuzz/actions.js';
import { Model } from '../fuzz/model.js';
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

test('parseAction refuses what it does not know', () => {
  assert.throws(() => parseAction('explode disk=disk0'), /unknown action/);
  assert.throws(() => parseAction('write disk=disk0 offset=0 length=512'), /missing field "pattern"/);
  assert.throws(() => parseAction('checkpoint name=c1 colour=red'), /unknown field/);
  assert.deepEqual(parseAction('push since=c1'), { kind: 'push', since: 'c1' });
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
