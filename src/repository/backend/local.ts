// A repository in a local directory. Objects are files named by their keys;
// a put writes a temporary file, fsyncs it, and links it into place (link
// fails if the name exists, which makes put-if-absent atomic), then fsyncs
// the directory.
//
// Invariants:
// - Nothing outside the repository's root is ever opened, written or
//   deleted: keys are validated (backend.ts), every directory on the way is
//   checked to be a real directory (not a symlink) and files are opened with
//   O_NOFOLLOW.
// - Files are created 0600 and directories 0700, whatever the umask: a
//   repository holds whole disks.
// - Temporary files start with '.', which no key can, so listings never show
//   them; a crash leaves at most such files behind (swept by sweepTemporary).
// - Data in page-aligned memory (packs: see pack.ts) is written with direct
//   I/O (util/direct-io.ts), past the page cache; everything else buffered.
//   Either way the file is fsynced before it is linked.

import { randomBytes } from 'node:crypto';
import { constants, promises as fs } from 'node:fs';
import { join } from 'node:path';
import { QbackupError, describeError } from '../../errors.js';
import { DirectWriter, isAlignedMemory } from '../../util/direct-io.js';
import { assertKey, assertPrefix, objectNotFound, type Backend, type ByteRange, type ObjectInfo } from './backend.js';

const FILE_MODE = 0o600;
const DIR_MODE = 0o700;

export class LocalBackend implements Backend {
  readonly location: string;
  private readonly checkedDirs = new Set<string>();

  constructor(readonly root: string) {
    this.location = root;
  }

  async putIfAbsent(key: string, data: Buffer): Promise<boolean> {
    assertKey(key);
    const dir = await this.ensureDir(parentOf(key));
    const tmp = join(dir, `.tmp-${randomBytes(8).toString('hex')}`);
    try {
      const fh = await fs.open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, FILE_MODE);
      try {
        if (isAlignedMemory(data)) {
          await using writer = await DirectWriter.open(fh.fd);
          await writer.write(data, 0);
        } else await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      try {
        await fs.link(tmp, join(this.root, key));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
        throw err;
      }
      await syncDir(dir);
      return true;
    } catch (err) {
      throw this.failure(`write "${key}"`, err);
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  async openForReading(key: string): Promise<fs.FileHandle> {
    assertKey(key);
    await this.checkDir(parentOf(key));
    try {
      return await fs.open(join(this.root, key), constants.O_RDONLY | constants.O_NOFOLLOW);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw objectNotFound(this.location, key, err);
      throw this.failure(`read "${key}"`, err);
    }
  }

  async get(key: string, range?: ByteRange): Promise<Buffer> {
    const fh = await this.openForReading(key);
    try {
      if (range === undefined) return await fh.readFile();
      const buf = range.into !== undefined && range.into.length >= range.length ? range.into.subarray(0, range.length) : Buffer.allocUnsafe(range.length);
      let done = 0;
      while (done < range.length) {
        const { bytesRead } = await fh.read(buf, done, range.length - done, range.offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      if (done !== range.length) {
        throw new QbackupError('REPO_DAMAGED', `Repository object "${key}" in "${this.location}" is shorter than expected (${range.offset + done} bytes, needed ${range.offset + range.length})`);
      }
      return buf;
    } finally {
      await fh.close();
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    assertKey(key);
    await this.checkDir(parentOf(key));
    try {
      const st = await fs.lstat(join(this.root, key));
      return st.isFile() ? { key, size: st.size } : undefined;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw this.failure(`read "${key}"`, err);
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    assertPrefix(prefix);
    const out: ObjectInfo[] = [];
    const walk = async (rel: string): Promise<void> => {
      let entries;
      try {
        entries = await fs.readdir(join(this.root, rel), { withFileTypes: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw this.failure(`list "${rel}"`, err);
      }
      for (const e of entries) {
        if (e.name.startsWith('.')) continue; // temporary files
        const key = rel === '' ? e.name : `${rel}/${e.name}`;
        // Symlinks and other odd entries are never followed or listed.
        if (e.isDirectory()) await walk(key);
        else if (e.isFile()) {
          // Deleted (by a concurrent prune, gc or lock release) since the directory was read: not there.
          const st = await fs.lstat(join(this.root, key)).catch((err: unknown) => {
            if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
            throw this.failure(`list "${rel}"`, err);
          });
          if (st !== undefined) out.push({ key, size: st.size, modifiedMs: st.mtimeMs });
        }
      }
    };
    const start = prefix.replace(/\/$/, '');
    if (start !== '') await this.checkDir(start);
    await walk(start);
    return out;
  }

  async delete(key: string): Promise<void> {
    assertKey(key);
    await this.checkDir(parentOf(key));
    try {
      await fs.unlink(join(this.root, key));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw this.failure(`delete "${key}"`, err);
    }
  }

  /** Removes temporary files older than `ageMs` left by writers that died (under `prefix`, default everywhere). */
  async sweepTemporary(ageMs: number, prefix = ''): Promise<number> {
    assertPrefix(prefix);
    let removed = 0;
    const walk = async (dir: string): Promise<void> => {
      const entries = await fs.readdir(dir, { withFileTypes: true }).catch(() => []);
      for (const e of entries) {
        const p = join(dir, e.name);
        if (e.isDirectory()) await walk(p);
        else if (e.isFile() && e.name.startsWith('.tmp-')) {
          const st = await fs.lstat(p).catch(() => undefined); // gone already: its writer finished
          if (st !== undefined && Date.now() - st.mtimeMs > ageMs) {
            await fs.rm(p, { force: true });
            removed++;
          }
        }
      }
    };
    const start = prefix.replace(/\/$/, '');
    if (start !== '') await this.checkDir(start);
    await walk(start === '' ? this.root : join(this.root, start));
    return removed;
  }

  /** Creates the directories of `rel` (0700) and checks none is a symlink. */
  private async ensureDir(rel: string): Promise<string> {
    if (!this.checkedDirs.has(this.root)) {
      try {
        await fs.mkdir(this.root, { recursive: true, mode: DIR_MODE });
      } catch (err) {
        throw this.failure('create the repository directory', err);
      }
      await this.assertRealDir(this.root);
    }
    let path = this.root;
    for (const seg of rel === '' ? [] : rel.split('/')) {
      path = join(path, seg);
      if (this.checkedDirs.has(path)) continue;
      try {
        await fs.mkdir(path, { mode: DIR_MODE });
        await fs.chmod(path, DIR_MODE);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw this.failure(`create directory "${path}"`, err);
      }
      await this.assertRealDir(path);
    }
    return path;
  }

  /** Checks every directory of `rel` that exists is a real directory inside the root. */
  private async checkDir(rel: string): Promise<void> {
    let path = this.root;
    for (const seg of rel === '' ? [] : rel.split('/')) {
      path = join(path, seg);
      if (this.checkedDirs.has(path)) continue;
      const st = await fs.lstat(path).catch(() => undefined);
      if (st === undefined) return;
      await this.assertRealDir(path);
    }
  }

  private async assertRealDir(path: string): Promise<void> {
    const st = await fs.lstat(path);
    if (!st.isDirectory()) {
      throw new QbackupError('REPO_INVALID', `Repository "${this.location}" is unsafe: "${path}" is ${st.isSymbolicLink() ? 'a symbolic link' : 'not a directory'}`);
    }
    this.checkedDirs.add(path);
  }

  private failure(what: string, err: unknown): QbackupError {
    if (err instanceof QbackupError) return err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      return new QbackupError('REPO_FULL', `Cannot ${what} in repository "${this.location}": no space left on the device`, { cause: err });
    }
    return new QbackupError('REPO_INVALID', `Cannot ${what} in repository "${this.location}": ${describeError(err)}`, { cause: err });
  }
}

function parentOf(key: string): string {
  const i = key.lastIndexOf('/');
  return i < 0 ? '' : key.slice(0, i);
}

async function syncDir(dir: string): Promise<void> {
  let fh: fs.FileHandle | undefined;
  try {
    fh = await fs.open(dir, constants.O_RDONLY | constants.O_DIRECTORY);
    await fh.sync();
  } catch {
    // Some filesystems cannot fsync a directory; the link is atomic all the same.
  } finally {
    await fh?.close();
  }
}
