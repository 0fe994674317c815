// The qbackup command line: a thin adapter that parses arguments (commander),
// calls the library, and prints. It never holds state of its own. Each command
// is one definition (command.ts) in the module of its group.

import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { backupCommands } from './backup-commands.js';
import { checkpointCommands } from './checkpoint-commands.js';
import { completionCommands } from './completion.js';
import { configCommands } from './config-commands.js';
import { registerCommands } from './command.js';
import { createCliContext } from './context.js';
import { domainCommands } from './domain-commands.js';
import { filesCommands } from './files-commands.js';
import { repositoryCommands } from './repository-commands.js';
import { serviceCommands } from './service-commands.js';

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
  const cli = createCliContext(env);
  registerCommands(program, cli, [...domainCommands, ...checkpointCommands, ...backupCommands, ...repositoryCommands, ...serviceCommands, ...filesCommands, ...configCommands]);
  registerCommands(program, cli, completionCommands(program));
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
