// The process that serves a backup's disks over NBD while an instant restore
// runs: started detached (it outlives the command that starts it), found
// again by pid + start time, one unix socket with one read-only export per
// disk, named by the disk's target. Its stdout (where it announces itself)
// and stderr go to files next to the socket.
//
// `serverArgv` is the one place that says which program serves: the
// `qbackup serve-backup` command. Whatever serves, the caller checks the
// exports it announces against the sizes it expects, so a server of another
// backup is never taken for the right one.

import { openLogFile } from '../util/safe-create.js';
import type { S3Settings } from '../repository/backend/s3.js';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { QbackupError } from '../errors.js';
import { isProcessAlive, processStartTime, sleep } from '../util/proc.js';
import { socketAccepts } from '../util/socket.js';

export interface BackupServerSpec {
  /** The repository (absolute path, or s3://…) and its passphrase, handed to the server in its environment. */
  repo: string;
  password?: string | undefined;
  /** How to reach object storage: handed to the server in its environment too (never on its command line). */
  s3?: S3Settings | undefined;
  /** What the server inherits (PATH, HOME, the AWS SDK's variables), from the caller's Credentials. */
  environment: Readonly<Record<string, string>>;
  /** The domain the backup is of, in the repository. */
  domain: string;
  backupId: string;
  /** Targets to export. */
  disks: readonly string[];
  socket: string;
  /** The server's stdout (its announcement) and stderr. */
  outFile: string;
  logFile: string;
  /** The state directory the server opens (it keeps nothing there for a serve). */
  stateDir?: string | undefined;
  /** The program to run, argv[0] first; default: this qbackup's CLI under this Node.js. */
  command?: readonly string[] | undefined;
  timeoutMs?: number | undefined;
  /**
   * Called the moment the process exists, before it serves: the caller
   * records it then, so a caller killed while waiting leaves a server the
   * next command finds (and stops or keeps), never an orphan.
   */
  onSpawn?: ((server: { pid: number; pidStart: string }) => void) | undefined;
}

export interface BackupServerProcess {
  pid: number;
  pidStart: string;
  /** Export name → size in bytes, as the server announced them. */
  exports: Map<string, number>;
}

const MAX_SOCKET_PATH = 107;

/** The default program: this package's `qbackup` under this Node.js. */
export function defaultServerCommand(): string[] {
  return [process.execPath, fileURLToPath(new URL('../../../bin/qbackup', import.meta.url))];
}

/** The command line of the server for `spec`. */
export function serverArgv(spec: BackupServerSpec): string[] {
  const disks = spec.disks.flatMap((d) => ['--disk', d]);
  const stateDir = spec.stateDir !== undefined ? ['--state-dir', spec.stateDir] : [];
  // --no-block-status: the overlays mark the backup's holes as zero clusters
  // before the domain starts, so allocation queries tell the copy nothing,
  // and QEMU 7.2's block-stream makes two per 512 KiB piece, each a round
  // trip to the server.
  return [...(spec.command ?? defaultServerCommand()), ...stateDir, '--json', 'serve-backup', '--repo', spec.repo, spec.domain, '--backup', spec.backupId, ...disks, '--socket', spec.socket, '--no-block-status'];
}

/**
 * The server's environment: what the caller hands in (PATH; HOME for ~/.aws
 * and the AWS SDK's variables to reach an S3 repository), overridden by the
 * library's explicit S3 settings.
 */
function serverEnvironment(base: Readonly<Record<string, string>>, s3: S3Settings | undefined): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { PATH: '/usr/local/bin:/usr/bin:/bin', ...base };
  if (s3?.endpoint !== undefined) env['AWS_ENDPOINT_URL_S3'] = s3.endpoint;
  if (s3?.region !== undefined) env['AWS_REGION'] = s3.region;
  if (s3?.credentials !== undefined) {
    env['AWS_ACCESS_KEY_ID'] = s3.credentials.accessKeyId;
    env['AWS_SECRET_ACCESS_KEY'] = s3.credentials.secretAccessKey;
    if (s3.credentials.sessionToken !== undefined) env['AWS_SESSION_TOKEN'] = s3.credentials.sessionToken;
  }
  if (s3?.pathStyle === true) env['QBACKUP_S3_PATH_STYLE'] = '1';
  return env;
}

/**
 * Starts the server detached and returns once it has announced its exports
 * and its socket accepts connections. A server that exits or stays silent
 * past the timeout is killed and the error carries the end of its log.
 */
export async function startBackupServer(spec: BackupServerSpec): Promise<BackupServerProcess> {
  if (Buffer.byteLength(spec.socket) > MAX_SOCKET_PATH) {
    throw new QbackupError('STATE_DIR', `Cannot serve backup "${spec.backupId}": the socket path "${spec.socket}" is longer than ${MAX_SOCKET_PATH} bytes; use a shorter state directory`);
  }
  rmSync(spec.socket, { force: true });
  const argv = serverArgv(spec);
  const out = openLogFile(spec.outFile, 'truncate');
  const err = openLogFile(spec.logFile, 'append');
  let pid: number | undefined;
  try {
    const env = serverEnvironment(spec.environment, spec.s3);
    if (spec.password !== undefined) env['QBACKUP_PASSWORD'] = spec.password;
    const child = spawn(argv[0] ?? '', argv.slice(1), { detached: true, stdio: ['ignore', out, err], env });
    child.on('error', () => undefined); // a failed spawn shows as an exit below
    child.unref();
    pid = child.pid;
  } finally {
    closeSync(out);
    closeSync(err);
  }
  if (pid === undefined) throw new QbackupError('TOOL_FAILED', `Cannot serve backup "${spec.backupId}": "${argv[0] ?? ''}" did not start`);
  const pidStart = processStartTime(pid) ?? '';
  spec.onSpawn?.({ pid, pidStart });
  const deadline = Date.now() + (spec.timeoutMs ?? 60_000);
  for (;;) {
    const exports = readAnnouncement(spec.outFile, spec.backupId);
    if (exports !== undefined && (await socketAccepts(spec.socket))) return { pid, pidStart, exports };
    if (!isProcessAlive(pid, pidStart)) {
      throw new QbackupError('TOOL_FAILED', `The server of backup "${spec.backupId}" exited before serving: ${logTail(spec.logFile)}`);
    }
    if (Date.now() > deadline) {
      await stopBackupServer(pid, pidStart);
      throw new QbackupError('TOOL_FAILED', `The server of backup "${spec.backupId}" did not start serving in time: ${logTail(spec.logFile)}`);
    }
    await sleep(50);
  }
}

/** The exports of the server's `{"event":"serving","backup":…,"exports":[…]}` line, once it is written; none when it names another backup. */
function readAnnouncement(file: string, backupId: string): Map<string, number> | undefined {
  if (!existsSync(file)) return undefined;
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    if (!line.startsWith('{') || line.length > 1_000_000) continue;
    let doc: unknown;
    try {
      doc = JSON.parse(line);
    } catch {
      continue; // a line still being written
    }
    const rec = doc as { event?: unknown; exports?: unknown; backup?: unknown };
    if (rec.event !== 'serving' || !Array.isArray(rec.exports)) continue;
    if (rec.backup !== backupId) return new Map(); // another backup: no export matches what the caller expects
    const exports = new Map<string, number>();
    for (const e of rec.exports as unknown[]) {
      const x = e as { name?: unknown; size?: unknown };
      if (typeof x.name === 'string' && typeof x.size === 'number') exports.set(x.name, x.size);
    }
    return exports;
  }
  return undefined;
}

function logTail(file: string): string {
  try {
    const text = readFileSync(file, 'utf8').trim().split('\n').slice(-3).join(' / ');
    return text === '' ? 'it printed nothing' : text;
  } catch {
    return 'no log';
  }
}

/** Whether the server recorded as pid + start time still runs. */
export function backupServerAlive(pid: number, pidStart: string): boolean {
  return isProcessAlive(pid, pidStart === '' ? undefined : pidStart);
}

/** Sends the server SIGTERM, then SIGKILL if it has not exited after `graceMs`. Idempotent. */
export async function stopBackupServer(pid: number, pidStart: string, graceMs = 5_000): Promise<void> {
  if (!backupServerAlive(pid, pidStart)) return;
  signal(pid, 'SIGTERM');
  const deadline = Date.now() + graceMs;
  while (backupServerAlive(pid, pidStart)) {
    if (Date.now() > deadline) {
      signal(pid, 'SIGKILL');
      await sleep(100);
      return;
    }
    await sleep(50);
  }
}

/** The synchronous form, for paths that cannot wait (the server gets SIGTERM and ends on its own). */
export function signalBackupServer(pid: number, pidStart: string): void {
  if (backupServerAlive(pid, pidStart)) signal(pid, 'SIGTERM');
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}
