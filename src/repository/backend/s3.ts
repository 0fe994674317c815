// A repository in an S3-compatible bucket (AWS S3, Ceph radosgw, MinIO, …),
// under an optional key prefix: `s3://BUCKET/PREFIX`. Objects are named by
// their keys below the prefix.
//
// Invariants:
// - putIfAbsent is a conditional PUT (`If-None-Match: *`): the store answers
//   412 when the key exists, atomically, so of racing writers exactly one
//   wins. A PUT the SDK retried after a lost answer may find its own object;
//   it counts as written when the stored bytes are the ones it sent.
// - Every read is checked for length: an object or range shorter than asked
//   is REPO_DAMAGED, never short data (the store checks content hashes).
// - Throttling, 5xx answers and dropped connections are retried by the SDK
//   with exponential backoff and jitter (its standard retry strategy); at most
//   `concurrency` requests are in flight per backend.
// - Credentials come from the settings given or the SDK's provider chain;
//   they never appear in `location`, messages or logs (errors carry the S3
//   error code and the object key only).

import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import {
  CreateBucketCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { QbackupError } from '../../errors.js';
import { assertKey, assertPrefix, KEY_SEGMENT, objectNotFound, type Backend, type ByteRange, type ObjectInfo } from './backend.js';

/** How to reach the object store; what is not given comes from the SDK's usual environment variables and config files. */
export interface S3Settings {
  /** e.g. http://127.0.0.1:7480; default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS. */
  endpoint?: string;
  region?: string;
  credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Bucket in the path (http://host/bucket/key), as radosgw and MinIO need without DNS names. */
  pathStyle?: boolean;
  /** Requests in flight at once. Default 16. */
  concurrency?: number;
  /** Attempts per request, the first included. Default 6. */
  maxAttempts?: number;
  /** Milliseconds a request may sit without progress. Default 60 s. */
  requestTimeoutMs?: number;
}

export interface S3Location {
  bucket: string;
  /** '' or segments ending in '/'. */
  prefix: string;
  pathStyle: boolean;
}

const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

/** Parses `s3://BUCKET[/PREFIX][?path-style=1]`; throws INVALID_ARGUMENT with the URL's credentials left out. */
export function parseS3Url(url: string): S3Location {
  const m = /^s3:\/\/([^/?#]*)(\/[^?#]*)?(\?[^#]*)?$/.exec(url);
  const shown = url.replace(/^s3:\/\/[^@/]*@/, 's3://');
  if (m === null) throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${shown}": expected s3://BUCKET/PREFIX`);
  const [, bucket = '', path = '', query = ''] = m;
  if (bucket.includes('@')) throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${shown}": credentials do not belong in the URL; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY`);
  if (!BUCKET.test(bucket)) throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${shown}": "${bucket}" is not a bucket name (3-63 lowercase letters, digits, '.' and '-')`);
  const trimmed = path.replace(/^\/+|\/+$/g, '');
  if (trimmed !== '' && !trimmed.split('/').every((s) => KEY_SEGMENT.test(s))) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${shown}": prefix "${trimmed}" has a segment outside letters, digits, '.', '_', '+' and '-'`);
  }
  const params = new URLSearchParams(query.slice(1));
  for (const k of params.keys()) {
    if (k !== 'path-style') throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${shown}": unknown parameter "${k}" (known: path-style)`);
  }
  const ps = params.get('path-style');
  if (ps !== null && !['0', '1', 'true', 'false'].includes(ps)) throw new QbackupError('INVALID_ARGUMENT', `Invalid repository "${shown}": path-style must be 1 or 0`);
  return { bucket, prefix: trimmed === '' ? '' : `${trimmed}/`, pathStyle: ps === '1' || ps === 'true' };
}

/** A small counting semaphore: at most `limit` holders at once. */
class Limiter {
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(private readonly limit: number) {}
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.active++;
    try {
      return await fn();
    } finally {
      const next = this.waiting.shift();
      if (next !== undefined) next();
      else this.active--;
    }
  }
}

interface S3Failure {
  name?: string;
  code?: string;
  $metadata?: { httpStatusCode?: number; attempts?: number };
  message?: string;
}

export class S3Backend implements Backend {
  readonly location: string;
  private readonly client: S3Client;
  private readonly limiter: Limiter;
  private closed = false;

  constructor(
    readonly where: S3Location,
    settings: S3Settings = {},
  ) {
    this.location = `s3://${where.bucket}${where.prefix === '' ? '' : `/${where.prefix.slice(0, -1)}`}`;
    const concurrency = settings.concurrency ?? 16;
    this.limiter = new Limiter(concurrency);
    const agent = { keepAlive: true, maxSockets: concurrency };
    const config: S3ClientConfig = {
      forcePathStyle: where.pathStyle || settings.pathStyle === true,
      maxAttempts: settings.maxAttempts ?? 6,
      retryMode: 'standard',
      // Integrity is the store's (every chunk is hash-checked on read); the
      // SDK's newer default checksums are not understood by every S3 server.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: { httpAgent: new HttpAgent(agent), httpsAgent: new HttpsAgent(agent), connectionTimeout: 10_000, requestTimeout: settings.requestTimeoutMs ?? 60_000 },
      ...(settings.endpoint !== undefined ? { endpoint: settings.endpoint } : {}),
      ...(settings.region !== undefined ? { region: settings.region } : {}),
      ...(settings.credentials !== undefined ? { credentials: settings.credentials } : {}),
    };
    this.client = new S3Client(config);
  }

  async putIfAbsent(key: string, data: Buffer): Promise<boolean> {
    assertKey(key);
    try {
      await this.send(() => this.client.send(new PutObjectCommand({ Bucket: this.where.bucket, Key: this.where.prefix + key, Body: data, ContentLength: data.length, IfNoneMatch: '*' })));
      return true;
    } catch (err) {
      const f = err as S3Failure;
      if (status(err) !== 412) throw this.failure(`write "${key}"`, err);
      // A retried PUT may have stored our bytes on an attempt whose answer was lost.
      if ((f.$metadata?.attempts ?? 1) > 1) {
        const stored = await this.get(key).catch(() => undefined);
        return stored !== undefined && stored.equals(data);
      }
      return false;
    }
  }

  async get(key: string, range?: ByteRange): Promise<Buffer> {
    assertKey(key);
    if (range !== undefined && range.length === 0) {
      const st = await this.stat(key);
      if (st === undefined) throw objectNotFound(this.location, key);
      if (st.size < range.offset) throw this.short(key, st.size, range.offset);
      return Buffer.alloc(0);
    }
    try {
      return await this.limiter.run(async () => {
        const res = await this.client.send(
          new GetObjectCommand({ Bucket: this.where.bucket, Key: this.where.prefix + key, ...(range !== undefined ? { Range: `bytes=${range.offset}-${range.offset + range.length - 1}` } : {}) }),
        );
        if (res.Body === undefined) throw this.short(key, 0, range === undefined ? 1 : range.offset + range.length);
        const bytes = await res.Body.transformToByteArray();
        const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        const expected = range !== undefined ? range.length : res.ContentLength;
        if (expected !== undefined && buf.length !== expected) throw this.short(key, (range?.offset ?? 0) + buf.length, (range?.offset ?? 0) + expected);
        return buf;
      });
    } catch (err) {
      if (err instanceof QbackupError) throw err;
      if (status(err) === 404 && !isBucketMissing(err)) throw objectNotFound(this.location, key, err);
      // 416: the range starts at or past the end.
      if (status(err) === 416 && range !== undefined) throw this.short(key, undefined, range.offset + range.length);
      throw this.failure(`read "${key}"`, err);
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    assertKey(key);
    try {
      const res = await this.send(() => this.client.send(new HeadObjectCommand({ Bucket: this.where.bucket, Key: this.where.prefix + key })));
      return { key, size: res.ContentLength ?? 0 };
    } catch (err) {
      if (status(err) === 404 && !isBucketMissing(err)) {
        // HEAD answers carry no body: a missing bucket also looks like a bare 404.
        await this.assertBucket();
        return undefined;
      }
      throw this.failure(`read "${key}"`, err);
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    assertPrefix(prefix);
    const out: ObjectInfo[] = [];
    let token: string | undefined;
    do {
      let res;
      try {
        res = await this.send(() => this.client.send(new ListObjectsV2Command({ Bucket: this.where.bucket, Prefix: this.where.prefix + prefix, ...(token !== undefined ? { ContinuationToken: token } : {}) })));
      } catch (err) {
        throw this.failure(`list "${prefix}"`, err);
      }
      for (const o of res.Contents ?? []) {
        if (o.Key === undefined || !o.Key.startsWith(this.where.prefix)) continue;
        const key = o.Key.slice(this.where.prefix.length);
        // Objects that no key of ours could name (put there by other tools) are not ours to list.
        if (!isKey(key)) continue;
        out.push({ key, size: o.Size ?? 0, ...(o.LastModified !== undefined ? { modifiedMs: o.LastModified.getTime() } : {}) });
      }
      token = res.IsTruncated === true ? res.NextContinuationToken : undefined;
    } while (token !== undefined);
    return out;
  }

  async delete(key: string): Promise<void> {
    assertKey(key);
    try {
      await this.send(() => this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: this.where.prefix + key })));
    } catch (err) {
      if (status(err) === 404 && !isBucketMissing(err)) return;
      throw this.failure(`delete "${key}"`, err);
    }
  }

  /** Creates the bucket unless it exists (qbackup init does this; nothing else creates buckets). */
  async createContainer(): Promise<void> {
    try {
      await this.send(() => this.client.send(new HeadBucketCommand({ Bucket: this.where.bucket })));
      return;
    } catch (err) {
      if (status(err) !== 404) throw this.failure('open the bucket', err);
    }
    try {
      await this.send(() => this.client.send(new CreateBucketCommand({ Bucket: this.where.bucket })));
    } catch (err) {
      const name = (err as S3Failure).name;
      if (name === 'BucketAlreadyOwnedByYou') return;
      throw this.failure(`create bucket "${this.where.bucket}"`, err);
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.client.destroy();
  }

  private async assertBucket(): Promise<void> {
    try {
      await this.send(() => this.client.send(new HeadBucketCommand({ Bucket: this.where.bucket })));
    } catch (err) {
      throw this.failure('open the bucket', err);
    }
  }

  /** Runs one request within the concurrency bound. */
  private async send<T>(request: () => Promise<T>): Promise<T> {
    return this.limiter.run(request);
  }

  private short(key: string, got: number | undefined, needed: number): QbackupError {
    const had = got === undefined ? 'is shorter' : `has ${got} bytes`;
    return new QbackupError('REPO_DAMAGED', `Repository object "${key}" in "${this.location}" ${had} than expected (needed ${needed})`);
  }

  /** One sentence for a failed request: the S3 error's code and what to check, never its credentials. */
  private failure(what: string, err: unknown): QbackupError {
    if (err instanceof QbackupError) return err;
    const f = err as S3Failure;
    const name = f.name ?? f.code ?? 'Error';
    const http = status(err);
    const at = `Cannot ${what} in repository "${this.location}"`;
    if (isBucketMissing(err) || (http === 404 && what === 'open the bucket')) {
      return new QbackupError('REPO_INVALID', `${at}: bucket "${this.where.bucket}" does not exist (qbackup init creates it)`, { cause: err });
    }
    if (http === 403 || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch' || name === 'AccessDenied') {
      return new QbackupError('REPO_ACCESS_DENIED', `${at}: the object store refused the credentials (${name === 'Error' || name === 'Unknown' ? `HTTP ${http ?? '403'}` : name})`, { cause: err });
    }
    if (/credential/i.test(name) || /Could not load credentials/i.test(f.message ?? '')) {
      return new QbackupError('REPO_ACCESS_DENIED', `${at}: no S3 credentials are configured (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)`, { cause: err });
    }
    if (/Region is missing/i.test(f.message ?? '')) {
      return new QbackupError('INVALID_ARGUMENT', `${at}: no S3 region is configured (set AWS_REGION; any name, e.g. us-east-1, for radosgw or MinIO)`, { cause: err });
    }
    const transport = typeof f.code === 'string' && /^E[A-Z]+/.test(f.code) ? f.code : undefined;
    if (http === undefined || http >= 500 || transport !== undefined || name === 'TimeoutError') {
      const why = http !== undefined && http >= 500 ? `the object store answered HTTP ${http} (${name})` : `the object store cannot be reached (${transport ?? name})`;
      return new QbackupError('REPO_UNAVAILABLE', `${at}: ${why}, after ${f.$metadata?.attempts ?? 1} attempts`, { cause: err });
    }
    return new QbackupError('REPO_INVALID', `${at}: the object store answered HTTP ${http} (${name})`, { cause: err });
  }
}

function status(err: unknown): number | undefined {
  return (err as S3Failure | undefined)?.$metadata?.httpStatusCode;
}

function isBucketMissing(err: unknown): boolean {
  return (err as S3Failure | undefined)?.name === 'NoSuchBucket';
}

function isKey(key: string): boolean {
  const segments = key.split('/');
  return segments.length <= 8 && segments.every((s) => KEY_SEGMENT.test(s));
}
