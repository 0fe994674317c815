// How the CLI gets a repository and its passphrase: `--repo` is a configured
// name or a location (defaults.repository when absent); the passphrase comes
// from the command's --password-file, else the configured repository's
// password-file or password-command, else the variable main() was handed
// (QBACKUP_PASSWORD; copy's source QBACKUP_FROM_PASSWORD, restic's
// RESTIC_FROM_PASSWORD convention). Never from the command line, where other
// users could read it. The rules live in src/config/credentials.ts; this
// module only names the flags and variables.

import { QbackupError } from '../errors.js';
import type { RepoAccess } from '../repository/repository.js';
import type { CommandEnv } from './context.js';

export const PASSWORD_VARIABLE = 'QBACKUP_PASSWORD';
export const FROM_PASSWORD_VARIABLE = 'QBACKUP_FROM_PASSWORD';
export const NEW_PASSWORD_VARIABLE = 'QBACKUP_NEW_PASSWORD';

/** The repository a command works on: --repo (a configured name or a location), else the configured default. */
export function repoName(cli: CommandEnv, repo: string | undefined, flag = '--repo'): string {
  if (repo !== undefined) return repo;
  const fallback = cli.config.defaults.repository;
  if (fallback === undefined) throw new QbackupError('INVALID_ARGUMENT', `Give ${flag}, or set defaults.repository in the configuration file "${cli.configFile}"`);
  return fallback;
}

/** The repository and its passphrase, as every repository call of the library takes them. */
export function repoAccess(cli: CommandEnv, o: { repo?: string | undefined; passwordFile?: string | undefined }, variable = PASSWORD_VARIABLE): RepoAccess {
  return cli.credentials.access(repoName(cli, o.repo), { file: o.passwordFile }, { value: cli.env[variable] });
}

/** A passphrase that must be there (init --encrypt, key add): the file, else the variable. */
export function requirePassword(cli: CommandEnv, file: string | undefined, variable: string, what: string, repo?: string): string {
  const p = repo !== undefined ? cli.credentials.password(repo, { file }, { value: cli.env[variable] }) : cli.credentials.password('', { file }, { value: cli.env[variable] });
  if (p === undefined || p === '') throw new QbackupError('INVALID_ARGUMENT', `${what} needs a passphrase: set ${variable} or give a passphrase file`);
  return p;
}
