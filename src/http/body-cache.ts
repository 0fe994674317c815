// Serialized JSON bodies of GET answers that depend on the metadata alone
// (the checkpoint list and tree), kept per request key with the library's
// change stamp read before the answer was computed. A request whose stamp is
// unchanged is answered with the same bytes, not listed and serialized again
// (a list of 1000 checkpoints is ~220 KiB of JSON); its ETag lets a client
// that has those bytes get a 304 instead.
//
// Invariants:
// - The stamp is read before the answer is computed, so a change committed
//   while it is computed makes the next stamp differ: a body is never served
//   for a stamp newer than the data it was made from.
// - Errors are never kept: a request that throws is answered by the error
//   handler as before and leaves nothing here.
// - At most `maxEntries` bodies are kept (least recently used go first).

import { randomBytes } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';

interface Entry {
  stamp: string;
  body: Buffer;
  etag: string;
}

export class SerializedBodyCache {
  private readonly entries = new Map<string, Entry>();
  /** ETags of another daemon process (or one before a restart) never match ours. */
  private readonly epoch = randomBytes(6).toString('hex');

  constructor(private readonly maxEntries = 32) {}

  /**
   * Answers `request` with the JSON of `produce()`, or with the bytes kept for
   * `key` when `stamp` is the one they were made under (a 304 when the client
   * already has them).
   */
  send(request: FastifyRequest, reply: FastifyReply, key: string, stamp: string, produce: () => unknown): FastifyReply {
    let entry = this.entries.get(key);
    if (entry?.stamp === stamp) {
      // Most recently used last, so the first key is the one to drop.
      this.entries.delete(key);
      this.entries.set(key, entry);
    } else {
      entry = { stamp, body: Buffer.from(JSON.stringify(produce() ?? null)), etag: `"${this.epoch}-${stamp}"` };
      this.entries.delete(key);
      this.entries.set(key, entry);
      while (this.entries.size > this.maxEntries) {
        const oldest = this.entries.keys().next();
        if (oldest.done === true) break;
        this.entries.delete(oldest.value);
      }
    }
    void reply.header('etag', entry.etag);
    if (matches(request.headers['if-none-match'], entry.etag)) return reply.code(304).send();
    return reply.code(200).header('content-type', 'application/json; charset=utf-8').send(entry.body);
  }

  /** How many bodies are kept (for tests). */
  get size(): number {
    return this.entries.size;
  }
}

/** Whether an If-None-Match header names `etag` (weak comparison, as RFC 9110 asks for GET). */
function matches(header: string | undefined, etag: string): boolean {
  if (header === undefined) return false;
  if (header.trim() === '*') return true;
  return header.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}
