// A format 2 repository on a backend: its config, keys, packs of chunks,
// disk indexes, manifests and locks.
//
//   config                         plain JSON: format 2, id, chunk size, compression, encrypted, checksum
//   keys/<id>                      the master key wrapped under a passphrase (encrypted repositories), checksum
//   data/<xx>/<pack id>            packs of stored chunks
//   index/<pack id>                each pack's header: which chunks it holds, where
//   indexes/<xx>/<index id>        disk indexes (full or delta), content-addressed
//   snapshots/<domain>/<backup id> manifests, the commit point of a backup
//   locks/<lock id>                who is backing up or collecting garbage
//   condemned/<kind>.<id>          garbage waiting for running backups to end (gc.ts)
//
// Invariants:
// - Every key is built here from validated ids (hex digests, backup ids,
//   domain names), never from the content of an object.
// - Chunks leave packs only through readChunks (readChunk is one of them)
//   and, for a restore from a local repository, copyChunksToFile (the same
//   grouping, read and written by the workers themselves):
//   chunks adjacent in a pack come in one ranged read, are decoded on the
//   decode pool's workers (decode.ts) and checked against their ids; packs
//   are read whole only by checkPack, which also hashes them against their
//   ids. Chunks enter packs only through ChunkWriter, encoded by encodeChunk
//   (chunk.ts) on the chunk pool's workers (pool.ts) or, for a few, here.
//   Indexes and manifests are checked when parsed.
// - The config and key files carry their own checksum (checksum.ts). A config
//   whose fields are usable but whose checksum fails still opens for reading
//   (every chunk is checked against its id anyway), is named by verify, and
//   refuses new backups and copies into it; a damaged key file is skipped
//   when another key opens the repository, and named by verify.

import assert from 'node:assert';
import type { FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { QbackupError, describeError } from '../errors.js';
import { runPool } from '../util/run-pool.js';
import { throwIfCancelled } from '../util/operation.js';
import type { Backend } from './backend/backend.js';
import { decodeChunk, encodeChunk, ZERO_ID } from './chunk.js';
import type { DecodeEntry } from './chunk-worker.js';
import { decodePool } from './decode.js';
import { ensureReserve } from './locks.js';
import { ChunkCompressor } from './compress.js';
import { checksumState, serializeWithChecksum } from './checksum.js';
import { chunkId, newMasterKey, parseKeyFile, seal, unseal, unwrapMasterKey, wrapMasterKey, type MasterKey } from './crypto.js';
import { decodeIndex, encodeIndex, indexKey, INDEX_ID, MAX_CHAIN, resolveChain, type DiskIndex, type FullIndex } from './disk-index.js';
import { parseManifest, parseManifestName, manifestKey, serializeManifestWithChecksum, type Manifest } from './manifest.js';
import { cachedChainLength, packIndexCache, rememberChainLength } from './index-cache.js';
import { PACK_ID, PACK_TARGET_BYTES, PackBuilder, packIndexKey, packKey, parseHeader, releasePackBuffer } from './pack.js';

/** Small objects (pack headers, manifests) read at once when loading them all. */
const HEADER_READS_IN_FLIGHT = 8;

export const REPO_FORMAT = 2;

/** A manifest that could not be read: which one, and why (one sentence). */
export interface DamagedManifest {
  domain: string;
  id: string;
  generation: number;
  key: string;
  problem: string;
}
export const DEFAULT_CHUNK_BYTES = 64 * 1024;

export interface RepoConfig {
  format: 2;
  id: string;
  chunkSize: number;
  compression: 'zstd';
  encrypted: boolean;
  created: string;
}

export interface ChunkLocation {
  packId: string;
  offset: number;
  length: number;
  rawLength: number;
}

/** Chunks of one pack closer than this are read in one request (the gap is read and dropped). */
const READ_GAP_BYTES = 256 * 1024;
/** The most one ranged read of a pack asks for. */
const READ_RUN_BYTES = 16 * 1024 * 1024;
/** Ranged reads in flight at once by default. */
const READS_IN_FLIGHT = 4;

export interface ReadChunksOptions {
  /** Also hand back each chunk's stored form (a copy moves it unchanged). */
  keepStored?: boolean | undefined;
  /** Checked before each ranged read. */
  signal?: AbortSignal | undefined;
  readsInFlight?: number | undefined;
  /** Where each id lies (in the order of `ids`), when the caller knows better than the loaded indexes (gc's repack reads one given pack). */
  locations?: readonly ChunkLocation[] | undefined;
  /**
   * Memory for each ranged read of `length` bytes, decoded as `entries`
   * (all of its ArrayBuffer the caller's; room past `length` may take the
   * plaintexts); the chunks read come back in it or in fresh memory.
   */
  readBuffer?: ((length: number, entries: readonly DecodeEntry[]) => Buffer) | undefined;
}

/** One chunk read by readChunks: its plaintext (and stored form when asked), or why it could not be read. */
export type ChunkReadResult = { data: Buffer; stored?: Buffer } | { error: QbackupError };

export interface InitOptions {
  /** Encrypt with a key wrapped under this passphrase. */
  password?: string | undefined;
  chunkSize?: number | undefined;
}

export class Store {
  readonly compressor = new ChunkCompressor();
  /** Chunks known to be stored, by hex id (loaded by loadChunks). */
  private chunks = new Map<string, ChunkLocation>();

  private constructor(
    readonly backend: Backend,
    readonly config: RepoConfig,
    readonly key: MasterKey | undefined,
    /** Why the config's checksum failed, when it did (its fields were usable). */
    readonly configDamage?: string | undefined,
  ) {}

  get location(): string {
    return this.backend.location;
  }

  /** Creates a repository; refuses when one (of any format) is already there. */
  static async init(backend: Backend, options: InitOptions = {}): Promise<Store> {
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkSize) || chunkSize < 4096 || chunkSize > 4 * 1024 * 1024 || (chunkSize & (chunkSize - 1)) !== 0) {
      throw new QbackupError('INVALID_ARGUMENT', `Invalid chunk size ${chunkSize}: use a power of two from 4 KiB to 4 MiB`);
    }
    const config: RepoConfig = { format: REPO_FORMAT, id: randomBytes(16).toString('hex'), chunkSize, compression: 'zstd', encrypted: options.password !== undefined, created: new Date().toISOString() };
    const key = options.password !== undefined ? newMasterKey() : undefined;
    if (key !== undefined && options.password !== undefined) {
      // The key goes first: a config that says "encrypted" always has a key to open it.
      await backend.putIfAbsent(`keys/${randomBytes(8).toString('hex')}`, serializeWithChecksum(wrapMasterKey(key, options.password, hostname())));
    }
    if (!(await backend.putIfAbsent('config', serializeWithChecksum(config)))) {
      throw new QbackupError('REPO_INVALID', `Cannot create a repository at "${backend.location}": one already exists there`);
    }
    await ensureReserve(backend); // the room that lets prune and gc run on a full disk
    return new Store(backend, config, key);
  }

  /** Opens an existing repository; an encrypted one needs its passphrase. */
  static async open(backend: Backend, options: { password?: string | undefined } = {}): Promise<Store> {
    const { config, damage } = await readConfig(backend);
    if (!config.encrypted) return new Store(backend, config, undefined, damage);
    if (options.password === undefined) {
      throw new QbackupError('WRONG_PASSWORD', `Repository "${backend.location}" is encrypted: give its passphrase (QBACKUP_PASSWORD or --password-file)`);
    }
    // A damaged key file is skipped: another key may open the repository.
    let damaged: QbackupError | undefined;
    const keyFiles = await backend.list('keys/');
    if (keyFiles.length === 0) {
      throw new QbackupError('REPO_DAMAGED', `Cannot open repository "${backend.location}": it is encrypted but holds no key file under keys/ (they were deleted); put them back from a copy of the repository`);
    }
    for (const { key: name } of keyFiles) {
      let file;
      try {
        file = await readKeyFile(backend, name);
      } catch (err) {
        if (!(err instanceof QbackupError && (err.code === 'REPO_DAMAGED' || err.code === 'REPO_OBJECT_NOT_FOUND'))) throw err;
        if (err.code === 'REPO_DAMAGED') damaged ??= err;
        continue;
      }
      let key: MasterKey | undefined;
      try {
        key = unwrapMasterKey(file.file, options.password);
      } catch (err) {
        if (!(err instanceof QbackupError && err.code === 'REPO_DAMAGED')) throw err;
        damaged ??= new QbackupError('REPO_DAMAGED', `Key file "${name}" of repository "${backend.location}" is damaged: ${lowerFirst(err.message)}`);
        continue;
      }
      if (key !== undefined) return new Store(backend, config, key, damage);
      if (file.damage !== undefined) damaged ??= new QbackupError('REPO_DAMAGED', file.damage);
    }
    if (damaged !== undefined) {
      throw new QbackupError('REPO_DAMAGED', `Cannot open repository "${backend.location}": no intact key opens it with this passphrase, and ${lowerFirst(damaged.message)}`, { cause: damaged });
    }
    throw new QbackupError('WRONG_PASSWORD', `Cannot open repository "${backend.location}": wrong passphrase`);
  }

  /** Damage to the config and key files, one sentence each (verify reports them). */
  async metadataProblems(): Promise<Array<{ object: string; problem: string }>> {
    const out: Array<{ object: string; problem: string }> = [];
    if (this.configDamage !== undefined) out.push({ object: 'config', problem: this.configDamage });
    for (const { key: name } of await this.backend.list('keys/')) {
      try {
        const { damage } = await readKeyFile(this.backend, name);
        if (damage !== undefined) out.push({ object: name, problem: damage });
      } catch (err) {
        if (err instanceof QbackupError && err.code === 'REPO_OBJECT_NOT_FOUND') continue; // removed meanwhile
        if (!(err instanceof QbackupError && err.code === 'REPO_DAMAGED')) throw err;
        out.push({ object: name, problem: err.message });
      }
    }
    return out;
  }

  /** Refuses to write new data under a config whose checksum failed. */
  assertConfigIntact(what: string): void {
    if (this.configDamage !== undefined) throw new QbackupError('REPO_DAMAGED', `Cannot ${what}: ${lowerFirst(this.configDamage)}`);
  }

  // ---- keys ------------------------------------------------------------------

  async listKeys(): Promise<Array<{ id: string; created: string; host: string }>> {
    const out = [];
    for (const { key: name } of await this.backend.list('keys/')) {
      const { file } = await readKeyFile(this.backend, name);
      out.push({ id: name.slice(5), created: file.created, host: file.host });
    }
    return out;
  }

  async addKey(password: string): Promise<string> {
    const key = this.requireEncrypted('add a key to');
    const id = randomBytes(8).toString('hex');
    await this.backend.putIfAbsent(`keys/${id}`, serializeWithChecksum(wrapMasterKey(key, password, hostname())));
    return id;
  }

  async removeKey(id: string, currentPassword: string): Promise<void> {
    this.requireEncrypted('remove a key from');
    if (!/^[0-9a-f]{16}$/.test(id)) throw new QbackupError('INVALID_ARGUMENT', `Invalid key id "${id}"`);
    const keys = await this.listKeys();
    if (!keys.some((k) => k.id === id)) throw new QbackupError('INVALID_ARGUMENT', `Repository "${this.location}" has no key "${id}"`);
    if (keys.length === 1) throw new QbackupError('INVALID_ARGUMENT', `Cannot remove key "${id}": it is the repository's last key`);
    const { file } = await readKeyFile(this.backend, `keys/${id}`);
    if (unwrapMasterKey(file, currentPassword) !== undefined) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot remove key "${id}": it is the key opened with the current passphrase; open the repository with another one`);
    }
    await this.backend.delete(`keys/${id}`);
  }

  private requireEncrypted(verb: string): MasterKey {
    if (this.key === undefined) throw new QbackupError('INVALID_ARGUMENT', `Cannot ${verb} repository "${this.location}": it is not encrypted`);
    return this.key;
  }

  // ---- chunks ----------------------------------------------------------------

  /**
   * Reads every pack header, so `has` and `readChunk` know where chunks are;
   * `skip` leaves out condemned packs. Headers this process read before
   * come from its cache (index-cache.ts), checked against the listing.
   */
  async loadChunks(skip: ReadonlySet<string> = new Set()): Promise<void> {
    const cache = packIndexCache(this.location, this.config.id);
    const listed = (await this.backend.list('index/')).filter(({ key }) => PACK_ID.test(key.slice(6)));
    const present = new Set<string>();
    const missing: Array<{ packId: string; size: number }> = [];
    for (const { key, size } of listed) {
      const packId = key.slice(6);
      present.add(packId);
      if (cache.get(packId)?.size !== size) missing.push({ packId, size });
    }
    for (const packId of cache.keys()) if (!present.has(packId)) cache.delete(packId);
    // Several headers at once: on object storage each read is a round trip.
    await runPool(missing[Symbol.iterator](), HEADER_READS_IN_FLIGHT, async ({ packId, size }) => {
      const entries = await this.packEntries(packId);
      cache.set(packId, {
        size,
        ids: entries.map((e) => e.id.toString('hex')),
        locations: entries.map((e) => ({ packId, offset: e.offset, length: e.length, rawLength: e.rawLength })),
      });
    });
    const chunks = new Map<string, ChunkLocation>();
    for (const packId of present) {
      const cached = cache.get(packId);
      if (cached === undefined || skip.has(packId)) continue;
      for (let i = 0; i < cached.ids.length; i++) chunks.set(cached.ids[i] as string, cached.locations[i] as ChunkLocation);
    }
    this.chunks = chunks;
  }

  async packEntries(packId: string): Promise<ReturnType<typeof parseHeader>> {
    const stored = await this.backend.get(packIndexKey(packId));
    return parseHeader(stored, this.key, `Index of pack "${packId}"`, this.config.chunkSize);
  }

  get chunkCount(): number {
    return this.chunks.size;
  }

  locate(id: Buffer): ChunkLocation | undefined {
    return this.chunks.get(id.toString('hex'));
  }

  /** locate() for a caller that holds ids as hex (verify, over every chunk of every backup). */
  locateHex(hex: string): ChunkLocation | undefined {
    return this.chunks.get(hex);
  }

  has(id: Buffer): boolean {
    return id.equals(ZERO_ID) || this.chunks.has(id.toString('hex'));
  }

  chunkId(data: Uint8Array): Buffer {
    return chunkId(data, this.key);
  }

  /** A chunk's plaintext, checked against its id; the zero id reads as zeroes. */
  async readChunk(id: Buffer): Promise<Buffer> {
    const [r] = await this.readChunks([id]);
    if (r === undefined || 'error' in r) throw r?.error ?? new Error('readChunks answers every id');
    return r.data;
  }

  /**
   * The one way chunks leave packs. Each id's plaintext (and, with
   * `keepStored`, its stored form), checked against the id, or the error
   * that kept it from being read; in the order of `ids`. The zero id reads
   * as zeroes. Chunks that lie close together in one pack come in one ranged
   * read (several reads in flight); decoding runs on the decode pool.
   */
  async readChunks(ids: readonly Buffer[], options: ReadChunksOptions = {}): Promise<ChunkReadResult[]> {
    const out = new Array<ChunkReadResult>(ids.length);
    const wanted = new Map<string, { id: Buffer; loc: ChunkLocation; at: number[] }>();
    for (const [i, id] of ids.entries()) {
      if (id.equals(ZERO_ID)) {
        out[i] = { data: Buffer.alloc(this.config.chunkSize) };
        continue;
      }
      const hex = id.toString('hex');
      const w = wanted.get(hex);
      if (w !== undefined) {
        w.at.push(i);
        continue;
      }
      const loc = options.locations !== undefined ? options.locations[i] : this.chunks.get(hex);
      if (loc === undefined) out[i] = { error: new QbackupError('REPO_OBJECT_NOT_FOUND', `Repository "${this.location}" has no chunk ${hex}`, { details: { chunk: hex } }) };
      else wanted.set(hex, { id, loc, at: [i] });
    }
    const runs = readRuns([...wanted.values()]);
    const settle = (x: { at: number[] }, r: ChunkReadResult): void => {
      for (const i of x.at) out[i] = r;
    };
    await runPool(runs.values(), options.readsInFlight ?? READS_IN_FLIGHT, async (run) => {
      throwIfCancelled(options.signal, `Reading chunks of repository "${this.location}"`);
      const first = run[0];
      const last = run.at(-1);
      if (first === undefined || last === undefined) return;
      const start = first.loc.offset;
      let bytes: Buffer;
      const length = last.loc.offset + last.loc.length - start;
      const entries = runEntries(run, start);
      const into = options.readBuffer?.(length, entries);
      try {
        bytes = await this.backend.get(packKey(first.loc.packId), { offset: start, length, into });
      } catch (err) {
        if (!(err instanceof QbackupError)) throw err;
        for (const x of run) settle(x, { error: new QbackupError(err.code, `Chunk ${x.id.toString('hex')} in pack "${x.loc.packId}" cannot be read: ${err.message}`, { cause: err, details: { chunk: x.id.toString('hex') } }) });
        return;
      }
      const stored = options.keepStored === true ? bytes : undefined;
      const reply = await decodePool().decode(bytes, entries, this.key, { transfer: stored === undefined, wholeMemory: bytes.buffer === into?.buffer });
      const plain = Buffer.from(reply.plain.buffer, reply.plain.byteOffset, reply.plain.byteLength);
      for (const [k, x] of run.entries()) {
        const r = reply.results[k];
        if (r === undefined || 'error' in r) {
          settle(x, { error: new QbackupError('REPO_DAMAGED', r?.error ?? 'not decoded', { details: { chunk: x.id.toString('hex') } }) });
          continue;
        }
        const data = plain.subarray(r.at, r.at + x.loc.rawLength);
        settle(x, stored !== undefined ? { data, stored: stored.subarray(x.loc.offset - start, x.loc.offset - start + x.loc.length) } : { data });
      }
    });
    return out;
  }

  /** True when copyChunksToFile can be used: the repository is a local directory whose packs workers can read themselves. */
  get copiesToFiles(): boolean {
    return this.backend.openForReading !== undefined;
  }

  /**
   * readChunks for a writer of files (restore): each id's plaintext, checked
   * against the id, is written to the open file `to` at each of its
   * `writes[i]` (cut to their lengths) by a decode worker that reads the
   * pack range itself, so the bytes never reach this thread. Grouped into
   * ranged reads as readChunks does. Per id: undefined when written, else
   * why it could not be read. A failure to write `to` throws.
   * `options.toDirect` is `to` opened again for direct I/O (see
   * util/direct-io.ts), when it could be.
   */
  async copyChunksToFile(ids: readonly Buffer[], writes: ReadonlyArray<ReadonlyArray<{ position: number; length: number }>>, to: number, options: { signal?: AbortSignal | undefined; what: string; toDirect?: number | undefined }): Promise<Array<QbackupError | undefined>> {
    const open = this.backend.openForReading?.bind(this.backend);
    assert(open !== undefined, 'copyChunksToFile needs a backend whose packs can be opened (copiesToFiles)');
    const out = new Array<QbackupError | undefined>(ids.length);
    const wanted = new Map<string, { id: Buffer; loc: ChunkLocation; writes: Array<{ position: number; length: number }>; at: number[] }>();
    for (const [i, id] of ids.entries()) {
      const hex = id.toString('hex');
      const w = wanted.get(hex);
      if (w !== undefined) {
        w.at.push(i);
        w.writes.push(...(writes[i] ?? []));
        continue;
      }
      const loc = this.chunks.get(hex);
      if (loc === undefined) out[i] = new QbackupError('REPO_OBJECT_NOT_FOUND', `Repository "${this.location}" has no chunk ${hex}`, { details: { chunk: hex } });
      else wanted.set(hex, { id, loc, writes: [...(writes[i] ?? [])], at: [i] });
    }
    const packs = new Map<string, Promise<FileHandle>>();
    try {
      await runPool(readRuns([...wanted.values()]).values(), READS_IN_FLIGHT, async (run) => {
        throwIfCancelled(options.signal, `Reading chunks of repository "${this.location}"`);
        const first = run[0];
        const last = run.at(-1);
        if (first === undefined || last === undefined) return;
        const packId = first.loc.packId;
        let handle = packs.get(packId);
        if (handle === undefined) {
          handle = open(packKey(packId));
          handle.catch(() => undefined); // awaited below; a run of the same pack awaiting it later must not leave it unobserved
          packs.set(packId, handle);
        }
        let fh: FileHandle;
        try {
          fh = await handle;
        } catch (err) {
          if (!(err instanceof QbackupError)) throw err;
          for (const x of run) for (const i of x.at) out[i] = new QbackupError(err.code, `Chunk ${x.id.toString('hex')} in pack "${packId}" cannot be read: ${err.message}`, { cause: err, details: { chunk: x.id.toString('hex') } });
          return;
        }
        const start = first.loc.offset;
        const entries = runEntries(run, start);
        const reply = await decodePool().copy({ fd: fh.fd, offset: start, length: last.loc.offset + last.loc.length - start, entries, writes: run.map((x) => x.writes), to, toDirect: options.toDirect }, this.key);
        if (reply.ioError !== undefined && !reply.ioError.read) throw new QbackupError('IMAGE_ERROR', `Cannot write ${options.what}: ${reply.ioError.message}`);
        for (const [k, x] of run.entries()) {
          const problem = reply.ioError !== undefined ? `Chunk ${x.id.toString('hex')} in pack "${packId}" cannot be read: ${reply.ioError.message}` : reply.errors[k];
          if (problem !== undefined) for (const i of x.at) out[i] = new QbackupError('REPO_DAMAGED', problem, { details: { chunk: x.id.toString('hex') } });
        }
      });
    } finally {
      for (const handle of packs.values()) await handle.then((fh) => fh.close()).catch(() => undefined);
    }
    return out;
  }

  /**
   * Reads a whole pack, checks its bytes against its id (the SHA-256 of the
   * pack: salt, chunks and trailer) and decodes every chunk its index lists
   * against its id, on the decode pool. `chunkErrors` has every damaged
   * chunk of the pack, by hex id. `sizeBytes`, when known, is the pack's
   * size as listed: the pack is then read in one request.
   */
  async checkPack(packId: string, sizeBytes?: number): Promise<{ bytes: number; packError: string | undefined; chunkErrors: Map<string, QbackupError> }> {
    const listed = await this.packEntries(packId);
    // With its size known (from a listing), the pack comes in one read request.
    const bytes = await this.backend.get(packKey(packId), sizeBytes !== undefined && sizeBytes > 0 ? { offset: 0, length: sizeBytes } : undefined);
    const entries: DecodeEntry[] = listed.map((e) => ({ id: e.id, at: e.offset, length: e.length, rawLength: e.rawLength, what: `Chunk ${e.id.toString('hex')} in pack "${packId}"` }));
    const length = bytes.length;
    // Checked in one pass on a worker; the bytes move there and no plaintext comes back.
    const reply = await decodePool().check(bytes, entries, this.key, packId);
    const chunkErrors = new Map<string, QbackupError>();
    for (const { index, error } of reply.damaged) {
      const hex = listed[index]?.id.toString('hex');
      if (hex !== undefined) chunkErrors.set(hex, new QbackupError('REPO_DAMAGED', error, { details: { chunk: hex } }));
    }
    return { bytes: length, packError: reply.packError !== undefined ? `Pack "${packId}" is damaged: ${reply.packError}` : undefined, chunkErrors };
  }

  /** A writer that packs new chunks; call `flush` before referencing them in an index. */
  chunkWriter(): ChunkWriter {
    return new ChunkWriter(this);
  }

  /** Stores a finished pack: the pack first, then its index, so no index names a missing pack. */
  async storePack(builder: PackBuilder): Promise<string> {
    const { pack, header } = builder.complete(this.key);
    const headerBytes = header.length;
    const packId = await decodePool().hashPack(pack);
    await this.backend.putIfAbsent(packKey(packId), pack);
    // Stored: the buffer serves the next pack (after a failure it is left to the collector).
    releasePackBuffer(pack);
    await this.backend.putIfAbsent(packIndexKey(packId), header);
    const ids = builder.entries.map((e) => e.id.toString('hex'));
    const locations = builder.entries.map((e) => ({ packId, offset: e.offset, length: e.length, rawLength: e.rawLength }));
    for (const [i, hex] of ids.entries()) this.chunks.set(hex, locations[i] as ChunkLocation);
    // The next open of this repository in this process need not read the index back.
    packIndexCache(this.location, this.config.id).set(packId, { size: headerBytes, ids, locations });
    return packId;
  }

  // ---- indexes ---------------------------------------------------------------

  async putIndex(index: DiskIndex): Promise<string> {
    const { indexId, stored } = encodeIndex(index, this.compressor, this.key);
    await this.backend.putIfAbsent(indexKey(indexId), stored);
    const parentLength = index.kind === 'delta' ? cachedChainLength(this.location, this.config.id, index.parent) : 0;
    if (parentLength !== undefined) rememberChainLength(this.location, this.config.id, indexId, parentLength + 1);
    return indexId;
  }

  /** How many indexes the chain ending at `indexId` holds (1: a full index), read once per process. */
  async indexChainLength(indexId: string): Promise<number> {
    const known = cachedChainLength(this.location, this.config.id, indexId);
    if (known !== undefined && INDEX_ID.test(indexId) && (await this.backend.stat(indexKey(indexId))) !== undefined) return known;
    const length = (await this.indexChain(indexId)).length;
    rememberChainLength(this.location, this.config.id, indexId, length);
    return length;
  }

  async getIndex(indexId: string): Promise<DiskIndex> {
    if (!INDEX_ID.test(indexId)) throw new QbackupError('REPO_DAMAGED', `Repository "${this.location}" names an invalid disk index "${indexId}"`);
    const stored = await this.backend.get(indexKey(indexId));
    // A full index of a 16 TiB disk at 4 KiB chunks stays below this bound.
    return decodeIndex(stored, indexId, this.compressor, this.key, `Disk index "${indexId}"`, 2 ** 33);
  }

  /** The index chain ending at `indexId`, full index first. */
  async indexChain(indexId: string): Promise<DiskIndex[]> {
    const chain: DiskIndex[] = [];
    let at: string | undefined = indexId;
    while (at !== undefined) {
      if (chain.length > MAX_CHAIN * 4) throw new QbackupError('REPO_DAMAGED', `Disk index "${indexId}" is damaged: its chain does not end`);
      const index = await this.getIndex(at);
      chain.unshift(index);
      at = index.kind === 'delta' ? index.parent : undefined;
    }
    return chain;
  }

  /** The full slot table of a backup's disk. */
  async resolveIndex(indexId: string): Promise<FullIndex> {
    return resolveChain(await this.indexChain(indexId), `Disk index "${indexId}"`);
  }

  // ---- manifests -------------------------------------------------------------

  /** Writes a manifest (its generation's object): the commit point of a backup. */
  async putManifest(m: Manifest): Promise<void> {
    // Sealed (authenticated) when encrypted, else with its own checksum (manifest.ts).
    const stored = this.key !== undefined ? seal(this.key.dataKey, Buffer.from(`${JSON.stringify(m, null, 2)}\n`)) : serializeManifestWithChecksum(m);
    if (!(await this.backend.putIfAbsent(manifestKey(m.domain, m.id, m.generation ?? 1), stored))) {
      throw new QbackupError('REPO_INVALID', `Cannot record backup "${m.id}" in repository "${this.location}": a backup with that id exists`);
    }
  }

  async getManifest(domain: string, id: string, generation = 1): Promise<Manifest> {
    const key = manifestKey(domain, id, generation);
    const stored = await this.backend.get(key);
    const plain = this.key !== undefined ? unseal(this.key.dataKey, stored, `Manifest of backup "${id}"`) : stored;
    return parseManifest(plain.toString('utf8'), domain, id, generation);
  }

  /** Every manifest object (of one domain): each backup id with its generations, newest last. */
  async manifestObjects(domain?: string): Promise<Array<{ domain: string; id: string; generations: number[] }>> {
    const prefix = domain !== undefined ? `snapshots/${domain}/` : 'snapshots/';
    const byId = new Map<string, { domain: string; id: string; generations: number[] }>();
    for (const { key } of await this.backend.list(prefix)) {
      const [, dom, name] = key.split('/');
      if (dom === undefined || name === undefined) continue;
      const parsed = parseManifestName(name);
      // A name no writer makes: getManifest then reports it as one sentence.
      const { id, generation } = parsed ?? { id: name, generation: 1 };
      const entry = byId.get(`${dom}/${id}`) ?? { domain: dom, id, generations: [] };
      entry.generations.push(generation);
      byId.set(`${dom}/${id}`, entry);
    }
    for (const e of byId.values()) e.generations.sort((a, b) => a - b);
    return [...byId.values()];
  }

  /**
   * Every backup (of one domain), oldest first, each as its newest manifest
   * generation; a damaged one is reported, not skipped. A manifest that a
   * concurrent prune replaced or deleted between listing and reading is read
   * again from a fresh listing, or left out when it is gone. Several are read
   * at once: on object storage each read is a round trip.
   */
  async manifests(domain?: string): Promise<Manifest[]> {
    const out: Manifest[] = [];
    await runPool((await this.manifestObjects(domain))[Symbol.iterator](), HEADER_READS_IN_FLIGHT, async (o) => {
      const m = await this.newestManifest(o.domain, o.id, o.generations.at(-1) ?? 1);
      if (m !== undefined) out.push(m);
    });
    return out.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  }

  /**
   * Like manifests(), but a manifest that cannot be read (damaged, truncated,
   * failing its checksum) is set aside and named instead of failing the whole
   * listing: one damaged backup never hides the others. gc and prune use the
   * strict manifests(): they must not act on a repository they cannot fully read.
   */
  async readableManifests(domain?: string): Promise<{ manifests: Manifest[]; damaged: DamagedManifest[] }> {
    const manifests: Manifest[] = [];
    const damaged: DamagedManifest[] = [];
    await runPool((await this.manifestObjects(domain))[Symbol.iterator](), HEADER_READS_IN_FLIGHT, async (o) => {
      const generation = o.generations.at(-1) ?? 1;
      try {
        const m = await this.newestManifest(o.domain, o.id, generation);
        if (m !== undefined) manifests.push(m);
      } catch (err) {
        // Damaged content, or a name no writer makes: this object cannot be read, the others can.
        if (!(err instanceof QbackupError && ['REPO_DAMAGED', 'BACKUP_NOT_FOUND', 'INVALID_NAME', 'INVALID_ARGUMENT'].includes(err.code))) throw err;
        const key = `snapshots/${o.domain}/${o.id}${generation === 1 ? '' : `.g${generation}`}`;
        damaged.push({ domain: o.domain, id: o.id, generation, key, problem: err.message });
      }
    });
    manifests.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
    damaged.sort((a, b) => a.domain.localeCompare(b.domain) || a.id.localeCompare(b.id));
    return { manifests, damaged };
  }

  private async newestManifest(domain: string, id: string, generation: number): Promise<Manifest | undefined> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.getManifest(domain, id, generation);
      } catch (err) {
        if (!(err instanceof QbackupError && err.code === 'REPO_OBJECT_NOT_FOUND') || attempt >= 3) throw err;
      }
      const now = (await this.manifestObjects(domain)).find((o) => o.id === id);
      if (now === undefined) return undefined;
      generation = now.generations.at(-1) ?? 1;
    }
  }

  /**
   * Records a backup's manifest again with new disks (folded indexes): the
   * next generation is written first, then the one it replaces is deleted.
   */
  async replaceManifest(m: Manifest, disks: Manifest['disks']): Promise<Manifest> {
    const generation = (m.generation ?? 1) + 1;
    const next: Manifest = { ...m, disks, generation };
    await this.putManifest(next);
    await this.backend.delete(manifestKey(m.domain, m.id, m.generation ?? 1));
    return next;
  }

  /** Deletes every generation of a backup's manifest, the newest last (so an interrupted delete never resurrects an older one). */
  async deleteManifest(domain: string, id: string): Promise<void> {
    const o = (await this.manifestObjects(domain)).find((x) => x.id === id);
    const generations = o?.generations ?? [1];
    for (const g of generations) await this.backend.delete(manifestKey(domain, id, g));
  }

  /** Deletes manifest generations a newer one replaced (left by a prune that was interrupted); how many went. */
  async dropSupersededManifests(domain?: string): Promise<number> {
    let n = 0;
    for (const o of await this.manifestObjects(domain)) {
      for (const g of o.generations.slice(0, -1)) {
        await this.backend.delete(manifestKey(o.domain, o.id, g));
        n++;
      }
    }
    return n;
  }
}

/**
 * Packs being stored at once behind the filling one. A pack's store is a
 * hash on a worker and two durable writes (each fsynced, then its directory):
 * one at a time, the writes were the serial stage of a full backup, with the
 * readers and the chunk workers waiting on them. Several overlap their
 * syncs; more would only hold more memory (16 MiB each).
 */
const UPLOADS_IN_FLIGHT = 3;

/** Collects new chunks into packs of about PACK_TARGET_BYTES and stores each when full. */
export class ChunkWriter {
  private builder = new PackBuilder();
  /** Chunks added to the open pack, by hex id (so a chunk is packed once). */
  private pending = new Set<string>();
  /** Full packs being stored while the next one fills, each with its chunks. */
  private readonly uploads = new Set<{ done: Promise<void>; ids: Set<string> }>();
  /** The first failure of a pack's store: it fails the next add or flush. */
  private failure: unknown;
  storedBytes = 0;
  storedChunks = 0;

  constructor(private readonly store: Store) {}

  /** Is the chunk stored or about to be? */
  has(id: Buffer): boolean {
    const hex = id.toString('hex');
    if (this.store.has(id) || this.pending.has(hex)) return true;
    for (const u of this.uploads) if (u.ids.has(hex)) return true;
    return false;
  }

  /**
   * Adds a chunk whose stored form was made elsewhere (a worker), whole or
   * as its parts; it is copied into the pack, so its memory is the caller's
   * again when this returns. Stores the pack when full. Returns the bytes
   * this chunk takes in the pack, or 0 when it was stored already.
   */
  async addEncoded(id: Buffer, blob: Uint8Array | readonly Uint8Array[], rawLength: number): Promise<number> {
    if (this.has(id)) return 0;
    this.pending.add(id.toString('hex'));
    const before = this.builder.bytes;
    this.builder.add(id, blob, rawLength);
    const length = this.builder.bytes - before;
    this.storedBytes += length;
    this.storedChunks++;
    if (this.builder.bytes >= PACK_TARGET_BYTES) await this.rotate();
    return length;
  }

  /** Encodes and adds a chunk in this thread. */
  async add(id: Buffer, data: Uint8Array): Promise<void> {
    if (this.has(id)) return;
    await this.addEncoded(id, encodeChunk(data, { compressor: this.store.compressor, key: this.store.key }), data.length);
  }

  /** Stores every chunk added so far; they may be referenced once it returns. */
  async flush(): Promise<void> {
    await this.rotate();
    while (this.uploads.size > 0) await Promise.race([...this.uploads].map((u) => u.done));
    this.throwIfFailed();
  }

  /** Starts storing the open pack, once fewer than UPLOADS_IN_FLIGHT are being stored. */
  private async rotate(): Promise<void> {
    while (this.uploads.size >= UPLOADS_IN_FLIGHT) await Promise.race([...this.uploads].map((u) => u.done));
    this.throwIfFailed();
    if (this.builder.count === 0) return;
    const builder = this.builder;
    this.builder = new PackBuilder();
    const upload = { done: Promise.resolve(), ids: this.pending };
    this.pending = new Set();
    // Settles either way; a failure is kept for the next add or flush to throw.
    upload.done = this.store.storePack(builder).then(
      () => void this.uploads.delete(upload),
      (err: unknown) => {
        this.failure ??= err;
        this.uploads.delete(upload);
      },
    );
    this.uploads.add(upload);
  }

  private throwIfFailed(): void {
    if (this.failure !== undefined) throw this.failure;
  }
}

/**
 * The decode entries of a run of chunks read from `start` in their pack.
 * Their ids go in one buffer of their own: an id that views a larger buffer
 * (a disk index's table) would take all of it along to the worker.
 */
function runEntries(run: ReadonlyArray<{ id: Buffer; loc: ChunkLocation }>, start: number): DecodeEntry[] {
  const idBytes = new Uint8Array(run.length * 32);
  return run.map((x, k) => {
    idBytes.set(x.id, k * 32);
    return { id: idBytes.subarray(k * 32, k * 32 + 32), at: x.loc.offset - start, length: x.loc.length, rawLength: x.loc.rawLength, what: `Chunk ${x.id.toString('hex')} in pack "${x.loc.packId}"` };
  });
}

/** Chunks sorted by pack and offset, grouped into runs that one ranged read fetches (close together in one pack, at most READ_RUN_BYTES). */
function readRuns<T extends { loc: ChunkLocation }>(chunks: T[]): T[][] {
  chunks.sort((a, b) => a.loc.packId.localeCompare(b.loc.packId) || a.loc.offset - b.loc.offset);
  const runs: T[][] = [];
  for (const x of chunks) {
    const run = runs.at(-1);
    const first = run?.[0];
    const last = run?.at(-1);
    const end = last !== undefined ? last.loc.offset + last.loc.length : 0;
    const fits = first !== undefined && last !== undefined && last.loc.packId === x.loc.packId && x.loc.offset >= end && x.loc.offset - end <= READ_GAP_BYTES && x.loc.offset + x.loc.length - first.loc.offset <= READ_RUN_BYTES;
    if (fits) run?.push(x);
    else runs.push([x]);
  }
  return runs;
}

/** A key file and, when its checksum fails although it parses, why (one sentence). */
async function readKeyFile(backend: Backend, name: string): Promise<{ file: ReturnType<typeof parseKeyFile>; damage?: string }> {
  const text = (await backend.get(name)).toString('utf8');
  const file = parseKeyFile(text, name);
  const state = checksumState(file as unknown as Record<string, unknown>);
  return state === 'mismatch' ? { file, damage: `Key file "${name}" of repository "${backend.location}" is damaged: its checksum does not match its content` } : { file };
}

function lowerFirst(s: string): string {
  return s.length > 0 ? s[0]?.toLowerCase() + s.slice(1) : s;
}

async function readConfig(backend: Backend): Promise<{ config: RepoConfig; damage?: string }> {
  let text: string;
  try {
    text = (await backend.get('config')).toString('utf8');
  } catch (err) {
    if (err instanceof QbackupError && err.code === 'REPO_OBJECT_NOT_FOUND') {
      throw new QbackupError('REPO_INVALID', `"${backend.location}" is not a qbackup repository (run qbackup init)`, { cause: err });
    }
    throw err;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new QbackupError('REPO_DAMAGED', `The config of repository "${backend.location}" is not valid JSON: ${describeError(err)}`);
  }
  if (typeof parsed !== 'object' || parsed === null) throw new QbackupError('REPO_DAMAGED', `The config of repository "${backend.location}" is not an object`);
  const v = parsed as Partial<RepoConfig> & { format?: unknown };
  if (typeof v.format === 'number' && v.format > REPO_FORMAT) {
    throw new QbackupError('REPO_INVALID', `Repository "${backend.location}" has format ${v.format}, newer than this qbackup understands (${REPO_FORMAT})`);
  }
  if (v.format !== REPO_FORMAT || typeof v.id !== 'string' || typeof v.chunkSize !== 'number' || v.compression !== 'zstd' || typeof v.encrypted !== 'boolean') {
    throw new QbackupError('REPO_INVALID', `Repository "${backend.location}" has a config qbackup cannot use (format ${String(v.format)})`);
  }
  if (v.chunkSize < 4096 || v.chunkSize > 4 * 1024 * 1024 || (v.chunkSize & (v.chunkSize - 1)) !== 0) {
    throw new QbackupError('REPO_DAMAGED', `Repository "${backend.location}" has an impossible chunk size ${v.chunkSize}`);
  }
  const config: RepoConfig = { format: REPO_FORMAT, id: v.id, chunkSize: v.chunkSize, compression: 'zstd', encrypted: v.encrypted, created: String(v.created) };
  if (checksumState(parsed as Record<string, unknown>) === 'mismatch') {
    return { config, damage: `The config of repository "${backend.location}" is damaged: its checksum does not match its content` };
  }
  return { config };
}
