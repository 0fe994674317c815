// The daemon behind `qbackup serve`: one QbackupService over the caller's
// Qbackup, the HTTP server listening on loopback (default 127.0.0.1:8470),
// or on any other address only with TLS. On the first start (no token yet)
// it creates a token named "admin" and hands its secret back once, for the
// CLI to print. close() stops taking requests, lets running tasks end (or, with
// interrupt, stops those that can stop mid-way) and
// stops the scheduler.

import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { QbackupError, describeError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import { QbackupService, type ServiceOptions } from '../service/daemon-service.js';
import type { RateLimitOptions } from './rate-limit.js';
import type { PassphraseBackoffOptions } from './passphrase-guard.js';
import { buildServer } from './server.js';

export interface DaemonOptions extends ServiceOptions {
  /** host:port; default 127.0.0.1:8470. Port 0 picks a free one. */
  listen?: string | undefined;
  tlsCertFile?: string | undefined;
  tlsKeyFile?: string | undefined;
  bodyLimitBytes?: number;
  version?: string;
  rateLimit?: RateLimitOptions;
  passphraseBackoff?: PassphraseBackoffOptions | undefined;
}

export interface Daemon {
  readonly url: string;
  readonly service: QbackupService;
  readonly app: FastifyInstance;
  /** The secret of the token created on the first start, else undefined. */
  readonly bootstrapToken: string | undefined;
  /** `interrupt`: running tasks that can stop mid-way are stopped and end failed (TASK_INTERRUPTED); otherwise they finish first. */
  close(options?: { interrupt?: boolean | undefined }): Promise<void>;
}

export function parseListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:]+)\]|([^:\s]+)):(\d{1,5})$/.exec(listen.trim());
  const host = m?.[1] ?? m?.[2];
  const port = Number(m?.[3]);
  if (host === undefined || !Number.isInteger(port) || port > 65535) {
    throw new QbackupError('INVALID_ARGUMENT', `Invalid --listen "${listen}": expected HOST:PORT such as 127.0.0.1:8470`);
  }
  return { host, port };
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || (isIP(host) === 4 && host.startsWith('127.'));
}

function readTls(options: DaemonOptions): { cert: Buffer; key: Buffer } | undefined {
  if (options.tlsCertFile === undefined && options.tlsKeyFile === undefined) return undefined;
  if (options.tlsCertFile === undefined || options.tlsKeyFile === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give both --tls-cert and --tls-key');
  const read = (file: string, what: string): Buffer => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new QbackupError('INVALID_ARGUMENT', `Cannot read the TLS ${what} "${file}": ${describeError(err)}`);
    }
  };
  return { cert: read(options.tlsCertFile, 'certificate'), key: read(options.tlsKeyFile, 'key') };
}

export async function startDaemon(qb: Qbackup, options: DaemonOptions = {}): Promise<Daemon> {
  const { host, port } = parseListen(options.listen ?? '127.0.0.1:8470');
  const https = readTls(options);
  if (https === undefined && !isLoopback(host)) {
    throw new QbackupError('NOT_SUPPORTED', `Cannot listen on "${host}" without TLS: give --tls-cert and --tls-key, or listen on 127.0.0.1`);
  }
  const service = new QbackupService(qb, options);
  const bootstrapToken = service.tokens.count() === 0 ? service.tokens.create('admin').token : undefined;
  const app = await buildServer(service, {
    ...(options.bodyLimitBytes !== undefined ? { bodyLimitBytes: options.bodyLimitBytes } : {}),
    ...(options.log !== undefined ? { log: options.log } : {}),
    logger: service.logger,
    ...(https !== undefined ? { https } : {}),
    ...(options.version !== undefined ? { version: options.version } : {}),
    ...(options.rateLimit !== undefined ? { rateLimit: options.rateLimit } : {}),
    passphraseBackoff: options.passphraseBackoff,
  });
  try {
    await app.listen({ host, port });
  } catch (err) {
    await app.close();
    throw new QbackupError('INVALID_ARGUMENT', `Cannot listen on ${host}:${port}: ${describeError(err)}`, { cause: err });
  }
  await service.start();
  const address = app.server.address();
  const boundPort = typeof address === 'object' && address !== null ? address.port : port;
  const url = `${https !== undefined ? 'https' : 'http'}://${host.includes(':') ? `[${host}]` : host}:${boundPort}`;
  let closing: Promise<void> | undefined;
  return {
    url,
    service,
    app,
    bootstrapToken,
    close: (options) => (closing ??= (async () => {
      await app.close();
      await service.close(options);
    })()),
  };
}
