// SQL access to domains, disks, the disk attach/detach journal, and runtime
// state. No business rules here: callers (src/domain) decide, this module reads
// and writes rows, and multi-row changes run inside a caller's transaction.

import type { Db } from './db.js';

/**
 * starting: QEMU spawned by a start that has not yet seen it answer QMP (pid
 * set as soon as it exists); running; stopping: a shutdown sent quit;
 * shutoff; crashed: QEMU exited without our quit or kill.
 */
export type RuntimeState = 'starting' | 'running' | 'stopping' | 'shutoff' | 'crashed';

export interface DomainRow {
  name: string;
  uuid: string;
  xml: string;
  created_ms: number;
}

export interface DiskRow {
  id: string;
  domain: string;
  source: string;
  format: string;
  target: string;
  attached: number;
}

export interface DiskEventRow {
  seq: number;
  disk_id: string;
  event: 'attach' | 'detach';
  target: string;
  live: number;
  at_ms: number;
}

export interface RuntimeRow {
  domain: string;
  state: RuntimeState;
  reason: string;
  pid: number | null;
  pid_start: string | null;
  qmp_socket: string | null;
  changed_ms: number;
}

export class DomainStore {
  constructor(readonly db: Db) {}

  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn).immediate();
  }

  getDomain(name: string): DomainRow | undefined {
    return this.db.prepare('SELECT * FROM domains WHERE name = ?').get(name) as DomainRow | undefined;
  }

  getDomainByUuid(uuid: string): DomainRow | undefined {
    return this.db.prepare('SELECT * FROM domains WHERE uuid = ?').get(uuid) as DomainRow | undefined;
  }

  listDomains(): DomainRow[] {
    return this.db.prepare('SELECT * FROM domains ORDER BY name').all() as DomainRow[];
  }

  insertDomain(row: DomainRow): void {
    this.db.prepare('INSERT INTO domains (name, uuid, xml, created_ms) VALUES (@name, @uuid, @xml, @created_ms)').run(row);
  }

  updateDomainXml(name: string, xml: string): void {
    this.db.prepare('UPDATE domains SET xml = ? WHERE name = ?').run(xml, name);
  }

  deleteDomain(name: string): void {
    this.db.prepare('DELETE FROM domains WHERE name = ?').run(name);
  }

  disksOf(domain: string): DiskRow[] {
    return this.db.prepare('SELECT * FROM disks WHERE domain = ? ORDER BY rowid').all(domain) as DiskRow[];
  }

  diskBySource(domain: string, source: string): DiskRow | undefined {
    return this.db.prepare('SELECT * FROM disks WHERE domain = ? AND source = ?').get(domain, source) as DiskRow | undefined;
  }

  /** An attached disk of any other domain that uses this image. */
  attachedElsewhere(domain: string, source: string): DiskRow | undefined {
    return this.db.prepare('SELECT * FROM disks WHERE domain != ? AND source = ? AND attached = 1').get(domain, source) as DiskRow | undefined;
  }

  /** Attached disks of every other domain. */
  attachedDisksOfOthers(domain: string): DiskRow[] {
    return this.db.prepare('SELECT * FROM disks WHERE domain != ? AND attached = 1').all(domain) as DiskRow[];
  }

  upsertDisk(row: DiskRow): void {
    this.db
      .prepare(
        `INSERT INTO disks (id, domain, source, format, target, attached) VALUES (@id, @domain, @source, @format, @target, @attached)
         ON CONFLICT (id) DO UPDATE SET format = excluded.format, target = excluded.target, attached = excluded.attached`,
      )
      .run(row);
  }

  /** The size each disk of the domain was last seen with. */
  diskSizes(domain: string): Map<string, number> {
    const rows = this.db.prepare('SELECT s.disk_id, s.size FROM disk_sizes s JOIN disks d ON d.id = s.disk_id WHERE d.domain = ?').all(domain) as Array<{ disk_id: string; size: number }>;
    return new Map(rows.map((r) => [r.disk_id, r.size]));
  }

  setDiskSize(diskId: string, size: number): void {
    this.db.prepare('INSERT INTO disk_sizes (disk_id, size, seen_ms) VALUES (?, ?, ?) ON CONFLICT (disk_id) DO UPDATE SET size = excluded.size, seen_ms = excluded.seen_ms').run(diskId, size, Date.now());
  }

  recordDiskEvent(diskId: string, event: 'attach' | 'detach', target: string, live: boolean): number {
    const info = this.db
      .prepare('INSERT INTO disk_events (disk_id, event, target, live, at_ms) VALUES (?, ?, ?, ?, ?)')
      .run(diskId, event, target, live ? 1 : 0, Date.now());
    return Number(info.lastInsertRowid);
  }

  diskEvents(diskId: string, afterSeq = 0): DiskEventRow[] {
    return this.db.prepare('SELECT * FROM disk_events WHERE disk_id = ? AND seq > ? ORDER BY seq').all(diskId, afterSeq) as DiskEventRow[];
  }

  /** The newest journal sequence number: a point in the global order of disk events. */
  journalHead(): number {
    const row = this.db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'disk_events'").get() as { seq: number } | undefined;
    return row?.seq ?? 0;
  }

  /** The newest journal sequence number of an event at or before `atMs`; 0 when there is none. */
  journalSeqAt(atMs: number): number {
    return (this.db.prepare('SELECT COALESCE(MAX(seq), 0) AS s FROM disk_events WHERE at_ms <= ?').get(atMs) as { s: number }).s;
  }

  getRuntime(domain: string): RuntimeRow | undefined {
    return this.db.prepare('SELECT * FROM runtime WHERE domain = ?').get(domain) as RuntimeRow | undefined;
  }

  setRuntime(row: Omit<RuntimeRow, 'changed_ms'>): void {
    this.db
      .prepare(
        `INSERT INTO runtime (domain, state, reason, pid, pid_start, qmp_socket, changed_ms)
         VALUES (@domain, @state, @reason, @pid, @pid_start, @qmp_socket, @changed_ms)
         ON CONFLICT (domain) DO UPDATE SET state = excluded.state, reason = excluded.reason, pid = excluded.pid,
           pid_start = excluded.pid_start, qmp_socket = excluded.qmp_socket, changed_ms = excluded.changed_ms`,
      )
      .run({ ...row, changed_ms: Date.now() });
  }
}
