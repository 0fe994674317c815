// CLI commands for the backup repository: init, key, backup, backup-list,
// restore, export, serve-backup, verify, prune, gc, stats, copy. Passphrases come from
// QBACKUP_PASSWORD or --password-file (never from the command line, where
// other users could read them); copy reads the source's from
// QBACKUP_FROM_PASSWORD or --from-password-file and the target's as every
// other command does (restic's RESTIC_FROM_PASSWORD convention).

import { readFileSync } from 'node:fs';
import { QbackupError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import type { InstantRestoreInfo } from '../instant/restore.js';
import type { CopyReport, GcReport, Manifest, PruneResult, RepoAccess, RepoStats, RetentionPolicy, ServeListen, VerifyReport } from '../repository/repository.js';
import { arg, defineCommand, flag, optionalArg, repeatable, requiredValue, value, valueWithDefault, type CliCommand } from './command.js';
import { diskOption, hostPort, oneOf, pointInTime, positiveNumber, quiesceMode, quiesceOptions, repoOption } from './options.js';
import { emit, table, type OutputOptions } from './output.js';
import { progressReporter, withProgress } from './progress.js';
import { untilSignal } from './service-commands.js';

const domain = arg('domain');
const passwordFile = value('--password-file <file>', 'read the passphrase from this file (default: $QBACKUP_PASSWORD)');
const MiB = 1024 * 1024;

export const repositoryCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'init',
    description: 'create a repository (encrypted with --encrypt)',
    options: { repo: repoOption(), encrypt: flag('--encrypt', 'encrypt with a key wrapped under a passphrase'), passwordFile, chunkSize: value('--chunk-size <KiB>', 'chunk size, a power of two (default 64 KiB, the dirty bitmaps\' granularity)') },
    run: async ({ qb, out, opts: o }) => {
      const password = o.encrypt ? requirePassword(o.passwordFile, 'QBACKUP_PASSWORD', '--encrypt') : undefined;
      const r = await qb.repository.init({ repo: o.repo, ...(password !== undefined ? { password } : {}), ...(o.chunkSize !== undefined ? { chunkSize: positiveNumber('--chunk-size', o.chunkSize, 'KiB') * 1024 } : {}) });
      emit(out, r, () => `Created ${r.encrypted ? 'encrypted ' : ''}repository ${r.id} at ${o.repo} (chunks of ${r.chunkSize / 1024} KiB)`);
    },
  }),

  defineCommand({
    name: 'key',
    description: 'list, add or remove the passphrases of an encrypted repository (add: new passphrase from --new-password-file or $QBACKUP_NEW_PASSWORD)',
    args: { action: arg('action', 'list, add or remove'), id: optionalArg('id', 'the key to remove') },
    options: { repo: repoOption(), passwordFile, newPasswordFile: value('--new-password-file <file>', 'the passphrase to add') },
    run: async ({ qb, out, args, opts: o }) => {
      const action = oneOf('action', args.action, ['list', 'add', 'remove']);
      const access = repoAccess(o);
      if (action === 'list') {
        const keys = await qb.repository.listKeys(access);
        emit(out, keys, () => table(['Key', 'Created', 'Host'], keys.map((k) => [k.id, k.created, k.host])));
      } else if (action === 'add') {
        const id = await qb.repository.addKey(access, requirePassword(o.newPasswordFile, 'QBACKUP_NEW_PASSWORD', 'key add'));
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
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const workers = Math.floor(positiveNumber('--workers', o.workers, 'threads'));
      const network = {
        ...(o.tcp !== undefined ? { tcp: hostPort('--tcp', o.tcp) } : {}),
        ...(o.tlsCertDir !== undefined ? { tlsCertDir: o.tlsCertDir } : {}),
      };
      const m = await withProgress(out, (onProgress) =>
        qb.repository.backup(domain, { ...repoAccess(o), full: o.full, disks: o.disk, workers, ...quiesceMode(o), ...network, onProgress }),
      );
      emit(out, m, () => describeBackup(m));
    },
  }),

  defineCommand({
    name: 'backup-list',
    description: 'list the backups in a repository',
    args: { domain: optionalArg('domain') },
    options: { repo: repoOption(), passwordFile },
    run: async ({ qb, out, args: { domain }, opts }) => {
      const list = await qb.repository.list(repoAccess(opts), domain);
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
      until: value('--until <time>', 'the latest backup taken at or before this time (ISO 8601)'),
      disk: diskOption('restore'),
      format: valueWithDefault('--format <format>', 'qcow2 or raw', 'qcow2'),
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const format = oneOf('--format', o.format, ['qcow2', 'raw']);
      if (o.backup !== undefined && o.until !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give either --backup or --until, not both');
      const until = o.until !== undefined ? pointInTime('--until', o.until) : undefined;
      if (o.instant && o.define !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --define makes a domain on restored images; with --instant give the name with --as');
      if (o.instant) {
        await runInstantRestore(qb, out, domain, { ...o, until });
        return;
      }
      for (const [flagName, given] of [['--as', o.as !== undefined], ['--wait', o.wait], ['--bandwidth', o.bandwidth !== undefined]] as const) {
        if (given) throw new QbackupError('INVALID_ARGUMENT', `Option ${flagName} needs --instant`);
      }
      if ((o.to === undefined) === (o.intoDomain === undefined)) throw new QbackupError('INVALID_ARGUMENT', 'Give either --to or --into-domain');
      if (o.define !== undefined && o.to === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --define needs --to (the directory of the new domain\'s images)');
      const r = await withProgress(out, (onProgress) =>
        qb.repository.restore(domain, {
          ...repoAccess(o),
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
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const format = oneOf('--format', o.format, ['qcow2', 'raw']);
      const r = await withProgress(out, (onProgress) => qb.repository.exportDisk(domain, { ...repoAccess(o), disk: o.disk, file: o.to, format, ...(o.backup !== undefined ? { backup: o.backup } : {}), onProgress }));
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
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const listen = serveListen(o);
      const server = await qb.repository.serveBackup(domain, {
        ...repoAccess(o),
        listen,
        disks: o.disk,
        ...(o.backup !== undefined ? { backup: o.backup } : {}),
        log: (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`),
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
    options: { repo: repoOption(), passwordFile, backup: value('--backup <id>', 'only this backup'), readData: flag('--read-data', 'read every chunk back and check it against its id'), readDataSubset: value('--read-data-subset <percent>', 'with --read-data, read this share of the chunks (e.g. 10%)') },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      if (o.backup !== undefined && domain === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --backup needs a domain');
      const percent = o.readDataSubset !== undefined ? positiveNumber('--read-data-subset', o.readDataSubset.replace(/%$/, ''), 'percent') : undefined;
      const report = await withProgress(out, (onProgress) =>
        qb.repository.verify(repoAccess(o), {
          ...(domain !== undefined ? { domain } : {}),
          ...(o.backup !== undefined ? { backup: o.backup } : {}),
          readData: o.readData || percent !== undefined,
          ...(percent !== undefined ? { readDataPercent: percent } : {}),
          onProgress: (done, total) => onProgress({ phase: 'verify', doneBytes: done, totalBytes: total }),
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
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const policy: RetentionPolicy = {};
      for (const rule of ['keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const) {
        const v = o[rule];
        if (v !== undefined) policy[rule] = /^\d+$/.test(v) ? Number(v) : NaN;
      }
      const r = await qb.repository.prune(domain, { ...repoAccess(o), ...policy, dryRun: o.dryRun });
      emit(out, r, () => describePrune(r, o.dryRun));
    },
  }),

  defineCommand({
    name: 'gc',
    description: 'remove data no backup references (safe while backups run; see docs/design.md)',
    options: { repo: repoOption(), passwordFile },
    run: async ({ qb, out, opts }) => {
      const r: GcReport = await qb.repository.gc(repoAccess(opts));
      emit(out, r, () => `Deleted ${r.packsDeleted} pack(s) and ${r.indexesDeleted} index(es), repacked ${r.packsRepacked}, freed ${(r.bytesFreed / MiB).toFixed(1)} MiB${r.condemned > 0 ? `; ${r.condemned} object(s) wait for running backups to end` : ''}`);
    },
  }),

  defineCommand({
    name: 'copy',
    description: 'copy backups (of a domain, or --backup ID) into another repository: only the chunks it lacks, re-encrypted when the keys differ; copying again copies nothing',
    args: { domain: optionalArg('domain', 'only this domain\'s backups') },
    options: {
      from: requiredValue('--from <dir|s3://bucket/prefix>', 'the source repository'),
      to: requiredValue('--to <dir|s3://bucket/prefix>', 'the target repository (an unencrypted one is created on first use; a bucket must exist)'),
      fromPasswordFile: value('--from-password-file <file>', 'the source\'s passphrase (default: $QBACKUP_FROM_PASSWORD)'),
      toPasswordFile: value('--to-password-file <file>', 'the target\'s passphrase (default: $QBACKUP_PASSWORD)'),
      backup: repeatable('--backup <id>', 'only this backup; repeatable'),
      dryRun: flag('--dry-run', 'show which backups would be copied, and copy nothing'),
      workers: valueWithDefault('--workers <n>', 'threads that hash and compress when chunks are re-encrypted', '2'),
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const workers = Math.floor(positiveNumber('--workers', o.workers, 'threads'));
      const from = repoAccess({ repo: o.from, passwordFile: o.fromPasswordFile }, 'QBACKUP_FROM_PASSWORD');
      const to = repoAccess({ repo: o.to, passwordFile: o.toPasswordFile });
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
    run: async ({ qb, out, opts }) => {
      const s: RepoStats = await qb.repository.stats(repoAccess(opts));
      emit(out, s, () =>
        [
          `Backups:            ${s.backups}`,
          `Logical size:       ${(s.logicalBytes / MiB).toFixed(1)} MiB (every disk of every backup)`,
          `Referenced data:    ${(s.referencedBytes / MiB).toFixed(1)} MiB`,
          `Unique data:        ${(s.uniqueBytes / MiB).toFixed(1)} MiB in ${s.uniqueChunks} chunks`,
          `Stored:             ${(s.storedChunkBytes / MiB).toFixed(1)} MiB (repository total ${(s.repositoryBytes / MiB).toFixed(1)} MiB)`,
          `Dedup ratio:        ${s.dedupRatio.toFixed(2)}`,
          `Compression ratio:  ${s.compressionRatio.toFixed(2)}`,
        ].join('\n'),
      );
    },
  }),
];

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

/** The repository and its passphrase: --password-file, else $QBACKUP_PASSWORD, else none. */
function repoAccess(o: { repo: string; passwordFile?: string | undefined }, env = 'QBACKUP_PASSWORD'): RepoAccess {
  const password = readPassword(o.passwordFile, env);
  return { repo: o.repo, ...(password !== undefined ? { password } : {}) };
}

function readPassword(file: string | undefined, env: string): string | undefined {
  if (file !== undefined) {
    try {
      return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot read the passphrase file "${file}": ${(err as Error).message}`);
    }
  }
  return process.env[env];
}

function requirePassword(file: string | undefined, env: string, what: string): string {
  const p = readPassword(file, env);
  if (p === undefined || p === '') throw new QbackupError('INVALID_ARGUMENT', `${what} needs a passphrase: set ${env} or give a passphrase file`);
  return p;
}

function backupTable(list: readonly Manifest[]): string {
  return table(
    ['Backup', 'Domain', 'Time', 'Disks', 'Read', 'Stored'],
    list.map((m) => [
      m.id,
      m.domain,
      m.time,
      m.disks.map((d) => `${d.target}:${d.level}`).join(' '),
      `${(m.disks.reduce((a, d) => a + d.bytesRead, 0) / MiB).toFixed(1)} MiB`,
      `${(m.disks.reduce((a, d) => a + d.bytesStored, 0) / MiB).toFixed(1)} MiB`,
    ]),
  );
}

function describeBackup(m: Manifest): string {
  return [
    `Backup ${m.id} of domain ${m.domain} (checkpoint ${m.checkpoint}, ${m.consistency}-consistent)`,
    ...m.disks.map(
      (d) =>
        `  ${d.target}: ${d.level}, ${(d.bytesRead / MiB).toFixed(1)} MiB read, ${(d.bytesStored / MiB).toFixed(1)} MiB stored (${d.newChunks} new of ${d.chunks} chunks)${d.fullReason !== null ? ` (full: ${d.fullReason})` : ''}`,
    ),
  ].join('\n');
}

function describeCopy(r: CopyReport): string {
  const lines = r.skipped.map((b) => `skip ${b.domain}/${b.id}: ${b.reason}`);
  if (r.dryRun) {
    lines.push(...r.copied.map((b) => `would copy ${b.domain}/${b.id}`));
    if (r.targetCreated) lines.push(`would create repository ${r.to}`);
    return lines.join('\n') || 'Nothing to copy';
  }
  if (r.copied.length === 0) return [...lines, `Nothing to copy: ${r.skipped.length} backup(s) already in ${r.to}`].join('\n');
  lines.push(...r.copied.map((b) => `copied ${b.domain}/${b.id}`));
  lines.push(
    `Copied ${r.copied.length} backup(s) from ${r.from} to ${r.to}${r.targetCreated ? ' (created)' : ''}${r.reencrypted ? ', re-encrypted' : ''}: ` +
      `${r.chunksRead} chunk(s) read and checked (${(r.bytesRead / MiB).toFixed(1)} MiB), ${r.chunksStored} stored (${(r.bytesStored / MiB).toFixed(1)} MiB), ${r.indexesWritten} index(es) written`,
  );
  return lines.join('\n');
}

function describeVerify(r: VerifyReport): string {
  if (r.problems.length === 0) return `Verified ${r.backupsChecked} backups: all ${r.chunksChecked} chunks present${r.chunksRead > 0 ? `, ${r.chunksRead} read back intact` : ''}`;
  return r.problems.map((p) => `DAMAGED ${p.object}: ${p.problem}; used by ${p.backups.join(', ')}`).join('\n');
}

function describePrune(r: PruneResult, dryRun: boolean): string {
  return [
    ...r.keep.map((k) => `keep   ${k.id}  ${k.reasons.join(', ')}`),
    ...r.remove.map((x) => `${dryRun ? 'would remove' : 'remove'} ${x.id}`),
    ...r.folds.map((f) => `${dryRun ? 'would fold' : 'fold'}   ${f.backup} ${f.target}: ${f.kind === 'full' ? 'a full index' : `a delta on ${f.base?.backup ?? ''}`} replaces ${f.folded.length} index link(s)`),
    ...r.checkpointsKept.map((c) => `checkpoint ${c.name} stays for now: ${c.reason}`),
  ].join('\n');
}

/** `restore --instant`: starts the domain from the backup; with --wait, follows the copy to its end. */
async function runInstantRestore(
  qb: Qbackup,
  out: OutputOptions,
  domain: string,
  o: { repo: string; passwordFile?: string | undefined; to?: string | undefined; as?: string | undefined; backup?: string | undefined; until: Date | undefined; intoDomain?: string | undefined; disk: string[]; format: string; wait: boolean; bandwidth?: string | undefined },
): Promise<void> {
  if (o.intoDomain !== undefined || o.disk.length > 0 || o.format !== 'qcow2') {
    throw new QbackupError('INVALID_ARGUMENT', 'Option --instant restores every disk of the backup into qcow2 overlays; it takes neither --into-domain, --disk nor --format');
  }
  const speed = o.bandwidth !== undefined ? Math.round(positiveNumber('--bandwidth', o.bandwidth, 'MiB/s') * MiB) : undefined;
  const started = await qb.instant.restore(domain, {
    ...repoAccess(o),
    ...(o.to !== undefined ? { to: o.to } : {}),
    ...(o.as !== undefined ? { as: o.as } : {}),
    ...(o.backup !== undefined ? { backup: o.backup } : {}),
    ...(o.until !== undefined ? { until: o.until } : {}),
    ...(speed !== undefined ? { speedBytesPerSec: speed } : {}),
  });
  if (!o.wait) {
    emit(out, started, () => `Domain ${started.domain} runs from backup ${started.backup}; its data is being copied in (see domjobinfo ${started.domain})\n${describeInstant(started)}`);
    return;
  }
  const bar = progressReporter(out);
  let result: InstantRestoreInfo;
  try {
    result = await qb.instant.wait(started.domain, { onProgress: (p) => bar.update({ ...p, phase: `copying into ${started.domain}` }) });
  } finally {
    bar.stop();
  }
  emit(out, result, () => `Domain ${result.domain} runs on its local images; backup ${result.backup} is no longer served\n${describeInstant(result)}`);
}

/** An instant restore as domjobinfo and restore --instant print it. */
export function describeInstant(info: InstantRestoreInfo): string {
  const lines = [
    `Job type:         Instant restore (${info.state})`,
    `Backup:           ${info.backup} of domain ${info.sourceDomain} in ${info.repo}`,
    `Served on:        ${info.socket}${info.serverPid !== null ? ` (pid ${info.serverPid})` : ''}`,
  ];
  for (const d of info.disks) {
    const pct = d.totalBytes > 0 ? Math.floor((d.doneBytes / d.totalBytes) * 100) : 100;
    lines.push(`Disk ${d.target}:`.padEnd(18) + `${d.status}, ${pct}% (${(d.doneBytes / MiB).toFixed(1)} of ${(d.totalBytes / MiB).toFixed(1)} MiB) into ${d.overlay}${d.error !== undefined ? `; last error: ${d.error}` : ''}`);
  }
  if (info.dropped !== undefined && info.dropped.length > 0) lines.push(`Left out:         ${info.dropped.join(', ')} (not in the backup)`);
  return lines.join('\n');
}
