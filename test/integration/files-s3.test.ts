// File-level restore from a repository on a real object store (the test Ceph,
// radosgw): a full and an incremental backup of a domain whose disk holds one
// ext4 partition go to s3://, and `qbackup files` lists and fetches a file as
// it was at each backup, the older one chosen with --until, through the CLI
// as a user types it (the S3 endpoint and keys from the environment).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runTool } from '../../src/image/tools.js';
import type { Manifest } from '../../src/repository/repository.js';
import { ceph, stopCeph, type Ceph } from '../helpers/ceph.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, ext4Image, partitionedDisk, writeTree } from '../helpers/guest-fs.js';

const T = 1_700_000_000;

after(stopCeph);

describe('files from a repository on S3 (Ceph radosgw, libguestfs appliance)', () => {
  let c: Ceph;
  let env: TestEnv;
  let repo: string;
  let cliEnv: Record<string, string>;

  /** An ext4 filesystem holding /etc/hostname = `hostname`. */
  const rootWith = async (name: string, hostname: string): Promise<string> => {
    const tree = env.path(`tree-${name}`);
    writeTree(tree, [
      { path: 'etc/hostname', data: hostname, mode: 0o644, time: T },
      { path: 'etc', dir: true, mode: 0o755, time: T },
    ]);
    const image = env.path(`${name}.img`);
    await ext4Image(image, tree, 16 * MiB, 'root', '5b2e7a8c-1d4f-4c3a-9e6b-2a7d8c9e0f13');
    return image;
  };

  before(async () => {
    c = await ceph();
    env = new TestEnv('qbf-s3-', { accel: 'tcg', backends: { s3: c.settings } });
    repo = `s3://${c.bucket()}/files`;
    cliEnv = { ...c.env, QBACKUP_ACCEL: 'tcg' };
  });
  after(async () => {
    await env?.cleanup();
  });

  const ok = async (args: readonly string[]): Promise<string> => {
    const r = await env.cli(args, { env: cliEnv });
    assert.equal(r.code, 0, `qbackup ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };

  test('a file is listed and fetched as it was at the full and at the incremental backup', async () => {
    await ok(['init', '--repo', repo]);
    const sda = env.path('web-sda.qcow2');
    const disk = await partitionedDisk(env.path('disk.raw'), 20 * MiB, [{ image: await rootWith('first', 'web-before\n'), sizeBytes: 16 * MiB, type: '83' }]);
    await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk.file, sda]);
    await env.qb.domains.define(env.domainXml('web', [{ target: 'sda', file: sda }]));
    await env.qb.domains.start('web', { paused: true });
    const full = JSON.parse(await ok(['--json', 'backup', 'web', '--repo', repo])) as Manifest;
    // The guest rewrites its root filesystem: the partition's bytes change under the same name.
    const part = disk.partitions.get(1);
    assert.ok(part !== undefined);
    await guestWrite(env.qb, 'web', 'sda', `write -s ${await rootWith('second', 'web-after\n')} ${part.offset} ${part.length}`);
    await guestWrite(env.qb, 'web', 'sda', 'flush');
    const incremental = JSON.parse(await ok(['--json', 'backup', 'web', '--repo', repo])) as Manifest;
    assert.equal(incremental.disks[0]?.level, 'incremental');

    const listing = JSON.parse(await ok(['--json', 'files', 'web', '--repo', repo, 'ls', '/etc'])) as Array<{ name: string }>;
    assert.ok(listing.some((e) => e.name === 'hostname'), JSON.stringify(listing));
    const older = env.path('older');
    await ok(['files', 'web', '--repo', repo, '--until', full.time, 'get', '/etc/hostname', '--to', older]);
    assert.equal(readFileSync(join(older, 'hostname'), 'utf8'), 'web-before\n');
    const newer = env.path('newer');
    await ok(['files', 'web', '--repo', repo, 'get', '/etc/hostname', '--to', newer]);
    assert.equal(readFileSync(join(newer, 'hostname'), 'utf8'), 'web-after\n');
  });
});
