// The long-running service around one Qbackup: tasks (long operations in the
// background), API tokens, backup schedules and the scheduler that runs
// them. The HTTP daemon (src/http) is an adapter over this; the CLI manages
// tokens and schedules through the same classes.

import { readFileSync } from 'node:fs';
import { QbackupError, describeError, isQbackupError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import type { Manifest, PruneResult, RepoAccess, RetentionPolicy } from '../repository/repository.js';
import { ScheduleStore } from '../store/schedules.js';
import { TaskStore } from '../store/tasks.js';
import { TokenStore } from '../store/tokens.js';
import { Scheduler, Schedules, systemClock, type Clock, type ScheduleInfo } from './schedules.js';
import { TaskManager, type TaskContext, type TaskInfo, type TaskManagerOptions } from './tasks.js';

export interface ServiceOptions extends TaskManagerOptions {
  /** The scheduler's clock (tests move it; everything else uses real time). */
  clock?: Clock;
  /** How often the scheduler looks for due schedules (default 30 s); 0: only on tick(). */
  schedulerIntervalMs?: number;
  log?: (message: string) => void;
}

export const BACKUP_TASK = 'repository.backup';
export const COPY_TASK = 'repository.copy';

export interface CopyRequest {
  from: RepoAccess;
  to: RepoAccess;
  domain?: string;
  backups?: string[];
  dryRun?: boolean;
  requestedBy?: string;
}

export interface BackupRequest extends RepoAccess {
  domain: string;
  full?: boolean;
  disks?: string[];
  /** Prune with this policy after the backup. */
  retention?: RetentionPolicy;
  requestedBy?: string;
}

export class QbackupService {
  readonly tasks: TaskManager;
  readonly tokens: TokenStore;
  readonly schedules: Schedules;
  readonly scheduler: Scheduler;
  /** Tasks a previous process left unfinished, marked failed at open. */
  readonly interrupted: TaskInfo[];

  constructor(
    readonly qb: Qbackup,
    private readonly options: ServiceOptions = {},
  ) {
    this.tasks = new TaskManager(new TaskStore(qb.db), options);
    this.tokens = new TokenStore(qb.db);
    this.schedules = new Schedules(new ScheduleStore(qb.db));
    this.interrupted = this.tasks.recoverInterrupted();
    const log = options.log ?? (() => undefined);
    this.scheduler = new Scheduler(this.schedules, options.clock ?? systemClock, (s) => this.runSchedule(s), (s) => this.scheduleBusy(s), log);
  }

  /**
   * Lets the library settle what interrupted tasks left behind (a backup job
   * owned by the dead process is ended and its checkpoint merged away, as
   * the next CLI command would), then starts the scheduler.
   */
  async start(): Promise<void> {
    const domains = new Set(this.interrupted.map((t) => t.domain).filter((d): d is string => d !== null));
    for (const d of domains) {
      try {
        await this.qb.driver.endOrphanedBackup(d);
      } catch (err) {
        this.options.log?.(`cleanup of domain "${d}" after an interrupted task failed: ${describeError(err)}`);
      }
    }
    // Instant restores whose beginning process died before their domain existed: their servers go.
    try {
      const reaped = await this.qb.instant.reapOrphans();
      for (const d of reaped) this.options.log?.(`stopped the backup server of an instant restore of "${d}" that never started`);
    } catch (err) {
      this.options.log?.(`looking for orphaned instant restores failed: ${describeError(err)}`);
    }
    const interval = this.options.schedulerIntervalMs ?? 30_000;
    if (interval > 0) this.scheduler.start(interval);
  }

  async close(): Promise<void> {
    this.scheduler.stop();
    await this.tasks.close();
  }

  backupUnderWay(domain: string): boolean {
    return this.tasks.active({ kind: BACKUP_TASK, domain }).length > 0;
  }

  /** Queues a repository backup (then retention, if asked); refused while one of the domain is under way. */
  backup(request: BackupRequest): TaskInfo {
    this.qb.domains.requireDomain(request.domain);
    const running = this.tasks.active({ kind: BACKUP_TASK, domain: request.domain })[0];
    if (running !== undefined) {
      throw new QbackupError('BACKUP_RUNNING', `Cannot back up domain "${request.domain}": task "${running.id}" is already backing it up`);
    }
    return this.tasks.submit({
      kind: BACKUP_TASK,
      domain: request.domain,
      ...(request.requestedBy !== undefined ? { requestedBy: request.requestedBy } : {}),
      cancellable: true,
      run: (ctx) => this.runBackup(ctx, request),
    });
  }

  private async runBackup(ctx: TaskContext, r: BackupRequest): Promise<{ manifest: Manifest; prune?: PruneResult }> {
    const access: RepoAccess = { repo: r.repo, ...(r.password !== undefined ? { password: r.password } : {}) };
    ctx.log(`backing up domain "${r.domain}" into ${r.repo}${r.full === true ? ' (full)' : ''}`);
    const manifest = await this.qb.repository.backup(r.domain, {
      ...access,
      ...(r.full !== undefined ? { full: r.full } : {}),
      ...(r.disks !== undefined ? { disks: r.disks } : {}),
      onProgress: (p) => ctx.progress(p),
      signal: ctx.signal,
    });
    for (const d of manifest.disks) ctx.log(`${d.target}: ${d.level}, ${d.bytesRead} bytes read, ${d.bytesStored} stored${d.fullReason !== null ? ` (full: ${d.fullReason})` : ''}`);
    ctx.log(`backup ${manifest.id} written`);
    if (r.retention === undefined || Object.keys(r.retention).length === 0) return { manifest };
    let prune: PruneResult;
    try {
      prune = await this.qb.repository.prune(r.domain, { ...access, ...r.retention });
    } catch (err) {
      // A gc holds the repository (prune and gc exclude each other): the backup stands, the next one's prune applies the policy.
      if (!isQbackupError(err, 'REPO_LOCKED')) throw err;
      ctx.log(`retention not applied this time: ${describeError(err)}`);
      return { manifest };
    }
    ctx.log(`retention: kept ${prune.keep.length}, removed ${prune.remove.length}${prune.remove.length > 0 ? ` (${prune.remove.map((x) => x.id).join(', ')})` : ''}`);
    return { manifest, prune };
  }

  /** Queues a copy of backups into another repository; the task's result is the copy's report. */
  copy(request: CopyRequest): TaskInfo {
    const { requestedBy, ...options } = request;
    return this.tasks.submit({
      kind: COPY_TASK,
      // One task per domain at a time: the copy holds the target's backup lock of the domain.
      ...(request.domain !== undefined ? { domain: request.domain } : {}),
      ...(requestedBy !== undefined ? { requestedBy } : {}),
      cancellable: true,
      run: async (ctx) => {
        ctx.log(`copying ${request.domain !== undefined ? `the backups of domain "${request.domain}"` : 'backups'} from ${request.from.repo} to ${request.to.repo}`);
        const r = await this.qb.repository.copy({ ...options, onProgress: (p) => ctx.progress(p), signal: ctx.signal });
        for (const b of r.copied) ctx.log(`${r.dryRun ? 'would copy' : 'copied'} ${b.domain}/${b.id}`);
        ctx.log(`${r.copied.length} copied, ${r.skipped.length} already there; ${r.chunksRead} chunks read and checked, ${r.chunksStored} stored (${r.bytesStored} bytes)`);
        return r;
      },
    });
  }

  private scheduleBusy(s: ScheduleInfo): boolean {
    if (s.action === 'copy') return this.tasks.active({ kind: COPY_TASK }).length > 0;
    if (s.action === 'verify' || s.action === 'gc') return this.tasks.active({ kind: `repository.${s.action}` }).length > 0;
    return s.domain !== undefined && this.backupUnderWay(s.domain);
  }

  private runSchedule(s: ScheduleInfo): void {
    const password = s.passwordFile !== undefined ? readPasswordFile(s.passwordFile) : undefined;
    const access: RepoAccess = { repo: s.repo, ...(password !== undefined ? { password } : {}) };
    const requestedBy = `schedule ${s.id}`;
    if (s.action === 'verify') {
      this.verify({ ...access, ...(s.domain !== undefined ? { domain: s.domain } : {}), ...(s.readDataPercent !== undefined ? { readDataPercent: s.readDataPercent } : {}), requestedBy });
      return;
    }
    if (s.action === 'copy') {
      const toPassword = s.toPasswordFile !== undefined ? readPasswordFile(s.toPasswordFile) : undefined;
      const to: RepoAccess = { repo: s.to ?? '', ...(toPassword !== undefined ? { password: toPassword } : {}) };
      this.copy({ from: access, to, ...(s.domain !== undefined ? { domain: s.domain } : {}), requestedBy });
      return;
    }
    if (s.action === 'gc') {
      this.tasks.submit({ kind: 'repository.gc', requestedBy, run: () => this.qb.repository.gc(access) });
      return;
    }
    if (s.domain === undefined) throw new QbackupError('METADATA_INCONSISTENT', `Backup schedule "${s.id}" names no domain`);
    this.backup({ domain: s.domain, ...access, ...(s.full !== undefined ? { full: s.full } : {}), ...(s.retention !== undefined ? { retention: s.retention } : {}), requestedBy });
  }

  /** Queues a verify of the repository (or of one domain's backups); the task fails when it finds damage, naming it. */
  verify(request: RepoAccess & { domain?: string; backup?: string; readData?: boolean; readDataPercent?: number; requestedBy?: string }): TaskInfo {
    const { domain, backup, readDataPercent, requestedBy, ...rest } = request;
    const access: RepoAccess = { repo: rest.repo, ...(rest.password !== undefined ? { password: rest.password } : {}) };
    return this.tasks.submit({
      kind: 'repository.verify',
      ...(requestedBy !== undefined ? { requestedBy } : {}),
      cancellable: true,
      run: async (ctx) => {
        const report = await this.qb.repository.verify(access, {
          ...(domain !== undefined ? { domain } : {}),
          ...(backup !== undefined ? { backup } : {}),
          readData: request.readData === true || readDataPercent !== undefined,
          ...(readDataPercent !== undefined ? { readDataPercent } : {}),
          onProgress: (done, total) => ctx.progress({ phase: 'verify', doneBytes: done, totalBytes: total }),
          signal: ctx.signal,
        });
        for (const p of report.problems) ctx.log(`DAMAGED ${p.object}: ${p.problem}; used by ${p.backups.join(', ')}`);
        const first = report.problems[0];
        if (first !== undefined) throw new QbackupError('VERIFY_FAILED', `Verification found ${report.problems.length} problem(s); first: ${first.object} (used by ${first.backups.join(', ')}): ${first.problem}`);
        ctx.log(`verified ${report.backupsChecked} backups: ${report.chunksChecked} chunks present${report.chunksRead > 0 ? `, ${report.chunksRead} read back intact` : ''}`);
        return report;
      },
    });
  }
}

function readPasswordFile(file: string): string {
  try {
    return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot read the passphrase file "${file}": ${describeError(err)}`);
  }
}
