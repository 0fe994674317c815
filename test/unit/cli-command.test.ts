// The CLI's command definitions without QEMU: what `run` receives for each
// kind of argument and option, that every real definition registers, and that
// a definition keyed differently from commander is refused as a bug.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Command } from 'commander';
import { backupCommands } from '../../src/cli/backup-commands.js';
import { checkpointCommands } from '../../src/cli/checkpoint-commands.js';
import { arg, defineCommand, flag, optionalArg, registerCommands, repeatable, value, valueWithDefault, variadicArg, type CliCommand } from '../../src/cli/command.js';
import type { CliContext, CommandEnv } from '../../src/cli/context.js';
import { domainCommands } from '../../src/cli/domain-commands.js';
import { repositoryCommands } from '../../src/cli/repository-commands.js';
import { serviceCommands } from '../../src/cli/service-commands.js';
import type { Qbackup } from '../../src/qbackup.js';

/** A context that runs the command without opening the library (no test here touches it). */
const fakeCli: CliContext = {
  async run(_cmd, fn) {
    await fn({} as Qbackup, { json: false }, {} as CommandEnv);
  },
};

function program(commands: readonly CliCommand[]): Command {
  const p = new Command().exitOverride();
  registerCommands(p, fakeCli, commands);
  return p;
}

describe('CLI command definitions', () => {
  test('run receives typed arguments and options', async () => {
    let seen: unknown;
    const cmd = defineCommand({
      name: 'probe',
      description: 'probe',
      args: { domain: arg('domain'), file: optionalArg('file'), words: variadicArg('words') },
      options: {
        force: flag('--force', 'force'),
        domain: flag('--no-domain', 'no domain'),
        name: value('--name <name>', 'name'),
        mode: valueWithDefault('--mode <mode>', 'mode', 'push'),
        disk: repeatable('--disk <target>', 'disk'),
      },
      run: async ({ args, opts }) => {
        seen = { args, opts };
      },
    });
    await program([cmd]).parseAsync(['probe', 'vm1', 'f.xml', 'a', 'b', '--disk', 'sda', '--disk', 'sdb', '--no-domain'], { from: 'user' });
    assert.deepEqual(seen, {
      args: { domain: 'vm1', file: 'f.xml', words: ['a', 'b'] },
      opts: { force: false, domain: false, name: undefined, mode: 'push', disk: ['sda', 'sdb'] },
    });
  });

  test('absent optional values stay undefined and flags default to false', async () => {
    let seen: unknown;
    const cmd = defineCommand({
      name: 'probe',
      description: 'probe',
      args: { domain: arg('domain'), file: optionalArg('file') },
      options: { force: flag('--force', 'force'), domain: flag('--no-domain', 'no domain'), disk: repeatable('--disk <target>', 'disk') },
      run: async ({ args, opts }) => {
        seen = { args, opts };
      },
    });
    await program([cmd]).parseAsync(['probe', 'vm1', '--force'], { from: 'user' });
    assert.deepEqual(seen, { args: { domain: 'vm1', file: undefined }, opts: { force: true, domain: true, disk: [] } });
  });

  test('every qbackup command registers once, under a unique name', () => {
    const all = [...domainCommands, ...checkpointCommands, ...backupCommands, ...repositoryCommands, ...serviceCommands];
    const p = program(all);
    assert.equal(p.commands.length, all.length);
    assert.equal(new Set(all.map((c) => c.name)).size, all.length);
  });

  test('a definition keyed differently from commander is a bug', () => {
    const wrongOption = defineCommand({ name: 'w', description: 'w', options: { dryrun: flag('--dry-run', 'd') }, run: async () => undefined });
    assert.throws(() => program([wrongOption]), assert.AssertionError);
    const wrongArg = defineCommand({ name: 'w', description: 'w', args: { vm: arg('domain') }, run: async () => undefined });
    assert.throws(() => program([wrongArg]), assert.AssertionError);
  });
});
