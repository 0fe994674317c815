// One-command backups of a domain into a format 2 repository. Per disk:
// incremental since the checkpoint of the disk's last backup in this
// repository when the coverage rules allow it, else full with the reason.
// The data always comes through a pull-mode job (a frozen view exported over
// NBD, with the dirty bitmap as a meta context), read by our NBD client into
// the chunk store; the manifest is written last. When the driver finds that
// no disk changed since its parent's checkpoint, it makes the checkpoint
// alone and the backup writes empty deltas (unchanged-disk.ts).
//
// Invariants:
// - Coverage is decided before the job starts and the job runs strict, so an
//   incremental never silently becomes a copy of the whole disk. A disk the
//   hypervisor itself refuses incrementally when the job begins (libvirt: a
//   checkpoint bitmap missing or broken in QEMU) is read full, and its
//   manifest entry says why in the hypervisor's words.
// - A backup that fails or is killed leaves no manifest: at most packs and
//   indexes nobody references (gc removes them), and its checkpoint is merged
//   away (now, or by the next backup of the domain).
// - A disk whose size changed since its last backup gets a full backup.
// - A backup's parent is a backup of the same domain: the same domain UUID
//   (libvirt's, or our own driver's), not only the same name. Another domain
//   defined under the name (or the same name on another connection) starts
//   with fulls whose reason names the other UUID, whatever checkpoints and
//   bitmaps it may have been given.
// - The exports are read over a private unix socket (plain: only this user
//   can reach it), or, when asked, over TCP and then always with TLS: QEMU
//   serves with the server half of the certificate directory, our client
//   reads with the client half. Both halves are checked before the domain
//   is touched.

import type { DriverDisk, DriverDomain, ExportServer, HypervisorDriver, PullBackup, QuiesceMode } from '../drivers/driver.js';
import { QbackupError, describeError, isQbackupError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { NBD_CONTEXT_BASE_ALLOCATION } from '../nbd/constants.js';
import { formatNbdUri } from '../nbd/uri.js';
import type { Progress } from '../util/operation.js';
import { noFaults, type Faults } from '../util/faults.js';
import { assert } from '../util/assert.js';
import { checkServerCredentials, readClientCredentials, type TlsClientCredentials } from '../util/pki.js';
import { condemnedPacks } from './gc.js';
import { acquireLock, type HeldLock } from './locks.js';
import { newBackupId, type Manifest, type ManifestDisk } from './manifest.js';
import { ChunkPool } from './pool.js';
import { readDisk } from './read-disk.js';
import type { Store } from './store.js';
import { unchangedDisk } from './unchanged-disk.js';

export type { Progress } from '../util/operation.js';

export interface RepoBackupOptions {
  /** Full backups of every disk, whatever the coverage. */
  full?: boolean | undefined;
  /** Only these disks (default: every writable disk). */
  disks?: string[] | undefined;
  /** Worker threads that hash and compress (default 2); a disk with little to read (an incremental of a few dirty MiB) is done on the main thread without starting them. */
  workers?: number | undefined;
  /**
   * Freeze the guest's filesystems through its agent for the backup's
   * instant: required, or optional (the backup is then crash-consistent when
   * the agent is missing). The manifest's `consistency` says which it was.
   */
  quiesce?: QuiesceMode | undefined;
  onProgress?: ((p: Progress) => void) | undefined;
  /** Serve the exports on this TCP address, with TLS, instead of a private unix socket (e.g. to read them through a network). */
  tcp?: { host: string; port: number } | undefined;
  /**
   * With `tcp`: the certificate directory holding the server's files (for
   * QEMU) and the client's (for the reader); default: the backup service's.
   */
  tlsCertDir?: string | undefined;
  /** Stops the backup between reads (it then fails, is cleaned up like any failed backup, and lists nothing). */
  signal?: AbortSignal | undefined;
}

/** What one disk's backup will be. */
interface DiskPlan {
  disk: DriverDisk;
  level: 'full' | 'incremental';
  fullReason: string | null;
  /** The previous backup of this disk here (incremental only). */
  parent?: { manifest: Manifest; disk: ManifestDisk };
}

/** Backs up `domain` into `store`; returns the manifest written. */
export async function backupDomain(driver: HypervisorDriver, store: Store, domain: string, options: RepoBackupOptions = {}, faults: Faults = noFaults): Promise<Manifest> {
  store.assertConfigIntact(`back up domain "${domain}" into repository "${store.location}"`);
  const selected = selectDisks(await driver.disks(domain), domain, options.disks);
  const tls = tlsFor(driver, domain, options);
  // A gc that is running is waited for (locks.ts); the wait shows as a phase of the progress.
  await using lock = await acquireLock(store.backend, 'backup', domain, { signal: options.signal, onWait: () => options.onProgress?.({ phase: 'waiting for a gc to end', doneBytes: 0, totalBytes: 0 }) });
  // A shut-off domain is backed up by the driver itself when it can (libvirt:
  // without starting it); else it is started with its CPUs stopped: QEMU
  // opens the images with their bitmaps, no guest code runs, and it is shut
  // down cleanly after.
  const described = await driver.describeDomain(domain);
  const shutOff = described.state !== 'running';
  if (shutOff && options.quiesce === 'required') {
    throw new QbackupError('GUEST_AGENT', `Cannot quiesce domain "${domain}": it is not running`);
  }
  const startedHere = shutOff && driver.backsUpShutOffDomains !== true;
  if (startedHere) await driver.startDomain(domain, { paused: true });
  let manifest: Manifest;
  try {
    manifest = await backupRunning(driver, store, described, selected, { ...options, ...tls, faults }, shutOff, lock);
  } catch (err) {
    if (startedHere) {
      await driver.shutdownDomain(domain).catch((stopErr: unknown) => {
        throw new QbackupError('BACKUP_FAILED', `${describeError(err)} (and shutting domain "${domain}" down again failed: ${describeError(stopErr)})`, { cause: err });
      });
    }
    throw err;
  }
  if (startedHere) {
    await driver.shutdownDomain(domain).catch((stopErr: unknown) => {
      throw new QbackupError('DOMAIN_RUNNING', `Backup "${manifest.id}" of domain "${domain}" is complete, but shutting the domain down again failed: ${describeError(stopErr)}`, { cause: stopErr });
    });
  }
  return manifest;
}

/** Over TCP: both halves of the certificate directory, checked now; the client's credentials for the reader. */
function tlsFor(driver: HypervisorDriver, domain: string, options: RepoBackupOptions): { clientTls?: TlsClientCredentials; tlsCertDir?: string } {
  if (options.tcp === undefined) {
    if (options.tlsCertDir !== undefined) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": a TLS certificate directory was given, but the exports are read over a unix socket (give a TCP address too)`);
    return {};
  }
  const what = `Cannot back up domain "${domain}" over TCP with TLS`;
  const dir = options.tlsCertDir ?? driver.defaultTlsCertDir;
  if (dir === undefined) throw new QbackupError('TLS_CREDENTIALS', `${what}: no certificate directory was given`);
  const tlsCertDir = checkServerCredentials(dir, what);
  return { clientTls: readClientCredentials(tlsCertDir, what), tlsCertDir };
}

function selectDisks(all: readonly DriverDisk[], domain: string, targets: readonly string[] | undefined): DriverDisk[] {
  for (const t of targets ?? []) {
    if (!all.some((d) => d.target === t)) throw new QbackupError('DISK_NOT_FOUND', `Domain "${domain}" has no disk "${t}"`);
  }
  const selected = all.filter((d) => (targets === undefined || targets.length === 0 ? !d.readonly : targets.includes(d.target)));
  if (selected.length === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": no disk selected`);
  return selected;
}

/** The options once TLS credentials are read. */
type RunOptions = RepoBackupOptions & { clientTls?: TlsClientCredentials; faults: Faults };

// Long: one backup's steps in order (plan, job, reads, manifest, end), with the cleanup of a failure around them.
async function backupRunning(driver: HypervisorDriver, store: Store, identity: DriverDomain, selected: readonly DriverDisk[], options: RunOptions, shutOff: boolean, lock: HeldLock): Promise<Manifest> {
  const domain = identity.name;
  const id = newBackupId();
  const checkpoint = `qb-${id}`;
  // A damaged manifest never stops a new backup: the newest readable one is the parent.
  const history = (await store.readableManifests(domain)).manifests;
  const plans: DiskPlan[] = [];
  const checkpoints = new Set(await driver.checkpoints(domain));
  for (const disk of selected) plans.push(await planDisk(driver, checkpoints, identity, history, disk, options));
  await store.loadChunks(await condemnedPacks(store.backend));
  const startedMs = Date.now();
  const pool = new ChunkPool(store, options.workers ?? 2);
  let job: PullBackup | undefined;
  let manifest: Manifest;
  try {
    // A domain that was shut off runs no agent (started here paused, or not at all): its disks are as it left them.
    job = await driver.beginPullBackup(domain, {
      checkpoint,
      disks: plans.map((p) => ({ target: p.disk.target, since: p.parent?.manifest.checkpoint })),
      quiesce: shutOff ? undefined : options.quiesce,
      tcp: options.tcp,
      tlsCertDir: options.tlsCertDir,
      // A disk with nothing dirty comes without an export: an empty delta (readJobDisk).
      skipUnchanged: true,
    });
    // The reads stop when the caller cancels, or when the driver lost what keeps the job valid (libvirt's connection).
    const signal = anySignal(options.signal, job.signal);
    const disks: ManifestDisk[] = [];
    for (const plan of plans) disks.push(await readJobDisk(store, pool, job, plan, { ...options, signal }));
    // Everything read is only worth a manifest if the job is still the one begun.
    await driver.confirmBackup?.(domain, job.id);
    manifest = {
      format: 2,
      id,
      domain,
      uuid: identity.uuid, // the identity the plan was made for (the parents are backups of it)
      connection: driver.uri,
      time: new Date(startedMs).toISOString(),
      endTime: new Date().toISOString(),
      checkpoint,
      consistency: job.consistency,
      domainXml: await driver.domainXml(domain),
      disks,
    };
    // A gc on another host may have judged this backup dead and deleted what it references.
    await lock.assertHeld();
    await store.putManifest(manifest);
  } catch (err) {
    throw await cleanUpFailed(driver, domain, job, checkpoint, err);
  } finally {
    await pool.close();
  }
  // The pull job's normal end. Were this process killed just before, the next
  // command would end the job as failed and merge the checkpoint away: the next
  // backup is then full, never wrong.
  const ended = job;
  await driver.endBackup(domain, ended.id).catch((err: unknown) => {
    throw new QbackupError('BACKUP_FAILED', `Backup "${id}" of domain "${domain}" is complete, but ending its backup job failed: ${describeError(err)}`, { cause: err });
  });
  if (driver.keepsLatestCheckpointOnly) await dropEarlierCheckpoints(driver, domain, history, checkpoint);
  return manifest;
}

/**
 * One checkpoint per repository: the checkpoints of this repository's
 * earlier backups of the domain that the hypervisor still has are deleted
 * (libvirt merges their bitmaps). Never one the repository did not record.
 * A deletion that fails is retried after the next backup.
 */
async function dropEarlierCheckpoints(driver: HypervisorDriver, domain: string, history: readonly Manifest[], keep: string): Promise<void> {
  const existing = new Set(await driver.checkpoints(domain).catch(() => []));
  for (const name of new Set(history.map((m) => m.checkpoint))) {
    if (name === keep || !existing.has(name)) continue;
    await driver.deleteCheckpoint(domain, name).catch(() => undefined);
  }
}

/**
 * Full or incremental for one disk: incremental since the disk's last backup
 * here of the same domain (UUID), when coverage allows.
 */
async function planDisk(driver: HypervisorDriver, checkpoints: ReadonlySet<string>, identity: DriverDomain, allHistory: readonly Manifest[], disk: DriverDisk, options: RepoBackupOptions): Promise<DiskPlan> {
  const domain = identity.name;
  const history = allHistory.filter((m) => sameDomain(m, identity));
  const prev = [...history].reverse().find((m) => m.disks.some((x) => x.diskId === disk.diskId));
  const prevDisk = prev?.disks.find((x) => x.diskId === disk.diskId);
  const full = (fullReason: string): DiskPlan => ({ disk, level: 'full', fullReason });
  if (options.full) return full('requested with --full');
  if (prev === undefined || prevDisk === undefined) {
    // The last backup of this disk (or its target) here was of another domain under the same name.
    const other = [...allHistory].reverse().find((m) => m.disks.some((x) => x.diskId === disk.diskId || x.target === disk.target));
    if (other !== undefined && !sameDomain(other, identity)) {
      const where = other.connection !== undefined && other.connection !== driver.uri ? ` through ${other.connection}` : '';
      return full(`the last backup of "${domain}" in the repository ("${other.id}") was of another domain (UUID ${other.uuid}${where}), and this one is UUID ${identity.uuid}`);
    }
    // A new image under a target backed up before: its source was replaced (a new file, or another path).
    const sameTarget = [...history].reverse().find((m) => m.disks.some((x) => x.target === disk.target));
    const replaced = sameTarget === undefined ? '' : ` (the image under "${disk.target}" was replaced since backup "${sameTarget.id}"; it now reads "${disk.source}")`;
    return full(`no earlier backup of this disk in the repository${replaced}`);
  }
  if (!checkpoints.has(prev.checkpoint)) return full(`checkpoint "${prev.checkpoint}" of backup "${prev.id}" no longer exists`);
  const cov = (await driver.coverage(domain, prev.checkpoint)).find((c) => c.diskId === disk.diskId);
  if (cov === undefined || cov.mode === 'full') return full((cov?.reasons ?? []).map((r) => `${r.code}: ${r.detail}`).join('; ') || 'no coverage');
  return { disk, level: 'incremental', fullReason: null, parent: { manifest: prev, disk: prevDisk } };
}

/** Whether a backup is of this domain: the same UUID (a name can be given to another domain, here or on another connection). */
function sameDomain(m: Manifest, identity: DriverDomain): boolean {
  return m.uuid.toLowerCase() === identity.uuid.toLowerCase();
}

/** Reads one exported disk of the job into the store and describes it for the manifest. */
async function readJobDisk(store: Store, pool: ChunkPool, job: PullBackup, plan: DiskPlan, options: RunOptions): Promise<ManifestDisk> {
  const jd = job.disks.find((d) => d.target === plan.disk.target);
  assert(jd !== undefined, `backup job "${job.id}" exports disk "${plan.disk.target}"`);
  const virtualSize = jd.virtualSize;
  // A resized disk cannot take a delta on an index of another size: read it all.
  const resized = plan.parent !== undefined && plan.parent.disk.virtualSize !== virtualSize;
  if (jd.unchanged === true) {
    // Nothing changed since the parent's checkpoint: nothing was exported, nothing is read.
    assert(plan.parent !== undefined && !resized, `disk "${plan.disk.target}" of backup job "${job.id}" is unchanged since its parent backup, of the same size`);
    const result = await unchangedDisk(store, plan.parent.disk.index, virtualSize);
    return { target: plan.disk.target, diskId: plan.disk.diskId, virtualSize, level: 'incremental', fullReason: null, index: result.indexId, bytesRead: 0, bytesStored: 0, chunks: 0, newChunks: 0 };
  }
  const incremental = plan.level === 'incremental' && !resized && jd.dirtyContext !== undefined;
  const dirtyContext = incremental ? jd.dirtyContext : undefined;
  const exportName = jd.exportName;
  await using client = await NbdClient.connect(serverAddressOf(job.server), {
    exportName,
    metaContexts: [NBD_CONTEXT_BASE_ALLOCATION, ...(dirtyContext !== undefined ? [dirtyContext] : [])],
    ...(job.server.transport === 'tcp' && job.server.tls ? { tls: requireClientTls(options.clientTls, job.id) } : {}),
  });
  if (dirtyContext !== undefined && !client.contexts.has(dirtyContext)) {
    throw new QbackupError('NBD_ERROR', `Export ${exportUriOf(job.server, exportName)} does not offer "${dirtyContext}"`);
  }
  const writer = store.chunkWriter();
  const result = await readDisk(store, pool, writer, {
    client,
    dirtyContext,
    parentIndex: incremental ? plan.parent?.disk.index : undefined,
    signal: options.signal,
    onProgress: (done, total) => {
      options.onProgress?.({ phase: `backup ${plan.disk.target}`, doneBytes: done, totalBytes: total });
      options.faults.at('backup-copying');
    },
  });
  return {
    target: plan.disk.target,
    diskId: plan.disk.diskId,
    virtualSize,
    level: incremental ? 'incremental' : 'full',
    fullReason: incremental ? null : resized ? `the disk was resized (${plan.parent?.disk.virtualSize ?? 0} → ${virtualSize} bytes)` : (jd.fullReason ?? plan.fullReason),
    index: result.indexId,
    bytesRead: result.bytesRead,
    bytesStored: result.bytesStored,
    chunks: result.chunks,
    newChunks: result.newChunks,
  };
}

/** One signal that fires when either does (either may be absent). */
function anySignal(a: AbortSignal | undefined, b: AbortSignal | undefined): AbortSignal | undefined {
  if (a === undefined) return b;
  if (b === undefined) return a;
  return AbortSignal.any([a, b]);
}

/** Where the NBD client connects, and how a message names an export. */
function serverAddressOf(server: ExportServer): { socket: string } | { host: string; port: number } {
  return server.transport === 'unix' ? { socket: server.socket } : { host: server.host, port: server.port };
}

function exportUriOf(server: ExportServer, exportName: string): string {
  return formatNbdUri({ address: serverAddressOf(server), exportName, tls: server.transport === 'tcp' && server.tls });
}

function requireClientTls(tls: TlsClientCredentials | undefined, jobId: string): TlsClientCredentials {
  assert(tls !== undefined, `backup job "${jobId}" serves over TLS, so its reader has client credentials`);
  return tls;
}

/**
 * After a failure: end the job if it still runs and merge the backup's
 * checkpoint away, so the chain is as if the attempt never happened. The
 * original error is what the caller sees; cleanup failures are added to it.
 */
async function cleanUpFailed(driver: HypervisorDriver, domain: string, job: PullBackup | undefined, checkpoint: string, err: unknown): Promise<unknown> {
  const problems: string[] = [];
  if (job !== undefined) {
    // JOB_NOT_FOUND: the job already ended (e.g. QEMU died and the job was reaped with it).
    await driver.endBackup(domain, job.id).catch((e: unknown) => {
      if (!isQbackupError(e, 'JOB_NOT_FOUND')) problems.push(`ending backup job "${job.id}": ${describeError(e)}`);
    });
  }
  if ((await driver.checkpoints(domain).catch(() => [checkpoint])).includes(checkpoint)) {
    await driver.deleteCheckpoint(domain, checkpoint).catch((e: unknown) => problems.push(`removing checkpoint "${checkpoint}": ${describeError(e)}`));
  }
  if (problems.length === 0) return err;
  return new QbackupError('BACKUP_FAILED', `${describeError(err)} (and cleaning up failed: ${problems.join('; ')})`, { cause: err });
}
