// The intent planners (src/checkpoint/recovery.ts): what a create or delete
// does to the bitmaps, and how a leftover intent is finished or rolled back
// from the bitmaps really on the images.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { BitmapState } from '../../src/checkpoint/bitmaps.js';
import {
  createActions,
  createRollbackActions,
  createUndoActions,
  deleteActions,
  parentGaps,
  planDelete,
  planRecovery,
  readIntent,
  type CreateIntent,
  type DeleteIntent,
} from '../../src/checkpoint/recovery.js';
import { isQbackupError } from '../../src/errors.js';
import type { CheckpointDiskRow } from '../../src/store/checkpoints.js';

function bm(name: string, over: Partial<BitmapState> = {}): BitmapState {
  return { name, recording: false, persistent: true, inconsistent: false, busy: false, granularity: 65536, ...over };
}
function row(checkpoint: string, diskId: string | null, mode: 'bitmap' | 'no' = 'bitmap', target = 'sda'): CheckpointDiskRow {
  return { domain: 'vm', checkpoint, target, disk_id: diskId, mode, bitmap: mode === 'bitmap' ? checkpoint : null };
}
const disks = (entries: Array<[string, BitmapState[]]>): Map<string, BitmapState[]> => new Map(entries);

/** c3 on two disks; c2 was recording on both. */
function createIntent(over: Partial<CreateIntent> = {}): CreateIntent {
  return {
    row: { domain: 'vm', name: 'c3', parent: 'c2', description: null, creation_time: 1, domain_xml: '<domain/>', journal_seq: 0, is_current: 1, created_seq: 3 },
    disks: [row('c3', 'dk1'), row('c3', 'dk2')],
    adds: [
      { diskId: 'dk1', bitmap: 'c3' },
      { diskId: 'dk2', bitmap: 'c3' },
    ],
    disables: [
      { diskId: 'dk1', bitmap: 'c2' },
      { diskId: 'dk2', bitmap: 'c2' },
    ],
    ...over,
  };
}
const deleteIntent = (over: Partial<DeleteIntent> = {}): DeleteIntent => ({
  name: 'c2',
  parent: 'c1',
  wasCurrent: false,
  disks: [{ diskId: 'dk1', bitmap: 'c2', parentBitmap: 'c1' }],
  ...over,
});

describe('create intents', () => {
  test('createActions: adds first, then disables', () => {
    assert.deepEqual(createActions(createIntent()).map((a) => `${a.op}:${a.diskId}`), ['add:dk1', 'add:dk2', 'disable:dk1', 'disable:dk2']);
  });

  test('recovery finishes a create whose bitmaps all exist (online: the transaction happened)', () => {
    const bitmaps = disks([
      ['dk1', [bm('c2'), bm('c3', { recording: true })]],
      ['dk2', [bm('c2'), bm('c3', { recording: true })]],
    ]);
    const plan = planRecovery({ kind: 'checkpoint-create', intent: createIntent() }, bitmaps);
    assert.equal(plan.outcome, 'finish-create');
    assert.deepEqual(plan.actions, []);
  });

  test('offline, a create killed between adds and disables is finished with the pending disables', () => {
    const bitmaps = disks([
      ['dk1', [bm('c2'), bm('c3', { recording: true })]],
      ['dk2', [bm('c2', { recording: true }), bm('c3', { recording: true })]],
    ]);
    const plan = planRecovery({ kind: 'checkpoint-create', intent: createIntent() }, bitmaps);
    assert.equal(plan.outcome, 'finish-create');
    assert.deepEqual(plan.actions, [{ op: 'disable', diskId: 'dk2', bitmap: 'c2' }]);
  });

  test('a create with a missing new bitmap is rolled back: added ones removed, disabled ones re-enabled', () => {
    const bitmaps = disks([
      ['dk1', [bm('c2'), bm('c3', { recording: true })]],
      ['dk2', [bm('c2', { recording: true })]],
    ]);
    const plan = planRecovery({ kind: 'checkpoint-create', intent: createIntent() }, bitmaps);
    assert.equal(plan.outcome, 'rollback-create');
    assert.deepEqual(plan.actions, [
      { op: 'remove', diskId: 'dk1', bitmap: 'c3' },
      { op: 'enable', diskId: 'dk1', bitmap: 'c2' },
    ]);
  });

  test('taking back an applied create merges each new bitmap into the one it disabled (no write since is lost)', () => {
    assert.deepEqual(createUndoActions(createIntent()), [
      { op: 'merge', diskId: 'dk1', target: 'c2', sources: ['c3'] },
      { op: 'remove', diskId: 'dk1', bitmap: 'c3' },
      { op: 'merge', diskId: 'dk2', target: 'c2', sources: ['c3'] },
      { op: 'remove', diskId: 'dk2', bitmap: 'c3' },
      { op: 'enable', diskId: 'dk1', bitmap: 'c2' },
      { op: 'enable', diskId: 'dk2', bitmap: 'c2' },
    ]);
    // A disk that had no recording bitmap (its first checkpoint): the new one just goes.
    assert.deepEqual(createUndoActions(createIntent({ disables: [{ diskId: 'dk1', bitmap: 'c2' }] })).filter((a) => a.diskId === 'dk2'), [{ op: 'remove', diskId: 'dk2', bitmap: 'c3' }]);
  });

  test('a rollback does not re-enable an inconsistent bitmap', () => {
    const bitmaps = disks([['dk1', [bm('c2', { inconsistent: true })]]]);
    assert.deepEqual(createRollbackActions(createIntent(), bitmaps), []);
  });

  test('a create that adds nothing happened exactly when every disable did', () => {
    const intent = createIntent({ adds: [], disks: [row('c3', 'dk1', 'no')] });
    const done = disks([['dk1', [bm('c2')]], ['dk2', [bm('c2')]]]);
    assert.equal(planRecovery({ kind: 'checkpoint-create', intent }, done).outcome, 'finish-create');
    const half = disks([['dk1', [bm('c2')]], ['dk2', [bm('c2', { recording: true })]]]);
    const plan = planRecovery({ kind: 'checkpoint-create', intent }, half);
    assert.equal(plan.outcome, 'rollback-create');
    assert.deepEqual(plan.actions, [{ op: 'enable', diskId: 'dk1', bitmap: 'c2' }]);
    // Adding and disabling nothing: nothing happened, so it is rolled back (with nothing to undo).
    const empty = planRecovery({ kind: 'checkpoint-create', intent: createIntent({ adds: [], disables: [] }) }, disks([]));
    assert.deepEqual([empty.outcome, empty.actions], ['rollback-create', []]);
  });
});

describe('delete intents', () => {
  test('planDelete pairs each attached disk bitmap with the parent bitmap; detached disks and "no" disks are left out', () => {
    const own = [row('c2', 'dk1'), row('c2', 'dk2'), row('c2', 'dk3', 'no'), row('c2', null)];
    const parent = [row('c1', 'dk1'), row('c1', 'dk2', 'no')];
    const intent = planDelete({ name: 'c2', parent: 'c1', is_current: 1 }, own, parent, [{ diskId: 'dk1' }, { diskId: 'dk3' }]);
    assert.deepEqual(intent, { name: 'c2', parent: 'c1', wasCurrent: true, disks: [{ diskId: 'dk1', bitmap: 'c2', parentBitmap: 'c1' }] });
    const noParent = planDelete({ name: 'c2', parent: 'c1', is_current: 0 }, own, parent, [{ diskId: 'dk2' }]);
    assert.deepEqual(noParent.disks, [{ diskId: 'dk2', bitmap: 'c2', parentBitmap: null }]);
  });

  test('deleting a middle checkpoint merges into the parent, then removes', () => {
    assert.deepEqual(deleteActions(deleteIntent(), disks([['dk1', [bm('c1'), bm('c2')]]])), [
      { op: 'merge', diskId: 'dk1', target: 'c1', sources: ['c2'] },
      { op: 'remove', diskId: 'dk1', bitmap: 'c2' },
    ]);
  });

  test('deleting the current checkpoint re-enables the parent', () => {
    const actions = deleteActions(deleteIntent({ wasCurrent: true }), disks([['dk1', [bm('c1'), bm('c2', { recording: true })]]]));
    assert.deepEqual(actions.map((a) => a.op), ['merge', 'remove', 'enable']);
  });

  test('an inconsistent bitmap is removed without merging; an inconsistent parent gets nothing', () => {
    assert.deepEqual(deleteActions(deleteIntent(), disks([['dk1', [bm('c1'), bm('c2', { inconsistent: true })]]])), [{ op: 'remove', diskId: 'dk1', bitmap: 'c2' }]);
    assert.deepEqual(deleteActions(deleteIntent({ wasCurrent: true }), disks([['dk1', [bm('c1', { inconsistent: true }), bm('c2')]]])), [
      { op: 'remove', diskId: 'dk1', bitmap: 'c2' },
    ]);
  });

  test('recovery finishes a delete from what is left: after the merge only the enable remains', () => {
    const plan = planRecovery({ kind: 'checkpoint-delete', intent: deleteIntent({ wasCurrent: true }) }, disks([['dk1', [bm('c1')]]]));
    assert.equal(plan.outcome, 'finish-delete');
    assert.deepEqual(plan.actions, [{ op: 'enable', diskId: 'dk1', bitmap: 'c1' }]);
    const done = planRecovery({ kind: 'checkpoint-delete', intent: deleteIntent({ wasCurrent: true }) }, disks([['dk1', [bm('c1', { recording: true })]]]));
    assert.deepEqual([done.outcome, done.actions], ['finish-delete', []]);
  });

  test('recovery refuses to finish a delete while a disk cannot be read', () => {
    const plan = planRecovery({ kind: 'checkpoint-delete', intent: deleteIntent() }, disks([]));
    assert.equal(plan.outcome, 'unreadable');
    assert.equal(plan.outcome === 'unreadable' ? plan.diskId : undefined, 'dk1');
  });

  test('parentGaps: the parent inherits a gap where the deleted checkpoint had no bitmap or had lost it', () => {
    const parent = [row('c1', 'dk1', 'bitmap', 'sda'), row('c1', 'dk2', 'bitmap', 'sdb'), row('c1', 'dk3', 'bitmap', 'sdc'), row('c1', 'dk4', 'no', 'sdd')];
    const own = [row('c2', 'dk1'), row('c2', 'dk2', 'no'), row('c2', 'dk4')];
    const gaps = parentGaps('c2', 'c1', own, parent, [{ disk_id: 'dk1', reason: 'bitmap-inconsistent', detail: 'it was removed' }]);
    assert.deepEqual(
      gaps.map((g) => [g.diskId, g.checkpoint, g.reason, g.detail]),
      [
        ['dk1', 'c1', 'bitmap-inconsistent', 'deleted checkpoint "c2": it was removed'],
        ['dk2', 'c1', 'bitmap-missing', 'deleted checkpoint "c2" had no bitmap for disk "sdb", so writes after it are not tracked from "c1"'],
        ['dk3', 'c1', 'bitmap-missing', 'deleted checkpoint "c2" had no bitmap for disk "sdc", so writes after it are not tracked from "c1"'],
      ],
    );
    assert.deepEqual(parentGaps('c2', 'c1', [row('c2', 'dk1')], [row('c1', 'dk1')], []), []);
  });
});

describe('readIntent', () => {
  const op = (kind: string, payload: unknown) => ({ domain: 'vm', kind, payload, started_ms: 0 });
  test('reads both kinds back as written', () => {
    assert.deepEqual(readIntent(op('checkpoint-create', JSON.parse(JSON.stringify(createIntent())))), { kind: 'checkpoint-create', intent: createIntent() });
    assert.deepEqual(readIntent(op('checkpoint-delete', deleteIntent())), { kind: 'checkpoint-delete', intent: deleteIntent() });
  });
  test('another subsystem\'s operation is not ours', () => {
    assert.equal(readIntent(op('backup-begin', {})), undefined);
  });
  test('a malformed payload is METADATA_INCONSISTENT', () => {
    for (const [kind, payload] of [
      ['checkpoint-create', null],
      ['checkpoint-create', { row: {}, disks: [], adds: [] }],
      ['checkpoint-delete', { name: 'c2', disks: [] }],
      ['checkpoint-delete', 'c2'],
    ] as const) {
      assert.throws(() => readIntent(op(kind, payload)), (err: unknown) => isQbackupError(err, 'METADATA_INCONSISTENT'), `${kind} ${JSON.stringify(payload)}`);
    }
  });
});
