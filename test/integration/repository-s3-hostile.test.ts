// A hostile S3 endpoint (test/helpers/s3-proxy.ts in front of the test
// Ceph's radosgw), against real QEMU and the CLI:
// - 500s mid-upload: retried ones leave a backup that restores exactly; a
//   manifest or pack that can never be stored fails the backup in one
//   sentence, lists nothing new, and the next backup works;
// - truncated bodies and lying lengths on reads of packs, indexes and
//   manifests: an export fails in one sentence (or restores exactly), never
//   with other bytes, and leaves no file; verify through that endpoint never
//   passes;
// - stale listings: a listing of manifests frozen before the newest backup
//   hides it from backup-list and gc through that endpoint while its packs
//   and indexes are listed (as garbage would be), yet gc run there twice
//   loses nothing of it: it still restores exactly and verifies (gc.ts,
//   step 7; before, the second gc deleted its index).
// Every check of what is listed and restored is made directly on radosgw.

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import type { Manifest } from '../../src/repository/repository.js';
import { ceph, stopCeph, type Ceph } from '../helpers/ceph.js';
import { TestEnv, guestWrite, type CliResult } from '../helpers/env.js';
import { MiB, cliError, imageDiffers, randomFile, referenceCopies, spawnCli } from '../helpers/repo.js';
import { startS3Proxy, type S3Proxy } from '../helpers/s3-proxy.js';

after(stopCeph);

describe('a hostile S3 endpoint (fault-injecting proxy before Ceph radosgw, real QEMU)', () => {
  let c: Ceph;
  let env: TestEnv;
  let proxy: S3Proxy;
  const refs = new Map<string, string>();
  let n = 0;

  before(async () => {
    c = await ceph();
    env = new TestEnv('qbt-s3h-', { backends: { s3: c.settings } });
    proxy = await startS3Proxy(c.settings.endpoint ?? '');
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
  });
  after(async () => {
    await proxy?.close();
    await env?.cleanup();
  });

  const direct = (args: readonly string[]): Promise<CliResult> => spawnCli(env, args, c.env).done;
  const hostile = (args: readonly string[]): Promise<CliResult> => spawnCli(env, args, { ...c.env, AWS_ENDPOINT_URL_S3: proxy.endpoint }).done;
  const ok = async (r: Promise<CliResult>): Promise<string> => {
    const x = await r;
    assert.equal(x.code, 0, x.stderr);
    return x.stdout;
  };
  /** New data, then a backup (directly or through the proxy); the reference of its bytes. */
  async function backup(repo: string, through: typeof direct): Promise<{ r: CliResult; ref: string }> {
    await guestWrite(env.qb, 'vm', 'sda', `write -s ${randomFile(env, `d${++n}`, 512 * 1024)} ${(n % 24) * 512}k 512k`);
    const ref = (await referenceCopies(env, 'vm', `h${n}`)).get('sda') ?? '';
    const r = await through(['--json', 'backup', 'vm', '--repo', repo]);
    if (r.code === 0) refs.set((JSON.parse(r.stdout) as Manifest).id, ref);
    return { r, ref };
  }
  async function listed(repo: string): Promise<string[]> {
    return (JSON.parse(await ok(direct(['--json', 'backup-list', '--repo', repo]))) as Manifest[]).map((m) => m.id);
  }
  /** Every listed backup restores exactly (directly): nothing listed fails to restore. */
  async function allRestore(repo: string): Promise<void> {
    for (const id of await listed(repo)) {
      const file = env.path(`r${++n}.raw`);
      await ok(direct(['export', 'vm', '--repo', repo, '--backup', id, '--disk', 'sda', '--to', file, '--format', 'raw']));
      assert.equal(await imageDiffers(file, 'raw', refs.get(id) ?? ''), undefined, `backup ${id} restores exactly`);
    }
  }
  function oneSentence(r: CliResult): { code: string; message: string } {
    assert.equal(r.code, 1, r.stdout + r.stderr);
    const e = cliError(r);
    assert.ok(!/\n/.test(e.message.trim()) && !/^\s+at /m.test(r.stderr), `one sentence, no stack: ${r.stderr}`);
    return e;
  }

  test('500s mid-upload: retried ones still give a backup that restores; a manifest or pack that cannot be stored fails in one sentence and lists nothing new', async () => {
    const repo = `s3://${c.bucket()}/uploads`;
    await ok(direct(['init', '--repo', repo]));
    // Every third PUT fails once: the SDK retries it.
    proxy.rule = (r) => (r.method === 'PUT' && r.nth % 3 === 0 ? '500' : undefined);
    const first = await backup(repo, hostile);
    assert.equal(first.r.code, 0, first.r.stderr);
    assert.ok((proxy.done['500'] ?? 0) > 0, 'some uploads failed');
    // The manifest never gets stored.
    for (const where of ['/snapshots/', '/data/']) {
      const before = await listed(repo);
      proxy.rule = (r) => (r.method === 'PUT' && r.path.includes(where) ? '500' : undefined);
      const failed = await backup(repo, hostile);
      const e = oneSentence(failed.r);
      assert.match(e.message, /Cannot write|cannot|failed/i);
      assert.deepEqual(await listed(repo), before, `nothing new listed after the ${where} failures`);
    }
    proxy.rule = () => undefined;
    const next = await backup(repo, direct);
    assert.equal(next.r.code, 0, next.r.stderr);
    await allRestore(repo);
    assert.equal((await direct(['verify', '--repo', repo, '--read-data'])).code, 0);
  });

  test('truncated bodies and lying lengths on reads: restore fails in one sentence or restores exactly, never with other bytes, leaves no file, and verify does not pass', async () => {
    const repo = `s3://${c.bucket()}/reads`;
    await ok(direct(['init', '--repo', repo]));
    const b = await backup(repo, direct);
    assert.equal(b.r.code, 0, b.r.stderr);
    const id = (JSON.parse(b.r.stdout) as Manifest).id;
    for (const fault of ['truncate', 'lie-length'] as const) {
      for (const where of ['/data/', '/indexes/', '/snapshots/']) {
        proxy.rule = (r) => (r.method === 'GET' && r.path.includes(where) && !r.query.has('list-type') ? fault : undefined);
        const file = env.path(`bad-${fault}-${where.replaceAll('/', '')}.raw`);
        const r = await hostile(['--json', 'export', 'vm', '--repo', repo, '--backup', id, '--disk', 'sda', '--to', file, '--format', 'raw']);
        if (r.code === 0) assert.equal(await imageDiffers(file, 'raw', b.ref), undefined, `${fault} ${where}: a restore that succeeds is exact`);
        else {
          oneSentence(r);
          assert.ok(!existsSync(file), `${fault} ${where}: a failed restore leaves no file`);
        }
        const v = await hostile(['--json', 'verify', '--repo', repo, '--read-data']);
        assert.notEqual(v.code, 0, `${fault} ${where}: verify through the endpoint does not certify what it could not read`);
        if (v.code !== 1 || v.stdout.trim().startsWith('{"error"')) oneSentence(v);
      }
    }
    assert.ok((proxy.done['truncate'] ?? 0) > 0 && (proxy.done['lie-length'] ?? 0) > 0);
    proxy.rule = () => undefined;
    await allRestore(repo);
  });

  test('stale listings: a listing frozen before the newest backup hides it through that endpoint, and two gc runs there lose nothing of it', async () => {
    const repo = `s3://${c.bucket()}/stale`;
    await ok(direct(['init', '--repo', repo]));
    const b1 = await backup(repo, direct);
    assert.equal(b1.r.code, 0, b1.r.stderr);
    // Only the listing of manifests is stale: the packs and indexes of the newest backup are listed, as garbage would be.
    proxy.rule = (r) => (r.query.has('list-type') && (r.query.get('prefix') ?? '').includes('snapshots') ? 'stale-list' : undefined);
    proxy.freezeListings();
    // Record the listings gc and backup-list make, as they are now.
    await ok(hostile(['backup-list', '--repo', repo]));
    await ok(hostile(['gc', '--repo', repo]));
    const b2 = await backup(repo, direct);
    assert.equal(b2.r.code, 0, b2.r.stderr);
    const id2 = (JSON.parse(b2.r.stdout) as Manifest).id;
    const seen = (JSON.parse(await ok(hostile(['--json', 'backup-list', '--repo', repo]))) as Manifest[]).map((m) => m.id);
    assert.ok(!seen.includes(id2), 'the stale listing hides the newest backup');
    assert.ok((proxy.done['stale-list'] ?? 0) > 0);
    for (let i = 0; i < 2; i++) {
      const g = await hostile(['gc', '--repo', repo]);
      if (g.code !== 0) oneSentence(g);
    }
    proxy.rule = () => undefined;
    assert.ok((await listed(repo)).includes(id2));
    await allRestore(repo);
    const v = await direct(['verify', '--repo', repo, '--read-data']);
    assert.equal(v.code, 0, v.stdout + v.stderr);
  });
});
