// The coverage rules (docs/design.md) as a pure function: each rule alone turns an
// incremental into a full with its reason code.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { BitmapState } from '../../src/checkpoint/bitmaps.js';
import { chainFrom, computeCoverage, type ChainCheckpoint, type CoverageInputs } from '../../src/checkpoint/coverage.js';

function cp(name: string, parent: string | null, current: boolean, disk: 'bitmap' | 'no' | 'absent' = 'bitmap', seq = 0): ChainCheckpoint {
  return {
    row: { domain: 'vm', name, parent, description: null, creation_time: 0, domain_xml: '', journal_seq: seq, is_current: current ? 1 : 0, created_seq: seq },
    disks: disk === 'absent' ? [] : [{ domain: 'vm', checkpoint: name, target: 'sda', disk_id: 'dk1', mode: disk, bitmap: disk === 'bitmap' ? name : null }],
  };
}
function bm(name: string, over: Partial<BitmapState> = {}): BitmapState {
  return { name, recording: false, persistent: true, inconsistent: false, busy: false, granularity: 65536, ...over };
}
const chain = [cp('c1', null, false), cp('c2', 'c1', false), cp('c3', 'c2', true)];
function base(over: Partial<CoverageInputs> = {}): CoverageInputs {
  return {
    path: chainFrom(chain, 'c1'),
    disk: { target: 'sda', diskId: 'dk1', format: 'qcow2' },
    eventsSinceT: [],
    bitmaps: [bm('c1'), bm('c2'), bm('c3', { recording: true })],
    losses: new Map(),
    ...over,
  };
}
const codes = (i: CoverageInputs): string[] => computeCoverage(i).reasons.map((r) => r.code);

describe('coverage rules', () => {
  test('a complete chain is incremental with the bitmaps in order', () => {
    const c = computeCoverage(base());
    assert.deepEqual([c.mode, c.bitmaps], ['incremental', ['c1', 'c2', 'c3']]);
    assert.deepEqual(computeCoverage(base({ path: chainFrom(chain, 'c3') })).bitmaps, ['c3']);
  });
  test('rule 1: a checkpoint that is not an ancestor of the current one', () => {
    const branch = [...chain, cp('x', 'c1', false)];
    assert.deepEqual(codes(base({ path: chainFrom(branch, 'x') })), ['checkpoint-missing']);
  });
  test('rule 2: a disk missing from, or without a bitmap in, a checkpoint of the span', () => {
    const c2absent = [cp('c1', null, false), cp('c2', 'c1', false, 'absent'), cp('c3', 'c2', true)];
    assert.deepEqual(codes(base({ path: chainFrom(c2absent, 'c1') })), ['not-in-checkpoint']);
    const c3no = [cp('c1', null, false), cp('c2', 'c1', false), cp('c3', 'c2', true, 'no')];
    assert.deepEqual(codes(base({ path: chainFrom(c3no, 'c2') })), ['not-in-checkpoint']);
  });
  test('rule 3: a detach after T, even if followed by an attach', () => {
    const events = [
      { seq: 5, disk_id: 'dk1', event: 'detach' as const, target: 'sda', live: 1, at_ms: 0 },
      { seq: 6, disk_id: 'dk1', event: 'attach' as const, target: 'sda', live: 1, at_ms: 0 },
    ];
    assert.deepEqual(codes(base({ eventsSinceT: events })), ['detached-since']);
  });
  test('rule 4: missing, inconsistent, non-persistent, wrongly recording bitmaps, and recorded losses', () => {
    assert.deepEqual(codes(base({ bitmaps: [bm('c1'), bm('c3', { recording: true })] })), ['bitmap-missing']);
    assert.deepEqual(codes(base({ bitmaps: [bm('c1'), bm('c2', { inconsistent: true }), bm('c3', { recording: true })] })), ['bitmap-inconsistent']);
    assert.deepEqual(codes(base({ bitmaps: [bm('c1'), bm('c2', { persistent: false }), bm('c3', { recording: true })] })), ['bitmap-inconsistent']);
    assert.deepEqual(codes(base({ bitmaps: [bm('c1'), bm('c2'), bm('c3')] })), ['bitmap-inconsistent'], 'current not recording');
    assert.deepEqual(codes(base({ bitmaps: [bm('c1', { recording: true }), bm('c2'), bm('c3', { recording: true })] })), ['bitmap-inconsistent']);
    assert.deepEqual(codes(base({ bitmaps: undefined })), ['bitmap-missing'], 'unreadable image');
    assert.deepEqual(codes(base({ losses: new Map([['c2', { reason: 'bitmap-inconsistent', detail: 'removed' }]]) })), ['bitmap-inconsistent']);
    // a loss before T does not matter
    assert.deepEqual(codes(base({ path: chainFrom(chain, 'c2'), losses: new Map([['c1', { reason: 'bitmap-missing', detail: '' }]]) })), []);
  });
  test('rule 5: raw disks', () => {
    assert.ok(codes(base({ disk: { target: 'sda', diskId: 'dk1', format: 'raw' } })).includes('not-qcow2'));
  });
  test('chainFrom follows parents from the current checkpoint and survives a cycle in bad metadata', () => {
    assert.deepEqual(chainFrom(chain, 'c2')?.map((c) => c.row.name), ['c2', 'c3']);
    assert.equal(chainFrom(chain, 'nope'), undefined);
    const cyclic = [cp('a', 'b', true), cp('b', 'a', false)];
    assert.equal(chainFrom(cyclic, 'z'), undefined);
  });
});
