// Redefine's checks and planning (src/checkpoint/redefine.ts): name and
// creation time required, parent must exist, no cycles, an existing checkpoint
// only takes a new description, and which checkpoint becomes current.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { BitmapState } from '../../src/checkpoint/bitmaps.js';
import { checkRedefine, checkRedefineBitmaps, planRedefine, redefineDiskRows, type RedefineState } from '../../src/checkpoint/redefine.js';
import type { CheckpointSpec } from '../../src/checkpoint/spec.js';
import { isQbackupError, type ErrorCode } from '../../src/errors.js';
import type { CheckpointDiskRow, CheckpointLink } from '../../src/store/checkpoints.js';

const link = (name: string, parent: string | null, current = false, seq = 1): CheckpointLink => ({ domain: 'vm', name, parent, is_current: current ? 1 : 0, created_seq: seq });
/** c1 ← c2 ← c3 (current). */
const chain = [link('c1', null, false, 1), link('c2', 'c1', false, 2), link('c3', 'c2', true, 3)];
const spec = (over: Partial<CheckpointSpec> = {}): CheckpointSpec => ({ name: 'n', creationTime: 100, ...over });
const fails = (code: ErrorCode, pattern: RegExp) => (err: unknown) => isQbackupError(err, code) && pattern.test(err.message);
function row(name: string, diskId: string | null = 'dk1', mode: 'bitmap' | 'no' = 'bitmap', bitmap: string | null = name): CheckpointDiskRow {
  return { domain: 'vm', checkpoint: name, target: 'sda', disk_id: diskId, mode, bitmap: mode === 'bitmap' ? bitmap : null };
}
const state = (over: Partial<RedefineState> = {}): RedefineState => ({ existingDisks: [], current: { name: 'c3' }, journalSeq: 7, nextCreatedSeq: 4, ...over });
function bm(name: string, over: Partial<BitmapState> = {}): BitmapState {
  return { name, recording: false, persistent: true, inconsistent: false, busy: false, granularity: 65536, ...over };
}

describe('checkRedefine', () => {
  test('needs a name and a creation time', () => {
    assert.throws(() => checkRedefine('vm', { creationTime: 1 }, chain), fails('CHECKPOINT_INVALID', /^Cannot redefine checkpoint of domain "vm": the XML has no <name>$/));
    assert.throws(() => checkRedefine('vm', { name: 'n' }, chain), fails('CHECKPOINT_INVALID', /"n" of domain "vm": the XML has no <creationTime>/));
  });
  test('refuses the temporary bitmap prefix', () => {
    assert.throws(() => checkRedefine('vm', spec({ name: 'qbackup-tmp-x' }), chain), fails('INVALID_NAME', /reserved/));
  });
  test('the parent must exist', () => {
    assert.throws(() => checkRedefine('vm', spec({ parent: 'zz' }), chain), fails('CHECKPOINT_NOT_FOUND', /its parent "zz" does not exist/));
    const t = checkRedefine('vm', spec({ parent: 'c3' }), chain);
    assert.deepEqual([t.name, t.parent, t.creationTime, t.existing], ['n', 'c3', 100, undefined]);
    assert.equal(checkRedefine('vm', spec(), chain).parent, null);
  });
  test('no cycles: not its own parent, nor a parent among its descendants', () => {
    assert.throws(() => checkRedefine('vm', spec({ name: 'c2', parent: 'c2' }), chain), fails('CHECKPOINT_INVALID', /would make a cycle/));
    assert.throws(() => checkRedefine('vm', spec({ name: 'c1', parent: 'c3' }), chain), fails('CHECKPOINT_INVALID', /parent "c3" would make a cycle/));
    assert.equal(checkRedefine('vm', spec({ name: 'c3', parent: 'c2' }), chain).existing?.name, 'c3');
  });
});

describe('redefineDiskRows', () => {
  const def = [
    { target: 'sda', format: 'qcow2', readonly: false },
    { target: 'sdb', format: 'raw', readonly: false },
    { target: 'sdc', format: 'qcow2', readonly: true },
  ];
  const ids = new Map<string, string | null>([['sda', 'dk1'], ['sdb', 'dk2'], ['sdc', null]]);
  test('without disks, every disk of the definition: writable qcow2 ones with a bitmap named after the checkpoint', () => {
    const rows = redefineDiskRows({ domain: 'vm', name: 'n' }, undefined, def, ids);
    assert.deepEqual(rows.map((r) => [r.target, r.disk_id, r.mode, r.bitmap]), [
      ['sda', 'dk1', 'bitmap', 'n'],
      ['sdb', 'dk2', 'no', null],
      ['sdc', null, 'no', null],
    ]);
  });
  test('with disks, exactly those, with their bitmap names; an unknown target has no disk id', () => {
    const rows = redefineDiskRows({ domain: 'vm', name: 'n' }, [{ name: 'sda', checkpoint: 'bitmap', bitmap: 'b' }, { name: 'zz', checkpoint: 'bitmap' }], def, ids);
    assert.deepEqual(rows.map((r) => [r.target, r.disk_id, r.mode, r.bitmap]), [
      ['sda', 'dk1', 'bitmap', 'b'],
      ['zz', null, 'bitmap', 'n'],
    ]);
  });
});

describe('checkRedefineBitmaps (--redefine-validate)', () => {
  const what = 'Cannot redefine checkpoint "n" of domain "vm"';
  const attached = [{ diskId: 'dk1' }];
  test('accepts present, consistent, persistent bitmaps and ignores "no" disks', () => {
    checkRedefineBitmaps(what, [row('n'), row('n', 'dk2', 'no')], attached, new Map([['dk1', [bm('n')]]]));
  });
  test('refuses a disk not attached, a missing bitmap, an unusable one', () => {
    assert.throws(() => checkRedefineBitmaps(what, [row('n', 'dk2')], attached, new Map()), fails('CHECKPOINT_INVALID', /disk "sda" is not attached/));
    assert.throws(() => checkRedefineBitmaps(what, [row('n', null)], attached, new Map()), fails('CHECKPOINT_INVALID', /not attached/));
    assert.throws(() => checkRedefineBitmaps(what, [row('n')], attached, new Map([['dk1', []]])), fails('CHECKPOINT_INVALID', /has no bitmap "n"/));
    assert.throws(() => checkRedefineBitmaps(what, [row('n')], attached, new Map([['dk1', [bm('n', { inconsistent: true })]]])), fails('CHECKPOINT_INVALID', /not usable/));
    assert.throws(() => checkRedefineBitmaps(what, [row('n')], attached, new Map([['dk1', [bm('n', { persistent: false })]]])), fails('CHECKPOINT_INVALID', /not usable/));
  });
});

describe('planRedefine', () => {
  const fields = { description: 'd', domainXml: '<domain/>' };
  test('a new checkpoint continuing the current one becomes current', () => {
    const plan = planRedefine(checkRedefine('vm', spec({ parent: 'c3' }), chain), fields, [row('n')], state());
    assert.equal(plan.op, 'insert');
    assert.deepEqual(plan.row, { domain: 'vm', name: 'n', parent: 'c3', description: 'd', creation_time: 100, domain_xml: '<domain/>', journal_seq: 7, is_current: 1, created_seq: 4 });
    assert.deepEqual(plan.op === 'insert' ? plan.disks : undefined, [row('n')]);
  });
  test('a new checkpoint on another branch, or a new root, is not current; with no current one it is', () => {
    assert.equal(planRedefine(checkRedefine('vm', spec({ parent: 'c1' }), chain), fields, [], state()).row.is_current, 0);
    assert.equal(planRedefine(checkRedefine('vm', spec(), chain), fields, [], state()).row.is_current, 0);
    assert.equal(planRedefine(checkRedefine('vm', spec(), []), fields, [], state({ current: undefined })).row.is_current, 1);
  });
  test('an existing checkpoint keeps its place (current flag, creation order) and only takes description and definition', () => {
    const target = checkRedefine('vm', spec({ name: 'c3', parent: 'c2' }), chain);
    const plan = planRedefine(target, fields, [row('c3')], state({ existingDisks: [row('c3')] }));
    assert.equal(plan.op, 'update');
    assert.deepEqual([plan.row.is_current, plan.row.created_seq, plan.row.description], [1, 3, 'd']);
    const old = checkRedefine('vm', spec({ name: 'c1' }), chain);
    assert.deepEqual([planRedefine(old, fields, [row('c1')], state({ existingDisks: [row('c1')] })).row.is_current], [0]);
  });
  test('an existing checkpoint refuses another parent or other disks', () => {
    const refused = fails('CHECKPOINT_INVALID', /it exists with another parent or other disks; delete it first/);
    const moved = checkRedefine('vm', spec({ name: 'c3', parent: 'c1' }), chain);
    assert.throws(() => planRedefine(moved, fields, [row('c3')], state({ existingDisks: [row('c3')] })), refused);
    const same = checkRedefine('vm', spec({ name: 'c3', parent: 'c2' }), chain);
    assert.throws(() => planRedefine(same, fields, [row('c3', 'dk1', 'bitmap', 'other')], state({ existingDisks: [row('c3')] })), refused);
    assert.throws(() => planRedefine(same, fields, [row('c3', 'dk1', 'no')], state({ existingDisks: [row('c3')] })), refused);
    assert.throws(() => planRedefine(same, fields, [row('c3'), { ...row('c3', 'dk2'), target: 'sdb' }], state({ existingDisks: [row('c3')] })), refused);
    assert.throws(() => planRedefine(same, fields, [row('c3', 'dk9')], state({ existingDisks: [row('c3')] })), refused);
  });
});
