// File-level restore through the daemon: a backup of a domain whose disk
// holds one ext4 partition (so it is "/" on its own) is listed, downloaded
// and restored over HTTP, and browsed in the page in a real browser
// (Debian's chromium through playwright-core): breadcrumbs, a download that
// arrives with the file's bytes, "Restore selected" as a task, and a name
// made to inject HTML shown as text. Every request after the first is served
// by the same warm appliance (one pid record for all of them). A screenshot
// is kept in test-output/files-page.png.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { chromium, type Browser } from 'playwright-core';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { runTool } from '../../src/image/tools.js';
import type { Manifest } from '../../src/repository/repository.js';
import { TestEnv, repoRoot } from '../helpers/env.js';
import { MiB, ext4Image, partitionedDisk, writeTree } from '../helpers/guest-fs.js';
import { ApiClient } from '../helpers/http.js';

const CHROMIUM = '/usr/bin/chromium';
const noBrowser = !existsSync(CHROMIUM) && process.env['CI'] !== 'true';
const T = 1_700_000_000;
const EVIL = '<img src=x onerror="document.body.dataset.pwned=1">.txt';
const DATA = randomBytes(200 * 1024);

describe('files over HTTP and in the page (warm appliance, real daemon)', () => {
  let env: TestEnv;
  let daemon: Daemon;
  let api: ApiClient;
  let backup: Manifest;
  let repo: string;
  let browser: Browser | undefined;
  const records = (): string[] => readdirSync(join(env.qb.domains.runDir(), 'files')).filter((n) => n.endsWith('.json'));

  before(async () => {
    env = new TestEnv('qbf-http-', { accel: 'tcg' });
    repo = env.path('repo');
    const tree = env.path('tree');
    writeTree(tree, [
      { path: 'etc/hostname', data: 'web1\n', mode: 0o644, time: T },
      { path: 'srv/data/blob.bin', data: DATA, mode: 0o640, time: T + 10 },
      { path: 'srv/data/readme.txt', data: 'read me\n', mode: 0o644, time: T + 20 },
      { path: `srv/${EVIL}`, data: 'not markup\n', mode: 0o644, time: T },
      { path: 'srv/data', dir: true, mode: 0o755, time: T + 30 },
    ]);
    await ext4Image(env.path('root.img'), tree, 16 * MiB, 'web', '3c9d2b9e-2f0e-4a39-9a8e-5b1c1d0e7f21');
    const disk = await partitionedDisk(env.path('disk.raw'), 20 * MiB, [{ image: env.path('root.img'), sizeBytes: 16 * MiB, type: '83' }]);
    const sda = env.path('web-sda.qcow2');
    await runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk.file, sda]);
    await env.qb.domains.define(env.domainXml('web', [{ target: 'sda', file: sda }]));
    await env.qb.domains.start('web', { paused: true });
    backup = await env.qb.repository.backup('web', { repo });
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    api = new ApiClient(daemon.url, daemon.bootstrapToken);
  });

  after(async () => {
    await browser?.close();
    await daemon?.close();
    await env?.cleanup();
  });

  const q = (path: string): string => `?repo=${encodeURIComponent(repo)}&path=${encodeURIComponent(path)}`;

  test('list, download and restore over HTTP, all from one warm appliance', async () => {
    const root = await api.get(`/api/repository/backups/${backup.id}/files${q('/')}`);
    assert.equal(root.status, 200, root.text);
    const body = root.body as { path: string; entries: Array<{ name: string; type: string }> };
    assert.deepEqual(body.entries.map((e) => e.name).filter((n) => n !== 'lost+found'), ['etc', 'srv']);
    const data = await api.get(`/api/repository/backups/${backup.id}/files${q('/srv/data')}`);
    const entries = (data.body as { entries: Array<{ name: string; size: number; mode: number; mtime: string }> }).entries;
    assert.deepEqual(entries.map((e) => [e.name, e.size, e.mode, e.mtime]), [
      ['blob.bin', DATA.length, 0o640, new Date((T + 10) * 1000).toISOString()],
      ['readme.txt', 8, 0o644, new Date((T + 20) * 1000).toISOString()],
    ]);
    const res = await fetch(`${daemon.url}/api/repository/backups/${backup.id}/files/content${q('/srv/data/blob.bin')}`, { headers: { authorization: `Bearer ${api.token ?? ''}` } });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-length'), String(DATA.length));
    assert.equal(res.headers.get('content-type'), 'application/octet-stream');
    assert.match(res.headers.get('content-disposition') ?? '', /^attachment; filename="blob.bin"/);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(DATA));
    const txt = await fetch(`${daemon.url}/api/repository/backups/${backup.id}/files/content${q('/srv/data/readme.txt')}`, { headers: { authorization: `Bearer ${api.token ?? ''}` } });
    assert.equal(txt.headers.get('content-type'), 'text/plain; charset=utf-8');
    assert.equal(await txt.text(), 'read me\n');
    // Bad input: one sentence each.
    const missing = await api.get(`/api/repository/backups/${backup.id}/files/content${q('/srv/nope')}`);
    assert.equal(missing.status, 404);
    assert.deepEqual(missing.body, { code: 'FILE_NOT_FOUND', message: `Backup "${backup.id}" of domain "web" has no file or directory "/srv/nope"` });
    const nob = await api.get(`/api/repository/backups/b-nope/files${q('/')}`);
    assert.equal(nob.status, 404);
    assert.equal((nob.body as { code: string }).code, 'BACKUP_NOT_FOUND');
    // Restore into a host directory as a task.
    const to = env.path('restored');
    const post = await api.post(`/api/repository/backups/${backup.id}/files/restore`, { repo, paths: ['/srv/data', '/etc/hostname'], to });
    assert.equal(post.status, 202, post.text);
    const task = await api.waitTask((post.body as { id: string }).id, 300_000);
    assert.equal(task['state'], 'succeeded', JSON.stringify(task['error']));
    assert.ok(readFileSync(join(to, 'data/blob.bin')).equals(DATA));
    assert.equal(statSync(join(to, 'data/blob.bin')).mode & 0o777, 0o640);
    assert.equal(Math.floor(statSync(join(to, 'data')).mtimeMs / 1000), T + 30);
    assert.equal(readFileSync(join(to, 'hostname'), 'utf8'), 'web1\n');
    // Into a guest: a guest directory with ".." is refused before any task starts.
    const bad = await api.post(`/api/repository/backups/${backup.id}/files/restore`, { repo, paths: ['/etc/hostname'], to: '/srv/../etc', intoGuest: 'web' });
    assert.equal(bad.status, 400, bad.text);
    assert.equal((bad.body as { code: string }).code, 'INVALID_ARGUMENT');
    // One appliance served every request.
    assert.equal(records().length, 1);
  });

  test('the page browses a backup, downloads a file and restores the selection (Chromium)', { skip: noBrowser ? `${CHROMIUM} is not installed` : false }, async () => {
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 }, bypassCSP: true, acceptDownloads: true });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(daemon.url);
    await page.fill('#token', daemon.bootstrapToken ?? '');
    await page.fill('#repo', repo);
    await page.click('#save');
    const open = page.locator(`#backups tr[data-backup="${backup.id}"] button.files-open`);
    await open.waitFor({ timeout: 30_000 });
    await open.click();
    await page.locator('#files-table tr[data-path="/srv"]').waitFor({ timeout: 120_000 });
    // A name made of markup is shown as text and runs nothing.
    await page.locator('#files-table a.files-dir', { hasText: 'srv/' }).click();
    const evil = page.locator(`#files-table tr[data-path=${JSON.stringify(`/srv/${EVIL}`)}]`);
    await evil.waitFor({ timeout: 60_000 });
    assert.equal(await evil.locator('td').nth(1).textContent(), EVIL);
    assert.equal(await page.evaluate('document.body.dataset.pwned ?? null'), null);
    assert.deepEqual(await page.locator('#files-crumbs a').allTextContents(), ['/', 'srv']);
    await page.locator('#files-table a.files-dir', { hasText: 'data/' }).click();
    await page.locator('#files-table tr[data-path="/srv/data/readme.txt"]').waitFor({ timeout: 60_000 });
    assert.deepEqual(await page.locator('#files-crumbs a').allTextContents(), ['/', 'srv', 'data']);
    const row = page.locator('#files-table tr[data-path="/srv/data/blob.bin"]');
    assert.equal(await row.locator('td').nth(2).textContent(), '200.0 KiB');
    const [download] = await Promise.all([page.waitForEvent('download', { timeout: 60_000 }), row.locator('button.files-download').click()]);
    assert.equal(download.suggestedFilename(), 'blob.bin');
    const saved = env.path('downloaded.bin');
    await download.saveAs(saved);
    assert.ok(readFileSync(saved).equals(DATA));
    // Restore selected: readme.txt into a directory given at the prompt.
    const to = env.path('from-page');
    page.once('dialog', (d) => void d.accept(to));
    await page.locator('#files-table tr[data-path="/srv/data/readme.txt"] input.files-pick').check();
    await page.click('#files-restore');
    await page.waitForFunction(`/^task /.test(document.querySelector('#files-result').textContent)`, undefined, { timeout: 30_000 });
    const deadline = Date.now() + 120_000;
    while (!existsSync(join(to, 'readme.txt')) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    assert.equal(readFileSync(join(to, 'readme.txt'), 'utf8'), 'read me\n');
    await page.locator('#files-table tr[data-path="/srv/data/blob.bin"] input.files-pick').check();
    const outDir = join(repoRoot, 'test-output');
    mkdirSync(outDir, { recursive: true });
    await page.locator('#files').screenshot({ path: join(outDir, 'files-page.png') });
    assert.deepEqual(errors, []);
    assert.equal(records().length, 1);
  });
});
