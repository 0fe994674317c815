// SQL access to instant restores: the record of the one running per domain
// (JSON, one row, replaced whole in a transaction) and the last result. Rules
// live in src/instant.

import type { Db } from './db.js';

export class InstantStore {
  constructor(readonly db: Db) {}

  record(domain: string): string | undefined {
    return (this.db.prepare('SELECT record FROM instant_restores WHERE domain = ?').get(domain) as { record: string } | undefined)?.record;
  }

  saveRecord(domain: string, record: string): void {
    this.db
      .prepare('INSERT INTO instant_restores (domain, record, changed_ms) VALUES (?, ?, ?) ON CONFLICT (domain) DO UPDATE SET record = excluded.record, changed_ms = excluded.changed_ms')
      .run(domain, record, Date.now());
  }

  /** Ends a restore: the record goes and the result stays, in one transaction. */
  finish(domain: string, result: string): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM instant_restores WHERE domain = ?').run(domain);
      this.db
        .prepare('INSERT INTO instant_results (domain, result, ended_ms) VALUES (?, ?, ?) ON CONFLICT (domain) DO UPDATE SET result = excluded.result, ended_ms = excluded.ended_ms')
        .run(domain, result, Date.now());
    }).immediate();
  }

  /** Forgets the domain's restore and result (a failed begin, an undefine). */
  forget(domain: string): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM instant_restores WHERE domain = ?').run(domain);
      this.db.prepare('DELETE FROM instant_results WHERE domain = ?').run(domain);
    }).immediate();
  }

  /** The domains with a restore record. */
  domains(): string[] {
    return (this.db.prepare('SELECT domain FROM instant_restores ORDER BY domain').all() as Array<{ domain: string }>).map((r) => r.domain);
  }

  result(domain: string): string | undefined {
    return (this.db.prepare('SELECT result FROM instant_results WHERE domain = ?').get(domain) as { result: string } | undefined)?.result;
  }
}
