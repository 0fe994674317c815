// Redefine (SPEC §4): importing a checkpoint's metadata, how a management
// application restores qbackup's metadata after losing it. The checks and the
// rows to write are pure functions of the spec and what was read; applyRedefine
// writes them (inside the caller's transaction).
//
// Invariants:
// - A redefined checkpoint has a name and a creation time, its parent exists,
//   and it makes no parent cycle.
// - An existing checkpoint may only get a new description and saved domain
//   definition: a new parent or other disks/bitmaps would make the chain claim
//   spans no bitmap covers. Its recorded losses stay.
// - A new checkpoint becomes current only when there is none, or when its
//   parent is the current one (it continues the chain).

import { QbackupError } from '../errors.js';
import type { CheckpointDiskRow, CheckpointLink, CheckpointRow, CheckpointStore } from '../store/checkpoints.js';
import type { BitmapState } from './bitmaps.js';
import { assertNotTemporary, type CheckpointDiskSpec, type CheckpointSpec } from './spec.js';
import { childrenIndex, preOrder } from './tree.js';

/** A redefine request that passed the checks of its name, time and parent. */
export interface RedefineTarget {
  domain: string;
  name: string;
  creationTime: number;
  parent: string | null;
  /** The checkpoint of that name, when it exists already. */
  existing: CheckpointLink | undefined;
  /** The start of every error message about this request. */
  what: string;
}

/** What is read just before writing (inside the transaction that writes). */
export interface RedefineState {
  /** The existing checkpoint's disk rows; empty for a new one. */
  existingDisks: readonly CheckpointDiskRow[];
  current: Pick<CheckpointLink, 'name'> | undefined;
  /** Disk journal head at the creation time: detaches after it break coverage from the checkpoint. */
  journalSeq: number;
  nextCreatedSeq: number;
}

export type RedefinePlan =
  | { op: 'update'; row: CheckpointRow }
  | { op: 'insert'; row: CheckpointRow; disks: CheckpointDiskRow[] };

/** Checks name, creation time and parent (exists, no cycle) against the domain's checkpoints. */
export function checkRedefine(domain: string, spec: CheckpointSpec, checkpoints: readonly CheckpointLink[]): RedefineTarget {
  const what = `Cannot redefine checkpoint ${spec.name !== undefined ? `"${spec.name}"` : ''} of domain "${domain}"`.replace('  ', ' ');
  if (spec.name === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: the XML has no <name>`);
  if (spec.creationTime === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: the XML has no <creationTime>`);
  const name = spec.name;
  assertNotTemporary(name);
  const existing = checkpoints.find((c) => c.name === name);
  const parent = spec.parent ?? null;
  if (parent !== null) {
    if (!checkpoints.some((c) => c.name === parent)) {
      throw new QbackupError('CHECKPOINT_NOT_FOUND', `${what}: its parent "${parent}" does not exist`);
    }
    if (parent === name || (existing !== undefined && preOrder(childrenIndex(checkpoints), name).includes(parent))) {
      throw new QbackupError('CHECKPOINT_INVALID', `${what}: parent "${parent}" would make a cycle`);
    }
  }
  return { domain, name, creationTime: spec.creationTime, parent, existing, what };
}

/**
 * The checkpoint's disk rows: the spec's disks or, without any, every disk of
 * the saved definition (writable qcow2 ones with a bitmap). `diskIds` maps the
 * definition's targets to their disk ids (null when the image is not known).
 */
export function redefineDiskRows(
  target: Pick<RedefineTarget, 'domain' | 'name'>,
  specDisks: readonly CheckpointDiskSpec[] | undefined,
  defDisks: readonly { target: string; format: string; readonly: boolean }[],
  diskIds: ReadonlyMap<string, string | null>,
): CheckpointDiskRow[] {
  const diskSpecs: readonly CheckpointDiskSpec[] =
    specDisks ?? defDisks.map((d) => ({ name: d.target, checkpoint: d.format === 'qcow2' && !d.readonly ? 'bitmap' : 'no' }));
  return diskSpecs.map((d) => ({
    domain: target.domain,
    checkpoint: target.name,
    target: d.name,
    disk_id: diskIds.get(d.name) ?? null,
    mode: d.checkpoint,
    bitmap: d.checkpoint === 'bitmap' ? (d.bitmap ?? target.name) : null,
  }));
}

/** --redefine-validate: every bitmap the rows name is on an attached disk, consistent and persistent. */
export function checkRedefineBitmaps(
  what: string,
  rows: readonly CheckpointDiskRow[],
  attached: readonly { diskId: string }[],
  bitmaps: ReadonlyMap<string, readonly BitmapState[]>,
): void {
  for (const r of rows) {
    if (r.mode !== 'bitmap') continue;
    const disk = attached.find((d) => d.diskId === r.disk_id);
    if (disk === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: disk "${r.target}" is not attached to the domain`);
    const st = (bitmaps.get(disk.diskId) ?? []).find((b) => b.name === r.bitmap);
    if (st === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: disk "${r.target}" has no bitmap "${r.bitmap ?? ''}"`);
    if (st.inconsistent || !st.persistent) {
      throw new QbackupError('CHECKPOINT_INVALID', `${what}: bitmap "${r.bitmap ?? ''}" of disk "${r.target}" is not usable (inconsistent or not persistent)`);
    }
  }
}

/** The row to write; for an existing checkpoint, refuses any change but description and definition. */
export function planRedefine(
  target: RedefineTarget,
  fields: { description: string | null; domainXml: string },
  disks: readonly CheckpointDiskRow[],
  state: RedefineState,
): RedefinePlan {
  const { existing, parent } = target;
  const becomesCurrent = existing !== undefined ? existing.is_current === 1 : state.current === undefined || state.current.name === parent;
  const row: CheckpointRow = {
    domain: target.domain,
    name: target.name,
    parent,
    description: fields.description,
    creation_time: target.creationTime,
    domain_xml: fields.domainXml,
    journal_seq: state.journalSeq,
    is_current: becomesCurrent ? 1 : 0,
    created_seq: existing?.created_seq ?? state.nextCreatedSeq,
  };
  if (existing === undefined) return { op: 'insert', row, disks: [...disks] };
  const old = state.existingDisks;
  const same =
    existing.parent === parent &&
    old.length === disks.length &&
    disks.every((r) => old.some((o) => o.target === r.target && o.mode === r.mode && o.bitmap === r.bitmap && o.disk_id === r.disk_id));
  if (!same) {
    throw new QbackupError('CHECKPOINT_INVALID', `${target.what}: it exists with another parent or other disks; delete it first to define it anew`);
  }
  return { op: 'update', row };
}

/** Writes a redefine plan; call inside a store transaction. */
export function applyRedefine(store: CheckpointStore, plan: RedefinePlan): void {
  const { row } = plan;
  if (plan.op === 'update') {
    store.updateDescription(row.domain, row.name, row.description, row.domain_xml);
    return;
  }
  if (row.is_current === 1) store.setCurrent(row.domain, null);
  store.insert(row, plan.disks);
}
