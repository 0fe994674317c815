// The pack indexes (index/<pack id>) a process has read, kept in memory so
// that the next open of the same repository reads only the indexes it has
// not seen: a daemon's or a long-lived process's second backup of a
// repository then costs one listing instead of a read of every index.
//
// Invariants:
// - A pack index is immutable: its key is its pack's id (the SHA-256 of the
//   pack), it is written once (putIfAbsent) and, if ever rebuilt, rebuilt
//   from that same pack. A cached entry is used only when the listing of
//   `index/` still names it with the same size; an index no longer listed is
//   dropped. So the cache never answers for a pack that is gone.
// - Entries are shared read-only: each Store builds its own map of chunk
//   locations from them, so one Store's view (e.g. without condemned packs)
//   never leaks into another's.
// - Disk indexes are content-addressed and immutable too: the length of
//   the chain ending at an index (what an incremental asks to decide
//   whether to fold) is kept by index id; the caller still checks that the
//   index exists.
// - Keyed by the repository's location and id (a repository made anew at the
//   same place has another id); a few repositories at most are kept.

import type { ChunkLocation } from './store.js';

/** One pack's chunks: hex ids and their locations, in the index's order. */
export interface CachedPack {
  size: number;
  ids: readonly string[];
  locations: readonly ChunkLocation[];
}

/** The most repositories whose indexes are kept. */
const MAX_REPOSITORIES = 4;

/** The most chain lengths kept per repository. */
const MAX_CHAIN_LENGTHS = 65536;

interface RepositoryCache {
  packs: Map<string, CachedPack>;
  chainLengths: Map<string, number>;
}

const caches = new Map<string, RepositoryCache>();

function repositoryCache(location: string, repoId: string): RepositoryCache {
  const key = `${repoId} ${location}`;
  let cache = caches.get(key);
  if (cache !== undefined) caches.delete(key);
  else cache = { packs: new Map(), chainLengths: new Map() };
  caches.set(key, cache);
  while (caches.size > MAX_REPOSITORIES) {
    const oldest = caches.keys().next().value;
    if (oldest === undefined) break;
    caches.delete(oldest);
  }
  return cache;
}

/** The cached packs of the repository at `location` with id `repoId`, by pack id (created empty). */
export function packIndexCache(location: string, repoId: string): Map<string, CachedPack> {
  return repositoryCache(location, repoId).packs;
}

/** The length of the index chain ending at an index (1: a full index), when known. */
export function cachedChainLength(location: string, repoId: string, indexId: string): number | undefined {
  return repositoryCache(location, repoId).chainLengths.get(indexId);
}

export function rememberChainLength(location: string, repoId: string, indexId: string, length: number): void {
  const lengths = repositoryCache(location, repoId).chainLengths;
  if (lengths.size >= MAX_CHAIN_LENGTHS) lengths.clear();
  lengths.set(indexId, length);
}

/** Forgets everything cached (benchmarks measure the cost without it). */
export function clearPackIndexCache(): void {
  caches.clear();
}
