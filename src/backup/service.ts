// Backup jobs (push mode) with libvirt's interface: per disk a full or an
// incremental copy, chosen by the coverage rules, started in one QMP
// transaction together with the temporary merged bitmaps and, optionally, the
// new checkpoint, so that the backup and the checkpoint describe one instant.
//
// Invariants:
// - At most one job per domain. While it runs, configuration changes are
//   refused (DomainHooks.beforeConfigChange) with an error naming the job.
// - A job is written to the metadata (state "starting") before QEMU is told
//   anything; every later command on the domain reaps it: a job QEMU knows is
//   adopted, one it does not know is cleaned up; a finished one is finalized.
// - Finalizing removes every temporary node and bitmap; the targets of a job
//   that did not complete are deleted (only those qbackup created).
// - QEMU jobs use auto-dismiss off, so their outcome survives until a qbackup
//   process reads it, whichever process that is.

import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { basename, dirname, join, relative, resolve } from 'node:path';
import type { CoverageProblem } from '../checkpoint/coverage.js';
import type { CheckpointService } from '../checkpoint/service.js';
import { parseCheckpointXml, type CheckpointXml } from '../checkpoint/xml.js';
import { QbackupError, describeError } from '../errors.js';
import type { AttachedDisk, DomainContext, DomainService } from '../domain/service.js';
import { createImage } from '../qemu/image.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import { QmpCommandError, type QmpClient, type QmpTransactionAction } from '../qmp/index.js';
import type { JobStore } from '../store/jobs.js';
import { sleep } from '../util/proc.js';
import { readBitmapsOnline, toTransaction } from '../checkpoint/bitmaps.js';
import { TEMP_BITMAP_PREFIX } from '../checkpoint/service.js';
import { parseBackupXml, type BackupDiskXml, type BackupXml } from './xml.js';

export interface BeginOptions {
  /** A <domainbackup> document; without it, a push backup of every disk. */
  backupXml?: string;
  /** A <domaincheckpoint> document to create atomically with the job. */
  checkpointXml?: string;
  /** Shorthands for the common case (no XML needed). */
  incremental?: string;
  checkpointName?: string;
  targetDir?: string;
  reuseExternal?: boolean;
  strict?: boolean;
  /** Copy rate limit per disk (QEMU's job speed), bytes per second; unlimited when absent. */
  bandwidthBytesPerSec?: number;
}

export type DiskJobState = 'running' | 'completed' | 'failed' | 'cancelled';

export interface JobDisk {
  target: string;
  diskId: string;
  mode: 'full' | 'incremental';
  incremental?: string;
  /** Why a disk asked for incrementally got a full backup. */
  fullReasons?: CoverageProblem[];
  bitmaps?: string[];
  tmpBitmap?: string;
  targetFile: string;
  targetFormat: 'qcow2' | 'raw';
  createdTarget: boolean;
  /** Backing file of an incremental target, or why there is none. */
  backingFile?: string;
  backingNote?: string;
  qemuJobId: string;
  /** Push: the target's nodes. Pull: the scratch image's nodes. */
  targetNodes: { file: string; format: string };
  /** Pull mode only: the fleecing filter, the frozen view and its export. */
  pull?: { cbwNode: string; snapNode: string; exportName: string; exportId: string };
  state: DiskJobState;
  error?: string;
  bytesDone?: number;
  bytesTotal?: number;
}

export interface NbdServer {
  transport: 'unix' | 'tcp';
  socket?: string;
  /** A directory qbackup made for the socket (mode 0700), removed with the job. */
  socketDir?: string;
  host?: string;
  port?: number;
}

export interface JobInfo {
  id: string;
  domain: string;
  mode: 'push' | 'pull';
  state: 'running' | 'completed' | 'failed' | 'aborted';
  checkpoint?: string;
  incremental?: string;
  startedMs: number;
  endedMs?: number;
  bytesDone: number;
  bytesTotal: number;
  error?: string;
  /** Pull mode: where the exports are served. */
  server?: NbdServer;
  disks: JobDisk[];
}

interface JobPayload {
  info: JobInfo;
  /** The checkpoint created with the job (rows + bitmap actions), committed once QEMU accepted the transaction. */
  checkpointPlan?: Parameters<CheckpointService['commitCreate']>[0];
}

export class BackupService {
  constructor(
    readonly domains: DomainService,
    readonly checkpoints: CheckpointService,
    readonly store: JobStore,
    private readonly crashAt?: string,
  ) {
    const previousOpen = domains.hooks.onOpen;
    domains.hooks.onOpen = async (ctx) => {
      await previousOpen?.(ctx);
      await this.reap(ctx);
    };
    domains.hooks.beforeConfigChange = (ctx, what) => {
      const job = this.store.active(ctx.row.name);
      if (job !== undefined) {
        throw new QbackupError('BACKUP_RUNNING', `Cannot ${what} on domain "${ctx.row.name}": backup job "${job.id}" is running`, {
          details: { job: job.id },
        });
      }
    };
  }

  // ---- begin -----------------------------------------------------------------

  async begin(domain: string, options: BeginOptions = {}): Promise<JobInfo> {
    const backup: BackupXml = options.backupXml !== undefined ? parseBackupXml(options.backupXml) : { mode: 'push' };
    const cpSpec: CheckpointXml | undefined =
      options.checkpointXml !== undefined ? parseCheckpointXml(options.checkpointXml) : options.checkpointName !== undefined ? { name: options.checkpointName } : undefined;
    if (options.incremental !== undefined) backup.incremental = options.incremental;
    if (cpSpec !== undefined && (cpSpec.parent !== undefined || cpSpec.creationTime !== undefined || cpSpec.domainXml !== undefined)) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot start a backup of domain "${domain}": the checkpoint XML may not set <parent>, <creationTime> or <domain> (they are for --redefine)`);
    }
    return this.domains.withDomain(domain, 'backup-begin', async (ctx) => {
      if (!ctx.running) {
        throw new QbackupError('DOMAIN_NOT_RUNNING', `Cannot back up domain "${domain}": it is not running (backups of shut-off domains are not supported yet)`);
      }
      const active = this.store.active(domain);
      if (active !== undefined) throw new QbackupError('BACKUP_RUNNING', `Cannot start a backup of domain "${domain}": backup job "${active.id}" is running`);
      return this.domains.withQmp(ctx, 'backup-begin', (qmp) => this.beginJob(ctx, qmp, backup, cpSpec, options));
    });
  }

  private async beginJob(ctx: DomainContext, qmp: QmpClient, backup: BackupXml, cpSpec: CheckpointXml | undefined, options: BeginOptions): Promise<JobInfo> {
    const domain = ctx.row.name;
    const pull = backup.mode === 'pull';
    const id = `backup-${randomBytes(4).toString('hex')}`;
    const short = id.slice(7);
    const selected = selectDisks(ctx, backup);
    const disks: JobDisk[] = [];
    const sizes = await virtualSizes(qmp, selected.map((s) => s.disk));
    const uncovered: string[] = [];
    const scratchDir = join(this.domains.domainDir(domain), 'scratch');
    for (const { disk, spec } of selected) {
      const since = spec.backupmode === 'full' ? undefined : (spec.incremental ?? backup.incremental);
      if (since !== undefined) this.checkpoints.requireCheckpoint(domain, since);
      const format = spec.driverType ?? 'qcow2';
      if (pull && format !== 'qcow2') {
        throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${disk.target}" of domain "${domain}" in pull mode: the scratch image must be qcow2, not ${format}`);
      }
      const jobDisk: JobDisk = {
        target: disk.target,
        diskId: disk.diskId,
        mode: since === undefined ? 'full' : 'incremental',
        targetFile: '',
        targetFormat: format,
        createdTarget: false,
        qemuJobId: `${id}-${disk.target}`,
        targetNodes: { file: `bk${short}-${disk.target}-file`, format: `bk${short}-${disk.target}-fmt` },
        state: 'running',
      };
      if (since !== undefined) {
        jobDisk.incremental = since;
        const [cov] = await this.checkpoints.coverageIn(ctx, qmp, since, [disk]);
        if (cov === undefined || cov.mode === 'full') {
          const reasons = cov?.reasons ?? [];
          uncovered.push(`disk "${disk.target}": ${reasons.map((r) => `${r.code} (${r.detail})`).join(', ')}`);
          jobDisk.mode = 'full';
          jobDisk.fullReasons = reasons;
        } else {
          jobDisk.bitmaps = cov.bitmaps;
          jobDisk.tmpBitmap = pull ? (spec.exportbitmap ?? `backup-${disk.target}`) : `${TEMP_BITMAP_PREFIX}${short}-${disk.target}`;
        }
      }
      if (pull) {
        jobDisk.targetFile = resolve(spec.scratch ?? join(scratchDir, `${id}-${disk.target}.qcow2`));
        jobDisk.pull = {
          cbwNode: `bk${short}-${disk.target}-cbw`,
          snapNode: `bk${short}-${disk.target}-snap`,
          exportName: spec.exportname ?? disk.target,
          exportId: `${id}-${disk.target}`,
        };
        if (existsSync(jobDisk.targetFile)) {
          throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${disk.target}" of domain "${domain}": scratch file "${jobDisk.targetFile}" exists`);
        }
      } else {
        jobDisk.targetFile = resolve(spec.target ?? defaultTarget(disk, options.targetDir, cpSpec?.name ?? id));
        if (existsSync(jobDisk.targetFile) && !options.reuseExternal) {
          throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${disk.target}" of domain "${domain}": target "${jobDisk.targetFile}" exists (use --reuse-external to write into it)`);
        }
        if (!existsSync(jobDisk.targetFile) && options.reuseExternal) {
          throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${disk.target}" of domain "${domain}": with --reuse-external the target "${jobDisk.targetFile}" must exist`);
        }
        if (jobDisk.mode === 'incremental' && jobDisk.incremental !== undefined) {
          const prev = this.store.targetFor(domain, jobDisk.incremental, disk.diskId);
          if (prev !== undefined && existsSync(prev) && format === 'qcow2') jobDisk.backingFile = prev;
          else jobDisk.backingNote = prev === undefined ? `no backup recorded for checkpoint "${jobDisk.incremental}"` : `the backup "${prev}" no longer exists`;
        }
      }
      disks.push(jobDisk);
    }
    if (disks.length === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": no disk selected`);
    if (options.strict && uncovered.length > 0) {
      throw new QbackupError('BITMAP_INCONSISTENT', `Cannot back up domain "${domain}" incrementally (--strict): ${uncovered.join('; ')}`);
    }
    assertDistinct(domain, disks.map((d) => d.targetFile), 'write to');
    if (pull) {
      // The exported bitmap is created by the job and removed with it: its name must be free.
      const existing = await readBitmapsOnline(qmp, ctx.disks);
      for (const d of disks) {
        if (d.tmpBitmap !== undefined && (existing.get(d.diskId) ?? []).some((b) => b.name === d.tmpBitmap)) {
          throw new QbackupError('INVALID_ARGUMENT', `Cannot export disk "${d.target}" of domain "${domain}" with bitmap "${d.tmpBitmap}": the disk already has a bitmap of that name`);
        }
      }
    }
    if (pull) assertDistinct(domain, disks.map((d) => d.pull?.exportName ?? ''), 'use the export name');

    const plan = cpSpec !== undefined ? await this.checkpoints.planCreate(ctx, qmp, cpSpec) : undefined;
    const info: JobInfo = {
      id,
      domain,
      mode: pull ? 'pull' : 'push',
      state: 'running',
      ...(plan !== undefined ? { checkpoint: plan.row.name } : {}),
      ...(backup.incremental !== undefined ? { incremental: backup.incremental } : {}),
      startedMs: Date.now(),
      bytesDone: 0,
      bytesTotal: 0,
      disks,
    };
    if (pull) info.server = this.serverFor(domain, id, backup);
    const payload: JobPayload = { info, ...(plan !== undefined ? { checkpointPlan: plan } : {}) };
    this.store.transaction(() => this.store.insert({ domain, id, state: 'starting', payload: JSON.stringify(payload), started_ms: info.startedMs }));
    const save = (): void => this.store.transaction(() => this.store.update(domain, 'starting', JSON.stringify(payload)));
    try {
      for (const d of disks) {
        if (pull || !options.reuseExternal) {
          mkdirSync(dirname(d.targetFile), { recursive: true, mode: 0o700 });
          const backing = d.backingFile !== undefined ? { backingFile: relativeBacking(d.targetFile, d.backingFile), backingFormat: 'qcow2' } : {};
          await createImage(d.targetFile, d.targetFormat, sizes.get(d.diskId) ?? 0, backing);
          d.createdTarget = true;
          save();
        }
        await qmp.execute('blockdev-add', { driver: 'file', 'node-name': d.targetNodes.file, filename: d.targetFile });
        // backing: null — the job writes every cluster it copies, so a previous backup is never opened.
        await qmp.execute('blockdev-add', { driver: d.targetFormat, 'node-name': d.targetNodes.format, file: d.targetNodes.file, ...(d.targetFormat === 'qcow2' ? { backing: null } : {}) });
      }
      this.fault('backup-begin:before-qemu');
    } catch (err) {
      await this.finalize(ctx, qmp, payload, 'failed', describeError(err));
      throw err;
    }
    try {
      await qmp.transaction(this.startActions(disks, plan, pull, options.bandwidthBytesPerSec), { completionMode: 'individual' });
    } catch (err) {
      // Refused by QEMU: nothing started. Otherwise (a timeout, a lost connection)
      // it may have: the job stays recorded as starting for the next command to settle.
      if (err instanceof QmpCommandError) await this.finalize(ctx, qmp, payload, 'failed', describeError(err));
      throw err;
    }
    this.fault('backup-begin:after-qemu');
    // The transaction made the checkpoint's bitmaps: record it before anything else can fail.
    this.store.transaction(() => {
      if (plan !== undefined) this.checkpoints.commitCreate(plan);
      this.store.update(domain, pull ? 'starting' : 'running', JSON.stringify(payload));
    });
    if (pull && info.server !== undefined) {
      try {
        await this.exportDisks(qmp, info.server, disks);
      } catch (err) {
        await this.finalize(ctx, qmp, payload, 'failed', describeError(err));
        throw err;
      }
      this.store.transaction(() => this.store.update(domain, 'running', JSON.stringify(payload)));
    }
    return info;
  }

  /** Where the NBD server of a pull job listens: as the XML says, else a unix socket only the owner can reach. */
  private serverFor(domain: string, id: string, backup: BackupXml): NbdServer {
    const s = backup.server;
    if (s?.transport === 'tcp') return { transport: 'tcp', host: s.name ?? 'localhost', port: s.port ?? 0 };
    if (s?.socket !== undefined) return { transport: 'unix', socket: s.socket };
    const dir = join(this.domains.domainDir(domain), `nbd-${id.slice(7)}`);
    return { transport: 'unix', socket: join(dir, 'nbd.sock'), socketDir: dir };
  }

  /** Pull mode, after the transaction: snapshot-access nodes over the fleecing filters, one read-only export each. */
  private async exportDisks(qmp: QmpClient, server: NbdServer, disks: readonly JobDisk[]): Promise<void> {
    for (const d of disks) {
      if (d.pull === undefined) continue;
      await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': d.pull.snapNode, file: d.pull.cbwNode });
    }
    if (server.socketDir !== undefined) mkdirSync(server.socketDir, { recursive: true, mode: 0o700 });
    const addr =
      server.transport === 'tcp'
        ? { type: 'inet', data: { host: server.host ?? 'localhost', port: String(server.port ?? 0) } }
        : { type: 'unix', data: { path: server.socket ?? '' } };
    await qmp.execute('nbd-server-start', { addr });
    for (const d of disks) {
      if (d.pull === undefined) continue;
      await qmp.execute('block-export-add', {
        type: 'nbd',
        id: d.pull.exportId,
        'node-name': d.pull.snapNode,
        name: d.pull.exportName,
        writable: false,
        'allocation-depth': true,
        ...(d.tmpBitmap !== undefined ? { bitmaps: [{ node: nodeNamesFor(d.diskId).format, name: d.tmpBitmap }] } : {}),
      });
    }
  }

  /** The one transaction that starts the job: temporary merged bitmaps, the new checkpoint, and every copy job. */
  private startActions(
    disks: readonly JobDisk[],
    plan: Parameters<CheckpointService['commitCreate']>[0] | undefined,
    pull: boolean,
    speed: number | undefined,
  ): QmpTransactionAction[] {
    const actions: QmpTransactionAction[] = [];
    for (const d of disks) {
      if (d.tmpBitmap === undefined) continue;
      const node = nodeNamesFor(d.diskId).format;
      actions.push({ type: 'block-dirty-bitmap-add', data: { node, name: d.tmpBitmap, persistent: false, disabled: true } });
      actions.push({ type: 'block-dirty-bitmap-merge', data: { node, target: d.tmpBitmap, bitmaps: d.bitmaps ?? [] } });
    }
    if (plan !== undefined) actions.push(...toTransaction(this.checkpoints.createActions(plan)));
    for (const d of disks) {
      // Pull: fleecing (sync none; copy-before-write keeps the view at this instant
      // and the scratch image takes the old data). Push: the copy itself.
      const copy = pull
        ? { sync: 'none', 'filter-node-name': d.pull?.cbwNode }
        : {
            sync: d.tmpBitmap !== undefined ? 'bitmap' : 'full',
            ...(d.tmpBitmap !== undefined ? { bitmap: d.tmpBitmap, 'bitmap-mode': 'never' } : {}),
            ...(speed !== undefined ? { speed } : {}),
          };
      actions.push({
        type: 'blockdev-backup',
        data: {
          'job-id': d.qemuJobId,
          device: nodeNamesFor(d.diskId).format,
          target: d.targetNodes.format,
          ...copy,
          'auto-finalize': true,
          'auto-dismiss': false,
        },
      });
    }
    return actions;
  }

  // ---- observe and control -----------------------------------------------------

  /** The running job with fresh progress, or undefined. */
  async info(domain: string): Promise<JobInfo | undefined> {
    return this.domains.withDomain(domain, 'domjobinfo', async (ctx) => {
      const row = this.store.active(domain);
      if (row === undefined || !ctx.running) return undefined;
      const payload = JSON.parse(row.payload) as JobPayload;
      await this.domains.withQmp(ctx, 'domjobinfo', async (qmp) => {
        applyProgress(payload.info, await queryJobs(qmp));
      });
      return payload.info;
    });
  }

  /** The last finished job; a job that ended since the last command is reaped first. */
  async lastResult(domain: string): Promise<JobInfo | undefined> {
    return this.domains.withDomain(domain, 'domjobinfo --completed', async () => {
      const r = this.store.lastResult(domain);
      return r === undefined ? undefined : (JSON.parse(r.payload) as JobInfo);
    });
  }

  async abort(domain: string): Promise<JobInfo> {
    return this.domains.withDomain(domain, 'domjobabort', async (ctx) => {
      const row = this.store.active(domain);
      if (row === undefined) throw new QbackupError('INVALID_ARGUMENT', `Domain "${domain}" has no backup job to abort`);
      const payload = JSON.parse(row.payload) as JobPayload;
      return this.domains.withQmp(ctx, 'domjobabort', async (qmp) => {
        // A pull job ends this way by design (the client has read what it needs);
        // a push job that is aborted did not complete.
        if (payload.info.mode === 'pull') return this.finalize(ctx, qmp, payload, 'completed');
        for (const d of payload.info.disks) {
          await qmp.execute('job-cancel', { id: d.qemuJobId }).catch(() => undefined);
        }
        await waitConcluded(qmp, payload.info.disks.map((d) => d.qemuJobId), 30_000);
        return this.finalize(ctx, qmp, payload, 'aborted');
      });
    });
  }

  /** Polls (without holding the domain between polls) until the job ends; returns its result. */
  async wait(domain: string, jobId: string, onProgress?: (info: JobInfo) => void): Promise<JobInfo> {
    for (;;) {
      const info = await this.info(domain);
      if (info === undefined || info.id !== jobId) {
        const result = this.store.result(jobId);
        if (result === undefined) throw new QbackupError('INVALID_ARGUMENT', `Backup job "${jobId}" of domain "${domain}" is neither running nor finished`);
        return JSON.parse(result) as JobInfo;
      }
      onProgress?.(info);
      await sleep(pollDelayMs(info, Date.now()));
    }
  }

  // ---- reaping -----------------------------------------------------------------

  /** Runs at the start of every command on the domain: adopts, finalizes or cleans up a job. */
  private async reap(ctx: DomainContext): Promise<void> {
    const row = this.store.active(ctx.row.name);
    if (row === undefined) return;
    const payload = JSON.parse(row.payload) as JobPayload;
    if (!ctx.running) {
      if (row.state === 'finishing') await this.finalize(ctx, undefined, payload, payload.info.state, payload.info.error);
      else await this.finalize(ctx, undefined, payload, 'failed', 'QEMU exited while the job ran');
      return;
    }
    await this.domains.withQmp(ctx, 'backup job check', async (qmp) => {
      if (row.state === 'finishing') {
        // The outcome was decided before qbackup stopped: finish exactly that.
        await this.finalize(ctx, qmp, payload, payload.info.state, payload.info.error);
        return;
      }
      const jobs = await queryJobs(qmp);
      const ours = payload.info.disks.map((d) => jobs.get(d.qemuJobId));
      if (ours.every((j) => j === undefined)) {
        // QEMU never started the jobs (qbackup died before the transaction), or they vanished.
        await this.finalize(ctx, qmp, payload, 'failed', row.state === 'starting' ? 'qbackup stopped before the job started' : 'QEMU lost the job');
        return;
      }
      if (row.state === 'starting') {
        // The transaction happened (its jobs exist), so did the checkpoint's bitmaps.
        this.store.transaction(() => {
          if (payload.checkpointPlan !== undefined && this.checkpoints.store.get(ctx.row.name, payload.checkpointPlan.row.name) === undefined) {
            this.checkpoints.commitCreate(payload.checkpointPlan);
          }
          this.store.update(ctx.row.name, 'running', JSON.stringify(payload));
        });
        if (payload.info.mode === 'pull') {
          // Nobody was told where to read and the exports may be missing: end it.
          await this.finalize(ctx, qmp, payload, 'failed', 'qbackup stopped while the pull job was starting');
          return;
        }
      }
      if (ours.every((j) => j !== undefined && j.status === 'concluded')) {
        applyProgress(payload.info, jobs);
        // Any disk that did not complete (failed, or cancelled from outside) fails the job.
        const failed = payload.info.disks.find((d) => d.state !== 'completed');
        await this.finalize(ctx, qmp, payload, failed === undefined ? 'completed' : 'failed', failed === undefined ? undefined : (failed.error ?? `disk "${failed.target}" ${failed.state}`));
      }
    });
  }

  private fault(point: BackupFaultPoint): void {
    if (this.crashAt === point) process.kill(process.pid, 'SIGKILL');
  }

  /**
   * Ends a job: dismisses QEMU's jobs, removes target nodes and temporary
   * bitmaps, deletes targets of a job that did not complete, records the result.
   */
  private async finalize(ctx: DomainContext, qmp: QmpClient | undefined, payload: JobPayload, state: JobInfo['state'], error?: string): Promise<JobInfo> {
    const info = payload.info;
    const domain = ctx.row.name;
    info.state = state;
    if (error !== undefined) info.error = error;
    // Decide first, then tear down: a crash during teardown must not turn a
    // completed job into a failed one whose targets the next command deletes.
    this.store.transaction(() => this.store.update(domain, 'finishing', JSON.stringify(payload)));
    if (qmp !== undefined) await teardown(qmp, info);
    if (info.server?.socketDir !== undefined) rmSync(info.server.socketDir, { recursive: true, force: true });
    for (const d of info.disks) {
      if (state === 'completed') d.state = 'completed';
      else if (d.state === 'running' || d.state === 'completed') d.state = state === 'aborted' ? 'cancelled' : 'failed';
      // Push targets of a job that did not complete go; pull scratch images always go.
      if ((state !== 'completed' || info.mode === 'pull') && d.createdTarget) rmSync(d.targetFile, { force: true });
    }
    info.endedMs = Date.now();
    this.store.transaction(() => {
      if (state === 'completed' && info.mode === 'push' && info.checkpoint !== undefined) {
        // Only a file that opens as the complete disk may back the next incremental:
        // a full, or an incremental whose own backing chain is complete.
        for (const d of info.disks) {
          if (d.mode === 'full' || d.backingFile !== undefined) this.store.recordTarget(domain, info.checkpoint, d.diskId, d.targetFile);
        }
      }
      this.store.remove(domain);
      this.store.saveResult(domain, info.id, JSON.stringify(info));
    });
    return info;
  }
}

// ---- helpers ---------------------------------------------------------------------

export type BackupFaultPoint = 'backup-begin:before-qemu' | 'backup-begin:after-qemu';

function selectDisks(ctx: DomainContext, backup: BackupXml): Array<{ disk: AttachedDisk; spec: BackupDiskXml }> {
  const domain = ctx.row.name;
  const specs = backup.disks ?? [];
  for (const s of specs) {
    if (!ctx.disks.some((d) => d.target === s.name)) {
      throw new QbackupError('DISK_NOT_FOUND', `Cannot back up domain "${domain}": it has no disk "${s.name}"`);
    }
  }
  const out: Array<{ disk: AttachedDisk; spec: BackupDiskXml }> = [];
  for (const disk of ctx.disks) {
    const spec = specs.find((s) => s.name === disk.target);
    // As libvirt: when <disks> lists some disks, the others are not backed up.
    if (backup.disks !== undefined && spec === undefined) continue;
    if (spec !== undefined && !spec.backup) continue;
    if (disk.readonly && spec === undefined) continue;
    out.push({ disk, spec: spec ?? { name: disk.target, backup: true } });
  }
  return out;
}

function assertDistinct(domain: string, values: readonly string[], what: string): void {
  const seen = new Set<string>();
  for (const v of values) {
    if (seen.has(v)) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": two disks would ${what} "${v}"`);
    seen.add(v);
  }
}

function defaultTarget(disk: AttachedDisk, targetDir: string | undefined, suffix: string): string {
  if (targetDir !== undefined) return join(targetDir, `${disk.target}.${suffix}.qcow2`);
  return `${disk.source}.${suffix}`;
}

/** Backing paths are stored relative to the target so the backup files can move together. */
function relativeBacking(targetFile: string, backingFile: string): string {
  const rel = relative(dirname(targetFile), backingFile);
  return rel.startsWith('..') ? backingFile : rel || basename(backingFile);
}

async function virtualSizes(qmp: QmpClient, disks: readonly AttachedDisk[]): Promise<Map<string, number>> {
  const nodes = await qmp.execute<Array<{ 'node-name'?: string; image?: { 'virtual-size'?: number } }>>('query-named-block-nodes', { flat: true });
  const out = new Map<string, number>();
  for (const d of disks) {
    const n = nodes.find((x) => x['node-name'] === nodeNamesFor(d.diskId).format);
    out.set(d.diskId, n?.image?.['virtual-size'] ?? 0);
  }
  return out;
}

interface QemuJob {
  id: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

async function queryJobs(qmp: QmpClient): Promise<Map<string, QemuJob>> {
  const jobs = await qmp.execute<QemuJob[]>('query-jobs');
  return new Map(jobs.map((j) => [j.id, j]));
}

function applyProgress(info: JobInfo, jobs: Map<string, QemuJob>): void {
  let done = 0;
  let total = 0;
  for (const d of info.disks) {
    const j = jobs.get(d.qemuJobId);
    if (j === undefined) continue;
    d.bytesDone = j['current-progress'];
    d.bytesTotal = j['total-progress'];
    done += j['current-progress'];
    total += j['total-progress'];
    if (j.status === 'concluded') {
      d.state = j.error !== undefined ? (/cancel/i.test(j.error) ? 'cancelled' : 'failed') : 'completed';
      if (j.error !== undefined) d.error = j.error;
    }
  }
  info.bytesDone = done;
  info.bytesTotal = total;
}

/**
 * Removes everything a job put into QEMU, in the order QEMU requires (exports,
 * then the frozen views, then the jobs, then the scratch or target nodes), each
 * step tolerant of what is already gone.
 */
async function teardown(qmp: QmpClient, info: JobInfo): Promise<void> {
  const ignore = (): undefined => undefined;
  for (const d of info.disks) {
    if (d.pull !== undefined) {
      const cursor = qmp.eventCursor();
      const deleted = await qmp.execute('block-export-del', { id: d.pull.exportId, mode: 'hard' }).then(() => true, () => false);
      if (deleted) await qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data['id'] === d.pull?.exportId, 10_000, cursor).catch(ignore);
    }
  }
  for (const d of info.disks) {
    if (d.pull !== undefined) await qmp.execute('blockdev-del', { 'node-name': d.pull.snapNode }).catch(ignore);
  }
  const jobs = await queryJobs(qmp).catch(() => new Map<string, QemuJob>());
  const live = info.disks.filter((d) => jobs.has(d.qemuJobId) && jobs.get(d.qemuJobId)?.status !== 'concluded').map((d) => d.qemuJobId);
  for (const id of live) await qmp.execute('job-cancel', { id }).catch(ignore);
  if (live.length > 0) await waitConcluded(qmp, live, 30_000).catch(ignore);
  for (const d of info.disks) {
    await qmp.execute('job-dismiss', { id: d.qemuJobId }).catch(ignore);
    await qmp.execute('blockdev-del', { 'node-name': d.targetNodes.format }).catch(ignore);
    await qmp.execute('blockdev-del', { 'node-name': d.targetNodes.file }).catch(ignore);
    if (d.tmpBitmap !== undefined) {
      await qmp.execute('block-dirty-bitmap-remove', { node: nodeNamesFor(d.diskId).format, name: d.tmpBitmap }).catch(ignore);
    }
  }
  // One job per domain, and the NBD server of a domain's QEMU is the pull job's own.
  if (info.mode === 'pull') await qmp.execute('nbd-server-stop').catch(ignore);
}

/**
 * How long wait() sleeps before its next poll: half of what the job still
 * needs at its rate so far (before any progress, half of the time it has
 * run), kept between 5 and 100 ms. A fixed 100 ms added up to 100 ms to
 * every backup, more than a small incremental takes; polls stay at 100 ms
 * for long jobs, so another command waiting for the domain is not starved.
 */
export function pollDelayMs(info: Pick<JobInfo, 'startedMs' | 'bytesDone' | 'bytesTotal'>, nowMs: number): number {
  const elapsed = Math.max(0, nowMs - info.startedMs);
  const remaining = info.bytesDone > 0 && info.bytesTotal > 0 ? (elapsed * Math.max(0, info.bytesTotal - info.bytesDone)) / info.bytesDone : elapsed;
  return Math.min(100, Math.max(5, Math.round(remaining / 2)));
}

async function waitConcluded(qmp: QmpClient, ids: readonly string[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const jobs = await queryJobs(qmp);
    if (ids.every((id) => jobs.get(id) === undefined || jobs.get(id)?.status === 'concluded')) return;
    if (Date.now() > deadline) throw new QbackupError('QMP_TIMEOUT', `Backup jobs did not stop within ${timeoutMs} ms`);
    await sleep(50);
  }
}
