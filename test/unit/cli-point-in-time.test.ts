// The --until values a user types: ISO 8601 times as before, and the relative
// forms GNU date reads (now, yesterday, N units ago), taken against a fixed
// "now" so nothing depends on the clock; anything else is one sentence. With
// backups taken the day before and today, --until yesterday opens the older.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { QbackupError } from '../../src/errors.js';
import { pointInTime } from '../../src/cli/options.js';
import { pickManifest } from '../../src/files/index.js';
import type { Manifest } from '../../src/repository/manifest.js';

const NOW = new Date('2026-12-06T18:30:00Z');
const at = (value: string): string => pointInTime('--until', value, NOW).toISOString();

describe('pointInTime (--until)', () => {
  test('ISO 8601 times and dates', () => {
    assert.equal(at('2026-11-25T18:00:00Z'), '2026-11-25T18:00:00.000Z');
    assert.equal(at('2026-11-25T18:00:00.250+01:00'), '2026-11-25T17:00:00.250Z');
    assert.equal(at('2026-11-25'), '2026-11-25T00:00:00.000Z');
  });

  test('now, yesterday and N units ago count back from now', () => {
    assert.equal(at('now'), '2026-12-06T18:30:00.000Z');
    assert.equal(at('yesterday'), '2026-12-05T18:30:00.000Z');
    assert.equal(at('Yesterday '), '2026-12-05T18:30:00.000Z');
    assert.equal(at('2 days ago'), '2026-12-04T18:30:00.000Z');
    assert.equal(at('1 day ago'), '2026-12-05T18:30:00.000Z');
    assert.equal(at('90 minutes ago'), '2026-12-06T17:00:00.000Z');
    assert.equal(at('3 hours  ago'), '2026-12-06T15:30:00.000Z');
    assert.equal(at('30 seconds ago'), '2026-12-06T18:29:30.000Z');
    assert.equal(at('1 week ago'), '2026-11-29T18:30:00.000Z');
  });

  test('anything else is refused in one sentence naming the value and the forms', () => {
    for (const bad of ['tomorrowish', '2 fortnights ago', 'ago', '-1 days ago', '']) {
      assert.throws(
        () => pointInTime('--until', bad, NOW),
        (err: unknown) => err instanceof QbackupError && err.code === 'INVALID_ARGUMENT' && err.message === `Invalid --until "${bad}": expected a time such as 2026-11-25T18:00:00Z, yesterday or "2 days ago"`,
      );
    }
  });

  test('--until yesterday chooses the newest backup taken at or before 24 hours ago', () => {
    const backup = (id: string, time: string): Manifest => ({ format: 2, id, domain: 'vm1', uuid: 'u', time, endTime: time, checkpoint: `qb-${id}`, consistency: 'crash', domainXml: '', disks: [] });
    const backups = [backup('b-two-days', '2026-12-04T09:00:00.000Z'), backup('b-yesterday', '2026-12-05T09:00:00.000Z'), backup('b-today', '2026-12-06T09:00:00.000Z')];
    const pick = (value: string): string => pickManifest(backups, { domain: 'vm1', until: pointInTime('--until', value, NOW) }).id;
    assert.equal(pick('yesterday'), 'b-yesterday');
    assert.equal(pick('2 days ago'), 'b-two-days');
    assert.equal(pick('now'), 'b-today');
    assert.throws(
      () => pick('1 week ago'),
      (err: unknown) => err instanceof QbackupError && err.code === 'BACKUP_NOT_FOUND' && err.message === 'Repository has no backup of domain "vm1" taken at or before 2026-11-29T18:30:00.000Z',
    );
  });
});
