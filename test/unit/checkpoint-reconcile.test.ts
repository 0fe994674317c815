// The decision half of reconcile (src/checkpoint/reconcile.ts): from checkpoint
// rows and the bitmaps on the images, which bitmaps to remove, enable or
// disable, and which coverage losses to record.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { BitmapState } from '../../src/checkpoint/bitmaps.js';
import { planReconcile, type ReconcileDisk, type ReconcileInputs } from '../../src/checkpoint/reconcile.js';
import type { CheckpointDiskRow, CheckpointLink } from '../../src/store/checkpoints.js';

let seq = 0;
function cp(name: string, parent: string | null, current = false): CheckpointLink {
  return { domain: 'vm', name, parent, is_current: current ? 1 : 0, created_seq: ++seq };
}
function row(checkpoint: string, diskId: string | null = 'dk1', mode: 'bitmap' | 'no' = 'bitmap', bitmap: string | null = checkpoint): CheckpointDiskRow {
  return { domain: 'vm', checkpoint, target: 'sda', disk_id: diskId, mode, bitmap: mode === 'bitmap' ? bitmap : null };
}
function bm(name: string, over: Partial<BitmapState> = {}): BitmapState {
  return { name, recording: false, persistent: true, inconsistent: false, busy: false, granularity: 65536, ...over };
}
const sda: ReconcileDisk = { target: 'sda', diskId: 'dk1', format: 'qcow2' };

/** c1 ← c2 ← c3 (current), one disk with a bitmap in each. */
function chain(bitmaps: BitmapState[], over: Partial<ReconcileInputs> = {}): ReconcileInputs {
  return {
    checkpoints: [cp('c1', null), cp('c2', 'c1'), cp('c3', 'c2', true)],
    checkpointDisks: [row('c1'), row('c2'), row('c3')],
    disks: [sda],
    bitmaps: new Map([['dk1', bitmaps]]),
    ...over,
  };
}
const healthy = (): BitmapState[] => [bm('c1'), bm('c2'), bm('c3', { recording: true })];

describe('planReconcile', () => {
  test('a healthy chain needs nothing', () => {
    assert.deepEqual(planReconcile(chain(healthy())), { actions: [], losses: [] });
  });

  test('a missing bitmap is recorded as a loss, and nothing is done to the images for it', () => {
    const plan = planReconcile(chain([bm('c1'), bm('c3', { recording: true })]));
    assert.deepEqual(plan.actions, []);
    assert.deepEqual(
      plan.losses.map((l) => [l.diskId, l.checkpoint, l.reason]),
      [['dk1', 'c2', 'bitmap-missing']],
    );
    assert.match(plan.losses[0]?.detail ?? '', /bitmap "c2" of disk "sda" disappeared/);
  });

  test('an inconsistent bitmap is recorded as a loss and removed', () => {
    const plan = planReconcile(chain([bm('c1'), bm('c2', { inconsistent: true }), bm('c3', { recording: true })]));
    assert.deepEqual(plan.actions, [{ op: 'remove', diskId: 'dk1', bitmap: 'c2' }]);
    assert.deepEqual(plan.losses.map((l) => [l.checkpoint, l.reason]), [['c2', 'bitmap-inconsistent']]);
  });

  test('leftover temporary bitmaps are removed unless busy; other foreign bitmaps stay', () => {
    const plan = planReconcile(
      chain([...healthy(), bm('qbackup-tmp-1a2b'), bm('qbackup-tmp-busy', { busy: true }), bm('someone-elses', { recording: true })]),
    );
    assert.deepEqual(plan.actions, [{ op: 'remove', diskId: 'dk1', bitmap: 'qbackup-tmp-1a2b' }]);
    assert.deepEqual(plan.losses, []);
  });

  test('temporary bitmaps are swept even without any checkpoint', () => {
    const plan = planReconcile({ checkpoints: [], checkpointDisks: [], disks: [sda], bitmaps: new Map([['dk1', [bm('qbackup-tmp-x')]]]) });
    assert.deepEqual(plan, { actions: [{ op: 'remove', diskId: 'dk1', bitmap: 'qbackup-tmp-x' }], losses: [] });
  });

  test('only the current bitmap is left recording', () => {
    const plan = planReconcile(chain([bm('c1', { recording: true }), bm('c2', { recording: true }), bm('c3', { recording: true })]));
    assert.deepEqual(plan.actions, [
      { op: 'disable', diskId: 'dk1', bitmap: 'c1' },
      { op: 'disable', diskId: 'dk1', bitmap: 'c2' },
    ]);
    assert.deepEqual(plan.losses, []);
  });

  test('a current bitmap found not recording is re-enabled, and the gap is a loss', () => {
    const plan = planReconcile(chain([bm('c1'), bm('c2'), bm('c3')]));
    assert.deepEqual(plan.actions, [{ op: 'enable', diskId: 'dk1', bitmap: 'c3' }]);
    assert.deepEqual(plan.losses.map((l) => [l.checkpoint, l.reason]), [['c3', 'bitmap-inconsistent']]);
    assert.match(plan.losses[0]?.detail ?? '', /not recording and was re-enabled/);
  });

  test('when the current bitmap is gone, the newest valid one on its path records (no loss for re-enabling it)', () => {
    const plan = planReconcile(chain([bm('c1', { recording: true }), bm('c2')]));
    assert.deepEqual(plan.actions, [
      { op: 'disable', diskId: 'dk1', bitmap: 'c1' },
      { op: 'enable', diskId: 'dk1', bitmap: 'c2' },
    ]);
    assert.deepEqual(plan.losses.map((l) => [l.checkpoint, l.reason]), [['c3', 'bitmap-missing']]);
  });

  test('a bitmap of another branch is never picked as the recorder, even when newer', () => {
    // c1 ← c2 ← c3 (current, bitmap lost) and c1 ← b1 (another branch, created last)
    const input = chain([bm('c1'), bm('c2'), bm('b1', { recording: true })], {
      checkpoints: [cp('c1', null), cp('c2', 'c1'), cp('c3', 'c2', true), cp('b1', 'c1')],
      checkpointDisks: [row('c1'), row('c2'), row('c3'), row('b1')],
    });
    const plan = planReconcile(input);
    assert.deepEqual(plan.actions, [
      { op: 'enable', diskId: 'dk1', bitmap: 'c2' },
      { op: 'disable', diskId: 'dk1', bitmap: 'b1' },
    ]);
  });

  test('no recorder when the current checkpoint has no bitmap on the disk: every valid bitmap is disabled', () => {
    const input = chain([bm('c1'), bm('c2', { recording: true })], { checkpointDisks: [row('c1'), row('c2'), row('c3', 'dk1', 'no')] });
    const plan = planReconcile(input);
    assert.deepEqual(plan.actions, [{ op: 'disable', diskId: 'dk1', bitmap: 'c2' }]);
    assert.deepEqual(plan.losses, []);
  });

  test('no recorder without a current checkpoint', () => {
    const input = chain([bm('c1', { recording: true })], {
      checkpoints: [cp('c1', null)],
      checkpointDisks: [row('c1')],
    });
    assert.deepEqual(planReconcile(input).actions, [{ op: 'disable', diskId: 'dk1', bitmap: 'c1' }]);
  });

  test('a custom bitmap name is matched by the row, not by the checkpoint name', () => {
    const input = chain([bm('c1'), bm('c2'), bm('mine', { recording: true })], { checkpointDisks: [row('c1'), row('c2'), row('c3', 'dk1', 'bitmap', 'mine')] });
    assert.deepEqual(planReconcile(input), { actions: [], losses: [] });
  });

  test('disks that cannot be read, and raw disks, are left alone', () => {
    const raw: ReconcileDisk = { target: 'sdb', diskId: 'dk2', format: 'raw' };
    const unread: ReconcileDisk = { target: 'sdc', diskId: 'dk3', format: 'qcow2' };
    const input = chain([], {
      disks: [raw, unread],
      checkpointDisks: [row('c3', 'dk2'), row('c3', 'dk3')],
      bitmaps: new Map([['dk2', [bm('qbackup-tmp-x')]]]),
    });
    assert.deepEqual(planReconcile(input), { actions: [], losses: [] });
  });

  test('actions per disk: temporary removals, then inconsistent removals, then enables/disables; disks in order', () => {
    const sdb: ReconcileDisk = { target: 'sdb', diskId: 'dk2', format: 'qcow2' };
    const input = chain([], {
      disks: [sda, sdb],
      checkpointDisks: [row('c1'), row('c2'), row('c3'), row('c1', 'dk2'), row('c2', 'dk2'), row('c3', 'dk2')],
      bitmaps: new Map([
        ['dk1', [bm('c1', { recording: true }), bm('c2', { inconsistent: true }), bm('c3', { recording: true }), bm('qbackup-tmp-a')]],
        ['dk2', [bm('c1'), bm('c2'), bm('c3', { recording: true })]],
      ]),
    });
    const plan = planReconcile(input);
    assert.deepEqual(plan.actions, [
      { op: 'remove', diskId: 'dk1', bitmap: 'qbackup-tmp-a' },
      { op: 'remove', diskId: 'dk1', bitmap: 'c2' },
      { op: 'disable', diskId: 'dk1', bitmap: 'c1' },
    ]);
    assert.deepEqual(plan.losses.map((l) => [l.diskId, l.checkpoint, l.reason]), [['dk1', 'c2', 'bitmap-inconsistent']]);
  });

  test('rows of checkpoints without a bitmap on the disk, or of other disks, are ignored', () => {
    const input = chain(healthy(), { checkpointDisks: [row('c1'), row('c2'), row('c3'), row('c2', 'dk9'), row('c1', null)] });
    assert.deepEqual(planReconcile(input), { actions: [], losses: [] });
  });
});
