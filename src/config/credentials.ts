// The one place a repository's name becomes its location and its passphrase
// and object-store credentials: the CLI and the daemon build one Credentials
// from the configuration and what their caller gave (flags, a request
// header, the environment the CLI read), and hand its answers to the library,
// which never reads files, commands or the environment for secrets itself.
//
// Order for a passphrase: what the caller gave for this call (a
// --password-file, an X-Repository-Password header), else the configured
// repository's password-file or password-command, else the fallback the
// adapter read from its environment (QBACKUP_PASSWORD), else none.
//
// Invariants: a secret is read when it is needed, never stored in the
// configuration object, and never part of an error message (a failing
// password-command is named, its output is not).

import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { QbackupError, describeError } from '../errors.js';
import type { BackendSettings } from '../repository/backend/open.js';
import type { S3Settings } from '../repository/backend/s3.js';
import type { RepoAccess } from '../repository/repository.js';
import type { Credentials as LibraryCredentials } from '../util/credentials.js';
import type { QbackupConfig, RepositoryConfig } from './config.js';

/** A passphrase as a caller gives it: a file to read, or the value itself. */
export interface PasswordSource {
  file?: string | undefined;
  value?: string | undefined;
}

const MAX_SECRET_BYTES = 64 << 10;

export class Credentials implements LibraryCredentials {
  constructor(
    private readonly config: QbackupConfig,
    /** What the adapter read from its environment (e.g. $QBACKUP_PASSWORD). */
    private readonly fallback: PasswordSource = {},
    /** What a helper process the library starts inherits (the adapter picks it from its environment). */
    private readonly helperEnv: Readonly<Record<string, string>> = { PATH: '/usr/local/bin:/usr/bin:/bin' },
  ) {}

  /** The library's view (src/util/credentials.ts): the passphrase of `repo` as the configuration and the fallback give it. */
  repositoryPassword(repo: string): string | undefined {
    return this.password(repo);
  }

  helperEnvironment(): Readonly<Record<string, string>> {
    return this.helperEnv;
  }

  /** The configured repository `repo` names, if it is a name. */
  named(repo: string): RepositoryConfig | undefined {
    return this.config.repositories.get(repo);
  }

  /** The location the library takes: a configured name's path or URL, else `repo` itself (a directory made absolute). */
  location(repo: string): string {
    const named = this.named(repo);
    if (named !== undefined) return named.location;
    return /^[a-z0-9+.-]+:\/\//i.test(repo) ? repo : resolve(repo);
  }

  /** The configured repository at a location (a schedule or a request may name it either way). */
  atLocation(location: string): RepositoryConfig | undefined {
    return this.named(location) ?? [...this.config.repositories.values()].find((r) => r.location === location);
  }

  /** The passphrase for `repo` (a name or a location), or undefined for an unencrypted repository. */
  password(repo: string, given: PasswordSource = {}, fallback: PasswordSource = this.fallback): string | undefined {
    const own = readSource(given);
    if (own !== undefined) return own;
    const named = this.atLocation(repo);
    if (named?.passwordFile !== undefined) return readSecretFile(named.passwordFile, `passphrase file of repository "${named.name}"`);
    if (named?.passwordCommand !== undefined) return runPasswordCommand(named);
    return readSource(fallback);
  }

  /** Location and passphrase together, as every repository call of the library takes them. */
  access(repo: string, given: PasswordSource = {}, fallback: PasswordSource = this.fallback): RepoAccess {
    const location = this.location(repo);
    const password = this.password(repo, given, fallback);
    return password !== undefined ? { repo: location, password } : { repo: location };
  }

  /** The backend settings with each configured s3:// repository's endpoint, region and keys (its credentials file read when it is opened). */
  backendSettings(base: BackendSettings = {}): BackendSettings {
    return {
      ...base,
      s3For: (location) => {
        const r = this.atLocation(location);
        if (r === undefined || !r.location.startsWith('s3://')) return undefined;
        const s: S3Settings = { ...base.s3 };
        if (r.endpoint !== undefined) s.endpoint = r.endpoint;
        if (r.region !== undefined) s.region = r.region;
        if (r.pathStyle !== undefined) s.pathStyle = r.pathStyle;
        if (r.credentialsFile !== undefined) s.credentials = readCredentialsFile(r.credentialsFile, r.name);
        return s;
      },
    };
  }
}

function readSource(source: PasswordSource): string | undefined {
  if (source.file !== undefined) return readSecretFile(source.file, 'passphrase file');
  return source.value;
}

/** A secret file's text less one trailing newline. */
export function readSecretFile(file: string, what: string): string {
  try {
    const text = readFileSync(file, 'utf8');
    if (text.length > MAX_SECRET_BYTES) throw new Error(`it is larger than ${MAX_SECRET_BYTES >> 10} KiB`);
    return text.replace(/\r?\n$/, '');
  } catch (err) {
    throw new QbackupError('PASSWORD_UNAVAILABLE', `Cannot read the ${what} "${file}": ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'it does not exist' : describeError(err)}`, { cause: err });
  }
}

function runPasswordCommand(r: RepositoryConfig): string {
  let out: string;
  try {
    out = execFileSync('/bin/sh', ['-c', r.passwordCommand ?? ''], { encoding: 'utf8', timeout: 30_000, maxBuffer: MAX_SECRET_BYTES, stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as { status?: number | null; signal?: string | null };
    const why = e.status !== undefined && e.status !== null ? `it exited with status ${e.status}` : e.signal !== undefined && e.signal !== null ? `it was ended by ${e.signal}` : 'it could not run';
    throw new QbackupError('PASSWORD_UNAVAILABLE', `The password-command of repository "${r.name}" gave no passphrase: ${why}`);
  }
  const password = out.replace(/\r?\n$/, '');
  if (password === '') throw new QbackupError('PASSWORD_UNAVAILABLE', `The password-command of repository "${r.name}" printed nothing`);
  return password;
}

/** The default profile of an AWS shared-credentials file (INI: aws_access_key_id, aws_secret_access_key, aws_session_token). */
export function readCredentialsFile(file: string, repo: string): { accessKeyId: string; secretAccessKey: string; sessionToken?: string } {
  const text = readSecretFile(file, `credentials file of repository "${repo}"`);
  const sections = new Map<string, Map<string, string>>();
  let current = new Map<string, string>();
  sections.set('', current);
  for (const line of text.split(/\r?\n/)) {
    const t = line.trim();
    if (t === '' || t.startsWith('#') || t.startsWith(';')) continue;
    const head = /^\[\s*([^\]]+?)\s*\]$/.exec(t);
    if (head !== null) {
      current = new Map();
      sections.set(head[1] ?? '', current);
      continue;
    }
    const kv = /^([A-Za-z_]+)\s*=\s*(.*)$/.exec(t);
    if (kv !== null) current.set((kv[1] ?? '').toLowerCase(), kv[2] ?? '');
  }
  // The [default] profile, else keys before any section, else the first profile.
  const values = sections.get('default') ?? ((sections.get('')?.size ?? 0) > 0 ? sections.get('') : [...sections.values()][1]) ?? new Map<string, string>();
  const accessKeyId = values.get('aws_access_key_id');
  const secretAccessKey = values.get('aws_secret_access_key');
  if (accessKeyId === undefined || secretAccessKey === undefined) {
    throw new QbackupError('PASSWORD_UNAVAILABLE', `The credentials file "${file}" of repository "${repo}" needs aws_access_key_id and aws_secret_access_key`);
  }
  const sessionToken = values.get('aws_session_token');
  return sessionToken !== undefined ? { accessKeyId, secretAccessKey, sessionToken } : { accessKeyId, secretAccessKey };
}
