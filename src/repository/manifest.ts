// A backup's manifest: the record that makes it exist. Written last, in one
// atomic put, after every chunk and index it names is stored; until then the
// backup's packs are unreferenced garbage for gc. Parsing treats the content
// as hostile: every id that later becomes part of an object key is checked
// against its strict pattern here.
//
// Manifests are never rewritten in place. When prune folds a backup's index
// chain (fold.ts), the backup gets a new *generation* of its manifest, a new
// object `snapshots/<domain>/<id>.g<n>` naming the new indexes; the older
// generation is deleted after it. Readers use the newest generation of each
// backup id, so a crash between the two steps leaves two complete manifests
// of which the newer counts.
//
// In a plain (unencrypted) repository a manifest carries its own checksum: a
// last field "sha256", the SHA-256 of the manifest serialized without it
// (JSON, two-space indent, as written), so any flipped byte is detected, not
// only those that break the JSON. Encrypted manifests are authenticated by
// their seal instead. Manifests written before the field existed have none and
// are read as before; qbackups of that time ignore the field, so the
// repository format does not change.

import { createHash } from 'node:crypto';
import { QbackupError } from '../errors.js';
import { CHECKPOINT_NAME_PATTERN } from '../checkpoint/spec.js';
import { INDEX_ID } from './disk-index.js';

/** Backup ids: UTC time to the millisecond and 4 random hex digits, e.g. 20261129T121127.196Z-af5f. */
export const BACKUP_ID = /^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{4}$/;
const DOMAIN = /^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$/;
const DISK_ID = /^dk[0-9a-f]{8}$/;

export interface ManifestDisk {
  target: string;
  diskId: string;
  virtualSize: number;
  level: 'full' | 'incremental';
  /** Why the disk got a full backup (null for an incremental). */
  fullReason: string | null;
  /** The disk index (full or a delta on the previous backup's). */
  index: string;
  /** Bytes read from the VM, and stored as new chunks (after dedup and compression). */
  bytesRead: number;
  bytesStored: number;
  /** Chunks with data (not holes), and how many of them were new to the repository. */
  chunks: number;
  newChunks: number;
}

export interface Manifest {
  format: 2;
  id: string;
  domain: string;
  /** The domain's UUID at backup time (its identity: a parent is always a backup of the same UUID). */
  uuid: string;
  /** The connection URI the domain was backed up through (qbackup:///, qemu:///system, …); absent in manifests written before it was recorded. */
  connection?: string;
  time: string;
  endTime: string;
  checkpoint: string;
  /** 'filesystem' when the guest's filesystems were frozen, else 'crash'. */
  consistency: 'crash' | 'filesystem';
  /** The domain definition at backup time (libvirt XML). */
  domainXml: string;
  disks: ManifestDisk[];
  /** Which generation of the backup's manifest this is; absent for the first (written by the backup itself). */
  generation?: number;
}

/** A connection URI longer than this is refused (libvirt's own URIs are far shorter). */
const MAX_CONNECTION_LENGTH = 4096;

/** Generations above this are refused (a fold writes one per prune that touches the backup). */
const MAX_GENERATION = 999_999;

export function manifestKey(domain: string, id: string, generation = 1): string {
  if (!DOMAIN.test(domain) || domain.includes('..')) throw new QbackupError('INVALID_NAME', `Invalid domain name ${JSON.stringify(domain)}`);
  if (!BACKUP_ID.test(id)) throw new QbackupError('BACKUP_NOT_FOUND', `Invalid backup id ${JSON.stringify(id)}`);
  if (!Number.isSafeInteger(generation) || generation < 1 || generation > MAX_GENERATION) throw new QbackupError('INVALID_ARGUMENT', `Invalid manifest generation ${generation} of backup "${id}"`);
  return generation === 1 ? `snapshots/${domain}/${id}` : `snapshots/${domain}/${id}.g${generation}`;
}

/** The backup id and generation a manifest object's last key segment names, or undefined when it names none. */
export function parseManifestName(name: string): { id: string; generation: number } | undefined {
  const m = /^(.+?)(?:\.g([1-9][0-9]{0,5}))?$/.exec(name);
  const id = m?.[1];
  if (id === undefined || !BACKUP_ID.test(id)) return undefined;
  const generation = m?.[2] !== undefined ? Number(m[2]) : 1;
  // "<id>.g1" is not a name any writer uses: only the plain id is generation 1.
  if (generation === 1 && m?.[2] !== undefined) return undefined;
  return { id, generation };
}

export function newBackupId(now = new Date()): string {
  const t = now.toISOString().replace(/[-:]/g, '');
  return `${t}-${Math.floor(Math.random() * 0x10000).toString(16).padStart(4, '0')}`;
}

/** Parses and checks a stored manifest; it must be the one its key names. */
export function parseManifest(text: string, domain: string, id: string, generation = 1): Manifest {
  const bad = (why: string): QbackupError => new QbackupError('REPO_DAMAGED', `Manifest of backup "${id}" (domain "${domain}") is damaged: ${why}`);
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw bad('not valid JSON');
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw bad('not an object');
  const m = v as Record<string, unknown>;
  // The checksum is compared last, so that hostile content is named for what is wrong with it.
  const hasChecksum = 'sha256' in m;
  const { sha256, ...rest } = m;
  if (hasChecksum) delete m['sha256'];
  if (m['format'] !== 2) throw bad(`format ${String(m['format'])}`);
  if (m['id'] !== id || m['domain'] !== domain) throw bad('it names another backup');
  if ((m['generation'] ?? 1) !== generation) throw bad(`it is not generation ${generation} of its manifest`);
  for (const f of ['uuid', 'time', 'endTime', 'checkpoint', 'domainXml'] as const) if (typeof m[f] !== 'string') throw bad(`no ${f}`);
  if (!CHECKPOINT_NAME_PATTERN.test(m['checkpoint'] as string)) throw bad('an invalid checkpoint name');
  // Absent in manifests written before it was recorded.
  if (m['connection'] !== undefined && (typeof m['connection'] !== 'string' || m['connection'].length > MAX_CONNECTION_LENGTH)) throw bad('an invalid connection');
  if (m['consistency'] !== 'crash' && m['consistency'] !== 'filesystem') throw bad('no consistency');
  if (!Array.isArray(m['disks'])) throw bad('no disks');
  for (const d of m['disks'] as unknown[]) checkDisk(d, bad);
  if (hasChecksum && (typeof sha256 !== 'string' || sha256 !== manifestChecksum(rest))) throw bad('its checksum does not match its content');
  return m as unknown as Manifest;
}

function manifestChecksum(body: object): string {
  return createHash('sha256').update(JSON.stringify(body, null, 2)).digest('hex');
}

/** The stored form of a manifest in a plain repository: its JSON with the checksum as last field. */
export function serializeManifestWithChecksum(m: Manifest): Buffer {
  const { ...body } = m as unknown as Record<string, unknown>;
  delete body['sha256'];
  return Buffer.from(`${JSON.stringify({ ...body, sha256: manifestChecksum(body) }, null, 2)}\n`);
}

function checkDisk(v: unknown, bad: (why: string) => QbackupError): void {
  if (typeof v !== 'object' || v === null) throw bad('a disk is not an object');
  const d = v as Record<string, unknown>;
  if (typeof d['target'] !== 'string' || !/^[a-z]{2,8}$/.test(d['target'])) throw bad('a disk has an invalid target');
  if (typeof d['diskId'] !== 'string' || !DISK_ID.test(d['diskId'])) throw bad(`disk "${String(d['target'])}" has an invalid disk id`);
  if (typeof d['index'] !== 'string' || !INDEX_ID.test(d['index'])) throw bad(`disk "${String(d['target'])}" names an invalid index`);
  if (d['level'] !== 'full' && d['level'] !== 'incremental') throw bad(`disk "${String(d['target'])}" has an invalid level`);
  for (const f of ['virtualSize', 'bytesRead', 'bytesStored', 'chunks', 'newChunks']) {
    if (!Number.isSafeInteger(d[f]) || (d[f] as number) < 0) throw bad(`disk "${String(d['target'])}" has an invalid ${f}`);
  }
  if (d['fullReason'] !== null && typeof d['fullReason'] !== 'string') throw bad(`disk "${String(d['target'])}" has an invalid fullReason`);
}
