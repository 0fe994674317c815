// The web page in a real browser (Debian's chromium, driven by
// playwright-core; nothing is downloaded) against a real daemon and a real
// domain: sign in with a token, press "Back up now", see the progress bar
// fed by the task's event stream reach the end and the backup appear in the
// domain's row, in the backups table, and its checkpoint in the chain with
// the disk's coverage. A screenshot is kept in test-output/http-page.png.
// Without /usr/bin/chromium the test is skipped, except under CI, where
// .ci/run installs it.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { chromium, type Browser } from 'playwright-core';
import { startDaemon, type Daemon } from '../../src/http/daemon.js';
import { TestEnv, guestWrite, repoRoot } from '../helpers/env.js';

const CHROMIUM = '/usr/bin/chromium';
const skip = !existsSync(CHROMIUM) && process.env['CI'] !== 'true' ? `${CHROMIUM} is not installed (apt-get install chromium)` : false;

describe('the web page (real browser, real daemon, real QEMU)', { skip }, () => {
  let env: TestEnv;
  let daemon: Daemon;
  let browser: Browser;

  before(async () => {
    env = new TestEnv('qbt-page-');
    await env.defineDomain('vm1', [{ target: 'sda', sizeBytes: 32 << 20 }]);
    await env.qb.domains.start('vm1', { paused: true });
    await guestWrite(env.qb, 'vm1', 'sda', 'write -P 0x5a 0 16M');
    daemon = await startDaemon(env.qb, { listen: '127.0.0.1:0', schedulerIntervalMs: 0 });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  });

  after(async () => {
    await browser?.close();
    await daemon?.close();
    await env?.cleanup();
  });

  test('back up now: the progress bar follows the task and the backup appears', async () => {
    // bypassCSP: the page's policy forbids eval, which waitForFunction with text needs.
    const page = await browser.newPage({ viewport: { width: 1200, height: 700 }, bypassCSP: true });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(daemon.url);
    await page.fill('#token', daemon.bootstrapToken ?? '');
    await page.fill('#repo', env.path('repo'));
    await page.click('#save');
    const row = page.locator('tr[data-domain="vm1"]');
    await row.waitFor();
    // The row can appear before its state cell is filled: wait for the state asserted.
    const stateCell = `document.querySelector('tr[data-domain="vm1"] td:nth-child(2)')`;
    await page.waitForFunction(`(${stateCell}?.textContent ?? '') === 'running'`, undefined, { timeout: 10_000 });
    assert.equal(await row.locator('td').nth(1).textContent(), 'running');
    // Every text the progress label shows, in order. (Browser code is given
    // as text: the project's TypeScript has no DOM types.)
    const label = `document.querySelector('tr[data-domain="vm1"] .pct')`;
    await page.evaluate(`window.seen = []; new MutationObserver(() => window.seen.push(${label}.textContent)).observe(${label}, { childList: true, characterData: true, subtree: true })`);
    await row.getByRole('button', { name: 'Back up now' }).click();
    await page.waitForFunction(`/succeeded|failed/.test(${label}.textContent)`, undefined, { timeout: 60_000 });
    const seen = (await page.evaluate('window.seen')) as string[];
    assert.ok(seen.some((t) => /^backup sda \d+%$/.test(t)), `progress was shown: ${JSON.stringify(seen)}`);
    assert.equal(seen.at(-1), 'succeeded');
    assert.equal(await page.evaluate(`document.querySelector('tr[data-domain="vm1"] progress').value`), 1);
    const [manifest] = await env.qb.repository.list({ repo: env.path('repo') }, 'vm1');
    assert.ok(manifest !== undefined);
    await page.waitForFunction(`document.querySelector('tr[data-domain="vm1"]').textContent.includes(${JSON.stringify(manifest.id)})`, undefined, { timeout: 10_000 });
    await page.waitForFunction(`document.querySelector('#tasks tbody').textContent.includes('repository.backup')`);
    // the backups table lists it with its sizes, and the chain shows its checkpoint with the disk's coverage
    await page.waitForFunction(`!!document.querySelector('#backups tr[data-backup=${JSON.stringify(manifest.id)}]')`, undefined, { timeout: 10_000 });
    await page.waitForFunction(`(document.querySelector('#chains [data-checkpoint=${JSON.stringify(manifest.checkpoint)}]')?.textContent ?? '').includes('sda: incremental')`, undefined, { timeout: 10_000 });
    assert.match((await page.textContent('#stats')) ?? '', /^1 backups, .* dedup \d/);
    const outDir = join(repoRoot, 'test-output');
    mkdirSync(outDir, { recursive: true });
    await page.screenshot({ path: join(outDir, 'http-page.png'), fullPage: true });
    assert.deepEqual(errors, []);
  });
});
