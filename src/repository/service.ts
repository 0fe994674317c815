// Repository operations: one-command backups into qcow2 chains, listing,
// restore to standalone images, verification and pruning.
//
// Invariants:
// - Each backup creates the domain's next checkpoint atomically with its job;
//   the next backup of a disk is incremental since the checkpoint of the last
//   backup of that disk in this repository, when the coverage rules allow it.
// - A disk file's backing file is the previous backup of the same disk (a
//   relative path); a full has none. Coverage is decided before any file is
//   created and the job runs with --strict, so a file with a backing file is
//   never filled by a full copy.
// - Restored bytes are checked against the manifest's digest before restore
//   reports success; prune rewrites only the files of kept backups, and only in
//   ways that keep their content (qemu-img rebase in safe mode).

import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import type { JobInfo } from '../backup/job.js';
import type { BackupService } from '../backup/service.js';
import type { BackupSpec } from '../backup/spec.js';
import { assert } from '../util/assert.js';
import type { CheckpointService } from '../checkpoint/service.js';
import type { DomainService } from '../domain/service.js';
import { QbackupError, describeError } from '../errors.js';
import { allocatedDataBytes, createImage, imageInfo } from '../qemu/image.js';
import { runTool } from '../qemu/tools.js';
import { imageDigest } from './digest.js';
import { nbdPullCopier } from './pull.js';
import { Repository, REPO_FORMAT, type Manifest, type ManifestDisk } from './repo.js';

export interface Progress {
  /** What is being done, e.g. "backup sda" or "verify 2026…/sda". */
  phase: string;
  doneBytes: number;
  totalBytes: number;
}

export interface RepoBackupOptions {
  repo: string;
  full?: boolean;
  mode?: 'push' | 'pull';
  disks?: string[];
  onProgress?: (p: Progress) => void;
}

export interface RestoreOptions {
  repo: string;
  backup?: string;
  /** Latest backup taken at or before this time. */
  until?: Date;
  disks?: string[];
  to: string;
  format?: 'qcow2' | 'raw';
  onProgress?: (p: Progress) => void;
}

export interface RestoredDisk {
  target: string;
  file: string;
  digest: string;
}

export interface VerifyProblem {
  backup: string;
  domain: string;
  target: string;
  file: string;
  problem: string;
}

export interface VerifyReport {
  backupsChecked: number;
  filesChecked: number;
  problems: VerifyProblem[];
}

/** How pull mode copies one disk's export into its repository file (our NBD client by default). */
export type PullCopier = (args: {
  job: JobInfo;
  exportName: string;
  dirtyBitmap: string | undefined;
  targetFile: string;
  onProgress: (done: number, total: number) => void;
}) => Promise<{ dataBytes: number }>;

/** What one disk's repository backup will be. */
interface DiskPlan {
  target: string;
  diskId: string;
  source: string;
  file: string;
  level: 'full' | 'incremental';
  since?: string;
  parent: Manifest | undefined;
  parentFile?: string;
  fullReason: string | null;
}

export class RepositoryService {
  pullCopier: PullCopier = nbdPullCopier;

  constructor(
    readonly domains: DomainService,
    readonly checkpoints: CheckpointService,
    readonly backups: BackupService,
  ) {}

  // ---- backup --------------------------------------------------------------------

  async backup(domain: string, options: RepoBackupOptions): Promise<Manifest> {
    const info = this.domains.info(domain);
    const repo = Repository.open(options.repo, { create: true });
    using _lock = repo.lock(domain, 'backup');
    repo.cleanLeftovers(domain);
    const mode = options.mode ?? 'push';
    const all = this.domains.blockList(domain);
    for (const t of options.disks ?? []) {
      if (!all.some((d) => d.target === t)) throw new QbackupError('DISK_NOT_FOUND', `Domain "${domain}" has no disk "${t}"`);
    }
    const selected = all.filter((d) => (options.disks === undefined || options.disks.length === 0 ? !d.readonly : options.disks.includes(d.target)));
    if (selected.length === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": no disk selected`);

    // A shut-off domain is started with its CPUs stopped: QEMU opens the images
    // with their bitmaps, no guest code runs, and it is shut down cleanly after.
    const startedHere = info.state !== 'running';
    if (startedHere) await this.domains.start(domain, { paused: true });
    let manifest: Manifest;
    try {
      manifest = await this.backupRunning(repo, domain, selected, mode, options);
    } catch (err) {
      if (startedHere) {
        await this.domains.shutdown(domain).catch((stopErr: unknown) => {
          throw new QbackupError('BACKUP_FAILED', `${describeError(err)} (and shutting domain "${domain}" down again failed: ${describeError(stopErr)})`, { cause: err });
        });
      }
      throw err;
    }
    if (startedHere) {
      await this.domains.shutdown(domain).catch((stopErr: unknown) => {
        throw new QbackupError('DOMAIN_RUNNING', `Backup "${manifest.id}" of domain "${domain}" is complete, but shutting the domain down again failed: ${describeError(stopErr)}`, { cause: stopErr });
      });
    }
    return manifest;
  }

  private async backupRunning(
    repo: Repository,
    domain: string,
    selected: ReturnType<DomainService['blockList']>,
    mode: 'push' | 'pull',
    options: RepoBackupOptions,
  ): Promise<Manifest> {
    const id = newBackupId();
    const checkpoint = `qb-${id}`;
    const plans: DiskPlan[] = [];
    for (const d of selected) plans.push(await this.planDisk(repo, domain, id, d, options));
    repo.beginPending(domain, { id, files: plans.map((p) => p.file) });
    const startedMs = Date.now();
    try {
      await createFiles(repo, domain, plans);
      await this.copyDisks(repo, domain, plans, mode, checkpoint, options);
      const manifest: Manifest = {
        format: REPO_FORMAT,
        id,
        domain,
        uuid: this.domains.info(domain).uuid,
        time: new Date(startedMs).toISOString(),
        endTime: new Date().toISOString(),
        mode,
        checkpoint,
        domainXml: this.domains.dumpXml(domain),
        disks: await describeDisks(repo, domain, plans, options),
      };
      repo.writeManifest(manifest);
      repo.endPending(domain, id);
      return manifest;
    } catch (err) {
      repo.cleanLeftovers(domain);
      // The checkpoint made with a failed backup marks nothing in this repository:
      // merge it away so the chain stays as if the attempt never happened.
      if (this.checkpoints.exists(domain, checkpoint)) {
        await this.checkpoints.delete(domain, checkpoint).catch((cleanupErr: unknown) => {
          throw new QbackupError('BACKUP_FAILED', `${describeError(err)} (and removing its checkpoint "${checkpoint}" failed: ${describeError(cleanupErr)})`, { cause: err });
        });
      }
      throw err;
    }
  }

  /** Runs the backup job that fills the prepared files: push (QEMU writes them) or pull (our NBD client does). */
  private async copyDisks(repo: Repository, domain: string, plans: readonly DiskPlan[], mode: 'push' | 'pull', checkpoint: string, options: RepoBackupOptions): Promise<void> {
    const spec: BackupSpec = {
      mode,
      disks: plans.map((p) => ({
        target: p.target,
        format: 'qcow2',
        ...(p.since !== undefined ? { mode: 'incremental', since: p.since } : { mode: 'full' }),
        ...(mode === 'push' ? { targetFile: resolve(repo.filePath(domain, p.file)) } : {}),
      })),
    };
    let job = await this.backups.begin(domain, spec, { checkpoint: { name: checkpoint }, reuseExternal: mode === 'push', strict: true });
    if (mode === 'push') {
      job = await this.backups.wait(domain, job.id, (j) => options.onProgress?.({ phase: `backup ${domain}`, doneBytes: j.bytesDone, totalBytes: j.bytesTotal }));
      if (job.state !== 'completed') throw new QbackupError('BACKUP_FAILED', `Backup of domain "${domain}" failed: ${job.error ?? job.state}`);
      return;
    }
    try {
      for (const p of plans) {
        const jd = job.disks.find((d) => d.target === p.target);
        assert(jd !== undefined, `backup job "${job.id}" has no export for disk "${p.target}"`);
        await this.pullCopier({
          job,
          exportName: jd.pull?.exportName ?? p.target,
          dirtyBitmap: jd.tmpBitmap,
          targetFile: repo.filePath(domain, p.file),
          onProgress: (done, total) => options.onProgress?.({ phase: `backup ${p.target}`, doneBytes: done, totalBytes: total }),
        });
      }
    } catch (err) {
      // The copy's error is the one to report; ending the job is cleanup (a dead QEMU has no job to end).
      await this.backups.abort(domain).catch((abortErr: unknown) => {
        throw new QbackupError('BACKUP_FAILED', `${describeError(err)} (and ending backup job "${job.id}" failed: ${describeError(abortErr)})`, { cause: err });
      });
      throw err;
    }
    await this.backups.abort(domain);
  }

  /** Full or incremental for one disk: incremental since the disk's last backup here, when coverage allows. */
  private async planDisk(repo: Repository, domain: string, id: string, d: ReturnType<DomainService['blockList']>[number], options: RepoBackupOptions): Promise<DiskPlan> {
    const history = repo.manifests(domain);
    const prev = [...history].reverse().find((m) => m.disks.some((x) => x.diskId === d.diskId));
    const prevDisk = prev?.disks.find((x) => x.diskId === d.diskId);
    const plan: DiskPlan = {
      target: d.target,
      diskId: d.diskId,
      source: d.source,
      file: join(repo.diskDir(domain, d.target, d.diskId), `${id}.qcow2`),
      level: 'full',
      parent: undefined,
      fullReason: null,
    };
    if (options.full) plan.fullReason = 'requested with --full';
    else if (prev === undefined || prevDisk === undefined) plan.fullReason = 'no earlier backup of this disk in the repository';
    else if (!existsSync(repo.filePath(domain, prevDisk.file))) plan.fullReason = `the file of backup "${prev.id}" is missing`;
    else if (!this.checkpoints.exists(domain, prev.checkpoint)) plan.fullReason = `checkpoint "${prev.checkpoint}" of backup "${prev.id}" no longer exists`;
    else {
      const cov = (await this.checkpoints.coverage(domain, prev.checkpoint)).find((c) => c.diskId === d.diskId);
      if (cov === undefined || cov.mode === 'full') {
        plan.fullReason = (cov?.reasons ?? []).map((r) => `${r.code}: ${r.detail}`).join('; ') || 'no coverage';
      } else {
        plan.level = 'incremental';
        plan.since = prev.checkpoint;
        plan.parent = prev;
        plan.parentFile = prevDisk.file;
      }
    }
    return plan;
  }

  // ---- list ---------------------------------------------------------------------

  list(repoPath: string, domain?: string): Manifest[] {
    const repo = Repository.open(repoPath);
    const domains = domain !== undefined ? [domain] : repo.domains();
    return domains.flatMap((d) => repo.manifests(d));
  }

  // ---- restore --------------------------------------------------------------------

  async restore(domain: string, options: RestoreOptions): Promise<{ backup: string; disks: RestoredDisk[] }> {
    const repo = Repository.open(options.repo);
    const m = pickBackup(repo, domain, options);
    const format = options.format ?? 'qcow2';
    for (const t of options.disks ?? []) {
      if (!m.disks.some((d) => d.target === t)) throw new QbackupError('DISK_NOT_FOUND', `Backup "${m.id}" of domain "${domain}" has no disk "${t}"`);
    }
    const disks = m.disks.filter((d) => options.disks === undefined || options.disks.length === 0 || options.disks.includes(d.target));
    const outputs = disks.map((d) => ({ disk: d, out: join(options.to, `${d.target}.${format}`) }));
    for (const o of outputs) {
      if (existsSync(o.out)) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore disk "${o.disk.target}": "${o.out}" exists`);
      if (!existsSync(repo.filePath(domain, o.disk.file))) {
        throw new QbackupError('VERIFY_FAILED', `Cannot restore disk "${o.disk.target}" of backup "${m.id}": file "${repo.filePath(domain, o.disk.file)}" is missing`);
      }
    }
    mkdirSync(options.to, { recursive: true });
    const restored: RestoredDisk[] = [];
    try {
      for (const { disk, out } of outputs) {
        await convertWithProgress(repo.filePath(domain, disk.file), out, format, (pct) =>
          options.onProgress?.({ phase: `restore ${disk.target}`, doneBytes: Math.round((pct / 100) * disk.virtualSize), totalBytes: disk.virtualSize }),
        );
        const { digest } = await imageDigest(out, format);
        if (digest !== disk.digest) {
          throw new QbackupError('VERIFY_FAILED', `Restore of disk "${disk.target}" from backup "${m.id}" does not match the recorded digest: the backup chain is damaged (run verify)`);
        }
        restored.push({ target: disk.target, file: out, digest });
      }
    } catch (err) {
      for (const { out } of outputs) rmSync(out, { force: true });
      throw err;
    }
    return { backup: m.id, disks: restored };
  }

  // ---- verify ---------------------------------------------------------------------

  async verify(repoPath: string, options: { domain?: string; backup?: string; onProgress?: (p: Progress) => void } = {}): Promise<VerifyReport> {
    const repo = Repository.open(repoPath);
    const report: VerifyReport = { backupsChecked: 0, filesChecked: 0, problems: [] };
    const domains = options.domain !== undefined ? [options.domain] : repo.domains();
    for (const domain of domains) {
      const all = repo.manifests(domain);
      const byId = new Map(all.map((m) => [m.id, m]));
      const chosen = options.backup !== undefined ? [repo.manifest(domain, options.backup)] : all;
      for (const m of chosen) {
        report.backupsChecked++;
        for (const d of m.disks) {
          report.filesChecked++;
          const abs = repo.filePath(domain, d.file);
          const problem = (text: string): void => {
            report.problems.push({ backup: m.id, domain, target: d.target, file: abs, problem: text });
          };
          if (!existsSync(abs)) {
            problem('the file is missing');
            continue;
          }
          try {
            await runTool('qemu-img', ['check', '-q', '-f', 'qcow2', abs]);
          } catch (err) {
            problem(`qemu-img check failed: ${describeError(err)}`);
            continue;
          }
          const info = await imageInfo(abs).catch(() => undefined);
          const parentDisk = d.parent !== null ? byId.get(d.parent)?.disks.find((x) => x.diskId === d.diskId) : undefined;
          if (d.parent !== null) {
            const expected = parentDisk !== undefined ? resolve(repo.filePath(domain, parentDisk.file)) : undefined;
            const actual = info?.backingFilename !== undefined ? resolve(dirname(abs), info.backingFilename) : undefined;
            if (parentDisk === undefined) problem(`its parent backup "${d.parent}" is not in the repository`);
            else if (actual === undefined || actual !== expected) problem(`its backing file is ${actual ?? 'missing'}, expected ${expected ?? '?'}`);
            else if (!existsSync(actual)) problem(`its backing file "${actual}" is missing`);
            if (report.problems.some((p) => p.backup === m.id && p.target === d.target)) continue;
          } else if (info?.backingFilename !== undefined) {
            problem(`a full backup must not have a backing file, it has "${info.backingFilename}"`);
            continue;
          }
          try {
            const { digest } = await imageDigest(abs, 'qcow2', (done) => options.onProgress?.({ phase: `verify ${m.id} ${d.target}`, doneBytes: done, totalBytes: d.virtualSize }));
            if (digest !== d.digest) problem('its content does not match the recorded digest');
          } catch (err) {
            problem(`its content cannot be read: ${describeError(err)}`);
          }
        }
      }
    }
    return report;
  }

  // ---- prune ----------------------------------------------------------------------

  /**
   * Keeps the newest `keepLast` backups. A kept backup whose disk file builds
   * on a dropped one is first made standalone (qemu-img rebase in safe mode
   * copies what it needs from the chain), so it restores to the same bytes.
   */
  async prune(domain: string, options: { repo: string; keepLast: number }): Promise<{ removed: string[]; kept: string[]; checkpointsRemoved: string[] }> {
    if (!Number.isInteger(options.keepLast) || options.keepLast < 1) {
      throw new QbackupError('INVALID_ARGUMENT', `Invalid --keep-last "${options.keepLast}": keep at least 1 backup`);
    }
    const repo = Repository.open(options.repo);
    using _lock = repo.lock(domain, 'prune');
    repo.cleanLeftovers(domain);
    const all = repo.manifests(domain);
    const drop = all.slice(0, Math.max(0, all.length - options.keepLast));
    const keep = all.slice(drop.length);
    const dropped = new Set(drop.map((m) => m.id));
    for (const m of keep) {
      let changed = false;
      const disks: ManifestDisk[] = [];
      for (const d of m.disks) {
        if (d.parent !== null && dropped.has(d.parent)) {
          const abs = repo.filePath(domain, d.file);
          await runTool('qemu-img', ['rebase', '-f', 'qcow2', '-b', '', abs], { what: `Consolidating "${abs}"` });
          disks.push({ ...d, level: 'full', parent: null, fullReason: `consolidated when prune removed backup "${d.parent}"` });
          changed = true;
        } else {
          disks.push(d);
        }
      }
      if (changed) repo.writeManifest({ ...m, disks });
    }
    for (const m of drop) repo.removeManifest(domain, m.id);
    repo.sweepOrphans(domain);
    // The checkpoints of dropped backups are merged away (their bitmaps fold into
    // their parents'), so checkpoints do not pile up with every backup.
    const keptCheckpoints = new Set(keep.map((m) => m.checkpoint));
    const checkpointsRemoved: string[] = [];
    for (const m of drop) {
      if (keptCheckpoints.has(m.checkpoint) || !this.checkpoints.exists(domain, m.checkpoint)) continue;
      try {
        await this.checkpoints.delete(domain, m.checkpoint);
        checkpointsRemoved.push(m.checkpoint);
      } catch {
        // e.g. a backup job runs on the domain: the checkpoint stays, a later prune retries
      }
    }
    return { removed: drop.map((m) => m.id), kept: keep.map((m) => m.id), checkpointsRemoved };
  }
}

/** Creates each disk's repository file: an empty qcow2 of the disk's size, backed by the previous backup for an incremental. */
async function createFiles(repo: Repository, domain: string, plans: readonly DiskPlan[]): Promise<void> {
  for (const p of plans) {
    const abs = repo.filePath(domain, p.file);
    mkdirSync(dirname(abs), { recursive: true });
    const size = (await imageInfo(p.source, { shared: true })).virtualSize;
    const backing = p.parentFile !== undefined ? { backingFile: relative(dirname(abs), repo.filePath(domain, p.parentFile)), backingFormat: 'qcow2' } : {};
    await createImage(abs, 'qcow2', size, backing);
  }
}

/** The manifest's entry for each disk, with the content digest of the whole image chain. */
async function describeDisks(repo: Repository, domain: string, plans: readonly DiskPlan[], options: RepoBackupOptions): Promise<ManifestDisk[]> {
  const disks: ManifestDisk[] = [];
  for (const p of plans) {
    const abs = repo.filePath(domain, p.file);
    const size = (await imageInfo(abs)).virtualSize;
    const { digest } = await imageDigest(abs, 'qcow2', (done) => options.onProgress?.({ phase: `digest ${p.target}`, doneBytes: done, totalBytes: size }));
    disks.push({
      target: p.target,
      diskId: p.diskId,
      file: p.file,
      level: p.level,
      parent: p.parent?.id ?? null,
      virtualSize: size,
      bytesWritten: await allocatedDataBytes(abs),
      fullReason: p.level === 'full' ? p.fullReason : null,
      digest,
    });
  }
  return disks;
}

function pickBackup(repo: Repository, domain: string, options: RestoreOptions): Manifest {
  if (options.backup !== undefined) return repo.manifest(domain, options.backup);
  const all = repo.manifests(domain);
  const until = options.until;
  const candidates = until === undefined ? all : all.filter((m) => new Date(m.time).getTime() <= until.getTime());
  const m = candidates.at(-1);
  if (m === undefined) {
    throw new QbackupError(
      'BACKUP_NOT_FOUND',
      until === undefined ? `Repository "${repo.root}" has no backup of domain "${domain}"` : `Repository "${repo.root}" has no backup of domain "${domain}" taken at or before ${until.toISOString()}`,
    );
  }
  return m;
}

function newBackupId(): string {
  const t = new Date().toISOString().replace(/[-:]/g, '').replace(/\.(\d{3})Z$/, '.$1Z');
  return `${t}-${Math.floor(Math.random() * 0xffff).toString(16).padStart(4, '0')}`;
}

/** qemu-img convert with its -p progress parsed into a percentage callback. */
async function convertWithProgress(source: string, out: string, format: 'qcow2' | 'raw', onPercent: (pct: number) => void): Promise<void> {
  await runTool('qemu-img', ['convert', '-p', '-O', format, source, out], {
    what: `Writing "${out}"`,
    onStdout: (b) => {
      const last = [...b.toString().matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)].at(-1)?.[1];
      if (last !== undefined) onPercent(Number(last));
    },
  });
}
