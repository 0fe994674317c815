// The local-directory backend: the shared conformance suite, plus what only a
// filesystem can get wrong (symlinks out of the repository, file modes).

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, promises as fsPromises, statSync, symlinkSync, writeFileSync, readFileSync, type BigIntStats, type Stats } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { isQbackupError } from '../../src/errors.js';
import { backendConformance } from '../helpers/backend-conformance.js';

function fresh(): LocalBackend {
  return new LocalBackend(mkdtempSync(join(tmpdir(), 'qb-local-')));
}

backendConformance('local directory', async () => fresh());

describe('local backend on a hostile or shared filesystem', () => {
  it('never follows a symlinked directory out of the repository', async () => {
    const b = fresh();
    const victim = mkdtempSync(join(tmpdir(), 'qb-victim-'));
    writeFileSync(join(victim, 'f'), 'precious');
    symlinkSync(victim, join(b.root, 'data'));
    await assert.rejects(b.delete('data/f'), (err: unknown) => isQbackupError(err, 'REPO_INVALID'));
    await assert.rejects(b.get('data/f'), (err: unknown) => isQbackupError(err, 'REPO_INVALID'));
    await assert.rejects(b.putIfAbsent('data/g', Buffer.from('x')), (err: unknown) => isQbackupError(err, 'REPO_INVALID'));
    await assert.rejects(b.list('data/'), (err: unknown) => isQbackupError(err, 'REPO_INVALID'));
    assert.equal(readFileSync(join(victim, 'f'), 'utf8'), 'precious');
  });

  it('never lists or reads through a symlinked file', async () => {
    const b = fresh();
    mkdirSync(join(b.root, 'index'));
    symlinkSync('/etc/hostname', join(b.root, 'index', 'abc'));
    assert.deepEqual(await b.list('index/'), []);
    await assert.rejects(b.get('index/abc'));
  });

  it('creates files 0600 and directories 0700 whatever the umask', async () => {
    const old = process.umask(0o022);
    try {
      const b = fresh();
      await b.putIfAbsent('data/ab/x', Buffer.from('x'));
      assert.equal(statSync(join(b.root, 'data', 'ab', 'x')).mode & 0o777, 0o600);
      assert.equal(statSync(join(b.root, 'data', 'ab')).mode & 0o777, 0o700);
      assert.equal(statSync(join(b.root, 'data')).mode & 0o777, 0o700);
    } finally {
      process.umask(old);
    }
  });
});

describe('local backend listings under concurrent deletes', () => {
  it('an entry deleted between the directory read and its stat is skipped, not an error', async () => {
    const b = fresh();
    for (const k of ['locks/00000000000000a1', 'locks/00000000000000a2', 'data/aa/x1']) await b.putIfAbsent(k, Buffer.from('x'));
    // Another process deletes each entry right after our readdir saw it.
    const realLstat = fsPromises.lstat;
    const patched = async (...args: Parameters<typeof realLstat>): Promise<Stats | BigIntStats> => {
      const p = String(args[0]);
      if (p.endsWith('00000000000000a1') || p.endsWith('x1')) await fsPromises.rm(p, { force: true });
      return realLstat(...args);
    };
    fsPromises.lstat = patched as typeof fsPromises.lstat;
    try {
      assert.deepEqual((await b.list('locks/')).map((o) => o.key), ['locks/00000000000000a2']);
      assert.deepEqual(await b.list('data/'), []);
    } finally {
      fsPromises.lstat = realLstat;
    }
  });
});
