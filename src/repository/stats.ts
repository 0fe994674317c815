// What a repository holds and what it costs: the logical size of every
// backup, the data they reference, what is stored after deduplication and
// compression, and the ratios between them. A manifest that cannot be read
// is counted as damaged and left out of the sizes: it never hides the
// figures of the others.

import { ZERO_ID } from './chunk.js';
import type { Store } from './store.js';

export interface RepoStats {
  /** Readable backups. */
  backups: number;
  /** Backups whose manifest cannot be read (named by list and verify). */
  damagedBackups: number;
  /** Sum of every backed-up disk's virtual size. */
  logicalBytes: number;
  /** Sum over backups of the bytes their disks hold in data chunks (not holes). */
  referencedBytes: number;
  /** Distinct chunks referenced, and their plaintext size. */
  uniqueChunks: number;
  uniqueBytes: number;
  /** Bytes of those chunks as stored (compressed, encrypted). */
  storedChunkBytes: number;
  /** Every pack and index object, including garbage gc has not removed yet. */
  repositoryBytes: number;
  dedupRatio: number;
  compressionRatio: number;
}

export async function repositoryStats(store: Store): Promise<RepoStats> {
  await store.loadChunks();
  const { manifests, damaged } = await store.readableManifests();
  const unique = new Set<string>();
  let logicalBytes = 0;
  let referencedBytes = 0;
  for (const m of manifests) {
    for (const d of m.disks) {
      logicalBytes += d.virtualSize;
      const table = await store.resolveIndex(d.index);
      for (let at = 0; at < table.ids.length; at += 32) {
        const id = table.ids.subarray(at, at + 32);
        if (id.equals(ZERO_ID)) continue;
        referencedBytes += store.locate(id)?.rawLength ?? 0;
        unique.add(id.toString('hex'));
      }
    }
  }
  let uniqueBytes = 0;
  let storedChunkBytes = 0;
  for (const hex of unique) {
    const loc = store.locate(Buffer.from(hex, 'hex'));
    uniqueBytes += loc?.rawLength ?? 0;
    storedChunkBytes += loc?.length ?? 0;
  }
  let repositoryBytes = 0;
  for (const prefix of ['data/', 'index/', 'indexes/', 'snapshots/']) for (const o of await store.backend.list(prefix)) repositoryBytes += o.size;
  return {
    backups: manifests.length,
    damagedBackups: damaged.length,
    logicalBytes,
    referencedBytes,
    uniqueChunks: unique.size,
    uniqueBytes,
    storedChunkBytes,
    repositoryBytes,
    dedupRatio: uniqueBytes > 0 ? referencedBytes / uniqueBytes : 1,
    compressionRatio: storedChunkBytes > 0 ? uniqueBytes / storedChunkBytes : 1,
  };
}
