// The intent journal of checkpoint changes (SPEC §2: "a journal, reconciled on
// the next open"). A create or delete writes its intent first, then changes the
// bitmaps, then commits metadata and clears the intent in one transaction. This
// module holds the intents, the pure planners of what each step does, the
// recovery planner (given a leftover intent and the bitmaps really on the
// images: finish it or roll it back), and the journal that commits outcomes.
//
// Invariants:
// - At most one intent per domain; it is cleared only in the transaction that
//   records the outcome (commit) or after the bitmaps were put back (rollback).
// - A create is finished only when every bitmap it adds exists (online, QEMU's
//   transaction is all or nothing; offline, adds run before disables), else it
//   is rolled back: added bitmaps removed, disabled ones re-enabled.
// - A delete is always finished, and only from bitmaps that could be read: a
//   disk whose bitmaps cannot be read must not pass for one without bitmaps, or
//   the merge would be skipped while the metadata says it happened.
// - Deleting a checkpoint never hides a gap: where the parent has a bitmap and
//   the deleted checkpoint had none (or had lost it), the parent gets the loss.

import { QbackupError } from '../errors.js';
import type { CheckpointDiskRow, CheckpointRow, CheckpointStore, CoverageLossRow, PendingOperation } from '../store/checkpoints.js';
import { assert } from '../util/assert.js';
import type { BitmapAction, BitmapState } from './bitmaps.js';

type Bitmaps = ReadonlyMap<string, readonly BitmapState[]>;

/** A checkpoint about to be created: its rows, and the bitmaps it adds and disables. */
export interface CreateIntent {
  row: CheckpointRow;
  disks: CheckpointDiskRow[];
  adds: Array<{ diskId: string; bitmap: string }>;
  disables: Array<{ diskId: string; bitmap: string }>;
}

/** A checkpoint about to be deleted, with each attached disk's bitmap and its parent's. */
export interface DeleteIntent {
  name: string;
  parent: string | null;
  wasCurrent: boolean;
  disks: Array<{ diskId: string; bitmap: string; parentBitmap: string | null }>;
}

/** A loss to record on the parent of a deleted checkpoint (the reason may be carried over from a recorded loss). */
export interface ParentGap {
  diskId: string;
  checkpoint: string;
  reason: string;
  detail: string;
}

export type PendingIntent = { kind: 'checkpoint-create'; intent: CreateIntent } | { kind: 'checkpoint-delete'; intent: DeleteIntent };

export type RecoveryPlan =
  /** Every new bitmap exists: apply the pending disables, then commit. */
  | { outcome: 'finish-create'; intent: CreateIntent; actions: BitmapAction[] }
  /** Not every new bitmap exists: undo what was done, then clear the intent. */
  | { outcome: 'rollback-create'; intent: CreateIntent; actions: BitmapAction[] }
  /** Merge and remove what is still on the images, then commit. */
  | { outcome: 'finish-delete'; intent: DeleteIntent; actions: BitmapAction[] }
  /** A disk's bitmaps cannot be read: nothing may be done until they can. */
  | { outcome: 'unreadable'; intent: DeleteIntent; diskId: string; actions: [] };

// ---- planning (pure) ---------------------------------------------------------

/** The bitmap actions of a planned checkpoint: adds, then disables (the order offline recovery relies on). */
export function createActions(plan: CreateIntent): BitmapAction[] {
  return [
    ...plan.adds.map((a): BitmapAction => ({ op: 'add', diskId: a.diskId, bitmap: a.bitmap })),
    ...plan.disables.map((a): BitmapAction => ({ op: 'disable', diskId: a.diskId, bitmap: a.bitmap })),
  ];
}

/** Undoes whatever part of a create reached the images: removes added bitmaps, re-enables disabled ones. */
export function createRollbackActions(plan: CreateIntent, bitmaps: Bitmaps): BitmapAction[] {
  const actions: BitmapAction[] = [];
  for (const a of plan.adds) {
    if (findBitmap(bitmaps, a.diskId, a.bitmap) !== undefined) actions.push({ op: 'remove', diskId: a.diskId, bitmap: a.bitmap });
  }
  for (const a of plan.disables) {
    const st = findBitmap(bitmaps, a.diskId, a.bitmap);
    if (st !== undefined && !st.recording && !st.inconsistent) actions.push({ op: 'enable', diskId: a.diskId, bitmap: a.bitmap });
  }
  return actions;
}

/**
 * Undoes a create that QEMU applied and whose new bitmaps may already hold
 * writes (the guest ran on): on each disk the new bitmap is merged into the
 * bitmap it disabled, which records again, and the new one goes. One
 * transaction, so no write falls between the steps and none is lost: the
 * chain is as if the checkpoint had never been made.
 */
export function createUndoActions(plan: CreateIntent): BitmapAction[] {
  const actions: BitmapAction[] = [];
  for (const a of plan.adds) {
    for (const d of plan.disables) {
      if (d.diskId === a.diskId) actions.push({ op: 'merge', diskId: a.diskId, target: d.bitmap, sources: [a.bitmap] });
    }
    actions.push({ op: 'remove', diskId: a.diskId, bitmap: a.bitmap });
  }
  for (const d of plan.disables) actions.push({ op: 'enable', diskId: d.diskId, bitmap: d.bitmap });
  return actions;
}

/**
 * The intent of deleting `cp`: for each attached disk with a bitmap in it, that
 * bitmap and the parent's bitmap on the same disk. A detached disk is left out:
 * its bitmaps stay in its image, unused.
 */
export function planDelete(
  cp: Pick<CheckpointRow, 'name' | 'parent' | 'is_current'>,
  own: readonly CheckpointDiskRow[],
  parentDisks: readonly CheckpointDiskRow[],
  attached: readonly { diskId: string }[],
): DeleteIntent {
  const intent: DeleteIntent = { name: cp.name, parent: cp.parent, wasCurrent: cp.is_current === 1, disks: [] };
  for (const d of own) {
    if (d.mode !== 'bitmap' || d.bitmap === null || d.disk_id === null) continue;
    if (!attached.some((x) => x.diskId === d.disk_id)) continue;
    const pd = parentDisks.find((p) => p.disk_id === d.disk_id && p.mode === 'bitmap');
    intent.disks.push({ diskId: d.disk_id, bitmap: d.bitmap, parentBitmap: pd?.bitmap ?? null });
  }
  return intent;
}

/** Bitmap steps of a deletion, limited to what still needs doing on the images. */
export function deleteActions(intent: DeleteIntent, bitmaps: Bitmaps): BitmapAction[] {
  const actions: BitmapAction[] = [];
  for (const d of intent.disks) {
    const own = findBitmap(bitmaps, d.diskId, d.bitmap);
    const parent = d.parentBitmap === null ? undefined : findBitmap(bitmaps, d.diskId, d.parentBitmap);
    const parentUsable = parent !== undefined && !parent.inconsistent;
    if (own !== undefined) {
      if (parentUsable && !own.inconsistent) actions.push({ op: 'merge', diskId: d.diskId, target: parent.name, sources: [own.name] });
      actions.push({ op: 'remove', diskId: d.diskId, bitmap: own.name });
    }
    if (intent.wasCurrent && parentUsable && !parent.recording) actions.push({ op: 'enable', diskId: d.diskId, bitmap: parent.name });
  }
  return actions;
}

/** The first disk of the intent whose bitmaps could not be read, if any. */
export function unreadableDisk(intent: DeleteIntent, bitmaps: Bitmaps): string | undefined {
  return intent.disks.find((d) => !bitmaps.has(d.diskId))?.diskId;
}

/**
 * Losses the parent inherits when `name` is deleted. Coverage from the parent
 * runs through the deleted checkpoint's bitmap: on a disk where the parent has
 * a bitmap but `name` has none (checkpoint='no', or not part of it) or had
 * lost it (a recorded loss), no bitmap holds the writes of that span.
 */
export function parentGaps(
  name: string,
  parent: string,
  own: readonly CheckpointDiskRow[],
  parentDisks: readonly CheckpointDiskRow[],
  ownLosses: readonly Pick<CoverageLossRow, 'disk_id' | 'reason' | 'detail'>[],
): ParentGap[] {
  const out: ParentGap[] = [];
  for (const p of parentDisks) {
    if (p.mode !== 'bitmap' || p.disk_id === null) continue;
    const mine = own.find((d) => d.disk_id === p.disk_id);
    const loss = ownLosses.find((l) => l.disk_id === p.disk_id);
    if (mine === undefined || mine.mode !== 'bitmap' || mine.bitmap === null) {
      out.push({ diskId: p.disk_id, checkpoint: parent, reason: 'bitmap-missing', detail: `deleted checkpoint "${name}" had no bitmap for disk "${p.target}", so writes after it are not tracked from "${parent}"` });
    } else if (loss !== undefined) {
      out.push({ diskId: p.disk_id, checkpoint: parent, reason: loss.reason, detail: `deleted checkpoint "${name}": ${loss.detail}` });
    }
  }
  return out;
}

/** What to do with an intent a killed qbackup left behind, given the bitmaps on the images now. */
export function planRecovery(pending: PendingIntent, bitmaps: Bitmaps): RecoveryPlan {
  if (pending.kind === 'checkpoint-delete') {
    const intent = pending.intent;
    const diskId = unreadableDisk(intent, bitmaps);
    if (diskId !== undefined) return { outcome: 'unreadable', intent, diskId, actions: [] };
    return { outcome: 'finish-delete', intent, actions: deleteActions(intent, bitmaps) };
  }
  const plan = pending.intent;
  const present = plan.adds.filter((a) => findBitmap(bitmaps, a.diskId, a.bitmap) !== undefined);
  const disabled = plan.disables.filter((a) => findBitmap(bitmaps, a.diskId, a.bitmap, (b) => !b.recording) !== undefined);
  // The online transaction is all or nothing; offline, adds come before disables.
  const happened = plan.adds.length > 0 ? present.length === plan.adds.length : plan.disables.length > 0 && disabled.length === plan.disables.length;
  if (!happened) return { outcome: 'rollback-create', intent: plan, actions: createRollbackActions(plan, bitmaps) };
  // The change happened; finish it (offline, the disables may be pending).
  const pendingDisables = plan.disables.filter((a) => findBitmap(bitmaps, a.diskId, a.bitmap)?.recording === true);
  return { outcome: 'finish-create', intent: plan, actions: pendingDisables.map((a): BitmapAction => ({ op: 'disable', ...a })) };
}

/**
 * The intent in a journal row; undefined for another subsystem's operation
 * (not ours to finish). A payload of the wrong shape is METADATA_INCONSISTENT.
 */
export function readIntent(op: PendingOperation): PendingIntent | undefined {
  if (op.kind !== 'checkpoint-create' && op.kind !== 'checkpoint-delete') return undefined;
  const p = op.payload;
  const ok =
    typeof p === 'object' && p !== null &&
    (op.kind === 'checkpoint-create'
      ? isRecord(get(p, 'row')) && Array.isArray(get(p, 'disks')) && Array.isArray(get(p, 'adds')) && Array.isArray(get(p, 'disables'))
      : typeof get(p, 'name') === 'string' && typeof get(p, 'wasCurrent') === 'boolean' && Array.isArray(get(p, 'disks')));
  if (!ok) {
    throw new QbackupError('METADATA_INCONSISTENT', `Cannot recover the interrupted ${op.kind} of domain "${op.domain}": its journal entry is malformed`);
  }
  // Shape checked above; the fields inside were written by this module.
  return op.kind === 'checkpoint-create' ? { kind: op.kind, intent: p as CreateIntent } : { kind: op.kind, intent: p as DeleteIntent };
}

function isRecord(v: unknown): v is object {
  return typeof v === 'object' && v !== null;
}

function get(o: object, key: string): unknown {
  return (o as Record<string, unknown>)[key];
}

function findBitmap(bitmaps: Bitmaps, diskId: string, name: string, also: (b: BitmapState) => boolean = () => true): BitmapState | undefined {
  return (bitmaps.get(diskId) ?? []).find((b) => b.name === name && also(b));
}

// ---- the journal (executes outcomes in the metadata) --------------------------

/** Writes intents and commits or clears them, each in one store transaction. */
export class IntentJournal {
  constructor(private readonly store: CheckpointStore) {}

  /** The leftover intent of the domain's checkpoint subsystem, if any. */
  pending(domain: string): PendingIntent | undefined {
    const op = this.store.getOperation(domain);
    return op === undefined ? undefined : readIntent(op);
  }

  begin(domain: string, pending: PendingIntent): void {
    this.store.transaction(() => this.store.beginOperation(domain, pending.kind, pending.intent));
  }

  /** Records a checkpoint whose bitmaps are in place, and clears the intent. */
  commitCreate(plan: CreateIntent): void {
    assert(
      plan.disks.every((d) => d.domain === plan.row.domain && d.checkpoint === plan.row.name),
      `the disk rows of checkpoint "${plan.row.name}" belong to it`,
    );
    this.store.transaction(() => {
      this.store.setCurrent(plan.row.domain, null);
      this.store.insert(plan.row, plan.disks);
      this.store.endOperation(plan.row.domain);
    });
  }

  /** Removes a deleted checkpoint's metadata (its gaps go to the parent), and clears the intent. */
  commitDelete(domain: string, intent: DeleteIntent): void {
    this.store.transaction(() => {
      if (intent.parent !== null) {
        // Inside the commit, before the checkpoint's own losses are removed with it.
        const own = this.store.disks(domain, intent.name);
        const losses = this.store.losses(domain).filter((l) => l.checkpoint === intent.name);
        for (const g of parentGaps(intent.name, intent.parent, own, this.store.disks(domain, intent.parent), losses)) {
          this.store.recordLoss(domain, g.diskId, g.checkpoint, g.reason, g.detail);
        }
      }
      this.store.reparentChildren(domain, intent.name, intent.parent);
      this.store.remove(domain, intent.name);
      if (intent.wasCurrent) this.store.setCurrent(domain, intent.parent);
      this.store.endOperation(domain);
    });
  }

  /** Clears an intent whose changes were undone. */
  abandon(domain: string): void {
    this.store.transaction(() => this.store.endOperation(domain));
  }

  /** Records the outcome of a recovery whose bitmap actions were applied. */
  settle(domain: string, plan: RecoveryPlan): void {
    switch (plan.outcome) {
      case 'finish-create':
        return this.commitCreate(plan.intent);
      case 'rollback-create':
        return this.abandon(domain);
      case 'finish-delete':
        return this.commitDelete(domain, plan.intent);
      case 'unreadable':
        assert(false, 'an unreadable disk is reported before settling');
    }
  }
}
