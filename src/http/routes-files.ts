// File-level restore over HTTP: list a backup's filesystems and directories,
// download one file (streamed, with its length), and copy files into a host
// directory as a task. The daemon keeps one warm session per (backup, disk
// set, filesystem) for a few minutes after its last request (files/warm.ts),
// so only the first request waits for the appliance to boot.
//
// A downloaded file comes from a guest and is hostile: it is always an
// attachment, never HTML, with nosniff and a sandboxing CSP, and its name
// goes in Content-Disposition as RFC 5987 UTF-8 with an ASCII fallback.

import { PassThrough } from 'node:stream';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { QbackupError } from '../errors.js';
import { WarmSessions, checkGuestDir, copyIntoGuest, type FileSession } from '../files/index.js';
import type { RepoAccess } from '../repository/repository.js';
import type { QbackupService } from '../service/daemon-service.js';
import { addRoute, object, str, strings } from './route.js';

const tag = 'files';
const repo = str({ minLength: 1 });
const path = str({ minLength: 1 });
const idParams = object({ id: str({ maxLength: 256 }) }, ['id']);
const selection = { repo, domain: str({ maxLength: 256 }), disks: str({ maxLength: 1024 }), fs: str({ maxLength: 256 }) };

interface Selection { repo: string; domain?: string; disks?: string; fs?: string }
interface RestoreBody { repo: string; domain?: string; disks?: string[]; fs?: string; paths: string[]; to: string; intoGuest?: string }

/** Text types by extension; anything else is application/octet-stream. Never HTML. */
const TEXT_TYPES: Readonly<Record<string, string>> = {
  txt: 'text/plain; charset=utf-8', conf: 'text/plain; charset=utf-8', cfg: 'text/plain; charset=utf-8', log: 'text/plain; charset=utf-8', ini: 'text/plain; charset=utf-8',
  md: 'text/plain; charset=utf-8', csv: 'text/csv; charset=utf-8', json: 'application/json', sh: 'text/plain; charset=utf-8', yaml: 'text/plain; charset=utf-8', yml: 'text/plain; charset=utf-8',
  png: 'image/png', jpg: 'image/jpeg', jpeg: 'image/jpeg', gif: 'image/gif', pdf: 'application/pdf', gz: 'application/gzip', tar: 'application/x-tar', zip: 'application/zip',
};

export function contentType(name: string): string {
  const dot = name.lastIndexOf('.');
  const ext = dot > 0 ? name.slice(dot + 1).toLowerCase() : '';
  return TEXT_TYPES[ext] ?? (ext === '' && /^[\w.-]+$/.test(name) ? 'text/plain; charset=utf-8' : 'application/octet-stream');
}

function contentDisposition(name: string): string {
  const ascii = name.replace(/[^\x20-\x7e]|["\\%;]/g, '_') || 'file';
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(name)}`;
}

function access(request: FastifyRequest, repoPath: string): RepoAccess {
  const header = request.headers['x-repository-password'];
  const password = Array.isArray(header) ? header[0] : header;
  // The daemon's one rule for repositories (configured names and allowed locations only) and passphrases.
  return request.server.qbackupService.access(repoPath, password);
}

type WithSession = <T>(request: FastifyRequest, id: string, sel: { repo: string; domain?: string | undefined; disks?: readonly string[] | undefined; fs?: string | undefined }, fn: (s: FileSession) => Promise<T>) => Promise<T>;

const disksOf = (s: string | undefined): string[] | undefined => (s === undefined || s === '' ? undefined : s.split(',').filter((x) => x !== ''));

export function fileRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  const warm = new WarmSessions(qb.repository, {
    runDir: qb.domains.runDir(),
    appliance: qb.options.accel === 'tcg' ? { backendSettings: ['force_tcg'] } : {},
  });
  app.addHook('onClose', async () => warm.close());

  /** Runs `fn` on the warm session of backup `id` (its domain found in the repository when not given). */
  const withSession: WithSession = async (request, id, sel, fn) => {
    const a = access(request, sel.repo);
    let domain = sel.domain;
    if (domain === undefined) {
      domain = (await qb.repository.list(a)).find((m) => m.id === id)?.domain;
      if (domain === undefined) throw new QbackupError('BACKUP_NOT_FOUND', `Repository "${sel.repo}" has no backup "${id}"`);
    }
    return warm.use({ ...a, domain, backup: id, disks: sel.disks, fs: sel.fs }, fn);
  };
  listingRoutes(app, service, withSession);
  contentRoute(app, service, withSession);
  restoreRoute(app, service, withSession);
}

function listingRoutes(app: FastifyInstance, service: QbackupService, withSession: WithSession): void {
  addRoute<{ id: string }, Selection, unknown>(app, service, {
    method: 'GET', url: '/api/repository/backups/:id/filesystems', tag, params: idParams,
    summary: "A backup's filesystems (device, disk, type, size, label, where mounted) and the operating systems found in it",
    query: object(selection, ['repo']),
    handler: ({ params: p, query: q, request }) =>
      withSession(request, p.id, { ...q, disks: disksOf(q.disks) }, async (s) => {
        await s.mount().catch(() => undefined);
        return { backup: s.backup.id, domain: s.backup.domain, time: s.backup.time, filesystems: s.filesystems, operatingSystems: s.operatingSystems };
      }),
  });

  addRoute<{ id: string }, Selection & { path?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/repository/backups/:id/files', tag, params: idParams,
    summary: 'List a directory of a backup (type, mode, owner, size, mtime, link target of each entry); a path that is not a directory gives its one entry',
    query: object({ ...selection, path }, ['repo']),
    handler: ({ params: p, query: q, request }) =>
      withSession(request, p.id, { ...q, disks: disksOf(q.disks) }, async (s) => {
        const at = await s.stat(q.path ?? '/');
        const entries = at.type === 'directory' ? await s.list(at.path) : [at];
        return { backup: s.backup.id, domain: s.backup.domain, time: s.backup.time, path: at.path, type: at.type, entries };
      }),
  });
}

function contentRoute(app: FastifyInstance, service: QbackupService, withSession: WithSession): void {
  addRoute<{ id: string }, Selection & { path: string }, unknown>(app, service, {
    method: 'GET', url: '/api/repository/backups/:id/files/content', tag, params: idParams,
    summary: 'Download one file of a backup (streamed; symlinks followed inside the guest tree); always an attachment',
    query: object({ ...selection, path }, ['repo', 'path']),
    handler: async ({ params: p, query: q, request, reply }) => {
      const sel = { ...q, disks: disksOf(q.disks) };
      const entry = await withSession(request, p.id, sel, (s) => s.resolve(q.path));
      if (entry.type !== 'file') throw new QbackupError('INVALID_ARGUMENT', `"${entry.path}" in backup "${p.id}" is a ${entry.type}, not a file`);
      const body = new PassThrough();
      // The session stays in use (and warm) until the last byte is sent.
      void withSession(request, p.id, sel, (s) => s.read(entry.path, body, entry)).then(
        () => body.end(),
        (err: unknown) => body.destroy(err instanceof Error ? err : new Error(String(err))),
      );
      void reply
        .header('content-type', contentType(entry.name))
        .header('content-length', String(entry.size))
        .header('content-disposition', contentDisposition(entry.name))
        .header('x-content-type-options', 'nosniff')
        .header('content-security-policy', "sandbox; default-src 'none'")
        .header('last-modified', new Date(entry.mtimeSec * 1000).toUTCString());
      return reply.send(body);
    },
  });
}

function restoreRoute(app: FastifyInstance, service: QbackupService, withSession: WithSession): void {
  addRoute<{ id: string }, unknown, RestoreBody>(app, service, {
    method: 'POST', url: '/api/repository/backups/:id/files/restore', tag, status: 202, params: idParams,
    summary:
      "Copy files and directories of a backup into a directory of this host (modes, owners, times and symlinks kept), or with intoGuest into a directory of that running domain's guest through its guest agent (bytes; with guest-exec allowed, directories, owners and modes); nothing overwritten; returns a task",
    body: object({ repo, domain: str({ maxLength: 256 }), disks: strings, fs: str({ maxLength: 256 }), paths: { ...strings, minItems: 1, items: { type: 'string', minLength: 1, maxLength: 4096 } }, to: str({ minLength: 1 }), intoGuest: str({ minLength: 1, maxLength: 256 }) }, ['repo', 'paths', 'to']),
    handler: ({ params: p, body: b, request, who }) => {
      const sel = { repo: b.repo, domain: b.domain, disks: b.disks, fs: b.fs };
      const guest = b.intoGuest;
      if (guest !== undefined) {
        checkGuestDir(b.to); // a bad directory is refused now, not in the task
        return service.tasks.submit({
          kind: 'repository.files-restore',
          cancellable: true,
          requestedBy: who,
          run: (ctx) => withSession(request, p.id, sel, async (s) => ({ backup: s.backup.id, to: b.to, ...(await copyIntoGuest(s, b.paths, service.qb.repository.driver, guest, b.to, ctx.signal)) })),
        });
      }
      return service.tasks.submit({
        // No domain: copying files out of a backup neither waits for nor blocks the domain's own tasks.
        kind: 'repository.files-restore',
        cancellable: true,
        requestedBy: who,
        run: (ctx) => withSession(request, p.id, sel, async (s) => ({ backup: s.backup.id, to: b.to, ...(await s.get(b.paths, b.to, ctx.signal)) })),
      });
    },
  });
}
