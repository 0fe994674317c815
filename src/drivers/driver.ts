// What qbackup needs from a hypervisor, as one interface that every driver
// implements: the repository (backup, restore --into-domain, --define),
// instant restore, the daemon and the CLI's repository commands talk to a
// `HypervisorDriver` and to nothing below it. Today's driver is our own QEMU
// engine (src/drivers/qemu/); a libvirt driver speaking libvirt's RPC
// (checkpoints, virDomainBackupBegin in pull mode) implements the same calls.
// src/drivers/open.ts chooses one from a connection URI.
//
// Every driver guarantees:
// - Domains are named; a name that does not exist fails with DOMAIN_NOT_FOUND,
//   naming it. A disk's `diskId` is stable for one image under one target
//   (an image replaced under the same target gets a new id), so a backup's
//   history follows the image, not the target name.
// - A pull backup creates its new checkpoint in the same instant as the view
//   it exports (no write falls between them); a disk it marks `unchanged`
//   had no write between its checkpoint and that instant; an incremental disk's export
//   carries a dirty-bitmap meta context that marks exactly what changed since
//   the checkpoint it names; a disk the coverage rules cannot make
//   incremental is refused, never silently read whole (strict).
// - A pull backup lasts until `endBackup`; if its reader dies, the driver
//   ends it on the next call on the domain, or through `endOrphanedBackup`,
//   and then discards the checkpoint it created.
// - `withShutOffDisks` hands out the images of a shut-off domain while
//   nothing else may start or change it.
// - An instant restore's copy (DomainSession) moves every byte of a disk's
//   NBD backing into its overlay, and only once every job has completed and
//   the images are flushed does the disk stop declaring the backing, live
//   and in the persistent definition.
// - Nothing here reads the environment: a driver gets its settings from the
//   caller that opens it.

/** A domain as the driver sees it now. */
export type DomainState = 'running' | 'shut off' | 'crashed';

export interface DriverDomain {
  name: string;
  uuid: string;
  state: DomainState;
  /** Why it is in that state (booted, paused, shutdown, destroyed, crashed, defined, failed, starting). */
  reason: string;
}

/** One disk of a domain's current definition. */
export interface DriverDisk {
  target: string;
  /** Stable id of the image under this target (see the guarantees above). */
  diskId: string;
  /** The image file (local path). */
  source: string;
  format: 'raw' | 'qcow2';
  readonly: boolean;
  /** An NBD export the disk still reads through while an instant restore copies it in. */
  nbdBacking?: { socket: string; exportName: string } | undefined;
}

/** Why a disk cannot be backed up incrementally since a checkpoint. */
export interface CoverageProblem {
  code: string;
  detail: string;
}

/** Per disk: can a backup since the checkpoint be incremental, or must it be full (and why)? */
export interface DiskCoverage {
  target: string;
  diskId: string;
  mode: 'incremental' | 'full';
  reasons: CoverageProblem[];
}

export type QuiesceMode = 'required' | 'optional';
export type Consistency = 'crash' | 'filesystem';

/** Where the exports of a pull backup are served. */
export type ExportServer = { transport: 'unix'; socket: string } | { transport: 'tcp'; host: string; port: number; tls: boolean };

export interface PullBackupRequest {
  /** The checkpoint created in the backup's instant. */
  checkpoint: string;
  /** Each disk full, or incremental since a named checkpoint. */
  disks: ReadonlyArray<{ target: string; since?: string | undefined }>;
  /** Freeze the guest's filesystems for the instant (through its agent). */
  quiesce?: QuiesceMode | undefined;
  /** Serve on this TCP address with TLS instead of a private unix socket. */
  tcp?: { host: string; port: number } | undefined;
  /** With `tcp`: the certificate directory the server uses. */
  tlsCertDir?: string | undefined;
  /**
   * The caller can take a disk without an export when nothing changed on it:
   * a driver may then create the checkpoint alone (no job, nothing served)
   * when no disk changed since its checkpoint, and mark every disk
   * `unchanged`. A driver that cannot tell exports every disk as usual.
   */
  skipUnchanged?: boolean | undefined;
}

/** One disk of a running pull backup, ready to read with an NBD client. */
export interface PullExport {
  target: string;
  exportName: string;
  /** The meta context marking what changed since the checkpoint (incremental disks only). */
  dirtyContext: string | undefined;
  virtualSize: number;
  /** Set when the driver read this disk full though it was asked incrementally (the hypervisor refused the checkpoint's bitmap): why, in one sentence. */
  fullReason?: string | undefined;
  /**
   * With `skipUnchanged`: not one byte changed between the checkpoint the
   * disk was asked since and the backup's checkpoint. Nothing is exported:
   * `exportName` names nothing and there is nothing to read.
   */
  unchanged?: boolean | undefined;
}

export interface PullBackup {
  id: string;
  domain: string;
  checkpoint: string;
  consistency: Consistency;
  server: ExportServer;
  disks: PullExport[];
  /** Fires when the driver lost what keeps the job valid (libvirt: the connection that began it closed); its reason says so in one sentence. */
  signal?: AbortSignal | undefined;
}

/** A copy job of an instant restore: a disk's backing being copied into its local image. */
export interface CopyJob {
  status: string;
  /**
   * Progress; absent for a completed copy the hypervisor no longer reports
   * (libvirt forgets a finished pull): the caller's record knows the disk's
   * size, and every byte of it was copied.
   */
  doneBytes?: number | undefined;
  totalBytes?: number | undefined;
  error?: string | undefined;
}

/**
 * One domain held by a command (its lock held): what an instant restore does
 * to a domain whose disks read from an NBD backing while it runs.
 */
export interface DomainSession {
  readonly domain: string;
  readonly running: boolean;
  readonly disks: readonly DriverDisk[];
  /**
   * At most this many copy jobs may run at once on the domain (default: one
   * per disk). libvirt's driver says 1: with QEMU 7.2, a copy that ends while
   * libvirt finishes another one's can crash QEMU (docs/design.md, "QEMU
   * 7.2's stream crash").
   */
  readonly copiesAtOnce?: number | undefined;
  /** The domain's copy jobs, by job id. Reading them must not read the node graph (see copiesAtOnce). */
  copyJobs(): Promise<Map<string, CopyJob>>;
  /** Starts copying a disk's backing into its image; the job stays until dismissed. */
  startCopy(target: string, jobId: string, speedBytesPerSec: number): Promise<void>;
  dismissCopy(jobId: string): Promise<void>;
  /** Makes every written byte of the images durable; false when the guest is paused (nothing flushed). */
  flush(): Promise<boolean>;
  /** Every byte is local: the disks stop reading through their NBD backings (live and in the definition). */
  dropBackings(targets: readonly string[]): Promise<void>;
}

/** Where an instant restore keeps what the hypervisor's QEMU opens: the overlays' directory and the backup server's unix socket. */
export interface InstantPlacement {
  overlayDir: string;
  socket: string;
}

/** Copy jobs of instant restores are named with this prefix and the disk's target. */
export const COPY_JOB_PREFIX = 'instant-';

/** What an instant restore does at lifecycle points of a domain (a driver calls them holding the domain). */
export interface LifecycleHooks {
  onOpen?: (s: DomainSession) => Promise<void>;
  beforeStart?: (s: DomainSession) => Promise<void>;
  afterStart?: (s: DomainSession) => Promise<void>;
  beforeUndefine?: (s: DomainSession) => void;
}

/**
 * A way to a running domain's guest agent (qemu-ga). `execute` runs one
 * agent command and returns its `return` value; an error answer, no answer in
 * `timeoutMs`, or a lost way is GUEST_AGENT, in one sentence naming the domain.
 */
export interface GuestAgentSession {
  readonly domain: string;
  execute<T>(command: string, args?: Record<string, unknown> | undefined, timeoutMs?: number | undefined): Promise<T>;
  /** Idempotent. */
  close(): Promise<void>;
}

export interface HypervisorDriver {
  /** The connection URI this driver was opened for. */
  readonly uri: string;

  // ---- domains ----
  listDomains(): Promise<DriverDomain[]>;
  describeDomain(name: string): Promise<DriverDomain>;
  /** The saved definition (libvirt domain XML). */
  domainXml(name: string): Promise<string>;
  disks(name: string): Promise<DriverDisk[]>;
  defineDomain(xml: string): Promise<DriverDomain>;
  startDomain(name: string, options?: { paused?: boolean | undefined }): Promise<DriverDomain>;
  /** Clean stop (persistent bitmaps are stored). */
  shutdownDomain(name: string): Promise<DriverDomain>;
  undefineDomain(name: string): Promise<void>;
  /** Runs `fn` with the disks of a shut-off domain, which nothing else may start or change meanwhile. */
  withShutOffDisks<T>(name: string, what: string, fn: (disks: readonly DriverDisk[]) => Promise<T>): Promise<T>;

  // ---- checkpoints and backups ----
  checkpoints(domain: string): Promise<string[]>;
  deleteCheckpoint(domain: string, name: string): Promise<void>;
  coverage(domain: string, checkpoint: string): Promise<DiskCoverage[]>;
  /** The certificate directory a TLS pull backup uses unless told another. */
  readonly defaultTlsCertDir: string | undefined;
  beginPullBackup(domain: string, request: PullBackupRequest): Promise<PullBackup>;
  /**
   * Before what was read is committed: throws (one sentence) when the job is
   * no longer the one begun, e.g. libvirt's connection was lost meanwhile.
   * A driver whose jobs cannot be lost that way need not have it.
   */
  confirmBackup?(domain: string, backupId: string): Promise<void>;
  /** Ends a pull backup whose reader is done. */
  endBackup(domain: string, backupId: string): Promise<void>;
  /** Ends a backup whose reader died, if one runs (and discards its checkpoint). */
  endOrphanedBackup(domain: string): Promise<void>;
  /** Refuses `what` while a backup job runs on the domain. */
  assertNoBackup(domain: string, what: string): Promise<void>;

  // ---- instant restore ----
  /** A new qcow2 image of `sizeBytes` whose `zeroRanges` read as zero without reaching any backing. */
  createOverlay(path: string, sizeBytes: number, zeroRanges: ReadonlyArray<{ offset: number; length: number }>): Promise<void>;
  withSession<T>(domain: string, what: string, fn: (s: DomainSession) => Promise<T>): Promise<T>;
  /** Installs the instant restore's lifecycle hooks; once. */
  setLifecycleHooks(hooks: LifecycleHooks): void;
  /**
   * How an instant restore makes the new domain's definition from the
   * backup's saved XML: 'model' (the default) through qbackup's own domain
   * model; 'saved-xml' by editing the saved XML as `restore --define` does
   * (src/repository/define-xml.ts: new UUID, no MACs), for a hypervisor that
   * takes libvirt's whole schema.
   */
  readonly newDefinitions?: 'model' | 'saved-xml' | undefined;
  /**
   * Where an instant restore of `domain` keeps its overlays (unless the user
   * names a directory) and its socket. `defaults` lie in the private state
   * directory: right when QEMU runs as this process (the default).
   */
  instantPlacement?(domain: string, defaults: InstantPlacement): Promise<InstantPlacement>;
  /** Makes (again) a directory of an instant restore that the hypervisor's QEMU reaches and other users do not; default: owner-only. */
  prepareInstantDir?(dir: string, holds: 'overlays' | 'socket'): Promise<void>;
  /** Lets the hypervisor's QEMU connect to the unix socket a backup server of this process made; default: nothing to do. */
  shareSocket?(socket: string): Promise<void>;

  /**
   * True when the hypervisor pays for every checkpoint on every guest write
   * (libvirt: one active bitmap each): the repository then deletes its
   * previous checkpoint once the next backup commits, keeping one.
   */
  readonly keepsLatestCheckpointOnly?: boolean | undefined;
  /**
   * True when `beginPullBackup` backs up a shut-off domain itself, without
   * starting it (libvirt: its images opened by a storage daemon of the
   * driver's, which keeps the domain from starting meanwhile). Otherwise the
   * repository starts the domain paused for the backup and shuts it down after.
   */
  readonly backsUpShutOffDomains?: boolean | undefined;
  /**
   * Opens the way to a running domain's guest agent. A domain that is not
   * running, has no agent channel or whose agent does not answer is
   * GUEST_AGENT, in one sentence. A driver without one cannot reach guests.
   */
  guestAgent?(domain: string): Promise<GuestAgentSession>;
  /** Releases the driver's connection, if it holds one; idempotent. */
  close?(): Promise<void>;
}
