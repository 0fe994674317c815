// The state directory and its metadata database are private to their owner:
// qbackup.db (and its -wal and -shm files) are created 0600 whatever the
// directory's mode or the umask, and a state directory that already exists
// with a looser mode is set to 0700 with a warning.

import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Qbackup } from '../../src/qbackup.js';
import type { LogEvent } from '../../src/util/operation.js';

describe('state directory permissions', () => {
  it('an existing 0755 state directory becomes 0700 with a warning, and qbackup.db and its -wal/-shm are 0600', () => {
    const root = mkdtempSync(join(tmpdir(), 'qbt-state-'));
    const oldMask = process.umask(0o022);
    try {
      const stateDir = join(root, 'state');
      mkdirSync(stateDir);
      chmodSync(stateDir, 0o755);
      const events: LogEvent[] = [];
      const qb = Qbackup.open({ stateDir, logger: { log: (e) => events.push(e) } });
      try {
        qb.db.exec('CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (1)'); // makes the -wal and -shm files
        for (const f of ['qbackup.db', 'qbackup.db-wal', 'qbackup.db-shm']) {
          assert.equal(statSync(join(stateDir, f)).mode & 0o777, 0o600, `${f} is 0600`);
        }
      } finally {
        qb.close();
      }
      assert.equal(statSync(stateDir).mode & 0o777, 0o700, 'the state directory is made private');
      const warning = events.find((e) => e.level === 'warn');
      assert.ok(warning !== undefined, 'a warning says so');
      assert.match(warning.msg, /State directory ".*" was readable by others \(mode 0755\): set it to 0700/);
    } finally {
      process.umask(oldMask);
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('an existing qbackup.db readable by others is made 0600 on open', () => {
    const root = mkdtempSync(join(tmpdir(), 'qbt-state-'));
    try {
      const stateDir = join(root, 'state');
      Qbackup.open({ stateDir }).close();
      chmodSync(join(stateDir, 'qbackup.db'), 0o644);
      Qbackup.open({ stateDir }).close();
      assert.equal(statSync(join(stateDir, 'qbackup.db')).mode & 0o777, 0o600);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
