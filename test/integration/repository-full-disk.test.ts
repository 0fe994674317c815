// A full disk can always be freed (docs/design.md, "A full repository"): on a
// repository filesystem with 0 bytes free, prune and gc still run (their lock
// uses the space the repository keeps in reserve) and free space; the kept
// backup restores exactly, and the reserve is back once gc has freed space.
// A disk that fills up in the middle of a prune's fold (after the lock and the
// removed backup's manifest, before the kept backups' new indexes and manifest
// generations are written): the prune fails in one sentence, every listed
// backup still restores exactly, and once space is freed prune and gc
// complete. Needs root (tmpfs of a few MiB, mounted and unmounted by the test).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, existsSync, fstatSync, ftruncateSync, mkdirSync, openSync, rmSync, statfsSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { KiB, MiB, cliError, imageDiffers, randomFile, referenceCopies } from '../helpers/repo.js';

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

  test('the disk fills up in the middle of a prune\'s fold: one sentence, nothing lost; after space is freed prune and gc complete', async () => {
    const mnt2 = env.path('mnt-fold');
    mkdirSync(mnt2);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m,mode=0700', 'tmpfs', mnt2]);
    try {
      const repo = join(mnt2, 'repo');
      await env.cliOk(['init', '--repo', repo]);
      const refs = new Map<string, string>();
      // A full and two incrementals: keeping the last two removes the full, so the first kept one's chain must be folded.
      for (const [i, cmd] of [`write -s ${randomFile(env, 'fold-r1', MiB)} 0 1M`, 'write -P 0x61 4M 64k', 'write -P 0x62 5M 64k'].entries()) {
        await guestWrite(env.qb, 'vm', 'sda', cmd);
        const ref = (await referenceCopies(env, 'vm', `fold${i}`)).get('sda') ?? '';
        const m = JSON.parse(await env.cliOk(['--json', 'backup', 'vm', '--repo', repo, ...(i === 0 ? ['--full'] : [])])) as Manifest;
        refs.set(m.id, ref);
      }
      const ids = [...refs.keys()];
      const restoresExactly = async (id: string, tag: string): Promise<void> => {
        const to = env.path(`fold-${tag}-${id}.raw`);
        await env.cliOk(['export', 'vm', '--repo', repo, '--backup', id, '--disk', 'sda', '--to', to, '--format', 'raw']);
        assert.equal(await imageDiffers(to, 'raw', refs.get(id) ?? ''), undefined, `backup ${id} restores exactly (${tag})`);
        rmSync(to);
      };
      // Full, then exactly one page free: the prune's lock fits; deleting the removed backup's manifest frees one
      // more page or so; the fold's new index and manifest generation need more than that.
      const filler = join(mnt2, 'filler');
      fillUp(filler);
      const fd = openSync(filler, 'r+');
      try {
        const pages = Math.ceil(fstatSync(fd).size / (4 * KiB));
        ftruncateSync(fd, (pages - 1) * 4 * KiB);
      } finally {
        closeSync(fd);
      }
      assert.equal(statfsSync(mnt2).bavail, 1, 'one page is free');
      const prune = await env.cli(['--json', 'prune', 'vm', '--repo', repo, '--keep-last', '2']);
      assert.equal(prune.code, 1, `the prune runs out of space: ${prune.stdout} ${prune.stderr}`);
      const e = cliError(prune);
      assert.equal(e.code, 'REPO_FULL', e.message);
      assert.ok(!/\n/.test(e.message.trim()) && !/^\s+at /m.test(prune.stderr), 'one sentence, no stack');
      const listed = (JSON.parse(await env.cliOk(['--json', 'backup-list', '--repo', repo])) as Manifest[]).map((m) => m.id);
      assert.ok(!listed.includes(ids[0] ?? ''), 'the removed backup went first: the space ran out in the fold');
      for (const id of ids.slice(1)) assert.ok(listed.includes(id), `kept backup ${id} is still listed`);
      for (const id of listed) await restoresExactly(id, 'full disk');

      rmSync(filler);
      await env.cliOk(['prune', 'vm', '--repo', repo, '--keep-last', '2']);
      await env.cliOk(['gc', '--repo', repo]);
      const after = (JSON.parse(await env.cliOk(['--json', 'backup-list', '--repo', repo])) as Manifest[]).map((m) => m.id);
      assert.deepEqual(after, ids.slice(1));
      for (const id of after) await restoresExactly(id, 'freed');
      const v = await env.cli(['verify', '--repo', repo, '--read-data']);
      assert.equal(v.code, 0, v.stdout + v.stderr);
    } finally {
      execFileSync('umount', [mnt2]);
    }
  });
});
