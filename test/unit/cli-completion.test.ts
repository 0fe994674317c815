// Bash completion through the CLI (no QEMU): command names, a command's own
// options and the global ones, configured repository names after --repo; and
// the script that bash sources calls the hidden helper.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, test } from 'node:test';
import { cliPath } from '../helpers/env.js';

const run = promisify(execFile);

describe('bash completion', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qbt-complete-'));
  const config = join(dir, 'config.yaml');
  writeFileSync(config, `repositories:\n  local: {path: ${dir}/repo}\n  offsite: {url: "s3://bucket/prefix"}\n`);
  const complete = async (...words: string[]): Promise<string[]> => {
    const { stdout } = await run(process.execPath, [cliPath, '--state-dir', join(dir, 'state'), '--config', config, '__complete', '--', ...words]);
    return stdout.split('\n').filter((w) => w !== '');
  };

  test('commands, options and repository names', async () => {
    const commands = await complete('');
    for (const c of ['backup', 'restore', 'serve', 'config', 'completion']) assert.ok(commands.includes(c), c);
    assert.ok(!commands.includes('__complete'), 'the helper stays hidden');
    const options = await complete('prune', '--keep');
    for (const o of ['--keep-last', '--keep-daily', '--repo', '--config', '--json']) assert.ok(options.includes(o), o);
    assert.deepEqual(await complete('backup', 'vm1', '--repo', ''), ['local', 'offsite']);
    const { stdout } = await run(process.execPath, [cliPath, '--state-dir', join(dir, 'state'), 'completion', 'bash']);
    assert.match(stdout, /complete -o default -F _qbackup qbackup/);
    assert.match(stdout, /qbackup __complete -- /);
  });
});
