// Repository endpoints. Long operations (backup, restore, export, verify,
// prune, gc, copy) answer 202 with a task at once; listing and stats answer
// directly; the inventory also names every manifest that cannot be read.
// Backup and the restores that reach a domain (intoDomain, define, instant)
// take `connection` (a configured name or a URI; default the daemon's). The
// passphrase of an encrypted repository travels in the X-Repository-Password
// header (never in a URL, never stored in a task); a copy's source
// passphrase in X-Source-Repository-Password.

import type { FastifyInstance, FastifyRequest } from 'fastify';
import { restrictsRepositories } from '../config/config.js';
import { QbackupError } from '../errors.js';
import { checkBackupChoice, type RepoAccess, type RetentionPolicy } from '../repository/repository.js';
import type { QbackupService } from '../service/daemon-service.js';
import { domainParams } from './routes-domains.js';
import type { PassphraseGuard } from './passphrase-guard.js';
import { addRoute, bool, flagValue, int, object, queryFlag, str, strings } from './route.js';

const tag = 'repository';
const repo = str({ minLength: 1 });
const retention = object({ keepLast: int(1), keepHourly: int(1), keepDaily: int(1), keepWeekly: int(1), keepMonthly: int(1), keepYearly: int(1) });
const format = { type: 'string', enum: ['qcow2', 'raw'] } as const;
const connection = str({ maxLength: 1024 });

/** A configured repository's name or a location, through the service (allow-list, configured passphrase unless the header gives one). */
function access(request: FastifyRequest, repoPath: string, headerName = 'x-repository-password'): RepoAccess {
  const header = request.headers[headerName];
  const password = Array.isArray(header) ? header[0] : header;
  return request.server.qbackupService.access(repoPath, password);
}


/** Which repositories a request names, each with the header of its passphrase. */
function namedRepositories(request: FastifyRequest): Array<{ repo: string; header: string }> {
  const url = request.url.split('?')[0] ?? '';
  const body = (typeof request.body === 'object' && request.body !== null ? request.body : {}) as Record<string, unknown>;
  const query = (typeof request.query === 'object' && request.query !== null ? request.query : {}) as Record<string, unknown>;
  const out: Array<{ repo: string; header: string }> = [];
  const add = (v: unknown, header: string): void => {
    if (typeof v === 'string' && v !== '') out.push({ repo: v, header });
  };
  if (url === '/api/repository/copy') {
    add(body['from'], 'x-source-repository-password');
    add(body['to'], 'x-repository-password');
  } else add(body['repo'] ?? query['repo'], 'x-repository-password');
  return out;
}

/**
 * Before a repository route runs: every repository it names is an absolute
 * path or s3:// location, and each passphrase it carries is tried first
 * under the guard (a task route would otherwise fail only in its task, where
 * nothing counts it). `init` makes a key rather than trying one.
 */
export function guardPassphrases(app: FastifyInstance, service: QbackupService, guard: PassphraseGuard): void {
  app.addHook('preHandler', async (request) => {
    const url = request.url.split('?')[0] ?? '';
    if (!url.startsWith('/api/repository/')) return;
    for (const { repo: r, header } of namedRepositories(request)) {
      const location = service.location(r);
      const given = request.headers[header];
      const password = Array.isArray(given) ? given[0] : given;
      if (password === undefined || password === '' || url === '/api/repository/init') continue;
      const client = request.tokenName ?? request.ip;
      guard.assertAllowed(client, location);
      try {
        await service.qb.repository.listKeys({ repo: location, password });
      } catch (err) {
        if (err instanceof QbackupError && err.code === 'WRONG_PASSWORD') {
          guard.failed(client, location);
          throw err;
        }
        continue; // not a passphrase failure: the route itself reports it
      }
      guard.succeeded(client, location);
    }
  });
}

function pointInTime(value: string): Date {
  const time = new Date(value);
  if (Number.isNaN(time.getTime())) throw new QbackupError('INVALID_ARGUMENT', `Invalid until "${value}": expected a time such as 2026-11-25T18:00:00Z`);
  return time;
}

interface BackupBody { domain: string; repo: string; connection?: string; full?: boolean; disks?: string[]; retention?: RetentionPolicy }
interface RestoreBody { domain: string; repo: string; connection?: string; backup?: string; until?: string; disks?: string[]; to?: string; intoDomain?: string; define?: string; format?: 'qcow2' | 'raw' }
interface ExportBody { domain: string; repo: string; disk: string; file: string; backup?: string; format?: 'qcow2' | 'raw' }
interface VerifyBody { repo: string; domain?: string; backup?: string; readData?: boolean; readDataPercent?: number }
interface InstantBody { domain: string; repo: string; connection?: string; backup?: string; until?: string; as?: string; to?: string; speedBytesPerSec?: number }
interface CopyBody { from: string; to: string; domain?: string; backups?: string[]; dryRun?: boolean }
interface PruneBody extends RetentionPolicy { domain: string; repo: string; dryRun?: boolean }

export function repositoryRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  addRoute(app, service, {
    method: 'GET', url: '/api/repositories', tag,
    summary: 'The repositories the configuration names (name, location, whether a passphrase is configured), the default one, and whether other locations are reachable too',
    handler: () => {
      const config = service.config;
      return {
        repositories: [...config.repositories.values()].map((r) => ({ name: r.name, location: r.location, passphrase: r.passwordFile !== undefined || r.passwordCommand !== undefined })),
        default: config.defaults.repository ?? null,
        otherLocations: !restrictsRepositories(config),
      };
    },
  });
  addRoute<unknown, unknown, { repo: string; chunkSize?: number }>(app, service, {
    method: 'POST', url: '/api/repository/init', tag, status: 201, summary: 'Create a repository (encrypted when X-Repository-Password is given)',
    body: object({ repo, chunkSize: int(4096) }, ['repo']),
    handler: ({ body, request }) => qb.repository.init({ ...access(request, body.repo), ...(body.chunkSize !== undefined ? { chunkSize: body.chunkSize } : {}) }),
  });
  addRoute<unknown, unknown, BackupBody>(app, service, {
    method: 'POST', url: '/api/repository/backups', tag, status: 202,
    summary: 'Back up a domain into a repository (incremental when coverage allows), then apply a retention policy if given; returns a task',
    body: object({ domain: str({ maxLength: 256 }), repo, connection, full: bool, disks: strings, retention }, ['domain', 'repo']),
    handler: async ({ body, request, who }) => {
      const uri = service.connectionUri(body.connection);
      const repoAccess = access(request, body.repo);
      await service.requireDomain(uri, body.domain);
      return service.backup({
        domain: body.domain,
        connection: uri,
        ...repoAccess,
        ...(body.full !== undefined ? { full: body.full } : {}),
        ...(body.disks !== undefined ? { disks: body.disks } : {}),
        ...(body.retention !== undefined ? { retention: body.retention } : {}),
        requestedBy: who,
      });
    },
  });
  addRoute<unknown, { repo: string; domain?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/repository/backups', tag, summary: 'List the backups in a repository (?domain= for one domain)',
    query: object({ repo, domain: str({ maxLength: 256 }) }, ['repo']),
    handler: ({ query, request }) => qb.repository.list(access(request, query.repo), query.domain),
  });
  addRoute<unknown, { repo: string; domain?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/repository/inventory', tag, summary: 'The readable backups (?domain= for one domain) and, by name, every manifest that cannot be read (damaged), which never hides the others',
    query: object({ repo, domain: str({ maxLength: 256 }) }, ['repo']),
    handler: ({ query, request }) => qb.repository.inventory(access(request, query.repo), query.domain),
  });
  addRoute<unknown, { repo: string }, unknown>(app, service, {
    method: 'GET', url: '/api/repository/stats', tag, summary: 'Sizes of a repository: logical, referenced, stored, dedup and compression ratios',
    query: object({ repo }, ['repo']),
    handler: ({ query, request }) => qb.repository.stats(access(request, query.repo)),
  });
  longRepositoryRoutes(app, service);
  instantRestoreRoutes(app, service);
}

function longRepositoryRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  const tasks = service.tasks;
  addRoute<unknown, unknown, RestoreBody>(app, service, {
    method: 'POST', url: '/api/repository/restore', tag, status: 202, summary: 'Restore a backup to new images (to; with define: and define a new domain of that name on them) or into the disks of a shut-off domain (intoDomain), through connection; returns a task',
    body: object({ domain: str({ maxLength: 256 }), repo, connection, backup: str({ maxLength: 256 }), until: str({ maxLength: 64 }), disks: strings, to: str(), intoDomain: str({ maxLength: 256 }), define: str({ maxLength: 256 }), format }, ['domain', 'repo']),
    handler: ({ body: b, request, who }) => {
      if ((b.to === undefined) === (b.intoDomain === undefined)) throw new QbackupError('INVALID_ARGUMENT', 'Give either to or intoDomain');
      if (b.define !== undefined && b.to === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option define needs to (the directory of the new domain\'s images)');
      const uri = service.connectionUri(b.connection);
      const target = qb.connection(uri);
      const until = b.until !== undefined ? pointInTime(b.until) : undefined;
      // The library's rule, checked before the task is queued so the request itself is refused.
      checkBackupChoice(b.domain, { backup: b.backup, until });
      const options = { ...access(request, b.repo), ...(b.backup !== undefined ? { backup: b.backup } : {}), ...(until !== undefined ? { until } : {}), ...(b.disks !== undefined ? { disks: b.disks } : {}), ...(b.to !== undefined ? { to: b.to } : {}), ...(b.intoDomain !== undefined ? { intoDomain: b.intoDomain } : {}), define: b.define, format: b.format ?? 'qcow2' };
      return tasks.submit({ kind: 'repository.restore', domain: b.intoDomain ?? b.define ?? b.domain, connection: uri, requestedBy: who, cancellable: true, run: (ctx) => target.repository.restore(b.domain, { ...options, onProgress: (p) => ctx.progress(p), signal: ctx.signal }) });
    },
  });
  addRoute<unknown, unknown, ExportBody>(app, service, {
    method: 'POST', url: '/api/repository/export', tag, status: 202, summary: 'Write one disk of a backup as a standalone image; returns a task',
    body: object({ domain: str({ maxLength: 256 }), repo, disk: str({ maxLength: 64 }), file: str(), backup: str({ maxLength: 256 }), format }, ['domain', 'repo', 'disk', 'file']),
    handler: ({ body: b, request, who }) => {
      const options = { ...access(request, b.repo), disk: b.disk, file: b.file, format: b.format ?? 'qcow2', ...(b.backup !== undefined ? { backup: b.backup } : {}) };
      return tasks.submit({ kind: 'repository.export', requestedBy: who, cancellable: true, run: (ctx) => qb.repository.exportDisk(b.domain, { ...options, onProgress: (p) => ctx.progress(p), signal: ctx.signal }) });
    },
  });
  addRoute<unknown, unknown, VerifyBody>(app, service, {
    method: 'POST', url: '/api/repository/verify', tag, status: 202, summary: 'Check that every chunk the backups name exists (readData: and is intact); returns a task that fails on damage',
    body: object({ repo, domain: str({ maxLength: 256 }), backup: str({ maxLength: 256 }), readData: bool, readDataPercent: { type: 'number', exclusiveMinimum: 0, maximum: 100 } }, ['repo']),
    handler: ({ body: b, request, who }) => {
      if (b.backup !== undefined && b.domain === undefined) throw new QbackupError('INVALID_ARGUMENT', 'Option backup needs a domain');
      return service.verify({ ...access(request, b.repo), ...(b.domain !== undefined ? { domain: b.domain } : {}), ...(b.backup !== undefined ? { backup: b.backup } : {}), ...(b.readData !== undefined ? { readData: b.readData } : {}), ...(b.readDataPercent !== undefined ? { readDataPercent: b.readDataPercent } : {}), requestedBy: who });
    },
  });
  addRoute<unknown, unknown, PruneBody>(app, service, {
    method: 'POST', url: '/api/repository/prune', tag, status: 202, summary: "Remove the backups of a domain a retention policy does not keep (dryRun: only show); returns a task",
    body: object({ domain: str({ maxLength: 256 }), repo, keepLast: int(1), keepHourly: int(1), keepDaily: int(1), keepWeekly: int(1), keepMonthly: int(1), keepYearly: int(1), dryRun: bool }, ['domain', 'repo']),
    handler: ({ body: { domain, repo: r, ...policy }, request, who }) => {
      const repoAccess = access(request, r);
      return tasks.submit({ kind: 'repository.prune', domain, requestedBy: who, cancellable: true, run: (ctx) => qb.repository.prune(domain, { ...repoAccess, ...policy, onProgress: (p) => ctx.progress(p), signal: ctx.signal }) });
    },
  });
  copyRoute(app, service);
  addRoute<unknown, unknown, { repo: string }>(app, service, {
    method: 'POST', url: '/api/repository/gc', tag, status: 202, summary: 'Remove data no backup references (safe while backups run); returns a task',
    body: object({ repo }, ['repo']),
    handler: ({ body, request, who }) => {
      const repoAccess = access(request, body.repo);
      return tasks.submit({ kind: 'repository.gc', requestedBy: who, cancellable: true, run: (ctx) => qb.repository.gc(repoAccess, { onProgress: (p) => ctx.progress(p), signal: ctx.signal }) });
    },
  });
}

/**
 * Instant restore answers when the domain runs (seconds, whatever the disk
 * size); the copy goes on inside QEMU and GET shows it, as domjobinfo does.
 */
function instantRestoreRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  addRoute<unknown, unknown, InstantBody>(app, service, {
    method: 'POST', url: '/api/repository/restore-instant', tag, status: 201,
    summary: 'Run a domain (or a new one, as) from a backup at once while QEMU copies its data into local overlays (to); answers when the domain runs',
    body: object({ domain: str({ maxLength: 256 }), repo, connection, backup: str({ maxLength: 256 }), until: str({ maxLength: 64 }), as: str({ maxLength: 256 }), to: str(), speedBytesPerSec: int(1) }, ['domain', 'repo']),
    handler: ({ body: b, request }) => {
      return qb.connection(service.connectionUri(b.connection)).instant.restore(b.domain, {
        ...access(request, b.repo),
        ...(b.backup !== undefined ? { backup: b.backup } : {}),
        ...(b.until !== undefined ? { until: pointInTime(b.until) } : {}),
        ...(b.as !== undefined ? { as: b.as } : {}),
        ...(b.to !== undefined ? { to: b.to } : {}),
        ...(b.speedBytesPerSec !== undefined ? { speedBytesPerSec: b.speedBytesPerSec } : {}),
      });
    },
  });
  addRoute<{ domain: string }, { completed?: string; connection?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/instant-restore', tag, params: domainParams,
    summary: "The instant restore moving a domain's data, with fresh progress (?completed=true: the last finished one; ?connection= the domain's, default the daemon's)",
    query: object({ completed: queryFlag, connection: str({ maxLength: 1024 }) }),
    handler: async ({ params: p, query: q }) => {
      const completed = flagValue(q.completed);
      const instant = qb.connection(service.connectionUri(q.connection)).instant;
      const info = completed ? instant.lastResult(p.domain) : await instant.info(p.domain);
      if (info === undefined) throw new QbackupError('JOB_NOT_FOUND', completed ? `Domain "${p.domain}" has no finished instant restore` : `Domain "${p.domain}" has no instant restore moving data`);
      return info;
    },
  });
}

function copyRoute(app: FastifyInstance, service: QbackupService): void {
  addRoute<unknown, unknown, CopyBody>(app, service, {
    method: 'POST', url: '/api/repository/copy', tag, status: 202,
    summary: 'Copy backups (of a domain, or the ids in backups) from one repository into another: only the chunks the target lacks, re-encrypted when the keys differ (source passphrase in X-Source-Repository-Password, target\'s in X-Repository-Password); returns a task',
    body: object({ from: repo, to: repo, domain: str({ maxLength: 256 }), backups: strings, dryRun: bool }, ['from', 'to']),
    handler: ({ body: b, request, who }) =>
      service.copy({
        from: access(request, b.from, 'x-source-repository-password'),
        to: access(request, b.to),
        ...(b.domain !== undefined ? { domain: b.domain } : {}),
        ...(b.backups !== undefined ? { backups: b.backups } : {}),
        ...(b.dryRun !== undefined ? { dryRun: b.dryRun } : {}),
        requestedBy: who,
      }),
  });
}
