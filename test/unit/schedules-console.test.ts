// Schedules as the console changes them, without QEMU: an edit keeps the
// id, last run and paused state; a paused schedule is never due and,
// resumed, runs at its next slot after the resume (no made-up runs); a
// schedule of the configuration file keeps its paused state when the file is
// read again and refuses edits through the API; a backup schedule of the file
// names its connection (a configured name or a URI), other kinds cannot.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { parseConfig } from '../../src/config/load.js';
import { QbackupError } from '../../src/errors.js';
import { Scheduler, Schedules } from '../../src/service/schedules.js';
import { openDatabase } from '../../src/store/db.js';
import { ScheduleStore } from '../../src/store/schedules.js';

const dirs: string[] = [];
function schedules(): Schedules {
  const dir = mkdtempSync(join(tmpdir(), 'qbt-sched-'));
  dirs.push(dir);
  return new Schedules(new ScheduleStore(openDatabase(join(dir, 'qbackup.db'))));
}
after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

const HOUR = 3_600_000;

describe('schedules changed, paused and resumed', () => {
  test('an edit keeps id and paused state; paused is never due; resumed runs at the next slot after the resume', () => {
    const list = schedules();
    const start = Date.parse('2026-01-01T12:00:00Z');
    let now = start;
    const ran: string[] = [];
    const scheduler = new Scheduler(list, { now: () => now }, (s) => ran.push(s.id), () => false);
    const s = list.add({ domain: 'vm1', when: 'hourly', repo: '/r', connection: 'qemu:///system', retention: { keepLast: 2 } }, start);
    assert.equal(s.connection, 'qemu:///system');
    assert.equal(list.setPaused(s.id, true, now).nextRunMs, null);
    now += 5 * HOUR;
    assert.deepEqual(scheduler.tick(), [], 'a paused schedule is not due');
    const edited = list.update(s.id, { domain: 'vm2', when: 'hourly :30', repo: '/r2' });
    assert.deepEqual([edited.id, edited.domain, edited.repo, edited.paused, edited.retention, edited.connection], [s.id, 'vm2', '/r2', true, undefined, undefined]);
    const resumed = list.setPaused(s.id, false, now);
    assert.equal(resumed.paused, undefined);
    assert.equal(resumed.nextRunMs, now + HOUR / 2, 'the first slot after the resume, not the slots missed while paused');
    assert.deepEqual(scheduler.tick(), []);
    now += HOUR / 2;
    assert.deepEqual(scheduler.tick(), [s.id]);
    assert.deepEqual(ran, [s.id]);
    assert.throws(() => list.update('nope', { domain: 'vm1', when: 'hourly', repo: '/r' }), (e: unknown) => e instanceof QbackupError && e.code === 'SCHEDULE_NOT_FOUND');
    assert.throws(() => list.add({ action: 'gc', when: 'hourly', repo: '/r', connection: 'qemu:///system' }), /A connection belongs to backup schedules/);
  });

  test('a schedule of the configuration file keeps its paused state across a re-read and is changed only in the file', () => {
    const list = schedules();
    const spec = { name: 'nightly', domain: 'vm1', when: 'daily 02:00', repo: '/r' };
    list.sync([spec]);
    list.setPaused('config-nightly', true);
    const r = list.sync([{ ...spec, when: 'daily 03:00' }]);
    assert.deepEqual(r.updated, ['config-nightly']);
    const s = list.get('config-nightly');
    assert.deepEqual([s.when, s.paused, s.nextRunMs], ['daily 03:00', true, null]);
    assert.deepEqual(list.sync([{ ...spec, when: 'daily 03:00' }]), { added: [], updated: [], removed: [] }, 'nothing changes when the file does not');
    assert.throws(() => list.update('config-nightly', { domain: 'vm1', when: 'hourly', repo: '/r' }), (e: unknown) => e instanceof QbackupError && e.code === 'SCHEDULE_FROM_CONFIG');
  });

  test('a backup schedule of the file names its connection by name or URI', () => {
    const text = (connection: string, run = 'backup'): string =>
      ['repositories:', '  local: { path: /b }', 'connections:', '  system: qemu:///system', 'schedules:', '  s:', `    run: ${run}`, '    domain: vm1', `    connection: ${connection}`, '    when: daily 02:00', '    repository: local', ''].join('\n');
    assert.equal(parseConfig(text('system'), '/c.yaml').schedules[0]?.connection, 'system');
    assert.equal(parseConfig(text('qemu:///session'), '/c.yaml').schedules[0]?.connection, 'qemu:///session');
    assert.throws(() => parseConfig(text('nosuch'), '/c.yaml'), (e: unknown) => e instanceof QbackupError && /^Invalid configuration "\/c\.yaml", line 9: schedule "s" names connection "nosuch", which is not under connections/.test(e.message));
    assert.throws(() => parseConfig(text('system', 'verify'), '/c.yaml'), /line 9: "connection" belongs to backup schedules/);
  });
});
