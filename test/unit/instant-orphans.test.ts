// An instant restore whose beginning process died before its domain existed
// leaves a record and a running backup server that no command on a domain
// would ever settle: the daemon at start (and the next restore under the same
// name) stops that server and forgets the record. A record whose domain exists,
// or whose owner still runs, is left alone.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import type { DriverDomain, HypervisorDriver } from '../../src/drivers/driver.js';
import { InstantRestoreService, type InstantRecord } from '../../src/instant/restore.js';
import type { RepositoryService } from '../../src/repository/repository.js';
import { openDatabase } from '../../src/store/db.js';
import { InstantStore } from '../../src/store/instant.js';
import { isProcessAlive, processStartTime, sleep } from '../../src/util/proc.js';

const dir = mkdtempSync(join(tmpdir(), 'qb-orphans-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Only what reaping asks of a driver: the domains that exist. */
function driverWith(domains: readonly string[]): HypervisorDriver {
  const list: DriverDomain[] = domains.map((name) => ({ name, uuid: name, state: 'shut off', reason: 'defined' }));
  return { listDomains: async () => list, setLifecycleHooks: () => undefined } as unknown as HypervisorDriver;
}

async function startSleeper(): Promise<{ pid: number; pidStart: string }> {
  const child = spawn('sleep', ['120'], { detached: true, stdio: 'ignore' });
  child.unref();
  const pid = child.pid ?? -1;
  for (let i = 0; i < 50 && processStartTime(pid) === undefined; i++) await sleep(20);
  return { pid, pidStart: processStartTime(pid) ?? '' };
}

function record(domain: string, server: { pid: number; pidStart: string }, owner: InstantRecord['owner']): InstantRecord {
  return {
    version: 1, domain, repo: '/repo', encrypted: false, sourceDomain: 'vm', backupId: 'B', socket: join(dir, domain, 'nbd', 'backup.sock'),
    disks: [], speedBytesPerSec: 0, server, startedMs: Date.now(), owner,
  };
}

describe('orphaned instant restores', () => {
  it('stop the server of a restore whose owner died before defining its domain, and keep the others', async () => {
    const db = openDatabase(join(dir, 'qbackup.db'));
    const store = new InstantStore(db);
    // An owner that surely is not running: a real pid with a start time it never had.
    const deadOwner = { pid: process.pid, pidStart: 'never' };
    const liveOwner = { pid: process.pid, pidStart: processStartTime(process.pid) ?? '' };
    const orphan = await startSleeper();
    const defined = await startSleeper();
    const beginning = await startSleeper();
    try {
      store.saveRecord('lost', JSON.stringify(record('lost', orphan, deadOwner)));
      store.saveRecord('web', JSON.stringify(record('web', defined, undefined)));
      store.saveRecord('new', JSON.stringify(record('new', beginning, liveOwner)));
      const instant = new InstantRestoreService(driverWith(['web']), {} as RepositoryService, db, { stateDir: dir });

      assert.deepEqual(await instant.reapOrphans(), ['lost']);
      for (let i = 0; i < 100 && isProcessAlive(orphan.pid, orphan.pidStart); i++) await sleep(20);
      assert.equal(isProcessAlive(orphan.pid, orphan.pidStart), false, "the orphan's server is stopped");
      assert.equal(instant.loadRecord('lost'), undefined, 'its record is gone');
      assert.equal(isProcessAlive(defined.pid, defined.pidStart), true, 'a restore whose domain exists keeps its server');
      assert.equal(isProcessAlive(beginning.pid, beginning.pidStart), true, 'a restore still beginning keeps its server');
      assert.notEqual(instant.loadRecord('web'), undefined);
      assert.notEqual(instant.loadRecord('new'), undefined);
    } finally {
      for (const p of [orphan, defined, beginning]) if (isProcessAlive(p.pid, p.pidStart)) process.kill(p.pid, 'SIGKILL');
      db.close();
    }
  });
});
