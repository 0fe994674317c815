// The copy jobs of an instant restore, settled on a running domain through
// the driver's DomainSession: one job per disk copies the disk's NBD backing
// into its overlay. A failed or missing job is started again (what is copied
// stays; copying skips it); when every job has completed, the images are
// flushed, the jobs dismissed and the backings dropped from the definition
// (the commit point of the restore).
//
// A session may cap how many jobs run at once (DomainSession.copiesAtOnce):
// then the disks are copied in the record's order, the next one started by
// the settle that finds a slot free, so every process settling the same
// domain picks the same disk.

import type { CopyJob, DomainSession } from '../drivers/driver.js';

/** What settleCopies needs of the restore's record (it updates `lastError`). */
export interface CopyRecord {
  disks: Array<{ target: string; jobId: string; lastError?: string }>;
  speedBytesPerSec: number;
}

export interface CopyOutcome {
  /** The record changed (a job was restarted) and must be saved. */
  changed: boolean;
  /** Every byte is local and the backings are dropped: the jobs as they ended. */
  finalized?: Map<string, CopyJob>;
}

/**
 * Looks at the domain's copy jobs: restarts what failed or is missing (the
 * server made sure of first), or finalizes once all are complete. A paused
 * guest is finalized later (pausing it flushes nothing).
 */
export async function settleCopies(s: DomainSession, record: CopyRecord, ensureServer: () => Promise<void>): Promise<CopyOutcome> {
  const jobs = await s.copyJobs();
  const backed = new Set(s.disks.filter((d) => d.nbdBacking !== undefined).map((d) => d.target));
  const pending = record.disks.filter((d) => backed.has(d.target));
  const startable = pending.filter((d) => {
    const j = jobs.get(d.jobId);
    return j === undefined || (j.status === 'concluded' && j.error !== undefined);
  });
  const running = pending.filter((d) => !startable.includes(d) && jobs.get(d.jobId)?.status !== 'concluded').length;
  const slots = s.copiesAtOnce === undefined ? startable.length : Math.max(0, s.copiesAtOnce - running);
  const restart = startable.slice(0, slots);
  if (restart.length > 0) {
    await ensureServer();
    for (const d of restart) {
      const failed = jobs.get(d.jobId)?.error;
      if (failed !== undefined) d.lastError = failed;
      if (jobs.has(d.jobId)) await s.dismissCopy(d.jobId);
      await s.startCopy(d.target, d.jobId, record.speedBytesPerSec);
    }
    return { changed: true };
  }
  if (pending.every((d) => jobs.get(d.jobId)?.status === 'concluded')) {
    // The copied bytes must be on disk before the definition stops declaring
    // the backing: a hypervisor killed before a flush would leave images that
    // read zeroes where the backup had data.
    if (!(await s.flush())) return { changed: false };
    for (const d of record.disks) {
      if (jobs.has(d.jobId)) await s.dismissCopy(d.jobId);
    }
    await s.dropBackings(record.disks.map((d) => d.target));
    return { changed: false, finalized: jobs };
  }
  if (pending.some((d) => jobs.get(d.jobId)?.status === 'running')) await ensureServer();
  return { changed: false };
}
