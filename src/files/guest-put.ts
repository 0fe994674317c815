// Copying files and directories out of a backup into a running domain's
// guest, through its guest agent (qemu-ga): the agent's file API
// (guest-file-open / guest-file-write / guest-file-close) writes the bytes,
// in chunks of CHUNK_BYTES (each goes base64-encoded in one JSON command).
// Where the agent also allows guest-exec, directories are made (mkdir),
// existing names are checked (test, never following a link) and owners and
// modes are set (chown, chmod) by running those commands in the guest.
//
// What is kept: file bytes; with guest-exec, directories, numeric owners and
// modes. What is not: times (the agent has no call for them), symlinks,
// devices, fifos and sockets (skipped and reported). Without guest-exec only
// files directly under existing directories are written, with the mode the
// agent gives new files.
//
// Invariants:
// - Nothing is written outside `dir`: it is absolute without "." or ".."
//   components, and every name below it is checked (get.ts's safeName).
// - Nothing is overwritten: a name that exists in the guest is refused,
//   in one sentence, before anything is written there.
// - Every handle opened is closed, whatever happens.

import { Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { QbackupError } from '../errors.js';
import { throwIfCancelled } from '../util/operation.js';
import { sleep } from '../util/proc.js';
import type { GuestAgentSession, HypervisorDriver } from '../drivers/driver.js';
import { escapeName, type FileEntry } from './entries.js';
import { safeName } from './get.js';
import type { FileSession, GetReport } from './session.js';

/** Bytes per guest-file-write: 256 KiB (about 350 KB of base64 in one command). */
export const CHUNK_BYTES = 256 * 1024;
const EXEC_TIMEOUT_MS = 60_000;

export interface GuestPutReport extends GetReport {
  /** The domain written into. */
  domain: string;
  /** What the guest did not get (e.g. times, and modes without guest-exec). */
  notKept: string[];
}

/** An absolute guest path with no empty, "." or ".." components (a trailing "/" allowed); else one sentence. */
export function checkGuestDir(dir: string): string {
  const parts = dir.split('/').slice(1);
  if (parts.length > 0 && parts[parts.length - 1] === '') parts.pop();
  if (!dir.startsWith('/') || dir.includes('\0') || parts.some((p) => p === '' || p === '.' || p === '..')) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot write files into the guest's directory "${escapeName(dir)}": give an absolute path without "." or ".." components`);
  }
  return `/${parts.join('/')}`;
}

const guestJoin = (dir: string, name: string): string => (dir === '/' ? `/${name}` : `${dir}/${name}`);

class GuestWriter {
  private execEnabled = false;

  constructor(
    private readonly agent: GuestAgentSession,
    readonly report: GuestPutReport,
  ) {}

  /** Learns which commands the agent allows; the file API is required. */
  async probe(): Promise<void> {
    const info = await this.agent.execute<{ supported_commands?: Array<{ name: string; enabled: boolean }> }>('guest-info');
    const enabled = new Set((info.supported_commands ?? []).filter((c) => c.enabled).map((c) => c.name));
    const missing = ['guest-file-open', 'guest-file-write', 'guest-file-close'].filter((c) => !enabled.has(c));
    if (missing.length > 0) throw new QbackupError('GUEST_AGENT', `The guest agent of domain "${this.agent.domain}" does not allow ${missing.join(', ')}, so files cannot be written into its guest`);
    this.execEnabled = enabled.has('guest-exec') && enabled.has('guest-exec-status');
    this.report.notKept.push('times');
    if (!this.execEnabled) this.report.notKept.push('modes', 'owners', 'directories (guest-exec is not allowed by the agent)');
  }

  /** Runs a command in the guest and waits for it; its exit code and stderr. */
  private async exec(path: string, args: string[]): Promise<{ code: number; stderr: string }> {
    const { pid } = await this.agent.execute<{ pid: number }>('guest-exec', { path, arg: args, 'capture-output': true });
    const deadline = Date.now() + EXEC_TIMEOUT_MS;
    for (let wait = 10; ; wait = Math.min(wait * 2, 500)) {
      const s = await this.agent.execute<{ exited: boolean; exitcode?: number; signal?: number; 'err-data'?: string }>('guest-exec-status', { pid });
      if (s.exited) return { code: s.exitcode ?? 128 + (s.signal ?? 0), stderr: Buffer.from(s['err-data'] ?? '', 'base64').toString('utf8').trim() };
      if (Date.now() > deadline) throw new QbackupError('GUEST_AGENT', `"${path}" in the guest of domain "${this.agent.domain}" did not end in ${EXEC_TIMEOUT_MS / 1000} s`);
      await sleep(wait);
    }
  }

  private async run(what: string, path: string, args: string[]): Promise<void> {
    const r = await this.exec(path, args);
    if (r.code !== 0) throw new QbackupError('GUEST_AGENT', `Cannot ${what} in the guest of domain "${this.agent.domain}": ${r.stderr || `${path} exited with ${r.code}`}`);
  }

  /** 'none', 'directory' (a real one, not a link to one) or 'other'. */
  private async kind(path: string): Promise<'none' | 'directory' | 'other'> {
    if (this.execEnabled) {
      const r = await this.exec('/bin/sh', ['-c', 'if test -L "$1"; then exit 2; elif test -d "$1"; then exit 0; elif test -e "$1"; then exit 2; else exit 1; fi', 'sh', path]);
      return r.code === 0 ? 'directory' : r.code === 1 ? 'none' : 'other';
    }
    // Without guest-exec: an open for reading succeeds on anything that exists and can be read.
    try {
      const handle = await this.agent.execute<number>('guest-file-open', { path, mode: 'r' });
      await this.agent.execute('guest-file-close', { handle });
      return 'other';
    } catch {
      return 'none';
    }
  }

  /** Makes directory `path` (for `what` of the backup); an existing real directory is entered when `existingOk`. */
  async directory(what: string, path: string, existingOk: boolean): Promise<boolean> {
    const k = await this.kind(path);
    if (k === 'directory' && existingOk) return false;
    if (k !== 'none') throw new QbackupError('INVALID_ARGUMENT', `Cannot write directory "${escapeName(what)}" to "${escapeName(path)}" in the guest of domain "${this.agent.domain}": it exists (nothing is overwritten)`);
    if (!this.execEnabled) throw new QbackupError('GUEST_AGENT', `Cannot make directory "${escapeName(path)}" in the guest of domain "${this.agent.domain}": its agent does not allow guest-exec`);
    // The directory written into is made with its parents (the user named it); those below it one by one.
    await this.run(`make directory "${escapeName(path)}"`, 'mkdir', [...(existingOk ? ['-p'] : []), '-m', '700', '--', path]);
    return true;
  }

  async attributes(e: FileEntry, path: string): Promise<void> {
    if (!this.execEnabled) return;
    await this.run(`set the owner of "${escapeName(path)}"`, 'chown', ['-h', `${e.uid}:${e.gid}`, '--', path]);
    await this.run(`set the mode of "${escapeName(path)}"`, 'chmod', [(e.mode & 0o7777).toString(8), '--', path]);
  }

  async file(session: FileSession, e: FileEntry, path: string): Promise<void> {
    if ((await this.kind(path)) !== 'none') throw new QbackupError('INVALID_ARGUMENT', `Cannot write "${escapeName(e.path)}" to "${escapeName(path)}" in the guest of domain "${this.agent.domain}": it exists (nothing is overwritten)`);
    const handle = await this.agent.execute<number>('guest-file-open', { path, mode: 'w' });
    try {
      // The agent makes new files readable as its umask allows: owner-only until the bytes are in.
      if (this.execEnabled) await this.run(`set the mode of "${escapeName(path)}"`, 'chmod', ['600', '--', path]);
      const out = new ChunkWriter((chunk) => this.write(handle, chunk, path));
      out.on('error', () => undefined); // reported through `written` below
      const written = finished(out);
      let failure: unknown;
      try {
        await session.read(e.path, out, e);
        out.end();
      } catch (err) {
        failure = err;
        out.destroy();
      }
      // A write the agent refused ends the stream with its error, which comes out here.
      await written.catch((err: unknown) => {
        failure ??= err;
      });
      if (failure !== undefined) throw failure;
    } finally {
      await this.agent.execute('guest-file-close', { handle }).catch(() => undefined);
    }
    await this.attributes(e, path);
  }

  private async write(handle: number, chunk: Buffer, path: string): Promise<void> {
    let at = 0;
    while (at < chunk.length) {
      const part = chunk.subarray(at);
      const r = await this.agent.execute<{ count: number }>('guest-file-write', { handle, 'buf-b64': part.toString('base64') });
      if (!(r.count > 0)) throw new QbackupError('GUEST_AGENT', `The guest agent of domain "${this.agent.domain}" wrote nothing to "${escapeName(path)}"`);
      at += r.count;
    }
  }
}

/** A Writable that hands `write` whole chunks of CHUNK_BYTES (the last one shorter), one at a time. */
class ChunkWriter extends Writable {
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(private readonly put: (chunk: Buffer) => Promise<void>) {
    super();
  }

  override _write(data: Buffer, _enc: BufferEncoding, done: (err?: Error | null) => void): void {
    this.pending.push(data);
    this.pendingBytes += data.length;
    this.drainFull().then(() => done(), done);
  }

  private async drainFull(): Promise<void> {
    while (this.pendingBytes >= CHUNK_BYTES) {
      const all = Buffer.concat(this.pending);
      this.pending = [all.subarray(CHUNK_BYTES)];
      this.pendingBytes = all.length - CHUNK_BYTES;
      await this.put(all.subarray(0, CHUNK_BYTES));
    }
  }

  override _final(done: (err?: Error | null) => void): void {
    const rest = Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    (rest.length > 0 ? this.put(rest) : Promise.resolve()).then(() => done(), done);
  }
}

/**
 * Copies `paths` of the backup open in `session` into the guest directory
 * `dir` of the agent's domain (made when missing, given guest-exec).
 */
export async function putIntoGuest(session: FileSession, paths: readonly string[], agent: GuestAgentSession, dir: string, signal?: AbortSignal): Promise<GuestPutReport> {
  if (paths.length === 0) throw new QbackupError('INVALID_ARGUMENT', 'Give at least one path to get');
  const root = checkGuestDir(dir);
  const report: GuestPutReport = { domain: agent.domain, files: 0, directories: 0, symlinks: 0, bytes: 0, skipped: [], written: [], notKept: [] };
  const w = new GuestWriter(agent, report);
  await w.probe();
  const rootMade = root === '/' ? false : await w.directory(root, root, true);
  for (const p of paths) {
    const top = await session.stat(p);
    await putEntry(session, w, top, top.path === '/' ? root : guestJoin(root, top.name), top.path === '/', signal);
  }
  if (rootMade) report.written.unshift(root);
  return report;
}

async function putEntry(session: FileSession, w: GuestWriter, e: FileEntry, path: string, isRoot: boolean, signal: AbortSignal | undefined): Promise<void> {
  throwIfCancelled(signal, `get of "${e.path}"`);
  const report = w.report;
  if (!isRoot && !safeName(e.name)) {
    report.skipped.push({ path: e.path, reason: `unsafe name "${escapeName(e.name)}"` });
    return;
  }
  if (e.type === 'directory') {
    if (!isRoot) await w.directory(e.path, path, false);
    for (const child of await session.list(e.path)) {
      await putEntry(session, w, child, guestJoin(path, child.name), false, signal);
    }
    if (!isRoot) await w.attributes(e, path);
    report.directories++;
  } else if (e.type === 'file') {
    await w.file(session, e, path);
    report.files++;
    report.bytes += e.size;
  } else {
    report.skipped.push({ path: e.path, reason: `a ${e.type} is not written into a guest` });
    return;
  }
  report.written.push(path);
}

/** Opens the guest agent of `domain` through `driver`, copies `paths` into its guest directory `dir`, and closes the agent. */
export async function copyIntoGuest(session: FileSession, paths: readonly string[], driver: HypervisorDriver, domain: string, dir: string, signal?: AbortSignal): Promise<GuestPutReport> {
  checkGuestDir(dir);
  if (driver.guestAgent === undefined) throw new QbackupError('NOT_SUPPORTED', `The hypervisor at ${driver.uri} gives no way to a guest agent, so files cannot be written into domain "${domain}"`);
  const agent = await driver.guestAgent(domain);
  try {
    return await putIntoGuest(session, paths, agent, dir, signal);
  } finally {
    await agent.close();
  }
}
