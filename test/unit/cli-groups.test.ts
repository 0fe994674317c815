// The CLI loads only the module of the command it runs (src/cli/main.ts):
// the table naming each command's group must match the definitions, and
// the arguments must pick the right groups.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { COMMAND_GROUP, COMMAND_GROUPS, groupsFor, type CommandGroup } from '../../src/cli/main.js';

describe('CLI command groups', () => {
  it('names every defined command with its group, and nothing else', async () => {
    const defined = new Map<string, CommandGroup>();
    for (const group of Object.keys(COMMAND_GROUPS) as CommandGroup[]) {
      for (const c of await COMMAND_GROUPS[group]()) {
        assert.ok(!defined.has(c.name), `command "${c.name}" is defined once`);
        defined.set(c.name, group);
      }
    }
    assert.deepEqual(Object.fromEntries([...defined].sort()), Object.fromEntries(Object.entries(COMMAND_GROUP).sort()));
  });

  it('loads the command\'s group, none for --version, all for help or an unknown command', () => {
    const all = Object.keys(COMMAND_GROUPS);
    assert.deepEqual(groupsFor(['backup', 'vm', '--repo', 'r']), ['repository']);
    assert.deepEqual(groupsFor(['--json', '--state-dir', 'list', 'checkpoint-list', 'vm']), ['checkpoint']);
    assert.deepEqual(groupsFor(['-c', 'qemu:///system', 'list']), ['domain']);
    assert.deepEqual(groupsFor(['--connect=qemu:///system', 'backup-begin', 'vm']), ['backup']);
    assert.deepEqual(groupsFor(['backup', '--help']), ['repository']);
    assert.deepEqual(groupsFor(['--version']), []);
    assert.deepEqual(groupsFor([]), all);
    assert.deepEqual(groupsFor(['--help']), all);
    assert.deepEqual(groupsFor(['help', 'backup']), all);
    assert.deepEqual(groupsFor(['__complete', 'qbackup', 'ba']), all);
    assert.deepEqual(groupsFor(['bakup']), all);
  });
});
