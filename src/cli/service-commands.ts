// CLI commands for the service: `serve` starts the HTTP daemon (src/http,
// loaded only by this command, so no other command pays for the web
// framework; src/http never imports the CLI), `token` manages API tokens
// and `schedule` the backup schedules the daemon runs.

import { resolve } from 'node:path';
import { QbackupError } from '../errors.js';
import { isRemoteRepo } from '../repository/backend/open.js';
import { runDaemon } from './serve.js';
import type { RetentionPolicy } from '../repository/repository.js';
import type { ScheduleInfo } from '../service/schedules.js';
import { arg, defineCommand, flag, optionalArg, value, valueWithDefault, type CliCommand } from './command.js';
import { oneOf } from './options.js';
import { emit, table } from './output.js';

const RULES = ['keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const;

export const serviceCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'serve',
    description: 'run the HTTP API, tasks, schedules, metrics and the web page (loopback by default; other addresses need TLS); SIGHUP re-reads the configuration',
    options: {
      listen: value('--listen <host:port>', 'address to listen on (default: server.listen of the configuration, else 127.0.0.1:8470)'),
      tlsCert: value('--tls-cert <file>', 'TLS certificate (PEM)'),
      tlsKey: value('--tls-key <file>', 'TLS private key (PEM)'),
      maxTasks: value('--max-tasks <n>', 'long operations running at once (default: server.max-tasks, else 2)'),
    },
    run: async ({ qb, out, cli, opts: o }) => {
      await runDaemon(qb, out, cli, o);
    },
  }),

  defineCommand({
    name: 'token',
    description: 'manage API tokens of the daemon: create NAME [--read-only] (prints the secret once), list, revoke NAME',
    args: { action: arg('action', 'create, list or revoke'), name: optionalArg('name', 'the token name') },
    options: { readOnly: flag('--read-only', 'the token may only read (GET)') },
    run: async ({ qb, out, args, opts }) => {
      const { TokenStore } = await import('../store/tokens.js');
      const tokens = new TokenStore(qb.db);
      const action = oneOf('action', args.action === 'add' ? 'create' : args.action === 'remove' ? 'revoke' : args.action, ['create', 'list', 'revoke']);
      if (action === 'list') {
        const list = tokens.list();
        emit(out, list, () => table(['Name', 'Access', 'Created', 'Last used'], list.map((t) => [t.name, t.readOnly ? 'read-only' : 'full', new Date(t.createdMs).toISOString(), t.lastUsedMs !== null ? new Date(t.lastUsedMs).toISOString() : '-'])));
        return;
      }
      if (args.name === undefined) throw new QbackupError('INVALID_ARGUMENT', `Give the name of the token to ${action}`);
      if (action === 'create') {
        const { info, token } = tokens.create(args.name, { readOnly: opts.readOnly });
        emit(out, { ...info, token }, () => `Created ${info.readOnly ? 'read-only ' : ''}token "${info.name}" (shown only now; keep it):\n${token}`);
      } else {
        tokens.revoke(args.name);
        emit(out, { name: args.name, revoked: true }, () => `Revoked token "${args.name ?? ''}"`);
      }
    },
  }),

  defineCommand({
    name: 'schedule',
    description: 'manage schedules the daemon runs: add DOMAIN --when W --repo DIR [--keep-…] (a backup with retention, through --connect if given), add [DOMAIN] --run verify|gc --when W --repo DIR, add [DOMAIN] --run copy --when W --repo DIR --to DIR, list, pause ID, resume ID, remove ID',
    args: { action: arg('action', 'add, list, pause, resume or remove'), target: optionalArg('target', 'the domain (add) or the schedule id (pause, resume, remove)') },
    options: {
      run: valueWithDefault('--run <what>', 'backup, verify, gc or copy', 'backup'),
      readDataSubset: value('--read-data-subset <percent>', 'verify: also read back this share of the chunks (e.g. 10%)'),
      when: value('--when <schedule>', 'cron pattern ("0 2 * * *") or "daily 02:00", "weekly sun 03:00", "hourly :15"'),
      repo: value('--repo <name|dir|s3://bucket/prefix>', 'a configured repository, a directory or an s3:// bucket'),
      passwordFile: value('--password-file <file>', 'passphrase file of an encrypted repository (read at each run)'),
      to: value('--to <dir|s3://bucket/prefix>', 'copy: the target repository (--repo is the source)'),
      toPasswordFile: value('--to-password-file <file>', 'copy: passphrase file of an encrypted target'),
      full: flag('--full', 'every run a full backup'),
      keepLast: value('--keep-last <n>', 'after each backup keep the n newest'),
      keepHourly: value('--keep-hourly <n>', 'and the newest of each of the last n hours'),
      keepDaily: value('--keep-daily <n>', 'the same per day'),
      keepWeekly: value('--keep-weekly <n>', 'the same per ISO week'),
      keepMonthly: value('--keep-monthly <n>', 'the same per month'),
      keepYearly: value('--keep-yearly <n>', 'the same per year'),
    },
    run: async ({ qb, out, cli, args, opts: o }) => {
      const [{ Schedules }, { ScheduleStore }] = await Promise.all([import('../service/schedules.js'), import('../store/schedules.js')]);
      const schedules = new Schedules(new ScheduleStore(qb.db));
      const action = oneOf('action', args.action, ['add', 'list', 'pause', 'resume', 'remove']);
      if (action === 'list') {
        const list = schedules.list();
        emit(out, list, () => scheduleTable(list));
        return;
      }
      if (action === 'pause' || action === 'resume') {
        if (args.target === undefined) throw new QbackupError('INVALID_ARGUMENT', `Give the id of the schedule to ${action} (see qbackup schedule list)`);
        const s = schedules.setPaused(args.target, action === 'pause');
        emit(out, s, () => `${action === 'pause' ? 'Paused' : 'Resumed'} schedule ${s.id}; next run ${s.nextRunMs !== null ? new Date(s.nextRunMs).toISOString() : 'never (paused)'}`);
        return;
      }
      if (action === 'remove') {
        if (args.target === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give the id of the schedule to remove (see qbackup schedule list)');
        schedules.remove(args.target);
        emit(out, { id: args.target, removed: true }, () => `Removed schedule ${args.target ?? ''}`);
        return;
      }
      const what = oneOf('--run', o.run, ['backup', 'verify', 'gc', 'copy']);
      if (o.when === undefined || o.repo === undefined) throw new QbackupError('INVALID_ARGUMENT', 'schedule add needs --when and --repo');
      const retention: RetentionPolicy = {};
      for (const rule of RULES) {
        const v = o[rule];
        if (v !== undefined) retention[rule] = /^\d+$/.test(v) ? Number(v) : NaN;
      }
      const percent = o.readDataSubset !== undefined ? Number(o.readDataSubset.replace(/%$/, '')) : undefined;
      const s = schedules.add({
        action: what,
        ...(args.target !== undefined ? { domain: args.target } : {}),
        // A backup schedule made under --connect backs up through that connection.
        ...(what === 'backup' && qb.options.connect !== undefined ? { connection: qb.driver.uri } : {}),
        when: o.when,
        repo: cli.credentials.location(o.repo),
        ...(o.passwordFile !== undefined ? { passwordFile: resolve(o.passwordFile) } : {}),
        ...(o.to !== undefined ? { to: cli.credentials.location(o.to) } : {}),
        ...(o.toPasswordFile !== undefined ? { toPasswordFile: resolve(o.toPasswordFile) } : {}),
        ...(o.full ? { full: true } : {}),
        ...(Object.keys(retention).length > 0 ? { retention } : {}),
        ...(percent !== undefined ? { readDataPercent: percent } : {}),
      });
      const subject = s.action === 'backup' ? `back up ${s.domain ?? ''}` : `${s.action ?? ''}${s.domain !== undefined ? ` ${s.domain}` : ''}`;
      emit(out, s, () => `Added schedule ${s.id}: ${subject} ${s.when} (cron "${s.cron}") in ${s.repo}${s.to !== undefined ? ` to ${s.to}` : ''}; next run ${s.nextRunMs !== null ? new Date(s.nextRunMs).toISOString() : 'never'}`);
    },
  }),
];

function scheduleTable(list: readonly ScheduleInfo[]): string {
  return table(
    ['Id', 'Action', 'Domain', 'Connection', 'When', 'Repository', 'Retention', 'Next run'],
    list.map((s) => [s.id, s.action ?? 'backup', s.domain ?? '-', s.connection ?? '-', s.when, s.to !== undefined ? `${s.repo} -> ${s.to}` : s.repo, Object.entries(s.retention ?? {}).map(([k, v]) => `${k}=${String(v)}`).join(' ') || '-', s.paused === true ? 'paused' : s.nextRunMs !== null ? new Date(s.nextRunMs).toISOString() : '-']),
  );
}
