// Folding disk index chains when prune removes backups: metadata work only,
// no chunk data is read or copied.
//
// A kept backup's index may be a delta whose chain runs through the index of
// a removed backup. Such a backup gets a new index — a delta on the index of
// its nearest kept ancestor holding every slot the folded links changed, or
// a full index when no kept ancestor remains or the chain would grow past
// MAX_CHAIN — and a new generation of its manifest naming it (manifest.ts).
// Afterwards every link of every kept chain is the own index of a kept
// backup, so gc (which marks whole chains) frees exactly the chunks and
// indexes only removed backups used.
//
// Crash safety: a new index is stored before the manifest generation that
// names it, and the replaced generation is deleted only after the new one is
// stored; nothing here deletes an index (only gc does, for indexes no
// manifest's chain reaches). So a kill at any point leaves every listed
// backup with a complete chain: the old one, or the folded one. A later
// prune (or gc) deletes a replaced generation left behind, and a later prune
// folds whatever is still unfolded.
//
// Plan, then execute: planFold is a pure function of the kept backups and the
// parent links of their chains; executeFold writes what it says.

import { QbackupError, describeError } from '../errors.js';
import { MAX_CHAIN, resolveChain, type DeltaIndex, type DiskIndex } from './disk-index.js';
import type { Manifest, ManifestDisk } from './manifest.js';
import type { Store } from './store.js';
import { throwIfCancelled } from '../util/operation.js';

/** One disk of one kept backup whose index is rewritten. */
export interface FoldStep {
  backup: string;
  target: string;
  /** The backup's index now. */
  index: string;
  /** The links the new index replaces, newest first: the backup's own index and the removed ones under it. */
  folded: string[];
  /** The kept backup (and disk) the new index is a delta on; null for a full index. */
  base: { backup: string; target: string } | null;
  kind: 'full' | 'delta';
}

export interface FoldInput {
  /** The backups that stay, oldest first. */
  kept: ReadonlyArray<{ id: string; disks: ReadonlyArray<{ target: string; index: string }> }>;
  /** For every index on the kept backups' chains: its parent (undefined for a full index). */
  parents: ReadonlyMap<string, string | undefined>;
}

const key = (backup: string, target: string): string => `${backup}/${target}`;

/** Which kept disks get a new index, on what, and which links it folds away. */
export function planFold(input: FoldInput, maxChain = MAX_CHAIN): FoldStep[] {
  const owner = new Map<string, { backup: string; target: string }>();
  for (const b of input.kept) for (const d of b.disks) if (!owner.has(d.index)) owner.set(d.index, { backup: b.id, target: d.target });
  /** Deltas under each kept disk's index once its step (if any) is done. */
  const depth = new Map<string, number>();
  const rewritten = new Set<string>();
  const steps: FoldStep[] = [];
  for (const b of input.kept) {
    for (const d of b.disks) {
      const folded = [d.index];
      let base: { backup: string; target: string } | null = null;
      let at = input.parents.get(d.index);
      while (at !== undefined) {
        const o = owner.get(at);
        if (o !== undefined) {
          base = o;
          break;
        }
        if (folded.length > maxChain * 4) throw new QbackupError('REPO_DAMAGED', `Disk index "${d.index}" is damaged: its chain does not end`);
        folded.push(at);
        at = input.parents.get(at);
      }
      const baseKey = base !== null ? key(base.backup, base.target) : undefined;
      const baseDepth = base === null ? -1 : depth.get(key(base.backup, base.target)) ?? chainDepth(input.parents, indexOf(input, base));
      const needed = folded.length > 1 || (baseKey !== undefined && rewritten.has(baseKey));
      if (!needed) {
        depth.set(key(b.id, d.target), input.parents.get(d.index) === undefined ? 0 : baseDepth + 1);
        continue;
      }
      const kind = base === null || baseDepth + 1 > maxChain ? 'full' : 'delta';
      steps.push({ backup: b.id, target: d.target, index: d.index, folded, base: kind === 'delta' ? base : null, kind });
      rewritten.add(key(b.id, d.target));
      depth.set(key(b.id, d.target), kind === 'full' ? 0 : baseDepth + 1);
    }
  }
  return steps;
}

function indexOf(input: FoldInput, at: { backup: string; target: string }): string {
  const b = input.kept.find((x) => x.id === at.backup);
  return b?.disks.find((x) => x.target === at.target)?.index ?? '';
}

function chainDepth(parents: ReadonlyMap<string, string | undefined>, index: string): number {
  let n = 0;
  for (let at = parents.get(index); at !== undefined; at = parents.get(at)) n++;
  return n;
}

/** The parent links of every index on the chains of `kept` (reads index objects, never chunk data). */
export async function readParents(store: Store, kept: readonly Manifest[]): Promise<Map<string, string | undefined>> {
  const parents = new Map<string, string | undefined>();
  for (const m of kept) {
    for (const d of m.disks) {
      let at: string | undefined = d.index;
      let n = 0;
      while (at !== undefined && !parents.has(at)) {
        if (++n > MAX_CHAIN * 4) throw new QbackupError('REPO_DAMAGED', `Disk index "${d.index}" of backup "${m.id}" is damaged: its chain does not end`);
        const index = await store.getIndex(at);
        const parent = index.kind === 'delta' ? index.parent : undefined;
        parents.set(at, parent);
        at = parent;
      }
    }
  }
  return parents;
}

/**
 * Carries out a fold plan, backup by backup (oldest first): new indexes, then
 * the backup's next manifest generation. Returns the kept manifests as they
 * now are.
 */
export async function executeFold(store: Store, kept: readonly Manifest[], steps: readonly FoldStep[], options: { signal?: AbortSignal | undefined; what?: string; onStep?: () => void } = {}): Promise<Manifest[]> {
  const current = new Map<string, string>();
  for (const m of kept) for (const d of m.disks) current.set(key(m.id, d.target), d.index);
  const out: Manifest[] = [];
  for (const m of kept) {
    const mine = steps.filter((s) => s.backup === m.id);
    if (mine.length === 0) {
      out.push(m);
      continue;
    }
    throwIfCancelled(options.signal, options.what ?? 'Fold');
    const disks: ManifestDisk[] = [];
    for (const d of m.disks) {
      const step = mine.find((s) => s.target === d.target);
      if (step === undefined) {
        disks.push(d);
        continue;
      }
      const index = await foldedIndex(store, step, current);
      const id = await store.putIndex(index).catch((err: unknown) => {
        throw new QbackupError(err instanceof QbackupError ? err.code : 'REPO_INVALID', `Cannot fold the index of disk "${d.target}" of backup "${m.id}" in repository "${store.location}": ${describeError(err)} (the backup stays as it was; free space with gc and prune again)`, { cause: err });
      });
      current.set(key(m.id, d.target), id);
      disks.push({ ...d, index: id });
      options.onStep?.();
    }
    out.push(await store.replaceManifest(m, disks));
  }
  return out;
}

/** The new index of one step: the folded deltas merged onto the base, or the whole chain resolved. */
async function foldedIndex(store: Store, step: FoldStep, current: ReadonlyMap<string, string>): Promise<DiskIndex> {
  if (step.kind === 'full' || step.base === null) return resolveChain(await store.indexChain(step.index), `Disk index "${step.index}"`);
  const parent = current.get(key(step.base.backup, step.base.target));
  if (parent === undefined) throw new QbackupError('REPO_DAMAGED', `Backup "${step.base.backup}" has no disk "${step.base.target}" to fold onto`);
  // Oldest link first, so a newer link's slot wins.
  const merged = new Map<number, Buffer>();
  let shape: DeltaIndex | undefined;
  for (const id of [...step.folded].reverse()) {
    const link = await store.getIndex(id);
    if (link.kind !== 'delta') throw new QbackupError('REPO_DAMAGED', `Disk index "${id}" is damaged: a full index in the middle of a delta chain`);
    if (shape !== undefined && (link.chunkSize !== shape.chunkSize || link.virtualSize !== shape.virtualSize)) {
      throw new QbackupError('REPO_DAMAGED', `Disk index "${step.index}" is damaged: its index chain changes the disk's size`);
    }
    shape = link;
    for (let i = 0; i < link.slots.length; i++) merged.set(link.slots[i] ?? 0, link.ids.subarray(i * 32, i * 32 + 32));
  }
  if (shape === undefined) throw new QbackupError('REPO_DAMAGED', `Disk index "${step.index}" has nothing to fold`);
  const slots = Uint32Array.from([...merged.keys()].sort((a, b) => a - b));
  const ids = Buffer.alloc(slots.length * 32);
  slots.forEach((slot, i) => merged.get(slot)?.copy(ids, i * 32));
  return { kind: 'delta', chunkSize: shape.chunkSize, virtualSize: shape.virtualSize, parent, slots, ids };
}
