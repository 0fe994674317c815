// CLI commands for backup jobs, named and flagged as in virsh, plus shorthand
// flags so that the common backup needs no XML.

import type { Command } from 'commander';
import { exportUri, type JobInfo } from '../backup/job.js';
import type { BackupSpec } from '../backup/spec.js';
import type { CheckpointSpec } from '../checkpoint/spec.js';
import { formatJobXml, parseBackupSpec } from '../libvirt/backup.js';
import { parseCheckpointXml } from '../libvirt/checkpoint.js';
import { QbackupError } from '../errors.js';
import type { CliContext } from './context.js';
import { readInput } from './domain-commands.js';
import { emit } from './output.js';

export function registerBackupCommands(program: Command, cli: CliContext): void {
  program
    .command('backup-begin')
    .description('start a backup job: push (QEMU writes each disk to a qcow2 target) or pull (an NBD export of the frozen disks)')
    .argument('<domain>')
    .argument('[backupxml]', '<domainbackup> XML file')
    .argument('[checkpointxml]', '<domaincheckpoint> XML file: a checkpoint created atomically with the job')
    .option('--incremental <checkpoint>', 'back up the changes since this checkpoint (per disk full when coverage is lost)')
    .option('--checkpoint <name>', 'create a checkpoint with this name atomically with the job')
    .option('--target-dir <dir>', 'write targets as DIR/<target>.<checkpoint or job id>.qcow2')
    .option('--reuse-external', 'write into existing target files instead of creating them')
    .option('--strict', 'refuse the job when a disk cannot be backed up incrementally')
    .option('--bandwidth <MiB/s>', 'limit the copy rate of each disk')
    .option('--wait', 'wait until the job ends and print its result')
    .action(
      async (
        domain: string,
        backupFile: string | undefined,
        checkpointFile: string | undefined,
        o: { incremental?: string; checkpoint?: string; targetDir?: string; reuseExternal?: boolean; strict?: boolean; wait?: boolean; bandwidth?: string },
        cmd: Command,
      ) => {
        await cli.run(cmd, async (qb, out) => {
          if (checkpointFile !== undefined && o.checkpoint !== undefined) {
            throw new QbackupError('INVALID_ARGUMENT', 'Give the new checkpoint either as XML or with --checkpoint, not both');
          }
          const spec: BackupSpec = backupFile !== undefined ? parseBackupSpec(readInput(backupFile, 'backup XML')) : { mode: 'push' };
          if (o.incremental !== undefined) spec.since = o.incremental;
          if (o.wait && spec.mode === 'pull') {
            throw new QbackupError('INVALID_ARGUMENT', 'Option --wait is for push mode: a pull job lasts until domjobabort');
          }
          const checkpoint: CheckpointSpec | undefined =
            checkpointFile !== undefined ? parseCheckpointXml(readInput(checkpointFile, 'checkpoint XML')) : o.checkpoint !== undefined ? { name: o.checkpoint } : undefined;
          let job = await qb.backups.begin(domain, spec, {
            ...(checkpoint !== undefined ? { checkpoint } : {}),
            ...(o.targetDir !== undefined ? { targetDir: o.targetDir } : {}),
            reuseExternal: o.reuseExternal ?? false,
            strict: o.strict ?? false,
            ...(o.bandwidth !== undefined ? { bandwidthBytesPerSec: mibPerSecond(o.bandwidth) } : {}),
          });
          if (o.wait) job = await qb.backups.wait(domain, job.id);
          emit(out, job, () => (o.wait ? describeJob(job) : `Backup started (job ${job.id})\n${describeServer(job)}${describeDisks(job)}`));
          if (o.wait && job.state !== 'completed') {
            throw new QbackupError('BACKUP_FAILED', `Backup job "${job.id}" of domain "${domain}" ${job.state}${job.error !== undefined ? `: ${job.error}` : ''}`);
          }
        });
      },
    );

  program
    .command('backup-dumpxml')
    .description('print the running backup job as <domainbackup> XML')
    .argument('<domain>')
    .action(async (domain: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const job = await qb.backups.info(domain);
        if (job === undefined) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" has no running backup job`);
        const xml = formatJobXml(job);
        emit(out, { job, xml }, () => xml);
      });
    });

  program
    .command('domjobinfo')
    .description('show the running backup job (or, with --completed, the last finished one)')
    .argument('<domain>')
    .option('--completed', 'show the last finished job')
    .action(async (domain: string, o: { completed?: boolean }, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const job = o.completed ? await qb.backups.lastResult(domain) : await qb.backups.info(domain);
        emit(out, job ?? null, () => (job === undefined ? 'Job type:         None' : describeJob(job)));
      });
    });

  program
    .command('domjobabort')
    .description('end the running backup job: a push job is aborted and its targets removed; a pull job ends normally')
    .argument('<domain>')
    .action(async (domain: string, _o: unknown, cmd: Command) => {
      await cli.run(cmd, async (qb, out) => {
        const job = await qb.backups.abort(domain);
        emit(out, job, () => (job.mode === 'pull' ? `Backup job ${job.id} ended` : `Backup job ${job.id} aborted`));
      });
    });
}

function mibPerSecond(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new QbackupError('INVALID_ARGUMENT', `Invalid --bandwidth "${value}": expected a positive number of MiB/s`);
  return Math.round(n * 1024 * 1024);
}

function describeServer(job: JobInfo): string {
  const s = job.server;
  if (s === undefined) return '';
  const where = exportUri(s, 'EXPORT');
  return `NBD server: ${where} (end the job with domjobabort)\n`;
}

function describeDisks(job: JobInfo): string {
  return job.disks
    .map((d) => {
      const why = d.fullReasons !== undefined && d.fullReasons.length > 0 ? ` (full because ${d.fullReasons.map((r) => `${r.code}: ${r.detail}`).join('; ')})` : '';
      const backing = d.backingFile !== undefined ? `, backing ${d.backingFile}` : d.backingNote !== undefined ? `, no backing file: ${d.backingNote}` : '';
      const where =
        d.pull !== undefined
          ? `export "${d.pull.exportName}"${d.tmpBitmap !== undefined ? `, dirty bitmap qemu:dirty-bitmap:${d.tmpBitmap}` : ''}`
          : d.targetFile;
      return `  ${d.target}: ${d.mode}${d.mode === 'incremental' ? ` since ${d.incremental ?? '?'}` : ''} -> ${where}${backing}${why}`;
    })
    .join('\n');
}

function describeJob(job: JobInfo): string {
  const elapsed = ((job.endedMs ?? Date.now()) - job.startedMs) / 1000;
  return [
    `Job type:         ${job.state === 'running' ? 'Unbounded' : job.state === 'completed' ? 'Completed' : job.state === 'aborted' ? 'Cancelled' : 'Failed'}`,
    `Operation:        Backup (${job.mode})`,
    `Job id:           ${job.id}`,
    `Time elapsed:     ${elapsed.toFixed(3)} s`,
    `Data processed:   ${job.bytesDone} of ${job.bytesTotal} bytes`,
    ...(job.checkpoint !== undefined ? [`Checkpoint:       ${job.checkpoint}`] : []),
    ...(job.error !== undefined ? [`Error:            ${job.error}`] : []),
    'Disks:',
    describeDisks(job),
  ].join('\n');
}
