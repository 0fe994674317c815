// Serving backups over NBD against real QEMU and the NBD tools.
// - A full and an incremental backup of a real domain are served (library
//   and CLI) and read back by nbdinfo --map (zero chunks are holes),
//   nbdcopy, qemu-img compare, qemu-io (QEMU's own NBD client) and
//   qbackup's NbdClient: each reads exactly the bytes the disk held when its
//   backup started. A running qemu-storage-daemon opens an export as an
//   `nbd` block node and passes its bytes and holes on.
// - TCP with TLS (certificates made by openssl): nbdinfo and nbdcopy over
//   nbds://, qemu-img with tls-creds-x509; a client without the CA's
//   certificate and a clear-text client are refused; TCP without TLS needs
//   --no-tls.
// - A damaged chunk fails the reads that touch it with EIO while other
//   reads go on; a repository that goes away fails reads, the server stays.
// - Pruning and collecting garbage while a backup is served keeps its
//   chunks until serving stops.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cpSync, existsSync, readFileSync, renameSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { NBD_CONTEXT_BASE_ALLOCATION, NBD_EIO, NbdClient, NbdCommandError } from '../../src/nbd/index.js';
import { runTool } from '../../src/image/tools.js';
import { socketAccepts } from '../../src/util/socket.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import type { BackupServer, Manifest } from '../../src/repository/repository.js';
import { Store } from '../../src/repository/store.js';
import { TestEnv, guestWrite } from '../helpers/env.js';
import { MiB, KiB, cliError, flipByte, imageDiffers, randomFile, referenceCopies, spawnCli, waitFor } from '../helpers/repo.js';
import { makeCertificates, type TestCertificates } from '../helpers/tls.js';

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

async function waitForAsync(check: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

async function nbdMap(uri: string, extra: string[] = []): Promise<MapEntry[]> {
  const { stdout } = await runTool('nbdinfo', [...extra, '--map', '--json', uri]);
  return JSON.parse(stdout) as MapEntry[];
}

/** Offsets (in MiB) of the hole extents of a map. */
function holes(map: readonly MapEntry[]): Array<[number, number]> {
  return map.filter((e) => (e.type & 1) !== 0).map((e) => [e.offset / MiB, (e.offset + e.length) / MiB]);
}

describe('serve-backup: a backup served over NBD (real QEMU, nbd tools)', () => {
  let env: TestEnv;
  let repo: string;
  let b1: Manifest;
  let b2: Manifest;
  /** A full backup of the same data as b2: the newest, and what lets prune drop b1 and b2 entirely. */
  let b3: Manifest;
  const refs = new Map<string, Map<string, string>>();
  let certs: TestCertificates;

  const ref = (m: Manifest, target: string): string => {
    const f = refs.get(m.id)?.get(target);
    assert.ok(f !== undefined, `reference of ${target} at ${m.id}`);
    return f;
  };

  /** nbdcopy, qemu-img compare and NbdClient each read the reference bytes of every export. */
  async function assertServes(server: BackupServer, m: Manifest, tag: string): Promise<void> {
    assert.deepEqual(server.exports.map((e) => e.name), m.disks.map((d) => d.target));
    for (const e of server.exports) {
      const want = ref(m, e.name);
      assert.equal(e.size, statSync(want).size);
      const copy = env.path(`copy-${tag}-${e.name}.raw`);
      await runTool('nbdcopy', [e.uri, copy]);
      assert.equal(await imageDiffers(copy, 'raw', want), undefined, `nbdcopy of ${e.name} (${tag})`);
      await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', e.uri, want]);
      const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
      await using c = await NbdClient.connect({ socket }, { exportName: e.name, metaContexts: [NBD_CONTEXT_BASE_ALLOCATION] });
      const bytes = readFileSync(want);
      for (const [off, len] of [[0, 64 * KiB], [3 * MiB + 12345, 2 * MiB], [e.size - 4096, 4096]] as const) {
        assert.ok((await c.read(off, len)).equals(bytes.subarray(off, off + len)), `NbdClient read of ${e.name} at ${off} (${tag})`);
      }
    }
  }

  before(async () => {
    env = new TestEnv('qbt-serve-');
    repo = env.path('repo');
    certs = await makeCertificates(env.dir);
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 32 * MiB }, { target: 'sdb', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    const w = (target: string, cmd: string): Promise<void> => guestWrite(env.qb, 'vm', target, cmd);
    await w('sda', `write -s ${randomFile(env, 'r1', 4 * MiB)} 0 4M`);
    await w('sda', 'write -P 0x11 8M 2M');
    await w('sdb', `write -s ${randomFile(env, 'r2', 3 * MiB)} 1M 3M`);
    refs.set('b1', await referenceCopies(env, 'vm', 'b1'));
    b1 = await env.qb.repository.backup('vm', { repo });
    refs.set(b1.id, refs.get('b1') ?? new Map());
    await w('sda', `write -s ${randomFile(env, 'r3', MiB)} 20M 1M`);
    await w('sda', 'write -z 1M 128k');
    await w('sda', 'write -P 0x22 8M 64k');
    await w('sdb', 'write -P 0x33 0 64k');
    refs.set('b2', await referenceCopies(env, 'vm', 'b2'));
    b2 = await env.qb.repository.backup('vm', { repo });
    refs.set(b2.id, refs.get('b2') ?? new Map());
    assert.deepEqual(b2.disks.map((d) => d.level), ['incremental', 'incremental']);
    b3 = await env.qb.repository.backup('vm', { repo, full: true });
    refs.set(b3.id, refs.get('b2') ?? new Map());
    await env.qb.domains.destroy('vm');
  });
  after(async () => env.cleanup());

  test('library: the full backup reads back exactly through nbdinfo --map, nbdcopy, qemu-img, qemu-io and NbdClient', async () => {
    await using server = await env.qb.repository.serveBackup('vm', { repo, backup: b1.id });
    assert.equal(server.backup, b1.id);
    assert.equal(server.listen.transport, 'unix');
    const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
    assert.equal(statSync(socket).mode & 0o777, 0o600);
    assert.equal(statSync(dirname(socket)).mode & 0o777, 0o700);
    assert.ok(socket.startsWith(join(env.stateDir, 'run')), socket);
    const sda = server.exports.find((e) => e.name === 'sda');
    assert.equal(sda?.uri, `nbd+unix:///sda?socket=${socket}`);
    // Data at 0-4M and 8-10M; everything else was never written: holes.
    assert.deepEqual(holes(await nbdMap(sda.uri)), [[4, 8], [10, 32]]);
    await assertServes(server, b1, 'b1');
    // QEMU's NBD client checks a pattern the guest wrote.
    const { stdout } = await runTool('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x11 8M 2M', sda.uri]);
    assert.doesNotMatch(stdout, /Pattern verification failed/);
    await server.close();
    assert.equal(existsSync(dirname(socket)), false, 'the socket directory is removed');
  });

  test('a running QEMU reads the export as a block node (qemu-storage-daemon, driver nbd) and passes on its bytes and holes', async () => {
    await using server = await env.qb.repository.serveBackup('vm', { repo, backup: b2.id, disks: ['sda'] });
    const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
    const qsd = env.path('qsd.sock');
    const child = spawn('qemu-storage-daemon', [
      '--blockdev', `driver=nbd,node-name=backup,server.type=unix,server.path=${socket},export=sda,read-only=on`,
      '--nbd-server', `addr.type=unix,addr.path=${qsd}`,
      '--export', 'type=nbd,id=e0,node-name=backup,name=again,writable=off',
    ], { stdio: 'ignore' });
    try {
      assert.ok(await waitForAsync(() => socketAccepts(qsd), 10_000), 'qemu-storage-daemon serves');
      const uri = `nbd+unix:///again?socket=${qsd}`;
      // QEMU asked our server for base:allocation and reports the same holes.
      assert.deepEqual(holes(await nbdMap(uri)), [[1, 1.125], [4, 8], [10, 20], [21, 32]]);
      const copy = env.path('via-qemu.raw');
      await runTool('nbdcopy', [uri, copy]);
      assert.equal(await imageDiffers(copy, 'raw', ref(b2, 'sda')), undefined);
    } finally {
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
    }
  });

  test('CLI: the newest backup by default, --json line, SIGTERM ends it cleanly', async () => {
    const { child, done } = spawnCli(env, ['--json', 'serve-backup', 'vm', '--repo', repo]);
    let line = '';
    child.stdout?.on('data', (b: Buffer) => (line += b.toString()));
    assert.ok(await waitFor(() => line.includes('\n'), 20_000), 'the serving line comes');
    const event = JSON.parse(line) as { event: string; backup: string; socket: string; exports: Array<{ name: string; size: number; uri: string }> };
    assert.equal(event.event, 'serving');
    assert.equal(event.backup, b3.id);
    assert.deepEqual(event.exports.map((e) => [e.name, e.size]), [['sda', 32 * MiB], ['sdb', 16 * MiB]]);
    const fake = { exports: event.exports, listen: { transport: 'unix', socket: event.socket } } as unknown as BackupServer;
    await assertServes(fake, b3, 'b3-cli');
    // 1M-1.125M was zeroed since b1.
    const sda = event.exports[0];
    assert.ok(sda !== undefined);
    assert.deepEqual(holes(await nbdMap(sda.uri)), [[1, 1.125], [4, 8], [10, 20], [21, 32]]);
    child.kill('SIGTERM');
    const r = await done;
    assert.equal(r.code, 0, r.stderr);
    assert.equal(existsSync(event.socket), false);
    // human output, one disk, --backup
    const h = spawnCli(env, ['serve-backup', 'vm', '--repo', repo, '--backup', b1.id, '--disk', 'sdb']);
    let text = '';
    h.child.stdout?.on('data', (b: Buffer) => (text += b.toString()));
    assert.ok(await waitFor(() => text.includes('\n'), 20_000));
    assert.match(text, /^serving 1 export\(s\) on nbd\+unix:\/\/\/\?socket=\S+\n$/);
    h.child.kill('SIGINT');
    assert.equal((await h.done).code, 0);
  });

  test('bad requests: unknown backup or disk, TCP without TLS, both --socket and --tcp', async () => {
    const cases: Array<[string[], string, RegExp]> = [
      [['--backup', '20990101T000000.000Z-0000'], 'BACKUP_NOT_FOUND', /no backup "20990101T000000.000Z-0000" of domain "vm"/],
      [['--disk', 'sdz'], 'DISK_NOT_FOUND', /has no disk "sdz"/],
      [['--tcp', '127.0.0.1:0'], 'NOT_SUPPORTED', /without TLS: give a TLS certificate directory \(--tls-cert-dir\), or --no-tls/],
      [['--tcp', '127.0.0.1:0', '--socket', env.path('s.sock')], 'INVALID_ARGUMENT', /either --socket or --tcp/],
      [['--tcp', 'nonsense'], 'INVALID_ARGUMENT', /Invalid --tcp "nonsense"/],
      [['--tcp', '127.0.0.1:0', '--tls-cert-dir', env.path('nope')], 'INVALID_ARGUMENT', /cannot read ca-cert.pem/],
    ];
    for (const [args, code, message] of cases) {
      const r = await env.cli(['--json', 'serve-backup', 'vm', '--repo', repo, ...args]);
      assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
      const e = cliError(r);
      assert.equal(e.code, code, args.join(' '));
      assert.match(e.message, message);
    }
    // no lock is left behind by a refused serve
    assert.deepEqual(existsSync(join(repo, 'locks')) ? (await new LocalBackend(repo).list('locks/')).length : 0, 0);
  });

  test('TCP with TLS: nbdinfo, nbdcopy and qemu-img with client certificates; no certificate or clear text is refused', async () => {
    await using server = await env.qb.repository.serveBackup('vm', { repo, backup: b2.id, listen: { transport: 'tcp', host: '127.0.0.1', port: 0, tlsCertDir: certs.serverDir } });
    assert.ok(server.tls);
    const port = server.listen.transport === 'tcp' ? server.listen.port : 0;
    const uri = `nbds://127.0.0.1:${port}/sda?tls-certificates=${certs.clientDir}`;
    const { stdout } = await runTool('nbdinfo', ['--json', uri]);
    assert.equal((JSON.parse(stdout) as { exports: Array<{ 'export-size': number }> }).exports[0]?.['export-size'], 32 * MiB);
    const copy = env.path('tls-sda.raw');
    await runTool('nbdcopy', [uri, copy]);
    assert.equal(await imageDiffers(copy, 'raw', ref(b2, 'sda')), undefined);
    const opts = `json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"${port}"},"export":"sdb","tls-creds":"tls0"}}`;
    await runTool('qemu-img', ['compare', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${certs.clientDir}`, opts, ref(b2, 'sdb')]);
    // a certificate of another CA, and a client that does not start TLS
    await assert.rejects(runTool('nbdinfo', [`nbds://127.0.0.1:${port}/sda?tls-certificates=${certs.strangerDir}`]));
    // libnbd reports NBD_REP_ERR_TLS_REQD as "Operation not supported"
    await assert.rejects(runTool('nbdinfo', [`nbd://127.0.0.1:${port}/sda`]), /opt_go request: Operation not supported/);
    // the server still serves
    await runTool('qemu-img', ['compare', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${certs.clientDir}`, opts, ref(b2, 'sdb')]);
  });

  test('TCP in clear text with --no-tls (CLI)', async () => {
    const { child, done } = spawnCli(env, ['--json', 'serve-backup', 'vm', '--repo', repo, '--tcp', '127.0.0.1:0', '--no-tls', '--disk', 'sdb']);
    let line = '';
    child.stdout?.on('data', (b: Buffer) => (line += b.toString()));
    assert.ok(await waitFor(() => line.includes('\n'), 20_000));
    const event = JSON.parse(line) as { port: number; tls: boolean; exports: Array<{ uri: string }> };
    assert.equal(event.tls, false);
    assert.equal(event.exports[0]?.uri, `nbd://127.0.0.1:${event.port}/sdb`);
    await runTool('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', event.exports[0]?.uri ?? '', ref(b2, 'sdb')]);
    child.kill('SIGTERM');
    assert.equal((await done).code, 0);
  });

  test('a damaged chunk fails its reads with EIO (one log line each) while other reads go on; a vanished repository fails reads, the server stays', async () => {
    const damaged = env.path('repo-damaged');
    cpSync(repo, damaged, { recursive: true });
    const store = await Store.open(new LocalBackend(damaged));
    await store.loadChunks();
    const d = b1.disks.find((x) => x.target === 'sda');
    assert.ok(d !== undefined);
    const table = await store.resolveIndex(d.index);
    const slot = 5; // inside the random data at 0-4M
    const loc = store.locate(table.ids.subarray(slot * 32, slot * 32 + 32));
    assert.ok(loc !== undefined);
    flipByte(join(damaged, 'data', loc.packId.slice(0, 2), loc.packId), loc.offset + loc.length - 1);
    const logs: string[] = [];
    await using server = await env.qb.repository.serveBackup('vm', { repo: damaged, backup: b1.id, log: (l) => logs.push(l) });
    const socket = server.listen.transport === 'unix' ? server.listen.socket : '';
    await using c = await NbdClient.connect({ socket }, { exportName: 'sda' });
    const want = readFileSync(ref(b1, 'sda'));
    await assert.rejects(c.read(slot * 64 * KiB, 4096), (err: unknown) => err instanceof NbdCommandError && err.error === NBD_EIO && /cannot be read/.test(err.message));
    assert.ok((await c.read(0, slot * 64 * KiB)).equals(want.subarray(0, slot * 64 * KiB)), 'the chunks before it read');
    assert.ok((await c.read((slot + 1) * 64 * KiB, MiB)).equals(want.subarray((slot + 1) * 64 * KiB, (slot + 1) * 64 * KiB + MiB)), 'the chunks after it read');
    {
      // the repository goes away: reads of chunks not cached fail (a second server, whose cache and read-ahead saw nothing yet), the server answers
      await using server2 = await env.qb.repository.serveBackup('vm', { repo: damaged, backup: b1.id, log: (l) => logs.push(l) });
      await using c2 = await NbdClient.connect({ socket: server2.listen.transport === 'unix' ? server2.listen.socket : '' }, { exportName: 'sda' });
      renameSync(damaged, `${damaged}-gone`);
      await assert.rejects(c2.read(3 * MiB, 64 * KiB), (err: unknown) => err instanceof NbdCommandError && err.error === NBD_EIO);
      assert.ok((await c2.read(5 * MiB, 64 * KiB)).equals(want.subarray(5 * MiB, 5 * MiB + 64 * KiB)), 'a hole needs no repository');
      renameSync(`${damaged}-gone`, damaged);
      assert.ok((await c2.read(3 * MiB, 64 * KiB)).equals(want.subarray(3 * MiB, 3 * MiB + 64 * KiB)), 'back again');
    }
    // nbdcopy of the whole disk fails on the damaged chunk; each failed read is one log line
    await assert.rejects(runTool('nbdcopy', [server.exports[0]?.uri ?? '', env.path('damaged.raw')]));
    assert.ok(logs.filter((l) => /failed: chunk [0-9a-f]{64} .*cannot be read/.test(l)).length >= 3, logs.join('\n'));
  });

  test('prune and gc while a backup is served delete nothing of it until serving stops', async () => {
    const copyRepo = env.path('repo-gc');
    cpSync(repo, copyRepo, { recursive: true, preserveTimestamps: true }); // gc reads objects' times (gc.ts step 7)
    await using server = await env.qb.repository.serveBackup('vm', { repo: copyRepo, backup: b1.id });
    const r = await env.cli(['--json', 'prune', 'vm', '--repo', copyRepo, '--keep-last', '1']);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual((JSON.parse(r.stdout) as { remove: Array<{ id: string }> }).remove.map((x) => x.id).sort(), [b1.id, b2.id].sort());
    const gc = JSON.parse(await env.cliOk(['--json', 'gc', '--repo', copyRepo])) as { packsDeleted: number; indexesDeleted: number; condemned: number };
    assert.equal(gc.packsDeleted + gc.indexesDeleted, 0, 'nothing is deleted while the backup is served');
    assert.ok(gc.condemned > 0, 'the pruned backups\' indexes are condemned');
    await assertServes(server, b1, 'b1-pruned');
    await server.close();
    const gc2 = JSON.parse(await env.cliOk(['--json', 'gc', '--repo', copyRepo])) as { indexesDeleted: number };
    assert.ok(gc2.indexesDeleted > 0, 'once serving stopped, gc frees them');
  });
});
