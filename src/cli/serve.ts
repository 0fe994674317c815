// `qbackup serve` as a system service: the daemon (src/http, loaded only
// here) with the configuration file, one log line per event on stderr (JSON
// when stderr is not a terminal, which journald keeps as it is), readiness
// told to systemd (Type=notify: `systemd-notify --ready` when $NOTIFY_SOCKET
// is set, the unit allowing NotifyAccess=all), SIGHUP re-reading the
// configuration without touching running tasks, SIGINT/SIGTERM stopping the
// running tasks that can stop mid-way (they end failed, TASK_INTERRUPTED, after
// cleaning up what they began: jobs, checkpoints, locks) and letting the others
// finish.
//
// The admin token of the first start is a secret: it is printed on a
// terminal or with --json (the caller asked for it), and otherwise written to
// STATE_DIR/admin-token (0600) so that it never reaches a log.

import { spawn } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { QbackupError, describeError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import { lineLogger, type Logger } from '../util/operation.js';
import { cliCredentials, loadCliConfig, type CommandEnv } from './context.js';
import { emit, type OutputOptions } from './output.js';

export interface ServeFlags {
  listen?: string | undefined;
  tlsCert?: string | undefined;
  tlsKey?: string | undefined;
  maxTasks?: string | undefined;
}

/** One line per event on stderr: JSON off a terminal (or with --json), else time and text. */
export function daemonLogger(out: OutputOptions): Logger {
  const json = out.json || !process.stderr.isTTY;
  return lineLogger((line) => process.stderr.write(json ? `${line}\n` : `${new Date().toISOString()} ${line}\n`), json);
}

export async function runDaemon(qb: Qbackup, out: OutputOptions, cli: CommandEnv, o: ServeFlags): Promise<void> {
  const server = cli.config.server;
  const maxTasks = o.maxTasks ?? (server.maxTasks !== undefined ? String(server.maxTasks) : '2');
  const maxConcurrent = Number(maxTasks);
  if (!Number.isInteger(maxConcurrent) || maxConcurrent < 1) throw new QbackupError('INVALID_ARGUMENT', `Invalid --max-tasks "${maxTasks}": expected a whole number above zero`);
  const logger = daemonLogger(out);
  const { startDaemon } = await import('../http/daemon.js');
  const daemon = await startDaemon(qb, {
    listen: o.listen ?? server.listen ?? '127.0.0.1:8470',
    tlsCertFile: o.tlsCert ?? server.tlsCert,
    tlsKeyFile: o.tlsKey ?? server.tlsKey,
    maxConcurrent,
    logger,
    config: cli.config,
    credentials: cli.credentials,
  });
  const t = daemon.bootstrapToken;
  let tokenFile: string | undefined;
  if (t !== undefined && !out.json && !process.stdout.isTTY) {
    tokenFile = join(qb.options.stateDir, 'admin-token');
    // A new file only this user reads (never through a link left in its place).
    rmSync(tokenFile, { force: true });
    writeFileSync(tokenFile, `${t}\n`, { mode: 0o600, flag: 'wx' });
  }
  emit(out, { url: daemon.url, ...(t !== undefined ? { bootstrapToken: { name: 'admin', token: t } } : {}) }, () =>
    [
      `qbackup serve: listening on ${daemon.url}`,
      ...(t !== undefined ? [tokenFile !== undefined ? `Created API token "admin": its secret is in ${tokenFile} (read it, then delete the file)` : `Created API token "admin" (shown only now; keep it): ${t}`] : []),
    ].join('\n'),
  );
  logger.log({ level: 'info', msg: 'listening', fields: { url: daemon.url, config: cli.config.file ?? null, repositories: cli.config.repositories.size, schedules: daemon.service.schedules.list().length } });
  for (const task of daemon.service.interrupted) logger.log({ level: 'warn', msg: 'task marked failed', fields: { task: task.id, error: task.error?.message } });
  notifySystemd(cli.env, logger);
  const reload = (): void => {
    try {
      const { config } = loadCliConfig(cli.env, cli.config.file ?? cli.configFile);
      const r = daemon.service.reload(config, cliCredentials(cli.env, config));
      logger.log({ level: 'info', msg: 'configuration reloaded', fields: { config: config.file ?? null, added: r.added.length, updated: r.updated.length, removed: r.removed.length } });
    } catch (err) {
      logger.log({ level: 'error', msg: 'configuration not reloaded; the previous one stays', fields: { error: describeError(err) } });
    }
  };
  process.on('SIGHUP', reload);
  try {
    await untilSignal();
  } finally {
    process.off('SIGHUP', reload);
  }
  logger.log({ level: 'info', msg: 'stopping; running tasks are interrupted' });
  await daemon.close({ interrupt: true });
  logger.log({ level: 'info', msg: 'stopped' });
}

/** Tells systemd the service is ready (Type=notify); nothing when not started by systemd. */
function notifySystemd(env: NodeJS.ProcessEnv, logger: Logger): void {
  if (env['NOTIFY_SOCKET'] === undefined || env['NOTIFY_SOCKET'] === '') return;
  const child = spawn('systemd-notify', ['--ready', `--pid=${process.pid}`], { stdio: 'ignore', env });
  child.on('error', (err) => logger.log({ level: 'warn', msg: 'systemd-notify could not run', fields: { error: describeError(err) } }));
  child.on('exit', (code) => {
    if (code !== 0) logger.log({ level: 'warn', msg: 'systemd-notify failed', fields: { status: code } });
  });
}

/** Resolves at the first SIGINT or SIGTERM (long-running commands stop cleanly on either). */
export function untilSignal(): Promise<void> {
  return new Promise((resolvePromise) => {
    const done = (): void => {
      process.off('SIGINT', done);
      process.off('SIGTERM', done);
      resolvePromise();
    };
    process.on('SIGINT', done);
    process.on('SIGTERM', done);
  });
}
