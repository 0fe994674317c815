// Checkpoints: the chain model of docs/design.md. Each checkpoint has one bitmap per
// participating disk; only the current checkpoint's bitmap records. Creating
// adds the new bitmaps and disables the recording ones in one QMP transaction;
// deleting merges a checkpoint's bitmap into its parent's (re-enabling the
// parent when the current one goes) in one transaction.
//
// This service reads (metadata, the images' bitmaps), asks a pure planner what
// to do, applies the plan and records the outcome. The planners live beside it:
// tree.ts (walking the chain), reconcile.ts, recovery.ts (intents and their
// completion), redefine.ts, coverage.ts.
//
// Invariants:
// - Metadata never claims coverage the bitmaps do not give. Every change to
//   QEMU/images and metadata is written as an intent first (table operations),
//   then applied, then committed with the intent removed; the next command on
//   the domain finds a leftover intent and completes it (delete) or rolls it
//   back (create) from what the images really hold.
// - Coverage is computed from the images' real bitmap state every time it is
//   asked for, never from metadata alone.
// - Reconciling (at start, attach and before every checkpoint change) records
//   every bitmap that is missing or inconsistent as a coverage loss, removes
//   inconsistent ones, and leaves only the newest valid bitmap recording.
// - Other layers are reached through their services (DomainService), never
//   through their stores.

import { withQuiesce, type Consistency, type QuiesceMode } from '../domain/quiesce.js';
import { randomBytes } from 'node:crypto';
import { QbackupError } from '../errors.js';
import type { AttachedDisk, DomainContext, DomainService, UndefineOptions } from '../domain/domains.js';
import { parseDomainXml } from '../model/definition-xml.js';
import { readBlockNodes, type BlockNode } from '../qemu/block-nodes.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import { QmpCommandError, type QmpClient } from '../qmp/index.js';
import type { CheckpointDiskRow, CheckpointLink, CheckpointRow, CheckpointStore, CheckpointSummaryRow } from '../store/checkpoints.js';
import { assert } from '../util/assert.js';
import { noFaults, type Faults } from '../util/faults.js';
import { applyBitmapActions, mergedBitmapActions, readBitmapsOffline, readBitmapsOnline, type BitmapAction, type DiskBitmaps } from './bitmaps.js';
import { chainFrom, computeCoverage, type ChainCheckpoint, type DiskCoverage } from './coverage.js';
import { planResizes, readDiskSizes } from './resize.js';
import { planReconcile, type CoverageLoss } from './reconcile.js';
import { IntentJournal, createActions, createRollbackActions, createUndoActions, deleteActions, planDelete, planRecovery, unreadableDisk, type CreateIntent } from './recovery.js';
import { applyRedefine, checkRedefine, checkRedefineBitmaps, planRedefine, redefineDiskRows } from './redefine.js';
import { TEMP_BITMAP_PREFIX, assertCheckpointName, assertNotTemporary, type CheckpointDiskSpec, type CheckpointSpec } from './spec.js';
import { childrenIndex, countDescendants, descendantCounts, postOrder, topologicalOrder } from './tree.js';

export type { CreateIntent } from './recovery.js';
export { TEMP_BITMAP_PREFIX } from './spec.js';

export interface CheckpointInfo {
  name: string;
  domain: string;
  parent: string | null;
  description: string | null;
  creationTime: number;
  current: boolean;
  children: number;
  descendants: number;
  disks: Array<{ target: string; diskId: string | null; checkpoint: 'bitmap' | 'no'; bitmap: string | null }>;
  /** Set by create: 'filesystem' when the guest's filesystems were frozen for it (quiesce), else 'crash'. */
  consistency?: Consistency;
}

export interface CheckpointCreateOptions {
  /** Freeze the guest's filesystems through its agent around the checkpoint: required, or optional (crash-consistent without an agent). */
  quiesce?: QuiesceMode;
}

export interface CreateOptions {
  redefine?: boolean;
  redefineValidate?: boolean;
}

export interface DeleteOptions {
  children?: boolean;
  childrenOnly?: boolean;
  metadata?: boolean;
}

export interface ListFilters {
  roots?: boolean;
  leaves?: boolean;
  topological?: boolean;
}

/** Points where tests make qbackup die (SIGKILL) to prove crash safety. */
export type FaultPoint = 'checkpoint-create:after-intent' | 'checkpoint-create:after-qemu' | 'checkpoint-delete:after-intent' | 'checkpoint-delete:after-qemu';

/** Coverage paths up to this long are walked checkpoint by checkpoint (see chainCheckpoints). */
const SHORT_PATH = 16;

export class CheckpointService {
  private readonly journal: IntentJournal;

  constructor(
    readonly domains: DomainService,
    readonly store: CheckpointStore,
    private readonly options: { faults?: Faults | undefined } = {},
  ) {
    this.journal = new IntentJournal(store);
  }

  /** Undefining a domain with checkpoints needs the caller to say their metadata goes too. */
  assertUndefinable(ctx: DomainContext, options: UndefineOptions): void {
    if (this.store.links(ctx.row.name).length > 0 && !options.checkpointsMetadata) {
      throw new QbackupError(
        'CHECKPOINT_EXISTS',
        `Cannot undefine domain "${ctx.row.name}": it has checkpoints; pass --checkpoints-metadata to remove their metadata too (bitmaps stay in the images)`,
      );
    }
  }

  // ---- create ----------------------------------------------------------------

  /** Creates a checkpoint now (checkpoint-create). For an existing one from another system, see redefine. */
  async create(domain: string, spec: CheckpointSpec = {}, options: CheckpointCreateOptions = {}): Promise<CheckpointInfo> {
    if (spec.parent !== undefined || spec.creationTime !== undefined || spec.domainXml !== undefined) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot create checkpoint of domain "${domain}": a parent, a creation time and a domain definition are only accepted by redefine`);
    }
    return this.domains.withDomain(domain, 'checkpoint-create', async (ctx) => {
      this.domains.hooks.beforeConfigChange?.(ctx, 'checkpoint-create');
      return this.withOptionalQmp(ctx, 'checkpoint-create', async (qmp) => {
        const bitmaps = await this.reconcile(ctx, qmp);
        const plan = await this.planCreate(ctx, qmp, spec, bitmaps);
        const target = { domain, running: ctx.running, agentSocket: this.domains.guestAgentSocket(ctx.definition) };
        const { consistency } = await withQuiesce(target, options.quiesce, () => this.applyCreate(ctx, qmp, plan));
        return { ...this.info(domain, plan.row.name), consistency };
      });
    });
  }

  /**
   * Works out the new checkpoint's rows and the bitmap changes that make it,
   * without changing anything. Backups use it to create a checkpoint in the
   * same transaction as the job.
   */
  async planCreate(ctx: DomainContext, qmp: QmpClient | undefined, spec: CheckpointSpec, known?: DiskBitmaps): Promise<CreateIntent> {
    const domain = ctx.row.name;
    const name = spec.name ?? String(Math.floor(Date.now() / 1000));
    assertCheckpointName(name);
    assertNotTemporary(name);
    if (this.store.get(domain, name) !== undefined) {
      throw new QbackupError('CHECKPOINT_EXISTS', `Cannot create checkpoint "${name}" of domain "${domain}": a checkpoint with that name exists`);
    }
    const specs = diskSpecsByTarget(ctx, name, spec.disks ?? []);
    // `known`: the state reconcile just read (and left unchanged), so it need not be read twice.
    const bitmaps = known ?? (await this.readBitmaps(ctx, qmp));
    const current = this.store.current(domain);
    const { disks, adds } = createDiskRows(ctx, name, specs, bitmaps);
    // Only the (few) recording bitmaps are looked up, not every checkpoint's rows.
    const disables: CreateIntent['disables'] = [];
    for (const d of ctx.disks) {
      for (const b of bitmaps.get(d.diskId) ?? []) {
        if (b.recording && b.persistent && this.store.ownsBitmap(domain, d.diskId, b.name)) disables.push({ diskId: d.diskId, bitmap: b.name });
      }
    }
    const row: CheckpointRow = {
      domain,
      name,
      parent: current?.name ?? null,
      description: spec.description ?? null,
      creation_time: Math.floor(Date.now() / 1000),
      domain_xml: ctx.row.xml,
      journal_seq: this.domains.journalHead(),
      is_current: 1,
      created_seq: this.store.nextCreatedSeq(domain),
    };
    return { row, disks, adds, disables };
  }

  /** The bitmap actions of a planned checkpoint: adds, then disables (the order offline recovery relies on). */
  createActions(plan: CreateIntent): BitmapAction[] {
    return createActions(plan);
  }

  /** The bitmap actions that take back a planned checkpoint QEMU made, keeping every write since (see createUndoActions). */
  undoCreateActions(plan: CreateIntent): BitmapAction[] {
    return createUndoActions(plan);
  }

  private async applyCreate(ctx: DomainContext, qmp: QmpClient | undefined, plan: CreateIntent): Promise<void> {
    this.journal.begin(ctx.row.name, { kind: 'checkpoint-create', intent: plan });
    this.fault('checkpoint-create:after-intent');
    try {
      await applyBitmapActions(qmp, createActions(plan), ctx.disks);
    } catch (err) {
      // A transaction QEMU refused changed nothing, and offline steps are each done
      // or not: roll back now. Anything else (a timeout, a lost connection) may
      // still have been applied: the intent stays for the next command to settle.
      if (qmp === undefined || err instanceof QmpCommandError) {
        // Dropped on purpose: the create's error is the one to report, and a failed
        // rollback leaves the intent in the journal, which the next command settles.
        await this.rollbackCreate(ctx, qmp, plan).catch(() => undefined);
      }
      throw err;
    }
    this.fault('checkpoint-create:after-qemu');
    this.commitCreate(plan);
  }

  /** Records a checkpoint whose bitmaps are in place, and clears the intent. */
  commitCreate(plan: CreateIntent): void {
    this.journal.commitCreate(plan);
  }

  private async rollbackCreate(ctx: DomainContext, qmp: QmpClient | undefined, plan: CreateIntent): Promise<void> {
    const bitmaps = await this.readBitmaps(ctx, qmp);
    await applyBitmapActions(qmp, createRollbackActions(plan, bitmaps), ctx.disks);
    this.journal.abandon(ctx.row.name);
  }

  // ---- redefine --------------------------------------------------------------

  /**
   * Imports a checkpoint's metadata (checkpoint-create --redefine): how a
   * management application restores qbackup's metadata after losing it.
   * `validate` also checks that the bitmaps exist and are usable.
   */
  async redefine(domain: string, spec: CheckpointSpec, options: { validate?: boolean } = {}): Promise<CheckpointInfo> {
    const validate = options.validate ?? false;
    return this.domains.withDomain(domain, 'checkpoint-create --redefine', async (ctx) => {
      this.domains.hooks.beforeConfigChange?.(ctx, 'checkpoint redefine');
      const target = checkRedefine(domain, spec, this.store.links(domain));
      const defXml = spec.domainXml ?? ctx.row.xml;
      const def = parseDomainXml(defXml);
      const diskIds = new Map<string, string | null>();
      for (const d of def.disks) if (!diskIds.has(d.target)) diskIds.set(d.target, this.domains.diskIdForSource(domain, d.source));
      const rows = redefineDiskRows(target, spec.disks, def.disks, diskIds);
      if (validate) {
        await this.withOptionalQmp(ctx, 'checkpoint redefine', async (qmp) => {
          checkRedefineBitmaps(target.what, rows, ctx.disks, await this.readBitmaps(ctx, qmp));
        });
      }
      const journalSeq = this.domains.journalSeqAt(target.creationTime * 1000);
      this.store.transaction(() => {
        const plan = planRedefine(target, { description: spec.description ?? null, domainXml: defXml }, rows, {
          existingDisks: target.existing === undefined ? [] : this.store.disks(domain, target.name),
          current: this.store.current(domain),
          journalSeq,
          nextCreatedSeq: this.store.nextCreatedSeq(domain),
        });
        applyRedefine(this.store, plan);
      });
      return this.info(domain, target.name);
    });
  }

  // ---- delete ----------------------------------------------------------------

  async delete(domain: string, name: string, options: DeleteOptions = {}): Promise<string[]> {
    if (options.children && options.childrenOnly) {
      throw new QbackupError('INVALID_ARGUMENT', 'Options --children and --children-only cannot be used together');
    }
    return this.domains.withDomain(domain, 'checkpoint-delete', async (ctx) => {
      this.domains.hooks.beforeConfigChange?.(ctx, 'checkpoint-delete');
      this.requireCheckpoint(domain, name);
      const victims = options.children || options.childrenOnly ? postOrder(childrenIndex(this.store.links(domain)), name) : [];
      if (!options.childrenOnly) victims.push(name);
      return this.withOptionalQmp(ctx, 'checkpoint-delete', async (qmp) => {
        if (!options.metadata) await this.reconcile(ctx, qmp);
        for (const victim of victims) {
          if (options.metadata) this.deleteMetadataOnly(domain, victim);
          else await this.deleteOne(ctx, qmp, victim);
        }
        return victims;
      });
    });
  }

  /**
   * Deletes one checkpoint inside a command that already holds the domain
   * (and its QMP, when running): how a failed backup's checkpoint is merged
   * away when its job is reaped.
   */
  async deleteIn(ctx: DomainContext, qmp: QmpClient | undefined, name: string): Promise<void> {
    await this.reconcile(ctx, qmp);
    await this.deleteOne(ctx, qmp, name);
  }

  private async deleteOne(ctx: DomainContext, qmp: QmpClient | undefined, name: string): Promise<void> {
    const domain = ctx.row.name;
    const cp = this.requireCheckpoint(domain, name);
    const bitmaps = await this.readBitmaps(ctx, qmp);
    const parentDisks = cp.parent === null ? [] : this.store.disks(domain, cp.parent);
    const intent = planDelete(cp, this.store.disks(domain, name), parentDisks, ctx.disks);
    const unreadable = unreadableDisk(intent, bitmaps);
    if (unreadable !== undefined) throw unreadableError(ctx, unreadable, `Cannot delete checkpoint "${name}" of domain "${domain}"`);
    this.journal.begin(domain, { kind: 'checkpoint-delete', intent });
    this.fault('checkpoint-delete:after-intent');
    await applyBitmapActions(qmp, deleteActions(intent, bitmaps), ctx.disks);
    this.fault('checkpoint-delete:after-qemu');
    this.journal.commitDelete(domain, intent);
  }

  /**
   * --metadata: the bitmaps stay as they are, so the parent's bitmap no longer
   * leads to the present through the chain; coverage from the parent (and
   * everything before it) is recorded as lost for each disk.
   */
  private deleteMetadataOnly(domain: string, name: string): void {
    const cp = this.requireCheckpoint(domain, name);
    this.store.transaction(() => {
      if (cp.parent !== null) {
        for (const d of this.store.disks(domain, cp.parent)) {
          if (d.disk_id !== null && d.mode === 'bitmap') {
            this.store.recordLoss(domain, d.disk_id, cp.parent, 'bitmap-missing', `checkpoint "${name}" was deleted with --metadata, so its bitmap is not merged into "${cp.parent}"`);
          }
        }
      }
      this.store.reparentChildren(domain, name, cp.parent);
      this.store.remove(domain, name);
      if (cp.is_current === 1) this.store.setCurrent(domain, cp.parent);
    });
  }

  // ---- reading ---------------------------------------------------------------

  list(domain: string, filters: ListFilters = {}): CheckpointInfo[] {
    this.domains.requireDomain(domain);
    let rows = this.store.summaries(domain);
    const children = childrenIndex(rows);
    const tree = { children, descendants: descendantCounts(rows, children), disks: groupDisks(this.store.disks(domain)) };
    if (filters.topological) rows = topologicalOrder(rows);
    const infos = rows.map((r) => this.toInfo(r, tree));
    return infos.filter((i) => (!filters.roots || i.parent === null) && (!filters.leaves || i.children === 0));
  }

  /**
   * A value that changes whenever list()'s answer may have changed (a
   * checkpoint created, deleted, redefined or made current, by this process
   * or another): a caller may keep what it made of an answer (the daemon keeps
   * the serialized body) for as long as the stamp it read before it asked
   * stays the same.
   */
  listStamp(): string {
    return this.store.changeStamp();
  }

  info(domain: string, name: string): CheckpointInfo {
    return this.toInfo(this.requireCheckpoint(domain, name));
  }

  parent(domain: string, name: string): string | null {
    return this.requireCheckpoint(domain, name).parent;
  }

  /**
   * The checkpoint as a full description (checkpoint-dumpxml): name, parent,
   * creation time, disks and the domain definition at that moment; with
   * `size`, each covered disk's bytes changed since the checkpoint.
   */
  async describe(domain: string, name: string, options: { size?: boolean } = {}): Promise<CheckpointSpec> {
    const cp = this.requireCheckpoint(domain, name);
    const sizes = new Map<string, number>();
    if (options.size) {
      await this.domains.withDomain(domain, 'checkpoint-dumpxml --size', async (ctx) => {
        if (!ctx.running) {
          throw new QbackupError('DOMAIN_NOT_RUNNING', `Cannot measure checkpoint "${name}" of domain "${domain}": --size needs the domain running`);
        }
        await this.domains.withQmp(ctx, 'checkpoint-dumpxml --size', async (qmp) => {
          for (const cov of await this.coverageIn(ctx, qmp, name)) {
            if (cov.mode !== 'incremental') continue;
            const target = cov.target;
            await this.withMergedBitmap(qmp, cov.diskId, cov.bitmaps, async (tmp) => {
              sizes.set(target, await bitmapCount(qmp, cov.diskId, tmp));
            });
          }
        });
      });
    }
    const disks = this.store.disks(domain, name).map((d): CheckpointDiskSpec => {
      const spec: CheckpointDiskSpec = { name: d.target, checkpoint: d.mode };
      if (d.bitmap !== null) spec.bitmap = d.bitmap;
      const size = sizes.get(d.target);
      if (size !== undefined) spec.size = size;
      return spec;
    });
    const doc: CheckpointSpec = { name: cp.name, creationTime: cp.creation_time, disks, domainXml: cp.domain_xml };
    if (cp.description !== null) doc.description = cp.description;
    if (cp.parent !== null) doc.parent = cp.parent;
    return doc;
  }

  /** Per current disk: may a backup since `name` be incremental, and if not, why. */
  async coverage(domain: string, name: string): Promise<DiskCoverage[]> {
    return this.domains.withDomain(domain, 'checkpoint-coverage', async (ctx) => {
      this.requireCheckpoint(domain, name);
      return this.withOptionalQmp(ctx, 'checkpoint-coverage', (qmp) => this.coverageIn(ctx, qmp, name));
    });
  }

  /** Coverage inside a command that already holds the domain (and its QMP, when running). */
  async coverageIn(ctx: DomainContext, qmp: QmpClient | undefined, name: string, disks: readonly AttachedDisk[] = ctx.disks, read?: ReadonlyMap<string, BlockNode> | undefined): Promise<DiskCoverage[]> {
    const domain = ctx.row.name;
    const t = this.requireCheckpoint(domain, name);
    const path = chainFrom(this.chainCheckpoints(domain, name), name);
    // One read of QEMU's node graph for the sizes and the bitmaps: with many checkpoints it is the largest cost of the question.
    const nodes = read ?? (qmp !== undefined ? await readBlockNodes(qmp) : undefined);
    await this.noteSizes(ctx, qmp, nodes);
    const bitmaps = await this.readBitmaps(ctx, qmp, nodes);
    const losses = this.store.losses(domain);
    return disks.map((d) =>
      computeCoverage({
        path,
        disk: { target: d.target, diskId: d.diskId, format: d.format },
        eventsSinceT: this.domains.diskEvents(d.diskId, t.journal_seq),
        bitmaps: bitmaps.get(d.diskId),
        losses: new Map(losses.filter((l) => l.disk_id === d.diskId).map((l) => [l.checkpoint, { reason: l.reason, detail: l.detail }])),
      }),
    );
  }

  /**
   * Runs `fn` with a temporary, non-persistent, disabled bitmap on the disk
   * holding the merge of `bitmaps`; the temporary bitmap is removed however
   * `fn` ends.
   */
  async withMergedBitmap<T>(qmp: QmpClient, diskId: string, bitmaps: readonly string[], fn: (tempName: string) => Promise<T>): Promise<T> {
    assert(bitmaps.length > 0, `a merged bitmap of disk "${diskId}" needs at least one bitmap`);
    const node = nodeNamesFor(diskId).format;
    const tmp = `${TEMP_BITMAP_PREFIX}${randomBytes(4).toString('hex')}`;
    await qmp.transaction(mergedBitmapActions(diskId, tmp, bitmaps));
    try {
      return await fn(tmp);
    } finally {
      // Dropped on purpose: `fn`'s outcome is the one to report, and a temporary
      // bitmap left behind is non-persistent (gone when QEMU stops) and removed
      // by the next reconcile.
      await qmp.execute('block-dirty-bitmap-remove', { node, name: tmp }).catch(() => undefined);
    }
  }

  // ---- reconcile and recovery -----------------------------------------------

  /**
   * Compares metadata with the bitmaps on each attached disk: records missing
   * and inconsistent ones as lost coverage, removes inconsistent ones and
   * leftover temporary bitmaps, and makes the right bitmap the recording one
   * (see planReconcile). Returns the bitmaps as read when nothing was changed.
   */
  async reconcile(ctx: DomainContext, qmp: QmpClient | undefined): Promise<DiskBitmaps | undefined> {
    const domain = ctx.row.name;
    const nodes = qmp !== undefined ? await readBlockNodes(qmp) : undefined;
    await this.noteSizes(ctx, qmp, nodes);
    const checkpoints = this.store.links(domain);
    // Offline without checkpoints there is nothing to compare, and no temporary bitmap survives QEMU.
    if (checkpoints.length === 0 && qmp === undefined) return undefined;
    const bitmaps = await this.readBitmaps(ctx, qmp, nodes);
    const plan = planReconcile({ checkpoints, checkpointDisks: this.store.disks(domain), disks: ctx.disks, bitmaps });
    this.recordLosses(domain, plan.losses);
    await applyBitmapActions(qmp, plan.actions, ctx.disks);
    // The bitmaps as read are still the truth only when nothing was changed.
    return plan.actions.length === 0 ? bitmaps : undefined;
  }

  /** Finishes (delete) or rolls back (create) an operation a killed qbackup left behind. */
  async recover(ctx: DomainContext): Promise<void> {
    const pending = this.journal.pending(ctx.row.name);
    if (pending === undefined) return;
    await this.withOptionalQmp(ctx, 'recovery', async (qmp) => {
      const plan = planRecovery(pending, await this.readBitmaps(ctx, qmp));
      if (plan.outcome === 'unreadable') {
        throw unreadableError(ctx, plan.diskId, `Cannot finish deleting checkpoint "${plan.intent.name}" of domain "${ctx.row.name}"`);
      }
      await applyBitmapActions(qmp, plan.actions, ctx.disks);
      this.journal.settle(ctx.row.name, plan);
    });
  }

  /**
   * Looks at the disks' sizes: a disk resized since the last look loses
   * coverage (resize.ts). `nodes`: QEMU's node graph just read, if it was.
   */
  async noteSizes(ctx: DomainContext, qmp: QmpClient | undefined, nodes?: ReadonlyMap<string, BlockNode> | undefined): Promise<void> {
    const domain = ctx.row.name;
    const seen = this.domains.diskSizesSeen(domain);
    const sizes = await readDiskSizes(ctx, qmp, nodes);
    // The common case, no size changed, needs no checkpoint rows.
    if ([...sizes].every(([diskId, size]) => seen.get(diskId) === size)) return;
    const plan = planResizes(ctx.disks, seen, sizes, this.store.disks(domain));
    this.recordLosses(domain, plan.losses);
    for (const [diskId, size] of plan.seen) this.domains.noteDiskSize(diskId, size);
  }

  private recordLosses(domain: string, losses: readonly CoverageLoss[]): void {
    if (losses.length === 0) return;
    this.store.transaction(() => {
      for (const l of losses) this.store.recordLoss(domain, l.diskId, l.checkpoint, l.reason, l.detail);
    });
  }

  // ---- helpers ---------------------------------------------------------------

  async readBitmaps(ctx: DomainContext, qmp: QmpClient | undefined, nodes?: ReadonlyMap<string, BlockNode> | undefined): Promise<DiskBitmaps> {
    return qmp !== undefined ? readBitmapsOnline(qmp, ctx.disks, nodes) : readBitmapsOffline(ctx.disks);
  }

  /** Runs `fn` with QMP when the domain runs, else with undefined (offline). */
  async withOptionalQmp<T>(ctx: DomainContext, what: string, fn: (qmp: QmpClient | undefined) => Promise<T>): Promise<T> {
    if (!ctx.running) return fn(undefined);
    return this.domains.withQmp(ctx, what, (qmp) => fn(qmp));
  }

  /** Does the domain have a checkpoint of this name? */
  exists(domain: string, name: string): boolean {
    return this.store.get(domain, name) !== undefined;
  }

  requireCheckpoint(domain: string, name: string): CheckpointRow {
    this.domains.requireDomain(domain);
    const row = this.store.get(domain, name);
    if (row === undefined) throw new QbackupError('CHECKPOINT_NOT_FOUND', `Domain "${domain}" has no checkpoint "${name}"`);
    return row;
  }

  /**
   * The checkpoints from the current one up to `from` (or to a root, when
   * `from` is not an ancestor), with their disks, unordered. A short path is
   * walked by key; a long one (over SHORT_PATH) is read with the whole chain,
   * which costs less per row.
   */
  chainCheckpoints(domain: string, from: string): ChainCheckpoint[] {
    const near = this.store.currentAncestry(domain, from, SHORT_PATH);
    const { links, disks } = near.complete ? near : { links: this.store.links(domain), disks: this.store.disks(domain) };
    const byCheckpoint = groupDisks(disks);
    return links.map((row) => ({ row, disks: byCheckpoint.get(row.name) ?? [] }));
  }

  /**
   * `tree` lets list() read the rows and disks once for every checkpoint;
   * without it they are read here.
   */
  private toInfo(row: CheckpointSummaryRow, tree?: { children: Map<string, CheckpointLink[]>; descendants: Map<string, number>; disks: Map<string, CheckpointDiskRow[]> }): CheckpointInfo {
    const disks = tree !== undefined ? (tree.disks.get(row.name) ?? []) : this.store.disks(row.domain, row.name);
    let children: number;
    let descendants: number;
    if (tree !== undefined) {
      children = tree.children.get(row.name)?.length ?? 0;
      descendants = tree.descendants.get(row.name) ?? 0;
    } else {
      // A leaf (every newly created checkpoint) needs no walk of the chain.
      children = this.store.childCount(row.domain, row.name);
      descendants = children === 0 ? 0 : countDescendants(childrenIndex(this.store.links(row.domain)), row.name);
    }
    return {
      name: row.name,
      domain: row.domain,
      parent: row.parent,
      description: row.description,
      creationTime: row.creation_time,
      current: row.is_current === 1,
      children,
      descendants,
      disks: disks.map((d) => ({ target: d.target, diskId: d.disk_id, checkpoint: d.mode, bitmap: d.bitmap })),
    };
  }

  private fault(point: FaultPoint): void {
    (this.options.faults ?? noFaults).at(point);
  }
}

/** The checkpoint's disk specs by target; every one must name an attached disk. */
function diskSpecsByTarget(ctx: DomainContext, name: string, disks: readonly CheckpointDiskSpec[]): Map<string, CheckpointDiskSpec> {
  const specs = new Map<string, CheckpointDiskSpec>();
  for (const d of disks) {
    if (!ctx.disks.some((x) => x.target === d.name)) {
      throw new QbackupError('DISK_NOT_FOUND', `Cannot create checkpoint "${name}" of domain "${ctx.row.name}": the domain has no disk "${d.name}"`);
    }
    specs.set(d.name, d);
  }
  return specs;
}

/**
 * A new checkpoint's disk rows and the bitmaps it adds: by default every
 * writable qcow2 disk gets a bitmap named after the checkpoint; a disk asked
 * for explicitly must be able to hold one, under a name not yet on it.
 */
function createDiskRows(
  ctx: DomainContext,
  name: string,
  specs: ReadonlyMap<string, CheckpointDiskSpec>,
  bitmaps: DiskBitmaps,
): Pick<CreateIntent, 'disks' | 'adds'> {
  const domain = ctx.row.name;
  const what = `Cannot create checkpoint "${name}" of domain "${domain}"`;
  const disks: CheckpointDiskRow[] = [];
  const adds: CreateIntent['adds'] = [];
  for (const d of ctx.disks) {
    const s = specs.get(d.target);
    const wanted = s?.checkpoint ?? (d.format === 'qcow2' && !d.readonly ? 'bitmap' : 'no');
    if (wanted !== 'bitmap') {
      disks.push({ domain, checkpoint: name, target: d.target, disk_id: d.diskId, mode: 'no', bitmap: null });
      continue;
    }
    if (d.format !== 'qcow2') throw new QbackupError('INVALID_ARGUMENT', `${what}: disk "${d.target}" is ${d.format}; bitmaps need qcow2`);
    if (d.readonly) throw new QbackupError('INVALID_ARGUMENT', `${what}: disk "${d.target}" is read-only`);
    const bitmap = s?.bitmap ?? name;
    assertCheckpointName(bitmap, 'Bitmap name');
    assertNotTemporary(bitmap);
    if ((bitmaps.get(d.diskId) ?? []).some((b) => b.name === bitmap)) {
      throw new QbackupError('CHECKPOINT_EXISTS', `${what}: disk "${d.target}" already has a bitmap "${bitmap}"`);
    }
    adds.push({ diskId: d.diskId, bitmap });
    disks.push({ domain, checkpoint: name, target: d.target, disk_id: d.diskId, mode: 'bitmap', bitmap });
  }
  return { disks, adds };
}

/**
 * A disk whose bitmaps cannot be read must not be treated as having none: the
 * merge would be skipped while the metadata says it happened.
 */
function unreadableError(ctx: DomainContext, diskId: string, what: string): QbackupError {
  const target = ctx.disks.find((x) => x.diskId === diskId)?.target ?? diskId;
  return new QbackupError('IMAGE_ERROR', `${what}: the bitmaps of disk "${target}" cannot be read`);
}

async function bitmapCount(qmp: QmpClient, diskId: string, bitmap: string): Promise<number> {
  const node = (await readBlockNodes(qmp)).get(nodeNamesFor(diskId).format);
  return node?.bitmaps.find((b) => b.name === bitmap)?.count ?? 0;
}

function groupDisks(rows: readonly CheckpointDiskRow[]): Map<string, CheckpointDiskRow[]> {
  const out = new Map<string, CheckpointDiskRow[]>();
  for (const d of rows) {
    const list = out.get(d.checkpoint);
    if (list === undefined) out.set(d.checkpoint, [d]);
    else list.push(d);
  }
  return out;
}
