// What every CLI command shares: global options, opening the library on the
// state directory, and turning errors into one line on stderr with a non-zero
// exit status. User-caused errors (QbackupError) print their message only;
// anything else is a bug and prints its stack.

import { homedir } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import type { QbackupConfig } from '../config/config.js';
import { Credentials } from '../config/credentials.js';
import { defaultConfigFile, loadConfigFile } from '../config/load.js';
import { QbackupError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import { lineLogger } from '../util/operation.js';
import type { BackendSettings } from '../repository/backend/open.js';
import { crashAtPoint } from '../util/faults.js';
import type { OutputOptions } from './output.js';

export interface GlobalOptions {
  stateDir?: string;
  connect?: string;
  json?: boolean;
  lockTimeout?: string;
  config?: string;
}

/** What a command may use beyond the library: its environment, the configuration and the credentials built from both. */
export interface CommandEnv {
  readonly env: NodeJS.ProcessEnv;
  readonly config: QbackupConfig;
  /** The config file's name (whether or not it exists), for messages and for re-reading it. */
  readonly configFile: string;
  readonly credentials: Credentials;
}

export interface CliContext {
  run(cmd: Command, fn: (qb: Qbackup, out: OutputOptions, ce: CommandEnv) => Promise<void>): Promise<void>;
}

export function defaultStateDir(env: NodeJS.ProcessEnv, config?: QbackupConfig): string {
  if (env['QBACKUP_STATE_DIR']) return env['QBACKUP_STATE_DIR'];
  if (config?.server.stateDir !== undefined) return config.server.stateDir;
  if (process.getuid?.() === 0) return '/var/lib/qbackup';
  return join(env['XDG_STATE_HOME'] || join(homedir(), '.local', 'state'), 'qbackup');
}

/** The configuration a command runs with: --config F (which must exist), else the default file if there is one. */
export function loadCliConfig(env: NodeJS.ProcessEnv, given: string | undefined): { config: QbackupConfig; configFile: string } {
  const configFile = given ?? env['QBACKUP_CONFIG'] ?? defaultConfigFile(env, process.getuid?.() === 0);
  return { config: loadConfigFile(configFile, given !== undefined || env['QBACKUP_CONFIG'] !== undefined), configFile };
}

/**
 * The credentials of the CLI and the daemon: the configuration's, then
 * $QBACKUP_PASSWORD; a helper process (the server of an instant restore) gets
 * PATH, HOME (for ~/.aws) and the AWS SDK's variables.
 */
export function cliCredentials(env: NodeJS.ProcessEnv, config: QbackupConfig): Credentials {
  const helper: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) if ((k === 'PATH' || k === 'HOME' || k.startsWith('AWS_')) && v !== undefined) helper[k] = v;
  return new Credentials(config, { value: env['QBACKUP_PASSWORD'] || undefined }, helper);
}

export function createCliContext(env: NodeJS.ProcessEnv): CliContext {
  return {
    async run(cmd, fn) {
      const opts = cmd.optsWithGlobals<GlobalOptions>();
      const out: OutputOptions = { json: opts.json ?? false };
      let qb: Qbackup | undefined;
      try {
        const { config, configFile } = loadCliConfig(env, opts.config);
        const credentials = cliCredentials(env, config);
        const lockTimeoutMs = parseSeconds(opts.lockTimeout ?? env['QBACKUP_LOCK_TIMEOUT'], 30) * 1000;
        // The library is loaded when a command runs, not for --help or --version (start-up time).
        const { Qbackup } = await import('../qbackup.js');
        qb = Qbackup.open({
          stateDir: opts.stateDir ?? defaultStateDir(env, config),
          lockTimeoutMs,
          // The hypervisor (src/drivers/open.ts): qbackup:/// or a libvirt URI; a session daemon is found through XDG_RUNTIME_DIR.
          // A configured connection's name stands for its URI; defaults.connection when none is given.
          connect: connectionOf(config, opts.connect ?? (env['QBACKUP_CONNECT'] || undefined) ?? config.defaults.connection),
          runtimeDir: env['XDG_RUNTIME_DIR'] || undefined,
          // Test-only fault injection (src/util/faults.ts): never set it in production.
          faults: env['QBACKUP_CRASH_AT'] ? crashAtPoint(env['QBACKUP_CRASH_AT']) : undefined,
          // A command that must restart the server of an instant restore from an encrypted repository needs its passphrase.
          credentials,
          ...(env['QBACKUP_ACCEL'] === 'tcg' || env['QBACKUP_ACCEL'] === 'kvm' ? { accel: env['QBACKUP_ACCEL'] } : {}),
          // Like libvirt's backup_tls_x509_cert_dir: the default certificate directory of TLS exports (and of `serve`).
          ...(env['QBACKUP_TLS_CERT_DIR'] ? { tlsCertDir: env['QBACKUP_TLS_CERT_DIR'] } : {}),
          backends: credentials.backendSettings(backendSettings(env)),
          logger: lineLogger((line) => process.stderr.write(`warning: ${line}\n`)),
        });
        await fn(qb, out, { env, config, configFile, credentials });
      } catch (err) {
        reportError(err, out);
      } finally {
        qb?.close();
      }
    },
  };
}

/** The URI `connect` means: a name under `connections` in the configuration, else the URI as given. */
export function connectionOf(config: QbackupConfig, connect: string | undefined): string | undefined {
  return connect !== undefined ? (config.connections.get(connect) ?? connect) : undefined;
}

/**
 * What the S3 backend takes from the environment beyond the SDK's own
 * variables (AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, …, which the
 * SDK reads itself): path-style addressing.
 */
export function backendSettings(env: NodeJS.ProcessEnv): BackendSettings {
  const pathStyle = env['QBACKUP_S3_PATH_STYLE'];
  return pathStyle === '1' || pathStyle === 'true' ? { s3: { pathStyle: true } } : {};
}

function parseSeconds(value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0) throw new QbackupError('INVALID_ARGUMENT', `Invalid lock timeout "${value}": expected a number of seconds`);
  return n;
}

/**
 * Errors of the environment that reach the CLI without a QbackupError wrapper:
 * a file system or database refusing (permissions, no space, a locked or
 * damaged database). They are reported as one sentence, not as a bug.
 */
function environmentError(err: unknown): QbackupError | undefined {
  if (!(err instanceof Error)) return undefined;
  const e = err as NodeJS.ErrnoException;
  if (typeof e.code === 'string' && typeof e.syscall === 'string') {
    const where = e.path !== undefined ? `"${e.path}"` : 'a file';
    return new QbackupError('STATE_DIR', `Cannot ${e.syscall} ${where}: ${e.code}`, { cause: err });
  }
  if (err.name === 'SqliteError') return new QbackupError('STATE_DIR', `The metadata database refused the change: ${err.message}`, { cause: err });
  return undefined;
}

export function reportError(caught: unknown, out: OutputOptions): void {
  const err = environmentError(caught) ?? caught;
  process.exitCode = err instanceof QbackupError ? 1 : 70;
  if (err instanceof QbackupError) {
    if (out.json) process.stderr.write(`${JSON.stringify({ error: { code: err.code, message: err.message, ...err.details } })}\n`);
    else process.stderr.write(`error: ${err.message}\n`);
    return;
  }
  process.stderr.write(`internal error (a bug in qbackup, please report it): ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
}
