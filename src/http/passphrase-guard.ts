// Failed repository passphrases (X-Repository-Password, X-Source-Repository-
// Password) counted per client and per repository. The first few failures
// are free (a typo); past them every attempt with a passphrase, right or
// wrong, is refused (429 RATE_LIMITED) until a back-off has passed, which
// doubles with each further failure up to a ceiling. A success clears the
// counts of its client and its repository. Counting per repository too means
// many clients cannot share out the guessing. In memory only, like the rate
// limit: a restart forgets, which costs a guesser a restart it cannot cause.

import { QbackupError } from '../errors.js';

export interface PassphraseBackoffOptions {
  /** Failures allowed before the back-off starts (default 3). */
  freeFailures?: number;
  /** The first back-off (default 1 s), doubling with each further failure. */
  baseDelayMs?: number;
  /** The longest back-off (default 15 minutes). */
  maxDelayMs?: number;
}

interface Count {
  failures: number;
  untilMs: number;
}

export class PassphraseGuard {
  private readonly counts = new Map<string, Count>();
  private readonly freeFailures: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;

  constructor(options: PassphraseBackoffOptions = {}) {
    this.freeFailures = options.freeFailures ?? 3;
    this.baseDelayMs = options.baseDelayMs ?? 1000;
    this.maxDelayMs = options.maxDelayMs ?? 15 * 60 * 1000;
  }

  /** Throws RATE_LIMITED while `client` or `repo` waits out a back-off. */
  assertAllowed(client: string, repo: string, nowMs = Date.now()): void {
    for (const [key, what] of [[`client:${client}`, `client "${client}"`], [`repo:${repo}`, `repository "${repo}"`]] as const) {
      const c = this.counts.get(key);
      if (c !== undefined && c.untilMs > nowMs) {
        const s = Math.ceil((c.untilMs - nowMs) / 1000);
        throw new QbackupError('RATE_LIMITED', `Too many wrong passphrases for ${what} (${c.failures}): retry in ${s} s`);
      }
    }
  }

  failed(client: string, repo: string, nowMs = Date.now()): void {
    for (const key of [`client:${client}`, `repo:${repo}`]) {
      const c = this.counts.get(key) ?? { failures: 0, untilMs: 0 };
      c.failures++;
      const over = c.failures - this.freeFailures;
      if (over >= 0) c.untilMs = nowMs + Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** Math.min(over, 30));
      this.counts.set(key, c);
    }
    if (this.counts.size > 10_000) this.forgetIdle(nowMs);
  }

  succeeded(client: string, repo: string): void {
    this.counts.delete(`client:${client}`);
    this.counts.delete(`repo:${repo}`);
  }

  private forgetIdle(nowMs: number): void {
    for (const [k, c] of this.counts) if (c.untilMs + this.maxDelayMs < nowMs) this.counts.delete(k);
  }
}
