// CLI commands for the backup repository: backup, backup-list, restore,
// verify, prune.

import { QbackupError } from '../errors.js';
import type { Manifest } from '../repository/repo.js';
import { arg, defineCommand, flag, optionalArg, requiredValue, value, valueWithDefault, type CliCommand } from './command.js';
import { diskOption, oneOf, pointInTime, repoOption } from './options.js';
import { emit, table } from './output.js';
import { withProgress } from './progress.js';

const domain = arg('domain');

export const repositoryCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'backup',
    description: 'back up a domain into a repository: incremental since its last backup there when coverage allows, else full',
    args: { domain },
    options: {
      repo: repoOption('repository directory (created when missing or empty)'),
      full: flag('--full', 'take a full backup of every disk'),
      mode: valueWithDefault('--mode <mode>', 'push (QEMU writes the files) or pull (qbackup reads an NBD export)', 'push'),
      disk: diskOption('back up'),
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const mode = oneOf('--mode', o.mode, ['push', 'pull']);
      const m = await withProgress(out, (onProgress) => qb.repository.backup(domain, { repo: o.repo, full: o.full, mode, disks: o.disk, onProgress }));
      emit(out, m, () => describeBackup(m));
    },
  }),

  defineCommand({
    name: 'backup-list',
    description: 'list the backups in a repository',
    args: { domain: optionalArg('domain') },
    options: { repo: repoOption() },
    run: async ({ qb, out, args: { domain }, opts }) => {
      const list = qb.repository.list(opts.repo, domain);
      emit(out, list, () => backupTable(list));
    },
  }),

  defineCommand({
    name: 'restore',
    description: 'restore a backup to standalone images',
    args: { domain },
    options: {
      repo: repoOption(),
      to: requiredValue('--to <dir>', 'directory for the restored images (<target>.<format>)'),
      backup: value('--backup <id>', 'the backup to restore (default: the latest)'),
      until: value('--until <time>', 'the latest backup taken at or before this time (ISO 8601)'),
      disk: diskOption('restore'),
      format: valueWithDefault('--format <format>', 'qcow2 or raw', 'qcow2'),
    },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      const format = oneOf('--format', o.format, ['qcow2', 'raw']);
      if (o.backup !== undefined && o.until !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give either --backup or --until, not both');
      const until = o.until !== undefined ? pointInTime('--until', o.until) : undefined;
      const r = await withProgress(out, (onProgress) =>
        qb.repository.restore(domain, {
          repo: o.repo,
          to: o.to,
          format,
          disks: o.disk,
          ...(o.backup !== undefined ? { backup: o.backup } : {}),
          ...(until !== undefined ? { until } : {}),
          onProgress,
        }),
      );
      emit(out, r, () => [`Restored backup ${r.backup}:`, ...r.disks.map((d) => `  ${d.target} -> ${d.file} (digest verified)`)].join('\n'));
    },
  }),

  defineCommand({
    name: 'verify',
    description: 'check every file of the backups: qemu-img check, backing links, and the content digest',
    args: { domain: optionalArg('domain') },
    options: { repo: repoOption(), backup: value('--backup <id>', 'only this backup') },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      if (o.backup !== undefined && domain === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --backup needs a domain');
      const report = await withProgress(out, (onProgress) =>
        qb.repository.verify(o.repo, { ...(domain !== undefined ? { domain } : {}), ...(o.backup !== undefined ? { backup: o.backup } : {}), onProgress }),
      );
      emit(out, report, () =>
        report.problems.length === 0
          ? `Verified ${report.backupsChecked} backups (${report.filesChecked} files): all intact`
          : report.problems.map((p) => `FAILED ${p.domain} ${p.backup} ${p.target}: ${p.file}: ${p.problem}`).join('\n'),
      );
      const first = report.problems[0];
      if (first !== undefined) {
        throw new QbackupError('VERIFY_FAILED', `Verification failed for ${report.problems.length} file(s); first: "${first.file}" (backup ${first.backup}, disk ${first.target}): ${first.problem}`);
      }
    },
  }),

  defineCommand({
    name: 'prune',
    description: 'keep the newest N backups of a domain; kept backups still restore to the same bytes',
    args: { domain },
    options: { repo: repoOption(), keepLast: requiredValue('--keep-last <n>', 'how many backups to keep') },
    run: async ({ qb, out, args: { domain }, opts: o }) => {
      // The library refuses a count below 1 (and NaN) with its own message.
      const r = await qb.repository.prune(domain, { repo: o.repo, keepLast: Number(o.keepLast) });
      emit(out, r, () => `Removed ${r.removed.length} backup(s); kept ${r.kept.join(', ') || 'none'}`);
    },
  }),
];

function backupTable(list: readonly Manifest[]): string {
  return table(
    ['Backup', 'Domain', 'Time', 'Disks', 'Written'],
    list.map((m) => [
      m.id,
      m.domain,
      m.time,
      m.disks.map((d) => `${d.target}:${d.level}`).join(' '),
      `${(m.disks.reduce((a, d) => a + d.bytesWritten, 0) / 1048576).toFixed(1)} MiB`,
    ]),
  );
}

function describeBackup(m: Manifest): string {
  return [
    `Backup ${m.id} of domain ${m.domain} (${m.mode}, checkpoint ${m.checkpoint})`,
    ...m.disks.map(
      (d) =>
        `  ${d.target}: ${d.level}${d.parent !== null ? ` on ${d.parent}` : ''}, ${(d.bytesWritten / 1048576).toFixed(1)} MiB written${d.fullReason !== null ? ` (full: ${d.fullReason})` : ''}`,
    ),
  ].join('\n');
}
