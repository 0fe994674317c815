// API tokens of the daemon (qbackup serve). A token is 32 random bytes shown
// once at creation; only its SHA-256 is stored, so a copy of the database
// does not let anyone in. Tokens are high-entropy, so a plain hash (no salt,
// no slow KDF) is enough and lookups stay one indexed query.

import { createHash, randomBytes } from 'node:crypto';
import { QbackupError } from '../errors.js';
import type { Db } from './db.js';

export interface TokenInfo {
  name: string;
  readOnly: boolean;
  createdMs: number;
  lastUsedMs: number | null;
}

interface TokenRow {
  name: string;
  read_only: number;
  created_ms: number;
  last_used_ms: number | null;
}

export const TOKEN_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

function toInfo(r: TokenRow): TokenInfo {
  return { name: r.name, readOnly: r.read_only === 1, createdMs: r.created_ms, lastUsedMs: r.last_used_ms };
}

export class TokenStore {
  constructor(readonly db: Db) {}

  /** Creates a token and returns its secret, which is never stored or shown again. */
  create(name: string, options: { readOnly?: boolean } = {}): { info: TokenInfo; token: string } {
    if (!TOKEN_NAME_PATTERN.test(name)) {
      throw new QbackupError('INVALID_NAME', `Invalid token name "${name}": use 1 to 64 letters, digits, dots, dashes or underscores, starting with a letter or digit`);
    }
    const token = `qbt_${randomBytes(32).toString('base64url')}`;
    const now = Date.now();
    const inserted = this.db
      .prepare('INSERT OR IGNORE INTO api_tokens (name, hash, read_only, created_ms) VALUES (?, ?, ?, ?)')
      .run(name, hashToken(token), options.readOnly === true ? 1 : 0, now);
    if (inserted.changes === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot create token "${name}": a token of that name exists`);
    return { info: { name, readOnly: options.readOnly === true, createdMs: now, lastUsedMs: null }, token };
  }

  list(): TokenInfo[] {
    return (this.db.prepare('SELECT name, read_only, created_ms, last_used_ms FROM api_tokens ORDER BY name').all() as TokenRow[]).map(toInfo);
  }

  count(): number {
    return (this.db.prepare('SELECT count(*) AS n FROM api_tokens').get() as { n: number }).n;
  }

  revoke(name: string): void {
    const r = this.db.prepare('DELETE FROM api_tokens WHERE name = ?').run(name);
    if (r.changes === 0) throw new QbackupError('INVALID_ARGUMENT', `Cannot revoke token "${name}": there is no token of that name`);
  }

  /** The token's owner, or undefined when the secret matches no token (never stored, or revoked). */
  authenticate(token: string): TokenInfo | undefined {
    const row = this.db.prepare('SELECT name, read_only, created_ms, last_used_ms FROM api_tokens WHERE hash = ?').get(hashToken(token)) as TokenRow | undefined;
    return row === undefined ? undefined : toInfo(row);
  }

  /** Records that a token was used; at most once a minute per token, to spare the database. */
  touch(info: TokenInfo, nowMs = Date.now()): void {
    if (info.lastUsedMs !== null && nowMs - info.lastUsedMs < 60_000) return;
    this.db.prepare('UPDATE api_tokens SET last_used_ms = ? WHERE name = ?').run(nowMs, info.name);
  }
}
