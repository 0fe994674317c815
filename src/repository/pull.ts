// Pull-mode copying for the repository: our NBD client reads the job's export
// (only the dirty extents of an incremental, per the exported bitmap) and
// writes into the repository's qcow2 file served by qemu-nbd, where zero
// extents become zero clusters that hide older data in the backing file.

import { copyExtents } from '../nbd/copy.js';
import { NbdClient } from '../nbd/client.js';
import { startQemuNbd } from '../qemu/qemu-nbd.js';
import { QbackupError } from '../errors.js';
import { serverAddress } from '../backup/job.js';
import { assert } from '../util/assert.js';
import type { PullCopier } from './service.js';

export const nbdPullCopier: PullCopier = async ({ job, exportName, dirtyBitmap, targetFile, onProgress }) => {
  const server = job.server;
  assert(server !== undefined, `backup job "${job.id}" has no NBD server`);
  const address = serverAddress(server);
  const dirtyContext = dirtyBitmap !== undefined ? `qemu:dirty-bitmap:${dirtyBitmap}` : undefined;
  await using source = await NbdClient.connect(address, {
    exportName,
    metaContexts: ['base:allocation', ...(dirtyContext !== undefined ? [dirtyContext] : [])],
  });
  if (dirtyContext !== undefined && !source.contexts.has(dirtyContext)) {
    throw new QbackupError('NBD_ERROR', `Export "${exportName}" of backup job "${job.id}" does not offer "${dirtyContext}"`);
  }
  await using writer = await startQemuNbd(targetFile, { format: 'qcow2' });
  await using target = await NbdClient.connect({ socket: writer.socket }, { exportName: writer.exportName });
  const result = await copyExtents(source, target, {
    ...(dirtyContext !== undefined ? { dirtyContext } : {}),
    onProgress,
  });
  return { dataBytes: result.dataBytes };
};
