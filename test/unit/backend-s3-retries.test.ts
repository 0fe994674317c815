// The S3 backend against a scripted HTTP peer, for what a real radosgw will
// not do on demand: throttling (503 SlowDown) and 5xx answers that the SDK's
// retry strategy must ride out, a PUT whose answer was lost (stored on the
// first attempt, 412 on the retry), and an object shorter than its header says.

import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { isQbackupError } from '../../src/errors.js';
import { S3Backend } from '../../src/repository/backend/s3.js';

process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';

type Script = (req: IncomingMessage, body: Buffer, res: ServerResponse) => void;

describe('S3 backend retries and checks (scripted peer)', () => {
  let script: Script = () => undefined;
  const objects = new Map<string, Buffer>();
  let requests = 0;
  const server = createServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (b: Buffer) => parts.push(b));
    req.on('end', () => {
      requests++;
      script(req, Buffer.concat(parts), res);
    });
  });
  let backend: S3Backend;
  before(async () => {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    backend = new S3Backend({ bucket: 'bkt', prefix: 'p/', pathStyle: true }, { endpoint: `http://127.0.0.1:${port}`, region: 'us-east-1', credentials: { accessKeyId: 'AKIDTEST', secretAccessKey: 'secret-test' }, maxAttempts: 4 });
  });
  after(async () => {
    backend.close();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  const error = (res: ServerResponse, status: number, code: string): void => {
    res.writeHead(status, { 'content-type': 'application/xml' });
    res.end(`<?xml version="1.0"?><Error><Code>${code}</Code><Message>${code}</Message></Error>`);
  };
  /** A tiny store behind the script: PUT with If-None-Match, GET with Range. */
  const serve = (req: IncomingMessage, body: Buffer, res: ServerResponse): void => {
    const key = decodeURIComponent((req.url ?? '').split('?')[0] ?? '');
    if (req.method === 'PUT') {
      if (req.headers['if-none-match'] === '*' && objects.has(key)) return error(res, 412, 'PreconditionFailed');
      objects.set(key, body);
      res.writeHead(200, { etag: '"x"' });
      res.end();
      return;
    }
    const data = objects.get(key);
    if (data === undefined) return error(res, 404, 'NoSuchKey');
    const m = /^bytes=(\d+)-(\d+)$/.exec(String(req.headers.range ?? ''));
    const part = m !== null ? data.subarray(Number(m[1]), Number(m[2]) + 1) : data;
    res.writeHead(m !== null ? 206 : 200, { 'content-length': String(part.length) });
    res.end(part);
  };

  it('rides out throttling and 5xx answers with backoff', async () => {
    let failures = 2;
    script = (req, body, res) => {
      if (failures-- > 0) return error(res, failures === 1 ? 503 : 500, failures === 1 ? 'SlowDown' : 'InternalError');
      serve(req, body, res);
    };
    requests = 0;
    assert.equal(await backend.putIfAbsent('config', Buffer.from('hello')), true);
    assert.equal(requests, 3, 'two failures, then success');
    assert.equal((await backend.get('config')).toString(), 'hello');
  });

  it('gives up after the configured attempts with REPO_UNAVAILABLE, naming the status', async () => {
    script = (_req, _body, res) => error(res, 503, 'SlowDown');
    requests = 0;
    await assert.rejects(backend.get('config'), (err: unknown) => isQbackupError(err, 'REPO_UNAVAILABLE') && /HTTP 503 \(SlowDown\), after 4 attempts/.test((err as Error).message));
    assert.equal(requests, 4);
  });

  it('a PUT stored on an attempt whose answer was lost counts as written; a different object is not', async () => {
    let first = true;
    script = (req, body, res) => {
      if (req.method === 'PUT' && first) {
        first = false;
        serve(req, body, { writeHead: () => undefined, end: () => undefined } as unknown as ServerResponse);
        return error(res, 500, 'InternalError');
      }
      serve(req, body, res);
    };
    assert.equal(await backend.putIfAbsent('locks/aa', Buffer.from('mine')), true);
    first = true;
    objects.set('/bkt/p/locks/bb', Buffer.from('theirs'));
    script = (req, body, res) => {
      if (req.method === 'PUT' && first) {
        first = false;
        return error(res, 500, 'InternalError');
      }
      serve(req, body, res);
    };
    assert.equal(await backend.putIfAbsent('locks/bb', Buffer.from('mine')), false);
  });

  it('an object shorter than asked is REPO_DAMAGED, not short data', async () => {
    objects.set('/bkt/p/data/short', Buffer.alloc(100, 1));
    script = serve;
    await assert.rejects(backend.get('data/short', { offset: 50, length: 100 }), (err: unknown) => isQbackupError(err, 'REPO_DAMAGED'));
    assert.equal((await backend.get('data/short', { offset: 50, length: 50 })).length, 50);
  });
});
