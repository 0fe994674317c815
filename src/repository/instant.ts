// Instant restore: a domain runs from a backup at once, and QEMU moves the
// data into local images while it runs.
//
// How: a server process exports the backup's disks over NBD (one unix socket,
// one read-only export per disk, named by the target); each disk becomes a
// new, empty qcow2 overlay whose *definition* declares the export as its
// backing (`<backingStore type='network'>`; the overlay's header names
// nothing, so no image chooses a host file); the domain is defined and
// started on the overlays, so guest reads fall through to the backup and
// guest writes stay in the overlays; then one QEMU `block-stream` job per
// disk copies every backing byte into its overlay. When all jobs have
// completed, the NBD nodes are deleted, the backings dropped from the stored
// definition and the server stopped: the domain no longer needs the backup.
//
// Invariants:
// - The restore's record (STATE_DIR/domains/NAME/instant-restore.json, written
//   whole and renamed) names the repository, the backup id and each disk's
//   size before the domain exists, and is removed only once the definition has
//   no NBD backing left. A server is only ever (re)started for that backup id,
//   and its announced exports must have exactly the recorded sizes, so the
//   guest never reads another backup's data.
// - Everything after the start is settled by whichever command comes next on
//   the domain (the onOpen hook): a finished copy is finalized, a server that
//   died is restarted on the same socket (QEMU's NBD client reconnects on its
//   own), a stream job that failed or is missing is started again (data
//   already copied stays; streaming skips it). A start of the domain brings the
//   server up first (beforeStart) and the streams after (afterStart).

import { isRemoteRepo } from './backend/open.js';
import type { S3Settings } from './backend/s3.js';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, lstatSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { describeError, QbackupError } from '../errors.js';
import { formatDomainXml, parseDomainXml } from '../libvirt/domain.js';
import type { DomainContext, DomainService } from '../domain/service.js';
import type { DiskDefinition, DomainDefinition } from '../domain/types.js';
import { assertDomainName } from '../domain/names.js';
import { createImage } from '../qemu/image.js';
import { createExclusiveFile, refusePseudoFilesystem } from '../util/safe-create.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import type { QmpClient } from '../qmp/index.js';
import { makePrivateDir } from '../util/private-dir.js';
import { sleep } from '../util/proc.js';
import { socketAccepts } from '../util/socket.js';
import { backupServerAlive, signalBackupServer, startBackupServer, stopBackupServer, type BackupServerProcess } from './backup-server.js';
import { ZERO_ID } from './chunk.js';
import type { FullIndex } from './disk-index.js';
import type { Manifest } from './manifest.js';

export interface InstantRestoreOptions {
  /** Name of the new domain; default: the backed-up domain's name. */
  as?: string;
  /** Directory for the overlays (<target>.qcow2); default STATE_DIR/images/NAME. */
  to?: string;
  /** Copy rate cap per disk, bytes per second (QEMU's block-stream `speed`); default unlimited. */
  speedBytesPerSec?: number;
  onProgress?: (phase: string) => void;
}

/** One disk of an instant restore. */
export interface InstantDiskRecord {
  target: string;
  sizeBytes: number;
  overlay: string;
  /** The QEMU job that streams it. */
  jobId: string;
  /** Why its last job failed, when one was started again after a failure. */
  lastError?: string;
}

/** What is kept on disk while an instant restore runs. */
export interface InstantRecord {
  version: 1;
  domain: string;
  repo: string;
  encrypted: boolean;
  sourceDomain: string;
  backupId: string;
  socket: string;
  disks: InstantDiskRecord[];
  speedBytesPerSec: number;
  server: { pid: number; pidStart: string } | null;
  startedMs: number;
}

export interface InstantDiskInfo {
  target: string;
  overlay: string;
  sizeBytes: number;
  /** QEMU job status (created, running, paused, concluded…), "completed", or "waiting" when QEMU runs no job for it. */
  status: string;
  doneBytes: number;
  totalBytes: number;
  /** The job's error, or that of the last job that failed before this one was started. */
  error?: string;
}

export interface InstantRestoreInfo {
  domain: string;
  sourceDomain: string;
  backup: string;
  repo: string;
  socket: string;
  /** `streaming` until every byte is local and the server stopped, then `completed`. */
  state: 'streaming' | 'completed';
  serverPid: number | null;
  startedMs: number;
  endedMs?: number;
  disks: InstantDiskInfo[];
  /** Disks of the backed-up definition that the backup does not hold, left out of the new domain. */
  dropped?: string[];
}

/** The plan of an instant restore: a pure function of the manifest and the options. */
export interface InstantPlan {
  name: string;
  definition: DomainDefinition;
  disks: InstantDiskRecord[];
  dropped: string[];
  overlayDir: string;
  socket: string;
}

const RECORD = 'instant-restore.json';
const LAST = 'instant-restore.last.json';

export function jobIdFor(target: string): string {
  return `instant-${target}`;
}

/**
 * The new domain's definition: the backed-up one renamed (a new UUID when
 * renamed or when `uuidTaken`), each backed-up disk an overlay declaring the
 * export of its target as backing; disks the backup does not hold are left out.
 */
export function planInstantRestore(m: Manifest, o: { name: string; overlayDir: string; socket: string; uuidTaken: boolean }): InstantPlan {
  const source = parseDomainXml(m.domainXml);
  const disks: InstantDiskRecord[] = [];
  const kept: DiskDefinition[] = [];
  const dropped: string[] = [];
  for (const d of source.disks) {
    const backed = m.disks.find((x) => x.target === d.target);
    if (backed === undefined) {
      dropped.push(d.target);
      continue;
    }
    const overlay = join(o.overlayDir, `${d.target}.qcow2`);
    const { backingStore: _b, nbdBacking: _n, encryption: _e, ...rest } = d;
    kept.push({ ...rest, source: overlay, format: 'qcow2', readonly: false, nbdBacking: { socket: o.socket, exportName: d.target } });
    disks.push({ target: d.target, sizeBytes: backed.virtualSize, overlay, jobId: jobIdFor(d.target) });
  }
  const renamed = o.name !== source.name;
  const definition: DomainDefinition = { ...source, name: o.name, uuid: renamed || o.uuidTaken ? randomUUID() : source.uuid, disks: kept };
  return { name: o.name, definition, disks, dropped, overlayDir: o.overlayDir, socket: o.socket };
}

export class InstantRestoreService {
  /** The passphrase used when a server of an encrypted repository must be restarted by a later command. */
  password: string | undefined;
  /** The passphrase of the repository an instant restore is beginning from, while its domain starts. */
  private startPassword: string | undefined;

  constructor(
    readonly domains: DomainService,
    readonly options: { serverCommand?: readonly string[]; serverTimeoutMs?: number; s3?: S3Settings } = {},
  ) {}

  // ---- begin -----------------------------------------------------------------

  /**
   * Serves backup `m`, creates the overlays, defines and starts the domain on
   * them, and has QEMU start copying. Returns as soon as the domain runs.
   */
  async begin(
    m: Manifest,
    access: { repo: string; password?: string; encrypted: boolean },
    options: InstantRestoreOptions,
    holes: ReadonlyMap<string, ReadonlyArray<{ offset: number; length: number }>> = new Map(),
  ): Promise<InstantRestoreInfo> {
    const name = options.as ?? m.domain;
    assertDomainName(name);
    this.refuseClash(name, m);
    const overlayDir = resolve(options.to ?? join(this.domains.options.stateDir, 'images', name));
    const socket = join(this.domains.domainDir(name), 'nbd', 'backup.sock');
    const uuidTaken = this.domains.store.getDomainByUuid(parseDomainXml(m.domainXml).uuid) !== undefined;
    const plan = planInstantRestore(m, { name, overlayDir, socket, uuidTaken });
    if (plan.disks.length === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore backup "${m.id}" of domain "${m.domain}" instantly: it holds no disk of its definition`);
    for (const d of plan.disks) {
      refusePseudoFilesystem(d.overlay, `Cannot restore disk "${d.target}" of backup "${m.id}" instantly`);
      if (lstatSync(d.overlay, { throwIfNoEntry: false }) !== undefined) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore disk "${d.target}" of backup "${m.id}" instantly: "${d.overlay}" exists`);
    }
    makePrivateDir(overlayDir);
    makePrivateDir(dirname(socket));
    const record: InstantRecord = {
      version: 1, domain: name, repo: isRemoteRepo(access.repo) ? access.repo : resolve(access.repo), encrypted: access.encrypted, sourceDomain: m.domain, backupId: m.id,
      socket, disks: plan.disks, speedBytesPerSec: options.speedBytesPerSec ?? 0, server: null, startedMs: Date.now(),
    };
    this.saveRecord(record);
    let defined = false;
    // The start serves the backup (beforeStart), with this command's passphrase.
    this.startPassword = access.password;
    try {
      for (const d of plan.disks) {
        // Created exclusively, never through a planted symlink; the tools reach it by descriptor.
        await using overlay = await createExclusiveFile(d.overlay, `Cannot restore disk "${d.target}" of backup "${m.id}" instantly`);
        await createImage(overlay.fdPath, 'qcow2', d.sizeBytes);
        await markZeroes(overlay.fdPath, holes.get(d.target) ?? []);
      }
      await this.domains.define(formatDomainXml(plan.definition));
      defined = true;
      options.onProgress?.('serving the backup and starting the domain');
      await this.domains.start(name);
    } catch (err) {
      await this.undoBegin(record, defined);
      throw err;
    } finally {
      this.startPassword = undefined;
    }
    const info = await this.info(name);
    if (info === undefined) return this.lastResult(name) ?? this.describe(record, new Map());
    return plan.dropped.length > 0 ? { ...info, dropped: plan.dropped } : info;
  }

  private refuseClash(name: string, m: Manifest): void {
    const existing = this.domains.store.getDomain(name);
    if (existing === undefined) return;
    const state = this.domains.info(name).state;
    const hint = name === m.domain ? '; give the restored domain another name with --as, or undefine the existing one first' : '; choose another name with --as';
    throw new QbackupError('DOMAIN_EXISTS', `Cannot restore backup "${m.id}" instantly as domain "${name}": a domain of that name exists (${state})${hint}`);
  }

  /** Removes what a failed begin made: the domain (if defined), the server, the overlays, the record. */
  private async undoBegin(record: InstantRecord, defined: boolean): Promise<void> {
    if (defined) {
      await this.domains.undefine(record.domain).catch(() => undefined);
    }
    const current = this.loadRecord(record.domain) ?? record;
    if (current.server !== null) await stopBackupServer(current.server.pid, current.server.pidStart);
    for (const d of record.disks) rmSync(d.overlay, { force: true });
    this.removeRecord(record.domain);
    rmSync(dirname(record.socket), { recursive: true, force: true });
  }

  // ---- the server --------------------------------------------------------------

  /**
   * Makes sure the recorded backup is served on the recorded socket: a live
   * server is kept, a dead one restarted. The exports must be the recorded
   * disks with the recorded sizes, or the server is stopped and nothing is used.
   */
  private async ensureServer(record: InstantRecord, password?: string): Promise<void> {
    if (record.server !== null && backupServerAlive(record.server.pid, record.server.pidStart)) return;
    const pass = password ?? this.startPassword ?? this.password;
    if (record.encrypted && pass === undefined) {
      throw new QbackupError(
        'BACKUP_SERVER',
        `The server of backup "${record.backupId}" for domain "${record.domain}" is not running and the repository is encrypted: run the command again with the passphrase in QBACKUP_PASSWORD (or --password-file) to restart it`,
      );
    }
    const dir = dirname(record.socket);
    makePrivateDir(dir);
    let server: BackupServerProcess;
    try {
      server = await startBackupServer({
        repo: record.repo, domain: record.sourceDomain, backupId: record.backupId, disks: record.disks.map((d) => d.target), socket: record.socket,
        outFile: join(dir, 'server.out'), logFile: join(dir, 'server.log'), stateDir: this.domains.options.stateDir,
        ...(pass !== undefined ? { password: pass } : {}),
        ...(this.options.serverCommand !== undefined ? { command: this.options.serverCommand } : {}),
        ...(this.options.s3 !== undefined ? { s3: this.options.s3 } : {}),
        ...(this.options.serverTimeoutMs !== undefined ? { timeoutMs: this.options.serverTimeoutMs } : {}),
      });
    } catch (err) {
      throw new QbackupError('BACKUP_SERVER', `Cannot serve backup "${record.backupId}" to domain "${record.domain}": ${describeError(err)}`, { cause: err });
    }
    for (const d of record.disks) {
      const size = server.exports.get(d.target);
      if (size !== d.sizeBytes) {
        await stopBackupServer(server.pid, server.pidStart);
        throw new QbackupError('BACKUP_SERVER', `The server of backup "${record.backupId}" exports disk "${d.target}" with ${size ?? 'no'} bytes, but the restore of domain "${record.domain}" recorded ${d.sizeBytes}; it was stopped`);
      }
    }
    record.server = { pid: server.pid, pidStart: server.pidStart };
    this.saveRecord(record);
  }

  // ---- hooks (wired in src/qbackup.ts) -------------------------------------------

  /** Before QEMU starts: a disk declaring an NBD backing needs its server. */
  async beforeStart(ctx: DomainContext): Promise<void> {
    const backed = ctx.disks.filter((d) => d.nbdBacking !== undefined);
    if (backed.length === 0) return;
    const record = this.loadRecord(ctx.row.name);
    if (record !== undefined) {
      await this.ensureServer(record);
      return;
    }
    // Not ours: the user serves it, or the start is refused.
    for (const d of backed) {
      if (await socketAccepts(d.nbdBacking?.socket ?? '')) continue;
      throw new QbackupError(
        'BACKUP_SERVER',
        `Cannot start domain "${ctx.row.name}": disk "${d.target}" is backed by NBD export "${d.nbdBacking?.exportName ?? ''}" on "${d.nbdBacking?.socket ?? ''}", where nothing serves and no instant restore of qbackup is recorded; serve it there or define the disk without that <backingStore>`,
      );
    }
  }

  /** After QEMU started (or on any later command): the copy jobs run or are restarted. */
  async afterStart(ctx: DomainContext, qmp: QmpClient): Promise<void> {
    const record = this.loadRecord(ctx.row.name);
    if (record === undefined) return;
    await this.settleRunning(ctx, qmp, record);
  }

  /** On every command's open: finalize a finished copy, bring back a dead server or job. */
  async onOpen(ctx: DomainContext): Promise<void> {
    const record = this.loadRecord(ctx.row.name);
    if (record === undefined) return;
    if (!ctx.disks.some((d) => d.nbdBacking !== undefined)) {
      // The definition was already finalized; only the server and the record remain.
      await this.finishOffline(record);
      return;
    }
    if (!ctx.running) {
      // Nothing reads the backup now; a served backup holds off gc's repacking. A start serves it again (beforeStart).
      if (record.server !== null) {
        await stopBackupServer(record.server.pid, record.server.pidStart);
        record.server = null;
        this.saveRecord(record);
      }
      return;
    }
    // A dead server first, without QEMU: until it is back, QEMU's monitor may
    // not answer (its NBD client holds requests for the reconnect delay).
    await this.ensureServer(record);
    await this.domains.withQmp(ctx, 'instant restore check', (qmp) => this.settleRunning(ctx, qmp, record));
  }

  /** Undefine: the server goes, and the record with the domain's directory. */
  beforeUndefine(ctx: DomainContext): void {
    const record = this.loadRecord(ctx.row.name);
    if (record?.server != null) signalBackupServer(record.server.pid, record.server.pidStart);
  }

  // ---- settling a running domain --------------------------------------------------

  /**
   * The stream jobs of a running domain: a completed one is dismissed once
   * all are complete (then the restore is finalized), a failed or missing one
   * is started again with the server up first.
   */
  private async settleRunning(ctx: DomainContext, qmp: QmpClient, record: InstantRecord): Promise<void> {
    const jobs = await queryStreamJobs(qmp);
    const backed = new Set(ctx.disks.filter((d) => d.nbdBacking !== undefined).map((d) => d.target));
    const pending = record.disks.filter((d) => backed.has(d.target));
    const restart = pending.filter((d) => {
      const j = jobs.get(d.jobId);
      return j === undefined || (j.status === 'concluded' && j.error !== undefined);
    });
    if (restart.length > 0) {
      await this.ensureServer(record);
      for (const d of restart) {
        const failed = jobs.get(d.jobId)?.error;
        if (failed !== undefined) d.lastError = failed;
        if (jobs.has(d.jobId)) await qmp.execute('job-dismiss', { id: d.jobId });
        await startStream(qmp, ctx, d, record.speedBytesPerSec);
      }
      this.saveRecord(record);
      return;
    }
    if (pending.every((d) => jobs.get(d.jobId)?.status === 'concluded')) await this.finalize(ctx, qmp, record, jobs);
    else if (pending.some((d) => jobs.get(d.jobId)?.status === 'running')) await this.ensureServer(record);
  }

  /**
   * Every byte is local: the jobs are dismissed, the NBD nodes deleted, the
   * backings dropped from the definition (the commit point), then the server
   * stopped and the record removed.
   */
  private async finalize(ctx: DomainContext, qmp: QmpClient, record: InstantRecord, jobs: Map<string, StreamJob>): Promise<void> {
    // The copied bytes must be on disk before the definition stops declaring
    // the backing: until a flush, QEMU keeps the overlays' qcow2 metadata in
    // memory, and a QEMU killed then would leave images that read zeroes
    // where the backup had data. A paused guest is finalized later.
    if (!(await flushByPause(qmp))) return;
    for (const d of record.disks) {
      if (jobs.has(d.jobId)) await qmp.execute('job-dismiss', { id: d.jobId });
    }
    for (const d of ctx.disks.filter((x) => x.nbdBacking !== undefined)) {
      await qmp.execute('blockdev-del', { 'node-name': nodeNamesFor(d.diskId).backing });
    }
    this.domains.setNbdBackings(ctx, new Map(record.disks.map((d) => [d.target, undefined])));
    await this.finishOffline(record, jobs);
  }

  private async finishOffline(record: InstantRecord, jobs = new Map<string, StreamJob>()): Promise<void> {
    if (record.server !== null) await stopBackupServer(record.server.pid, record.server.pidStart);
    const last: InstantRestoreInfo = { ...this.describe(record, jobs), state: 'completed', serverPid: null, endedMs: Date.now() };
    for (const d of last.disks) Object.assign(d, { status: 'completed', doneBytes: d.sizeBytes, totalBytes: d.sizeBytes });
    writeJsonAtomic(join(this.domains.domainDir(record.domain), LAST), last);
    this.removeRecord(record.domain);
    rmSync(dirname(record.socket), { recursive: true, force: true });
  }

  // ---- observe ------------------------------------------------------------------------

  /** The running instant restore of the domain with fresh progress; undefined when none runs. */
  async info(domain: string): Promise<InstantRestoreInfo | undefined> {
    return this.domains.withDomain(domain, 'domjobinfo', async (ctx) => {
      const record = this.loadRecord(domain);
      if (record === undefined) return undefined;
      const jobs = ctx.running ? await this.domains.withQmp(ctx, 'domjobinfo', queryStreamJobs) : new Map<string, StreamJob>();
      return this.describe(record, jobs);
    });
  }

  /** The last instant restore that completed on the domain. */
  lastResult(domain: string): InstantRestoreInfo | undefined {
    const file = join(this.domains.domainDir(domain), LAST);
    if (!existsSync(file)) return undefined;
    return JSON.parse(readFileSync(file, 'utf8')) as InstantRestoreInfo;
  }

  /** Polls (without holding the domain between polls) until every byte is local; returns the result. */
  async wait(domain: string, onProgress?: (info: InstantRestoreInfo) => void, pollMs = 500): Promise<InstantRestoreInfo> {
    for (;;) {
      const info = await this.info(domain);
      if (info === undefined) {
        const last = this.lastResult(domain);
        if (last === undefined) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" has no instant restore running or completed`);
        return last;
      }
      onProgress?.(info);
      await sleep(pollMs);
    }
  }

  private describe(record: InstantRecord, jobs: Map<string, StreamJob>): InstantRestoreInfo {
    const alive = record.server !== null && backupServerAlive(record.server.pid, record.server.pidStart);
    return {
      domain: record.domain, sourceDomain: record.sourceDomain, backup: record.backupId, repo: record.repo, socket: record.socket,
      state: 'streaming', serverPid: alive ? record.server?.pid ?? null : null, startedMs: record.startedMs,
      disks: record.disks.map((d) => {
        const j = jobs.get(d.jobId);
        const status = j === undefined ? 'waiting' : j.status === 'concluded' && j.error === undefined ? 'completed' : j.status;
        const info: InstantDiskInfo = { target: d.target, overlay: d.overlay, sizeBytes: d.sizeBytes, status, doneBytes: j?.done ?? 0, totalBytes: j?.total ?? d.sizeBytes };
        const error = j?.error ?? d.lastError;
        if (error !== undefined) info.error = error;
        return info;
      }),
    };
  }

  // ---- the record ----------------------------------------------------------------------

  loadRecord(domain: string): InstantRecord | undefined {
    const file = join(this.domains.domainDir(domain), RECORD);
    if (!existsSync(file)) return undefined;
    try {
      const r = JSON.parse(readFileSync(file, 'utf8')) as InstantRecord;
      if (r.version !== 1 || r.domain !== domain || !Array.isArray(r.disks)) throw new Error('unknown layout');
      return r;
    } catch (err) {
      throw new QbackupError('METADATA_INCONSISTENT', `The instant restore record of domain "${domain}" ("${file}") cannot be read: ${describeError(err)}`, { cause: err });
    }
  }

  private saveRecord(record: InstantRecord): void {
    makePrivateDir(this.domains.domainDir(record.domain));
    writeJsonAtomic(join(this.domains.domainDir(record.domain), RECORD), record);
  }

  private removeRecord(domain: string): void {
    rmSync(join(this.domains.domainDir(domain), RECORD), { force: true });
  }
}

// ---- holes ---------------------------------------------------------------------------------

/**
 * The byte ranges where a backed-up disk is all zeroes (its index names the
 * zero chunk there), merged. The overlays get these as qcow2 zero clusters
 * before the domain starts: reads there never reach the server, and the copy
 * skips them (the overlay has them), so a sparse disk moves only its data.
 */
export function zeroRanges(table: FullIndex): Array<{ offset: number; length: number }> {
  const out: Array<{ offset: number; length: number }> = [];
  const slots = table.ids.length / 32;
  for (let i = 0; i < slots; i++) {
    if (!table.ids.subarray(i * 32, i * 32 + 32).equals(ZERO_ID)) continue;
    const offset = i * table.chunkSize;
    const length = Math.min(table.chunkSize, table.virtualSize - offset);
    const last = out.at(-1);
    if (last !== undefined && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length });
  }
  return out;
}

/** Writes zero clusters (allocated in the overlay, so nothing below is read) over `ranges` of a new overlay. */
async function markZeroes(overlay: string, ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<void> {
  if (ranges.length === 0) return;
  const script = ranges.map((r) => `write -z ${r.offset} ${r.length}\n`).join('');
  const output = await new Promise<string>((resolvePromise, reject) => {
    const child = spawn('qemu-io', ['-f', 'qcow2', '--', overlay], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => out.push(b));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolvePromise(Buffer.concat(out).toString()) : reject(new Error(`qemu-io exited with status ${code ?? '?'}: ${Buffer.concat(out).toString().slice(-300)}`))));
    child.stdin.end(script);
  });
  const failed = output.split('\n').find((l) => /error|failed/i.test(l));
  if (failed !== undefined) throw new QbackupError('IMAGE_ERROR', `Cannot mark the holes of overlay "${overlay}": ${failed.trim()}`);
}

// ---- QMP steps -----------------------------------------------------------------------------

interface StreamJob {
  status: string;
  done: number;
  total: number;
  error?: string;
}

async function queryStreamJobs(qmp: QmpClient): Promise<Map<string, StreamJob>> {
  const jobs = (await qmp.execute('query-jobs')) as Array<{ id: string; type: string; status: string; 'current-progress': number; 'total-progress': number; error?: string }>;
  const out = new Map<string, StreamJob>();
  for (const j of jobs) {
    if (j.type !== 'stream' || !j.id.startsWith('instant-')) continue;
    const job: StreamJob = { status: j.status, done: j['current-progress'], total: j['total-progress'] };
    if (j.error !== undefined) job.error = j.error;
    out.set(j.id, job);
  }
  return out;
}

/**
 * Flushes every image of the domain by pausing the guest for a moment (QEMU
 * flushes all block nodes when it stops a running guest; QMP has no flush
 * command). False when the guest is not running: pausing a paused guest
 * flushes nothing.
 */
async function flushByPause(qmp: QmpClient): Promise<boolean> {
  const status = (await qmp.execute('query-status')) as { running: boolean };
  if (!status.running) return false;
  await qmp.execute('stop');
  await qmp.execute('cont');
  return true;
}

/** Starts copying the disk's backing into its overlay; the job stays until dismissed, so its outcome is never missed. */
async function startStream(qmp: QmpClient, ctx: DomainContext, d: InstantDiskRecord, speed: number): Promise<void> {
  const disk = ctx.disks.find((x) => x.target === d.target);
  if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${ctx.row.name}" has no disk "${d.target}" to restore into`);
  await qmp.execute('block-stream', {
    'job-id': d.jobId,
    device: nodeNamesFor(disk.diskId).format,
    'auto-dismiss': false,
    ...(speed > 0 ? { speed } : {}),
  });
}

/** Temporary file, fsync, rename: a reader sees the old record or the new one, whole. */
function writeJsonAtomic(file: string, value: unknown): void {
  const tmp = `${file}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeFileSync(fd, `${JSON.stringify(value, null, 2)}\n`);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
}
