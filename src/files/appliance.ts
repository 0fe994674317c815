// The libguestfs appliance as one child process: the Perl helper of
// helper-source.ts, which holds a Sys::Guestfs handle whose small VM opens the
// disks read-only from NBD. This module owns the process: requests and
// replies (one JSON line each), file contents on fd 3, a timeout on every
// request, and close() that ends the helper and its VM on every path.
//
// Invariants:
// - Every request has a deadline; one that passes it kills the helper (the
//   VM goes with it) and fails every pending request with that cause: a
//   stuck guest filesystem never hangs the caller.
// - A download is announced by the caller with its exact size (from an
//   lstat of a read-only filesystem); bytes on fd 3 belong to the download at
//   the head of the queue. A download that fails after it began leaves the
//   data pipe out of step, so the appliance is closed.
// - Guest names are bytes: they travel as \u00XX escapes and come back as
//   Buffers decoded as UTF-8 for display (names that are not UTF-8 are shown
//   with U+FFFD and cannot be addressed by path).
// - close() is idempotent: end of stdin lets the helper shut the VM down;
//   after a grace period the helper and the VM get SIGKILL by pid.

import { spawn, type ChildProcess } from 'node:child_process';
import { statSync } from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import { QbackupError } from '../errors.js';
import { HELPER_SOURCE } from './helper-source.js';

/** How the appliance runs; the adapters fill it from their configuration. */
export interface ApplianceSettings {
  /** libguestfs backend (default "direct": a QEMU child, no libvirt). */
  backend?: string | undefined;
  /** e.g. ["force_tcg"] where KVM is present but cannot run a guest. */
  backendSettings?: readonly string[] | undefined;
  /** The whole environment of the helper (SUPERMIN_KERNEL, SUPERMIN_MODULES, PATH, …); default: inherited. */
  environment?: Readonly<Record<string, string>> | undefined;
  /** Deadline of the launch (default 10 minutes: software emulation on a busy host). */
  launchTimeoutMs?: number | undefined;
  /** Deadline of every other request (default 2 minutes). */
  requestTimeoutMs?: number | undefined;
  /** Appliance memory (default libguestfs's). */
  memsizeMiB?: number | undefined;
  /** Told the helper's and the VM's pids as soon as they are known (to record them for a later reaper). */
  onPids?: ((pids: { helper: number; vm?: number | undefined }) => void) | undefined;
}

export interface NbdDrive {
  /** The unix socket of the NBD server. */
  socket: string;
  export: string;
}

export interface GuestStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  mtimeNs: number;
  atime: number;
  atimeNs: number;
  nlink: number;
  ino: number;
  /** A symlink's target. */
  link?: string;
}

export interface GuestDirEntry extends GuestStat {
  name: string;
}

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  op: string;
}

interface Download {
  remaining: number;
  /** Where the bytes go; once it is destroyed (a client went away) the rest is read and dropped, keeping the pipe in step. */
  out: Writable;
  done: () => void;
}

/** Turns a guest name (bytes as \u00XX) into a JS string. */
function fromWire(s: string): string {
  return Buffer.from(s, 'latin1').toString('utf8');
}

/** A JS string as the helper reads it: its UTF-8 bytes as \u00XX, ASCII JSON. */
function toWire(s: string): string {
  return Buffer.from(s, 'utf8').toString('latin1');
}

function asciiJson(value: unknown): string {
  return JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

export class GuestfsAppliance implements AsyncDisposable {
  private readonly child: ChildProcess;
  private readonly pending = new Map<number, Pending>();
  private readonly downloads: Download[] = [];
  private nextId = 1;
  private buffer = '';
  private failure: Error | undefined;
  private closing: Promise<void> | undefined;
  private vmPid: number | undefined;
  private stderrTail = '';
  private readonly exited: Promise<void>;

  private constructor(private readonly settings: ApplianceSettings) {
    this.child = spawn('perl', ['-e', HELPER_SOURCE], {
      stdio: ['pipe', 'pipe', 'pipe', 'pipe'],
      ...(settings.environment !== undefined ? { env: { ...settings.environment } } : {}),
    });
    this.exited = new Promise((resolve) => this.child.once('close', () => resolve()));
    this.child.on('error', (err) => this.fail(new QbackupError('APPLIANCE_FAILED', `Cannot start the file-browsing appliance: ${err.message} (install libguestfs-tools: scripts/setup.sh)`, { cause: err })));
    this.child.stdout?.setEncoding('latin1');
    this.child.stdout?.on('data', (s: string) => this.onStdout(s));
    this.child.stderr?.on('data', (b: Buffer) => (this.stderrTail = (this.stderrTail + b.toString('utf8')).slice(-4000)));
    (this.child.stdio[3] as Readable | null)?.on('data', (b: Buffer) => this.onData(b));
    this.child.once('close', (code, signal) => this.fail(new QbackupError('APPLIANCE_FAILED', `The file-browsing appliance stopped (${signal ?? `status ${code ?? '?'}`})${this.stderrHint()}`)));
    if (this.child.pid !== undefined) settings.onPids?.({ helper: this.child.pid });
  }

  /** Starts the helper, adds the drives read-only and boots the VM. */
  static async launch(drives: readonly NbdDrive[], settings: ApplianceSettings = {}): Promise<GuestfsAppliance> {
    if (settings.environment !== undefined) checkSuperminEnvironment(settings.environment);
    const a = new GuestfsAppliance(settings);
    try {
      await a.request('add', { drives });
      const r = (await a.request('launch', { backend: settings.backend ?? 'direct', ...(settings.backendSettings !== undefined ? { backendSettings: settings.backendSettings } : {}), ...(settings.memsizeMiB !== undefined ? { memsizeMiB: settings.memsizeMiB } : {}) }, settings.launchTimeoutMs ?? 600_000)) as { pid: number };
      a.vmPid = r.pid;
      if (a.child.pid !== undefined) settings.onPids?.({ helper: a.child.pid, vm: r.pid });
      return a;
    } catch (err) {
      await a.close();
      if (/Can't locate Sys\/Guestfs/.test(a.stderrTail) || (err instanceof QbackupError && /ENOENT/.test(err.message))) {
        throw new QbackupError('APPLIANCE_FAILED', 'The file-browsing appliance cannot start: libguestfs and its Perl binding are not installed; install libguestfs-tools and linux-image-amd64 (scripts/setup.sh does)', { cause: err });
      }
      if (err instanceof QbackupError && err.code === 'APPLIANCE_TIMEOUT') throw err;
      const why = (err instanceof Error ? err.message : String(err)).replace(/[.\s]+$/, '');
      throw new QbackupError('APPLIANCE_FAILED', `The file-browsing appliance cannot start (${why}${a.stderrHint()}): run libguestfs-test-tool to see why, and install libguestfs-tools and linux-image-amd64 (scripts/setup.sh does)`, { cause: err });
    }
  }

  get pids(): { helper: number | undefined; vm: number | undefined } {
    return { helper: this.child.pid, vm: this.vmPid };
  }

  private stderrHint(): string {
    const lines = this.stderrTail.trim().split('\n').filter((l) => l.trim() !== '' && !l.startsWith('libguestfs: trace'));
    const last = lines.at(-1);
    return last !== undefined ? ` (${last.trim().slice(0, 300)})` : '';
  }

  /** One request; resolves with the helper's `ok` value. */
  request(op: string, args: Record<string, unknown> = {}, timeoutMs = this.settings.requestTimeoutMs ?? 120_000): Promise<unknown> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.fail(new QbackupError('APPLIANCE_TIMEOUT', `The file-browsing appliance did not finish "${op}" within ${Math.round(timeoutMs / 1000)} s; it was stopped`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, op });
      this.child.stdin?.write(`${asciiJson(encodeStrings({ id, op, ...args }))}\n`);
    });
  }

  async lstat(path: string): Promise<GuestStat> {
    return decodeStat((await this.request('lstat', { path })) as GuestStat);
  }

  async readdir(path: string, maxEntries: number): Promise<GuestDirEntry[]> {
    const list = (await this.request('readdir', { path, max: maxEntries })) as GuestDirEntry[];
    return list.map((e) => ({ ...decodeStat(e), name: fromWire(e.name) }));
  }

  /** Writes exactly `size` bytes of a regular file to `out`, in order, with backpressure (`out` is not ended). */
  async download(path: string, size: number, out: Writable, timeoutMs?: number): Promise<void> {
    let done!: () => void;
    const received = new Promise<void>((resolve) => (done = resolve));
    const d: Download = { remaining: size, out, done };
    this.downloads.push(d);
    if (size === 0) this.finishDownload(d);
    try {
      await this.request('download', { path }, timeoutMs);
    } catch (err) {
      // Bytes of this file may be in flight: the data pipe cannot be trusted any more.
      if (d.remaining > 0 && d.remaining < size) this.fail(new QbackupError('APPLIANCE_FAILED', `The download of "${path}" broke off; the file-browsing appliance was stopped`, { cause: err }));
      const i = this.downloads.indexOf(d);
      if (i >= 0) this.downloads.splice(i, 1);
      throw err;
    }
    await Promise.race([received, new Promise<never>((_, reject) => this.exited.then(() => reject(this.failure ?? new QbackupError('APPLIANCE_FAILED', 'The file-browsing appliance stopped'))))]);
  }

  private finishDownload(d: Download): void {
    const i = this.downloads.indexOf(d);
    if (i >= 0) this.downloads.splice(i, 1);
    d.done();
  }

  private onData(b: Buffer): void {
    let at = 0;
    while (at < b.length) {
      const d = this.downloads[0];
      if (d === undefined) {
        this.fail(new QbackupError('APPLIANCE_FAILED', 'The file-browsing appliance sent file data nobody asked for; it was stopped'));
        return;
      }
      const n = Math.min(d.remaining, b.length - at);
      if (n > 0 && !d.out.destroyed && !d.out.write(b.subarray(at, at + n))) {
        const data = this.child.stdio[3] as Readable;
        data.pause();
        const resume = (): void => void data.resume();
        d.out.once('drain', resume);
        d.out.once('close', resume);
      }
      d.remaining -= n;
      at += n;
      if (d.remaining === 0) this.finishDownload(d);
    }
  }

  private onStdout(s: string): void {
    this.buffer += s;
    for (;;) {
      const nl = this.buffer.indexOf('\n');
      if (nl < 0) break;
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      let msg: { id?: number; ok?: unknown; error?: string };
      try {
        msg = JSON.parse(line) as typeof msg;
      } catch {
        continue; // not ours (a library printing on stdout): ignored
      }
      const p = msg.id !== undefined ? this.pending.get(msg.id) : undefined;
      if (p === undefined || msg.id === undefined) continue;
      this.pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.error !== undefined) p.reject(new GuestfsError(p.op, fromWire(msg.error)));
      else p.resolve(msg.ok);
    }
  }

  private fail(err: Error): void {
    if (this.failure !== undefined) return;
    this.failure = err;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    this.kill();
  }

  private kill(): void {
    for (const pid of [this.vmPid, this.child.pid]) {
      if (pid === undefined) continue;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }

  /** Ends the helper and the VM. Idempotent. */
  close(): Promise<void> {
    return (this.closing ??= (async () => {
      if (this.child.exitCode === null && this.child.signalCode === null) {
        this.child.stdin?.end();
        const grace = setTimeout(() => this.kill(), 10_000);
        await this.exited;
        clearTimeout(grace);
      }
      if (this.failure === undefined) this.fail(new QbackupError('APPLIANCE_FAILED', 'The file-browsing appliance is closed'));
      // The VM may outlive a helper that died abruptly (the recovery process normally stops it).
      if (this.vmPid !== undefined) {
        try {
          process.kill(this.vmPid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    })());
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** An error the helper reported for one request (libguestfs's own message). */
export class GuestfsError extends Error {
  constructor(
    readonly op: string,
    readonly guestfsMessage: string,
  ) {
    super(`${op}: ${guestfsMessage}`);
    this.name = 'GuestfsError';
  }

  /** libguestfs says ENOENT as "No such file or directory". */
  get notFound(): boolean {
    return /No such file or directory/i.test(this.guestfsMessage);
  }
}

/**
 * supermin's kernel variables, checked before anything starts: one that names
 * nothing makes supermin fail deep in its build with a message about Xen
 * kernels, so the user gets the variable and its value instead.
 */
function checkSuperminEnvironment(env: Readonly<Record<string, string>>): void {
  const kind = (path: string): 'file' | 'directory' | undefined => {
    try {
      const st = statSync(path);
      return st.isFile() ? 'file' : st.isDirectory() ? 'directory' : undefined;
    } catch {
      return undefined;
    }
  };
  const kernel = env['SUPERMIN_KERNEL'];
  if (kernel !== undefined && kernel !== '' && kind(kernel) !== 'file') {
    throw new QbackupError('APPLIANCE_FAILED', `The file-browsing appliance cannot start: SUPERMIN_KERNEL "${kernel}" is not a file; point it at a kernel (vmlinuz) or unset it so the host's /boot/vmlinuz-* is used`);
  }
  const modules = env['SUPERMIN_MODULES'];
  if (modules !== undefined && modules !== '' && kind(modules) !== 'directory') {
    throw new QbackupError('APPLIANCE_FAILED', `The file-browsing appliance cannot start: SUPERMIN_MODULES "${modules}" is not a directory; point it at the kernel's modules (a real directory on which depmod has run) or unset it`);
  }
}

function decodeStat(s: GuestStat): GuestStat {
  return s.link !== undefined ? { ...s, link: fromWire(s.link) } : s;
}

function encodeStrings(value: unknown): unknown {
  if (typeof value === 'string') return toWire(value);
  if (Array.isArray(value)) return value.map(encodeStrings);
  if (value !== null && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, encodeStrings(v)]));
  return value;
}

export { fromWire as guestName };
