// CLI commands for the backup repository: backup, backup-list, restore,
// verify, prune.

import type { Command } from 'commander';
import { QbackupError } from '../errors.js';
import type { Manifest } from '../repository/repo.js';
import type { CliContext } from './context.js';
import { collect, emit, table } from './output.js';
import { progressReporter } from './progress.js';

export function registerRepositoryCommands(program: Command, cli: CliContext): void {
  program
    .command('backup')
    .description('back up a domain into a repository: incremental since its last backup there when coverage allows, else full')
    .argument('<domain>')
    .requiredOption('--repo <dir>', 'repository directory (created when missing or empty)')
    .option('--full', 'take a full backup of every disk')
    .option('--mode <mode>', 'push (QEMU writes the files) or pull (qbackup reads an NBD export)', 'push')
    .option('--disk <target>', 'back up only this disk; repeatable', collect, [])
    .action(async (domain: string, o: { repo: string; full?: boolean; mode: string; disk: string[] }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        if (o.mode !== 'push' && o.mode !== 'pull') throw new QbackupError('INVALID_ARGUMENT', `Invalid --mode "${o.mode}": expected push or pull`);
        const bar = progressReporter(out);
        try {
          const m = await qb.repository.backup(domain, { repo: o.repo, full: o.full ?? false, mode: o.mode, disks: o.disk, onProgress: (p) => bar.update(p) });
          bar.stop();
          emit(out, m, () => describeBackup(m));
        } finally {
          bar.stop();
        }
      });
    });

  program
    .command('backup-list')
    .description('list the backups in a repository')
    .requiredOption('--repo <dir>', 'repository directory')
    .argument('[domain]')
    .action(async (domain: string | undefined, o: { repo: string }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const list = qb.repository.list(o.repo, domain);
        emit(out, list, () =>
          table(
            ['Backup', 'Domain', 'Time', 'Disks', 'Written'],
            list.map((m) => [
              m.id,
              m.domain,
              m.time,
              m.disks.map((d) => `${d.target}:${d.level}`).join(' '),
              `${(m.disks.reduce((a, d) => a + d.bytesWritten, 0) / 1048576).toFixed(1)} MiB`,
            ]),
          ),
        );
      });
    });

  program
    .command('restore')
    .description('restore a backup to standalone images')
    .argument('<domain>')
    .requiredOption('--repo <dir>', 'repository directory')
    .requiredOption('--to <dir>', 'directory for the restored images (<target>.<format>)')
    .option('--backup <id>', 'the backup to restore (default: the latest)')
    .option('--until <time>', 'the latest backup taken at or before this time (ISO 8601)')
    .option('--disk <target>', 'restore only this disk; repeatable', collect, [])
    .option('--format <format>', 'qcow2 or raw', 'qcow2')
    .action(async (domain: string, o: { repo: string; to: string; backup?: string; until?: string; disk: string[]; format: string }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        if (o.format !== 'qcow2' && o.format !== 'raw') throw new QbackupError('INVALID_ARGUMENT', `Invalid --format "${o.format}": expected qcow2 or raw`);
        if (o.backup !== undefined && o.until !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give either --backup or --until, not both');
        let until: Date | undefined;
        if (o.until !== undefined) {
          until = new Date(o.until);
          if (Number.isNaN(until.getTime())) throw new QbackupError('INVALID_ARGUMENT', `Invalid --until "${o.until}": expected a time such as 2026-11-25T18:00:00Z`);
        }
        const bar = progressReporter(out);
        try {
          const r = await qb.repository.restore(domain, {
            repo: o.repo,
            to: o.to,
            format: o.format,
            disks: o.disk,
            ...(o.backup !== undefined ? { backup: o.backup } : {}),
            ...(until !== undefined ? { until } : {}),
            onProgress: (p) => bar.update(p),
          });
          bar.stop();
          emit(out, r, () => [`Restored backup ${r.backup}:`, ...r.disks.map((d) => `  ${d.target} -> ${d.file} (digest verified)`)].join('\n'));
        } finally {
          bar.stop();
        }
      });
    });

  program
    .command('verify')
    .description('check every file of the backups: qemu-img check, backing links, and the content digest')
    .requiredOption('--repo <dir>', 'repository directory')
    .argument('[domain]')
    .option('--backup <id>', 'only this backup')
    .action(async (domain: string | undefined, o: { repo: string; backup?: string }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        if (o.backup !== undefined && domain === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option --backup needs a domain');
        const bar = progressReporter(out);
        let report;
        try {
          report = await qb.repository.verify(o.repo, {
            ...(domain !== undefined ? { domain } : {}),
            ...(o.backup !== undefined ? { backup: o.backup } : {}),
            onProgress: (p) => bar.update(p),
          });
        } finally {
          bar.stop();
        }
        emit(out, report, () =>
          report.problems.length === 0
            ? `Verified ${report.backupsChecked} backups (${report.filesChecked} files): all intact`
            : report.problems.map((p) => `FAILED ${p.domain} ${p.backup} ${p.target}: ${p.file}: ${p.problem}`).join('\n'),
        );
        const first = report.problems[0];
        if (first !== undefined) {
          throw new QbackupError('VERIFY_FAILED', `Verification failed for ${report.problems.length} file(s); first: "${first.file}" (backup ${first.backup}, disk ${first.target}): ${first.problem}`);
        }
      });
    });

  program
    .command('prune')
    .description('keep the newest N backups of a domain; kept backups still restore to the same bytes')
    .argument('<domain>')
    .requiredOption('--repo <dir>', 'repository directory')
    .requiredOption('--keep-last <n>', 'how many backups to keep')
    .action(async (domain: string, o: { repo: string; keepLast: string }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const r = await qb.repository.prune(domain, { repo: o.repo, keepLast: Number(o.keepLast) });
        emit(out, r, () => `Removed ${r.removed.length} backup(s); kept ${r.kept.join(', ') || 'none'}`);
      });
    });
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
