// The long-running service around one Qbackup: tasks (long operations in the
// background), API tokens, backup schedules and the scheduler that runs
// them, the configuration (named repositories, schedules imported from the
// file, notification targets) and what the metrics report. The HTTP daemon
// (src/http) is an adapter over this; the CLI manages tokens and schedules
// through the same classes.
//
// Invariants:
// - With a configuration that names repositories (or lists allowed ones),
//   every repository the service opens is one of them (REPOSITORY_NOT_ALLOWED
//   otherwise); without one, any location is reached, as before.
// - reload() swaps the configuration between tasks' starts: a running task
//   keeps the access it was started with.
// - Hypervisor connections: a request or schedule names one (a configured
//   name or a URI); without one, the default (the daemon's --connect, else
//   defaults.connection, else qbackup:///). With a configuration that names
//   connections, only those, the default and qbackup:/// are reached
//   (CONNECTION_NOT_ALLOWED otherwise).

import { isAbsolute } from 'node:path';
import { emptyConfig, restrictsRepositories, type QbackupConfig, type ScheduleConfig } from '../config/config.js';
import { Credentials, readSecretFile } from '../config/credentials.js';
import type { DriverDomain } from '../drivers/driver.js';
import { parseConnectionUri } from '../drivers/open.js';
import { QbackupError, describeError, isQbackupError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import type { Manifest, PruneResult, RepoAccess, RepoStats, RetentionPolicy } from '../repository/repository.js';
import { ScheduleStore } from '../store/schedules.js';
import { TaskStore } from '../store/tasks.js';
import { TokenStore } from '../store/tokens.js';
import { silentLogger, type Logger } from '../util/operation.js';
import { Notifier, type NotifierOptions, type Outcome } from './notifications.js';
import { Scheduler, Schedules, systemClock, type Clock, type ScheduleInfo, type ScheduleSpec } from './schedules.js';
import { TaskManager, taskWhat, type TaskContext, type TaskInfo, type TaskManagerOptions } from './tasks.js';

export interface ServiceOptions extends TaskManagerOptions {
  /** The scheduler's clock (tests move it; everything else uses real time). */
  clock?: Clock;
  /** How often the scheduler looks for due schedules (default 30 s); 0: only on tick(). */
  schedulerIntervalMs?: number;
  log?: (message: string) => void;
  /** Structured events (task started and ended, schedule runs, notifications); takes precedence over `log`. */
  logger?: Logger | undefined;
  /** The configuration (default: none, every location reachable, no notifications). */
  config?: QbackupConfig | undefined;
  /** Passphrases and S3 settings of the configured repositories (default: built from `config` alone). */
  credentials?: Credentials | undefined;
  notifier?: NotifierOptions | undefined;
}

/** What the metrics report about one repository, as of the last task that touched it. */
export interface RepositoryFacts {
  /** The configured name, else the location. */
  label: string;
  stats?: RepoStats | undefined;
  statsTimeMs?: number | undefined;
  lastVerify?: { ok: boolean; timeMs: number } | undefined;
}

export const BACKUP_TASK = 'repository.backup';
export const COPY_TASK = 'repository.copy';
/** How old a repository's sizes may grow before a task on it reads them again. */
const STATS_MAX_AGE_MS = 60_000;

export interface CopyRequest {
  from: RepoAccess;
  to: RepoAccess;
  domain?: string;
  backups?: string[];
  dryRun?: boolean;
  requestedBy?: string;
}

/** A hypervisor connection the daemon reaches. */
export interface ConnectionInfo {
  /** Its name under `connections` in the configuration, if it has one. */
  name: string | null;
  uri: string;
  /** The connection of requests and schedules that name none. */
  default: boolean;
}

/** A domain of some connection, as the API lists it. */
export type ConnectionDomain = (DriverDomain | ReturnType<Qbackup['engine']['domains']['list']>[number]) & { connection: string };

/** The URI of qbackup's own QEMU engine (whose domains the engine's services answer for). */
const QEMU_DRIVER_URI = parseConnectionUri(undefined).uri;

export interface BackupRequest extends RepoAccess {
  domain: string;
  /** The connection URI (resolved by connectionUri); default: the daemon's default connection. */
  connection?: string | undefined;
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
  readonly logger: Logger;
  readonly notifier: Notifier;
  /** Per repository location: sizes and the last verify, for the metrics. */
  readonly repositoryFacts = new Map<string, RepositoryFacts>();
  private configuration: QbackupConfig;
  private creds: Credentials;
  private readonly statsReading = new Set<string>();
  /** What each live task works on, for its notification and the metrics. */
  private readonly taskContext = new Map<string, { repo?: string | undefined; schedule?: ScheduleInfo | undefined }>();

  constructor(
    readonly qb: Qbackup,
    private readonly options: ServiceOptions = {},
  ) {
    const legacy = options.log;
    this.logger = options.logger ?? (legacy !== undefined ? { log: (e) => legacy(e.msg) } : silentLogger);
    this.configuration = options.config ?? emptyConfig();
    this.creds = options.credentials ?? new Credentials(this.configuration);
    this.notifier = new Notifier(() => this.configuration.notifications, { ...options.notifier, logger: this.logger });
    this.tasks = new TaskManager(new TaskStore(qb.db), options);
    this.tokens = new TokenStore(qb.db);
    this.schedules = new Schedules(new ScheduleStore(qb.db));
    this.interrupted = this.tasks.recoverInterrupted();
    this.importSchedules();
    const log = (msg: string): void => this.logger.log({ level: 'info', msg });
    this.scheduler = new Scheduler(this.schedules, options.clock ?? systemClock, (s) => this.runSchedule(s), (s) => this.scheduleBusy(s), log);
    this.tasks.subscribe((e) => {
      if (e.type === 'state') this.taskChanged(e.task);
    });
  }

  get config(): QbackupConfig {
    return this.configuration;
  }

  get credentials(): Credentials {
    return this.creds;
  }

  /**
   * Takes a new configuration (SIGHUP): named repositories, notification
   * targets and metrics access change at once; the schedules of the file are
   * re-imported (a changed retention applies from the next run). Running
   * and queued tasks are not touched.
   */
  reload(config: QbackupConfig, credentials: Credentials = new Credentials(config)): { added: string[]; updated: string[]; removed: string[] } {
    const previous = { config: this.configuration, creds: this.creds };
    this.configuration = config;
    this.creds = credentials;
    try {
      return this.importSchedules();
    } catch (err) {
      this.configuration = previous.config;
      this.creds = previous.creds;
      throw err;
    }
  }

  /** The schedules of the configuration file, imported into the schedule table (see Schedules.sync). */
  private importSchedules(): { added: string[]; updated: string[]; removed: string[] } {
    const specs = this.configuration.schedules.map((c) => this.scheduleSpec(c));
    const r = this.schedules.sync(specs);
    if (r.added.length + r.updated.length + r.removed.length > 0) {
      this.logger.log({ level: 'info', msg: 'schedules imported from the configuration', fields: { added: r.added.join(',') || undefined, updated: r.updated.join(',') || undefined, removed: r.removed.join(',') || undefined } });
    }
    return r;
  }

  private scheduleSpec(c: ScheduleConfig): ScheduleSpec & { name: string } {
    const spec: ScheduleSpec & { name: string } = { name: c.name, action: c.run, when: c.when, repo: this.creds.location(c.repository) };
    if (c.domain !== undefined) spec.domain = c.domain;
    if (c.connection !== undefined) spec.connection = this.configuration.connections.get(c.connection) ?? c.connection;
    if (c.to !== undefined) spec.to = this.creds.location(c.to);
    if (c.full !== undefined) spec.full = c.full;
    if (c.retention !== undefined) spec.retention = c.retention;
    if (c.readDataPercent !== undefined) spec.readDataPercent = c.readDataPercent;
    if (c.pingUrl !== undefined) spec.pingUrl = c.pingUrl;
    if (c.notify !== undefined) spec.notify = c.notify;
    return spec;
  }

  /**
   * The repository `repo` names (a configured name or a location) and its
   * passphrase: `password` when the caller gave one (an API header), else the
   * configured one. Refused when the configuration restricts repositories
   * and this is not one of them.
   */
  access(repo: string, password?: string | undefined): RepoAccess {
    this.location(repo);
    return this.creds.access(repo, { value: password === '' ? undefined : password }, {});
  }

  /** The location `repo` names (a configured name or a location), refused like access() when it is not allowed; reads no secret. */
  location(repo: string): string {
    // A relative path would resolve against the daemon's working directory: only a configured name may be relative.
    if (this.creds.named(repo) === undefined && !isAbsolute(repo) && !/^[a-z0-9+.-]+:\/\//i.test(repo)) {
      throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${repo}": the daemon takes a configured repository name, an absolute path or an s3:// location`);
    }
    const location = this.creds.location(repo);
    if (restrictsRepositories(this.configuration) && this.creds.atLocation(location) === undefined && !this.configuration.allowRepositories.includes(location)) {
      const names = [...this.configuration.repositories.keys()];
      throw new QbackupError('REPOSITORY_NOT_ALLOWED', `Repository "${repo}" is not in the configuration${this.configuration.file !== undefined ? ` "${this.configuration.file}"` : ''}: the daemon reaches only ${names.length > 0 ? names.map((n) => `"${n}"`).join(', ') : 'the allowed locations'}`, { details: { repo } });
    }
    return location;
  }

  /** The connection of requests and schedules that name none. */
  defaultConnection(): string {
    if (this.qb.options.connect !== undefined) return this.qb.driver.uri;
    const named = this.configuration.defaults.connection;
    const uri = named !== undefined ? this.configuration.connections.get(named) : undefined;
    return uri !== undefined ? parseConnectionUri(uri).uri : this.qb.driver.uri;
  }

  /** Every connection the daemon reaches by name (the default first, then qbackup's own, then the configured ones). */
  connections(): ConnectionInfo[] {
    const def = this.defaultConnection();
    const out: ConnectionInfo[] = [{ name: null, uri: def, default: true }, { name: null, uri: QEMU_DRIVER_URI, default: false }];
    for (const [name, given] of this.configuration.connections) {
      let uri: string;
      try {
        uri = parseConnectionUri(given).uri;
      } catch {
        continue; // refused when used, in one sentence
      }
      const same = out.find((c) => c.uri === uri);
      if (same === undefined) out.push({ name, uri, default: false });
      else same.name ??= name;
    }
    return out.filter((c, i) => out.findIndex((o) => o.uri === c.uri) === i);
  }

  /**
   * The URI a request's or schedule's `connection` means: undefined or '' the
   * default, a configured name its URI, else the URI itself (checked).
   * Refused when the configuration names connections and this is not one of them.
   */
  connectionUri(connection?: string | undefined): string {
    if (connection === undefined || connection === '') return this.defaultConnection();
    const configured = this.configuration.connections.get(connection);
    if (configured === undefined && !connection.includes('://')) {
      throw new QbackupError('INVALID_ARGUMENT', `Invalid connection "${connection}": give a connection name from the configuration or a URI such as qemu:///system`);
    }
    const uri = parseConnectionUri(configured ?? connection).uri;
    if (this.configuration.connections.size > 0 && !this.connections().some((c) => c.uri === uri)) {
      const names = [...this.configuration.connections.keys()];
      throw new QbackupError('CONNECTION_NOT_ALLOWED', `Connection "${connection}" is not in the configuration${this.configuration.file !== undefined ? ` "${this.configuration.file}"` : ''}: the daemon reaches ${names.map((n) => `"${n}"`).join(', ')}, its default and qbackup:///`, { details: { connection } });
    }
    return uri;
  }

  /** The domains of a connection (running and crashed; `all`: shut-off ones too), each naming its connection. */
  async listDomains(uri: string, options: { all?: boolean | undefined } = {}): Promise<ConnectionDomain[]> {
    if (uri === QEMU_DRIVER_URI) return this.qb.engine.domains.list({ all: options.all === true }).map((d) => ({ ...d, connection: uri }));
    const list = await this.qb.connection(uri).driver.listDomains();
    return list.filter((d) => options.all === true || d.state !== 'shut off').map((d) => ({ ...d, connection: uri }));
  }

  /** Refuses a domain the connection does not know (DOMAIN_NOT_FOUND, naming it). */
  async requireDomain(uri: string, domain: string): Promise<void> {
    if (uri === QEMU_DRIVER_URI) this.qb.engine.domains.requireDomain(domain);
    else await this.qb.connection(uri).driver.describeDomain(domain);
  }

  /** The name metrics and notifications give a location: the configured one, else the location itself. */
  repositoryLabel(location: string): string {
    return this.creds.atLocation(location)?.name ?? location;
  }

  private taskChanged(task: TaskInfo): void {
    const fields = { task: task.id, kind: task.kind, domain: task.domain ?? undefined, connection: task.connection ?? undefined, requestedBy: task.requestedBy ?? undefined };
    if (task.state === 'queued' || task.state === 'running') {
      this.logger.log({ level: 'info', msg: `task ${task.state}`, fields });
      return;
    }
    this.logger.log({ level: task.state === 'failed' ? 'error' : 'info', msg: `task ${task.state}`, fields: { ...fields, code: task.error?.code, error: task.error?.message } });
    const context = this.taskContext.get(task.id);
    this.taskContext.delete(task.id);
    if (context?.repo !== undefined) this.recordRepositoryFacts(task, context.repo);
    if (task.state === 'cancelled') return;
    const ok = task.state === 'succeeded';
    this.outcome(ok ? 'success' : 'failure', task.kind, task.domain, context?.schedule, context?.repo, task.id, ok ? `Task "${task.id}" (${taskWhat(task)}) succeeded` : (task.error?.message ?? `Task "${task.id}" failed`));
  }

  private outcome(event: 'success' | 'failure', kind: string, domain: string | null, schedule: ScheduleInfo | undefined, repo: string | undefined, taskId: string | null, message: string): void {
    const o: Outcome = { event, taskId, kind, domain, schedule: schedule !== undefined ? (schedule.name ?? schedule.id) : null, repository: repo !== undefined ? this.repositoryLabel(repo) : null, message, timeMs: Date.now() };
    void this.notifier.notify(o, schedule?.notify);
    if (schedule?.pingUrl !== undefined) void this.notifier.ping(schedule.pingUrl, event === 'success', o.schedule ?? '');
  }

  /** After a task on a repository: its last verify, and fresh sizes for the metrics (best effort). */
  private recordRepositoryFacts(task: TaskInfo, location: string): void {
    const facts = this.repositoryFacts.get(location) ?? { label: this.repositoryLabel(location) };
    this.repositoryFacts.set(location, facts);
    if (task.kind === 'repository.verify' && (task.state === 'succeeded' || task.state === 'failed')) facts.lastVerify = { ok: task.state === 'succeeded', timeMs: task.endedMs ?? Date.now() };
    // Reading the sizes reads every index: at most once a minute per repository (a gc's change is always read).
    if (facts.statsTimeMs === undefined || Date.now() - facts.statsTimeMs > STATS_MAX_AGE_MS || task.kind === 'repository.gc') void this.refreshStats(location);
  }

  /** Reads a repository's sizes for the metrics; a repository that cannot be read now keeps its last figures. */
  async refreshStats(location: string): Promise<void> {
    const facts = this.repositoryFacts.get(location) ?? { label: this.repositoryLabel(location) };
    this.repositoryFacts.set(location, facts);
    if (this.statsReading.has(location)) return;
    this.statsReading.add(location);
    try {
      facts.stats = await this.qb.repository.stats(this.creds.access(location, {}, {}));
      facts.statsTimeMs = Date.now();
    } catch (err) {
      this.logger.log({ level: 'debug', msg: 'repository sizes not read', fields: { repository: facts.label, error: describeError(err) } });
    } finally {
      this.statsReading.delete(location);
    }
  }

  /**
   * Lets the library settle what interrupted tasks left behind (a backup job
   * owned by the dead process is ended and its checkpoint merged away, as
   * the next CLI command would), then starts the scheduler.
   */
  async start(): Promise<void> {
    // A task ran on its connection; one recorded before tasks named theirs is settled by each connection that knows its domain.
    const settle = new Map<string, { domain: string; uri: string }>();
    for (const t of this.interrupted) {
      if (t.domain === null) continue;
      const uris = t.connection !== null ? [t.connection] : this.connections().map((c) => c.uri);
      for (const uri of uris) settle.set(`${uri}\0${t.domain}`, { domain: t.domain, uri });
    }
    for (const { domain: d, uri } of settle.values()) {
      try {
        await this.qb.connection(uri).driver.endOrphanedBackup(d);
      } catch (err) {
        if (isQbackupError(err, 'DOMAIN_NOT_FOUND')) continue;
        this.options.log?.(`cleanup of domain "${d}" (${uri}) after an interrupted task failed: ${describeError(err)}`);
      }
    }
    await this.settleInstantRestores();
    for (const r of this.configuration.repositories.values()) void this.refreshStats(r.location);
    const interval = this.options.schedulerIntervalMs ?? 30_000;
    if (interval > 0) this.scheduler.start(interval);
  }

  /**
   * Instant restores, on each connection (a restore's record names its
   * connection): those whose beginning process died before their domain
   * existed lose their servers; those that ran on while no command came are
   * settled (finished copies finalized, dead servers or copies brought back).
   */
  private async settleInstantRestores(): Promise<void> {
    for (const c of this.connections()) {
      let instant;
      try {
        instant = this.qb.connection(c.uri).instant;
        const reaped = await instant.reapOrphans();
        for (const d of reaped) this.logger.log({ level: 'warn', msg: 'stopped the backup server of an instant restore that never started', fields: { domain: d, connection: c.uri } });
      } catch (err) {
        this.logger.log({ level: 'warn', msg: 'looking for orphaned instant restores failed', fields: { connection: c.uri, error: describeError(err) } });
        continue;
      }
      try {
        for (const [d, err] of await instant.settleAll()) this.logger.log({ level: 'warn', msg: 'settling an instant restore failed', fields: { domain: d, connection: c.uri, error: describeError(err) } });
      } catch (err) {
        this.logger.log({ level: 'warn', msg: 'settling instant restores failed', fields: { connection: c.uri, error: describeError(err) } });
      }
    }
  }

  /** Stops the scheduler and the tasks (`interrupt`: running ones that can stop mid-way are stopped, see TaskManager.close). */
  async close(options: { interrupt?: boolean | undefined } = {}): Promise<void> {
    this.scheduler.stop();
    await this.tasks.close(options);
    await this.notifier.idle();
  }

  /** Is a backup of the domain (of that connection, default any) queued or running? */
  backupUnderWay(domain: string, connection?: string | undefined): boolean {
    return this.tasks.active({ kind: BACKUP_TASK, domain, connection }).length > 0;
  }

  /** Queues a repository backup (then retention, if asked); refused while one of the domain is under way. */
  backup(request: BackupRequest): TaskInfo {
    const uri = request.connection ?? this.defaultConnection();
    // qbackup's own domains are checked here; a libvirt domain by the route (an RPC) or when the task starts.
    if (uri === QEMU_DRIVER_URI) this.qb.engine.domains.requireDomain(request.domain);
    // One backup per domain of a connection: a domain of the same name on another connection is another domain.
    const running = this.tasks.active({ kind: BACKUP_TASK, domain: request.domain, connection: uri })[0];
    if (running !== undefined) {
      throw new QbackupError('BACKUP_RUNNING', `Cannot back up domain "${request.domain}" (${uri}): task "${running.id}" is already backing it up`);
    }
    const task = this.tasks.submit({
      kind: BACKUP_TASK,
      domain: request.domain,
      connection: uri,
      ...(request.requestedBy !== undefined ? { requestedBy: request.requestedBy } : {}),
      cancellable: true,
      run: (ctx) => this.runBackup(ctx, { ...request, connection: uri }),
    });
    this.taskContext.set(task.id, { repo: request.repo });
    return task;
  }

  private async runBackup(ctx: TaskContext, r: BackupRequest): Promise<{ manifest: Manifest; prune?: PruneResult }> {
    const access: RepoAccess = { repo: r.repo, ...(r.password !== undefined ? { password: r.password } : {}) };
    const connection = this.qb.connection(r.connection);
    ctx.log(`backing up domain "${r.domain}" (${connection.uri}) into ${r.repo}${r.full === true ? ' (full)' : ''}`);
    const manifest = await connection.repository.backup(r.domain, {
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
      prune = await this.qb.repository.prune(r.domain, { ...access, ...r.retention, signal: ctx.signal });
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
    return this.track(request.to.repo, this.tasks.submit({
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
    }));
  }

  /** Remembers the repository a task works on (for its notification and the metrics). */
  private track(repo: string, task: TaskInfo): TaskInfo {
    this.taskContext.set(task.id, { ...this.taskContext.get(task.id), repo });
    return task;
  }

  private scheduleBusy(s: ScheduleInfo): boolean {
    if (s.action === 'copy') return this.tasks.active({ kind: COPY_TASK }).length > 0;
    if (s.action === 'verify' || s.action === 'gc') return this.tasks.active({ kind: `repository.${s.action}` }).length > 0;
    if (s.domain === undefined) return false;
    let uri: string | undefined;
    try {
      uri = this.connectionUri(s.connection);
    } catch {
      uri = undefined; // refused when it starts, in one sentence; busy while its domain backs up on any connection
    }
    return this.backupUnderWay(s.domain, uri);
  }

  /** Starts a due schedule's task; a schedule that cannot start is a failure too (notified, pinged), then reported to the scheduler. */
  private runSchedule(s: ScheduleInfo): void {
    let task: TaskInfo;
    try {
      task = this.startSchedule(s);
    } catch (err) {
      this.outcome('failure', s.action === 'backup' || s.action === undefined ? BACKUP_TASK : `repository.${s.action}`, s.domain ?? null, s, s.repo, null, `Schedule "${s.name ?? s.id}" could not start: ${describeError(err)}`);
      throw err;
    }
    this.taskContext.set(task.id, { ...this.taskContext.get(task.id), repo: s.repo, schedule: s });
  }

  /** Starts a schedule's task now, outside its times (its next run stays where it was). */
  runScheduleNow(id: string, requestedBy?: string | undefined): TaskInfo {
    const s = this.schedules.get(id);
    const task = this.startSchedule(s, requestedBy);
    this.taskContext.set(task.id, { ...this.taskContext.get(task.id), repo: s.repo, schedule: s });
    return task;
  }

  private startSchedule(s: ScheduleInfo, by?: string | undefined): TaskInfo {
    const password = s.passwordFile !== undefined ? readSecretFile(s.passwordFile, 'passphrase file') : undefined;
    const access: RepoAccess = this.access(s.repo, password);
    const requestedBy = `schedule ${s.name ?? s.id}${by !== undefined ? ` (run now by ${by})` : ''}`;
    if (s.action === 'verify') {
      return this.verify({ ...access, ...(s.domain !== undefined ? { domain: s.domain } : {}), ...(s.readDataPercent !== undefined ? { readDataPercent: s.readDataPercent } : {}), requestedBy });
    }
    if (s.action === 'copy') {
      const toPassword = s.toPasswordFile !== undefined ? readSecretFile(s.toPasswordFile, 'passphrase file') : undefined;
      const to: RepoAccess = this.access(s.to ?? '', toPassword);
      return this.copy({ from: access, to, ...(s.domain !== undefined ? { domain: s.domain } : {}), requestedBy });
    }
    if (s.action === 'gc') {
      return this.track(access.repo, this.tasks.submit({ kind: 'repository.gc', requestedBy, cancellable: true, run: (ctx) => this.qb.repository.gc(access, { onProgress: (p) => ctx.progress(p), signal: ctx.signal }) }));
    }
    if (s.domain === undefined) throw new QbackupError('METADATA_INCONSISTENT', `Backup schedule "${s.id}" names no domain`);
    return this.backup({ domain: s.domain, connection: this.connectionUri(s.connection), ...access, ...(s.full !== undefined ? { full: s.full } : {}), ...(s.retention !== undefined ? { retention: s.retention } : {}), requestedBy });
  }

  /** Queues a verify of the repository (or of one domain's backups); the task fails when it finds damage, naming it. */
  verify(request: RepoAccess & { domain?: string; backup?: string; readData?: boolean; readDataPercent?: number; requestedBy?: string }): TaskInfo {
    const { domain, backup, readDataPercent, requestedBy, ...rest } = request;
    const access: RepoAccess = { repo: rest.repo, ...(rest.password !== undefined ? { password: rest.password } : {}) };
    return this.track(access.repo, this.tasks.submit({
      kind: 'repository.verify',
      ...(requestedBy !== undefined ? { requestedBy } : {}),
      cancellable: true,
      run: async (ctx) => {
        const report = await this.qb.repository.verify(access, {
          ...(domain !== undefined ? { domain } : {}),
          ...(backup !== undefined ? { backup } : {}),
          readData: request.readData === true || readDataPercent !== undefined,
          ...(readDataPercent !== undefined ? { readDataPercent } : {}),
          onProgress: (p) => ctx.progress(p),
          signal: ctx.signal,
        });
        for (const p of report.problems) ctx.log(`DAMAGED ${p.object}: ${p.problem}; used by ${p.backups.join(', ')}`);
        const first = report.problems[0];
        if (first !== undefined) throw new QbackupError('VERIFY_FAILED', `Verification found ${report.problems.length} problem(s); first: ${first.object} (used by ${first.backups.join(', ')}): ${first.problem}`);
        ctx.log(`verified ${report.backupsChecked} backups: ${report.chunksChecked} chunks present${report.chunksRead > 0 ? `, ${report.chunksRead} read back intact` : ''}`);
        return report;
      },
    }));
  }
}
