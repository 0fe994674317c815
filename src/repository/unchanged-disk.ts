// The backup of a disk that did not change since its parent backup (the
// hypervisor found no dirty bit since the parent's checkpoint, so nothing was
// exported or read): the same index an incremental that read nothing writes,
// an empty delta on the parent's index (a full index again once the chain is
// MAX_CHAIN deltas long, as for every incremental).

import { slotCount } from './disk-index.js';
import { buildIndex, type DiskReadResult } from './read-disk.js';
import type { Store } from './store.js';

export async function unchangedDisk(store: Store, parentIndex: string, virtualSize: number): Promise<DiskReadResult> {
  const chunkSize = store.config.chunkSize;
  const index = await buildIndex(store, new Map(), slotCount(virtualSize, chunkSize), chunkSize, virtualSize, parentIndex);
  return { indexId: await store.putIndex(index), bytesRead: 0, bytesStored: 0, chunks: 0, newChunks: 0 };
}
