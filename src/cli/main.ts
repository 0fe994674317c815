// The qbackup command line: a thin adapter that parses arguments (commander),
// calls the library, and prints. It never holds state of its own. Each command
// is one definition (command.ts) in the module of its group; a command loads
// only its group's module (COMMAND_GROUP), and the library only when it runs
// (context.ts), so that start-up stays close to node's own.

import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { registerCommands, type CliCommand } from './command.js';

/** The modules of the command groups, in the order of the help. */
export const COMMAND_GROUPS = {
  domain: async () => (await import('./domain-commands.js')).domainCommands,
  checkpoint: async () => (await import('./checkpoint-commands.js')).checkpointCommands,
  backup: async () => (await import('./backup-commands.js')).backupCommands,
  repository: async () => (await import('./repository-commands.js')).repositoryCommands,
  service: async () => (await import('./service-commands.js')).serviceCommands,
  files: async () => (await import('./files-commands.js')).filesCommands,
  config: async () => (await import('./config-commands.js')).configCommands,
} as const satisfies Record<string, () => Promise<readonly CliCommand[]>>;

export type CommandGroup = keyof typeof COMMAND_GROUPS;

/** Which group defines each command (a unit test checks it against the definitions). */
export const COMMAND_GROUP: Readonly<Record<string, CommandGroup>> = {
  ...groupOf('domain', ['define', 'undefine', 'start', 'shutdown', 'destroy', 'list', 'dominfo', 'dumpxml', 'domblklist', 'attach-disk', 'detach-disk', 'blockresize', 'qemu-monitor-command']),
  ...groupOf('checkpoint', ['checkpoint-create', 'checkpoint-create-as', 'checkpoint-list', 'checkpoint-dumpxml', 'checkpoint-parent', 'checkpoint-info', 'checkpoint-coverage', 'checkpoint-delete']),
  ...groupOf('backup', ['backup-begin', 'backup-dumpxml', 'domjobinfo', 'domjobabort']),
  ...groupOf('repository', ['init', 'key', 'backup', 'backup-list', 'restore', 'export', 'serve-backup', 'verify', 'prune', 'gc', 'copy', 'stats']),
  ...groupOf('service', ['serve', 'token', 'schedule']),
  ...groupOf('files', ['files']),
  ...groupOf('config', ['config']),
};

function groupOf(group: CommandGroup, names: readonly string[]): Record<string, CommandGroup> {
  return Object.fromEntries(names.map((n) => [n, group]));
}

/** Global options that take a value (their value is not the command's name). */
const GLOBAL_VALUE_OPTIONS = new Set(['--state-dir', '--config', '-c', '--connect', '--lock-timeout']);

/**
 * The groups to load for these arguments: the command's own group; none for
 * --version alone; every group for help, completion, no command or an
 * unknown one (commander then lists or suggests them all).
 */
export function groupsFor(args: readonly string[]): CommandGroup[] {
  const all = Object.keys(COMMAND_GROUPS) as CommandGroup[];
  for (let i = 0; i < args.length; i++) {
    const a = args[i] ?? '';
    if (GLOBAL_VALUE_OPTIONS.has(a)) {
      i++;
      continue;
    }
    if (a === '-V' || a === '--version') return [];
    if (a === '-h' || a === '--help') return all;
    if (a.startsWith('-')) continue;
    const group = COMMAND_GROUP[a];
    return group !== undefined ? [group] : all;
  }
  return all;
}

function packageVersion(): string {
  try {
    // dist/src/cli/main.js → package.json at the root of the package
    const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

export async function main(argv: readonly string[], env: NodeJS.ProcessEnv): Promise<void> {
  const program = new Command();
  program
    .name('qbackup')
    .description('Checkpoints and incremental disk backups for QEMU/KVM virtual machines')
    .option('--state-dir <dir>', 'metadata directory (default: $QBACKUP_STATE_DIR, /var/lib/qbackup as root, else ~/.local/state/qbackup)')
    .option('--config <file>', 'configuration file (default: /etc/qbackup/config.yaml as root, else ~/.config/qbackup/config.yaml, if it exists)')
    .option('-c, --connect <uri>', 'the hypervisor: qbackup:/// (default, domains qbackup runs) or libvirt, e.g. qemu:///system (default: $QBACKUP_CONNECT)')
    .option('--json', 'print results as JSON')
    .option('--lock-timeout <seconds>', 'how long to wait for another command on the same domain (default 30)')
    .version(packageVersion(), '-V, --version')
    .showHelpAfterError()
    .exitOverride();
  const groups = groupsFor(argv.slice(2));
  // --version alone needs no command, so neither the context nor the configuration's loader.
  const cli = groups.length > 0 ? (await import('./context.js')).createCliContext(env) : undefined;
  if (cli !== undefined) {
    for (const commands of await Promise.all(groups.map((g) => COMMAND_GROUPS[g]()))) registerCommands(program, cli, commands);
    if (groups.length === Object.keys(COMMAND_GROUPS).length) registerCommands(program, cli, (await import('./completion.js')).completionCommands(program));
  }
  try {
    await program.parseAsync([...argv]);
  } catch (err) {
    if (err instanceof CommanderError) {
      // commander has already printed its message (or help / version).
      process.exitCode = err.exitCode === 0 ? 0 : 2;
      return;
    }
    throw err;
  }
}
