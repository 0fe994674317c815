// Planning a backup job: from the request (BackupSpec and options) and what
// was read beforehand (the domain's disks, their coverage, sizes, bitmaps,
// which files exist, earlier push targets), decide per disk what the job will
// do. A pure function: it touches neither QEMU nor the disk, so unit tests can
// check every decision, and the executor (service.ts) only carries it out.
//
// Decisions, per selected disk:
// - full or incremental: a disk asked for incrementally gets a full copy when
//   its coverage is lost, with the reasons (or the plan is refused with
//   `strict`);
// - push: the target file (given, or next to the disk, or in targetDir) and,
//   for an incremental, the backing file (the backup that created the
//   checkpoint, when it still exists) so that the target opens as a whole disk;
// - pull: the scratch file, the export name and the exported bitmap's name;
// - LUKS: the passphrase file of the disk's secret and QEMU's secret object id.

import { join, resolve } from 'node:path';
import { QbackupError } from '../errors.js';
import type { DiskCoverage } from '../checkpoint/coverage.js';
import { TEMP_BITMAP_PREFIX } from '../checkpoint/checkpoints.js';
import type { AttachedDisk } from '../domain/domains.js';
import type { JobDisk, JobInfo, NbdServer } from './job.js';
import type { BackupDiskSpec, BackupSpec } from './spec.js';


export interface BeginOptions {
  /** Push mode: write targets as DIR/<target>.<checkpoint or job id>.qcow2 unless the spec names them. */
  targetDir?: string;
  /** Push mode: write into existing target files instead of creating them. */
  reuseExternal?: boolean;
  /** Refuse the job when a disk cannot be backed up incrementally (libvirt's behaviour). */
  strict?: boolean;
  /** Copy rate limit per disk (QEMU's job speed), bytes per second. */
  bandwidthBytesPerSec?: number;
  /**
   * Pull mode over TCP with TLS: the directory with ca-cert.pem,
   * server-cert.pem and server-key.pem (libvirt's backup_tls_x509_cert_dir).
   * Default: the backup service's (STATE_DIR/pki/qbackup).
   */
  tlsCertDir?: string | undefined;
  /**
   * With TLS: accept only the client whose certificate's distinguished name
   * is exactly this, e.g. "CN=backup-client" (QEMU's tls-authz); default: every
   * client with a certificate from the CA.
   */
  tlsClientIdentity?: string;
}

export interface SelectedDisk {
  disk: AttachedDisk;
  spec: BackupDiskSpec;
}

/** What the planner needs to know, read by the executor beforehand. */
export interface PlanInputs {
  domain: string;
  jobId: string;
  spec: BackupSpec;
  options: BeginOptions;
  selected: readonly SelectedDisk[];
  /** Name of the checkpoint created with the job, if any (names default push targets). */
  checkpointName: string | undefined;
  /** Coverage since the disk's checkpoint, by disk id (incremental disks only). */
  coverage: ReadonlyMap<string, DiskCoverage>;
  /** Bitmap names on each disk now, by disk id (pull mode). */
  bitmapNames: ReadonlyMap<string, readonly string[]>;
  /** Where default scratch images and sockets go. */
  domainDir: string;
  /** A TCP server with TLS: the checked, absolute certificate directory. */
  tlsCertDir?: string | undefined;
  /** Where the passphrase of a secret (by UUID) is kept; needed when a disk asks for encryption. */
  secretFile?: (uuid: string) => string;
  /** Does this file exist? */
  exists: (path: string) => boolean;
  /** The push target recorded for a checkpoint and disk, if any. */
  previousTarget: (checkpoint: string, diskId: string) => string | undefined;
}

/** The disks of `spec`, in domain order; unknown names are refused. */
export function selectDisks(domain: string, disks: readonly AttachedDisk[], spec: BackupSpec): SelectedDisk[] {
  for (const s of spec.disks ?? []) {
    if (!disks.some((d) => d.target === s.target)) {
      throw new QbackupError('DISK_NOT_FOUND', `Cannot back up domain "${domain}": it has no disk "${s.target}"`);
    }
  }
  const out: SelectedDisk[] = [];
  for (const disk of disks) {
    const given = spec.disks?.find((s) => s.target === disk.target);
    // As libvirt: a listed disk takes part; without a list, every writable disk.
    if (spec.disks !== undefined ? given === undefined : disk.readonly) continue;
    out.push({ disk, spec: given ?? { target: disk.target } });
  }
  if (out.length === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": no disk selected`);
  return out;
}

/** The checkpoint a selected disk copies changes since, or undefined for a full copy. */
export function sinceFor(spec: BackupSpec, disk: BackupDiskSpec): string | undefined {
  return disk.mode === 'full' ? undefined : (disk.since ?? spec.since);
}

/** Decides every disk of the job; throws the user's error when the request cannot be carried out. */
export function planBackup(inputs: PlanInputs): JobInfo {
  const { domain, spec, options } = inputs;
  const disks = inputs.selected.map((s) => planDisk(inputs, s));
  const uncovered = disks.filter((d) => d.fullReasons !== undefined);
  if (options.strict && uncovered.length > 0) {
    const why = uncovered.map((d) => `disk "${d.target}": ${(d.fullReasons ?? []).map((r) => `${r.code} (${r.detail})`).join(', ')}`);
    throw new QbackupError('BITMAP_INCONSISTENT', `Cannot back up domain "${domain}" incrementally (--strict): ${why.join('; ')}`);
  }
  assertDistinct(domain, disks.map((d) => d.targetFile), 'write to');
  if (spec.mode === 'pull') assertDistinct(domain, disks.map((d) => d.pull?.exportName ?? d.target), 'use the export name');
  return {
    id: inputs.jobId,
    domain,
    mode: spec.mode,
    state: 'running',
    ...(inputs.checkpointName !== undefined ? { checkpoint: inputs.checkpointName } : {}),
    ...(spec.since !== undefined ? { incremental: spec.since } : {}),
    startedMs: 0,
    bytesDone: 0,
    bytesTotal: 0,
    ...(spec.mode === 'pull' ? { server: serverFor(inputs) } : {}),
    disks,
  };
}

function planDisk(inputs: PlanInputs, { disk, spec: diskSpec }: SelectedDisk): JobDisk {
  const { domain, jobId, spec } = inputs;
  const short = jobId.slice(7);
  const pull = spec.mode === 'pull';
  const since = sinceFor(spec, diskSpec);
  const format = diskSpec.format ?? 'qcow2';
  if (pull && format !== 'qcow2') {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${disk.target}" of domain "${domain}" in pull mode: the scratch image must be qcow2, not ${format}`);
  }
  const d: JobDisk = {
    target: disk.target,
    diskId: disk.diskId,
    mode: since === undefined ? 'full' : 'incremental',
    targetFile: '',
    targetFormat: format,
    createdTarget: false,
    qemuJobId: `${jobId}-${disk.target}`,
    targetNodes: { file: `bk${short}-${disk.target}-file`, format: `bk${short}-${disk.target}-fmt` },
    state: 'running',
  };
  if (since !== undefined) {
    d.incremental = since;
    const cov = inputs.coverage.get(disk.diskId);
    if (cov === undefined || cov.mode === 'full') {
      d.mode = 'full';
      d.fullReasons = cov?.reasons ?? [];
    } else {
      d.bitmaps = cov.bitmaps;
      d.tmpBitmap = pull ? (diskSpec.exportBitmap ?? `backup-${disk.target}`) : `${TEMP_BITMAP_PREFIX}${short}-${disk.target}`;
    }
  }
  if (diskSpec.encryption !== undefined) {
    if (inputs.secretFile === undefined) {
      throw new QbackupError('NOT_SUPPORTED', `Cannot encrypt the backup of disk "${disk.target}" of domain "${domain}": no secrets directory was given`);
    }
    const secret = diskSpec.encryption.secret;
    d.encryption = { secret, secretFile: inputs.secretFile(secret), secretId: `bk${short}-${disk.target}-sec` };
  }
  if (pull) planPullDisk(inputs, d, diskSpec);
  else planPushDisk(inputs, d, diskSpec, disk);
  return d;
}

function planPullDisk(inputs: PlanInputs, d: JobDisk, diskSpec: BackupDiskSpec): void {
  const { domain, jobId } = inputs;
  const short = jobId.slice(7);
  d.targetFile = resolve(diskSpec.scratchFile ?? join(inputs.domainDir, 'scratch', `${jobId}-${d.target}.qcow2`));
  d.pull = {
    cbwNode: `bk${short}-${d.target}-cbw`,
    snapNode: `bk${short}-${d.target}-snap`,
    exportName: diskSpec.exportName ?? d.target,
    exportId: `${jobId}-${d.target}`,
  };
  if (inputs.exists(d.targetFile)) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${d.target}" of domain "${domain}": scratch file "${d.targetFile}" exists`);
  }
  // The exported bitmap is created by the job and removed with it: its name must be free.
  if (d.tmpBitmap !== undefined && (inputs.bitmapNames.get(d.diskId) ?? []).includes(d.tmpBitmap)) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot export disk "${d.target}" of domain "${domain}" with bitmap "${d.tmpBitmap}": the disk already has a bitmap of that name`);
  }
}

function planPushDisk(inputs: PlanInputs, d: JobDisk, diskSpec: BackupDiskSpec, disk: AttachedDisk): void {
  const { domain, options } = inputs;
  const suffix = inputs.checkpointName ?? inputs.jobId;
  d.targetFile = resolve(diskSpec.targetFile ?? (options.targetDir !== undefined ? join(options.targetDir, `${disk.target}.${suffix}.qcow2`) : `${disk.source}.${suffix}`));
  const exists = inputs.exists(d.targetFile);
  if (exists && !options.reuseExternal) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${d.target}" of domain "${domain}": target "${d.targetFile}" exists (use --reuse-external to write into it)`);
  }
  if (!exists && options.reuseExternal) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot back up disk "${d.target}" of domain "${domain}": with --reuse-external the target "${d.targetFile}" must exist`);
  }
  if (d.mode === 'incremental' && d.incremental !== undefined) {
    const prev = inputs.previousTarget(d.incremental, d.diskId);
    if (prev !== undefined && inputs.exists(prev) && d.targetFormat === 'qcow2') d.backingFile = prev;
    else d.backingNote = prev === undefined ? `no backup recorded for checkpoint "${d.incremental}"` : `the backup "${prev}" no longer exists`;
  }
}

/**
 * Where the NBD server of a pull job listens: as asked, else a unix socket in
 * a private directory. TCP with TLS gets its credentials object's id.
 */
function serverFor({ spec, domainDir, jobId, tlsCertDir, domain, options }: PlanInputs): NbdServer {
  const s = spec.server;
  if (s?.transport === 'tcp' && s.tls) {
    if (tlsCertDir === undefined) throw new QbackupError('TLS_CREDENTIALS', `Cannot serve the backup of domain "${domain}" over TLS: no certificate directory was given`);
    const short = jobId.slice(7);
    const identity = options.tlsClientIdentity;
    const authz = identity !== undefined ? { tlsAuthzId: `bk${short}-authz`, tlsClientIdentity: identity } : {};
    return { transport: 'tcp', host: s.host, port: s.port, tls: true, tlsCertDir, tlsCredsId: `bk${short}-tls`, ...authz };
  }
  if (s?.transport === 'tcp') return { transport: 'tcp', host: s.host, port: s.port, tls: false };
  if (s?.transport === 'unix') return { transport: 'unix', socket: s.socket };
  const dir = join(domainDir, `nbd-${jobId.slice(7)}`);
  return { transport: 'unix', socket: join(dir, 'nbd.sock'), socketDir: dir };
}

function assertDistinct(domain: string, values: readonly string[], what: string): void {
  const seen = new Set<string>();
  for (const v of values) {
    if (seen.has(v)) throw new QbackupError('INVALID_ARGUMENT', `Cannot back up domain "${domain}": two disks would ${what} "${v}"`);
    seen.add(v);
  }
}
