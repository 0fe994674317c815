// Creating an output file (a restored or exported image) in a directory that
// others may write to, without ever touching a file through a name someone
// else planted there.
//
// Invariants:
// - The file is created by us, exclusively (O_CREAT|O_EXCL|O_NOFOLLOW), at a
//   temporary name beside the final one with a random part, so that no one
//   can plant that name before us (and no planted name makes us fail).
// - Tools that must open the file by name (qemu-img, qemu-nbd) get
//   `/proc/<pid>/fd/<fd>`: that name reaches exactly the inode we created,
//   whatever is later renamed or planted in the directory.
// - The finished file is linked at its final name with link(2), which fails
//   rather than replace anything there and follows no symlink; only where the
//   filesystem has no hard links is it renamed (after checking the name is free).
// - Nothing is written under /proc, /sys or /dev (kernel pseudo-filesystems):
//   such a destination is refused before anything is created.

import { constants, openSync, promises as fs, realpathSync, type Stats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join, resolve } from 'node:path';
import { QbackupError, describeError } from '../errors.js';

const PSEUDO_ROOTS = ['/proc', '/sys', '/dev'];

/** The nearest existing ancestor of `path` (itself included), with symlinks resolved. */
function realAncestor(path: string): string {
  for (let p = resolve(path); ; p = dirname(p)) {
    try {
      return realpathSync(p);
    } catch {
      if (dirname(p) === p) return p;
    }
  }
}

/**
 * Throws INVALID_ARGUMENT when `path` is (or would be created) inside /proc,
 * /sys or /dev; `what` begins the sentence, e.g. 'Cannot restore disk "sda" of backup "…"'.
 */
export function refusePseudoFilesystem(path: string, what: string): void {
  const candidates = [resolve(path), realAncestor(path)];
  for (const c of candidates) {
    const root = PSEUDO_ROOTS.find((r) => c === r || c.startsWith(`${r}/`));
    if (root !== undefined) throw new QbackupError('INVALID_ARGUMENT', `${what}: "${path}" is in ${root}, a kernel pseudo-filesystem`);
  }
}

/** A file being created; `commit()` puts it at its final name, disposal without commit removes it. */
export interface NewFile extends AsyncDisposable {
  /** The final name. */
  readonly path: string;
  /** The open file (read-write). */
  readonly handle: FileHandle;
  /** A name other processes can open that reaches exactly this file (never a planted one). */
  readonly fdPath: string;
  /** Syncs, sets mode 0600, closes and links the file at its final name; fails if that name is taken. */
  commit(): Promise<void>;
  /** Closes and removes the temporary file; idempotent, a no-op after commit. */
  discard(): Promise<void>;
}

/**
 * Creates a new empty file that will become `path`: refuses a destination in a
 * pseudo-filesystem or a `path` that exists, creates missing directories 0700.
 * `what` begins error sentences ('Cannot restore disk "sda" of backup "…"').
 */
export async function createNewFile(path: string, what: string): Promise<NewFile> {
  const final = resolve(path);
  refusePseudoFilesystem(final, what);
  await fs.mkdir(dirname(final), { recursive: true, mode: 0o700 });
  if (await exists(final)) throw new QbackupError('INVALID_ARGUMENT', `${what}: "${path}" exists`);
  const temp = join(dirname(final), `${basename(final)}.partial-${randomBytes(8).toString('hex')}`);
  let handle: FileHandle;
  try {
    handle = await fs.open(temp, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `${what}: cannot create "${temp}": ${describeError(err)}`, { cause: err });
  }
  let state: 'open' | 'committed' | 'discarded' = 'open';
  // The inode we made, to make sure the name we link or remove is still it.
  const mine = await handle.stat();
  const isMine = (st: Stats | undefined): boolean => st !== undefined && st.ino === mine.ino && st.dev === mine.dev;
  const discard = async (): Promise<void> => {
    if (state !== 'open') return;
    state = 'discarded';
    await handle.close().catch(() => undefined);
    if (isMine(await lstatOrUndefined(temp))) await fs.rm(temp, { force: true });
  };
  return {
    path: final,
    handle,
    fdPath: `/proc/${process.pid}/fd/${handle.fd}`,
    async commit() {
      if (state !== 'open') throw new QbackupError('INVALID_ARGUMENT', `${what}: "${path}" was already ${state}`);
      await handle.sync();
      await handle.chmod(0o600);
      await handle.close();
      state = 'committed';
      try {
        if (!isMine(await lstatOrUndefined(temp))) throw new QbackupError('INVALID_ARGUMENT', `${what}: "${temp}" was replaced while it was written`);
        await linkOnce(temp, final, () => new QbackupError('INVALID_ARGUMENT', `${what}: "${path}" exists`));
      } finally {
        if (isMine(await lstatOrUndefined(temp))) await fs.rm(temp, { force: true });
      }
    },
    discard,
    [Symbol.asyncDispose]: discard,
  };
}

/** Gives `from`'s file the name `to` too, never replacing what `to` names. */
async function linkOnce(from: string, to: string, taken: () => QbackupError): Promise<void> {
  try {
    await fs.link(from, to);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw Object.assign(taken(), { cause: err });
    // A filesystem without hard links: rename, which replaces a symlink rather than following it.
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'EXDEV') throw err;
    if (await exists(to)) throw Object.assign(taken(), { cause: err });
    await fs.rename(from, to);
  }
}

/** A file created exclusively at its final name; `fdPath` reaches exactly it. Closing is idempotent. */
export interface ExclusiveFile extends AsyncDisposable {
  readonly handle: FileHandle;
  readonly fdPath: string;
  close(): Promise<void>;
}

/**
 * Creates `path` exclusively (never following a symlink, never reusing a
 * file), mode 0600, for outputs that must live at their final name from the
 * start (the overlays of an instant restore, which a domain definition names).
 */
export async function createExclusiveFile(path: string, what: string): Promise<ExclusiveFile> {
  refusePseudoFilesystem(path, what);
  let handle: FileHandle;
  try {
    handle = await fs.open(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' || code === 'ELOOP') throw new QbackupError('INVALID_ARGUMENT', `${what}: "${path}" exists`, { cause: err });
    throw new QbackupError('INVALID_ARGUMENT', `${what}: cannot create "${path}": ${describeError(err)}`, { cause: err });
  }
  let closed = false;
  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    await handle.close();
  };
  return { handle, fdPath: `/proc/${process.pid}/fd/${handle.fd}`, close, [Symbol.asyncDispose]: close };
}

async function lstatOrUndefined(p: string): Promise<Stats | undefined> {
  return fs.lstat(p).catch(() => undefined);
}

async function exists(p: string): Promise<boolean> {
  return (await lstatOrUndefined(p)) !== undefined;
}

/**
 * Opens a log or output file by name for writing (created 0600 if missing),
 * never through a symlink planted at that name: `truncate` starts it empty,
 * `append` keeps what is there. Returns the descriptor.
 */
export function openLogFile(path: string, how: 'truncate' | 'append'): number {
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_NOFOLLOW | (how === 'truncate' ? constants.O_TRUNC : constants.O_APPEND);
  return openSync(path, flags, 0o600);
}
