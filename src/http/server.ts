// The HTTP API as a fastify application over one QbackupService: auth on
// every request (auth.ts), JSON-schema validation that refuses unknown
// fields and never coerces types, one error handler (errors.ts), the routes
// of each group, the OpenAPI document generated from the route schemas at
// /api/openapi.json, and the web page at /. Listening is the daemon's job
// (daemon.ts); tests inject or listen on an ephemeral port.

import swagger from '@fastify/swagger';
import Fastify, { type FastifyInstance } from 'fastify';
import type { QbackupService } from '../service/daemon-service.js';
import { installAuth } from './auth.js';
import { ERROR_BODY_SCHEMA, httpError } from './errors.js';
import { PAGE_HTML } from './page.js';
import { RateLimiter, type RateLimitOptions } from './rate-limit.js';
import { checkpointRoutes } from './routes-checkpoints.js';
import { domainRoutes } from './routes-domains.js';
import { jobRoutes } from './routes-jobs.js';
import { repositoryRoutes } from './routes-repository.js';
import { taskRoutes } from './routes-tasks.js';

export interface ServerOptions {
  /** Largest request body accepted (default 1 MiB). */
  bodyLimitBytes?: number;
  /** Receives one line per request (method, url, status, ms, token name) and errors. */
  log?: (line: string) => void;
  https?: { cert: Buffer; key: Buffer };
  version?: string;
  /** Requests per second per client address, and the burst allowed (default 50/s, 500). */
  rateLimit?: RateLimitOptions;
}

// Long: the one place that assembles the application, in the order fastify needs.
export async function buildServer(service: QbackupService, options: ServerOptions = {}): Promise<FastifyInstance> {
  const log = options.log ?? (() => undefined);
  const app = Fastify({
    logger: false,
    bodyLimit: options.bodyLimitBytes ?? 1 << 20,
    ...(options.https !== undefined ? { https: options.https } : {}),
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false, allErrors: false } },
    return503OnClosing: true,
  });
  app.addContentTypeParser(['application/xml', 'text/xml'], { parseAs: 'string' }, (_request, body, done) => done(null, body));
  app.setErrorHandler((err, request, reply) => {
    const e = httpError(err);
    if (e.internal) log(`error ${request.method} ${request.url}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    void reply.code(e.status).send(e.body);
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.code(404).send({ code: 'ROUTE_NOT_FOUND', message: `There is no API endpoint ${request.method} ${request.url.split('?')[0] ?? ''}` });
  });
  app.addHook('onResponse', async (request, reply) => {
    log(`${request.method} ${request.url.split('?')[0] ?? ''} ${reply.statusCode} ${reply.elapsedTime.toFixed(1)}ms token=${request.tokenName ?? '-'}`);
  });
  const limiter = new RateLimiter(options.rateLimit ?? { ratePerSec: 50, burst: 500 });
  app.addHook('onRequest', async (request) => limiter.take(request.ip));
  installAuth(app, service.tokens);
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'qbackup API', version: options.version ?? '0', description: 'Checkpoints and incremental backups of QEMU/KVM domains. Every request needs `Authorization: Bearer TOKEN`; errors are `{ code, message }`.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } }, schemas: { Error: ERROR_BODY_SCHEMA as unknown as Record<string, unknown> } },
      security: [{ bearer: [] }],
    },
  });
  domainRoutes(app, service);
  checkpointRoutes(app, service);
  jobRoutes(app, service);
  repositoryRoutes(app, service);
  taskRoutes(app, service);
  app.get('/api/whoami', { schema: { summary: 'The token this request was made with', tags: ['auth'] } }, async (request) => ({ name: request.tokenName ?? null, readOnly: request.tokenReadOnly ?? false }));
  app.get('/api/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  app.get('/', { schema: { hide: true } }, async (_request, reply) => reply.type('text/html; charset=utf-8').header('content-security-policy', "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'").send(PAGE_HTML));
  await app.ready();
  return app;
}
