// Backup jobs, push and pull mode, with libvirt's semantics: per disk a full
// or an incremental copy, chosen by the coverage rules, started in one QMP
// transaction together with the temporary merged bitmaps and, optionally, the
// new checkpoint, so that the backup and the checkpoint describe one instant.
// Push: QEMU writes each disk into a target image. Pull: QEMU keeps a frozen
// view (fleecing) and serves it over NBD until the caller ends the job.
//
// The shape: begin = read (coverage, sizes, bitmaps) → plan (plan.ts, pure)
// → record → execute (qemu.ts); every later command on the domain reaps the
// job (adopt, finish or clean up); finalize tears down and records the result.
//
// Invariants:
// - At most one job per domain. While it runs, configuration changes are
//   refused (assertNoJob, a domain hook) with an error naming the job.
// - A job is written to the metadata (state "starting") before QEMU is told
//   anything; every later command on the domain reaps it: a job QEMU knows is
//   adopted, one it does not know is cleaned up; a finished one is finalized.
// - Finalizing removes every temporary node and bitmap; the targets of a job
//   that did not complete are deleted (only those qbackup created). Teardown
//   errors are kept in the job's result, never dropped.
// - QEMU jobs use auto-dismiss off, so their outcome survives until a qbackup
//   process reads it, whichever process that is.
// - A pull job asked with skipUnchanged whose disks changed nothing since
//   their checkpoints makes the checkpoint alone (`unchanged`: nothing of it
//   is in QEMU). It is never empty by mistake: the counts that decide it are
//   read after the checkpoint's transaction froze them (executeUnchanged).

import { randomBytes } from 'node:crypto';
import { existsSync, rmSync } from 'node:fs';
import { basename, dirname, relative } from 'node:path';
import type { DiskCoverage } from '../checkpoint/coverage.js';
import type { CheckpointService } from '../checkpoint/checkpoints.js';
import type { CheckpointSpec } from '../checkpoint/spec.js';
import { toTransaction } from '../checkpoint/bitmaps.js';
import { QbackupError, describeError } from '../errors.js';
import { freezeGuest, type Frozen, type QuiesceMode } from '../domain/quiesce.js';
import { assert } from '../util/assert.js';
import { noFaults, type Faults } from '../util/faults.js';
import { throwIfCancelled, type OperationOptions } from '../util/operation.js';
import { refuseWhileRestoring, type DomainContext, type DomainService } from '../domain/domains.js';
import { readBlockNodes, type BlockNode } from '../qemu/block-nodes.js';
import { createImage } from '../image/qemu-img.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import { QmpCommandError, type QmpClient } from '../qmp/index.js';
import type { JobStore } from '../store/jobs.js';
import { checkServerCredentials } from '../util/pki.js';
import { checkSecretFile, secretFilePath } from '../util/secrets.js';
import { makePrivateDir } from '../util/private-dir.js';
import { isProcessAlive, processStartTime, sleep } from '../util/proc.js';
import { parseJobInfo, parseJobPayload, type JobDisk, type JobInfo, type JobPayload } from './job.js';
import { planBackup, selectDisks, sinceFor, type BeginOptions, type SelectedDisk } from './plan.js';
import { addTargetNodes, addTlsCredentials, applyProgress, exportDisks, queryJobs, startActions, teardown, waitConcluded } from './qemu.js';
import { validateBackupSpec, type BackupSpec } from './spec.js';

export interface BackupBeginOptions extends BeginOptions {
  /** A checkpoint to create in the same instant as the backup. */
  checkpoint?: CheckpointSpec;
  /**
   * Pull mode: this process reads the exports and ends the job itself. If it
   * dies first, the next command on the domain ends the job (nobody else
   * would), and with discardCheckpointOnFailure merges its checkpoint away.
   */
  ownedByCaller?: boolean;
  discardCheckpointOnFailure?: boolean;
  /**
   * With a checkpoint: freeze the guest's filesystems through its agent
   * around the start transaction (required, or optional: crash-consistent
   * without an agent). The job's `consistency` says which it was.
   */
  quiesce?: QuiesceMode | undefined;
  /**
   * Pull mode with a checkpoint, without quiesce: when every disk is
   * incremental and no bitmap of its chain holds a dirty bit, make the
   * checkpoint alone (one transaction, as a checkpoint create) instead of the
   * fleecing job and its exports. The job is then `unchanged` and lasts, like
   * any pull job, until abort. A write that lands before the checkpoint is
   * made is caught (see executeUnchanged), and the full job runs.
   */
  skipUnchanged?: boolean | undefined;
}

export type BackupFaultPoint = 'backup-begin:before-qemu' | 'backup-begin:after-qemu' | 'backup-unchanged:after-qemu';

export interface BackupServiceSettings {
  /** Default certificate directory of pull jobs served over TCP with TLS (libvirt's backup_tls_x509_cert_dir). */
  tlsCertDir?: string | undefined;
  /** Where the passphrases of LUKS targets and scratch images are kept, one file per secret UUID. */
  secretsDir?: string | undefined;
  /** Test-only fault injection (src/util/faults.ts). */
  faults?: Faults | undefined;
}

export class BackupService {
  constructor(
    readonly domains: DomainService,
    readonly checkpoints: CheckpointService,
    private readonly store: JobStore,
    private readonly settings: BackupServiceSettings = {},
  ) {}

  /** The certificate directory a TLS pull job uses unless its options name another. */
  get defaultTlsCertDir(): string | undefined {
    return this.settings.tlsCertDir;
  }

  /** A configuration change is about to happen on the domain: refused while a job runs. */
  assertNoJob(ctx: DomainContext, what: string): void {
    const job = this.store.active(ctx.row.name);
    if (job !== undefined) {
      throw new QbackupError('BACKUP_RUNNING', `Cannot ${what} on domain "${ctx.row.name}": backup job "${job.id}" is running`, { details: { job: job.id } });
    }
  }

  // ---- begin -----------------------------------------------------------------

  /** Starts a backup job; a push job runs on (see wait), a pull job lasts until abort. */
  async begin(domain: string, spec: BackupSpec, options: BackupBeginOptions = {}): Promise<JobInfo> {
    validateBackupSpec(spec);
    const cp = options.checkpoint;
    if (cp !== undefined && (cp.parent !== undefined || cp.creationTime !== undefined || cp.domainXml !== undefined)) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot start a backup of domain "${domain}": the new checkpoint may not set a parent, a creation time or a domain definition (they are for redefine)`);
    }
    if (options.quiesce !== undefined && cp === undefined) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot start a backup of domain "${domain}": quiescing needs a checkpoint created with the backup`);
    }
    const tlsCertDir = this.tlsCertDirFor(domain, spec, options);
    this.checkSecrets(domain, spec);
    return this.domains.withDomain(domain, 'backup-begin', async (ctx) => {
      if (!ctx.running) {
        throw new QbackupError('DOMAIN_NOT_RUNNING', `Cannot back up domain "${domain}": it is not running (backups of shut-off domains are not supported yet)`);
      }
      const active = this.store.active(domain);
      if (active !== undefined) throw new QbackupError('BACKUP_RUNNING', `Cannot start a backup of domain "${domain}": backup job "${active.id}" is running`);
      refuseWhileRestoring(ctx, 'start a backup');
      return this.domains.withQmp(ctx, 'backup-begin', async (qmp) => {
        const { payload, looksUnchanged } = await this.prepare(ctx, qmp, spec, options, tlsCertDir);
        if (looksUnchanged) {
          const done = await this.executeUnchanged(ctx, qmp, payload);
          if (done !== undefined) return done;
        }
        return this.execute(ctx, qmp, payload, options);
      });
    });
  }

  /**
   * A pull job served over TCP with TLS: its certificate directory, checked
   * before anything starts (QEMU would find a missing file only once the job
   * had changed its state). A directory given for a job without TLS is a
   * mistake the user should hear about, not a setting to ignore.
   */
  private tlsCertDirFor(domain: string, spec: BackupSpec, options: BackupBeginOptions): string | undefined {
    const tls = spec.server?.transport === 'tcp' && spec.server.tls;
    if (!tls) {
      if (options.tlsCertDir !== undefined || options.tlsClientIdentity !== undefined) {
        throw new QbackupError('INVALID_ARGUMENT', `Cannot start a backup of domain "${domain}": TLS settings (a certificate directory or a client identity) were given, but the job is not served over TCP with TLS (<server transport='tcp' ... tls='yes'/>)`);
      }
      return undefined;
    }
    const dir = options.tlsCertDir ?? this.settings.tlsCertDir;
    const what = `Cannot serve the backup of domain "${domain}" over TLS`;
    if (options.tlsClientIdentity !== undefined && options.tlsClientIdentity.trim() === '') {
      throw new QbackupError('INVALID_ARGUMENT', `${what}: the accepted client identity is empty`);
    }
    if (dir === undefined) throw new QbackupError('TLS_CREDENTIALS', `${what}: no certificate directory was given`);
    return checkServerCredentials(dir, what);
  }

  /** Every LUKS disk's passphrase file, checked before anything starts. */
  private checkSecrets(domain: string, spec: BackupSpec): void {
    for (const d of spec.disks ?? []) {
      if (d.encryption === undefined) continue;
      const what = `Cannot encrypt the backup of disk "${d.target}" of domain "${domain}"`;
      if (this.settings.secretsDir === undefined) throw new QbackupError('SECRET_NOT_FOUND', `${what}: no secrets directory was given`);
      checkSecretFile(this.settings.secretsDir, d.encryption.secret, what);
    }
  }

  /**
   * Reads what the planner needs, plans the job and the checkpoint; changes
   * nothing. `looksUnchanged`: skipUnchanged applies and, as read now, no
   * disk changed since its checkpoint (a hint, checked again once the
   * checkpoint froze the bitmaps).
   */
  private async prepare(
    ctx: DomainContext,
    qmp: QmpClient,
    spec: BackupSpec,
    options: BackupBeginOptions,
    tlsCertDir: string | undefined,
  ): Promise<{ payload: JobPayload; looksUnchanged: boolean }> {
    const domain = ctx.row.name;
    const jobId = `backup-${randomBytes(4).toString('hex')}`;
    const selected = selectDisks(domain, ctx.disks, spec);
    // QEMU's node graph, read once for coverage, sizes, bitmaps and the checkpoint's plan (nothing here changes it).
    const nodes = await readBlockNodes(qmp);
    const coverage = await this.coverageOf(ctx, qmp, spec, selected, nodes);
    const bitmapNames = new Map(ctx.disks.map((d) => [d.diskId, (nodes.get(nodeNamesFor(d.diskId).format)?.bitmaps ?? []).map((b) => b.name)]));
    const checkpointPlan = options.checkpoint !== undefined ? await this.checkpoints.planCreate(ctx, qmp, options.checkpoint, await this.checkpoints.readBitmaps(ctx, qmp, nodes)) : undefined;
    const info = planBackup({
      domain,
      jobId,
      spec,
      options,
      selected,
      checkpointName: checkpointPlan?.row.name ?? options.checkpoint?.name,
      coverage,
      bitmapNames,
      domainDir: this.domains.domainDir(domain),
      tlsCertDir,
      ...(this.settings.secretsDir !== undefined ? { secretFile: secretFilePathIn(this.settings.secretsDir) } : {}),
      exists: existsSync,
      previousTarget: (checkpoint, diskId) => this.store.targetFor(domain, checkpoint, diskId),
    });
    for (const d of info.disks) d.virtualSize = nodes.get(nodeNamesFor(d.diskId).format)?.virtualSize ?? 0;
    info.startedMs = Date.now();
    if (options.ownedByCaller) info.owner = { pid: process.pid, pidStart: processStartTime(process.pid) ?? '' };
    if (options.discardCheckpointOnFailure) info.discardCheckpointOnFailure = true;
    const looksUnchanged = options.skipUnchanged === true && info.mode === 'pull' && checkpointPlan !== undefined && options.quiesce === undefined && unchangedDisks(info.disks, nodes);
    return { payload: { info, ...(checkpointPlan !== undefined ? { checkpointPlan } : {}) }, looksUnchanged };
  }

  /**
   * A pull job with nothing to read: the checkpoint alone, in one transaction
   * (no scratch image, fleecing or export). That transaction disables every
   * bitmap of the disks' chains, so their counts, read once more after it,
   * are exactly the writes up to the checkpoint's instant: all zero, the
   * backup is empty and the job `unchanged`; else a write landed after the
   * first look, the checkpoint is taken back with its writes merged into the
   * chain (createUndoActions), and undefined is returned for the full job.
   * The record is written first: a command that dies half-way leaves a
   * `starting` job whose checkpoint the next command commits and merges away
   * (reapUnchanged), or that never reached QEMU.
   */
  private async executeUnchanged(ctx: DomainContext, qmp: QmpClient, payload: JobPayload): Promise<JobInfo | undefined> {
    const domain = ctx.row.name;
    const { info, checkpointPlan } = payload;
    assert(checkpointPlan !== undefined, 'an unchanged job makes a checkpoint');
    info.unchanged = true;
    info.consistency = 'crash';
    this.store.transaction(() => this.store.insert({ domain, id: info.id, state: 'starting', payload: JSON.stringify(payload), started_ms: info.startedMs }));
    try {
      await qmp.transaction(toTransaction(this.checkpoints.createActions(checkpointPlan)));
    } catch (err) {
      // Refused: nothing changed. Otherwise it may have: the record stays for the next command.
      if (err instanceof QmpCommandError) await this.finalize(ctx, qmp, payload, 'failed', describeError(err));
      throw err;
    }
    this.fault('backup-unchanged:after-qemu');
    if (unchangedDisks(info.disks, await readBlockNodes(qmp))) {
      this.store.transaction(() => {
        this.checkpoints.commitCreate(checkpointPlan);
        this.store.update(domain, 'running', JSON.stringify(payload));
      });
      return info;
    }
    await qmp.transaction(toTransaction(this.checkpoints.undoCreateActions(checkpointPlan)));
    delete info.unchanged;
    delete info.consistency;
    this.store.transaction(() => this.store.remove(domain));
    return undefined;
  }

  /**
   * Coverage since each incremental disk's checkpoint, by disk id: one
   * coverage question per checkpoint for all its disks, not one per disk,
   * each on the node graph `nodes` read once for the whole begin.
   */
  private async coverageOf(ctx: DomainContext, qmp: QmpClient, spec: BackupSpec, selected: readonly SelectedDisk[], nodes: ReadonlyMap<string, BlockNode>): Promise<Map<string, DiskCoverage>> {
    const bySince = new Map<string, SelectedDisk['disk'][]>();
    for (const { disk, spec: diskSpec } of selected) {
      const since = sinceFor(spec, diskSpec);
      if (since === undefined) continue;
      this.checkpoints.requireCheckpoint(ctx.row.name, since);
      bySince.set(since, [...(bySince.get(since) ?? []), disk]);
    }
    const out = new Map<string, DiskCoverage>();
    for (const [since, disks] of bySince) {
      for (const cov of await this.checkpoints.coverageIn(ctx, qmp, since, disks, nodes)) out.set(cov.diskId, cov);
    }
    return out;
  }

  /**
   * Carries out a planned job: records it, creates and opens the targets, runs
   * the start transaction, commits the checkpoint, and (pull) exports the disks.
   * A failure before QEMU started anything finalizes the job as failed.
   */
  private async execute(ctx: DomainContext, qmp: QmpClient, payload: JobPayload, options: BackupBeginOptions): Promise<JobInfo> {
    const domain = ctx.row.name;
    const { info, checkpointPlan } = payload;
    const pull = info.mode === 'pull';
    this.store.transaction(() => this.store.insert({ domain, id: info.id, state: 'starting', payload: JSON.stringify(payload), started_ms: info.startedMs }));
    const save = (state: 'starting' | 'running'): void => this.store.transaction(() => this.store.update(domain, state, JSON.stringify(payload)));
    await this.failOnError(ctx, qmp, payload, async () => {
      if (info.server !== undefined) await addTlsCredentials(qmp, info.server);
      for (const d of info.disks) {
        if (pull || !options.reuseExternal) {
          makePrivateDir(dirname(d.targetFile));
          const backing = d.backingFile !== undefined ? { backingFile: relativeBacking(d.targetFile, d.backingFile), backingFormat: 'qcow2' } : {};
          const luks = d.encryption !== undefined ? { luksSecretFile: d.encryption.secretFile } : {};
          await createImage(d.targetFile, d.targetFormat, d.virtualSize ?? 0, { ...backing, ...luks });
          d.createdTarget = true;
          save('starting');
        }
        await addTargetNodes(qmp, d);
      }
      this.fault('backup-begin:before-qemu');
    });
    const checkpointActions = checkpointPlan !== undefined ? this.checkpoints.createActions(checkpointPlan) : [];
    const target = { domain, running: ctx.running, agentSocket: this.domains.guestAgentSocket(ctx.definition) };
    let frozen: Frozen | undefined;
    await this.failOnError(ctx, qmp, payload, async () => {
      frozen = await freezeGuest(target, options.quiesce);
    });
    assert(frozen !== undefined, 'freezeGuest returned');
    info.consistency = frozen.consistency;
    try {
      await qmp.transaction(startActions(info, checkpointActions, options.bandwidthBytesPerSec), { completionMode: 'individual' });
    } catch (err) {
      const thawError = await frozen.thaw();
      // Refused by QEMU: nothing started. Otherwise (a timeout, a lost connection)
      // it may have: the job stays recorded as starting for the next command to settle.
      if (err instanceof QmpCommandError) await this.finalize(ctx, qmp, payload, 'failed', describeError(err));
      if (thawError !== undefined) throw new QbackupError('GUEST_AGENT', `${describeError(err)} (and ${describeError(thawError)})`, { cause: err });
      throw err;
    }
    const thawError = await frozen.thaw();
    this.fault('backup-begin:after-qemu');
    // The transaction made the checkpoint's bitmaps: record it before anything else can fail.
    this.store.transaction(() => {
      if (checkpointPlan !== undefined) this.checkpoints.commitCreate(checkpointPlan);
      this.store.update(domain, pull ? 'starting' : 'running', JSON.stringify(payload));
    });
    if (pull && info.server !== undefined) {
      const server = info.server;
      await this.failOnError(ctx, qmp, payload, async () => {
        if (server.transport === 'unix' && server.socketDir !== undefined) makePrivateDir(server.socketDir);
        await exportDisks(qmp, server, info.disks);
      });
      save('running');
    }
    if (thawError !== undefined) {
      throw new QbackupError('GUEST_AGENT', `Backup job "${info.id}" of domain "${domain}" is running, but ${describeError(thawError)}`, { cause: thawError });
    }
    return info;
  }

  /** Runs `fn`; if it throws, the job is finalized as failed and the error rethrown. */
  private async failOnError(ctx: DomainContext, qmp: QmpClient, payload: JobPayload, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      await this.finalize(ctx, qmp, payload, 'failed', describeError(err));
      throw err;
    }
  }

  // ---- observe and control -----------------------------------------------------

  /** The running job with fresh progress, or undefined. */
  async info(domain: string): Promise<JobInfo | undefined> {
    return this.domains.withDomain(domain, 'domjobinfo', async (ctx) => {
      const row = this.store.active(domain);
      if (row === undefined || !ctx.running) return undefined;
      const payload = parseJobPayload(row.payload, domain);
      if (payload.info.unchanged === true) return payload.info;
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
      return r === undefined ? undefined : parseJobInfo(r.payload, domain);
    });
  }

  /**
   * Ends the running job: a pull job completes (its reader is done), a push
   * job is aborted. With `jobId`, only that job: another one is JOB_NOT_FOUND.
   */
  async abort(domain: string, jobId?: string): Promise<JobInfo> {
    return this.domains.withDomain(domain, 'domjobabort', async (ctx) => {
      const row = this.store.active(domain);
      if (row === undefined) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" has no backup job to abort`);
      if (jobId !== undefined && row.id !== jobId) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" runs backup job "${row.id}", not "${jobId}"`);
      const payload = parseJobPayload(row.payload, domain);
      // Nothing of an unchanged job is in QEMU: its end needs no monitor.
      if (payload.info.unchanged === true) return this.finalize(ctx, undefined, payload, 'completed');
      return this.domains.withQmp(ctx, 'domjobabort', async (qmp) => {
        if (payload.info.mode === 'pull') return this.finalize(ctx, qmp, payload, 'completed');
        const errors: string[] = [];
        for (const d of payload.info.disks) {
          await qmp.execute('job-cancel', { id: d.qemuJobId }).catch((err: unknown) => errors.push(`cancel job "${d.qemuJobId}": ${describeError(err)}`));
        }
        await waitConcluded(qmp, payload.info.disks.map((d) => d.qemuJobId), 30_000);
        if (errors.length > 0) payload.info.teardownErrors = errors;
        return this.finalize(ctx, qmp, payload, 'aborted');
      });
    });
  }

  /**
   * Polls (without holding the domain between polls) until the job ends;
   * returns its result. An aborted signal stops the wait, not the job.
   */
  async wait(domain: string, jobId: string, options: OperationOptions & { onInfo?: ((info: JobInfo) => void) | undefined } = {}): Promise<JobInfo> {
    for (;;) {
      throwIfCancelled(options.signal, `Waiting for backup job "${jobId}" of domain "${domain}"`);
      const info = await this.info(domain);
      if (info === undefined || info.id !== jobId) {
        const result = this.store.result(jobId);
        if (result === undefined) throw new QbackupError('JOB_NOT_FOUND', `Backup job "${jobId}" of domain "${domain}" is neither running nor finished`);
        return parseJobInfo(result, domain);
      }
      options.onInfo?.(info);
      options.onProgress?.({ phase: `backup job ${jobId}`, doneBytes: info.bytesDone, totalBytes: info.bytesTotal });
      await sleep(pollDelayMs(info, Date.now()));
    }
  }

  // ---- reaping -----------------------------------------------------------------

  /** Runs at the start of every command on the domain: adopts, finalizes or cleans up a job. */
  async reap(ctx: DomainContext): Promise<void> {
    const row = this.store.active(ctx.row.name);
    if (row === undefined) return;
    const payload = parseJobPayload(row.payload, ctx.row.name);
    if (!ctx.running) {
      if (row.state === 'finishing') await this.finalize(ctx, undefined, payload, payload.info.state, payload.info.error);
      else await this.finalize(ctx, undefined, payload, 'failed', 'QEMU exited while the job ran');
      await this.discardCheckpoint(ctx, undefined, payload.info);
      return;
    }
    await this.domains.withQmp(ctx, 'backup job check', async (qmp) => {
      await this.reapRunning(ctx, qmp, row.state, payload);
      await this.discardCheckpoint(ctx, qmp, payload.info);
    });
  }

  /** A job that ended without completing and asked for it: its checkpoint is merged away. */
  private async discardCheckpoint(ctx: DomainContext, qmp: QmpClient | undefined, info: JobInfo): Promise<void> {
    if (this.store.active(ctx.row.name) !== undefined) return; // still running
    if (!info.discardCheckpointOnFailure || info.checkpoint === undefined || info.state === 'completed') return;
    if (this.checkpoints.exists(ctx.row.name, info.checkpoint)) await this.checkpoints.deleteIn(ctx, qmp, info.checkpoint);
  }

  private async reapRunning(ctx: DomainContext, qmp: QmpClient, state: 'starting' | 'running' | 'finishing', payload: JobPayload): Promise<void> {
    if (payload.info.unchanged === true) return this.reapUnchanged(ctx, qmp, state, payload);
    const owner = payload.info.owner;
    if (state !== 'finishing' && owner !== undefined && !isProcessAlive(owner.pid, owner.pidStart === '' ? undefined : owner.pidStart)) {
      await this.finalize(ctx, qmp, payload, 'failed', `the process that owned the job (pid ${owner.pid}) ended without finishing it`);
      return;
    }
    if (state === 'finishing') {
      // The outcome was decided before qbackup stopped: finish exactly that.
      await this.finalize(ctx, qmp, payload, payload.info.state, payload.info.error);
      return;
    }
    const jobs = await queryJobs(qmp);
    const ours = payload.info.disks.map((d) => jobs.get(d.qemuJobId));
    if (ours.every((j) => j === undefined)) {
      // QEMU never started the jobs (qbackup died before the transaction), or they vanished.
      await this.finalize(ctx, qmp, payload, 'failed', state === 'starting' ? 'qbackup stopped before the job started' : 'QEMU lost the job');
      return;
    }
    if (state === 'starting') {
      // The transaction happened (its jobs exist), so did the checkpoint's bitmaps.
      const plan = payload.checkpointPlan;
      this.store.transaction(() => {
        if (plan !== undefined && !this.checkpoints.exists(ctx.row.name, plan.row.name)) this.checkpoints.commitCreate(plan);
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
  }

  /**
   * An unchanged job (executeUnchanged) holds nothing in QEMU. Starting, its
   * begin died: the checkpoint's transaction happened when its new bitmaps
   * exist, and then it is recorded, for discardCheckpoint to merge it away
   * with every write since. Running, it ends when its owner did.
   */
  private async reapUnchanged(ctx: DomainContext, qmp: QmpClient, state: 'starting' | 'running' | 'finishing', payload: JobPayload): Promise<void> {
    const info = payload.info;
    if (state === 'starting') {
      const plan = payload.checkpointPlan;
      if (plan !== undefined && !this.checkpoints.exists(ctx.row.name, plan.row.name)) {
        const nodes = await readBlockNodes(qmp);
        const made = plan.adds.length > 0 && plan.adds.every((a) => nodes.get(nodeNamesFor(a.diskId).format)?.bitmaps.some((b) => b.name === a.bitmap) === true);
        if (made) this.checkpoints.commitCreate(plan);
      }
      await this.finalize(ctx, qmp, payload, 'failed', 'qbackup stopped while the backup\'s checkpoint was being made');
      return;
    }
    const owner = info.owner;
    if (state === 'finishing' || (owner !== undefined && !isProcessAlive(owner.pid, owner.pidStart === '' ? undefined : owner.pidStart))) {
      await this.finalize(ctx, qmp, payload, state === 'finishing' ? info.state : 'failed', state === 'finishing' ? info.error : `the process that owned the job (pid ${owner?.pid ?? 0}) ended without finishing it`);
    }
  }

  private fault(point: BackupFaultPoint): void {
    (this.settings.faults ?? noFaults).at(point);
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
    const errors = [...(info.teardownErrors ?? [])];
    // An unchanged job made nothing to tear down (no QEMU object, no file).
    if (info.unchanged !== true) {
      // Decide first, then tear down: a crash during teardown must not turn a
      // completed job into a failed one whose targets the next command deletes.
      this.store.transaction(() => this.store.update(domain, 'finishing', JSON.stringify(payload)));
      if (qmp !== undefined) errors.push(...(await teardown(qmp, info)));
      if (info.server?.transport === 'unix' && info.server.socketDir !== undefined) removeFile(info.server.socketDir, errors);
    }
    for (const d of info.disks) {
      if (state === 'completed') d.state = 'completed';
      else if (d.state === 'running' || d.state === 'completed') d.state = state === 'aborted' ? 'cancelled' : 'failed';
      // Push targets of a job that did not complete go; pull scratch images always go.
      if ((state !== 'completed' || info.mode === 'pull') && d.createdTarget) removeFile(d.targetFile, errors);
    }
    if (errors.length > 0) info.teardownErrors = errors;
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

/**
 * Whether every disk is incremental and no bitmap of its chain holds a dirty
 * bit in `nodes` (QEMU's node graph as read). A bitmap that is not there
 * counts as changed.
 */
export function unchangedDisks(disks: readonly JobDisk[], nodes: ReadonlyMap<string, BlockNode>): boolean {
  return disks.every((d) => {
    if (d.mode !== 'incremental' || d.bitmaps === undefined || d.bitmaps.length === 0) return false;
    const onNode = nodes.get(nodeNamesFor(d.diskId).format)?.bitmaps ?? [];
    return d.bitmaps.every((name) => onNode.find((b) => b.name === name)?.count === 0);
  });
}

function secretFilePathIn(dir: string): (uuid: string) => string {
  return (uuid) => secretFilePath(dir, uuid);
}

function removeFile(path: string, errors: string[]): void {
  try {
    rmSync(path, { recursive: true, force: true });
  } catch (err) {
    errors.push(`remove "${path}": ${describeError(err)}`);
  }
}

/** Backing paths are stored relative to the target so the backup files can move together. */
function relativeBacking(targetFile: string, backingFile: string): string {
  const rel = relative(dirname(targetFile), backingFile);
  return rel.startsWith('..') ? backingFile : rel || basename(backingFile);
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

