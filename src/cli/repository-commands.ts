// CLI commands for the backup repository: init, key, backup, backup-list,
// restore, export, serve-backup, verify, prune, gc, stats, copy. `--repo`
// takes a configured repository's name or a location; passphrases are found
// by passwords.ts, and results printed by formatters.ts.

import { QbackupError } from '../errors.js';
import type { GcReport, RepoStats, RetentionPolicy, ServeListen } from '../repository/repository.js';
import { arg, defineCommand, flag, optionalArg, repeatable, requiredValue, value, valueWithDefault, type CliCommand } from './command.js';
import { backupTable, describeBackup, describeCopy, describeGc, describePrune, describeStats, describeVerify } from './formatters.js';
import { diskOption, hostPort, oneOf, POINT_IN_TIME_FORMS, pointInTime, positiveNumber, quiesceMode, quiesceOptions, repoOption } from './options.js';
import { emit, table } from './output.js';
import { FROM_PASSWORD_VARIABLE, NEW_PASSWORD_VARIABLE, PASSWORD_VARIABLE, repoAccess, repoName, requirePassword } from './passwords.js';
import { withProgress } from './progress.js';
import { runInstantRestore } from './restore-instant.js';
import { untilSignal } from './serve.js';

const domain = arg('domain');

/** One line of standard input ('' at its end). */
function readLine(): Promise<string> {
  return new Promise((resolve) => {
    let text = '';
    const done = (): void => {
      process.stdin.off('data', onData);
      process.stdin.off('end', done);
      process.stdin.pause();
      resolve(text.split('\n')[0] ?? '');
    };
    const onData = (b: Buffer): void => {
      text += b.toString('utf8');
      if (text.includes('\n')) done();
    };
    process.stdin.on('data', onData);
    process.stdin.on('end', done);
    process.stdin.resume();
  });
}
const passwordFile = value('--password-file <file>', 'read the passphrase from this file (default: the configured repository\'s password-file or password-command, else $QBACKUP_PASSWORD)');
const MiB = 1024 * 1024;

export const repositoryCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'init',
    description: 'create a repository (encrypted with --encrypt)',
    options: { repo: repoOption(), encrypt: flag('--encrypt', 'encrypt with a key wrapped under a passphrase'), passwordFile, chunkSize: value('--chunk-size <KiB>', 'chunk size, a power of two (default 64 KiB, the dirty bitmaps\' granularity)') },
    run: async ({ qb, out, cli, opts: o }) => {
      const repo = repoName(cli, o.repo);
      const location = cli.credentials.location(repo);
      const password = o.encrypt ? requirePassword(cli, o.passwordFile, PASSWORD_VARIABLE, '--encrypt', repo) : undefined;
      const chunkSize = o.chunkSize !== undefined ? positiveNumber('--chunk-size', o.chunkSize, 'KiB') * 1024 : undefined;
      const r = await qb.repository.init({ repo: location, ...(password !== undefined ? { password } : {}), ...(chunkSize !== undefined ? { chunkSize } : {}) });
      emit(out, r, () => `Created ${r.encrypted ? 'encrypted ' : ''}repository ${r.id} at ${o.repo ?? location} (chunks of ${r.chunkSize / 1024} KiB)`);
    },
  }),

  defineCommand({
    name: 'key',
    description: 'list, add or remove the passphrases of an encrypted repository (add: new passphrase from --new-password-file or $QBACKUP_NEW_PASSWORD)',
    args: { action: arg('action', 'list, add or remove'), id: optionalArg('id', 'the key to remove') },
    options: { repo: repoOption(), passwordFile, newPasswordFile: value('--new-password-file <file>', 'the passphrase to add') },
    run: async ({ qb, out, cli, args, opts: o }) => {
      const action = oneOf('action', args.action, ['list', 'add', 'remove']);
      const access = repoAccess(cli, o);
      if (action === 'list') {
        const keys = await qb.repository.listKeys(access);
        emit(out, keys, () => table(['Key', 'Created', 'Host'], keys.map((k) => [k.id, k.created, k.host])));
      } else if (action === 'add') {
        const id = await qb.repository.addKey(access, requirePassword(cli, o.newPasswordFile, NEW_PASSWORD_VARIABLE, 'key add'));
        emit(out, { id }, () => `Added key ${id}`);
      } else {
        if (args.id === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give the id of the key to remove (see qbackup key list)');
        await qb.repository.removeKey(access, args.id);
        emit(out, { id: args.id }, () => `Removed key ${args.id ?? ''}`);
      }
    },
  }),

  defineCommand({
    name: 'backup',
    description: 'back up a domain into a repository: incremental since its last backup there when coverage allows, else full',
    args: { domain },
    options: {
      repo: repoOption('repository directory or s3://BUCKET/PREFIX (an unencrypted one is created on first use; a bucket only by init)'),
      passwordFile,
      full: flag('--full', 'take a full backup of every disk'),
      disk: diskOption('back up'),
      workers: valueWithDefault('--workers <n>', 'threads that hash and compress', '2'),
      tcp: value('--tcp <host:port>', 'read the disks over TCP with TLS instead of a private unix socket'),
      tlsCertDir: value('--tls-cert-dir <dir>', 'with --tcp: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem (default STATE_DIR/pki/qbackup)'),
      ...quiesceOptions(),
    },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      const workers = Math.floor(positiveNumber('--workers', o.workers, 'threads'));
      const network = {
        ...(o.tcp !== undefined ? { tcp: hostPort('--tcp', o.tcp) } : {}),
        ...(o.tlsCertDir !== undefined ? { tlsCertDir: o.tlsCertDir } : {}),
      };
      const m = await withProgress(out, (onProgress) =>
        qb.repository.backup(domain, { ...repoAccess(cli, o), full: o.full, disks: o.disk, workers, ...quiesceMode(o, cli.config.defaults.quiesce), ...network, onProgress }),
      );
      emit(out, m, () => describeBackup(m));
    },
  }),

  defineCommand({
    name: 'backup-list',
    description: 'list the backups in a repository',
    args: { domain: optionalArg('domain') },
    options: { repo: repoOption(), passwordFile },
    run: async ({ qb, out, cli, args: { domain }, opts }) => {
      const { backups: list, damaged } = await qb.repository.inventory(repoAccess(cli, opts), domain);
      // A damaged manifest is named (on stderr, so --json output stays a list of backups); the rest are listed.
      for (const d of damaged) process.stderr.write(`warning: ${d.problem} ("${d.key}"); run qbackup verify\n`);
      emit(out, list, () => backupTable(list));
    },
  }),

  defineCommand({
    name: 'restore',
    description: 'restore a backup to new images (--to) or into the disks of a shut-off domain (--into-domain); with --instant, run the domain from the backup at once while QEMU copies it into local overlays',
    args: { domain },
    options: {
      repo: repoOption(),
      passwordFile,
      to: value('--to <dir>', 'directory for the restored images (<target>.<format>); with --instant, for the overlays (<target>.qcow2, default STATE_DIR/images/NAME)'),
      instant: flag('--instant', 'define and start the domain on overlays over the backup served by NBD; QEMU then copies the data in (see domjobinfo)'),
      as: value('--as <name>', 'with --instant: the name of the restored domain (default: the backed-up one)'),
      wait: flag('--wait', 'with --instant: wait until every byte is local and the server stopped'),
      bandwidth: value('--bandwidth <MiB/s>', 'with --instant: limit the copy rate of each disk'),
      intoDomain: value('--into-domain <domain>', 'write into the disks of this shut-off domain with the same targets'),
      define: value('--define <name>', 'with --to: define a new domain of this name from the backup\'s saved definition (no UUID, no MACs), on the restored images'),
      backup: value('--backup <id>', 'the backup to restore (default: the latest)'),
      until: value('--until <time>', `the latest backup taken at or before this time: ${POINT_IN_TIME_FORMS}`),
      disk: diskOption('restore'),
      format: valueWithDefault('--format <format>', 'qcow2 or raw', 'qcow2'),
    },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      const format = oneOf('--format', o.format, ['qcow2', 'raw']);
      const until = o.until !== undefined ? pointInTime('--until', o.until) : undefined;
      if (o.instant && o.define !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --define makes a domain on restored images; with --instant give the name with --as');
      if (o.instant) {
        await runInstantRestore(qb, out, repoAccess(cli, o), domain, { ...o, bandwidth: o.bandwidth ?? configuredBandwidth(cli.config.defaults.bandwidth), until });
        return;
      }
      for (const [flagName, given] of [['--as', o.as !== undefined], ['--wait', o.wait], ['--bandwidth', o.bandwidth !== undefined]] as const) {
        if (given) throw new QbackupError('INVALID_ARGUMENT', `Option ${flagName} needs --instant`);
      }
      if ((o.to === undefined) === (o.intoDomain === undefined)) throw new QbackupError('INVALID_ARGUMENT', 'Give either --to or --into-domain');
      if (o.define !== undefined && o.to === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --define needs --to (the directory of the new domain\'s images)');
      const r = await withProgress(out, (onProgress) =>
        qb.repository.restore(domain, {
          ...repoAccess(cli, o),
          format,
          disks: o.disk,
          ...(o.to !== undefined ? { to: o.to } : {}),
          ...(o.intoDomain !== undefined ? { intoDomain: o.intoDomain } : {}),
          define: o.define,
          ...(o.backup !== undefined ? { backup: o.backup } : {}),
          ...(until !== undefined ? { until } : {}),
          onProgress,
        }),
      );
      emit(out, r, () => [`Restored backup ${r.backup}:`, ...r.disks.map((d) => `  ${d.target} -> ${d.file} (every chunk checked)`)].join('\n'));
    },
  }),

  defineCommand({
    name: 'export',
    description: 'write one disk of a backup as a standalone qcow2 or raw image',
    args: { domain },
    options: { repo: repoOption(), passwordFile, disk: requiredValue('--disk <target>', 'the disk'), to: requiredValue('--to <file>', 'the image to write'), backup: value('--backup <id>', 'the backup (default: the latest)'), format: valueWithDefault('--format <format>', 'qcow2 or raw', 'qcow2') },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      const format = oneOf('--format', o.format, ['qcow2', 'raw']);
      const r = await withProgress(out, (onProgress) => qb.repository.exportDisk(domain, { ...repoAccess(cli, o), disk: o.disk, file: o.to, format, ...(o.backup !== undefined ? { backup: o.backup } : {}), onProgress }));
      emit(out, r, () => `Exported disk ${o.disk} of backup ${r.backup} to ${r.file}`);
    },
  }),

  defineCommand({
    name: 'serve-backup',
    description: 'serve disks of a backup read-only over NBD (one export per disk, named after its target) until SIGINT or SIGTERM',
    args: { domain },
    options: {
      repo: repoOption(),
      passwordFile,
      backup: value('--backup <id>', 'the backup to serve (default: the latest)'),
      disk: diskOption('serve'),
      socket: value('--socket <path>', 'unix socket to create (default: a new 0600 socket in a private directory of the state directory)'),
      tcp: value('--tcp <host:port>', 'listen on TCP instead (needs --tls-cert-dir, or --no-tls)'),
      tlsCertDir: value('--tls-cert-dir <dir>', 'x509 credentials for TLS: ca-cert.pem, server-cert.pem, server-key.pem; clients need a certificate of that CA'),
      tls: flag('--no-tls', 'with --tcp: serve in clear text'),
      blockStatus: flag('--no-block-status', 'do not offer base:allocation (clients take every byte as data): for a copy into images that already mark the holes'),
    },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      const listen = serveListen(o);
      const server = await qb.repository.serveBackup(domain, {
        ...repoAccess(cli, o),
        listen,
        disks: o.disk,
        ...(o.backup !== undefined ? { backup: o.backup } : {}),
        log: (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`),
        blockStatus: o.blockStatus,
      });
      try {
        const where = server.listen.transport === 'unix' ? { socket: server.listen.socket } : { host: server.listen.host, port: server.listen.port };
        // One line either way, so a parent process can read it as soon as clients may connect.
        const event = { event: 'serving', domain, backup: server.backup, uri: server.uri, tls: server.tls, ...where, exports: server.exports };
        process.stdout.write(out.json ? `${JSON.stringify(event)}\n` : `serving ${server.exports.length} export(s) on ${server.uri}\n`);
        await untilSignal();
      } finally {
        await server.close();
      }
    },
  }),

  defineCommand({
    name: 'verify',
    description: 'check that every chunk the backups name exists (with --read-data: and is intact)',
    args: { domain: optionalArg('domain') },
    options: {
      repo: repoOption(), passwordFile, backup: value('--backup <id>', 'only this backup'), readData: flag('--read-data', 'read every chunk back and check it against its id'), readDataSubset: value('--read-data-subset <percent>', 'with --read-data, read this share of the chunks (e.g. 10%)'),
      repair: flag('--repair', 'first move damaged manifests to quarantine/ and rebuild lost pack indexes from their packs (asks first)'),
      yes: flag('--yes', 'with --repair, do not ask'),
    },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      if (o.backup !== undefined && domain === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --backup needs a domain');
      if (o.repair) {
        const done = await qb.repository.repair(repoAccess(cli, o), async (plan) => {
          const lines = [...plan.quarantine.map((d) => `  quarantine "${d.key}" (backup "${d.id}" of domain "${d.domain}" is lost): ${d.problem}`), ...plan.rebuildIndexes.map((p) => `  rebuild the index of pack "${p}" from its trailer`)];
          process.stderr.write(`Repair plan:\n${lines.join('\n')}\n`);
          if (o.yes) return true;
          process.stderr.write('Go ahead? [y/N] ');
          return /^y(es)?$/i.test((await readLine()).trim());
        });
        if (done === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Repair not confirmed: nothing changed');
        if (done.quarantine.length + done.rebuildIndexes.length === 0) process.stderr.write('Nothing to repair.\n');
        else process.stderr.write(`Repaired: ${done.rebuildIndexes.length} pack index(es) rebuilt, ${done.quarantine.length} manifest(s) quarantined; lost backups: ${done.lost.length === 0 ? 'none' : done.lost.join(', ')}\n`);
      }
      const percent = o.readDataSubset !== undefined ? positiveNumber('--read-data-subset', o.readDataSubset.replace(/%$/, ''), 'percent') : undefined;
      const report = await withProgress(out, (onProgress) =>
        qb.repository.verify(repoAccess(cli, o), {
          ...(domain !== undefined ? { domain } : {}),
          ...(o.backup !== undefined ? { backup: o.backup } : {}),
          readData: o.readData || percent !== undefined,
          ...(percent !== undefined ? { readDataPercent: percent } : {}),
          onProgress,
        }),
      );
      emit(out, report, () => describeVerify(report));
      const first = report.problems[0];
      if (first !== undefined) {
        throw new QbackupError('VERIFY_FAILED', `Verification found ${report.problems.length} problem(s); first: ${first.object} (used by ${first.backups.join(', ')}): ${first.problem}`);
      }
    },
  }),

  defineCommand({
    name: 'prune',
    description: 'remove the backups of a domain a retention policy does not keep (their data goes with the next gc)',
    args: { domain },
    options: {
      repo: repoOption(),
      passwordFile,
      keepLast: value('--keep-last <n>', 'keep the n newest backups'),
      keepHourly: value('--keep-hourly <n>', 'keep the newest backup of each of the last n hours with backups'),
      keepDaily: value('--keep-daily <n>', 'the same per day'),
      keepWeekly: value('--keep-weekly <n>', 'the same per ISO week'),
      keepMonthly: value('--keep-monthly <n>', 'the same per month'),
      keepYearly: value('--keep-yearly <n>', 'the same per year'),
      dryRun: flag('--dry-run', 'show what would be kept and removed, and change nothing'),
    },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      const policy: RetentionPolicy = {};
      for (const rule of ['keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const) {
        const v = o[rule];
        if (v !== undefined) policy[rule] = /^\d+$/.test(v) ? Number(v) : NaN;
      }
      const r = await qb.repository.prune(domain, { ...repoAccess(cli, o), ...policy, dryRun: o.dryRun });
      emit(out, r, () => describePrune(r, o.dryRun));
    },
  }),

  defineCommand({
    name: 'gc',
    description: 'remove data no backup references (safe while backups run; see docs/design.md)',
    options: { repo: repoOption(), passwordFile },
    run: async ({ qb, out, cli, opts }) => {
      const r: GcReport = await qb.repository.gc(repoAccess(cli, opts));
      emit(out, r, () => describeGc(r));
    },
  }),

  defineCommand({
    name: 'copy',
    description: 'copy backups (of a domain, or --backup ID) into another repository: only the chunks it lacks, re-encrypted when the keys differ; copying again copies nothing',
    args: { domain: optionalArg('domain', 'only this domain\'s backups') },
    options: {
      from: requiredValue('--from <name|dir|s3://bucket/prefix>', 'the source repository'),
      to: requiredValue('--to <name|dir|s3://bucket/prefix>', 'the target repository (an unencrypted one is created on first use; a bucket must exist)'),
      fromPasswordFile: value('--from-password-file <file>', 'the source\'s passphrase (default: $QBACKUP_FROM_PASSWORD)'),
      toPasswordFile: value('--to-password-file <file>', 'the target\'s passphrase (default: $QBACKUP_PASSWORD)'),
      backup: repeatable('--backup <id>', 'only this backup; repeatable'),
      dryRun: flag('--dry-run', 'show which backups would be copied, and copy nothing'),
      workers: valueWithDefault('--workers <n>', 'threads that hash and compress when chunks are re-encrypted', '2'),
    },
    run: async ({ qb, out, cli, args: { domain }, opts: o }) => {
      const workers = Math.floor(positiveNumber('--workers', o.workers, 'threads'));
      const from = repoAccess(cli, { repo: o.from, passwordFile: o.fromPasswordFile }, FROM_PASSWORD_VARIABLE);
      const to = repoAccess(cli, { repo: o.to, passwordFile: o.toPasswordFile });
      const r = await withProgress(out, (onProgress) =>
        qb.repository.copy({ from, to, backups: o.backup, dryRun: o.dryRun, workers, onProgress, ...(domain !== undefined ? { domain } : {}) }),
      );
      emit(out, r, () => describeCopy(r));
    },
  }),

  defineCommand({
    name: 'stats',
    description: 'sizes of a repository: logical, referenced, stored, and the dedup and compression ratios',
    options: { repo: repoOption(), passwordFile },
    run: async ({ qb, out, cli, opts }) => {
      const s: RepoStats = await qb.repository.stats(repoAccess(cli, opts));
      emit(out, s, () => describeStats(s));
    },
  }),
];

/** defaults.bandwidth of the configuration, as --bandwidth would give it. */
function configuredBandwidth(mibPerSec: number | undefined): string | undefined {
  return mibPerSec !== undefined ? String(mibPerSec) : undefined;
}

/** --socket, or --tcp with --tls-cert-dir or --no-tls (the library refuses TCP without TLS unless told). */
function serveListen(o: { socket?: string | undefined; tcp?: string | undefined; tlsCertDir?: string | undefined; tls: boolean }): ServeListen {
  if (o.tcp === undefined) {
    if (o.tlsCertDir !== undefined || !o.tls) throw new QbackupError('INVALID_ARGUMENT', 'Options --tls-cert-dir and --no-tls go with --tcp');
    return { transport: 'unix', ...(o.socket !== undefined ? { socket: o.socket } : {}) };
  }
  if (o.socket !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give either --socket or --tcp, not both');
  const { host, port } = hostPort('--tcp', o.tcp, { anyPort: true });
  return { transport: 'tcp', host, port, ...(o.tlsCertDir !== undefined ? { tlsCertDir: o.tlsCertDir } : {}), ...(!o.tls ? { noTls: true } : {}) };
}
