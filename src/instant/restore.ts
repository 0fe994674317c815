// Instant restore: a domain runs from a backup at once, and the hypervisor
// moves the data into local images while it runs.
//
// How: a server process (./server.ts) exports the backup's disks over NBD
// (one unix socket, one read-only export per disk, named by the target);
// each disk becomes a new, empty qcow2 overlay whose *definition* declares
// the export as its backing (`<backingStore type='network'>`; the overlay's
// header names nothing, so no image chooses a host file); the domain is
// defined and started on the overlays, so guest reads fall through to the
// backup and guest writes stay in the overlays; then one copy job per disk
// (./copy.ts) copies every backing byte into its overlay. When all jobs have
// completed, the backings are dropped and the server stopped: the domain no
// longer needs the backup.
//
// This module talks to the hypervisor through the driver interface
// (src/drivers/driver.ts) only, and keeps its own record in the state
// database (src/store/instant.ts).
//
// Invariants:
// - The restore's record names the repository, the backup id and each
//   disk's size before the domain exists, and is removed only once the
//   definition has no NBD backing left. A server is only ever (re)started for
//   that backup id, and its announced exports must have exactly the recorded
//   sizes, so the guest never reads another backup's data.
// - Everything after the start is settled by whichever command comes next on
//   the domain (the onOpen hook): a finished copy is finalized, a server that
//   died is restarted on the same socket (QEMU's NBD client reconnects on its
//   own), a copy job that failed or is missing is started again (data
//   already copied stays; copying skips it). A start of the domain brings the
//   server up first (beforeStart) and the copies after (afterStart).

import { randomUUID } from 'node:crypto';
import { existsSync, lstatSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { COPY_JOB_PREFIX, type CopyJob, type DomainSession, type HypervisorDriver } from '../drivers/driver.js';
import { describeError, QbackupError } from '../errors.js';
import { formatDomainXml, parseDomainXml } from '../model/definition-xml.js';
import type { DiskDefinition, DomainDefinition } from '../model/definition.js';
import { isRemoteRepo } from '../repository/backend/open.js';
import type { S3Settings } from '../repository/backend/s3.js';
import { ZERO_ID } from '../repository/chunk.js';
import type { FullIndex } from '../repository/disk-index.js';
import type { Manifest } from '../repository/manifest.js';
import type { RepoAccess, RepositoryService } from '../repository/repository.js';
import type { Db } from '../store/db.js';
import { InstantStore } from '../store/instant.js';
import { noCredentials, type Credentials } from '../util/credentials.js';
import { throwIfCancelled, type OperationOptions } from '../util/operation.js';
import { refusePseudoFilesystem } from '../util/safe-create.js';
import { makePrivateDir } from '../util/private-dir.js';
import { processStartTime, sleep } from '../util/proc.js';
import { socketAccepts } from '../util/socket.js';
import { assertDomainName } from '../domain/names.js';
import { definitionForRestore } from '../repository/define-xml.js';
import { attr, childElements, firstChild, parseXmlDocument } from '../util/xml.js';
import { settleCopies } from './copy.js';
import { noFaults, type Faults } from '../util/faults.js';
import { backupServerAlive, signalBackupServer, startBackupServer, stopBackupServer, type BackupServerProcess } from './server.js';

export type { Credentials } from '../util/credentials.js';

export interface InstantRestoreOptions extends OperationOptions {
  /** Name of the new domain; default: the backed-up domain's name. */
  as?: string | undefined;
  /** Directory for the overlays (<target>.qcow2); default STATE_DIR/images/NAME. */
  to?: string | undefined;
  /** Copy rate cap per disk, bytes per second (QEMU's block-stream `speed`); default unlimited. */
  speedBytesPerSec?: number | undefined;
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
  /** The hypervisor connection (URI) of the domain; absent in records made before restores named theirs. */
  connection?: string | undefined;
  /** The process beginning the restore, until the domain is defined: a record whose owner died before that is an orphan. */
  owner?: { pid: number; pidStart: string } | undefined;
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
  /** The hypervisor connection (URI) of the domain. */
  connection: string;
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

export function jobIdFor(target: string): string {
  return `${COPY_JOB_PREFIX}${target}`;
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

/** The plan begin() carries out: the definition as XML, the disks, what the backup lacks. */
interface BeginPlan {
  xml: string;
  disks: InstantDiskRecord[];
  dropped: string[];
}

/** Through qbackup's own domain model (the QEMU driver). */
function planModelRestore(m: Manifest, o: { name: string; overlayDir: string; socket: string; domains: ReadonlyArray<{ uuid: string }> }): BeginPlan {
  const uuidTaken = o.domains.some((d) => d.uuid === parseDomainXml(m.domainXml).uuid);
  const plan = planInstantRestore(m, { name: o.name, overlayDir: o.overlayDir, socket: o.socket, uuidTaken });
  return { xml: formatDomainXml(plan.definition), disks: plan.disks, dropped: plan.dropped };
}

/**
 * For a hypervisor that takes libvirt's whole schema: the backup's saved XML
 * edited as `restore --define` does (new name, no UUID so the hypervisor
 * makes one, no MACs), each backed-up disk an overlay declaring the export
 * of its target as backing; disks the backup does not hold are left out.
 */
export function planSavedXmlRestore(m: Manifest, o: { name: string; overlayDir: string; socket: string }): BeginPlan {
  const saved = savedDisks(m.domainXml);
  const disks: InstantDiskRecord[] = [];
  for (const d of m.disks) {
    if (!saved.includes(d.target)) continue;
    disks.push({ target: d.target, sizeBytes: d.virtualSize, overlay: join(o.overlayDir, `${d.target}.qcow2`), jobId: jobIdFor(d.target) });
  }
  const xml = definitionForRestore(
    m.domainXml,
    o.name,
    disks.map((d) => ({ target: d.target, file: d.overlay, format: 'qcow2' as const, nbdBacking: { socket: o.socket, exportName: d.target } })),
  );
  return { xml, disks, dropped: saved.filter((t) => !disks.some((d) => d.target === t)) };
}

/** The targets of the saved definition's disks (device='disk'). */
function savedDisks(xml: string): string[] {
  const root = parseXmlDocument(xml, 'the saved definition of the backup', 'domain');
  return childElements(firstChild(root, 'devices') ?? root, 'disk').flatMap((d) => {
    const target = firstChild(d, 'target');
    const dev = target === undefined ? undefined : attr(target, 'dev');
    return dev !== undefined && (attr(d, 'device') ?? 'disk') === 'disk' ? [dev] : [];
  });
}

export interface InstantServiceOptions {
  /** The state directory: the server's socket is in STATE_DIR/domains/NAME/nbd, overlays default to STATE_DIR/images/NAME. */
  stateDir: string;
  /** The program that serves the backup (argv prefix); default: this qbackup's serve-backup. */
  serverCommand?: readonly string[] | undefined;
  serverTimeoutMs?: number | undefined;
  s3?: S3Settings | undefined;
  /** Passphrases and the server's environment, from the caller. */
  credentials?: Credentials | undefined;
  /** Test-only fault injection (src/util/faults.ts) at the steps of begin. */
  faults?: Faults | undefined;
}

export class InstantRestoreService {
  private readonly store: InstantStore;
  private readonly credentials: Credentials;
  /** The passphrase of the repository an instant restore is beginning from, while its domain starts. */
  private startPassword: string | undefined;

  constructor(
    readonly driver: HypervisorDriver,
    readonly repository: RepositoryService,
    db: Db,
    readonly options: InstantServiceOptions,
  ) {
    this.store = new InstantStore(db);
    this.credentials = options.credentials ?? noCredentials;
    driver.setLifecycleHooks({
      onOpen: (s) => this.onOpen(s),
      beforeStart: (s) => this.beforeStart(s),
      afterStart: (s) => this.afterStart(s),
      beforeUndefine: (s) => this.beforeUndefine(s),
    });
  }

  private fault(point: string): void {
    (this.options.faults ?? noFaults).at(point);
  }

  private domainDir(name: string): string {
    return join(this.options.stateDir, 'domains', name);
  }

  // ---- begin -----------------------------------------------------------------

  /**
   * Instant restore (docs/design.md): the domain (or a new one, `as`) runs at
   * once from the backup served over NBD, while the hypervisor copies the
   * data into new local overlays. Returns as soon as the domain runs; `wait`
   * follows the copy, which any later command on the domain finalizes.
   */
  async restore(domain: string, options: RepoAccess & InstantRestoreOptions & { backup?: string | undefined; until?: Date | undefined }): Promise<InstantRestoreInfo> {
    const { store, manifest: m } = await this.repository.findBackup(domain, options);
    const holes = new Map<string, Array<{ offset: number; length: number }>>();
    for (const d of m.disks) holes.set(d.target, zeroRanges(await store.resolveIndex(d.index)));
    return this.begin(m, { repo: options.repo, encrypted: store.config.encrypted, password: options.password }, options, holes);
  }

  /**
   * Serves backup `m`, creates the overlays, defines and starts the domain on
   * them, and has the copies start. Returns as soon as the domain runs.
   */
  async begin(
    m: Manifest,
    access: { repo: string; password?: string | undefined; encrypted: boolean },
    options: InstantRestoreOptions,
    holes: ReadonlyMap<string, ReadonlyArray<{ offset: number; length: number }>> = new Map(),
  ): Promise<InstantRestoreInfo> {
    const name = options.as ?? m.domain;
    assertDomainName(name);
    const { overlayDir, socket, plan } = await this.planBegin(m, name, options.to);
    if (plan.disks.length === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore backup "${m.id}" of domain "${m.domain}" instantly: it holds no disk of its definition`);
    // What a begin killed earlier under this name left (its server, its overlays) goes first.
    await this.reapOrphan(name);
    for (const d of plan.disks) {
      refusePseudoFilesystem(d.overlay, `Cannot restore disk "${d.target}" of backup "${m.id}" instantly`);
      if (lstatSync(d.overlay, { throwIfNoEntry: false }) !== undefined) throw new QbackupError('INVALID_ARGUMENT', `Cannot restore disk "${d.target}" of backup "${m.id}" instantly: "${d.overlay}" exists`);
    }
    throwIfCancelled(options.signal, `The instant restore of backup "${m.id}"`);
    await this.prepareDir(overlayDir, 'overlays');
    await this.prepareDir(dirname(socket), 'socket');
    const record: InstantRecord = {
      version: 1, domain: name, repo: isRemoteRepo(access.repo) ? access.repo : resolve(access.repo), encrypted: access.encrypted, sourceDomain: m.domain, backupId: m.id,
      socket, disks: plan.disks, speedBytesPerSec: options.speedBytesPerSec ?? 0, server: null, startedMs: Date.now(), connection: this.driver.uri,
      owner: { pid: process.pid, pidStart: processStartTime(process.pid) ?? '' },
    };
    this.saveRecord(record);
    this.fault('instant-restore:after-record');
    let defined = false;
    // The start serves the backup (beforeStart), with this command's passphrase.
    this.startPassword = access.password;
    try {
      for (const d of plan.disks) {
        throwIfCancelled(options.signal, `The instant restore of backup "${m.id}"`);
        await this.driver.createOverlay(d.overlay, d.sizeBytes, holes.get(d.target) ?? []);
      }
      this.fault('instant-restore:after-overlays');
      await this.driver.defineDomain(plan.xml);
      defined = true;
      this.fault('instant-restore:after-define');
      // From here the domain owns the record: its commands settle it.
      const owned = this.loadRecord(name) ?? record;
      delete owned.owner;
      this.saveRecord(owned);
      options.logger?.log({ level: 'info', msg: 'serving the backup and starting the domain', fields: { domain: name, backup: m.id } });
      options.onProgress?.({ phase: 'serving the backup and starting the domain', doneBytes: 0, totalBytes: 0 });
      await this.driver.startDomain(name);
      this.fault('instant-restore:after-start');
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

  /** Where the overlays and the socket go (the driver knows what its QEMU reaches), and the new domain's definition. */
  private async planBegin(m: Manifest, name: string, to: string | undefined) {
    const domains = await this.driver.listDomains();
    this.refuseClash(name, m, domains);
    const defaults = { overlayDir: join(this.options.stateDir, 'images', name), socket: join(this.domainDir(name), 'nbd', 'backup.sock') };
    const placement = (await this.driver.instantPlacement?.(name, defaults)) ?? defaults;
    const overlayDir = resolve(to ?? placement.overlayDir);
    const socket = placement.socket;
    const plan = this.driver.newDefinitions === 'saved-xml' ? planSavedXmlRestore(m, { name, overlayDir, socket }) : planModelRestore(m, { name, overlayDir, socket, domains });
    return { overlayDir, socket, plan };
  }

  private refuseClash(name: string, m: Manifest, domains: ReadonlyArray<{ name: string; state: string }>): void {
    const existing = domains.find((d) => d.name === name);
    if (existing === undefined) return;
    const hint = name === m.domain ? '; give the restored domain another name with --as, or undefine the existing one first' : '; choose another name with --as';
    throw new QbackupError('DOMAIN_EXISTS', `Cannot restore backup "${m.id}" instantly as domain "${name}": a domain of that name exists (${existing.state})${hint}`);
  }

  /** Removes what a failed begin made: the domain (if defined), the server, the overlays, the record. */
  private async undoBegin(record: InstantRecord, defined: boolean): Promise<void> {
    if (defined) {
      await this.driver.undefineDomain(record.domain).catch(() => undefined);
    }
    const current = this.loadRecord(record.domain) ?? record;
    if (current.server !== null) await stopBackupServer(current.server.pid, current.server.pidStart);
    for (const d of record.disks) rmSync(d.overlay, { force: true });
    this.store.forget(record.domain);
    rmSync(dirname(record.socket), { recursive: true, force: true });
  }

  // ---- the server --------------------------------------------------------------

  /**
   * Makes sure the recorded backup is served on the recorded socket: a live
   * server is kept, a dead one restarted. The exports must be the recorded
   * disks with the recorded sizes, or the server is stopped and nothing is used.
   */
  private async ensureServer(record: InstantRecord): Promise<void> {
    if (record.server !== null && backupServerAlive(record.server.pid, record.server.pidStart)) return;
    const pass = this.startPassword ?? this.credentials.repositoryPassword(record.repo);
    if (record.encrypted && pass === undefined) {
      throw new QbackupError(
        'BACKUP_SERVER',
        `The server of backup "${record.backupId}" for domain "${record.domain}" is not running and the repository is encrypted: run the command again with the passphrase in QBACKUP_PASSWORD (or --password-file) to restart it`,
      );
    }
    const dir = dirname(record.socket);
    await this.prepareDir(dir, 'socket');
    let server: BackupServerProcess;
    try {
      server = await startBackupServer({
        repo: record.repo, domain: record.sourceDomain, backupId: record.backupId, disks: record.disks.map((d) => d.target), socket: record.socket,
        outFile: join(dir, 'server.out'), logFile: join(dir, 'server.log'), stateDir: this.options.stateDir,
        password: pass, command: this.options.serverCommand, s3: this.options.s3, timeoutMs: this.options.serverTimeoutMs,
        environment: this.credentials.helperEnvironment(),
        onSpawn: (spawned) => {
          record.server = spawned;
          this.saveRecord(record);
          this.fault('instant-restore:after-spawn');
        },
      });
    } catch (err) {
      // startBackupServer stopped what it spawned; the record must not keep naming it.
      record.server = null;
      this.saveRecord(record);
      throw new QbackupError('BACKUP_SERVER', `Cannot serve backup "${record.backupId}" to domain "${record.domain}": ${describeError(err)}`, { cause: err });
    }
    for (const d of record.disks) {
      const size = server.exports.get(d.target);
      if (size !== d.sizeBytes) {
        await stopBackupServer(server.pid, server.pidStart);
        record.server = null;
        this.saveRecord(record);
        throw new QbackupError('BACKUP_SERVER', `The server of backup "${record.backupId}" exports disk "${d.target}" with ${size ?? 'no'} bytes, but the restore of domain "${record.domain}" recorded ${d.sizeBytes}; it was stopped`);
      }
    }
    record.server = { pid: server.pid, pidStart: server.pidStart };
    this.saveRecord(record);
    // The hypervisor's QEMU may run as another user (libvirt's qemu:///system): it must be able to connect.
    await this.driver.shareSocket?.(record.socket);
    this.fault('instant-restore:after-server');
  }

  /** A directory of the restore (overlays, socket) that the hypervisor's QEMU reaches: the driver knows who that is. */
  private async prepareDir(dir: string, holds: 'overlays' | 'socket'): Promise<void> {
    if (this.driver.prepareInstantDir !== undefined) await this.driver.prepareInstantDir(dir, holds);
    else makePrivateDir(dir);
  }

  // ---- lifecycle hooks (installed on the driver) -----------------------------------

  /** Before the domain starts: a disk declaring an NBD backing needs its server. */
  private async beforeStart(s: DomainSession): Promise<void> {
    const backed = s.disks.filter((d) => d.nbdBacking !== undefined);
    if (backed.length === 0) return;
    const record = this.loadRecord(s.domain);
    if (record !== undefined) {
      await this.ensureServer(record);
      return;
    }
    // Not ours: the user serves it, or the start is refused.
    for (const d of backed) {
      if (await socketAccepts(d.nbdBacking?.socket ?? '')) continue;
      throw new QbackupError(
        'BACKUP_SERVER',
        `Cannot start domain "${s.domain}": disk "${d.target}" is backed by NBD export "${d.nbdBacking?.exportName ?? ''}" on "${d.nbdBacking?.socket ?? ''}", where nothing serves and no instant restore of qbackup is recorded; serve it there or define the disk without that <backingStore>`,
      );
    }
  }

  /** After the domain started: the copy jobs run or are restarted. */
  private async afterStart(s: DomainSession): Promise<void> {
    const record = this.loadRecord(s.domain);
    if (record === undefined) return;
    await this.settle(s, record);
  }

  /** On every command's open: finalize a finished copy, bring back a dead server or job. */
  private async onOpen(s: DomainSession): Promise<void> {
    const record = this.loadRecord(s.domain);
    if (record === undefined) return;
    if (!s.disks.some((d) => d.nbdBacking !== undefined)) {
      // The definition was already finalized; only the server and the record remain.
      await this.finish(record);
      return;
    }
    if (!s.running) {
      // Nothing reads the backup now; a served backup holds off gc's repacking. A start serves it again (beforeStart).
      if (record.server !== null) {
        await stopBackupServer(record.server.pid, record.server.pidStart);
        record.server = null;
        this.saveRecord(record);
      }
      return;
    }
    // A dead server first: until it is back, QEMU's monitor may not answer
    // (its NBD client holds requests for the reconnect delay).
    await this.ensureServer(record);
    await this.settle(s, record);
  }

  /** Undefine: the server goes, and the record and last result with the domain. */
  private beforeUndefine(s: DomainSession): void {
    const record = this.loadRecord(s.domain);
    if (record?.server != null) signalBackupServer(record.server.pid, record.server.pidStart);
    this.store.forget(s.domain);
  }

  private async settle(s: DomainSession, record: InstantRecord): Promise<void> {
    const outcome = await settleCopies(s, record, () => this.ensureServer(record));
    if (outcome.changed) this.saveRecord(record);
    if (outcome.finalized !== undefined) await this.finish(record, outcome.finalized);
  }

  /** Every byte is local and the definition says so: the server stops, the result is kept, the record goes. */
  private async finish(record: InstantRecord, jobs = new Map<string, CopyJob>()): Promise<void> {
    if (record.server !== null) await stopBackupServer(record.server.pid, record.server.pidStart);
    const last: InstantRestoreInfo = { ...this.describe(record, jobs), state: 'completed', serverPid: null, endedMs: Date.now() };
    for (const d of last.disks) Object.assign(d, { status: 'completed', doneBytes: d.sizeBytes, totalBytes: d.sizeBytes });
    this.store.finish(record.domain, JSON.stringify(last));
    rmSync(dirname(record.socket), { recursive: true, force: true });
  }

  // ---- orphans -------------------------------------------------------------------

  /**
   * Stops what an instant restore left when the process beginning it died
   * before its domain was defined (no command on a domain would ever settle
   * it): its server (whose lease would keep gc from freeing space), its socket
   * directory and its record. A record whose domain exists is the domain's,
   * settled by its next command; one whose owner still runs is left alone.
   */
  async reapOrphan(domain: string): Promise<boolean> {
    const record = this.loadRecord(domain);
    if (record === undefined) return false;
    if (record.owner === undefined || backupServerAlive(record.owner.pid, record.owner.pidStart)) return false;
    if ((await this.driver.listDomains()).some((d) => d.name === domain)) return false;
    if (record.server !== null) await stopBackupServer(record.server.pid, record.server.pidStart);
    // The overlays it made: new, empty files no domain ever ran on (the record is saved before they are created, each at a path that did not exist).
    for (const d of record.disks) rmSync(d.overlay, { force: true });
    this.store.forget(domain);
    rmSync(dirname(record.socket), { recursive: true, force: true });
    return true;
  }

  /**
   * Settles every recorded restore as the next command on its domain would
   * (the daemon runs this when it starts): a finished copy is finalized, a
   * dead server or copy brought back. Returns the failures, by domain; a
   * domain this driver does not know is left for its own connection.
   */
  async settleAll(): Promise<Map<string, unknown>> {
    const failures = new Map<string, unknown>();
    for (const domain of this.connectionDomains()) {
      try {
        await this.info(domain);
      } catch (err) {
        failures.set(domain, err);
      }
    }
    return failures;
  }

  /** The domains with a restore record of this driver's connection (a record that names none may be of any). */
  private connectionDomains(): string[] {
    return this.store.domains().filter((d) => {
      let c: string | undefined;
      try {
        c = this.loadRecord(d)?.connection;
      } catch {
        return true; // a damaged record: settling it reports the damage
      }
      return c === undefined || c === this.driver.uri;
    });
  }

  /** Every orphaned restore (the daemon runs this when it starts); returns the domains reaped. */
  async reapOrphans(): Promise<string[]> {
    const reaped: string[] = [];
    for (const domain of this.connectionDomains()) if (await this.reapOrphan(domain)) reaped.push(domain);
    return reaped;
  }

  // ---- observe ------------------------------------------------------------------------

  /** The running instant restore of the domain with fresh progress; undefined when none runs. */
  async info(domain: string): Promise<InstantRestoreInfo | undefined> {
    return this.driver.withSession(domain, 'domjobinfo', async (s) => {
      const record = this.loadRecord(domain);
      if (record === undefined) return undefined;
      const jobs = s.running ? await s.copyJobs() : new Map<string, CopyJob>();
      return this.describe(record, jobs);
    });
  }

  /** The last instant restore that completed on the domain. */
  lastResult(domain: string): InstantRestoreInfo | undefined {
    const text = this.store.result(domain);
    return text === undefined ? undefined : (JSON.parse(text) as InstantRestoreInfo);
  }

  /**
   * Polls (without holding the domain between polls) until every byte is
   * local; returns the result. Progress is the bytes copied of all disks; an
   * aborted signal stops the wait (the copy goes on).
   */
  async wait(domain: string, options: OperationOptions & { onInfo?: ((info: InstantRestoreInfo) => void) | undefined; pollMs?: number | undefined } = {}): Promise<InstantRestoreInfo> {
    for (;;) {
      throwIfCancelled(options.signal, `Waiting for the instant restore of domain "${domain}"`);
      const info = await this.info(domain);
      if (info === undefined) {
        const last = this.lastResult(domain);
        if (last === undefined) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" has no instant restore running or completed`);
        return last;
      }
      options.onInfo?.(info);
      options.onProgress?.({ phase: `instant restore ${domain}`, doneBytes: sum(info.disks.map((d) => d.doneBytes)), totalBytes: sum(info.disks.map((d) => d.totalBytes)) });
      // A domain that stopped (shut down, or its QEMU died) copies nothing until it starts again: waiting would never end.
      const state = (await this.driver.describeDomain(domain)).state;
      if (state !== 'running') {
        const start = this.driver.uri === 'qbackup:///' ? `qbackup start ${domain}` : `qbackup start ${domain} --connect ${this.driver.uri}`;
        throw new QbackupError('DOMAIN_NOT_RUNNING', `Domain "${domain}" is ${state} before its data was copied in from backup "${info.backup}"; start it (${start}) and the copy goes on`);
      }
      await sleep(options.pollMs ?? 500);
    }
  }

  private describe(record: InstantRecord, jobs: Map<string, CopyJob>): InstantRestoreInfo {
    const alive = record.server !== null && backupServerAlive(record.server.pid, record.server.pidStart);
    return {
      domain: record.domain, sourceDomain: record.sourceDomain, backup: record.backupId, repo: record.repo, socket: record.socket,
      state: 'streaming', connection: record.connection ?? this.driver.uri, serverPid: alive ? record.server?.pid ?? null : null, startedMs: record.startedMs,
      disks: record.disks.map((d) => {
        const j = jobs.get(d.jobId);
        const status = j === undefined ? 'waiting' : j.status === 'concluded' && j.error === undefined ? 'completed' : j.status;
        // A completed copy the hypervisor no longer reports copied the whole disk.
        const done = status === 'completed' ? d.sizeBytes : 0;
        const info: InstantDiskInfo = { target: d.target, overlay: d.overlay, sizeBytes: d.sizeBytes, status, doneBytes: j?.doneBytes ?? done, totalBytes: j?.totalBytes ?? d.sizeBytes };
        const error = j?.error ?? d.lastError;
        if (error !== undefined) info.error = error;
        return info;
      }),
    };
  }

  // ---- the record ----------------------------------------------------------------------

  /** The running restore's record; one left as a JSON file by an older qbackup is taken into the database. */
  loadRecord(domain: string): InstantRecord | undefined {
    const legacy = join(this.domainDir(domain), 'instant-restore.json');
    let text = this.store.record(domain);
    if (text === undefined && existsSync(legacy)) {
      text = readFileSync(legacy, 'utf8');
      this.store.saveRecord(domain, text);
      rmSync(legacy, { force: true });
    }
    if (text === undefined) return undefined;
    try {
      const r = JSON.parse(text) as InstantRecord;
      if (r.version !== 1 || r.domain !== domain || !Array.isArray(r.disks)) throw new Error('unknown layout');
      return r;
    } catch (err) {
      throw new QbackupError('METADATA_INCONSISTENT', `The instant restore record of domain "${domain}" cannot be read: ${describeError(err)}`, { cause: err });
    }
  }

  private saveRecord(record: InstantRecord): void {
    this.store.saveRecord(record.domain, JSON.stringify(record));
  }
}

function sum(values: readonly number[]): number {
  return values.reduce((a, b) => a + b, 0);
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

