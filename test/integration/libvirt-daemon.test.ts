// The daemon serving libvirt's domains beside qbackup's own, against the
// real libvirtd: the connections it reaches (a configured name and its
// own), each domain listed with its connection, a schedule made through the
// API that names qemu:///system backing up the libvirt domain (run now), and
// that backup restored through the API byte for byte as the guest had
// written it. A schedule of the configuration file names its connection by
// name. The page (Chromium, when installed) lists both domains, each with its
// connection, and its task log the connection of each task. A domain of
// qbackup's own with the libvirt domain's name is another domain: both back
// up at once, each task naming its connection. An instant restore of the
// libvirt domain started through the API runs; the daemon stopped (as
// SIGTERM stops it) while the copy is held, the copy completed meanwhile,
// the next start finalizes it: no network backing left, disks equal to the
// backup. Kept short: libvirt test files hold a machine-wide lock.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseConfig } from '../../src/config/load.js';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { chromium } from 'playwright-core';
import { TestEnv, repoRoot } from '../helpers/env.js';
import { ApiClient } from '../helpers/http.js';
import type { InstantRestoreInfo } from '../../src/instant/restore.js';
import { LocalBackend } from '../../src/repository/backend/local.js';
import { acquireLock } from '../../src/repository/locks.js';
import { isProcessAlive } from '../../src/util/proc.js';
import { eventually } from '../helpers/repo.js';
import { createTestDisks, guestWrite, libvirtTestDir, removeTestDomain, startLibvirt, testDomainName, testDomainXml, tool, virsh, type LibvirtDaemon } from '../helpers/libvirt.js';

const CHROMIUM = '/usr/bin/chromium';
const MiB = 1 << 20;
const DISK_BYTES = 8 * MiB;

describe('the daemon with a libvirt connection beside its own', () => {
  let libvirt: LibvirtDaemon;
  let client: LibvirtClient;
  let env: TestEnv;
  let daemon: Daemon;
  let api: ApiClient;
  let dom: LibvirtDomainRef;
  const name = testDomainName('daemon');
  /** The instant restore's new domain. */
  const instantName = `${name}-inst`;
  let instantServer: number | null = null;
  /** The backup task of the schedule run (the page shows its connection). */
  let scheduledTask = '';
  let token = '';
  // A name libvirt accepts and HTML would not: the page must show it as text.
  const oddName = `${testDomainName('odd')}<b>&"'`;
  const { dir, remove } = libvirtTestDir();
  const model = Buffer.alloc(DISK_BYTES);

  before(async () => {
    libvirt = await startLibvirt();
    client = await LibvirtClient.connect(libvirt.uri);
    dom = await client.create(await client.defineXml(testDomainXml(name, await createTestDisks(dir, ['sda'], DISK_BYTES))));
    await client.defineXml(testDomainXml(oddName.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;'), []));
    env = new TestEnv('qbt-lvdaemon-');
    await env.defineDomain('own1', [{ target: 'sda', sizeBytes: 4 * MiB }]);
    const config = parseConfig(
      [
        'repositories:',
        `  local: { path: ${env.path('repo')} }`,
        `  own: { path: ${env.path('repo-own')} }`,
        'connections:',
        `  system: ${libvirt.uri}`,
        'schedules:',
        '  nightly:',
        `    domain: ${name}`,
        '    connection: system',
        '    when: daily 02:00',
        '    repository: local',
        '',
      ].join('\n'),
      env.path('config.yaml'),
    );
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, config });
    token = daemon.bootstrapToken ?? '';
    api = new ApiClient(daemon.url, token);
  });

  after(async () => {
    await daemon?.close();
    if (instantServer !== null && isProcessAlive(instantServer)) process.kill(instantServer, 'SIGKILL');
    if (client !== undefined) for (const n of [name, oddName, instantName]) await removeTestDomain(client, n).catch(() => undefined);
    rmSync(join('/var/lib/libvirt/images', instantName), { recursive: true, force: true });
    await client?.close();
    await env?.cleanup();
    await libvirt?.stop();
    remove();
  });

  it('lists the connections, and the domains of each with its connection', async () => {
    const connections = (await api.get('/api/connections')).body as Array<{ name: string | null; uri: string; default: boolean }>;
    assert.deepEqual(connections, [
      { name: null, uri: 'qbackup:///', default: true },
      { name: 'system', uri: libvirt.uri, default: false },
    ]);
    const own = (await api.get('/api/domains?all=true')).body as Array<{ name: string; connection: string }>;
    assert.deepEqual(own.map((d) => [d.name, d.connection]), [['own1', 'qbackup:///']]);
    const byName = await api.get('/api/domains?all=true&connection=system');
    assert.equal(byName.status, 200, byName.text);
    const lv = (byName.body as Array<{ name: string; state: string; connection: string }>).find((d) => d.name === name);
    assert.deepEqual(lv && [lv.state, lv.connection], ['running', libvirt.uri]);
    const byUri = (await api.get(`/api/domains?connection=${encodeURIComponent(libvirt.uri)}`)).body as Array<{ name: string }>;
    assert.ok(byUri.some((d) => d.name === name));
    const one = (await api.get(`/api/domains/${name}?connection=system`)).body as { disks: Array<{ target: string }>; connection: string };
    assert.deepEqual([one.disks.map((d) => d.target), one.connection], [['sda'], libvirt.uri]);
    // Only the configured connections (and the daemon's own) are reached.
    const other = await api.get(`/api/domains?connection=${encodeURIComponent('qemu:///session')}`);
    assert.equal(other.status, 403);
    assert.match((other.body as { message: string }).message, /^Connection "qemu:\/\/\/session" is not in the configuration/);
    // The schedule of the file names its connection by name; the daemon keeps its URI.
    const schedules = (await api.get('/api/schedules')).body as Array<{ id: string; connection?: string }>;
    assert.equal(schedules.find((s) => s.id === 'config-nightly')?.connection, libvirt.uri);
    // It is changed in the file, but may be paused (and resumed) through the API.
    const edit = await api.request('PUT', '/api/schedules/config-nightly', { json: { domain: name, when: 'hourly', repo: 'local' } });
    assert.deepEqual([edit.status, (edit.body as { code: string }).code], [409, 'SCHEDULE_FROM_CONFIG']);
    const paused = (await api.post('/api/schedules/config-nightly/pause')).body as { paused?: boolean; nextRunMs: number | null };
    assert.deepEqual([paused.paused, paused.nextRunMs], [true, null]);
    assert.notEqual(((await api.post('/api/schedules/config-nightly/resume')).body as { nextRunMs: number | null }).nextRunMs, null);
  });

  it('a schedule naming qemu:///system backs up the libvirt domain, which restores byte-exact', async () => {
    model.fill(0x3c, MiB, 2 * MiB);
    await guestWrite(client, dom, 'sda', `write -P 0x3c ${MiB} ${MiB}`);
    const added = await api.post('/api/schedules', { domain: name, connection: libvirt.uri, when: 'weekly sun 03:00', repo: 'local' });
    assert.equal(added.status, 201, added.text);
    const schedule = added.body as { id: string; connection: string };
    assert.equal(schedule.connection, libvirt.uri);
    const run = await api.post(`/api/schedules/${schedule.id}/run`);
    assert.equal(run.status, 202, run.text);
    scheduledTask = (run.body as { id: string }).id;
    const task = await api.waitTask(scheduledTask);
    assert.equal(task['state'], 'succeeded', JSON.stringify(task['error']));
    assert.equal(task['connection'], libvirt.uri);
    assert.ok((task['log'] as Array<{ message: string }>).some((l) => l.message.includes(`(${libvirt.uri})`)));
    const backups = (await api.get(`/api/repository/backups?repo=local&domain=${name}`)).body as Array<{ id: string; disks: Array<{ level: string }> }>;
    assert.equal(backups.length, 1);
    assert.deepEqual(backups[0]?.disks.map((d) => d.level), ['full']);
    const to = mkdtempSync(join(env.dir, 'restore-'));
    const restore = await api.post('/api/repository/restore', { domain: name, repo: 'local', connection: 'system', to, format: 'raw' });
    assert.equal(restore.status, 202, restore.text);
    const restored = await api.waitTask((restore.body as { id: string }).id);
    assert.equal(restored['state'], 'succeeded', JSON.stringify(restored['error']));
    assert.equal(restored['connection'], libvirt.uri);
    const [file] = (restored['result'] as { disks: Array<{ target: string; file: string }> }).disks.map((d) => d.file);
    assert.ok(file !== undefined && readFileSync(file).equals(model), 'the restored disk equals what the guest wrote');
    rmSync(to, { recursive: true, force: true });
  });

  it('the page lists the domains of both connections, each with its connection', { skip: existsSync(CHROMIUM) ? false : `${CHROMIUM} is not installed` }, async () => {
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    try {
      const page = await browser.newPage({ viewport: { width: 1100, height: 500 }, bypassCSP: true });
      const errors: string[] = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(daemon.url);
      await page.fill('#token', daemon.bootstrapToken ?? '');
      await page.click('#save');
      const cell = (domain: string): string => `(document.querySelector('#domains tr[data-domain=${JSON.stringify(domain)}] td:nth-child(3)')?.textContent ?? '')`;
      await page.waitForFunction(`${cell(name)} === ${JSON.stringify(`system (${libvirt.uri})`)} && ${cell('own1')} === 'qbackup:///'`, undefined, { timeout: 20_000 });
      assert.equal(await page.textContent(`#domains tr[data-domain="${name}"] td:nth-child(2)`), 'running');
      // The odd name is text: shown as it is, and no element made of it.
      await page.waitForFunction(`[...document.querySelectorAll('#domains tr')].some((r) => r.dataset.domain === ${JSON.stringify(oddName)} && r.cells[0].textContent === ${JSON.stringify(oddName)} && r.cells[1].textContent === 'shut off')`, undefined, { timeout: 20_000 });
      assert.equal(await page.locator('#domains b').count(), 0);
      // The task log names each task's connection.
      await page.waitForFunction(`(document.querySelector('#tasks tr[data-task=${JSON.stringify(scheduledTask)}] td.conn')?.textContent ?? '') === ${JSON.stringify(`system (${libvirt.uri})`)}`, undefined, { timeout: 20_000 });
      // The screenshot shows this file's domains only (other tests' may share the libvirtd).
      await page.evaluate(`for (const r of document.querySelectorAll('#domains tbody tr')) r.hidden = ![${JSON.stringify(name)}, ${JSON.stringify(oddName)}, 'own1'].includes(r.dataset.domain)`);
      mkdirSync(join(repoRoot, 'test-output'), { recursive: true });
      await page.locator('#domains').screenshot({ path: join(repoRoot, 'test-output', 'console-connections.png') });
      assert.deepEqual(errors, []);
    } finally {
      await browser.close();
    }
  });

  it('a domain of qbackup\'s own with the same name is another domain: both back up at once, each task naming its connection', async () => {
    await env.defineDomain(name, [{ target: 'sda', sizeBytes: 4 * MiB }]);
    assert.equal((await api.post('/api/repository/init', { repo: 'own' })).status, 201);
    // A gc lock held on its repository keeps the own domain's backup under way (waiting) while the libvirt domain's is asked for.
    const held = await acquireLock(new LocalBackend(env.path('repo-own')), 'gc', null);
    let ids: string[];
    try {
      const own = await api.post('/api/repository/backups', { domain: name, repo: 'own' });
      assert.equal(own.status, 202, own.text);
      const ownId = (own.body as { id: string }).id;
      const waiting = await eventually(async () => (((await api.get(`/api/tasks/${ownId}`)).body as { progress: { phase: string } | null }).progress?.phase === 'waiting for a gc to end'), 60_000);
      assert.ok(waiting, 'the own domain\'s backup is under way');
      const lv = await api.post('/api/repository/backups', { domain: name, repo: 'local', connection: 'system' });
      assert.equal(lv.status, 202, lv.text);
      const lvId = (lv.body as { id: string }).id;
      assert.equal((await api.waitTask(lvId))['state'], 'succeeded');
      assert.equal(((await api.get(`/api/tasks/${ownId}`)).body as { state: string }).state, 'running', 'the two ran at the same time');
      // The same domain of the same connection is still refused while its backup is under way.
      const again = await api.post('/api/repository/backups', { domain: name, repo: 'own' });
      assert.deepEqual([again.status, (again.body as { code: string }).code], [409, 'BACKUP_RUNNING']);
      assert.match((again.body as { message: string }).message, /\(qbackup:\/\/\/\): task "[^"]+" is already backing it up$/);
      ids = [ownId, lvId];
    } finally {
      await held.release();
    }
    assert.equal((await api.waitTask(ids[0] ?? ''))['state'], 'succeeded');
    const listed = (await api.get('/api/tasks')).body as Array<{ id: string; domain: string; connection: string | null }>;
    assert.deepEqual(ids.map((id) => listed.find((t) => t.id === id)).map((t) => [t?.domain, t?.connection]), [[name, 'qbackup:///'], [name, libvirt.uri]]);
    const detail = await Promise.all(ids.map(async (id) => ((await api.get(`/api/tasks/${id}`)).body as { connection: string }).connection));
    assert.deepEqual(detail, ['qbackup:///', libvirt.uri]);
    const ownBackups = (await api.get(`/api/repository/backups?repo=own&domain=${name}`)).body as unknown[];
    assert.equal(ownBackups.length, 1);
  });

  it('an instant restore through the API runs; the daemon stopped while its copy is held is finalized at the next start', async () => {
    // Speed 1 byte/s: after its first chunk, the pull sleeps for days.
    const r = await api.post('/api/repository/restore-instant', { domain: name, repo: 'local', connection: 'system', as: instantName, speedBytesPerSec: 1 });
    assert.equal(r.status, 201, r.text);
    const started = r.body as InstantRestoreInfo;
    assert.equal(started.connection, libvirt.uri);
    instantServer = started.serverPid;
    assert.ok(instantServer !== null && isProcessAlive(instantServer), 'our server serves the backup');
    const dom = await client.lookupDomainByName(instantName);
    assert.equal((await client.getState(dom)).state, LIBVIRT.VIR_DOMAIN_RUNNING);
    assert.match(await client.getXmlDesc(dom), /<backingStore type='network'[\s\S]*?<source protocol='nbd' name='sda'/);
    const mid = await api.get(`/api/domains/${instantName}/instant-restore?connection=system`);
    assert.equal(mid.status, 200, mid.text);
    assert.equal((mid.body as InstantRestoreInfo).state, 'streaming');

    // Stopped as SIGTERM stops it; while it is down the held pull is cancelled and run again unthrottled to its end.
    await daemon.close({ interrupt: true });
    await virsh(['blockjob', instantName, 'sda', '--abort']);
    await virsh(['blockpull', instantName, 'sda', '--wait']);
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, config: daemon.service.config });
    api = new ApiClient(daemon.url, token);

    // The start settled it: nothing reads from the backup, our server is gone, the restore is recorded as completed.
    for (const flags of [0, LIBVIRT.VIR_DOMAIN_XML_INACTIVE]) assert.doesNotMatch(await client.getXmlDesc(dom, flags), /protocol=['"]nbd['"]/, `no NBD backing (flags ${flags})`);
    assert.ok(!isProcessAlive(instantServer), 'our server stopped');
    assert.equal(env.qb.connection(libvirt.uri).instant.loadRecord(instantName), undefined);
    const done = await api.get(`/api/domains/${instantName}/instant-restore?connection=system&completed=true`);
    assert.equal(done.status, 200, done.text);
    assert.deepEqual([(done.body as InstantRestoreInfo).state, (done.body as InstantRestoreInfo).connection], ['completed', libvirt.uri]);
    await client.destroy(dom, LIBVIRT.VIR_DOMAIN_DESTROY_GRACEFUL);
    const [disk] = started.disks;
    assert.ok(disk !== undefined);
    const raw = join(env.dir, 'instant-sda.raw');
    await tool('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', disk.overlay, raw]);
    assert.ok(readFileSync(raw).equals(model), 'the restored disk equals the backup');
  });
});
