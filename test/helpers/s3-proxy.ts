// A hostile S3 endpoint for tests: an HTTP proxy in front of the test Ceph's
// radosgw that passes requests through (Host header and body unchanged, so
// SigV4 signatures still verify) and does to chosen ones what a broken or
// lying object store does:
// - `500`: answers 500 InternalError without passing the request on (a PUT's
//   body is read first: the failure comes "mid-upload", after the bytes);
// - `truncate`: passes the request on and returns the first half of the body
//   with a Content-Length that says so (a short body that looks whole);
// - `lie-length`: returns the whole body under a Content-Length 100 bytes
//   larger, then closes the connection;
// - `stale-list`: answers a listing with the one it returned for the same
//   query when `freezeListings` was called (objects written since are
//   missing, objects deleted since are still there).
// The rule is a function of the request, chosen by the test; the proxy
// counts what it did so a test can assert that its faults were hit.

import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export type S3Fault = '500' | 'truncate' | 'lie-length' | 'stale-list';

export interface S3Request {
  method: string;
  /** Path without the query, e.g. /bucket/prefix/data/ab/abcd… */
  path: string;
  query: URLSearchParams;
  /** Requests seen so far with the same method, this one included. */
  nth: number;
}

export interface S3Proxy {
  /** The proxy's endpoint, e.g. http://127.0.0.1:PORT. */
  endpoint: string;
  /** What to do to a request (undefined: pass it through). */
  rule: (r: S3Request) => S3Fault | undefined;
  /** Remembers the listings answered from now on as the ones `stale-list` replays (it keeps the first of each query). */
  freezeListings(): void;
  /** Faults done, by kind. */
  done: Record<string, number>;
  close(): Promise<void>;
}

export async function startS3Proxy(upstream: string): Promise<S3Proxy> {
  const target = new URL(upstream);
  const counts = new Map<string, number>();
  const frozen = new Map<string, { status: number; headers: Record<string, string | string[] | undefined>; body: Buffer }>();
  let recording = false;
  const proxy: S3Proxy = {
    endpoint: '',
    rule: () => undefined,
    freezeListings: () => {
      frozen.clear();
      recording = true;
    },
    done: {},
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
  const did = (f: S3Fault): void => {
    proxy.done[f] = (proxy.done[f] ?? 0) + 1;
  };

  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (b: Buffer) => chunks.push(b));
    req.on('end', () => {
      const url = new URL(req.url ?? '/', 'http://proxy');
      const method = req.method ?? 'GET';
      const nth = (counts.get(method) ?? 0) + 1;
      counts.set(method, nth);
      const isListing = method === 'GET' && url.searchParams.has('list-type');
      const fault = proxy.rule({ method, path: url.pathname, query: url.searchParams, nth });
      if (fault === '500') {
        did('500');
        res.writeHead(500, { 'content-type': 'application/xml' });
        res.end('<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>injected</Message></Error>');
        return;
      }
      const listingKey = `${url.pathname}?${url.search}`;
      const stale = fault === 'stale-list' && isListing ? frozen.get(listingKey) : undefined;
      if (stale !== undefined) {
        did('stale-list');
        res.writeHead(stale.status, stale.headers);
        res.end(stale.body);
        return;
      }
      const up = request(
        { host: target.hostname, port: target.port, method, path: req.url, headers: req.headers },
        (upRes) => {
          const body: Buffer[] = [];
          upRes.on('data', (b: Buffer) => body.push(b));
          upRes.on('end', () => {
            const all = Buffer.concat(body);
            const headers = { ...upRes.headers };
            delete headers['transfer-encoding']; // the whole body is sent with its length
            headers['content-length'] = String(all.length);
            const status = upRes.statusCode ?? 502;
            if (isListing && recording && status === 200 && !frozen.has(listingKey)) frozen.set(listingKey, { status, headers, body: all });
            if (fault === 'truncate' && status < 300 && all.length > 1) {
              did('truncate');
              const half = all.subarray(0, Math.floor(all.length / 2));
              res.writeHead(status, { ...headers, 'content-length': String(half.length) });
              res.end(half);
              return;
            }
            if (fault === 'lie-length' && status < 300 && all.length > 0) {
              did('lie-length');
              res.writeHead(status, { ...headers, 'content-length': String(all.length + 100) });
              res.write(all, () => res.destroy());
              return;
            }
            res.writeHead(status, headers);
            res.end(all);
          });
        },
      );
      up.on('error', () => res.destroy());
      up.end(Buffer.concat(chunks));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  proxy.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return proxy;
}
