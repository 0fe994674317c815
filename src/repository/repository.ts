// The repository as the library offers it: create (init), back up a domain,
// list, restore (to files or into a shut-off domain's disks), export, serve
// over NBD, verify, prune, gc, stats and keys, on a format 2 store
// (docs/design.md, "Repository"). Each call opens the repository at `repo` (a
// local directory or s3://BUCKET/PREFIX), with its passphrase when it is encrypted.

import { resolve } from 'node:path';
import type { HypervisorDriver } from '../drivers/driver.js';
import { definitionForRestore } from './define-xml.js';
import { QbackupError, describeError, isQbackupError } from '../errors.js';
import type { Backend } from './backend/backend.js';
import { FaultingBackend } from './backend/faulting.js';
import { isRemoteRepo, openBackend, type BackendSettings } from './backend/open.js';
import { backupDomain, type Progress, type RepoBackupOptions } from './backup.js';
import { copyBackups, type CopyOptions, type CopyReport } from './copy.js';
import { collectGarbage, type GcReport } from './gc.js';
import type { Manifest } from './manifest.js';
import { pruneStore, type PrunePlan, type RetentionPolicy } from './prune.js';
import { restoreIntoImage, restoreToFile, type ImageFormat } from './restore.js';
import { serveBackup, type BackupServer, type ServeListen } from './serve.js';
import { repositoryStats, type RepoStats } from './stats.js';
import { Store, type DamagedManifest } from './store.js';
import { executeRepair, planRepair, type RepairPlan, type RepairReport } from './repair.js';
import { verifyStore, type VerifyOptions, type VerifyReport } from './verify.js';
import type { Logger, OperationOptions, ProgressSink } from '../util/operation.js';
import { noFaults, type Faults } from '../util/faults.js';

export type { Progress, RepoBackupOptions } from './backup.js';
export type { CopyReport, CopySelection } from './copy.js';
export type { GcReport } from './gc.js';
export type { Manifest, ManifestDisk } from './manifest.js';
export type { FoldStep } from './fold.js';
export type { PrunePlan, RetentionPolicy } from './prune.js';
export type { RepoStats } from './stats.js';
export type { DamagedManifest } from './store.js';
export type { RepairPlan, RepairReport } from './repair.js';
export type { BackupServer, ServeListen, ServedExport } from './serve.js';
export type { VerifyProblem, VerifyReport } from './verify.js';

/** Where a repository is and how to open it. */
export interface RepoAccess {
  /** A local directory, or s3://BUCKET/PREFIX. */
  repo: string;
  /** The passphrase of an encrypted repository. */
  password?: string;
}

export interface RestoreOptions extends RepoAccess {
  backup?: string;
  /** The latest backup taken at or before this time. */
  until?: Date;
  disks?: string[];
  /** A directory for new images named <target>.<format> … */
  to?: string;
  format?: ImageFormat;
  /** … or write straight into the disks of this shut-off domain. */
  intoDomain?: string;
  /** With `to`: define a new domain of this name from the backup's saved definition, on the restored images (define-xml.ts). */
  define?: string | undefined;
  onProgress?: ProgressSink | undefined;
  /** Checked between runs of chunks: a cancelled restore removes the image it was writing. */
  signal?: AbortSignal | undefined;
  logger?: Logger | undefined;
}

export interface PruneResult extends PrunePlan {
  checkpointsRemoved: string[];
  /** Checkpoints of removed backups that could not go now (a later prune retries), and why. */
  checkpointsKept: Array<{ name: string; reason: string }>;
}

export interface RestoredDisk {
  target: string;
  file: string;
}

export class RepositoryService {
  /** How to reach object storage (the adapters read the environment, not the library). */
  readonly backendSettings: BackendSettings;
  /** Where `serveBackup` makes the private directory of its default unix socket. */
  private readonly runDir: string;

  constructor(
    readonly driver: HypervisorDriver,
    options: { backends?: BackendSettings | undefined; runDir: string; faults?: Faults | undefined },
  ) {
    this.backendSettings = options.backends ?? {};
    this.runDir = options.runDir;
    this.faults = options.faults;
  }

  /**
   * Test-only fault injection (src/util/faults.ts): every backend is wrapped
   * so writes visit "repo-write"; a backup visits 'backup-copying' once it has
   * read its first data.
   */
  private readonly faults: Faults | undefined;

  private readonly remote = new Map<string, Promise<Backend>>();

  /** Creates a repository (encrypted when a passphrase is given). */
  async init(access: RepoAccess & { chunkSize?: number }): Promise<{ id: string; encrypted: boolean; chunkSize: number }> {
    const backend = await this.backendFor(access.repo);
    // A bucket is created by init only: a mistyped name on any other command is an error, not a new bucket.
    await backend.createContainer?.();
    const store = await Store.init(backend, { ...(access.password !== undefined ? { password: access.password } : {}), ...(access.chunkSize !== undefined ? { chunkSize: access.chunkSize } : {}) });
    return { id: store.config.id, encrypted: store.config.encrypted, chunkSize: store.config.chunkSize };
  }

  /** Backs up a domain; an unencrypted repository is created on first use. */
  async backup(domain: string, options: RepoAccess & RepoBackupOptions): Promise<Manifest> {
    await this.driver.describeDomain(domain);
    const store = await this.open(options, true);
    return backupDomain(this.driver, store, domain, options, this.faults ?? noFaults);
  }

  /** The readable backups (of a domain), oldest first; a damaged manifest is left out (see inventory). */
  async list(access: RepoAccess, domain?: string): Promise<Manifest[]> {
    return (await this.inventory(access, domain)).backups;
  }

  /** The readable backups and, by name, every manifest that cannot be read. */
  async inventory(access: RepoAccess, domain?: string): Promise<{ backups: Manifest[]; damaged: DamagedManifest[] }> {
    const { manifests, damaged } = await (await this.open(access)).readableManifests(domain);
    return { backups: manifests, damaged };
  }

  async restore(domain: string, options: RestoreOptions): Promise<{ backup: string; disks: RestoredDisk[] }> {
    const store = await this.open(options);
    const m = pickBackup((await store.readableManifests(domain)).manifests, domain, options);
    const disks = m.disks.filter((d) => options.disks === undefined || options.disks.length === 0 || options.disks.includes(d.target));
    for (const t of options.disks ?? []) {
      if (!m.disks.some((d) => d.target === t)) throw new QbackupError('DISK_NOT_FOUND', `Backup "${m.id}" of domain "${domain}" has no disk "${t}"`);
    }
    if (options.intoDomain !== undefined && options.to !== undefined) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot restore backup "${m.id}": give either a directory (to) or a domain (intoDomain), not both`);
    }
    await store.loadChunks();
    if (options.intoDomain !== undefined) return { backup: m.id, disks: await this.restoreIntoDomain(store, m, disks, options.intoDomain, options) };
    if (options.to === undefined) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore backup "${m.id}": give a directory (--to) or a domain (--into-domain)`);
    const format = options.format ?? 'qcow2';
    const out: RestoredDisk[] = [];
    for (const d of disks) {
      const file = resolve(options.to, `${d.target}.${format}`);
      const what = `disk "${d.target}" of backup "${m.id}"`;
      await restoreToFile(store, await store.resolveIndex(d.index), file, format, { what, signal: options.signal, onProgress: (done, total) => options.onProgress?.({ phase: `restore ${d.target}`, doneBytes: done, totalBytes: total }) });
      options.logger?.log({ level: 'info', msg: 'disk restored', fields: { domain, backup: m.id, disk: d.target, file } });
      out.push({ target: d.target, file });
    }
    if (options.define !== undefined) {
      await this.driver.defineDomain(definitionForRestore(m.domainXml, options.define, out.map((d) => ({ ...d, format }))));
    }
    return { backup: m.id, disks: out };
  }

  /**
   * The backup `options` name (by id, or the newest at or before `until`, or
   * the newest) of `domain`, with its store opened: for instant restore
   * (src/instant/), which serves it.
   */
  async findBackup(domain: string, options: RepoAccess & { backup?: string | undefined; until?: Date | undefined }): Promise<{ store: Store; manifest: Manifest }> {
    const store = await this.open(options);
    return { store, manifest: pickBackup((await store.readableManifests(domain)).manifests, domain, options) };
  }

  /** One disk of a backup as a standalone image file, for other tools. */
  async exportDisk(domain: string, options: RepoAccess & OperationOptions & { backup?: string; until?: Date; disk: string; file: string; format?: ImageFormat }): Promise<{ backup: string; file: string }> {
    const store = await this.open(options);
    const m = pickBackup((await store.readableManifests(domain)).manifests, domain, options);
    const d = m.disks.find((x) => x.target === options.disk);
    if (d === undefined) throw new QbackupError('DISK_NOT_FOUND', `Backup "${m.id}" of domain "${domain}" has no disk "${options.disk}"`);
    await store.loadChunks();
    const file = resolve(options.file);
    const what = `disk "${d.target}" of backup "${m.id}"`;
    await restoreToFile(store, await store.resolveIndex(d.index), file, options.format ?? 'qcow2', { what, signal: options.signal, onProgress: (done, total) => options.onProgress?.({ phase: `export ${d.target}`, doneBytes: done, totalBytes: total }) });
    return { backup: m.id, file };
  }

  /** Writes backed-up disks over the disks of a shut-off domain with the same targets. */
  private async restoreIntoDomain(store: Store, m: Manifest, disks: Manifest['disks'], domain: string, options: RestoreOptions): Promise<RestoredDisk[]> {
    return this.driver.withShutOffDisks(domain, 'restore into', async (domainDisks) => {
      const out: RestoredDisk[] = [];
      for (const d of disks) {
        const target = domainDisks.find((x) => x.target === d.target);
        if (target === undefined) throw new QbackupError('DISK_NOT_FOUND', `Cannot restore disk "${d.target}" of backup "${m.id}" into domain "${domain}": it has no disk "${d.target}"`);
        const what = `disk "${d.target}" of backup "${m.id}"`;
        await restoreIntoImage(store, await store.resolveIndex(d.index), target.source, target.format, { what, signal: options.signal, onProgress: (done, total) => options.onProgress?.({ phase: `restore ${d.target}`, doneBytes: done, totalBytes: total }) });
        out.push({ target: d.target, file: target.source });
      }
      return out;
    });
  }

  /**
   * Serves disks of a backup (default: the newest of the domain) read-only
   * over NBD, one export per disk named after its target, until the
   * returned server is closed. The default unix socket is in a fresh 0700
   * directory of the state directory's run area.
   */
  async serveBackup(domain: string, options: RepoAccess & { backup?: string; disks?: string[]; listen?: ServeListen; log?: (line: string) => void; blockStatus?: boolean | undefined }): Promise<BackupServer> {
    const store = await this.open(options);
    return serveBackup(store, {
      domain,
      listen: options.listen ?? { transport: 'unix' },
      runDir: this.runDir,
      ...(options.backup !== undefined ? { backup: options.backup } : {}),
      ...(options.disks !== undefined ? { disks: options.disks } : {}),
      ...(options.log !== undefined ? { log: options.log } : {}),
      blockStatus: options.blockStatus,
    });
  }

  async verify(access: RepoAccess, options: VerifyOptions = {}): Promise<VerifyReport> {
    return verifyStore(await this.open(access), options);
  }

  /**
   * Repairs what can be repaired (repair.ts): damaged manifests moved to
   * quarantine/, lost pack indexes rebuilt from their packs' trailers.
   * `confirm` sees the plan first; nothing changes unless it answers true.
   */
  async repair(access: RepoAccess, confirm: (plan: RepairPlan) => Promise<boolean>): Promise<RepairReport | undefined> {
    const store = await this.open(access);
    const plan = await planRepair(store);
    if (plan.quarantine.length === 0 && plan.rebuildIndexes.length === 0) return { ...plan, lost: [] };
    if (!(await confirm(plan))) return undefined;
    return executeRepair(store, plan);
  }

  /**
   * Applies a retention policy to a domain's backups: removes the manifests
   * of those it does not keep, folds the kept ones' index chains off them
   * (metadata only), and merges their checkpoints away (coverage of the kept
   * ones is unchanged). Their data goes with the next gc.
   */
  async prune(domain: string, options: RepoAccess & RetentionPolicy & OperationOptions & { dryRun?: boolean }): Promise<PruneResult> {
    const store = await this.open(options);
    // Only the policy's own fields: the options also carry the repository and its passphrase.
    const { plan, removed } = await pruneStore(store, domain, retentionOf(options), { dryRun: options.dryRun, signal: options.signal, onProgress: options.onProgress, logger: options.logger });
    const result: PruneResult = { ...plan, checkpointsRemoved: [], checkpointsKept: [] };
    if (options.dryRun) return result;
    const existing = removed.length > 0 ? new Set(await this.driver.checkpoints(domain)) : new Set<string>();
    for (const m of removed) {
      if (!existing.has(m.checkpoint)) continue;
      try {
        await this.driver.deleteCheckpoint(domain, m.checkpoint);
        result.checkpointsRemoved.push(m.checkpoint);
      } catch (err) {
        // e.g. a backup job runs on the domain: the checkpoint stays, a later prune retries.
        if (!(err instanceof QbackupError)) throw err;
        result.checkpointsKept.push({ name: m.checkpoint, reason: describeError(err) });
      }
    }
    return result;
  }

  /**
   * Copies backups from one repository into another (docs/design.md,
   * "Copying between repositories"). An unencrypted target is created on
   * first use with the source's chunk size; an encrypted one must exist.
   */
  async copy(options: CopyOptions & { from: RepoAccess; to: RepoAccess }): Promise<CopyReport> {
    const sourceBackend = await this.backendFor(options.from.repo);
    const source = await Store.open(sourceBackend, options.from.password !== undefined ? { password: options.from.password } : {}).catch((err: unknown) => {
      if (options.from.password !== undefined || !isQbackupError(err, 'WRONG_PASSWORD')) throw err;
      throw new QbackupError('WRONG_PASSWORD', `Cannot copy from repository "${sourceBackend.location}": it is encrypted and no passphrase was given for it`, { cause: err });
    });
    const backend = await this.backendFor(options.to.repo);
    let target: Store | undefined;
    let targetCreated = false;
    try {
      target = await Store.open(backend, options.to.password !== undefined ? { password: options.to.password } : {});
    } catch (err) {
      if (options.to.password !== undefined || !isMissingRepository(err)) throw err;
      targetCreated = true;
      // A dry run creates nothing: the plan is made against an empty target.
      if (options.dryRun !== true) target = await Store.init(backend, { chunkSize: source.config.chunkSize });
    }
    const report = await copyBackups(source, target, { ...options, targetCreated });
    // What the source could not give is an error, after everything else was copied; the report rides along.
    if (report.failed.length > 0 && !report.dryRun) {
      const others = report.copied.length > 0 ? `; ${report.copied.length} other backup(s) were copied` : '';
      throw new QbackupError('REPO_DAMAGED', `${report.failed.map((f) => f.reason).join('; ')}${others}`, { details: { copied: report.copied, failed: report.failed } });
    }
    return report;
  }

  async gc(access: RepoAccess, options: OperationOptions = {}): Promise<GcReport> {
    return collectGarbage(await this.open(access), options);
  }

  async stats(access: RepoAccess): Promise<RepoStats> {
    return repositoryStats(await this.open(access));
  }

  async listKeys(access: RepoAccess): Promise<Array<{ id: string; created: string; host: string }>> {
    return (await this.open(access)).listKeys();
  }

  async addKey(access: RepoAccess, newPassword: string): Promise<string> {
    return (await this.open(access)).addKey(newPassword);
  }

  async removeKey(access: RepoAccess, id: string): Promise<void> {
    await (await this.open(access)).removeKey(id, access.password ?? '');
  }

  /**
   * The backend of `repo`. Remote ones are kept for the life of the service:
   * an S3 client holds a pool of connections that a long-running daemon
   * should reuse, not open anew per request.
   */
  private async backendFor(repo: string): Promise<Backend> {
    const faults = this.faults;
    const open = async (): Promise<Backend> => {
      const b = await openBackend(repo, this.backendSettings);
      return faults === undefined ? b : new FaultingBackend(b, faults);
    };
    if (!isRemoteRepo(repo)) return open();
    let backend = this.remote.get(repo);
    if (backend === undefined) {
      backend = open();
      this.remote.set(repo, backend);
      backend.catch(() => this.remote.delete(repo));
    }
    return backend;
  }

  private async open(access: RepoAccess, createIfMissing = false): Promise<Store> {
    const backend = await this.backendFor(access.repo);
    try {
      return await Store.open(backend, access.password !== undefined ? { password: access.password } : {});
    } catch (err) {
      if (!createIfMissing || access.password !== undefined || !isMissingRepository(err)) throw err;
      try {
        return await Store.init(backend);
      } catch (initErr) {
        // Another process created it between our look and our write (two first backups at once): use theirs.
        if (!isCreatedMeanwhile(initErr)) throw initErr;
        return Store.open(backend);
      }
    }
  }
}

function isCreatedMeanwhile(err: unknown): boolean {
  return err instanceof QbackupError && err.code === 'REPO_INVALID' && /one already exists there/.test(err.message);
}

function isMissingRepository(err: unknown): boolean {
  return err instanceof QbackupError && err.code === 'REPO_INVALID' && /not a qbackup repository/.test(err.message);
}

function retentionOf(options: RetentionPolicy): RetentionPolicy {
  const policy: RetentionPolicy = {};
  for (const rule of ['keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const) {
    const v = options[rule];
    if (v !== undefined) policy[rule] = v;
  }
  return policy;
}

/** A backup is chosen by id or by time (`until`), never both: the rule of restore, export, instant restore and serve. */
export function checkBackupChoice(domain: string, options: { backup?: string | undefined; until?: Date | undefined }): void {
  if (options.backup !== undefined && options.until !== undefined) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot choose a backup of domain "${domain}": give either a backup id or a time (until), not both`);
  }
}

/** The backup named by id, or the newest at or before `until`, or the newest. */
function pickBackup(manifests: readonly Manifest[], domain: string, options: { backup?: string | undefined; until?: Date | undefined }): Manifest {
  checkBackupChoice(domain, options);
  const m =
    options.backup !== undefined
      ? manifests.find((x) => x.id === options.backup)
      : [...manifests].reverse().find((x) => options.until === undefined || new Date(x.time).getTime() <= (options.until?.getTime() ?? 0));
  if (m === undefined) {
    const which = options.backup !== undefined ? `"${options.backup}"` : options.until !== undefined ? `taken at or before ${options.until.toISOString()}` : '';
    throw new QbackupError('BACKUP_NOT_FOUND', `Repository has no backup ${which} of domain "${domain}"`.replace('  ', ' '));
  }
  return m;
}

