// The coverage rules (docs/design.md, "The coverage rules"), as a pure function of what the metadata and
// the images say. For disk d and checkpoint T, an incremental backup since T is
// allowed only when every rule holds; otherwise the answer is "full" with every
// reason that applies. Nothing here talks to QEMU, so the rules can be read
// (and tested) on their own. The answer must never be "incremental" when a
// write since T could be missing from the merged bitmaps.

import type { CheckpointDiskRow, CheckpointLink, CheckpointRow } from '../store/checkpoints.js';
import type { DiskEventRow } from '../store/domains.js';
import type { BitmapState } from './bitmaps.js';

export type CoverageReason = 'checkpoint-missing' | 'not-in-checkpoint' | 'detached-since' | 'bitmap-missing' | 'bitmap-inconsistent' | 'resized' | 'not-qcow2';

export interface CoverageProblem {
  code: CoverageReason;
  detail: string;
}

export interface DiskCoverage {
  target: string;
  diskId: string;
  mode: 'incremental' | 'full';
  reasons: CoverageProblem[];
  /** Bitmaps to merge, oldest first (T … current); empty when mode is full. */
  bitmaps: string[];
}

export interface ChainCheckpoint {
  /** Only the links (name, parent, current) are used; whole rows may be passed. */
  row: CheckpointLink & Partial<CheckpointRow>;
  disks: readonly CheckpointDiskRow[];
}

export interface CoverageDisk {
  target: string;
  diskId: string;
  format: string;
}

export interface CoverageInputs {
  /** T first, the current checkpoint last; undefined when no chain leads from T to the current checkpoint. */
  path: readonly ChainCheckpoint[] | undefined;
  disk: CoverageDisk;
  /** Journal events of this disk after T was taken. */
  eventsSinceT: readonly DiskEventRow[];
  /** Bitmaps on the disk's image now; undefined when they could not be read. */
  bitmaps: readonly BitmapState[] | undefined;
  /** Recorded losses of this disk, by checkpoint name. */
  losses: ReadonlyMap<string, { reason: string; detail: string }>;
}

/**
 * The checkpoints from `from` to the current one, following parent links up
 * from the current checkpoint; undefined when `from` is not on that path.
 */
export function chainFrom(checkpoints: readonly ChainCheckpoint[], from: string): ChainCheckpoint[] | undefined {
  const byName = new Map(checkpoints.map((c) => [c.row.name, c]));
  let at = checkpoints.find((c) => c.row.is_current === 1);
  const reversed: ChainCheckpoint[] = [];
  const seen = new Set<string>();
  while (at !== undefined && !seen.has(at.row.name)) {
    seen.add(at.row.name);
    reversed.push(at);
    if (at.row.name === from) return reversed.reverse();
    at = at.row.parent === null ? undefined : byName.get(at.row.parent);
  }
  return undefined;
}

export function computeCoverage(input: CoverageInputs): DiskCoverage {
  const { disk, path } = input;
  const reasons: CoverageProblem[] = [];
  const add = (code: CoverageReason, detail: string): void => {
    if (!reasons.some((r) => r.code === code)) reasons.push({ code, detail });
  };
  if (path === undefined || path.length === 0) {
    add('checkpoint-missing', 'the checkpoint is not an ancestor of the current checkpoint');
    return { target: disk.target, diskId: disk.diskId, mode: 'full', reasons, bitmaps: [] };
  }
  if (disk.format !== 'qcow2') add('not-qcow2', `the image is ${disk.format}; bitmaps need qcow2`);

  const names: string[] = [];
  for (const cp of path) {
    const entry = cp.disks.find((d) => d.disk_id === disk.diskId);
    if (entry === undefined) {
      add('not-in-checkpoint', `the disk was not part of checkpoint "${cp.row.name}"`);
    } else if (entry.mode !== 'bitmap' || entry.bitmap === null) {
      add('not-in-checkpoint', `checkpoint "${cp.row.name}" has no bitmap for the disk`);
    } else {
      names.push(entry.bitmap);
    }
  }

  const detach = input.eventsSinceT.find((e) => e.event === 'detach');
  if (detach !== undefined) {
    add('detached-since', `the disk was detached (as "${detach.target}") after checkpoint "${path[0]?.row.name ?? '?'}"`);
  }

  if (!reasons.some((r) => r.code === 'not-in-checkpoint' || r.code === 'not-qcow2')) {
    for (const cp of path) {
      const loss = input.losses.get(cp.row.name);
      if (loss !== undefined) add(lossCode(loss.reason), loss.detail);
    }
    const current = path[path.length - 1];
    // By name, first wins (as find() would): a long chain must not make this quadratic.
    const byName = new Map<string, BitmapState>();
    for (const b of input.bitmaps ?? []) if (!byName.has(b.name)) byName.set(b.name, b);
    for (const [i, cp] of path.entries()) {
      const name = names[i];
      if (name === undefined) continue;
      const state = byName.get(name);
      if (state === undefined) {
        add('bitmap-missing', `bitmap "${name}" of checkpoint "${cp.row.name}" is not on the image`);
      } else if (state.inconsistent) {
        add('bitmap-inconsistent', `bitmap "${name}" of checkpoint "${cp.row.name}" is inconsistent (QEMU did not store it cleanly)`);
      } else if (!state.persistent) {
        add('bitmap-inconsistent', `bitmap "${name}" of checkpoint "${cp.row.name}" is not persistent`);
      } else if (cp === current && !state.recording) {
        add('bitmap-inconsistent', `bitmap "${name}" of the current checkpoint "${cp.row.name}" is not recording`);
      } else if (cp !== current && state.recording) {
        add('bitmap-inconsistent', `bitmap "${name}" of checkpoint "${cp.row.name}" is still recording but is not the newest`);
      }
    }
  }
  const mode = reasons.length === 0 ? 'incremental' : 'full';
  return { target: disk.target, diskId: disk.diskId, mode, reasons, bitmaps: mode === 'incremental' ? names : [] };
}

/** The coverage reason a recorded loss stands for. */
function lossCode(reason: string): CoverageReason {
  return reason === 'bitmap-inconsistent' || reason === 'resized' ? reason : 'bitmap-missing';
}
