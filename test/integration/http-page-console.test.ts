// The page as the admin's console, in a real browser (Debian's chromium via
// playwright-core) against a real daemon with a configuration file and a
// real domain: choose a configured repository, add a schedule in its
// dialog, run it now, see the backup, restore it to a directory from the
// restore dialog (the restored bytes equal the disk at backup time), change
// and pause the schedule; a read-only token sees the page without the
// buttons that would fail; a damaged manifest is shown damaged while the
// other backups stay listed. Every wait is for the condition asserted.
// Screenshots go to test-output/console-*.png.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, readdirSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { chromium, type Browser, type Page } from 'playwright-core';
import { parseConfig } from '../../src/config/load.js';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { TestEnv, guestWrite, repoRoot } from '../helpers/env.js';

const CHROMIUM = '/usr/bin/chromium';
const skip = !existsSync(CHROMIUM) && process.env['CI'] !== 'true' ? `${CHROMIUM} is not installed (apt-get install chromium)` : false;
const MiB = 1 << 20;
const DISK_BYTES = 8 * MiB;
const outDir = join(repoRoot, 'test-output');

describe('the page as the admin console (real browser, real daemon, real QEMU)', { skip }, () => {
  let env: TestEnv;
  let daemon: Daemon;
  let browser: Browser;
  /** The disk's bytes as the guest wrote them before any backup. */
  const disk = Buffer.alloc(DISK_BYTES);

  before(async () => {
    env = new TestEnv('qbt-console-');
    await env.defineDomain('vm1', [{ target: 'sda', sizeBytes: DISK_BYTES }]);
    await env.qb.domains.start('vm1', { paused: true });
    await guestWrite(env.qb, 'vm1', 'sda', `write -P 0x6b ${MiB} ${2 * MiB}`);
    disk.fill(0x6b, MiB, 3 * MiB);
    const config = parseConfig(
      ['repositories:', ...['main', 'viewer', 'damaged'].map((n) => `  ${n}: { path: ${env.path(`repo-${n}`)} }`), 'defaults:', '  repository: main', ''].join('\n'),
      env.path('config.yaml'),
    );
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0, config });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    mkdirSync(outDir, { recursive: true });
  });

  after(async () => {
    await browser?.close();
    await daemon?.close();
    await env?.cleanup();
  });

  async function signIn(token: string, repository: string): Promise<{ page: Page; errors: string[] }> {
    // bypassCSP: the page's policy forbids eval, which waitForFunction with text needs.
    const page = await browser.newPage({ viewport: { width: 1100, height: 760 }, bypassCSP: true });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(daemon.url);
    await page.fill('#token', token);
    await page.click('#save');
    // The repository is chosen from the configured names.
    await page.locator(`#repo-choice option[value="${repository}"]`).waitFor({ state: 'attached' });
    await page.selectOption('#repo-choice', repository);
    await page.click('#save');
    // A whole refresh has drawn this repository's backups.
    await page.waitForFunction(`document.body.dataset.repository === ${JSON.stringify(repository)}`, undefined, { timeout: 20_000 });
    return { page, errors };
  }

  test('add a schedule, run it now, see the backup, restore it from the dialog; change and pause the schedule', async () => {
    const { page, errors } = await signIn(daemon.bootstrapToken ?? '', 'main');
    assert.deepEqual(await page.locator('#repo-choice option').allTextContents(), [`main — ${env.path('repo-main')}`, `viewer — ${env.path('repo-viewer')}`, `damaged — ${env.path('repo-damaged')}`]);
    assert.equal(await page.locator('#repo').isVisible(), false, 'no free-text location when the configuration names the repositories');
    // The domain row names its connection.
    const row = page.locator('#domains tr[data-domain="vm1"]');
    await page.waitForFunction(`(document.querySelector('#domains tr[data-domain="vm1"] td:nth-child(3)')?.textContent ?? '') === 'qbackup:///'`, undefined, { timeout: 10_000 });

    await page.click('#schedule-add');
    await page.fill('#schedule-domain', 'vm1');
    await page.selectOption('#schedule-connection', 'qbackup:///');
    await page.fill('#schedule-when', 'daily 02:00');
    assert.equal(await page.inputValue('#schedule-repo'), 'main');
    await page.fill('#schedule-keep-last', '3');
    await page.locator('#schedule-dialog').screenshot({ path: join(outDir, 'console-schedule.png') });
    await page.click('#schedule-submit');
    const [schedule] = daemon.service.schedules.list();
    assert.ok(schedule !== undefined);
    assert.deepEqual([schedule.domain, schedule.when, schedule.repo, schedule.connection, schedule.retention], ['vm1', 'daily 02:00', env.path('repo-main'), 'qbackup:///', { keepLast: 3 }]);
    const scheduleRow = page.locator(`#schedules tr[data-schedule="${schedule.id}"]`);
    await scheduleRow.waitFor();

    await scheduleRow.getByRole('button', { name: 'Run now' }).click();
    await page.waitForFunction(`/succeeded|failed/.test(document.querySelector('tr[data-domain="vm1"] .pct')?.textContent ?? '')`, undefined, { timeout: 60_000 });
    assert.equal(await row.locator('.pct').textContent(), 'succeeded');
    const [manifest] = await env.qb.repository.list({ repo: env.path('repo-main') }, 'vm1');
    assert.ok(manifest !== undefined);
    const backupRow = page.locator(`#backups tr[data-backup="${manifest.id}"]`);
    await backupRow.waitFor({ timeout: 15_000 });
    // The task's log, from the tasks table.
    await page.locator(`#tasks tr[data-task] button[data-log]`).first().waitFor();
    const backupTask = daemon.service.tasks.list(10).find((t) => t.kind === 'repository.backup');
    assert.ok(backupTask !== undefined);
    await page.locator(`#tasks button[data-log="${backupTask.id}"]`).click();
    await page.waitForFunction(`document.querySelector('#task-log-lines').textContent.includes(${JSON.stringify(`backup ${manifest.id} written`)})`, undefined, { timeout: 10_000 });
    assert.match((await page.textContent('#task-log-summary')) ?? '', new RegExp(`repository\\.backup of vm1 on qbackup:\\/\\/\\/, requested by schedule ${schedule.id}`));
    await page.click('#task-log-close');

    // Restore it to a directory, from the restore dialog.
    const to = env.path('restored');
    await backupRow.getByRole('button', { name: 'Restore…' }).click();
    await page.check('#restore-form input[value="to"]');
    await page.fill('#restore-to', to);
    await page.selectOption('#restore-format', 'raw');
    for (const kind of ['define', 'into', 'instant']) assert.equal(await page.locator(`#restore-form input[value="${kind}"]`).count(), 1, `the dialog offers ${kind}`);
    assert.deepEqual([await page.isVisible('#restore-define'), await page.isVisible('#restore-into')], [false, false], 'fields of other kinds are hidden');
    await page.locator('#restore-dialog').screenshot({ path: join(outDir, 'console-restore.png') });
    await page.click('#restore-submit');
    await page.waitForFunction(`document.querySelector('#task-log').open && document.querySelector('#task-log-state').textContent === 'succeeded'`, undefined, { timeout: 60_000 });
    await page.click('#task-log-close');
    const restoreTask = daemon.service.tasks.list(10).find((t) => t.kind === 'repository.restore');
    const files = (restoreTask?.result as { disks: Array<{ file: string }> } | undefined)?.disks.map((d) => d.file) ?? [];
    assert.deepEqual(files.map((f) => f.startsWith(to)), [true]);
    assert.ok(readFileSync(files[0] ?? '').equals(disk), 'the restored disk equals the disk at backup time');

    // Change the schedule, then pause and resume it.
    await scheduleRow.getByRole('button', { name: 'Edit…' }).click();
    assert.equal(await page.inputValue('#schedule-when'), 'daily 02:00');
    await page.fill('#schedule-when', 'weekly sun 03:00');
    await page.click('#schedule-submit');
    await page.waitForFunction(`(document.querySelector('#schedules tr[data-schedule="${schedule.id}"]')?.textContent ?? '').includes('weekly sun 03:00')`, undefined, { timeout: 10_000 });
    assert.equal(daemon.service.schedules.get(schedule.id).retention?.keepLast, 3, 'an edit keeps what it did not change');
    await scheduleRow.getByRole('button', { name: 'Pause' }).click();
    await scheduleRow.locator('.badge.paused').waitFor({ timeout: 10_000 });
    const paused = daemon.service.schedules.get(schedule.id);
    assert.deepEqual([paused.paused, paused.nextRunMs], [true, null]);
    await scheduleRow.getByRole('button', { name: 'Resume' }).click();
    await scheduleRow.getByRole('button', { name: 'Pause' }).waitFor({ timeout: 10_000 });
    assert.notEqual(daemon.service.schedules.get(schedule.id).nextRunMs, null);
    await page.screenshot({ path: join(outDir, 'console.png'), fullPage: true });
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('a read-only token sees the page without the buttons that would fail', async () => {
    await env.qb.repository.backup('vm1', { repo: env.path('repo-viewer') });
    daemon.service.schedules.add({ domain: 'vm1', when: 'daily 04:00', repo: env.path('repo-viewer') });
    const { token } = daemon.service.tokens.create('viewer', { readOnly: true });
    const { page, errors } = await signIn(token, 'viewer');
    await page.locator('#backups tr[data-backup]').first().waitFor({ timeout: 15_000 });
    await page.locator('#schedules tr[data-schedule]').first().waitFor({ timeout: 15_000 });
    await page.locator('#tasks tr[data-task]').first().waitFor({ timeout: 15_000 });
    assert.match((await page.textContent('#who')) ?? '', /\(read-only\)/);
    for (const name of ['Back up now', 'Restore…', 'Verify repository', 'Add schedule…', 'Run now', 'Edit…', 'Pause', 'Remove']) {
      assert.equal(await page.getByRole('button', { name, exact: true }).count() === 0 || !(await page.getByRole('button', { name, exact: true }).first().isVisible()), true, `"${name}" is not shown`);
    }
    assert.equal(await page.locator('button.write:visible').count(), 0);
    // What only reads stays: the task logs and the file browser.
    assert.ok(await page.locator('#tasks button[data-log]').first().isVisible());
    assert.ok(await page.locator('#backups button.files-open').first().isVisible());
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('a damaged manifest is shown damaged and the other backups stay listed', async () => {
    const repo = env.path('repo-damaged');
    const first = await env.qb.repository.backup('vm1', { repo });
    const second = await env.qb.repository.backup('vm1', { repo });
    const dir = join(repo, 'snapshots', 'vm1');
    const file = readdirSync(dir).find((f) => f === first.id || f.startsWith(`${first.id}.g`));
    assert.ok(file !== undefined, `the manifest of ${first.id} is in ${dir}`);
    truncateSync(join(dir, file), 10);
    const { page, errors } = await signIn(daemon.bootstrapToken ?? '', 'damaged');
    const damaged = page.locator(`#backups tr.damaged[data-damaged="${first.id}"]`);
    await damaged.waitFor({ timeout: 15_000 });
    assert.equal(await damaged.locator('.badge.damaged').textContent(), 'damaged');
    assert.match((await damaged.textContent()) ?? '', new RegExp(`Manifest of backup "${first.id}" \\(domain "vm1"\\) is damaged`));
    assert.ok(await page.locator(`#backups tr[data-backup="${second.id}"]`).getByRole('button', { name: 'Restore…' }).isVisible());
    await page.waitForFunction(`document.querySelector('#stats').textContent.includes('1 damaged')`, undefined, { timeout: 10_000 });
    await page.screenshot({ path: join(outDir, 'console-damaged.png') });
    assert.deepEqual(errors, []);
    await page.close();
  });
});
