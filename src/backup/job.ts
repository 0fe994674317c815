// A backup job as recorded in the metadata and shown to callers: what was
// planned for each disk and how far it got. The record is written before QEMU
// is told anything and kept current as the job moves, so another process can
// finish or clean up a job whose owner died (see service.ts).

import { QbackupError } from '../errors.js';
import type { CoverageProblem } from '../checkpoint/coverage.js';
import type { CreateIntent } from '../checkpoint/checkpoints.js';
import { formatNbdUri } from '../nbd/uri.js';
import type { BackupMode, BackupTargetFormat } from './spec.js';

export type DiskJobState = 'running' | 'completed' | 'failed' | 'cancelled';
export type JobState = 'running' | 'completed' | 'failed' | 'aborted';

/** Where a pull job's exports are served. */
export type NbdServer =
  | {
      transport: 'unix';
      socket: string;
      /** A directory qbackup made for the socket (mode 0700), removed with the job. */
      socketDir?: string;
    }
  | {
      transport: 'tcp';
      host: string;
      port: number;
      tls: boolean;
      /** With TLS: the server's certificate directory (absolute) and the id of QEMU's tls-creds-x509 object made from it, removed with the job. */
      tlsCertDir?: string;
      tlsCredsId?: string;
      /** With TLS, optionally: the only client certificate DN accepted, and the id of QEMU's authz-simple object that says so. */
      tlsClientIdentity?: string;
      tlsAuthzId?: string;
    };

/** Pull mode only: the fleecing filter, the frozen view and its export. */
export interface PullNodes {
  cbwNode: string;
  snapNode: string;
  exportName: string;
  exportId: string;
}

export interface JobDisk {
  target: string;
  diskId: string;
  mode: 'full' | 'incremental';
  incremental?: string;
  /** Why a disk asked for incrementally got a full backup. */
  fullReasons?: CoverageProblem[];
  /** The checkpoint bitmaps merged into `tmpBitmap` (incremental disks). */
  bitmaps?: string[];
  tmpBitmap?: string;
  /** Push: the backup file. Pull: the scratch image. */
  targetFile: string;
  targetFormat: BackupTargetFormat;
  createdTarget: boolean;
  /** Backing file of an incremental target, or why there is none. */
  backingFile?: string;
  backingNote?: string;
  qemuJobId: string;
  /** Push: the target's nodes. Pull: the scratch image's nodes. */
  targetNodes: { file: string; format: string };
  pull?: PullNodes;
  state: DiskJobState;
  error?: string;
  bytesDone?: number;
  bytesTotal?: number;
  /** Disk size when the job started (the push target's or scratch image's size). */
  virtualSize?: number;
  /** LUKS: the secret's UUID, its passphrase file, and the id of QEMU's secret object (removed with the job). */
  encryption?: { secret: string; secretFile: string; secretId: string };
}

export interface JobInfo {
  id: string;
  domain: string;
  mode: BackupMode;
  state: JobState;
  checkpoint?: string;
  incremental?: string;
  startedMs: number;
  endedMs?: number;
  bytesDone: number;
  bytesTotal: number;
  error?: string;
  /** Errors met while removing the job's nodes, bitmaps and files (the job's outcome stands). */
  teardownErrors?: string[];
  /** Pull mode: where the exports are served. */
  server?: NbdServer;
  /** The process that reads the exports and ends the job; when it dies, the next command ends the job. */
  owner?: { pid: number; pidStart: string };
  /** Merge the job's checkpoint away if the job does not complete (a repository backup's checkpoint). */
  discardCheckpointOnFailure?: boolean;
  /** 'filesystem' when the guest's filesystems were frozen for the start transaction (quiesce), else 'crash'. */
  consistency?: 'crash' | 'filesystem';
  /**
   * Pull mode: no disk changed since its checkpoint, so the job made the
   * checkpoint alone: QEMU holds no job, node, scratch image or export of it,
   * and there is nothing to read (see BackupBeginOptions.skipUnchanged).
   */
  unchanged?: boolean;
  disks: JobDisk[];
}

/** What the metadata keeps for an active job. */
export interface JobPayload {
  info: JobInfo;
  /** The checkpoint created with the job, committed once QEMU accepted the transaction. */
  checkpointPlan?: CreateIntent;
}

/** Parses a stored payload; a damaged one is reported, not trusted. */
export function parseJobPayload(text: string, domain: string): JobPayload {
  const value = parseJson(text, domain);
  const info = (value as { info?: unknown }).info;
  if (!isJobInfo(info)) throw damaged(domain);
  return value as JobPayload;
}

/** Parses a stored job result. */
export function parseJobInfo(text: string, domain: string): JobInfo {
  const value = parseJson(text, domain);
  if (!isJobInfo(value)) throw damaged(domain);
  return value;
}

function parseJson(text: string, domain: string): object {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw damaged(domain, err);
  }
  if (typeof value !== 'object' || value === null) throw damaged(domain);
  return value;
}

function isJobInfo(v: unknown): v is JobInfo {
  if (typeof v !== 'object' || v === null) return false;
  const o = v as Record<string, unknown>;
  return typeof o['id'] === 'string' && typeof o['domain'] === 'string' && (o['mode'] === 'push' || o['mode'] === 'pull') && Array.isArray(o['disks']);
}

function damaged(domain: string, cause?: unknown): QbackupError {
  return new QbackupError('METADATA_INCONSISTENT', `Cannot read the backup job record of domain "${domain}": it is damaged`, cause === undefined ? {} : { cause });
}

/**
 * The NBD URI of one export of a pull job's server (nbd+unix://, nbd:// or,
 * with TLS, nbds://), as nbdinfo and qemu-img take it. A TLS client adds its
 * own ?tls-certificates=DIR (a directory with ca-cert.pem, client-cert.pem, client-key.pem).
 */
export function exportUri(server: NbdServer, exportName: string): string {
  const address = server.transport === 'tcp' ? { host: server.host, port: server.port } : { socket: server.socket };
  return formatNbdUri({ address, exportName, tls: server.transport === 'tcp' && server.tls });
}

/** Where our NBD client connects to reach a pull job's server. */
export function serverAddress(server: NbdServer): { host: string; port: number } | { socket: string } {
  return server.transport === 'tcp' ? { host: server.host, port: server.port } : { socket: server.socket };
}
