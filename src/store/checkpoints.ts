// SQL access to checkpoints, the disks of each checkpoint, recorded coverage
// losses and the per-domain intent journal. Rules live in src/checkpoint.

import { QbackupError } from '../errors.js';
import { changeStamp, type Db } from './db.js';

export interface CheckpointRow {
  domain: string;
  name: string;
  parent: string | null;
  description: string | null;
  creation_time: number;
  domain_xml: string;
  /** Disk journal head when the checkpoint was taken: later detaches break coverage. */
  journal_seq: number;
  is_current: number;
  /** Order of creation (or redefinition) within the store. */
  created_seq: number;
}

/** A checkpoint's place in the chain, without its domain XML (large, and not needed to walk the chain). */
export type CheckpointLink = Pick<CheckpointRow, 'domain' | 'name' | 'parent' | 'is_current' | 'created_seq'>;

/** Everything but the domain XML. */
export type CheckpointSummaryRow = Omit<CheckpointRow, 'domain_xml'>;

export interface CheckpointDiskRow {
  domain: string;
  checkpoint: string;
  target: string;
  disk_id: string | null;
  mode: 'bitmap' | 'no';
  bitmap: string | null;
}

export interface CoverageLossRow {
  domain: string;
  disk_id: string;
  checkpoint: string;
  reason: string;
  detail: string;
  at_ms: number;
}

interface OperationRow {
  domain: string;
  kind: string;
  payload: string;
  started_ms: number;
}

/** A journal entry with its payload parsed (its shape is the writer's to check). */
export interface PendingOperation {
  domain: string;
  kind: string;
  payload: unknown;
  started_ms: number;
}

export class CheckpointStore {
  constructor(readonly db: Db) {}

  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  /** Differs whenever any process may have changed the metadata since it was last read (db.ts `changeStamp`). */
  changeStamp(): string {
    return changeStamp(this.db);
  }

  list(domain: string): CheckpointRow[] {
    return this.db.prepare('SELECT * FROM checkpoints WHERE domain = ? ORDER BY created_seq').all(domain) as CheckpointRow[];
  }

  /** Like list(), without the domain XML: walking a long chain should not read every checkpoint's XML. */
  links(domain: string): CheckpointLink[] {
    return this.db.prepare('SELECT domain, name, parent, is_current, created_seq FROM checkpoints WHERE domain = ? ORDER BY created_seq').all(domain) as CheckpointLink[];
  }

  /**
   * The current checkpoint and its ancestors up to `stop` (included), or to
   * a root, at most `limit` of them: the links and disk rows of only the
   * checkpoints a coverage question walks, each found by its key (a short
   * path reads a few rows of a long chain). `complete` is false when the
   * walk stopped at the limit (a longer path, or a parent cycle).
   */
  currentAncestry(domain: string, stop: string, limit: number): { links: CheckpointLink[]; disks: CheckpointDiskRow[]; complete: boolean } {
    const rows = this.db
      .prepare(
        `WITH RECURSIVE up(name, parent, is_current, created_seq, depth) AS (
          SELECT name, parent, is_current, created_seq, 1 FROM checkpoints WHERE domain = @domain AND is_current = 1
          UNION ALL
          SELECT c.name, c.parent, c.is_current, c.created_seq, up.depth + 1 FROM up JOIN checkpoints c ON c.domain = @domain AND c.name = up.parent
          WHERE up.name <> @stop AND up.depth < @limit
        )
        SELECT up.name, up.parent, up.is_current, up.created_seq, d.target, d.disk_id, d.mode, d.bitmap
        FROM up LEFT JOIN checkpoint_disks d ON d.domain = @domain AND d.checkpoint = up.name ORDER BY up.depth, d.rowid`,
      )
      .all({ domain, stop, limit }) as Array<Omit<CheckpointLink, 'domain'> & { target: string | null; disk_id: string | null; mode: 'bitmap' | 'no' | null; bitmap: string | null }>;
    const links: CheckpointLink[] = [];
    const disks: CheckpointDiskRow[] = [];
    const seen = new Set<string>();
    for (const r of rows) {
      if (!seen.has(r.name)) {
        seen.add(r.name);
        links.push({ domain, name: r.name, parent: r.parent, is_current: r.is_current, created_seq: r.created_seq });
      }
      if (r.target !== null && r.mode !== null) disks.push({ domain, checkpoint: r.name, target: r.target, disk_id: r.disk_id, mode: r.mode, bitmap: r.bitmap });
    }
    const last = links.at(-1);
    return { links, disks, complete: links.length < limit || last === undefined || last.name === stop || last.parent === null };
  }

  summaries(domain: string): CheckpointSummaryRow[] {
    return this.db
      .prepare('SELECT domain, name, parent, description, creation_time, journal_seq, is_current, created_seq FROM checkpoints WHERE domain = ? ORDER BY created_seq')
      .all(domain) as CheckpointSummaryRow[];
  }

  childCount(domain: string, name: string): number {
    return (this.db.prepare('SELECT COUNT(*) AS n FROM checkpoints WHERE domain = ? AND parent = ?').get(domain, name) as { n: number }).n;
  }

  /** Whether some checkpoint of the domain owns bitmap `bitmap` on disk `diskId`. */
  ownsBitmap(domain: string, diskId: string, bitmap: string): boolean {
    return this.db.prepare('SELECT 1 FROM checkpoint_disks WHERE domain = ? AND disk_id = ? AND bitmap = ? LIMIT 1').get(domain, diskId, bitmap) !== undefined;
  }

  get(domain: string, name: string): CheckpointRow | undefined {
    return this.db.prepare('SELECT * FROM checkpoints WHERE domain = ? AND name = ?').get(domain, name) as CheckpointRow | undefined;
  }

  current(domain: string): CheckpointRow | undefined {
    return this.db.prepare('SELECT * FROM checkpoints WHERE domain = ? AND is_current = 1').get(domain) as CheckpointRow | undefined;
  }

  disks(domain: string, checkpoint?: string): CheckpointDiskRow[] {
    if (checkpoint === undefined) {
      return this.db.prepare('SELECT * FROM checkpoint_disks WHERE domain = ? ORDER BY rowid').all(domain) as CheckpointDiskRow[];
    }
    return this.db
      .prepare('SELECT * FROM checkpoint_disks WHERE domain = ? AND checkpoint = ? ORDER BY rowid')
      .all(domain, checkpoint) as CheckpointDiskRow[];
  }

  nextCreatedSeq(domain: string): number {
    const row = this.db.prepare('SELECT MAX(created_seq) AS m FROM checkpoints WHERE domain = ?').get(domain) as { m: number | null };
    return (row.m ?? 0) + 1;
  }

  insert(row: CheckpointRow, disks: readonly CheckpointDiskRow[]): void {
    this.db
      .prepare(
        `INSERT INTO checkpoints (domain, name, parent, description, creation_time, domain_xml, journal_seq, is_current, created_seq)
         VALUES (@domain, @name, @parent, @description, @creation_time, @domain_xml, @journal_seq, @is_current, @created_seq)`,
      )
      .run(row);
    const ins = this.db.prepare(
      'INSERT INTO checkpoint_disks (domain, checkpoint, target, disk_id, mode, bitmap) VALUES (@domain, @checkpoint, @target, @disk_id, @mode, @bitmap)',
    );
    for (const d of disks) ins.run(d);
  }

  remove(domain: string, name: string): void {
    this.db.prepare('DELETE FROM checkpoints WHERE domain = ? AND name = ?').run(domain, name);
    this.db.prepare('DELETE FROM coverage_losses WHERE domain = ? AND checkpoint = ?').run(domain, name);
    // A later checkpoint with the same name must not inherit this one's backup files.
    this.db.prepare('DELETE FROM backup_targets WHERE domain = ? AND checkpoint = ?').run(domain, name);
  }

  updateDescription(domain: string, name: string, description: string | null, domainXml: string): void {
    this.db.prepare('UPDATE checkpoints SET description = ?, domain_xml = ? WHERE domain = ? AND name = ?').run(description, domainXml, domain, name);
  }

  setParent(domain: string, name: string, parent: string | null): void {
    this.db.prepare('UPDATE checkpoints SET parent = ? WHERE domain = ? AND name = ?').run(parent, domain, name);
  }

  reparentChildren(domain: string, from: string, to: string | null): void {
    this.db.prepare('UPDATE checkpoints SET parent = ? WHERE domain = ? AND parent = ?').run(to, domain, from);
  }

  setCurrent(domain: string, name: string | null): void {
    this.db.prepare('UPDATE checkpoints SET is_current = 0 WHERE domain = ? AND is_current = 1').run(domain);
    if (name !== null) this.db.prepare('UPDATE checkpoints SET is_current = 1 WHERE domain = ? AND name = ?').run(domain, name);
  }

  losses(domain: string): CoverageLossRow[] {
    return this.db.prepare('SELECT * FROM coverage_losses WHERE domain = ?').all(domain) as CoverageLossRow[];
  }

  /** Records the first reason a disk lost a checkpoint's bitmap; later findings keep the first. */
  recordLoss(domain: string, diskId: string, checkpoint: string, reason: string, detail: string): void {
    this.db
      .prepare('INSERT OR IGNORE INTO coverage_losses (domain, disk_id, checkpoint, reason, detail, at_ms) VALUES (?, ?, ?, ?, ?, ?)')
      .run(domain, diskId, checkpoint, reason, detail, Date.now());
  }

  getOperation(domain: string): PendingOperation | undefined {
    const row = this.db.prepare('SELECT * FROM operations WHERE domain = ?').get(domain) as OperationRow | undefined;
    if (row === undefined) return undefined;
    try {
      return { ...row, payload: JSON.parse(row.payload) as unknown };
    } catch (err) {
      throw new QbackupError('METADATA_INCONSISTENT', `Cannot read the interrupted ${row.kind} of domain "${domain}": its journal entry is not JSON`, { cause: err });
    }
  }

  beginOperation(domain: string, kind: string, payload: unknown): void {
    this.db.prepare('INSERT INTO operations (domain, kind, payload, started_ms) VALUES (?, ?, ?, ?)').run(domain, kind, JSON.stringify(payload), Date.now());
  }

  endOperation(domain: string): void {
    this.db.prepare('DELETE FROM operations WHERE domain = ?').run(domain);
  }
}
