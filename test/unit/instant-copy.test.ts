// Unit tests of settleCopies (src/instant/copy.ts), the decisions an instant
// restore takes on each look at a domain: which copy jobs to start, and when
// to finalize. The session here records what it is asked; what QEMU and
// libvirt do is tested against them in test/integration.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { CopyJob, DomainSession, DriverDisk } from '../../src/drivers/driver.js';
import { settleCopies, type CopyRecord } from '../../src/instant/copy.js';

const TARGETS = ['sda', 'sdb', 'sdc'];

/** A domain whose `backed` disks still read from the backup, with the given jobs; it records the calls. */
function session(backed: readonly string[], jobs: Record<string, CopyJob>, copiesAtOnce?: number): DomainSession & { calls: string[] } {
  const calls: string[] = [];
  const disks: DriverDisk[] = TARGETS.map((t) => ({
    target: t, diskId: `dk-${t}`, source: `/o/${t}.qcow2`, format: 'qcow2', readonly: false,
    nbdBacking: backed.includes(t) ? { socket: '/s/backup.sock', exportName: t } : undefined,
  }));
  return {
    domain: 'vm', running: true, disks, copiesAtOnce, calls,
    copyJobs: async () => new Map(Object.entries(jobs).map(([t, j]) => [`instant-${t}`, j])),
    startCopy: async (target) => void calls.push(`start ${target}`),
    dismissCopy: async (jobId) => void calls.push(`dismiss ${jobId}`),
    flush: async () => (calls.push('flush'), true),
    dropBackings: async (targets) => void calls.push(`drop ${targets.join(',')}`),
  };
}

function record(): CopyRecord {
  return { disks: TARGETS.map((t) => ({ target: t, jobId: `instant-${t}` })), speedBytesPerSec: 0 };
}

const running: CopyJob = { status: 'running', doneBytes: 1, totalBytes: 2 };
const completed: CopyJob = { status: 'concluded' };

describe('settleCopies', () => {
  it('starts every missing copy when the session sets no cap', async () => {
    const s = session(TARGETS, {});
    const out = await settleCopies(s, record(), async () => void s.calls.push('server'));
    assert.deepEqual(s.calls, ['server', 'start sda', 'start sdb', 'start sdc']);
    assert.equal(out.changed, true);
  });

  it('with one copy at a time, starts the first disk of the record only', async () => {
    const s = session(TARGETS, {}, 1);
    await settleCopies(s, record(), async () => void s.calls.push('server'));
    assert.deepEqual(s.calls, ['server', 'start sda']);
  });

  it('with one copy at a time, starts nothing while a copy runs (and keeps the server up)', async () => {
    const s = session(TARGETS, { sda: running }, 1);
    const out = await settleCopies(s, record(), async () => void s.calls.push('server'));
    assert.deepEqual(s.calls, ['server']);
    assert.equal(out.changed, false);
    assert.equal(out.finalized, undefined);
  });

  it('with one copy at a time, starts the next disk once the previous one stopped reading from the backup', async () => {
    const s = session(['sdb', 'sdc'], { sda: completed }, 1);
    await settleCopies(s, record(), async () => void s.calls.push('server'));
    assert.deepEqual(s.calls, ['server', 'start sdb']);
  });

  it('a failed copy waits for the slot too, and its error is kept when it starts again', async () => {
    const failed: CopyJob = { status: 'concluded', error: 'NBD server gone' };
    const r = record();
    const busy = session(TARGETS, { sda: failed, sdb: running }, 1);
    await settleCopies(busy, r, async () => undefined);
    assert.deepEqual(busy.calls, []);
    const free = session(['sda', 'sdc'], { sda: failed, sdb: completed }, 1);
    await settleCopies(free, r, async () => undefined);
    assert.deepEqual(free.calls, ['dismiss instant-sda', 'start sda']);
    assert.equal(r.disks[0]?.lastError, 'NBD server gone');
  });

  it('finalizes once no disk reads from the backup: flush, then the backings dropped', async () => {
    const s = session([], { sda: completed, sdb: completed, sdc: completed }, 1);
    const out = await settleCopies(s, record(), async () => void s.calls.push('server'));
    assert.deepEqual(s.calls, ['flush', 'dismiss instant-sda', 'dismiss instant-sdb', 'dismiss instant-sdc', 'drop sda,sdb,sdc']);
    assert.ok(out.finalized !== undefined);
  });
});
