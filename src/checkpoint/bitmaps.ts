// Reading and changing the persistent dirty bitmaps of a domain's disks, the
// same way whether the domain runs (QMP, one transaction per change set, so no
// guest write falls between two steps) or is shut off (qemu-img bitmap on the
// image files; nothing else writes them while we hold the domain's lock).

import type { AttachedDisk } from '../domain/domains.js';
import { imageInfo } from '../image/qemu-img.js';
import { readBlockNodes, type BlockNode, type NodeBitmap } from '../qemu/block-nodes.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import { runTool } from '../image/tools.js';
import type { QmpClient, QmpTransactionAction } from '../qmp/index.js';
import { assert } from '../util/assert.js';

/** A bitmap as QEMU or qemu-img reports it; the dirty byte count is known only while the domain runs. */
export type BitmapState = Omit<NodeBitmap, 'count'> & { count?: number };

/** Bitmaps per disk id; a disk whose image could not be read is absent. */
export type DiskBitmaps = Map<string, BitmapState[]>;

export type BitmapAction =
  | { op: 'add'; diskId: string; bitmap: string; disabled?: boolean }
  | { op: 'disable'; diskId: string; bitmap: string }
  | { op: 'enable'; diskId: string; bitmap: string }
  | { op: 'merge'; diskId: string; target: string; sources: string[] }
  | { op: 'remove'; diskId: string; bitmap: string };

/** The bitmaps of each disk's format node, read from QEMU (or from its node graph just read, `nodes`). */
export async function readBitmapsOnline(qmp: QmpClient, disks: readonly AttachedDisk[], read?: ReadonlyMap<string, BlockNode> | undefined): Promise<DiskBitmaps> {
  const nodes = read ?? (await readBlockNodes(qmp));
  const out: DiskBitmaps = new Map();
  for (const d of disks) {
    const node = nodes.get(nodeNamesFor(d.diskId).format);
    if (node !== undefined) out.set(d.diskId, node.bitmaps.map((b) => ({ ...b })));
  }
  return out;
}

export async function readBitmapsOffline(disks: readonly AttachedDisk[]): Promise<DiskBitmaps> {
  const out: DiskBitmaps = new Map();
  for (const d of disks) {
    if (d.format !== 'qcow2') {
      out.set(d.diskId, []);
      continue;
    }
    try {
      const info = await imageInfo(d.source, d.format, { shared: true });
      out.set(
        d.diskId,
        info.bitmaps.map((b) => ({
          name: b.name,
          recording: b.flags.includes('auto'),
          persistent: true,
          inconsistent: b.flags.includes('in-use'),
          busy: false,
          granularity: b.granularity,
        })),
      );
    } catch {
      // Dropped on purpose: the disk is left out of the map, which is how an
      // unreadable image is reported (coverage: every bitmap missing; a delete
      // refuses to go on rather than skip the merge).
    }
  }
  return out;
}

export function toTransaction(actions: readonly BitmapAction[]): QmpTransactionAction[] {
  return actions.map((a) => {
    const node = nodeNamesFor(a.diskId).format;
    switch (a.op) {
      case 'add':
        return { type: 'block-dirty-bitmap-add', data: { node, name: a.bitmap, persistent: true, ...(a.disabled ? { disabled: true } : {}) } };
      case 'disable':
        return { type: 'block-dirty-bitmap-disable', data: { node, name: a.bitmap } };
      case 'enable':
        return { type: 'block-dirty-bitmap-enable', data: { node, name: a.bitmap } };
      case 'merge':
        return { type: 'block-dirty-bitmap-merge', data: { node, target: a.target, bitmaps: a.sources } };
      case 'remove':
        return { type: 'block-dirty-bitmap-remove', data: { node, name: a.bitmap } };
    }
  });
}

/** Applies actions to shut-off images, in order, one qemu-img call each. */
export async function applyOffline(actions: readonly BitmapAction[], disks: readonly AttachedDisk[]): Promise<void> {
  for (const a of actions) {
    const disk = disks.find((d) => d.diskId === a.diskId);
    // Plans are built from the attached disks (or from bitmaps read on them).
    assert(disk !== undefined, `bitmap action on disk id "${a.diskId}", which is not attached`);
    const args = ['bitmap'];
    let bitmap: string;
    switch (a.op) {
      case 'add':
        args.push('--add');
        if (a.disabled) args.push('--disable');
        bitmap = a.bitmap;
        break;
      case 'disable':
        args.push('--disable');
        bitmap = a.bitmap;
        break;
      case 'enable':
        args.push('--enable');
        bitmap = a.bitmap;
        break;
      case 'merge':
        for (const s of a.sources) args.push('--merge', s);
        bitmap = a.target;
        break;
      case 'remove':
        args.push('--remove');
        bitmap = a.bitmap;
        break;
    }
    // "--" ends the options: a valid bitmap name may start with "-" (e.g. "-z").
    args.push('-f', disk.format, '--', disk.source, bitmap);
    await runTool('qemu-img', args, { what: `Changing bitmap "${bitmap}" of disk "${disk.target}" (${disk.source})` });
  }
}

/** Applies a change set: one QMP transaction when running, else qemu-img steps. */
export async function applyBitmapActions(qmp: QmpClient | undefined, actions: readonly BitmapAction[], disks: readonly AttachedDisk[]): Promise<void> {
  if (actions.length === 0) return;
  if (qmp !== undefined) await qmp.transaction(toTransaction(actions));
  else await applyOffline(actions, disks);
}

/**
 * The two transaction actions that build a temporary, non-persistent, disabled
 * bitmap `name` on a disk holding the merge of `sources` (a chain's bitmaps).
 * Backups add them to the transaction that starts the job; checkpoint sizes
 * run them on their own.
 */
export function mergedBitmapActions(diskId: string, name: string, sources: readonly string[]): QmpTransactionAction[] {
  const node = nodeNamesFor(diskId).format;
  return [
    { type: 'block-dirty-bitmap-add', data: { node, name, persistent: false, disabled: true } },
    { type: 'block-dirty-bitmap-merge', data: { node, target: name, bitmaps: [...sources] } },
  ];
}
