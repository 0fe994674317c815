// The decision half of reconciling (SPEC §2, §3 rule 4): from the checkpoint
// rows and the bitmaps really on each attached disk, which bitmap changes bring
// the images back in line with the chain model and which coverage was lost.
// Pure; CheckpointService.reconcile reads, calls planReconcile, records the
// losses and applies the actions.
//
// Invariants of a plan, per qcow2 disk whose bitmaps could be read:
// - every checkpoint bitmap that is missing becomes a 'bitmap-missing' loss;
//   every inconsistent one a 'bitmap-inconsistent' loss and a removal;
// - leftover temporary bitmaps (TEMP_BITMAP_PREFIX, not busy) are removed;
// - at most one valid bitmap records: the current checkpoint's or, when that
//   one is gone, the nearest valid one on the current checkpoint's own path
//   (never a newer bitmap of another branch); if the current one had stopped
//   recording, the writes in between are a 'bitmap-inconsistent' loss;
// - actions come per disk in the order: temporary removals, removals of
//   inconsistent bitmaps (chain order), then enables/disables (chain order).
// An unreadable disk, or one that is not qcow2, is left alone: coverage reads
// the images again and reports it.

import type { CheckpointDiskRow, CheckpointLink } from '../store/checkpoints.js';
import type { BitmapAction, BitmapState } from './bitmaps.js';
import { TEMP_BITMAP_PREFIX } from './spec.js';
import { ancestry } from './tree.js';

export interface ReconcileDisk {
  target: string;
  diskId: string;
  format: string;
}

export interface ReconcileInputs {
  /** The domain's checkpoints in creation order. */
  checkpoints: readonly CheckpointLink[];
  /** The disk rows of every checkpoint of the domain. */
  checkpointDisks: readonly CheckpointDiskRow[];
  /** The attached disks. */
  disks: readonly ReconcileDisk[];
  /** The bitmaps read from each disk; a disk whose image could not be read is absent. */
  bitmaps: ReadonlyMap<string, readonly BitmapState[]>;
}

/** A span of writes no bitmap holds: coverage from `checkpoint` on `diskId` is gone. */
export interface CoverageLoss {
  diskId: string;
  checkpoint: string;
  reason: 'bitmap-missing' | 'bitmap-inconsistent' | 'resized';
  detail: string;
}

export interface ReconcilePlan {
  /** Bitmap changes, applied as one transaction (online) or in order (offline). */
  actions: BitmapAction[];
  /** Losses to record (the store keeps the first reason per disk and checkpoint). */
  losses: CoverageLoss[];
}

/** What to change and record so the images match the chain model again. */
export function planReconcile(input: ReconcileInputs): ReconcilePlan {
  const chain: ChainIndex = {
    checkpoints: input.checkpoints,
    current: input.checkpoints.find((c) => c.is_current === 1),
    byName: new Map(input.checkpoints.map((c) => [c.name, c])),
    entries: bitmapEntries(input.checkpointDisks),
  };
  const plan: ReconcilePlan = { actions: [], losses: [] };
  for (const d of input.disks) {
    const actual = input.bitmaps.get(d.diskId);
    if (actual === undefined || d.format !== 'qcow2') continue;
    planDisk(chain, d, actual, plan);
  }
  return plan;
}

interface ChainIndex {
  checkpoints: readonly CheckpointLink[];
  current: CheckpointLink | undefined;
  byName: ReadonlyMap<string, CheckpointLink>;
  /** The first 'bitmap' row of each checkpoint and disk, keyed by entryKey. */
  entries: ReadonlyMap<string, CheckpointDiskRow>;
}

interface ValidBitmap {
  cp: CheckpointLink;
  state: BitmapState;
}

function entryKey(checkpoint: string, diskId: string | null): string {
  return `${checkpoint}\0${diskId ?? ''}`;
}

/** Indexed once: with a long chain, scanning the rows per checkpoint would be quadratic. */
function bitmapEntries(rows: readonly CheckpointDiskRow[]): Map<string, CheckpointDiskRow> {
  const out = new Map<string, CheckpointDiskRow>();
  for (const x of rows) {
    const key = entryKey(x.checkpoint, x.disk_id);
    if (x.mode === 'bitmap' && !out.has(key)) out.set(key, x);
  }
  return out;
}

function planDisk(chain: ChainIndex, d: ReconcileDisk, actual: readonly BitmapState[], plan: ReconcilePlan): void {
  const actualByName = new Map<string, BitmapState>();
  for (const b of actual) {
    if (!actualByName.has(b.name)) actualByName.set(b.name, b);
    if (b.name.startsWith(TEMP_BITMAP_PREFIX) && !b.busy) plan.actions.push({ op: 'remove', diskId: d.diskId, bitmap: b.name });
  }
  const valid: ValidBitmap[] = [];
  for (const cp of chain.checkpoints) {
    const entry = chain.entries.get(entryKey(cp.name, d.diskId));
    if (entry === undefined || entry.bitmap === null) continue;
    const st = actualByName.get(entry.bitmap);
    if (st === undefined) {
      plan.losses.push({
        diskId: d.diskId,
        checkpoint: cp.name,
        reason: 'bitmap-missing',
        detail: `bitmap "${entry.bitmap}" of disk "${d.target}" disappeared (lost when QEMU stopped uncleanly, or removed outside qbackup)`,
      });
    } else if (st.inconsistent) {
      plan.losses.push({
        diskId: d.diskId,
        checkpoint: cp.name,
        reason: 'bitmap-inconsistent',
        detail: `bitmap "${entry.bitmap}" of disk "${d.target}" was inconsistent (QEMU did not store it cleanly) and was removed`,
      });
      plan.actions.push({ op: 'remove', diskId: d.diskId, bitmap: st.name });
    } else {
      valid.push({ cp, state: st });
    }
  }
  planRecording(chain, d, valid, plan);
}

/** Enables the recorder (see the module invariants) and disables every other valid bitmap. */
function planRecording(chain: ChainIndex, d: ReconcileDisk, valid: readonly ValidBitmap[], plan: ReconcilePlan): void {
  const { current } = chain;
  let recorder: ValidBitmap | undefined;
  if (current !== undefined && chain.entries.has(entryKey(current.name, d.diskId))) {
    const validByName = new Map(valid.map((v) => [v.cp.name, v]));
    for (const at of ancestry(chain.byName, current)) {
      recorder = validByName.get(at.name);
      if (recorder !== undefined) break;
    }
  }
  for (const v of valid) {
    const shouldRecord = v === recorder;
    if (v.state.recording === shouldRecord) continue;
    plan.actions.push({ op: shouldRecord ? 'enable' : 'disable', diskId: d.diskId, bitmap: v.state.name });
    if (shouldRecord && v.cp.name === current?.name) {
      // The current bitmap was not recording: writes since it stopped are in no bitmap.
      plan.losses.push({
        diskId: d.diskId,
        checkpoint: v.cp.name,
        reason: 'bitmap-inconsistent',
        detail: `bitmap "${v.state.name}" of disk "${d.target}" was found not recording and was re-enabled; writes in between were not tracked`,
      });
    }
  }
}
