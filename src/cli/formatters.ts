// How the CLI prints what the repository commands return: tables and short
// paragraphs for people (--json prints the objects themselves).

import type { InstantRestoreInfo } from '../instant/restore.js';
import type { CopyReport, GcReport, Manifest, PruneResult, RepoStats, VerifyReport } from '../repository/repository.js';
import { table } from './output.js';

const MiB = 1024 * 1024;

export function backupTable(list: readonly Manifest[]): string {
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

export function describeBackup(m: Manifest): string {
  return [
    `Backup ${m.id} of domain ${m.domain} (UUID ${m.uuid}${m.connection !== undefined ? ` through ${m.connection}` : ''}; checkpoint ${m.checkpoint}, ${m.consistency}-consistent)`,
    ...m.disks.map(
      (d) =>
        `  ${d.target}: ${d.level}, ${(d.bytesRead / MiB).toFixed(1)} MiB read, ${(d.bytesStored / MiB).toFixed(1)} MiB stored (${d.newChunks} new of ${d.chunks} chunks)${d.fullReason !== null ? ` (full: ${d.fullReason})` : ''}`,
    ),
  ].join('\n');
}

export function describeCopy(r: CopyReport): string {
  const lines = [...r.skipped.map((b) => `skip ${b.domain}/${b.id}: ${b.reason}`), ...r.failed.map((b) => `cannot copy ${b.domain}/${b.id}: ${b.reason}`)];
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

export function describeVerify(r: VerifyReport): string {
  if (r.problems.length === 0) return `Verified ${r.backupsChecked} backups: all ${r.chunksChecked} chunks present${r.chunksRead > 0 ? `, ${r.chunksRead} read back intact` : ''}`;
  return r.problems.map((p) => `DAMAGED ${p.object}: ${p.problem}; used by ${p.backups.join(', ')}`).join('\n');
}

export function describePrune(r: PruneResult, dryRun: boolean): string {
  return [
    ...r.keep.map((k) => `keep   ${k.id}  ${k.reasons.join(', ')}`),
    ...r.remove.map((x) => `${dryRun ? 'would remove' : 'remove'} ${x.id}`),
    ...r.folds.map((f) => `${dryRun ? 'would fold' : 'fold'}   ${f.backup} ${f.target}: ${f.kind === 'full' ? 'a full index' : `a delta on ${f.base?.backup ?? ''}`} replaces ${f.folded.length} index link(s)`),
    ...r.checkpointsKept.map((c) => `checkpoint ${c.name} stays for now: ${c.reason}`),
  ].join('\n');
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

export function describeGc(r: GcReport): string {
  return `Deleted ${r.packsDeleted} pack(s) and ${r.indexesDeleted} index(es), repacked ${r.packsRepacked}, freed ${(r.bytesFreed / MiB).toFixed(1)} MiB${r.condemned > 0 ? `; ${r.condemned} object(s) wait for running backups to end` : ''}`;
}

export function describeStats(s: RepoStats): string {
  return [
    `Backups:            ${s.backups}`,
    `Logical size:       ${(s.logicalBytes / MiB).toFixed(1)} MiB (every disk of every backup)`,
    `Referenced data:    ${(s.referencedBytes / MiB).toFixed(1)} MiB`,
    `Unique data:        ${(s.uniqueBytes / MiB).toFixed(1)} MiB in ${s.uniqueChunks} chunks`,
    `Stored:             ${(s.storedChunkBytes / MiB).toFixed(1)} MiB (repository total ${(s.repositoryBytes / MiB).toFixed(1)} MiB)`,
    `Dedup ratio:        ${s.dedupRatio.toFixed(2)}`,
    `Compression ratio:  ${s.compressionRatio.toFixed(2)}`,
  ].join('\n');
}
