// A token bucket per client address: each request takes one token; tokens
// come back at `ratePerSec` up to `burst`. Past that a request is 429
// RATE_LIMITED. In memory only: limits protect the daemon from a runaway
// script, they are not accounting.

import { QbackupError } from '../errors.js';

export interface RateLimitOptions {
  ratePerSec: number;
  burst: number;
}

export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; atMs: number }>();

  constructor(private readonly options: RateLimitOptions) {}

  /** Takes a token for `client` or throws RATE_LIMITED. */
  take(client: string, nowMs = Date.now()): void {
    const b = this.buckets.get(client) ?? { tokens: this.options.burst, atMs: nowMs };
    b.tokens = Math.min(this.options.burst, b.tokens + ((nowMs - b.atMs) / 1000) * this.options.ratePerSec);
    b.atMs = nowMs;
    if (b.tokens < 1) {
      this.buckets.set(client, b);
      throw new QbackupError('RATE_LIMITED', `Too many requests from ${client}: at most ${this.options.ratePerSec} a second (bursts of ${this.options.burst}); retry later`);
    }
    b.tokens -= 1;
    this.buckets.set(client, b);
    if (this.buckets.size > 10_000) this.forgetIdle(nowMs);
  }

  private forgetIdle(nowMs: number): void {
    const fullAfterMs = (this.options.burst / this.options.ratePerSec) * 1000;
    for (const [k, b] of this.buckets) if (nowMs - b.atMs > fullAfterMs) this.buckets.delete(k);
  }
}
