// Serving a backup over NBD: one read-only export per disk, named after the
// disk's target, all on one socket, read straight from the repository
// (docs/design.md, "Serving backups").
//
// Invariants:
// - A backup is served from its index chain resolved in memory; every chunk
//   is read through Store.readChunks, so it is decompressed, decrypted and
//   checked against its id (on the decode pool) before any byte of it is sent. A chunk that fails
//   (damaged, missing, the repository gone) fails that read with EIO and one
//   log line; the server keeps serving.
// - Zero slots are holes: reads send them as NBD_REPLY_TYPE_OFFSET_HOLE and
//   base:allocation reports them as hole|zero.
// - The server never writes to the repository except its lock: a `serve`
//   lock, held while serving, that gc counts like a running backup, so the
//   chunks of a served backup are never deleted under a client even when
//   the backup is pruned meanwhile.
// - Decoded chunks are kept in a small LRU cache shared by every export of
//   the server; concurrent reads of one chunk decode it once, and the misses
//   of one read that lie back to back in a pack come in one ranged read.
//   Chunks read together share their buffer (no copies), and the cache's
//   bound counts the shared buffers it keeps alive.
// - Reads that come in ascending order (a copy job streaming the disk: QEMU's
//   block-stream asks for one piece at a time) make the export read ahead:
//   the next data chunks, a bounded window of batches, are fetched and
//   decoded into the cache before they are asked for, so the next request is
//   answered from memory. Read-ahead goes through the same cache path (each
//   chunk checked against its id); its failures are not cached, so a chunk
//   that failed ahead is read again, and fails its read, when asked.
// - Pack ranges are read into pooled memory (read-buffers.ts), which the
//   decode workers hand back holding the plaintexts (in place for chunks
//   stored raw, else after the read's bytes, which the pool makes room for); a
//   buffer goes back to the pool only when no cache entry, no read waiting
//   for its chunks and no reply being written refers to it.

import { mkdtemp, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { QbackupError, describeError } from '../errors.js';
import { NBD_EIO, NBD_STATE_HOLE, NBD_STATE_ZERO } from '../nbd/constants.js';
import type { NbdBlockDescriptor } from '../nbd/codec.js';
import { NbdExportError, type NbdExportSegment, type NbdServerExport } from '../nbd/server-session.js';
import { NbdServer, listenUri, loadTlsCredentials, type NbdListen, type NbdTlsCredentials } from '../nbd/server.js';
import { makePrivateDir } from '../util/private-dir.js';
import { fitsInPlace } from './chunk-worker.js';
import { ZERO_ID } from './chunk.js';
import type { FullIndex } from './disk-index.js';
import { acquireLock } from './locks.js';
import type { Manifest } from './manifest.js';
import { ReadBufferPool } from './read-buffers.js';
import type { Store } from './store.js';

/** Decoded chunks kept for repeated reads, shared by the exports of one server. */
export const DEFAULT_CACHE_BYTES = 32 * 1024 * 1024;
/** Ranged pack reads of one request in flight at once. */
const CHUNK_READS_IN_FLIGHT = 8;
/** Chunks per read-ahead batch (one fetch, so one wait for its slowest run). */
export const READ_AHEAD_BATCH_CHUNKS = 32;
/** Read-ahead batches fetched or held ahead of an ascending reader, per export. */
export const READ_AHEAD_BATCHES = 4;

export type ServeListen =
  /** A unix socket; without `socket`, `nbd.sock` in a fresh 0700 directory under `runDir`. */
  | { transport: 'unix'; socket?: string }
  /** TCP: TLS with x509 credentials from `tlsCertDir`, or clear text only with `noTls`. */
  | { transport: 'tcp'; host: string; port: number; tlsCertDir?: string; noTls?: boolean };

export interface ServeBackupOptions {
  domain: string;
  /** Default: the newest backup of the domain. */
  backup?: string;
  /** Targets to export; default every disk of the backup. */
  disks?: readonly string[];
  listen: ServeListen;
  /** Where the default socket directory is made (the state directory's run area). */
  runDir?: string;
  /** One line per failed read or dropped client. */
  log?: (line: string) => void;
  /** Default DEFAULT_CACHE_BYTES, raised to hold every export's read-ahead window twice. */
  cacheBytes?: number | undefined;
  /** Read ahead of ascending readers (default true). */
  readAhead?: boolean | undefined;
  /**
   * Offer base:allocation (default true). False for a client copying into
   * an image that already marks the backup's holes (an instant restore's
   * overlays): QEMU 7.2's block-stream would otherwise ask twice per piece.
   */
  blockStatus?: boolean | undefined;
}

export interface ServedExport {
  /** The disk's target, e.g. "sda". */
  name: string;
  size: number;
  uri: string;
}

export interface BackupServer extends AsyncDisposable {
  domain: string;
  backup: string;
  exports: ServedExport[];
  /** The server without an export name, e.g. nbd+unix:///?socket=PATH. */
  uri: string;
  listen: NbdListen;
  tls: boolean;
  /** Stops serving, hangs up every client, removes the socket (and its directory when made here) and releases the lock. Idempotent. */
  close(): Promise<void>;
}

/**
 * Decoded chunks by hex id, least recently used first out, bounded in bytes.
 * Misses are fetched together: chunks that lie back to back in one pack come
 * in one ranged read, and a chunk being fetched for one read is not fetched
 * again for another. Failures are per chunk and never cached. Ranged reads
 * land in pooled memory; every chunk handed out is held (`pool`) until the
 * taker lets it go (release, unpin).
 */
export class ChunkCache {
  private readonly entries = new Map<string, Buffer>();
  private readonly loading = new Map<string, { promise: Promise<Buffer>; waiters: number }>();
  /** Entries per underlying buffer; `bytes` counts each buffer held once. */
  private readonly holders = new Map<ArrayBufferLike, number>();
  private bytes = 0;
  readonly pool: ReadBufferPool;

  constructor(
    private readonly store: Store,
    private readonly capacityBytes: number,
  ) {
    // Free memory up to the cache's bound: what a streaming reader's read-ahead cycles through, twice.
    this.pool = new ReadBufferPool(Math.max(8 * 1024 * 1024, capacityBytes));
  }

  /**
   * Each chunk's plaintext, or the error that kept it from being read. Each
   * plaintext handed out is held once: give the map to release() when done
   * with it (after taking holds of one's own with pin()).
   */
  async getMany(ids: readonly Buffer[]): Promise<Map<string, Buffer | Error>> {
    const out = new Map<string, Buffer | Error>();
    const seen = new Set<string>();
    const waits: Array<Promise<void>> = [];
    const misses: Array<{ id: Buffer; hex: string; resolve: (b: Buffer) => void; reject: (e: Error) => void }> = [];
    for (const id of ids) {
      const hex = id.toString('hex');
      if (seen.has(hex)) continue;
      seen.add(hex);
      const hit = this.entries.get(hex);
      if (hit !== undefined) {
        this.entries.delete(hex);
        this.entries.set(hex, hit);
        this.pin(hit);
        out.set(hex, hit);
        continue;
      }
      let pending = this.loading.get(hex);
      if (pending === undefined) {
        let resolve!: (b: Buffer) => void;
        let reject!: (e: Error) => void;
        const promise = new Promise<Buffer>((res, rej) => ((resolve = res), (reject = rej)));
        promise.catch(() => undefined); // observed below; an unawaited duplicate must not crash the process
        pending = { promise, waiters: 0 };
        this.loading.set(hex, pending);
        misses.push({ id, hex, resolve, reject });
      }
      // Held for this caller when it settles (fetch), before any eviction can let its memory go.
      pending.waiters++;
      waits.push(pending.promise.then((b) => void out.set(hex, b), (e: unknown) => void out.set(hex, e instanceof Error ? e : new Error(String(e)))));
    }
    await this.fetch(misses);
    await Promise.all(waits);
    return out;
  }

  /** One more hold of a chunk's memory (see getMany). */
  pin(data: Buffer): void {
    this.pool.ref(data.buffer);
  }

  /** Lets go of a hold taken by pin(). */
  unpin(data: Buffer): void {
    this.pool.unref(data.buffer);
  }

  /** Lets go of the holds getMany took for its caller. */
  release(got: ReadonlyMap<string, Buffer | Error>): void {
    for (const r of got.values()) if (r instanceof Buffer) this.unpin(r);
  }

  private async fetch(misses: Array<{ id: Buffer; hex: string; resolve: (b: Buffer) => void; reject: (e: Error) => void }>): Promise<void> {
    const settle = (m: (typeof misses)[number], result: Buffer | Error): void => {
      const waiters = this.loading.get(m.hex)?.waiters ?? 0;
      this.loading.delete(m.hex);
      if (result instanceof Error) m.reject(result);
      else {
        for (let i = 0; i < waiters; i++) this.pin(result);
        this.put(m.hex, result);
        m.resolve(result);
      }
    };
    if (misses.length === 0) return;
    let results: Awaited<ReturnType<Store['readChunks']>>;
    try {
      results = await this.store.readChunks(misses.map((m) => m.id), { readsInFlight: CHUNK_READS_IN_FLIGHT, readBuffer: (n, entries) => this.pool.take(fitsInPlace(entries, n) ? n : n + entries.reduce((t, e) => t + e.rawLength, 0)) });
    } catch (err) {
      for (const m of misses) settle(m, err instanceof Error ? err : new Error(String(err)));
      return;
    }
    for (const [i, m] of misses.entries()) {
      const r = results[i];
      if (r === undefined) settle(m, new Error(`chunk ${m.hex} was not read`));
      else if ('error' in r) settle(m, r.error.code === 'REPO_OBJECT_NOT_FOUND' && this.store.locate(m.id) === undefined ? new QbackupError('REPO_OBJECT_NOT_FOUND', `the repository has no chunk ${m.hex}`) : r.error);
      else settle(m, r.data);
    }
  }

  /**
   * Keeps a chunk. Chunks read together share one buffer (no copy is made),
   * so the bound counts the buffers they keep alive, each once, not the
   * chunks' own lengths.
   */
  private put(hex: string, data: Buffer): void {
    if (data.buffer.byteLength > this.capacityBytes || this.entries.has(hex)) return;
    this.entries.set(hex, data);
    this.hold(data, 1);
    this.pin(data);
    for (const [k, v] of this.entries) {
      if (this.bytes <= this.capacityBytes) break;
      this.entries.delete(k);
      this.hold(v, -1);
      this.unpin(v);
    }
  }

  private hold(data: Buffer, delta: 1 | -1): void {
    const buffer = data.buffer;
    const n = (this.holders.get(buffer) ?? 0) + delta;
    if (n === 0) {
      this.holders.delete(buffer);
      this.bytes -= buffer.byteLength;
    } else {
      if (n === 1 && delta === 1) this.bytes += buffer.byteLength;
      this.holders.set(buffer, n);
    }
  }
}

/** One disk of a backup as an NBD export. */
export class BackupDiskExport implements NbdServerExport {
  readonly size: number;
  readonly preferredBlockBytes: number;
  private readonly chunkSize: number;
  private readonly slots: number;
  /** End (exclusive, in bytes) of the previous read: a read starting at or after it is ascending. */
  private lastEnd = 0;
  /** First slot not yet handed to read-ahead. */
  private aheadSlot = 0;
  /** Read-ahead batches not yet passed by the reader: the slot after each one's last chunk. */
  private readonly ahead: number[] = [];

  constructor(
    readonly name: string,
    readonly description: string,
    private readonly table: FullIndex,
    private readonly cache: ChunkCache,
    private readonly readAhead = true,
    readonly reportsAllocation = true,
  ) {
    this.size = table.virtualSize;
    this.chunkSize = table.chunkSize;
    this.slots = Math.ceil(table.virtualSize / table.chunkSize);
    this.preferredBlockBytes = Math.max(512, Math.min(table.chunkSize, 1 << 20));
  }

  /** Bytes a reader streaming this export keeps ahead of it at most. */
  static readAheadBytes(chunkSize: number): number {
    return READ_AHEAD_BATCH_CHUNKS * READ_AHEAD_BATCHES * chunkSize;
  }

  /**
   * After an ascending read that ended before slot `next`: drops the batches
   * the reader has passed and starts new ones up to the window, each the next
   * READ_AHEAD_BATCH_CHUNKS data chunks (holes skipped). A read that goes
   * back (a guest's) stops read-ahead until reads ascend again; one past the
   * window starts it over from where it ended.
   */
  private readAheadFrom(next: number, ascending: boolean): void {
    if (!ascending || next > this.aheadSlot) {
      this.ahead.length = 0;
      this.aheadSlot = next;
      if (!ascending) return;
    }
    while (this.ahead.length > 0 && (this.ahead[0] ?? 0) <= next) this.ahead.shift();
    while (this.ahead.length < READ_AHEAD_BATCHES && this.aheadSlot < this.slots) {
      const batch: Buffer[] = [];
      let slot = this.aheadSlot;
      for (; slot < this.slots && batch.length < READ_AHEAD_BATCH_CHUNKS; slot++) {
        const id = this.id(slot);
        if (!id.equals(ZERO_ID)) batch.push(id);
      }
      this.aheadSlot = slot;
      this.ahead.push(slot);
      // getMany never rejects (failures come back per chunk, uncached); the reader asks again.
      if (batch.length > 0) void this.cache.getMany(batch).then((got) => this.cache.release(got));
    }
  }

  private id(slot: number): Buffer {
    return this.table.ids.subarray(slot * 32, slot * 32 + 32);
  }

  async read(offset: number, length: number): Promise<NbdExportSegment[]> {
    if (length === 0) return [];
    const cs = this.chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    const wanted: Buffer[] = [];
    for (let slot = first; slot <= last; slot++) if (!this.id(slot).equals(ZERO_ID)) wanted.push(this.id(slot));
    const ascending = offset >= this.lastEnd;
    this.lastEnd = offset + length;
    const pending = this.cache.getMany(wanted);
    if (this.readAhead) this.readAheadFrom(last + 1, ascending);
    const got = await pending;
    const datas = new Map<number, Buffer>();
    try {
      for (let slot = first; slot <= last; slot++) {
        const id = this.id(slot);
        if (id.equals(ZERO_ID)) continue;
        const r = got.get(id.toString('hex'));
        if (!(r instanceof Buffer)) {
          throw new NbdExportError(NBD_EIO, `chunk ${id.toString('hex')} (disk offset ${slot * cs}) of ${this.description} cannot be read: ${describeError(r)}`);
        }
        datas.set(slot, r);
      }
      // One hold per data segment, let go in readDone once the reply is out.
      for (const d of datas.values()) this.cache.pin(d);
    } finally {
      this.cache.release(got);
    }
    const out: NbdExportSegment[] = [];
    for (let slot = first; slot <= last; slot++) {
      const start = Math.max(offset, slot * cs);
      const end = Math.min(offset + length, (slot + 1) * cs);
      const data = datas.get(slot);
      const prev = out.at(-1);
      if (data === undefined && prev !== undefined && prev.data === undefined) prev.length += end - start;
      else out.push({ offset: start, length: end - start, data: data?.subarray(start - slot * cs, end - slot * cs) });
    }
    return out;
  }

  readDone(segments: readonly NbdExportSegment[]): void {
    for (const s of segments) if (s.data !== undefined) this.cache.unpin(s.data);
  }

  async blockStatus(offset: number, length: number, maxDescriptors: number): Promise<NbdBlockDescriptor[]> {
    const cs = this.chunkSize;
    const end = offset + length;
    const out: NbdBlockDescriptor[] = [];
    for (let slot = Math.floor(offset / cs); slot * cs < end; slot++) {
      const flags = this.id(slot).equals(ZERO_ID) ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0;
      const bytes = Math.min(end, (slot + 1) * cs) - Math.max(offset, slot * cs);
      const prev = out.at(-1);
      if (prev !== undefined && prev.flags === flags) prev.length += bytes;
      else if (out.length === maxDescriptors) break;
      else out.push({ length: bytes, flags });
      // A descriptor length is 32 bits; NBD_CMD_BLOCK_STATUS lengths are too, so the sum never overflows one.
    }
    return out;
  }
}

/** Serves the chosen disks of one backup until close(). */
export async function serveBackup(store: Store, options: ServeBackupOptions): Promise<BackupServer> {
  const tlsCreds = tlsFor(options.listen);
  const lock = await acquireLock(store.backend, 'serve', options.domain);
  const cleanups: Array<() => Promise<void>> = [() => lock.release()];
  const undo = async (): Promise<void> => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  };
  try {
    const m = pickBackup((await store.readableManifests(options.domain)).manifests, options.domain, options.backup);
    const disks = chooseDisks(m, options.disks);
    await store.loadChunks();
    const readAhead = options.readAhead ?? true;
    const window = readAhead ? 2 * disks.length * BackupDiskExport.readAheadBytes(store.config.chunkSize) : 0;
    const cache = new ChunkCache(store, Math.max(options.cacheBytes ?? DEFAULT_CACHE_BYTES, window));
    const exports: BackupDiskExport[] = [];
    for (const d of disks) exports.push(new BackupDiskExport(d.target, `disk "${d.target}" of backup "${m.id}" of domain "${m.domain}"`, await store.resolveIndex(d.index), cache, readAhead, options.blockStatus ?? true));
    const listen = await listenAddress(options, cleanups);
    const server = await NbdServer.start({ exports, listen, ...(tlsCreds !== undefined ? { tls: tlsCreds } : {}), ...(options.log !== undefined ? { log: options.log } : {}) });
    cleanups.push(() => server.close());
    return served(server, m, exports, undo);
  } catch (err) {
    await undo();
    throw err;
  }
}

/** The handle callers get; `undo` closes the server, removes the socket directory and releases the lock. */
function served(server: NbdServer, m: Manifest, exports: readonly BackupDiskExport[], undo: () => Promise<void>): BackupServer {
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => (closing ??= undo());
  return {
    domain: m.domain,
    backup: m.id,
    exports: exports.map((e) => ({ name: e.name, size: e.size, uri: server.uri(e.name) })),
    uri: listenUri(server.listen, '', server.tls),
    listen: server.listen,
    tls: server.tls,
    close,
    [Symbol.asyncDispose]: close,
  };
}

function tlsFor(listen: ServeListen): NbdTlsCredentials | undefined {
  if (listen.transport === 'unix') return undefined;
  const where = `${listen.host}:${listen.port}`;
  if (listen.tlsCertDir !== undefined && listen.noTls === true) throw new QbackupError('INVALID_ARGUMENT', `Cannot serve on ${where}: give either a TLS certificate directory or no-TLS, not both`);
  if (listen.tlsCertDir !== undefined) return loadTlsCredentials(listen.tlsCertDir);
  if (listen.noTls !== true) {
    throw new QbackupError('NOT_SUPPORTED', `Cannot serve backups on TCP ${where} without TLS: give a TLS certificate directory (--tls-cert-dir), or --no-tls to serve in clear text`);
  }
  return undefined;
}

/** The listening address; a default unix socket goes in a fresh private directory that close() removes. */
async function listenAddress(options: ServeBackupOptions, cleanups: Array<() => Promise<void>>): Promise<NbdListen> {
  const l = options.listen;
  if (l.transport === 'tcp') return { transport: 'tcp', host: l.host, port: l.port };
  if (l.socket !== undefined) {
    if ((await stat(l.socket).catch(() => undefined)) !== undefined) throw new QbackupError('INVALID_ARGUMENT', `Cannot serve on socket "${l.socket}": it exists`);
    return { transport: 'unix', socket: l.socket };
  }
  if (options.runDir === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Cannot serve on a unix socket: give its path or a run directory for a default one');
  makePrivateDir(options.runDir);
  const dir = await mkdtemp(join(options.runDir, 'serve-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return { transport: 'unix', socket: join(dir, 'nbd.sock') };
}

function pickBackup(manifests: readonly Manifest[], domain: string, id: string | undefined): Manifest {
  const m = id !== undefined ? manifests.find((x) => x.id === id) : manifests.at(-1);
  if (m === undefined) throw new QbackupError('BACKUP_NOT_FOUND', id !== undefined ? `Repository has no backup "${id}" of domain "${domain}"` : `Repository has no backup of domain "${domain}"`);
  return m;
}

function chooseDisks(m: Manifest, targets: readonly string[] | undefined): Manifest['disks'] {
  if (targets === undefined || targets.length === 0) return m.disks;
  return [...new Set(targets)].map((t) => {
    const d = m.disks.find((x) => x.target === t);
    if (d === undefined) throw new QbackupError('DISK_NOT_FOUND', `Backup "${m.id}" of domain "${m.domain}" has no disk "${t}"`);
    return d;
  });
}
