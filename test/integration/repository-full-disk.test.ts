// A full disk can always be freed (docs/design.md, "A full repository"): on a
// repository filesystem with 0 bytes free, prune and gc still run (their lock
// uses the space the repository keeps in reserve) and free space; the kept
// backup restores exactly, and the reserve is back once gc has freed space.
// Needs root (a tmpfs of a few MiB is mounted and unmounted in `finally`).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, imageDiffers, randomFile, referenceCopies } from '../helpers/repo.js';

const skip = process.getuid?.() !== 0 ? 'mounting a tmpfs needs root' : false;

/** Writes into `file` until the filesystem refuses (ENOSPC), in ever smaller pieces: 0 bytes are left. */
function fillUp(file: string): void {
  const fd = openSync(file, 'w');
  try {
    for (const size of [1 << 20, 64 << 10, 4 << 10, 512, 1]) {
      const buf = Buffer.alloc(size, 0x55);
      for (;;) {
        try {
          writeSync(fd, buf);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOSPC') break;
          throw err;
        }
      }
    }
  } finally {
    closeSync(fd);
  }
}

describe('a full repository disk can be freed (tmpfs, real QEMU)', { skip }, () => {
  let env: TestEnv;
  let mnt: string;
  let mounted = false;

  before(async () => {
    env = new TestEnv('qbt-full-', { accel: 'tcg' });
    mnt = env.path('mnt');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=24m,mode=0700', 'tmpfs', mnt]);
    mounted = true;
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
  });
  after(async () => {
    try {
      await env.cleanup().catch(() => undefined);
    } finally {
      if (mounted) execFileSync('umount', [mnt]);
    }
  });

  test('prune and gc run with 0 bytes free and free the space of the pruned backup', async () => {
    const repo = join(mnt, 'repo');
    await env.cliOk(['init', '--repo', repo]);
    // Two backups whose data share nothing: the first one's packs are garbage once it is pruned.
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'r1', 8 * MiB)} 0 8M`);
    await env.cliOk(['backup', 'vm', '--repo', repo]);
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, 'r2', 8 * MiB)} 0 8M`);
    const ref = await referenceCopies(env, 'vm', 'b2');
    const b2 = JSON.parse(await env.cliOk(['--json', 'backup', 'vm', '--repo', repo])) as Manifest;
    fillUp(join(mnt, 'filler'));
    assert.equal(statfsSync(mnt).bavail, 0, 'the filesystem is full');

    const prune = await env.cli(['prune', 'vm', '--repo', repo, '--keep-last', '1']);
    assert.equal(prune.code, 0, `prune runs on a full disk: ${prune.stderr}`);
    const gc = await env.cli(['gc', '--repo', repo]);
    assert.equal(gc.code, 0, `gc runs on a full disk: ${gc.stderr}`);
    assert.ok(statfsSync(mnt).bavail * statfsSync(mnt).bsize >= 6 * MiB, 'gc freed the first backup\'s packs');
    assert.ok(existsSync(join(repo, 'reserve')), 'the reserve is back');

    const list = JSON.parse(await env.cliOk(['--json', 'backup-list', '--repo', repo])) as Manifest[];
    assert.deepEqual(list.map((m) => m.id), [b2.id]);
    const to = env.path('restored');
    await env.cliOk(['restore', 'vm', '--repo', repo, '--to', to, '--format', 'raw']);
    assert.equal(await imageDiffers(join(to, 'sda.raw'), 'raw', ref.get('sda') ?? ''), undefined);
    const v = await env.cli(['verify', '--repo', repo, '--read-data']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });
});
