// Retention planning (src/repository/prune.ts) without a repository: which
// backups each rule keeps, and why.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { planPrune } from '../../src/repository/prune.js';

const at = (iso: string, n = 0): { id: string; time: string } => ({ id: `${iso.replace(/[-:]/g, '')}-${n.toString(16).padStart(4, '0')}`, time: iso });

// Two backups a day for ten days in November 2026, at 01:00 and 13:00 UTC.
const backups = Array.from({ length: 10 }, (_, d) => [at(`2026-11-${String(d + 10).padStart(2, '0')}T01:00:00.000Z`, 2 * d), at(`2026-11-${String(d + 10).padStart(2, '0')}T13:00:00.000Z`, 2 * d + 1)]).flat();

describe('planPrune', () => {
  it('keep-last keeps the newest n', () => {
    const p = planPrune(backups, { keepLast: 3 });
    assert.deepEqual(p.keep.map((k) => k.time), ['2026-11-19T13:00:00.000Z', '2026-11-19T01:00:00.000Z', '2026-11-18T13:00:00.000Z']);
    assert.equal(p.remove.length, 17);
  });

  it('keep-daily keeps the newest backup of each of the last n days', () => {
    const p = planPrune(backups, { keepDaily: 3 });
    assert.deepEqual(p.keep.map((k) => [k.time, k.reasons]), [
      ['2026-11-19T13:00:00.000Z', ['daily 2026-11-19']],
      ['2026-11-18T13:00:00.000Z', ['daily 2026-11-18']],
      ['2026-11-17T13:00:00.000Z', ['daily 2026-11-17']],
    ]);
  });

  it('rules combine, and a backup kept by several lists every reason', () => {
    const p = planPrune(backups, { keepLast: 1, keepDaily: 2, keepWeekly: 2, keepMonthly: 1 });
    const newest = p.keep[0];
    assert.deepEqual(newest?.reasons, ['last 1', 'daily 2026-11-19', 'weekly 2026-W47', 'monthly 2026-11']);
    // ISO week 46 of 2026 ends on Sunday 15 November: its newest backup is kept by the weekly rule.
    assert.ok(p.keep.some((k) => k.time === '2026-11-15T13:00:00.000Z' && k.reasons.includes('weekly 2026-W46')));
    assert.equal(p.keep.length + p.remove.length, backups.length);
  });

  it('refuses an empty policy or one that keeps nothing, and bad counts', () => {
    for (const policy of [{}, { keepLast: 0 }, { keepDaily: -1 }, { keepLast: 1.5 }, { keepLast: Number.NaN }]) {
      assert.throws(() => planPrune(backups, policy), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'), JSON.stringify(policy));
    }
  });
});
