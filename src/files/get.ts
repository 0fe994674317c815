// Copying files and directories out of a backup into a host directory, with
// their modes, owners (when run as root) and times.
//
// Invariants (the guest's names and link targets are hostile):
// - Nothing is written outside `to`: every host path is `to` joined with
//   names checked one by one (no "/", no "." or "..", no NUL, not empty), and
//   every name is created with a call that fails on an existing entry and
//   never follows a symlink there: mkdir, symlink, and a file downloaded into
//   a private temporary name then hard-linked into place (link() fails with
//   EEXIST rather than writing through a link). An existing directory is
//   entered only when lstat shows a real directory.
// - Symlinks are recreated as symlinks with their target as stored; they are
//   never followed, in the guest or on the host.
// - Devices, fifos and sockets are skipped and reported.
// - A directory's mode and times are set after its contents are written.

import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { chmod, chown, lchown, link, lstat, lutimes, mkdir, rm, symlink, unlink, utimes } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { finished } from 'node:stream/promises';
import { QbackupError } from '../errors.js';
import { throwIfCancelled } from '../util/operation.js';
import { escapeName, type FileEntry } from './entries.js';
import type { FileSession, GetReport } from './session.js';

/** A name that is safe as one component of a host path. */
export function safeName(name: string): boolean {
  return name !== '' && name !== '.' && name !== '..' && !name.includes('/') && !name.includes('\0') && Buffer.byteLength(name) <= 255;
}

export async function getInto(session: FileSession, paths: readonly string[], to: string, signal?: AbortSignal): Promise<GetReport> {
  if (paths.length === 0) throw new QbackupError('INVALID_ARGUMENT', 'Give at least one path to get');
  const root = resolve(to);
  await mkdir(root, { recursive: true, mode: 0o700 });
  const st = await lstat(root);
  if (!st.isDirectory()) throw new QbackupError('INVALID_ARGUMENT', `Cannot get files into "${to}": it is not a directory`);
  const report: GetReport = { files: 0, directories: 0, symlinks: 0, bytes: 0, skipped: [], written: [] };
  const asRoot = process.getuid?.() === 0;
  for (const p of paths) {
    const top = await session.stat(p);
    // The root of the tree has no name of its own: its contents go straight into `to`.
    await writeEntry(session, top, top.path === '/' ? root : join(root, top.name), top.path === '/', report, asRoot, signal);
  }
  return report;
}

async function writeEntry(session: FileSession, e: FileEntry, host: string, isRoot: boolean, report: GetReport, asRoot: boolean, signal: AbortSignal | undefined): Promise<void> {
  throwIfCancelled(signal, `get of "${e.path}"`);
  if (!isRoot && !safeName(e.name)) {
    report.skipped.push({ path: e.path, reason: `unsafe name "${escapeName(e.name)}"` });
    return;
  }
  if (e.type === 'directory') {
    await makeDirectory(host, e.path);
    for (const child of await session.list(e.path)) {
      await writeEntry(session, child, join(host, child.name), false, report, asRoot, signal);
    }
    if (asRoot) await chown(host, e.uid, e.gid);
    await chmod(host, e.mode);
    await utimes(host, e.atimeSec + e.atimeNs / 1e9, e.mtimeSec + e.mtimeNs / 1e9);
    report.directories++;
  } else if (e.type === 'symlink') {
    await create(host, e.path, () => symlink(e.link ?? '', host));
    if (asRoot) await lchown(host, e.uid, e.gid);
    await lutimes(host, e.atimeSec + e.atimeNs / 1e9, e.mtimeSec + e.mtimeNs / 1e9);
    report.symlinks++;
  } else if (e.type === 'file') {
    await writeFile(session, e, host, asRoot);
    report.files++;
    report.bytes += e.size;
  } else {
    report.skipped.push({ path: e.path, reason: `a ${e.type} is not copied` });
    return;
  }
  report.written.push(host);
}

async function makeDirectory(host: string, guestPath: string): Promise<void> {
  try {
    await mkdir(host, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    const st = await lstat(host);
    if (!st.isDirectory()) throw new QbackupError('INVALID_ARGUMENT', `Cannot write directory "${escapeName(guestPath)}" to "${host}": something that is not a directory is there`);
  }
}

async function create(host: string, guestPath: string, make: () => Promise<void>): Promise<void> {
  try {
    await make();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new QbackupError('INVALID_ARGUMENT', `Cannot write "${escapeName(guestPath)}" to "${host}": it exists (get never overwrites)`);
    throw err;
  }
}

async function writeFile(session: FileSession, e: FileEntry, host: string, asRoot: boolean): Promise<void> {
  const dir = host.slice(0, host.lastIndexOf('/')) || '/';
  const tmp = join(dir, `.qbackup-get-${randomBytes(8).toString('hex')}`);
  // 'wx': O_CREAT|O_EXCL, which never follows a symlink at the name.
  const out = createWriteStream(tmp, { flags: 'wx', mode: 0o600 });
  try {
    await new Promise<void>((res, rej) => {
      out.once('open', () => res());
      out.once('error', rej);
    });
    await session.read(e.path, out, e);
    out.end();
    await finished(out);
    if (asRoot) await chown(tmp, e.uid, e.gid);
    await chmod(tmp, e.mode);
    await utimes(tmp, e.atimeSec + e.atimeNs / 1e9, e.mtimeSec + e.mtimeNs / 1e9);
    await create(host, e.path, () => link(tmp, host));
  } finally {
    out.destroy();
    await unlink(tmp).catch(() => rm(tmp, { force: true }));
  }
}
