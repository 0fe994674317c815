// One domain held by a command, as the driver interface's DomainSession: the
// QMP steps of an instant restore's copy (block-stream jobs, a flush, the
// removal of the NBD backing nodes). A session made inside a hook reuses the
// hook's QMP connection; otherwise each step opens its own.

import type { DomainContext, DomainService } from '../../domain/domains.js';
import { QbackupError } from '../../errors.js';
import { nodeNamesFor } from '../../qemu/nodes.js';
import type { QmpClient } from '../../qmp/index.js';
import { COPY_JOB_PREFIX, type CopyJob, type DomainSession, type DriverDisk } from '../driver.js';
import { driverDisk } from './disks.js';

export class QemuSession implements DomainSession {
  readonly disks: readonly DriverDisk[];

  constructor(
    private readonly domains: DomainService,
    private readonly ctx: DomainContext,
    private readonly qmp?: QmpClient,
  ) {
    this.disks = ctx.disks.map(driverDisk);
  }

  get domain(): string {
    return this.ctx.row.name;
  }

  get running(): boolean {
    return this.ctx.running;
  }

  private async withQmp<T>(what: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    return this.qmp !== undefined ? fn(this.qmp) : this.domains.withQmp(this.ctx, what, fn);
  }

  async copyJobs(): Promise<Map<string, CopyJob>> {
    return this.withQmp('instant restore check', async (qmp) => {
      const jobs = (await qmp.execute('query-jobs')) as Array<{ id: string; type: string; status: string; 'current-progress': number; 'total-progress': number; error?: string }>;
      const out = new Map<string, CopyJob>();
      for (const j of jobs) {
        if (j.type !== 'stream' || !j.id.startsWith(COPY_JOB_PREFIX)) continue;
        // Held at 'pending' (auto-finalize off), the job has copied every byte: it is complete, and dismissCopy finalizes it.
        const status = j.status === 'pending' ? 'concluded' : j.status;
        out.set(j.id, { status, doneBytes: j['current-progress'], totalBytes: j['total-progress'], error: j.error });
      }
      return out;
    });
  }

  async startCopy(target: string, jobId: string, speedBytesPerSec: number): Promise<void> {
    const disk = this.ctx.disks.find((x) => x.target === target);
    if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${this.domain}" has no disk "${target}" to restore into`);
    await this.withQmp('instant restore copy', (qmp) =>
      qmp.execute('block-stream', {
        'job-id': jobId,
        device: nodeNamesFor(disk.diskId).format,
        // QEMU 7.2 segfaults when query-named-block-nodes runs between the
        // job's graph change and its dismissal (the dropped copy-on-read
        // filter stays listed without a child): the job stops at 'pending'
        // and dismissCopy finalizes and dismisses it in one go.
        'auto-finalize': false,
        'auto-dismiss': false,
        ...(speedBytesPerSec > 0 ? { speed: speedBytesPerSec } : {}),
      }),
    );
  }

  async dismissCopy(jobId: string): Promise<void> {
    await this.withQmp('instant restore copy', async (qmp) => {
      const jobs = (await qmp.execute('query-jobs')) as Array<{ id: string; status: string }>;
      // Finalizing drops the copy-on-read filter; nothing may read the node graph until the job is gone.
      if (jobs.find((j) => j.id === jobId)?.status === 'pending') await qmp.execute('job-finalize', { id: jobId });
      await qmp.execute('job-dismiss', { id: jobId });
    });
  }

  /**
   * Pauses the guest for a moment: QEMU flushes all block nodes when it
   * stops a running guest (QMP has no flush command). False when the guest
   * is not running: pausing a paused guest flushes nothing.
   */
  async flush(): Promise<boolean> {
    return this.withQmp('instant restore flush', async (qmp) => {
      const status = (await qmp.execute('query-status')) as { running: boolean };
      if (!status.running) return false;
      await qmp.execute('stop');
      await qmp.execute('cont');
      return true;
    });
  }

  async dropBackings(targets: readonly string[]): Promise<void> {
    await this.withQmp('instant restore end', async (qmp) => {
      for (const d of this.ctx.disks.filter((x) => x.nbdBacking !== undefined && targets.includes(x.target))) {
        await qmp.execute('blockdev-del', { 'node-name': nodeNamesFor(d.diskId).backing });
      }
    });
    this.domains.setNbdBackings(this.ctx, new Map(targets.map((t) => [t, undefined])));
  }
}
