// A file-browsing session over one backup: the backup's disks served by our
// own NBD server (repository/serve.ts) on a private unix socket, opened
// read-only by a libguestfs appliance (appliance.ts), its filesystems listed
// and one tree mounted as "/".
//
// Which tree is "/": the operating system found by libguestfs inspection
// (with its fstab mount points), else the one filesystem the backup holds,
// else the device the caller names (`fs`). Mounting waits for the first file
// operation, so listing filesystems works on any backup.
//
// Invariants:
// - Nothing here parses a guest filesystem: every read is done inside the
//   appliance, which sees the disks read-only; this process only reads the
//   bytes of whole files and the stat fields libguestfs reports.
// - Every operation has a deadline (the appliance's) and a size limit
//   (file bytes, directory entries, entries of a walk).
// - The helper's and the VM's pids are recorded under RUN_DIR/files while
//   the session is open; reapStaleSessions() ends those of an owner that
//   died (kill -9 of the CLI), so nothing outlives its command for long.
// - close() is idempotent and ends the appliance, then the server.

import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { QbackupError } from '../errors.js';
import type { BackupServer, Manifest, RepoAccess, RepositoryService } from '../repository/repository.js';
import { isProcessAlive, processStartTime } from '../util/proc.js';
import { makePrivateDir } from '../util/private-dir.js';
import { throwIfCancelled } from '../util/operation.js';
import { GuestfsAppliance, GuestfsError, guestName, type ApplianceSettings, type GuestDirEntry, type GuestStat } from './appliance.js';
import { getInto } from './get.js';
import { entryOf, joinGuestPath, normalizeGuestPath, type FileEntry } from './entries.js';

export interface FileLimits {
  /** Largest file read or fetched (default 64 GiB). */
  maxFileBytes?: number | undefined;
  /** Most entries of one directory (default 200,000). */
  maxDirectoryEntries?: number | undefined;
  /** Most entries one walk (ls -R, find, get of a directory) visits (default 2,000,000). */
  maxWalkEntries?: number | undefined;
}

export interface FileSessionOptions extends RepoAccess {
  domain: string;
  /** A backup id; default the newest (or the newest at or before `until`). */
  backup?: string | undefined;
  until?: Date | undefined;
  /** Disk targets to open; default every disk of the backup. */
  disks?: readonly string[] | undefined;
  /** The filesystem to take as "/" (e.g. /dev/sda1), instead of choosing. */
  fs?: string | undefined;
  /** The state directory's run area: the NBD socket and the pid records live under it. */
  runDir: string;
  appliance?: ApplianceSettings | undefined;
  limits?: FileLimits | undefined;
}

export interface FilesystemInfo {
  /** The device as the guest's disks name it (/dev/sda1 on the backup's disk sda; LVM as /dev/VG/LV). */
  device: string;
  /** The backup's disk it lies on, when it is a disk or a partition. */
  disk: string | undefined;
  type: string;
  label: string;
  uuid: string;
  sizeBytes: number;
  /** Where it is mounted in this session's tree, once mounted. */
  mountpoint?: string | undefined;
}

export interface OperatingSystem {
  root: string;
  product: string;
  hostname: string;
  /** Mount points from the guest's fstab: [mountpoint, device]. */
  mounts: Array<[string, string]>;
}

export interface GetReport {
  files: number;
  directories: number;
  symlinks: number;
  bytes: number;
  /** Entries not written (devices, fifos, sockets, unsafe names), with why. */
  skipped: Array<{ path: string; reason: string }>;
  written: string[];
}

const DEFAULT_LIMITS = { maxFileBytes: 64 * 2 ** 30, maxDirectoryEntries: 200_000, maxWalkEntries: 2_000_000 };
const MAX_LINK_HOPS = 40;

export class FileSession implements AsyncDisposable {
  private mounted: Promise<void> | undefined;
  private closing: Promise<void> | undefined;
  private readonly limits: Required<{ [K in keyof FileLimits]: number }>;
  /** Appliance device names (/dev/sdX) → the backup's disk targets. */
  private readonly deviceMap: Array<{ appliance: string; target: string }>;

  private constructor(
    readonly backup: Manifest,
    private readonly server: BackupServer,
    private readonly appliance: GuestfsAppliance,
    readonly filesystems: FilesystemInfo[],
    readonly operatingSystems: OperatingSystem[],
    private readonly options: FileSessionOptions,
    private readonly record: string | undefined,
  ) {
    this.limits = { ...DEFAULT_LIMITS, ...Object.fromEntries(Object.entries(options.limits ?? {}).filter(([, v]) => v !== undefined)) };
    this.deviceMap = server.exports.map((e, i) => ({ appliance: `/dev/sd${String.fromCharCode(97 + i)}`, target: e.name }));
  }

  /** Serves the backup, boots the appliance on it and lists its filesystems. */
  static async open(repository: RepositoryService, options: FileSessionOptions): Promise<FileSession> {
    reapStaleSessions(options.runDir);
    if (options.backup !== undefined && options.until !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give either a backup id or a time (until), not both');
    const manifests = await repository.list(options, options.domain);
    const m = pickManifest(manifests, options);
    const server = await repository.serveBackup(options.domain, { repo: options.repo, ...(options.password !== undefined ? { password: options.password } : {}), backup: m.id, disks: options.disks !== undefined ? [...options.disks] : [], listen: { transport: 'unix' } });
    let appliance: GuestfsAppliance | undefined;
    let record: string | undefined;
    try {
      const listen = server.listen;
      if (listen.transport !== 'unix') throw new QbackupError('INVALID_ARGUMENT', 'A file-browsing session needs a unix socket');
      const recordDir = join(options.runDir, 'files');
      makePrivateDir(options.runDir);
      mkdirSync(recordDir, { recursive: true, mode: 0o700 });
      record = join(recordDir, `${process.pid}-${randomBytes(6).toString('hex')}.json`);
      const recordFile = record;
      const onPids = (pids: { helper: number; vm?: number | undefined }): void => {
        writePidRecord(recordFile, pids);
        options.appliance?.onPids?.(pids);
      };
      appliance = await GuestfsAppliance.launch(
        server.exports.map((e) => ({ socket: listen.socket, export: e.name })),
        { ...options.appliance, onPids },
      );
      const rawFs = (await appliance.request('filesystems')) as Array<{ device: string; type: string; label: string; uuid: string; size: number }>;
      const rawOs = (await appliance.request('inspect')) as Array<{ root: string; product: string; hostname: string; mounts: Array<[string, string]> }>;
      const session = new FileSession(m, server, appliance, [], [], options, record);
      for (const f of rawFs) {
        const device = session.guestDevice(guestName(f.device));
        session.filesystems.push({ device, disk: session.diskOf(device), type: guestName(f.type), label: guestName(f.label), uuid: guestName(f.uuid), sizeBytes: f.size });
      }
      for (const o of rawOs) {
        session.operatingSystems.push({ root: session.guestDevice(guestName(o.root)), product: guestName(o.product), hostname: guestName(o.hostname), mounts: o.mounts.map(([mp, dev]) => [guestName(mp), session.guestDevice(guestName(dev))]) });
      }
      return session;
    } catch (err) {
      await appliance?.close();
      if (record !== undefined) rmSync(record, { force: true });
      await server.close();
      throw err;
    }
  }

  get pids(): { helper: number | undefined; vm: number | undefined } {
    return this.appliance.pids;
  }

  /** /dev/sdb1 in the appliance → /dev/vdb1 when the backup's second disk is vdb. */
  private guestDevice(device: string): string {
    for (const d of this.deviceMap) if (device === d.appliance || (device.startsWith(d.appliance) && /^\d+$/.test(device.slice(d.appliance.length)))) return `/dev/${d.target}${device.slice(d.appliance.length)}`;
    return device;
  }

  private applianceDevice(device: string): string {
    const dev = device.startsWith('/dev/') ? device : `/dev/${device}`;
    for (const d of this.deviceMap) {
      const g = `/dev/${d.target}`;
      if (dev === g || (dev.startsWith(g) && /^\d+$/.test(dev.slice(g.length)))) return `${d.appliance}${dev.slice(g.length)}`;
    }
    return dev;
  }

  private diskOf(device: string): string | undefined {
    return this.deviceMap.find((d) => device === `/dev/${d.target}` || (device.startsWith(`/dev/${d.target}`) && /^\d+$/.test(device.slice(`/dev/${d.target}`.length))))?.target;
  }

  private what(): string {
    return `backup "${this.backup.id}" of domain "${this.backup.domain}"`;
  }

  /** Mounts the chosen tree as "/" (once). */
  mount(): Promise<void> {
    return (this.mounted ??= this.doMount().catch((err: unknown) => {
      this.mounted = undefined;
      throw err;
    }));
  }

  private async doMount(): Promise<void> {
    const readable = this.filesystems.filter((f) => f.type !== 'unknown' && f.type !== 'swap' && f.type !== '');
    let mounts: Array<[string, string]>;
    if (this.options.fs !== undefined) {
      const want = this.options.fs.startsWith('/dev/') ? this.options.fs : `/dev/${this.options.fs}`;
      const f = this.filesystems.find((x) => x.device === want);
      if (f === undefined) throw new QbackupError('FILESYSTEM_NOT_FOUND', `${cap(this.what())} has no filesystem "${this.options.fs}" (it has ${this.filesystems.map((x) => x.device).join(', ') || 'none'})`);
      mounts = [['/', f.device]];
    } else if (this.operatingSystems.length === 1 && this.operatingSystems[0] !== undefined) {
      mounts = this.operatingSystems[0].mounts;
    } else if (this.operatingSystems.length > 1) {
      throw new QbackupError('FILESYSTEM_NOT_FOUND', `${cap(this.what())} holds ${this.operatingSystems.length} operating systems (${this.operatingSystems.map((o) => o.root).join(', ')}): choose one with --fs`);
    } else if (readable.length === 1 && readable[0] !== undefined) {
      mounts = [['/', readable[0].device]];
    } else if (readable.length === 0) {
      throw new QbackupError('FILESYSTEM_NOT_FOUND', `${cap(this.what())} has no filesystem qbackup can read on disk(s) ${this.server.exports.map((e) => e.name).join(', ')}`);
    } else {
      throw new QbackupError('FILESYSTEM_NOT_FOUND', `${cap(this.what())} has ${readable.length} filesystems and no operating system: choose one with --fs (${readable.map((f) => `${f.device} ${f.type}`).join(', ')})`);
    }
    // Mount points in order of depth, so /boot goes on top of /.
    const ordered = [...mounts].sort((a, b) => a[0].length - b[0].length);
    const done: Array<[string, string]> = [];
    for (const [mp, dev] of ordered) {
      try {
        await this.appliance.request('mount', { mounts: [[this.applianceDevice(dev), mp]] });
        done.push([mp, dev]);
      } catch (err) {
        // "/" must mount; an fstab entry that does not (a missing disk, a directory the root lacks) is left out.
        if (mp === '/') throw new QbackupError('FILESYSTEM_NOT_FOUND', `Cannot mount filesystem "${dev}" of ${this.what()}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      }
    }
    for (const f of this.filesystems) f.mountpoint = done.find(([, dev]) => dev === f.device)?.[0];
  }

  private wrap(err: unknown, path: string): unknown {
    if (err instanceof GuestfsError) {
      if (err.notFound) return new QbackupError('FILE_NOT_FOUND', `${cap(this.what())} has no file or directory "${path}"`, { cause: err });
      if (/Not a directory/i.test(err.guestfsMessage)) return new QbackupError('FILE_NOT_FOUND', `"${path}" in ${this.what()} is not a directory`, { cause: err });
      if (/too many entries/.test(err.guestfsMessage)) return new QbackupError('FILE_TOO_LARGE', `Directory "${path}" in ${this.what()} has more than ${this.limits.maxDirectoryEntries} entries`, { cause: err });
      return new QbackupError('TOOL_FAILED', `Cannot read "${path}" in ${this.what()}: ${err.guestfsMessage}`, { cause: err });
    }
    return err;
  }

  /** The entry at a path (a symlink itself, not its target). */
  async stat(path: string): Promise<FileEntry> {
    await this.mount();
    const p = normalizeGuestPath(path);
    try {
      return entryOf(p, await this.appliance.lstat(p));
    } catch (err) {
      throw this.wrap(err, p);
    }
  }

  /** A directory's entries sorted by name, or the one entry of a path that is not a directory. */
  async list(path: string): Promise<FileEntry[]> {
    const e = await this.stat(path);
    if (e.type !== 'directory') return [e];
    return this.readdir(e.path);
  }

  private async readdir(dir: string): Promise<FileEntry[]> {
    let raw: GuestDirEntry[];
    try {
      raw = await this.appliance.readdir(dir, this.limits.maxDirectoryEntries);
    } catch (err) {
      throw this.wrap(err, dir);
    }
    return raw.map((r) => entryOf(joinGuestPath(dir, r.name), r as GuestStat, r.name)).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /**
   * Every entry under `path` (depth first, parents before children), without
   * following symlinks; `visit` may return false to skip a directory's contents.
   */
  async walk(path: string, visit: (e: FileEntry, depth: number) => boolean | void | Promise<boolean | void>, signal?: AbortSignal): Promise<void> {
    const top = await this.stat(path);
    let seen = 0;
    const go = async (e: FileEntry, depth: number): Promise<void> => {
      throwIfCancelled(signal, `walk of "${path}"`);
      if (++seen > this.limits.maxWalkEntries) throw new QbackupError('FILE_TOO_LARGE', `"${path}" in ${this.what()} holds more than ${this.limits.maxWalkEntries} entries`);
      const descend = (await visit(e, depth)) !== false;
      if (e.type !== 'directory' || !descend) return;
      for (const child of await this.readdir(e.path)) await go(child, depth + 1);
    };
    await go(top, 0);
  }

  /** Entries under `path` whose name matches a shell glob (*, ?, [...]). */
  async find(path: string, glob: string, signal?: AbortSignal): Promise<FileEntry[]> {
    const re = globRegExp(glob);
    const out: FileEntry[] = [];
    await this.walk(path, (e) => void (re.test(e.name) ? out.push(e) : undefined), signal);
    return out;
  }

  /** Follows symlinks at the end of a path (inside the guest's tree) to a file that is not a link. */
  async resolve(path: string): Promise<FileEntry> {
    let e = await this.stat(path);
    for (let hops = 0; e.type === 'symlink'; hops++) {
      if (hops >= MAX_LINK_HOPS || e.link === undefined) throw new QbackupError('FILE_NOT_FOUND', `"${path}" in ${this.what()} is a loop of symbolic links`);
      const target = e.link.startsWith('/') ? e.link : joinGuestPath(parentOf(e.path), e.link);
      e = await this.stat(target);
    }
    return e;
  }

  /** Writes a regular file's bytes to `out` (not ended); symlinks are followed inside the guest's tree. */
  async read(path: string, out: Writable, entry?: FileEntry): Promise<FileEntry> {
    const e = entry ?? (await this.resolve(path));
    if (e.type !== 'file') throw new QbackupError('INVALID_ARGUMENT', `"${e.path}" in ${this.what()} is a ${e.type}, not a file`);
    if (e.size > this.limits.maxFileBytes) throw new QbackupError('FILE_TOO_LARGE', `"${e.path}" in ${this.what()} has ${e.size} bytes, more than the limit of ${this.limits.maxFileBytes}`);
    // A generous deadline for big files: 2 minutes plus 1 s per 4 MiB (software emulation).
    const timeoutMs = 120_000 + Math.ceil(e.size / (4 << 20)) * 1000;
    try {
      await this.appliance.download(e.path, e.size, out, timeoutMs);
    } catch (err) {
      throw this.wrap(err, e.path);
    }
    return e;
  }

  /** Copies files and directories out (see get.ts). */
  async get(paths: readonly string[], to: string, signal?: AbortSignal): Promise<GetReport> {
    return getInto(this, paths, to, signal);
  }

  /** Ends the appliance and the server. Idempotent. */
  close(): Promise<void> {
    return (this.closing ??= (async () => {
      try {
        await this.appliance.close();
      } finally {
        if (this.record !== undefined) rmSync(this.record, { force: true });
        await this.server.close();
      }
    })());
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function cap(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

/** The backup a session opens: by id, else the newest at or before `until`, else the newest. */
export function pickManifest(manifests: readonly Manifest[], options: { domain: string; backup?: string | undefined; until?: Date | undefined }): Manifest {
  const m =
    options.backup !== undefined
      ? manifests.find((x) => x.id === options.backup)
      : [...manifests].reverse().find((x) => options.until === undefined || new Date(x.time).getTime() <= (options.until?.getTime() ?? 0));
  if (m !== undefined) return m;
  if (options.backup !== undefined) throw new QbackupError('BACKUP_NOT_FOUND', `Repository has no backup "${options.backup}" of domain "${options.domain}"`);
  if (options.until !== undefined) throw new QbackupError('BACKUP_NOT_FOUND', `Repository has no backup of domain "${options.domain}" taken at or before ${options.until.toISOString()}`);
  throw new QbackupError('BACKUP_NOT_FOUND', `Repository has no backup of domain "${options.domain}"`);
}

/** A shell glob as an anchored regular expression: *, ?, [...] and [!...]. */
export function globRegExp(glob: string): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob.charAt(i);
    if (c === '*') re += '.*';
    else if (c === '?') re += '.';
    else if (c === '[') {
      const end = glob.indexOf(']', i + 2);
      if (end < 0) re += '\\[';
      else {
        let body = glob.slice(i + 1, end);
        if (body.startsWith('!')) body = `^${body.slice(1)}`;
        re += `[${body.replace(/\\/g, '\\\\')}]`;
        i = end;
      }
    } else re += c.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
  }
  return new RegExp(`^${re}$`, 's');
}

interface PidRecord {
  owner: number;
  ownerStart: string | undefined;
  helper: number;
  helperStart: string | undefined;
  vm?: number | undefined;
  vmStart?: string | undefined;
}

function writePidRecord(file: string, pids: { helper: number; vm?: number | undefined }): void {
  const r: PidRecord = {
    owner: process.pid,
    ownerStart: processStartTime(process.pid),
    helper: pids.helper,
    helperStart: processStartTime(pids.helper),
    ...(pids.vm !== undefined ? { vm: pids.vm, vmStart: processStartTime(pids.vm) } : {}),
  };
  // Written aside and renamed: a reaper never reads half a record.
  writeFileSync(`${file}.tmp`, JSON.stringify(r), { mode: 0o600 });
  renameSync(`${file}.tmp`, file);
}

/**
 * Ends the appliances of sessions whose process died without closing them
 * (kill -9): each record names the owner, the helper and the VM with their
 * start times, so only those very processes are killed. Returns how many
 * records were reaped.
 */
export function reapStaleSessions(runDir: string): number {
  const dir = join(runDir, 'files');
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return 0;
  }
  let reaped = 0;
  for (const name of names) {
    if (!name.endsWith('.json')) continue; // a .tmp is renamed a moment later
    const file = join(dir, name);
    let r: PidRecord;
    try {
      r = JSON.parse(readFileSync(file, 'utf8')) as PidRecord;
    } catch {
      continue;
    }
    if (isProcessAlive(r.owner, r.ownerStart)) continue;
    for (const [pid, start] of [[r.vm, r.vmStart], [r.helper, r.helperStart]] as const) {
      if (pid === undefined || !isProcessAlive(pid, start)) continue;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
    rmSync(file, { force: true });
    reaped++;
  }
  return reaped;
}
