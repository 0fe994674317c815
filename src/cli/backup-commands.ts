// CLI commands for backup jobs, named and flagged as in virsh, plus shorthand
// flags so that the common backup needs no XML.

import { exportUri, type JobInfo } from '../backup/job.js';
import type { BackupSpec } from '../backup/spec.js';
import type { CheckpointSpec } from '../checkpoint/spec.js';
import { QbackupError } from '../errors.js';
import { arg, defineCommand, flag, optionalArg, value, type CliCommand } from './command.js';
import { positiveNumber, quiesceMode, quiesceOptions, readInput } from './options.js';
import { describeInstant } from './formatters.js';
import { emit } from './output.js';

const domain = arg('domain');

export const backupCommands: readonly CliCommand[] = [
  defineCommand({
    name: 'backup-begin',
    description: 'start a backup job: push (QEMU writes each disk to a qcow2 target) or pull (an NBD export of the frozen disks)',
    args: {
      domain,
      backupxml: optionalArg('backupxml', '<domainbackup> XML file'),
      checkpointxml: optionalArg('checkpointxml', '<domaincheckpoint> XML file: a checkpoint created atomically with the job'),
    },
    options: {
      incremental: value('--incremental <checkpoint>', 'back up the changes since this checkpoint (per disk full when coverage is lost)'),
      checkpoint: value('--checkpoint <name>', 'create a checkpoint with this name atomically with the job'),
      targetDir: value('--target-dir <dir>', 'write targets as DIR/<target>.<checkpoint or job id>.qcow2'),
      reuseExternal: flag('--reuse-external', 'write into existing target files instead of creating them'),
      strict: flag('--strict', 'refuse the job when a disk cannot be backed up incrementally'),
      bandwidth: value('--bandwidth <MiB/s>', 'limit the copy rate of each disk'),
      tlsCertDir: value('--tls-cert-dir <dir>', "pull over TCP with tls='yes': QEMU's ca-cert.pem, server-cert.pem, server-key.pem (default STATE_DIR/pki/qbackup)"),
      tlsClientDn: value('--tls-client-dn <dn>', "with tls='yes': accept only the client certificate with this distinguished name, e.g. CN=backup-client"),
      wait: flag('--wait', 'wait until the job ends and print its result'),
      ...quiesceOptions(),
    },
    run: async ({ qb, out, args, opts: o }) => {
      const { spec, checkpoint } = await readJobRequest(args, o);
      let job = await qb.backups.begin(args.domain, spec, {
        ...(checkpoint !== undefined ? { checkpoint } : {}),
        ...(o.targetDir !== undefined ? { targetDir: o.targetDir } : {}),
        ...(o.tlsCertDir !== undefined ? { tlsCertDir: o.tlsCertDir } : {}),
        ...(o.tlsClientDn !== undefined ? { tlsClientIdentity: o.tlsClientDn } : {}),
        reuseExternal: o.reuseExternal,
        strict: o.strict,
        ...quiesceMode(o),
        ...(o.bandwidth !== undefined ? { bandwidthBytesPerSec: Math.round(positiveNumber('--bandwidth', o.bandwidth, 'MiB/s') * 1024 * 1024) } : {}),
      });
      if (o.wait) job = await qb.backups.wait(args.domain, job.id);
      emit(out, job, () => (o.wait ? describeJob(job) : `Backup started (job ${job.id})\n${describeServer(job)}${describeDisks(job)}`));
      if (o.wait && job.state !== 'completed') {
        throw new QbackupError('BACKUP_FAILED', `Backup job "${job.id}" of domain "${args.domain}" ${job.state}${job.error !== undefined ? `: ${job.error}` : ''}`);
      }
    },
  }),

  defineCommand({
    name: 'backup-dumpxml',
    description: 'print the running backup job as <domainbackup> XML',
    args: { domain },
    run: async ({ qb, out, args: { domain } }) => {
      const job = await qb.backups.info(domain);
      if (job === undefined) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" has no running backup job`);
      const { formatJobXml } = await import('../libvirt/backup.js');
      const xml = formatJobXml(job);
      emit(out, { job, xml }, () => xml);
    },
  }),

  defineCommand({
    name: 'domjobinfo',
    description: 'show the running backup job or instant restore (or, with --completed, the last finished backup job)',
    args: { domain },
    options: { completed: flag('--completed', 'show the last finished job') },
    run: async ({ qb, out, args: { domain }, opts }) => {
      // Through another hypervisor (--connect) qbackup runs no backup job of its own; an instant restore it may.
      const own = qb.driver.uri === 'qbackup:///';
      const job = !own ? undefined : opts.completed ? await qb.backups.lastResult(domain) : await qb.backups.info(domain);
      if (job === undefined && !opts.completed) {
        const instant = await qb.instant.info(domain);
        if (instant !== undefined) {
          emit(out, instant, () => describeInstant(instant));
          return;
        }
      }
      emit(out, job ?? null, () => (job === undefined ? 'Job type:         None' : describeJob(job)));
    },
  }),

  defineCommand({
    name: 'domjobabort',
    description: 'end the running backup job: a push job is aborted and its targets removed; a pull job ends normally',
    args: { domain },
    run: async ({ qb, out, args: { domain } }) => {
      const job = await qb.backups.abort(domain);
      emit(out, job, () => (job.mode === 'pull' ? `Backup job ${job.id} ended` : `Backup job ${job.id} aborted`));
    },
  }),
];

/** The job and the checkpoint to create with it, from the XML files and the shorthand flags. */
async function readJobRequest(
  args: { backupxml: string | undefined; checkpointxml: string | undefined },
  o: { incremental: string | undefined; checkpoint: string | undefined; wait: boolean },
): Promise<{ spec: BackupSpec; checkpoint: CheckpointSpec | undefined }> {
  if (args.checkpointxml !== undefined && o.checkpoint !== undefined) {
    throw new QbackupError('INVALID_ARGUMENT', 'Give the new checkpoint either as XML or with --checkpoint, not both');
  }
  // The XML parsers load when XML is given (start-up time).
  const spec: BackupSpec = args.backupxml !== undefined ? (await import('../libvirt/backup.js')).parseBackupSpec(readInput(args.backupxml, 'backup XML')) : { mode: 'push' };
  if (o.incremental !== undefined) spec.since = o.incremental;
  if (o.wait && spec.mode === 'pull') throw new QbackupError('INVALID_ARGUMENT', 'Option --wait is for push mode: a pull job lasts until domjobabort');
  if (args.checkpointxml !== undefined) return { spec, checkpoint: (await import('../libvirt/checkpoint.js')).parseCheckpointXml(readInput(args.checkpointxml, 'checkpoint XML')) };
  return { spec, checkpoint: o.checkpoint !== undefined ? { name: o.checkpoint } : undefined };
}

function describeServer(job: JobInfo): string {
  const s = job.server;
  if (s === undefined) return '';
  const where = exportUri(s, 'EXPORT');
  const tls = s.transport === 'tcp' && s.tls ? `; TLS with certificates from ${s.tlsCertDir ?? '?'}: clients add ?tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem)` : '';
  return `NBD server: ${where} (end the job with domjobabort${tls})\n`;
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
