// The bench's own "pull export → qcow2" copier, for comparing our NBD client
// with nbdcopy on the same export and the same kind of target (§1, §2): our
// NBD client reads the job's export (only the dirty extents of an
// incremental, per the exported bitmap) and writes into a qcow2 served by
// qemu-nbd. It was the format 1 repository's data path; format 2 reads into
// its chunk store instead (src/repository/read-disk.ts), so only the bench
// keeps it.

import { serverAddress, type JobInfo } from '../src/backup/job.js';
import { QbackupError } from '../src/errors.js';
import { NbdClient } from '../src/nbd/client.js';
import { NBD_CONTEXT_BASE_ALLOCATION } from '../src/nbd/constants.js';
import { copyExtents } from '../src/nbd/copy.js';
import { startQemuNbd } from '../src/image/qemu-nbd.js';

export interface PullCopyRequest {
  job: JobInfo;
  exportName: string;
  /** The job's merged bitmap (incremental), or undefined to copy everything. */
  dirtyBitmap: string | undefined;
  targetFile: string;
}

export async function pullCopy(r: PullCopyRequest): Promise<{ dataBytes: number }> {
  const server = r.job.server;
  if (server === undefined) throw new Error(`backup job "${r.job.id}" has no NBD server`);
  const dirtyContext = r.dirtyBitmap !== undefined ? `qemu:dirty-bitmap:${r.dirtyBitmap}` : undefined;
  await using source = await NbdClient.connect(serverAddress(server), {
    exportName: r.exportName,
    metaContexts: [NBD_CONTEXT_BASE_ALLOCATION, ...(dirtyContext !== undefined ? [dirtyContext] : [])],
  });
  if (dirtyContext !== undefined && !source.contexts.has(dirtyContext)) {
    throw new QbackupError('NBD_ERROR', `Export "${r.exportName}" of backup job "${r.job.id}" does not offer "${dirtyContext}"`);
  }
  await using writer = await startQemuNbd(r.targetFile, { format: 'qcow2' });
  await using target = await NbdClient.connect({ socket: writer.socket }, { exportName: writer.exportName });
  const result = await copyExtents(source, target, dirtyContext !== undefined ? { dirtyContext } : {});
  return { dataBytes: result.dataBytes };
}
