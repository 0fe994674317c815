// Bash completion: `qbackup completion bash` prints the script (install it as
// /usr/share/bash-completion/completions/qbackup, or `source <(qbackup
// completion bash)`); the script asks `qbackup __complete WORD…` for the
// candidates of the last word: command names, the options of the command
// (from commander's own definitions, so they never drift), configured
// repository names after --repo/--from/--to, backup ids of the repository
// the line names (or the default one) after --backup, and domain names where
// a command takes a domain.

import type { Command } from 'commander';
import type { Qbackup } from '../qbackup.js';
import { arg, defineCommand, variadicArg, type CliCommand } from './command.js';
import type { CommandEnv } from './context.js';
import { oneOf } from './options.js';

const BASH = `# bash completion for qbackup
_qbackup() {
  local cur="\${COMP_WORDS[COMP_CWORD]}"
  local IFS=$'\\n'
  COMPREPLY=($(compgen -W "$(qbackup __complete -- "\${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null)" -- "$cur"))
}
complete -o default -F _qbackup qbackup
`;

const REPO_FLAGS = new Set(['--repo', '--from', '--to']);

export function completionCommands(program: Command): readonly CliCommand[] {
  return [
    defineCommand({
      name: 'completion',
      description: 'print the bash completion script: source <(qbackup completion bash)',
      args: { shell: arg('shell', 'bash') },
      run: async ({ args }) => {
        oneOf('shell', args.shell, ['bash']);
        process.stdout.write(BASH);
      },
    }),
    defineCommand({
      name: '__complete',
      hidden: true,
      description: 'candidates for the last word of a command line (used by the completion script)',
      args: { words: variadicArg('words') },
      run: async ({ qb, cli, args }) => {
        const found = await candidates(program, qb, cli, args.words);
        if (found.length > 0) process.stdout.write(`${found.join('\n')}\n`);
      },
    }),
  ];
}

async function candidates(program: Command, qb: Qbackup, cli: CommandEnv, words: readonly string[]): Promise<string[]> {
  const current = words.at(-1) ?? '';
  const before = words.slice(0, -1);
  const globals = program.options.map((o) => o.long).filter((f): f is string => f !== undefined);
  const name = before.find((w) => !w.startsWith('-') && program.commands.some((c) => c.name() === w));
  const cmd = program.commands.find((c) => c.name() === name);
  const previous = before.at(-1);
  if (previous !== undefined && REPO_FLAGS.has(previous)) return [...cli.config.repositories.keys()];
  if (previous === '--backup') return backupIds(qb, cli, before).catch(() => []);
  if (cmd === undefined) return current.startsWith('-') ? globals : program.commands.map((c) => c.name()).filter((n) => !n.startsWith('_'));
  if (current.startsWith('-')) return [...cmd.options.map((o) => o.long).filter((f): f is string => f !== undefined), ...globals];
  const takesDomain = cmd.registeredArguments.some((a) => a.name() === 'domain');
  if (takesDomain) return qb.domains.list({ all: true }).map((d) => d.name);
  return [];
}

async function backupIds(qb: Qbackup, cli: CommandEnv, words: readonly string[]): Promise<string[]> {
  const i = words.indexOf('--repo');
  const repo = i >= 0 ? words[i + 1] : cli.config.defaults.repository;
  if (repo === undefined) return [];
  return (await qb.repository.list(cli.credentials.access(repo))).map((m) => m.id);
}
