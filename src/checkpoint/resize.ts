// Resizes lose coverage. QEMU 7.2 does not mark the area a disk grows into as
// dirty (and a shrink and a grow back leave the old bytes' clusters clean
// while the guest now reads zeroes), so after a resize no bitmap of the disk
// can be trusted for the span it covers. qbackup remembers the size each disk
// was last seen with; whenever it looks again (start, attach, before every
// checkpoint change, every coverage question, after every monitor command and
// blockresize) a different size records a loss, reason "resized", for every
// checkpoint with a bitmap on that disk. New checkpoints start clean.
//
// Limit: a shrink and a grow back to the same size between two looks made
// outside qbackup (another QMP client, or qemu-img on a shut-off image) is
// not seen; qbackup's own paths (monitor commands, blockresize) always look.

import type { AttachedDisk, DomainContext } from '../domain/domains.js';
import { imageInfo } from '../image/qemu-img.js';
import { readBlockNodes, type BlockNode } from '../qemu/block-nodes.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import type { QmpClient } from '../qmp/index.js';
import type { CheckpointDiskRow } from '../store/checkpoints.js';
import type { CoverageLoss } from './reconcile.js';

/**
 * Each disk's virtual size now: from QEMU when it runs (from its node graph
 * just read, `read`, if given), else from the image (an unreadable one is
 * left out).
 */
export async function readDiskSizes(ctx: DomainContext, qmp: QmpClient | undefined, read?: ReadonlyMap<string, BlockNode> | undefined): Promise<Map<string, number>> {
  const sizes = new Map<string, number>();
  if (qmp !== undefined) {
    const nodes = read ?? (await readBlockNodes(qmp));
    for (const d of ctx.disks) {
      const size = nodes.get(nodeNamesFor(d.diskId).format)?.virtualSize;
      if (size !== undefined && size > 0) sizes.set(d.diskId, size);
    }
    return sizes;
  }
  for (const d of ctx.disks) {
    const info = await imageInfo(d.source, d.format, { shared: true }).catch(() => undefined);
    if (info !== undefined) sizes.set(d.diskId, info.virtualSize);
  }
  return sizes;
}

export interface ResizePlan {
  losses: CoverageLoss[];
  /** Sizes to remember, by disk id. */
  seen: Map<string, number>;
}

/** Which disks changed size since they were last seen, and the coverage that costs. */
export function planResizes(disks: readonly AttachedDisk[], before: ReadonlyMap<string, number>, now: ReadonlyMap<string, number>, checkpointDisks: readonly CheckpointDiskRow[]): ResizePlan {
  const plan: ResizePlan = { losses: [], seen: new Map() };
  for (const d of disks) {
    const size = now.get(d.diskId);
    if (size === undefined) continue;
    const old = before.get(d.diskId);
    if (old === size) continue;
    plan.seen.set(d.diskId, size);
    if (old === undefined) continue; // first look
    for (const row of checkpointDisks) {
      if (row.disk_id !== d.diskId || row.mode !== 'bitmap') continue;
      plan.losses.push({ diskId: d.diskId, checkpoint: row.checkpoint, reason: 'resized', detail: `disk "${d.target}" was resized from ${old} to ${size} bytes after checkpoint "${row.checkpoint}"` });
    }
  }
  return plan;
}
