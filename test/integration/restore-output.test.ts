// Restores and exports create their output files safely (real QEMU tools):
// a symlink planted where the output or its temporary file will be created
// (by another process racing the restore, as a local user writing in a
// shared directory could) never leads a restore to write (or truncate, or
// chmod) the file it points to, whatever the format (raw, or qcow2 laid out
// and written directly); and a restore into a kernel pseudo-filesystem (/proc, /sys, /dev)
// is refused at once in one sentence.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, lstatSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, cliError, imageDiffers, referenceCopies } from '../helpers/repo.js';

describe('restore and export outputs (real QEMU tools)', () => {
  let env: TestEnv;
  let repo: string;
  let ref: Map<string, string>;
  const VICTIM_TEXT = 'a host file that no restore may touch\n';

  /** A file a planted symlink points to; checked unchanged (content and mode) afterwards. */
  function victim(name: string): { path: string; check: () => void } {
    const path = env.path(name);
    writeFileSync(path, VICTIM_TEXT);
    chmodSync(path, 0o644);
    return {
      path,
      check: () => {
        assert.equal(readFileSync(path, 'utf8'), VICTIM_TEXT, `${name} is unchanged`);
        assert.equal(statSync(path).mode & 0o777, 0o644, `${name} keeps its mode`);
      },
    };
  }

  /**
   * Another process that plants `names` as symlinks to `victimPath` again and
   * again (recreating each as soon as it is removed) until stopped.
   */
  function planter(victimPath: string, names: string[]): { stop: () => Promise<void> } {
    const code = `const fs = require('node:fs'); const [v, ...names] = process.argv.slice(1);
      for (;;) for (const n of names) { try { fs.symlinkSync(v, n); } catch {} }`;
    const child = spawn(process.execPath, ['-e', code, victimPath, ...names], { stdio: 'ignore' });
    const exited = new Promise<void>((r) => child.on('exit', () => r()));
    return {
      stop: async () => {
        child.kill('SIGKILL');
        await exited;
      },
    };
  }

  before(async () => {
    env = new TestEnv('qbt-output-', { accel: 'tcg' });
    repo = env.path('repo');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 4 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x5c 1M 64k');
    ref = await referenceCopies(env, 'vm', 'b1');
    await env.qb.repository.backup('vm', { repo });
  });
  after(async () => env.cleanup());

  for (const format of ['qcow2', 'raw'] as const) {
    test(`restore --to (${format}): a symlink planted (racing) as the temporary file is never followed`, async () => {
      const dir = env.path(`planted-${format}`);
      const v = victim(`victim-${format}`);
      const target = join(dir, `sda.${format}`);
      mkdirSync(dir, { mode: 0o777 });
      chmodSync(dir, 0o1777); // a sticky, world-writable directory like /tmp
      const plant = planter(v.path, [`${target}.partial`]);
      const r = await env.cli(['restore', 'vm', '--repo', repo, '--to', dir, '--format', format]).finally(plant.stop);
      v.check();
      assert.equal(r.code, 0, r.stderr);
      assert.ok(lstatSync(target).isFile(), 'the restored image is a regular file');
      assert.equal(statSync(target).mode & 0o777, 0o600);
      assert.equal(await imageDiffers(target, format, ref.get('sda') ?? ''), undefined);
    });
  }

  test('restore --to: an output name taken by a symlink is refused and the file it points to is untouched', async () => {
    const dir = env.path('taken');
    const v = victim('victim-taken');
    mkdirSync(dir);
    symlinkSync(v.path, join(dir, 'sda.qcow2'));
    const r = await env.cli(['--json', 'restore', 'vm', '--repo', repo, '--to', dir]);
    assert.equal(r.code, 1);
    assert.match(cliError(r).message, /sda\.qcow2" exists/);
    v.check();
  });

  test('restore --instant: a dangling symlink planted as an overlay is refused and never followed', async () => {
    const dir = env.path('instant');
    mkdirSync(dir);
    const pointsTo = env.path('never-created.qcow2');
    symlinkSync(pointsTo, join(dir, 'sda.qcow2'));
    const r = await env.cli(['--json', 'restore', 'vm', '--repo', repo, '--instant', '--as', 'vm-copy', '--to', dir]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(cliError(r).message, /sda\.qcow2" exists/);
    assert.ok(!existsSync(pointsTo), 'nothing is created through the symlink');
  });

  test('export (qcow2): a symlink planted (racing) as the temporary file is never followed', async () => {
    const v = victim('victim-export');
    const file = env.path('exported.qcow2');
    const plant = planter(v.path, [`${file}.partial`]);
    const r = await env.cli(['export', 'vm', '--repo', repo, '--disk', 'sda', '--to', file]).finally(plant.stop);
    v.check();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(await imageDiffers(file, 'qcow2', ref.get('sda') ?? ''), undefined);
  });

  for (const place of ['/proc/qbackup-restore-test', '/sys/qbackup-restore-test', '/dev/qbackup-restore-test', '/proc/self']) {
    // A timeout: such a restore used to hang in /proc.
    test(`restore --to ${place} is refused in one sentence`, { timeout: 60_000 }, async () => {
      const r = await env.cli(['--json', 'restore', 'vm', '--repo', repo, '--to', place]);
      assert.equal(r.code, 1, r.stderr);
      const e = cliError(r);
      assert.equal(e.code, 'INVALID_ARGUMENT');
      assert.match(e.message, /^Cannot restore .*: ".*" is in \/(proc|sys|dev), a kernel pseudo-filesystem$/);
      await assert.rejects(env.qb.repository.restore('vm', { repo, to: place }), (err: unknown) => isQbackupError(err, 'INVALID_ARGUMENT'));
      assert.ok(!existsSync(join(place, 'sda.qcow2')));
    });
  }
});
