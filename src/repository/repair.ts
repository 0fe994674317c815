// Repairing what verify finds, plan then execute. What cannot be read is
// moved aside, never deleted: a damaged manifest goes to
// quarantine/<domain>/<object name> (its backup is lost to listing and
// restore, and said so); a pack without its index gets the index back from
// the copy in its trailer (nothing is lost). The plan is shown and confirmed
// before anything changes; it runs under the gc lock, so no gc or prune runs
// at the same time and backups wait.

import type { Backend } from './backend/backend.js';
import { acquireLock } from './locks.js';
import { PACK_ID, packIndexKey, packKey, parseHeader } from './pack.js';
import type { DamagedManifest, Store } from './store.js';
import { QbackupError } from '../errors.js';

export interface RepairPlan {
  /** Manifests that cannot be read: moved to quarantine/. Their backups are lost. */
  quarantine: DamagedManifest[];
  /** Packs without an index whose trailer reads: the index is written again. */
  rebuildIndexes: string[];
}

export interface RepairReport extends RepairPlan {
  /** The backups (domain/id) no longer listed after the repair. */
  lost: string[];
}

export function quarantineKey(d: DamagedManifest): string {
  return `quarantine/${d.domain}/${d.key.split('/').at(-1) ?? d.id}`;
}

export async function planRepair(store: Store): Promise<RepairPlan> {
  const { damaged } = await store.readableManifests();
  const indexed = new Set((await store.backend.list('index/')).map((o) => o.key.slice(6)));
  const rebuildIndexes: string[] = [];
  for (const { key, size } of await store.backend.list('data/')) {
    const packId = key.split('/').at(-1) ?? '';
    if (PACK_ID.test(packId) && !indexed.has(packId) && (await trailerHeader(store, packId, size)) !== undefined) rebuildIndexes.push(packId);
  }
  return { quarantine: damaged, rebuildIndexes };
}

export async function executeRepair(store: Store, plan: RepairPlan): Promise<RepairReport> {
  await using _lock = await acquireLock(store.backend, 'gc', null);
  for (const packId of plan.rebuildIndexes) {
    const size = (await store.backend.stat(packKey(packId)))?.size;
    const header = size === undefined ? undefined : await trailerHeader(store, packId, size);
    if (header !== undefined) await store.backend.putIfAbsent(packIndexKey(packId), header);
  }
  for (const d of plan.quarantine) await moveAside(store.backend, d.key, quarantineKey(d));
  return { ...plan, lost: plan.quarantine.map((d) => `${d.domain}/${d.id}`) };
}

/** Copies the object under `to` (kept if already there), then deletes it. */
async function moveAside(backend: Backend, from: string, to: string): Promise<void> {
  let data: Buffer;
  try {
    data = await backend.get(from);
  } catch (err) {
    if (err instanceof QbackupError && err.code === 'REPO_OBJECT_NOT_FOUND') return; // gone meanwhile
    throw err;
  }
  await backend.putIfAbsent(to, data);
  await backend.delete(from);
}

/** The header in a pack's trailer when it parses; undefined otherwise. */
export async function trailerHeader(store: Store, packId: string, size: number): Promise<Buffer | undefined> {
  if (size < 4) return undefined;
  try {
    const headerLength = (await store.backend.get(packKey(packId), { offset: size - 4, length: 4 })).readUInt32LE(0);
    if (headerLength > size - 4) return undefined;
    const header = await store.backend.get(packKey(packId), { offset: size - 4 - headerLength, length: headerLength });
    parseHeader(header, store.key, `Trailer of pack "${packId}"`, store.config.chunkSize, size - 4 - headerLength);
    return header;
  } catch (err) {
    if (err instanceof QbackupError && (err.code === 'REPO_DAMAGED' || err.code === 'REPO_OBJECT_NOT_FOUND')) return undefined;
    throw err;
  }
}
