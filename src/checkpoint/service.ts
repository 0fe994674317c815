// Checkpoints: the chain model of docs/design.md. Each checkpoint has one bitmap per
// participating disk; only the current checkpoint's bitmap records. Creating
// adds the new bitmaps and disables the recording ones in one QMP transaction;
// deleting merges a checkpoint's bitmap into its parent's (re-enabling the
// parent when the current one goes) in one transaction.
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

import { randomBytes } from 'node:crypto';
import { realpathSync } from 'node:fs';
import { QbackupError } from '../errors.js';
import type { AttachedDisk, DomainContext, DomainService, UndefineOptions } from '../domain/service.js';
import { parseDomainXml } from '../libvirt/domain.js';
import { readBlockNodes } from '../qemu/block-nodes.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import { QmpCommandError, type QmpClient } from '../qmp/index.js';
import type { CheckpointDiskRow, CheckpointLink, CheckpointRow, CheckpointStore, CheckpointSummaryRow } from '../store/checkpoints.js';
import { applyBitmapActions, mergedBitmapActions, readBitmapsOffline, readBitmapsOnline, type BitmapAction, type BitmapState, type DiskBitmaps } from './bitmaps.js';
import { chainFrom, computeCoverage, type ChainCheckpoint, type DiskCoverage } from './coverage.js';
import { assertCheckpointName, type CheckpointDiskSpec, type CheckpointSpec } from './spec.js';

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

export interface CreateIntent {
  row: CheckpointRow;
  disks: CheckpointDiskRow[];
  adds: Array<{ diskId: string; bitmap: string }>;
  disables: Array<{ diskId: string; bitmap: string }>;
}

interface DeleteIntent {
  name: string;
  parent: string | null;
  wasCurrent: boolean;
  disks: Array<{ diskId: string; bitmap: string; parentBitmap: string | null }>;
}

/** Prefix of the temporary, non-persistent bitmaps qbackup merges chains into. */
export const TEMP_BITMAP_PREFIX = 'qbackup-tmp-';

export class CheckpointService {
  constructor(
    readonly domains: DomainService,
    readonly store: CheckpointStore,
    private readonly crashAt?: string,
  ) {}

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
  async create(domain: string, spec: CheckpointSpec = {}): Promise<CheckpointInfo> {
    if (spec.parent !== undefined || spec.creationTime !== undefined || spec.domainXml !== undefined) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot create checkpoint of domain "${domain}": a parent, a creation time and a domain definition are only accepted by redefine`);
    }
    return this.domains.withDomain(domain, 'checkpoint-create', async (ctx) => {
      this.domains.hooks.beforeConfigChange?.(ctx, 'checkpoint-create');
      return this.withOptionalQmp(ctx, 'checkpoint-create', async (qmp) => {
        const bitmaps = await this.reconcile(ctx, qmp);
        const plan = await this.planCreate(ctx, qmp, spec, bitmaps);
        await this.applyCreate(ctx, qmp, plan);
        return this.info(domain, plan.row.name);
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
    const specs = new Map<string, CheckpointDiskSpec>();
    for (const d of spec.disks ?? []) {
      if (!ctx.disks.some((x) => x.target === d.name)) {
        throw new QbackupError('DISK_NOT_FOUND', `Cannot create checkpoint "${name}" of domain "${domain}": the domain has no disk "${d.name}"`);
      }
      specs.set(d.name, d);
    }
    // `known`: the state reconcile just read (and left unchanged), so it need not be read twice.
    const bitmaps = known ?? (await this.readBitmaps(ctx, qmp));
    const current = this.store.current(domain);
    const disks: CheckpointDiskRow[] = [];
    const adds: CreateIntent['adds'] = [];
    for (const d of ctx.disks) {
      const s = specs.get(d.target);
      const wanted = s?.checkpoint ?? (d.format === 'qcow2' && !d.readonly ? 'bitmap' : 'no');
      if (wanted === 'bitmap') {
        if (d.format !== 'qcow2') {
          throw new QbackupError('INVALID_ARGUMENT', `Cannot create checkpoint "${name}" of domain "${domain}": disk "${d.target}" is ${d.format}; bitmaps need qcow2`);
        }
        if (d.readonly) {
          throw new QbackupError('INVALID_ARGUMENT', `Cannot create checkpoint "${name}" of domain "${domain}": disk "${d.target}" is read-only`);
        }
        const bitmap = s?.bitmap ?? name;
        assertCheckpointName(bitmap, 'Bitmap name');
        assertNotTemporary(bitmap);
        if ((bitmaps.get(d.diskId) ?? []).some((b) => b.name === bitmap)) {
          throw new QbackupError('CHECKPOINT_EXISTS', `Cannot create checkpoint "${name}" of domain "${domain}": disk "${d.target}" already has a bitmap "${bitmap}"`);
        }
        adds.push({ diskId: d.diskId, bitmap });
        disks.push({ domain, checkpoint: name, target: d.target, disk_id: d.diskId, mode: 'bitmap', bitmap });
      } else {
        disks.push({ domain, checkpoint: name, target: d.target, disk_id: d.diskId, mode: 'no', bitmap: null });
      }
    }
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
      journal_seq: this.domains.store.journalHead(),
      is_current: 1,
      created_seq: this.store.nextCreatedSeq(domain),
    };
    return { row, disks, adds, disables };
  }

  /** The bitmap actions of a planned checkpoint: adds, then disables (the order offline recovery relies on). */
  createActions(plan: CreateIntent): BitmapAction[] {
    return [
      ...plan.adds.map((a): BitmapAction => ({ op: 'add', diskId: a.diskId, bitmap: a.bitmap })),
      ...plan.disables.map((a): BitmapAction => ({ op: 'disable', diskId: a.diskId, bitmap: a.bitmap })),
    ];
  }

  private async applyCreate(ctx: DomainContext, qmp: QmpClient | undefined, plan: CreateIntent): Promise<void> {
    const domain = ctx.row.name;
    this.store.transaction(() => this.store.beginOperation(domain, 'checkpoint-create', plan));
    this.fault('checkpoint-create:after-intent');
    try {
      await applyBitmapActions(qmp, this.createActions(plan), ctx.disks);
    } catch (err) {
      // A transaction QEMU refused changed nothing, and offline steps are each done
      // or not: roll back now. Anything else (a timeout, a lost connection) may
      // still have been applied: the intent stays for the next command to settle.
      if (qmp === undefined || err instanceof QmpCommandError) await this.rollbackCreate(ctx, qmp, plan).catch(() => undefined);
      throw err;
    }
    this.fault('checkpoint-create:after-qemu');
    this.commitCreate(plan);
  }

  /** Records a checkpoint whose bitmaps are in place, and clears the intent. */
  commitCreate(plan: CreateIntent): void {
    this.store.transaction(() => {
      this.store.setCurrent(plan.row.domain, null);
      this.store.insert(plan.row, plan.disks);
      this.store.endOperation(plan.row.domain);
    });
  }

  private async rollbackCreate(ctx: DomainContext, qmp: QmpClient | undefined, plan: CreateIntent): Promise<void> {
    const bitmaps = await this.readBitmaps(ctx, qmp);
    const actions: BitmapAction[] = [];
    for (const a of plan.adds) {
      if ((bitmaps.get(a.diskId) ?? []).some((b) => b.name === a.bitmap)) actions.push({ op: 'remove', diskId: a.diskId, bitmap: a.bitmap });
    }
    for (const a of plan.disables) {
      const st = (bitmaps.get(a.diskId) ?? []).find((b) => b.name === a.bitmap);
      if (st !== undefined && !st.recording && !st.inconsistent) actions.push({ op: 'enable', diskId: a.diskId, bitmap: a.bitmap });
    }
    await applyBitmapActions(qmp, actions, ctx.disks);
    this.store.transaction(() => this.store.endOperation(ctx.row.name));
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
      const what = `Cannot redefine checkpoint ${spec.name !== undefined ? `"${spec.name}"` : ''} of domain "${domain}"`.replace('  ', ' ');
      if (spec.name === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: the XML has no <name>`);
      if (spec.creationTime === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: the XML has no <creationTime>`);
      const name = spec.name;
      assertNotTemporary(name);
      const existing = this.store.get(domain, name);
      const parent = spec.parent ?? null;
      if (parent !== null) {
        if (this.store.get(domain, parent) === undefined) {
          throw new QbackupError('CHECKPOINT_NOT_FOUND', `${what}: its parent "${parent}" does not exist`);
        }
        if (parent === name || (existing !== undefined && this.descendants(domain, name).includes(parent))) {
          throw new QbackupError('CHECKPOINT_INVALID', `${what}: parent "${parent}" would make a cycle`);
        }
      }
      const defXml = spec.domainXml ?? ctx.row.xml;
      const def = parseDomainXml(defXml);
      const disksTable = this.domains.store.disksOf(domain);
      const idFor = (target: string): string | null => {
        const d = def.disks.find((x) => x.target === target);
        if (d === undefined) return null;
        let real = d.source;
        try {
          real = realpathSync(d.source);
        } catch {
          // image gone: match on the path as written
        }
        return disksTable.find((r) => r.source === real)?.id ?? null;
      };
      const diskSpecs: CheckpointDiskSpec[] =
        spec.disks ?? def.disks.map((d) => ({ name: d.target, checkpoint: d.format === 'qcow2' && !d.readonly ? 'bitmap' : 'no' }));
      const rows: CheckpointDiskRow[] = diskSpecs.map((d) => ({
        domain,
        checkpoint: name,
        target: d.name,
        disk_id: idFor(d.name),
        mode: d.checkpoint,
        bitmap: d.checkpoint === 'bitmap' ? (d.bitmap ?? name) : null,
      }));
      if (validate) {
        await this.withOptionalQmp(ctx, 'checkpoint redefine', async (qmp) => {
          const bitmaps = await this.readBitmaps(ctx, qmp);
          for (const r of rows) {
            if (r.mode !== 'bitmap') continue;
            const disk = ctx.disks.find((d) => d.diskId === r.disk_id);
            if (disk === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: disk "${r.target}" is not attached to the domain`);
            const st = (bitmaps.get(disk.diskId) ?? []).find((b) => b.name === r.bitmap);
            if (st === undefined) throw new QbackupError('CHECKPOINT_INVALID', `${what}: disk "${r.target}" has no bitmap "${r.bitmap ?? ''}"`);
            if (st.inconsistent || !st.persistent) {
              throw new QbackupError('CHECKPOINT_INVALID', `${what}: bitmap "${r.bitmap ?? ''}" of disk "${r.target}" is not usable (inconsistent or not persistent)`);
            }
          }
        });
      }
      // Detaches after the checkpoint's creation time break coverage from it.
      const journal = this.domains.store.db
        .prepare('SELECT COALESCE(MAX(seq), 0) AS s FROM disk_events WHERE at_ms <= ?')
        .get(spec.creationTime * 1000) as { s: number };
      const current = this.store.current(domain);
      const becomesCurrent = existing !== undefined ? existing.is_current === 1 : current === undefined || current.name === parent;
      const row: CheckpointRow = {
        domain,
        name,
        parent,
        description: spec.description ?? null,
        creation_time: spec.creationTime,
        domain_xml: defXml,
        journal_seq: journal.s,
        is_current: becomesCurrent ? 1 : 0,
        created_seq: existing?.created_seq ?? this.store.nextCreatedSeq(domain),
      };
      this.store.transaction(() => {
        if (existing !== undefined) {
          // Only the description and the saved domain definition may change: a new
          // parent or other bitmaps would make the chain claim spans no bitmap covers.
          const old = this.store.disks(domain, name);
          const same =
            existing.parent === parent &&
            old.length === rows.length &&
            rows.every((r) => old.some((o) => o.target === r.target && o.mode === r.mode && o.bitmap === r.bitmap && o.disk_id === r.disk_id));
          if (!same) {
            throw new QbackupError('CHECKPOINT_INVALID', `${what}: it exists with another parent or other disks; delete it first to define it anew`);
          }
          this.store.updateDescription(domain, name, row.description, row.domain_xml);
        } else {
          if (becomesCurrent) this.store.setCurrent(domain, null);
          this.store.insert(row, rows);
        }
      });
      return this.info(domain, name);
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
      const victims = options.children || options.childrenOnly ? this.descendantsPostOrder(domain, name) : [];
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

  private async deleteOne(ctx: DomainContext, qmp: QmpClient | undefined, name: string): Promise<void> {
    const domain = ctx.row.name;
    const cp = this.requireCheckpoint(domain, name);
    const bitmaps = await this.readBitmaps(ctx, qmp);
    const parentDisks = cp.parent === null ? [] : this.store.disks(domain, cp.parent);
    const intent: DeleteIntent = { name, parent: cp.parent, wasCurrent: cp.is_current === 1, disks: [] };
    for (const d of this.store.disks(domain, name)) {
      if (d.mode !== 'bitmap' || d.bitmap === null || d.disk_id === null) continue;
      const disk = ctx.disks.find((x) => x.diskId === d.disk_id);
      if (disk === undefined) continue; // detached: its bitmaps stay in its image, unused
      const pd = parentDisks.find((p) => p.disk_id === d.disk_id && p.mode === 'bitmap');
      intent.disks.push({ diskId: d.disk_id, bitmap: d.bitmap, parentBitmap: pd?.bitmap ?? null });
    }
    assertReadable(ctx, bitmaps, intent, `Cannot delete checkpoint "${name}" of domain "${domain}"`);
    this.store.transaction(() => this.store.beginOperation(domain, 'checkpoint-delete', intent));
    this.fault('checkpoint-delete:after-intent');
    await applyBitmapActions(qmp, deleteActions(intent, bitmaps), ctx.disks);
    this.fault('checkpoint-delete:after-qemu');
    this.commitDelete(domain, intent);
  }

  private commitDelete(domain: string, intent: DeleteIntent): void {
    this.store.transaction(() => {
      if (intent.parent !== null) this.carryGapsToParent(domain, intent.name, intent.parent);
      this.store.reparentChildren(domain, intent.name, intent.parent);
      this.store.remove(domain, intent.name);
      if (intent.wasCurrent) this.store.setCurrent(domain, intent.parent);
      this.store.endOperation(domain);
    });
  }

  /**
   * Coverage from the parent runs through the deleted checkpoint's bitmap. On
   * a disk where the parent has a bitmap but the deleted checkpoint has none
   * (checkpoint='no', or not part of it) or had lost it (a recorded loss), no
   * bitmap holds the writes of that span, and once the checkpoint is gone the
   * chain would hide the gap: record it as a loss of the parent instead (inside
   * the commit, before the checkpoint's own losses are removed).
   */
  private carryGapsToParent(domain: string, name: string, parent: string): void {
    const own = this.store.disks(domain, name);
    const losses = this.store.losses(domain).filter((l) => l.checkpoint === name);
    for (const p of this.store.disks(domain, parent)) {
      if (p.mode !== 'bitmap' || p.disk_id === null) continue;
      const mine = own.find((d) => d.disk_id === p.disk_id);
      const loss = losses.find((l) => l.disk_id === p.disk_id);
      if (mine === undefined || mine.mode !== 'bitmap' || mine.bitmap === null) {
        this.store.recordLoss(domain, p.disk_id, parent, 'bitmap-missing', `deleted checkpoint "${name}" had no bitmap for disk "${p.target}", so writes after it are not tracked from "${parent}"`);
      } else if (loss !== undefined) {
        this.store.recordLoss(domain, p.disk_id, parent, loss.reason, `deleted checkpoint "${name}": ${loss.detail}`);
      }
    }
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
    const tree = { children: childrenIndex(rows), disks: groupDisks(this.store.disks(domain)) };
    if (filters.topological) rows = topologicalOrder(rows);
    const infos = rows.map((r) => this.toInfo(r, tree));
    return infos.filter((i) => (!filters.roots || i.parent === null) && (!filters.leaves || i.children === 0));
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
  async coverageIn(ctx: DomainContext, qmp: QmpClient | undefined, name: string, disks: readonly AttachedDisk[] = ctx.disks): Promise<DiskCoverage[]> {
    const domain = ctx.row.name;
    const t = this.requireCheckpoint(domain, name);
    const chain = this.chainCheckpoints(domain);
    const path = chainFrom(chain, name);
    const bitmaps = await this.readBitmaps(ctx, qmp);
    const losses = this.store.losses(domain);
    return disks.map((d) =>
      computeCoverage({
        path,
        disk: { target: d.target, diskId: d.diskId, format: d.format },
        eventsSinceT: this.domains.store.diskEvents(d.diskId, t.journal_seq),
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
    const node = nodeNamesFor(diskId).format;
    const tmp = `${TEMP_BITMAP_PREFIX}${randomBytes(4).toString('hex')}`;
    await qmp.transaction(mergedBitmapActions(diskId, tmp, bitmaps));
    try {
      return await fn(tmp);
    } finally {
      await qmp.execute('block-dirty-bitmap-remove', { node, name: tmp }).catch(() => undefined);
    }
  }

  // ---- reconcile and recovery -----------------------------------------------

  /**
   * Compares metadata with the bitmaps on each attached disk: records missing
   * and inconsistent ones as lost coverage, removes inconsistent ones and
   * leftover temporary bitmaps, and makes the right bitmap the recording one.
   */
  async reconcile(ctx: DomainContext, qmp: QmpClient | undefined): Promise<DiskBitmaps | undefined> {
    const domain = ctx.row.name;
    const checkpoints = this.store.links(domain);
    if (checkpoints.length === 0 && qmp === undefined) return undefined;
    const bitmaps = await this.readBitmaps(ctx, qmp);
    const cpDisks = this.store.disks(domain);
    const current = checkpoints.find((c) => c.is_current === 1);
    const byName = new Map(checkpoints.map((c) => [c.name, c]));
    const actions: BitmapAction[] = [];
    const losses: Array<[string, string, string, string]> = [];
    // Indexed once: with a long chain, scanning the rows per checkpoint would be quadratic.
    const bitmapEntries = new Map<string, CheckpointDiskRow>();
    for (const x of cpDisks) {
      const key = `${x.checkpoint}\0${x.disk_id ?? ''}`;
      if (x.mode === 'bitmap' && !bitmapEntries.has(key)) bitmapEntries.set(key, x);
    }
    for (const d of ctx.disks) {
      const actual = bitmaps.get(d.diskId);
      if (actual === undefined || d.format !== 'qcow2') continue;
      const actualByName = new Map<string, BitmapState>();
      for (const b of actual) {
        if (!actualByName.has(b.name)) actualByName.set(b.name, b);
        if (b.name.startsWith(TEMP_BITMAP_PREFIX) && !b.busy) actions.push({ op: 'remove', diskId: d.diskId, bitmap: b.name });
      }
      const valid: Array<{ cp: CheckpointLink; state: BitmapState }> = [];
      for (const cp of checkpoints) {
        const entry = bitmapEntries.get(`${cp.name}\0${d.diskId}`);
        if (entry === undefined || entry.bitmap === null) continue;
        const st = actualByName.get(entry.bitmap);
        if (st === undefined) {
          losses.push([d.diskId, cp.name, 'bitmap-missing', `bitmap "${entry.bitmap}" of disk "${d.target}" disappeared (lost when QEMU stopped uncleanly, or removed outside qbackup)`]);
        } else if (st.inconsistent) {
          losses.push([d.diskId, cp.name, 'bitmap-inconsistent', `bitmap "${entry.bitmap}" of disk "${d.target}" was inconsistent (QEMU did not store it cleanly) and was removed`]);
          actions.push({ op: 'remove', diskId: d.diskId, bitmap: st.name });
        } else {
          valid.push({ cp, state: st });
        }
      }
      // The recorder is the current checkpoint's bitmap or, when that one is gone,
      // the nearest valid one on the current checkpoint's own path (never a
      // newer bitmap of another branch).
      let recorder: { cp: CheckpointLink; state: BitmapState } | undefined;
      if (current !== undefined && bitmapEntries.has(`${current.name}\0${d.diskId}`)) {
        const validByName = new Map(valid.map((v) => [v.cp.name, v]));
        const seen = new Set<string>();
        for (let at: CheckpointLink | undefined = current; at !== undefined && !seen.has(at.name); at = at.parent === null ? undefined : byName.get(at.parent)) {
          seen.add(at.name);
          recorder = validByName.get(at.name);
          if (recorder !== undefined) break;
        }
      }
      for (const v of valid) {
        const shouldRecord = v === recorder;
        if (v.state.recording === shouldRecord) continue;
        actions.push({ op: shouldRecord ? 'enable' : 'disable', diskId: d.diskId, bitmap: v.state.name });
        if (shouldRecord && v.cp.name === current?.name) {
          // The current bitmap was not recording: writes since it stopped are in no bitmap.
          losses.push([d.diskId, v.cp.name, 'bitmap-inconsistent', `bitmap "${v.state.name}" of disk "${d.target}" was found not recording and was re-enabled; writes in between were not tracked`]);
        }
      }
    }
    if (losses.length > 0) {
      this.store.transaction(() => {
        for (const [diskId, cp, reason, detail] of losses) this.store.recordLoss(domain, diskId, cp, reason, detail);
      });
    }
    await applyBitmapActions(qmp, actions, ctx.disks);
    // The bitmaps as read are still the truth only when nothing was changed.
    return actions.length === 0 ? bitmaps : undefined;
  }

  /** Finishes (delete) or rolls back (create) an operation a killed qbackup left behind. */
  async recover(ctx: DomainContext): Promise<void> {
    const op = this.store.getOperation(ctx.row.name);
    if (op === undefined) return;
    await this.withOptionalQmp(ctx, 'recovery', async (qmp) => {
      if (op.kind === 'checkpoint-create') {
        const plan = JSON.parse(op.payload) as CreateIntent;
        const bitmaps = await this.readBitmaps(ctx, qmp);
        const present = plan.adds.filter((a) => (bitmaps.get(a.diskId) ?? []).some((b) => b.name === a.bitmap));
        const disabled = plan.disables.filter((a) => (bitmaps.get(a.diskId) ?? []).some((b) => b.name === a.bitmap && !b.recording));
        // The online transaction is all or nothing; offline, adds come before disables.
        const happened = plan.adds.length > 0 ? present.length === plan.adds.length : plan.disables.length > 0 && disabled.length === plan.disables.length;
        if (happened) {
          // Every new bitmap exists: the change happened; finish it (offline, the disables may be pending).
          const pending = plan.disables.filter((a) => (bitmaps.get(a.diskId) ?? []).find((b) => b.name === a.bitmap)?.recording === true);
          await applyBitmapActions(qmp, pending.map((a): BitmapAction => ({ op: 'disable', ...a })), ctx.disks);
          this.commitCreate(plan);
        } else {
          await this.rollbackCreate(ctx, qmp, plan);
        }
      } else if (op.kind === 'checkpoint-delete') {
        const intent = JSON.parse(op.payload) as DeleteIntent;
        const bitmaps = await this.readBitmaps(ctx, qmp);
        assertReadable(ctx, bitmaps, intent, `Cannot finish deleting checkpoint "${intent.name}" of domain "${ctx.row.name}"`);
        await applyBitmapActions(qmp, deleteActions(intent, bitmaps), ctx.disks);
        this.commitDelete(ctx.row.name, intent);
      } else {
        // Another subsystem's operation: not ours to finish.
        return;
      }
    });
  }

  // ---- helpers ---------------------------------------------------------------

  async readBitmaps(ctx: DomainContext, qmp: QmpClient | undefined): Promise<DiskBitmaps> {
    return qmp !== undefined ? readBitmapsOnline(qmp, ctx.disks) : readBitmapsOffline(ctx.disks);
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

  chainCheckpoints(domain: string): ChainCheckpoint[] {
    const byCheckpoint = groupDisks(this.store.disks(domain));
    return this.store.links(domain).map((row) => ({ row, disks: byCheckpoint.get(row.name) ?? [] }));
  }

  /** Descendants in pre-order (parents before children). Iterative: chains can be thousands long. */
  private descendants(domain: string, name: string): string[] {
    return preOrder(childrenIndex(this.store.links(domain)), name);
  }

  /** Descendants, children after their own descendants (leaves first). */
  private descendantsPostOrder(domain: string, name: string): string[] {
    // The reverse of a pre-order where children are visited last-first is a valid post-order.
    const children = childrenIndex(this.store.links(domain));
    const out: string[] = [];
    const stack = [...(children.get(name) ?? [])];
    while (stack.length > 0) {
      const c = stack.pop() as CheckpointLink;
      out.push(c.name);
      stack.push(...(children.get(c.name) ?? []));
    }
    return out.reverse();
  }

  /**
   * `tree` lets list() read the rows and disks once for every checkpoint;
   * without it they are read here.
   */
  private toInfo(row: CheckpointSummaryRow, tree?: { children: Map<string, CheckpointLink[]>; disks: Map<string, CheckpointDiskRow[]> }): CheckpointInfo {
    const disks = tree !== undefined ? (tree.disks.get(row.name) ?? []) : this.store.disks(row.domain, row.name);
    let children: number;
    let descendants: number;
    if (tree !== undefined) {
      children = tree.children.get(row.name)?.length ?? 0;
      descendants = countDescendants(tree.children, row.name);
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
    if (this.crashAt === point) process.kill(process.pid, 'SIGKILL');
  }
}

/** Names with the temporary prefix are swept by reconcile, so no checkpoint may use one. */
function assertNotTemporary(name: string): void {
  if (name.startsWith(TEMP_BITMAP_PREFIX)) {
    throw new QbackupError('INVALID_NAME', `Invalid name "${name}": names starting with "${TEMP_BITMAP_PREFIX}" are reserved for qbackup's temporary bitmaps`);
  }
}

/**
 * A disk whose bitmaps cannot be read must not be treated as having none: the
 * merge would be skipped while the metadata says it happened.
 */
function assertReadable(ctx: DomainContext, bitmaps: DiskBitmaps, intent: DeleteIntent, what: string): void {
  for (const d of intent.disks) {
    if (!bitmaps.has(d.diskId)) {
      const target = ctx.disks.find((x) => x.diskId === d.diskId)?.target ?? d.diskId;
      throw new QbackupError('IMAGE_ERROR', `${what}: the bitmaps of disk "${target}" cannot be read`);
    }
  }
}

/** Bitmap steps of a deletion, limited to what still needs doing on the images. */
function deleteActions(intent: DeleteIntent, bitmaps: DiskBitmaps): BitmapAction[] {
  const actions: BitmapAction[] = [];
  for (const d of intent.disks) {
    const onDisk = bitmaps.get(d.diskId) ?? [];
    const own = onDisk.find((b) => b.name === d.bitmap);
    const parent = d.parentBitmap === null ? undefined : onDisk.find((b) => b.name === d.parentBitmap);
    const parentUsable = parent !== undefined && !parent.inconsistent;
    if (own !== undefined) {
      if (parentUsable && !own.inconsistent) actions.push({ op: 'merge', diskId: d.diskId, target: parent.name, sources: [own.name] });
      actions.push({ op: 'remove', diskId: d.diskId, bitmap: own.name });
    }
    if (intent.wasCurrent && parentUsable && !parent.recording) actions.push({ op: 'enable', diskId: d.diskId, bitmap: parent.name });
  }
  return actions;
}

async function bitmapCount(qmp: QmpClient, diskId: string, bitmap: string): Promise<number> {
  const node = (await readBlockNodes(qmp)).get(nodeNamesFor(diskId).format);
  return node?.bitmaps.find((b) => b.name === bitmap)?.count ?? 0;
}

function topologicalOrder<T extends CheckpointLink>(rows: readonly T[]): T[] {
  const names = new Set(rows.map((r) => r.name));
  const byParent = new Map<string | null, T[]>();
  for (const r of rows) {
    const key = r.parent !== null && names.has(r.parent) ? r.parent : null;
    const list = byParent.get(key);
    if (list === undefined) byParent.set(key, [r]);
    else list.push(r);
  }
  const out: T[] = [];
  const placed = new Set<string>();
  const stack = [...(byParent.get(null) ?? [])].reverse();
  while (stack.length > 0) {
    const r = stack.pop() as T;
    if (placed.has(r.name)) continue;
    placed.add(r.name);
    out.push(r);
    stack.push(...[...(byParent.get(r.name) ?? [])].reverse());
  }
  return out;
}

/** Names below `name`, parents before children, iteratively. */
function preOrder(children: Map<string, CheckpointLink[]>, name: string): string[] {
  const out: string[] = [];
  const stack = [...(children.get(name) ?? [])].reverse();
  while (stack.length > 0) {
    const c = stack.pop() as CheckpointLink;
    out.push(c.name);
    stack.push(...[...(children.get(c.name) ?? [])].reverse());
  }
  return out;
}

/** Children of each checkpoint, in the order of `rows` (creation order). */
function childrenIndex(rows: readonly CheckpointLink[]): Map<string, CheckpointLink[]> {
  const out = new Map<string, CheckpointLink[]>();
  for (const r of rows) {
    if (r.parent === null) continue;
    const list = out.get(r.parent);
    if (list === undefined) out.set(r.parent, [r]);
    else list.push(r);
  }
  return out;
}

/** Number of descendants, iteratively (a chain of thousands would be as deep a recursion). */
function countDescendants(children: ReadonlyMap<string, readonly CheckpointLink[]>, name: string): number {
  let count = 0;
  const seen = new Set<string>([name]);
  const stack = [name];
  for (let n = stack.pop(); n !== undefined; n = stack.pop()) {
    for (const c of children.get(n) ?? []) {
      if (seen.has(c.name)) continue;
      seen.add(c.name);
      count++;
      stack.push(c.name);
    }
  }
  return count;
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
