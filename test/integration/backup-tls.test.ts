// Pull-mode exports over TCP with TLS against real QEMU, with certificates
// the test makes (test/helpers/pki.ts):
// - `backup-begin` with <server transport='tcp' ... tls='yes'/> serves the
//   export only over TLS: nbdinfo reads it through nbds:// with the client
//   certificates, a plain nbd:// client is refused by QEMU, and our own
//   client's bytes equal the disk at the job's instant;
// - a client trusting another CA, or without a client certificate, gets one
//   sentence and no data;
// - a missing or incomplete certificate directory is refused before QEMU or
//   the metadata change; a certificate QEMU itself refuses fails the job
//   before it starts; ending the job removes QEMU's credentials object;
// - `qbackup backup --tcp` reads the disks over TLS with the default
//   directory (STATE_DIR/pki/qbackup) and the backup restores exactly.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { JobInfo } from '../../src/backup/job.js';
import { isQbackupError } from '../../src/errors.js';
import { NbdClient } from '../../src/nbd/index.js';
import { runTool } from '../../src/image/tools.js';
import { readClientCredentials } from '../../src/util/pki.js';
import { TestEnv, guestWrite, repoRoot } from '../helpers/env.js';
import { makePki, type Pki } from '../helpers/pki.js';
import { imageDiffers, referenceCopy } from '../helpers/repo.js';

const MiB = 1 << 20;

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const address = srv.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

async function rejects(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  assert.fail('expected a rejection');
}

describe('pull exports over TCP with TLS (real QEMU)', () => {
  let env: TestEnv;
  let pki: Pki;
  let otherCa: Pki;

  async function qmp(command: string, args: object = {}): Promise<unknown> {
    return env.qb.domains.monitorCommand('vm', JSON.stringify({ execute: command, arguments: args }));
  }
  async function tlsObjects(): Promise<string[]> {
    const objects = (await qmp('qom-list', { path: '/objects' })) as Array<{ name: string; type: string }>;
    return objects.filter((o) => o.type === 'child<tls-creds-x509>').map((o) => o.name);
  }
  async function assertQemuUntouched(): Promise<void> {
    const nodes = (await qmp('query-named-block-nodes')) as Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>;
    assert.deepEqual(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('bk')), [], 'no job node');
    assert.deepEqual(await qmp('query-jobs'), []);
    assert.deepEqual(await qmp('query-block-exports'), []);
    assert.deepEqual(await tlsObjects(), [], 'no TLS credentials object');
    assert.equal(await env.qb.backups.info('vm'), undefined, 'no job recorded');
  }
  function tcpXml(port: number, tls: 'yes' | 'no' = 'yes'): string {
    return env.writeFile(`tcp-${port}.xml`, `<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' port='${port}' tls='${tls}'/></domainbackup>`);
  }

  before(async () => {
    env = new TestEnv('qbt-tls-');
    pki = makePki(env.path('pki'));
    otherCa = makePki(env.path('other-pki'));
    await env.defineDomain('vm', [{ target: 'sda', sizeBytes: 16 * MiB }]);
    await env.qb.domains.start('vm', { paused: true });
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x3c 0 3M');
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0xc3 9M 64k');
  });
  after(async () => env.cleanup());

  test('backup-begin tls=yes: nbdinfo reads nbds://, plain nbd:// is refused, our client reads the frozen disk; wrong CA and no client certificate fail', async () => {
    const ref = await referenceCopy(env, 'vm', 'sda', env.path('ref-tls.raw'));
    const port = await freePort();
    const job = JSON.parse(await env.cliOk(['backup-begin', 'vm', tcpXml(port), '--tls-cert-dir', pki.dir, '--checkpoint', 't1', '--json'])) as JobInfo;
    assert.ok(job.server?.transport === 'tcp' && job.server.tls && job.server.tlsCertDir === pki.dir);
    assert.deepEqual(await tlsObjects(), [job.server.tlsCredsId]);
    // The guest writes on: the export keeps the job's instant.
    await guestWrite(env.qb, 'vm', 'sda', 'write -P 0x77 0 1M');

    const tlsUri = `nbds://127.0.0.1:${port}/sda?tls-certificates=${pki.dir}`;
    const { stdout } = await runTool('nbdinfo', ['--size', tlsUri]);
    assert.equal(Number(stdout.trim()), 16 * MiB);
    const plain = await rejects(runTool('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/sda`]));
    assert.match(plain.message, /TLS/);

    // Our client, through the URI and through the library's options: the bytes of the disk at the job's start.
    const client = await NbdClient.connectUri(tlsUri);
    assert.equal(client.negotiated.tls, true);
    const bytes = await client.read(0, client.size);
    await client.close();
    assert.ok(bytes.equals(readFileSync(ref)), 'TLS read equals the disk at the backup instant');
    const viaOptions = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'sda', tls: readClientCredentials(pki.dir, 'test') });
    assert.ok((await viaOptions.read(9 * MiB, 64 * 1024)).every((b) => b === 0xc3));
    await viaOptions.close();

    const noTls = await rejects(NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'sda' }));
    assert.ok(isQbackupError(noTls, 'NBD_HANDSHAKE'));
    assert.match(noTls.message, /^Cannot open NBD export "sda" on 127\.0\.0\.1:\d+: the server requires TLS/);
    const wrongCa = await rejects(NbdClient.connectUri(`nbds://127.0.0.1:${port}/sda?tls-certificates=${otherCa.dir}`));
    assert.ok(isQbackupError(wrongCa, 'NBD_TLS'), String(wrongCa));
    assert.match(wrongCa.message, /^Cannot open NBD export "sda" on 127\.0\.0\.1:\d+ with TLS: the server's certificate is not trusted by the CA in ".*other-pki"/);
    await assert.rejects(runTool('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/sda?tls-certificates=${otherCa.dir}`]));
    // Right CA, no client certificate: QEMU verifies its clients.
    const caOnly = env.path('ca-only');
    mkdirSync(caOnly);
    cpSync(join(pki.dir, 'ca-cert.pem'), join(caOnly, 'ca-cert.pem'));
    const anonymous = await rejects(NbdClient.connectUri(`nbds://127.0.0.1:${port}/sda?tls-certificates=${caOnly}`));
    assert.ok(isQbackupError(anonymous, 'NBD_TLS'), String(anonymous));
    assert.match(anonymous.message, /client certificate/);
    // The wrong host name for the certificate.
    const misnamed = await rejects(NbdClient.connectUri(`${tlsUri}&tls-hostname=backup.example`));
    assert.ok(isQbackupError(misnamed, 'NBD_TLS'));
    assert.match(misnamed.message, /certificate is not for "backup\.example"/);

    const shown = await env.cliOk(['domjobinfo', 'vm']);
    assert.match(shown, /Job type/);
    const xml = await env.cliOk(['backup-dumpxml', 'vm']);
    assert.match(xml, /tls="yes"/);
    await env.cliOk(['domjobabort', 'vm']);
    await assertQemuUntouched();
    assert.deepEqual(env.qb.checkpoints.list('vm').map((c) => c.name), ['t1']);
    await env.qb.checkpoints.delete('vm', 't1');
  });

  test('a missing or incomplete certificate directory is refused before QEMU or the metadata change', async () => {
    const port = await freePort();
    const incomplete = env.path('incomplete-pki');
    mkdirSync(incomplete);
    for (const f of ['ca-cert.pem', 'server-cert.pem']) cpSync(join(pki.dir, f), join(incomplete, f));
    const cases: Array<[string[], RegExp]> = [
      [['--tls-cert-dir', env.path('no-such-dir')], /^error: Cannot serve the backup of domain "vm" over TLS: certificate directory ".*no-such-dir" does not exist \(it must hold ca-cert\.pem, server-cert\.pem and server-key\.pem\)\n$/],
      [['--tls-cert-dir', incomplete], /^error: Cannot serve the backup of domain "vm" over TLS: certificate directory ".*incomplete-pki" has no server-key\.pem\n$/],
      // Without --tls-cert-dir: the state directory's pki/qbackup, which does not exist here.
      [[], /^error: Cannot serve the backup of domain "vm" over TLS: certificate directory ".*\/state\/pki\/qbackup" does not exist/],
    ];
    for (const [flags, message] of cases) {
      const r = await env.cli(['backup-begin', 'vm', tcpXml(port), '--checkpoint', 'never', ...flags]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, message);
      await assertQemuUntouched();
      assert.deepEqual(env.qb.checkpoints.list('vm'), [], 'no checkpoint made');
    }
    // A directory for a job that is not served with TLS is a mistake, not a setting to ignore.
    const plainJob = await env.cli(['backup-begin', 'vm', tcpXml(port, 'no'), '--tls-cert-dir', pki.dir]);
    assert.equal(plainJob.code, 1);
    assert.match(plainJob.stderr, /TLS settings \(a certificate directory or a client identity\) were given, but the job is not served over TCP with TLS/);
    await assertQemuUntouched();
  });

  test('a certificate QEMU refuses fails the job before it starts, leaving nothing behind', async () => {
    const bad = env.path('bad-pki');
    cpSync(pki.dir, bad, { recursive: true });
    writeFileSync(join(bad, 'server-cert.pem'), '-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n');
    const port = await freePort();
    const r = await env.cli(['backup-begin', 'vm', tcpXml(port), '--tls-cert-dir', bad, '--checkpoint', 'bad']);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^error: Cannot serve NBD exports over TLS with the certificates in ".*bad-pki": QEMU refused them \(Unable to import server certificate/);
    assert.equal(r.stderr.trim().split('\n').length, 1, 'one line');
    await assertQemuUntouched();
    assert.deepEqual(env.qb.checkpoints.list('vm'), []);
    const last = await env.qb.backups.lastResult('vm');
    assert.equal(last?.state, 'failed');
  });

  test('qbackup killed while starting a TLS job, or the job\'s reader gone: the next command removes the credentials object too', async () => {
    for (const point of ['backup-begin:before-qemu', 'backup-begin:after-qemu']) {
      const port = await freePort();
      const r = await env.cli(['backup-begin', 'vm', tcpXml(port), '--tls-cert-dir', pki.dir, '--checkpoint', `k-${point.slice(-4)}`], { env: { QBACKUP_CRASH_AT: point } });
      assert.notEqual(r.code, 0, point);
      // The kill left QEMU's credentials object behind; any command on the domain reaps the job.
      assert.equal(await env.qb.backups.info('vm'), undefined, `${point}: no job left`);
      await assertQemuUntouched();
      for (const c of env.qb.checkpoints.list('vm')) await env.qb.checkpoints.delete('vm', c.name);
    }
    // A job owned by a reader process that exited without ending it (as a killed repository backup leaves it): reaped, object removed.
    const port = await freePort();
    const script = `
      const { Qbackup } = await import(${JSON.stringify(join(repoRoot, 'dist', 'src', 'qbackup.js'))});
      const qb = Qbackup.open({ stateDir: ${JSON.stringify(env.stateDir)} });
      await qb.backups.begin('vm', { mode: 'pull', server: { transport: 'tcp', host: '127.0.0.1', port: ${port}, tls: true } }, { tlsCertDir: ${JSON.stringify(pki.dir)}, ownedByCaller: true });
      qb.close();`;
    execFileSync(process.execPath, ['--input-type=module', '-e', script]);
    // Any command reaps first (even the monitor command below), so the job is already settled here.
    await assertQemuUntouched();
    const last = await env.qb.backups.lastResult('vm');
    assert.equal(last?.state, 'failed');
    assert.match(last?.error ?? '', /the process that owned the job \(pid \d+\) ended without finishing it/);
    assert.ok(last?.server?.transport === 'tcp' && last.server.tlsCredsId !== undefined, 'that job was served with TLS');
  });

  test('--tls-client-dn: only the client certificate with that distinguished name is served', async () => {
    const port = await freePort();
    const ref = await referenceCopy(env, 'vm', 'sda', env.path('ref-authz.raw'));
    const uri = `nbds://127.0.0.1:${port}/sda?tls-certificates=${pki.dir}`;
    await env.cliOk(['backup-begin', 'vm', tcpXml(port), '--tls-cert-dir', pki.dir, '--tls-client-dn', 'CN=qbackup test client']);
    const client = await NbdClient.connectUri(uri);
    assert.ok((await client.read(0, client.size)).equals(readFileSync(ref)));
    await client.close();
    await env.cliOk(['domjobabort', 'vm']);
    await assertQemuUntouched();
    const objects = async (): Promise<string[]> => ((await qmp('qom-list', { path: '/objects' })) as Array<{ type: string }>).map((o) => o.type);
    assert.ok(!(await objects()).includes('child<authz-simple>'), 'authorization object removed');

    const port2 = await freePort();
    await env.cliOk(['backup-begin', 'vm', tcpXml(port2), '--tls-cert-dir', pki.dir, '--tls-client-dn', 'CN=someone else']);
    assert.ok((await objects()).includes('child<authz-simple>'));
    const refused = await rejects(NbdClient.connectUri(`nbds://127.0.0.1:${port2}/sda?tls-certificates=${pki.dir}`));
    assert.ok(isQbackupError(refused, 'NBD_TLS'), String(refused));
    assert.match(refused.message, /does not accept this client certificate/);
    await assert.rejects(runTool('nbdinfo', ['--size', `nbds://127.0.0.1:${port2}/sda?tls-certificates=${pki.dir}`]));
    await env.cliOk(['domjobabort', 'vm']);
    await assertQemuUntouched();
    assert.ok(!(await objects()).includes('child<authz-simple>'));
    const plain = await env.cli(['backup-begin', 'vm', tcpXml(port2, 'no'), '--tls-client-dn', 'CN=x']);
    assert.equal(plain.code, 1);
    assert.match(plain.stderr, /not served over TCP with TLS/);
  });

  test('qbackup backup --tcp reads over TLS with the default certificate directory; the backup restores exactly', async () => {
    const repo = env.path('repo');
    const port = await freePort();
    // Without the default directory: refused before the domain is touched.
    const missing = await env.cli(['backup', 'vm', '--repo', repo, '--tcp', `127.0.0.1:${port}`]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^error: Cannot back up domain "vm" over TCP with TLS: certificate directory ".*pki\/qbackup" does not exist/);
    await assertQemuUntouched();
    cpSync(pki.dir, join(env.stateDir, 'pki', 'qbackup'), { recursive: true });
    const ref = await referenceCopy(env, 'vm', 'sda', env.path('ref-repo.raw'));
    const m = JSON.parse(await env.cliOk(['--json', 'backup', 'vm', '--repo', repo, '--tcp', `127.0.0.1:${port}`])) as { id: string };
    await assertQemuUntouched();
    const out = env.path('restored');
    await env.cliOk(['restore', 'vm', '--repo', repo, '--backup', m.id, '--to', out, '--format', 'raw']);
    assert.equal(await imageDiffers(join(out, 'sda.raw'), 'raw', ref), undefined);
    rmSync(join(env.stateDir, 'pki'), { recursive: true, force: true });
  });
});
