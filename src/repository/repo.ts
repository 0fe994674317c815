// The on-disk backup repository. Layout (all paths relative to the root):
//
//   qbackup-repo.json                       {"format": 1, "created": ISO time}
//   <domain>/manifests/<backup id>.json     one manifest per valid backup
//   <domain>/disks/<target>-<disk id>/<backup id>.qcow2
//   <domain>/pending/<backup id>.json       files of a backup being written
//   <domain>/.lock                          pid of the command working on it
//
// Invariants:
// - A backup exists exactly when its manifest exists. The manifest is written
//   last, atomically (temp file, fsync, rename, fsync of the directory); files
//   of a backup that never got its manifest are listed in pending/ first and
//   removed by the next command on that domain.
// - Backing links inside qcow2 files are relative, so the repository can be
//   moved as a whole.
// - One command at a time per domain (a lock file naming its pid); a lock
//   whose process is gone is taken over.

import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { assertDomainName } from '../domain/names.js';
import { QbackupError, describeError } from '../errors.js';
import { isProcessAlive, processStartTime } from '../util/proc.js';

export const REPO_FORMAT = 1;
const MARKER = 'qbackup-repo.json';

export type BackupLevel = 'full' | 'incremental';

export interface ManifestDisk {
  target: string;
  diskId: string;
  /** Path of this backup's qcow2 file, relative to the domain's directory. */
  file: string;
  level: BackupLevel;
  /** The backup whose file is this file's backing file (same disk); null for a full. */
  parent: string | null;
  virtualSize: number;
  /** Bytes of data this backup copied for the disk. */
  bytesWritten: number;
  /** Why a full was taken where an incremental was possible in principle. */
  fullReason: string | null;
  /** ContentDigest of the disk's logical content at backup time. */
  digest: string;
}

export interface Manifest {
  format: number;
  id: string;
  domain: string;
  uuid: string;
  /** When the backup job started (the instant the backup shows), ISO 8601. */
  time: string;
  endTime: string;
  mode: 'push' | 'pull';
  checkpoint: string;
  domainXml: string;
  disks: ManifestDisk[];
}

export interface Pending {
  id: string;
  files: string[];
}

export class Repository {
  private constructor(readonly root: string) {}

  /** Opens a repository, creating it when `create` and the directory is missing or empty. */
  static open(root: string, options: { create?: boolean } = {}): Repository {
    const st = statSync(root, { throwIfNoEntry: false });
    if (st !== undefined && !st.isDirectory()) {
      throw new QbackupError('REPO_INVALID', `Cannot use repository "${root}": it is not a directory`);
    }
    const marker = join(root, MARKER);
    if (!existsSync(marker)) {
      const empty = st === undefined || readdirSync(root).length === 0;
      if (!options.create) throw new QbackupError('REPO_INVALID', `Cannot use repository "${root}": it is not a qbackup repository`);
      if (!empty) throw new QbackupError('REPO_INVALID', `Cannot create a repository in "${root}": the directory is not empty`);
      mkdirSync(root, { recursive: true });
      writeAtomic(marker, `${JSON.stringify({ format: REPO_FORMAT, created: new Date().toISOString() }, null, 2)}\n`);
      return new Repository(root);
    }
    let doc: unknown;
    try {
      doc = JSON.parse(readFileSync(marker, 'utf8'));
    } catch (err) {
      throw new QbackupError('REPO_INVALID', `Cannot use repository "${root}": ${MARKER} is unreadable (${describeError(err)})`);
    }
    const format = typeof doc === 'object' && doc !== null ? (doc as Record<string, unknown>)['format'] : undefined;
    if (typeof format !== 'number') throw new QbackupError('REPO_INVALID', `Cannot use repository "${root}": ${MARKER} has no format version`);
    if (format > REPO_FORMAT) {
      throw new QbackupError('REPO_INVALID', `Cannot use repository "${root}": it has format ${format}, written by a newer qbackup (this one knows up to ${REPO_FORMAT})`);
    }
    return new Repository(root);
  }

  domainDir(domain: string): string {
    assertDomainName(domain);
    return join(this.root, domain);
  }

  domains(): string[] {
    return readdirSync(this.root, { withFileTypes: true })
      .filter((e) => e.isDirectory() && existsSync(join(this.root, e.name, 'manifests')))
      .map((e) => e.name)
      .sort();
  }

  /** Valid backups of a domain, oldest first. A manifest that does not parse is reported, not skipped. */
  manifests(domain: string): Manifest[] {
    const dir = join(this.domainDir(domain), 'manifests');
    if (!existsSync(dir)) return [];
    return readdirSync(dir)
      .filter((f) => f.endsWith('.json'))
      .map((f) => readManifest(join(dir, f)))
      .sort((a, b) => (a.time < b.time ? -1 : a.time > b.time ? 1 : a.id.localeCompare(b.id)));
  }

  manifest(domain: string, id: string): Manifest {
    const file = join(this.domainDir(domain), 'manifests', `${id}.json`);
    if (!/^[A-Za-z0-9_.-]+$/.test(id) || !existsSync(file)) {
      throw new QbackupError('BACKUP_NOT_FOUND', `Repository "${this.root}" has no backup "${id}" of domain "${domain}"`);
    }
    return readManifest(file);
  }

  writeManifest(m: Manifest): void {
    const dir = join(this.domainDir(m.domain), 'manifests');
    mkdirSync(dir, { recursive: true });
    writeAtomic(join(dir, `${m.id}.json`), `${JSON.stringify(m, null, 2)}\n`);
  }

  removeManifest(domain: string, id: string): void {
    rmSync(join(this.domainDir(domain), 'manifests', `${id}.json`), { force: true });
    fsyncDir(join(this.domainDir(domain), 'manifests'));
  }

  /** Absolute path of a manifest disk file. */
  filePath(domain: string, relative: string): string {
    return join(this.domainDir(domain), relative);
  }

  diskDir(domain: string, target: string, diskId: string): string {
    return join('disks', `${target}-${diskId}`);
  }

  // ---- pending writes --------------------------------------------------------

  beginPending(domain: string, pending: Pending): void {
    const dir = join(this.domainDir(domain), 'pending');
    mkdirSync(dir, { recursive: true });
    writeAtomic(join(dir, `${pending.id}.json`), JSON.stringify(pending));
  }

  endPending(domain: string, id: string): void {
    rmSync(join(this.domainDir(domain), 'pending', `${id}.json`), { force: true });
  }

  /** Removes the files of backups that never got a manifest. Returns what it removed. */
  cleanLeftovers(domain: string): string[] {
    const dir = join(this.domainDir(domain), 'pending');
    if (!existsSync(dir)) return [];
    const removed: string[] = [];
    for (const f of readdirSync(dir)) {
      let pending: Pending | undefined;
      try {
        pending = JSON.parse(readFileSync(join(dir, f), 'utf8')) as Pending;
      } catch {
        pending = undefined;
      }
      if (pending !== undefined && !existsSync(join(this.domainDir(domain), 'manifests', `${pending.id}.json`))) {
        for (const file of pending.files) {
          const abs = join(this.domainDir(domain), file);
          if (existsSync(abs)) {
            rmSync(abs, { force: true });
            removed.push(file);
          }
        }
      }
      rmSync(join(dir, f), { force: true });
    }
    return removed;
  }

  /** Removes disk files no manifest refers to (left by a prune that was interrupted). */
  sweepOrphans(domain: string): string[] {
    const disksDir = join(this.domainDir(domain), 'disks');
    if (!existsSync(disksDir)) return [];
    const used = new Set(this.manifests(domain).flatMap((m) => m.disks.map((d) => d.file)));
    const removed: string[] = [];
    for (const sub of readdirSync(disksDir)) {
      for (const f of readdirSync(join(disksDir, sub))) {
        const rel = join('disks', sub, f);
        if (!used.has(rel)) {
          rmSync(join(disksDir, sub, f), { force: true });
          removed.push(rel);
        }
      }
    }
    return removed;
  }

  // ---- lock --------------------------------------------------------------------

  lock(domain: string, command: string): Disposable & { release(): void } {
    const dir = this.domainDir(domain);
    mkdirSync(dir, { recursive: true });
    const file = join(dir, '.lock');
    const me = `${process.pid} ${processStartTime(process.pid) ?? ''} ${command}`;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = openSync(file, 'wx', 0o600);
        writeSync(fd, me);
        closeSync(fd);
        const release = (): void => {
          if (existsSync(file) && readFileSync(file, 'utf8') === me) rmSync(file, { force: true });
        };
        return { release, [Symbol.dispose]: release };
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        const [pid, start, ...rest] = readFileSync(file, 'utf8').split(' ');
        if (pid !== undefined && isProcessAlive(Number(pid), start || undefined)) {
          throw new QbackupError('REPO_LOCKED', `Domain "${domain}" in repository "${this.root}" is busy: "${rest.join(' ')}" (pid ${pid}) is working on it`);
        }
        rmSync(file, { force: true });
      }
    }
    throw new QbackupError('REPO_LOCKED', `Cannot lock domain "${domain}" in repository "${this.root}"`);
  }
}

function readManifest(file: string): Manifest {
  let doc: unknown;
  try {
    doc = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new QbackupError('REPO_INVALID', `Manifest "${file}" is damaged: ${describeError(err)}`);
  }
  const m = doc as Partial<Manifest>;
  if (
    typeof m !== 'object' ||
    m === null ||
    typeof m.id !== 'string' ||
    typeof m.domain !== 'string' ||
    typeof m.time !== 'string' ||
    typeof m.checkpoint !== 'string' ||
    !Array.isArray(m.disks) ||
    m.disks.some((d) => typeof d?.file !== 'string' || typeof d.digest !== 'string' || typeof d.diskId !== 'string' || d.file.includes('..'))
  ) {
    throw new QbackupError('REPO_INVALID', `Manifest "${file}" is damaged: required fields are missing or malformed`);
  }
  if (typeof m.format !== 'number' || m.format > REPO_FORMAT) {
    throw new QbackupError('REPO_INVALID', `Manifest "${file}" has format ${String(m.format)}, written by a newer qbackup`);
  }
  return m as Manifest;
}

/** Temp file, fsync, rename, fsync of the directory: the file is either old or new, never partial. */
export function writeAtomic(file: string, text: string): void {
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = openSync(tmp, 'w', 0o644);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
  fsyncDir(dirname(file));
}

function fsyncDir(dir: string): void {
  try {
    const fd = openSync(dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    // directories that cannot be opened for fsync (some filesystems): the rename is still atomic
  }
}

