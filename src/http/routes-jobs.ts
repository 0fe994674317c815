// Backup job endpoints (libvirt's interface): begin a push or pull job from a
// BackupSpec (JSON) or libvirt backup XML, show it (or the last finished one),
// abort it. A push job runs inside QEMU after begin returns; its progress is
// what GET shows, as domjobinfo does.

import type { FastifyInstance } from 'fastify';
import type { BackupBeginOptions } from '../backup/jobs.js';
import type { BackupSpec } from '../backup/spec.js';
import type { CheckpointSpec } from '../checkpoint/spec.js';
import { QbackupError } from '../errors.js';
import { parseBackupSpec } from '../libvirt/backup.js';
import type { QbackupService } from '../service/daemon-service.js';
import { domainParams } from './routes-domains.js';
import { addRoute, bool, flagValue, int, jsonOrXml, object, queryFlag, str } from './route.js';

const tag = 'backup jobs';
type DomainParams = { domain: string };

const diskSpec = object(
  {
    target: str({ maxLength: 64 }),
    mode: { type: 'string', enum: ['full', 'incremental'] },
    since: str({ maxLength: 256 }),
    format: { type: 'string', enum: ['qcow2', 'raw'] },
    targetFile: str(),
    scratchFile: str(),
    exportName: str({ maxLength: 256 }),
    exportBitmap: str({ maxLength: 256 }),
  },
  ['target'],
);
const server = {
  oneOf: [
    object({ transport: { const: 'unix' }, socket: str() }, ['transport', 'socket']),
    object({ transport: { const: 'tcp' }, host: str({ maxLength: 256 }), port: int(1), tls: bool }, ['transport', 'host', 'port', 'tls']),
  ],
};
const backupSpec = object({ mode: { type: 'string', enum: ['push', 'pull'] }, since: str({ maxLength: 256 }), disks: { type: 'array', items: diskSpec, maxItems: 256 }, server }, ['mode']);
const beginSchema = object({
  spec: backupSpec,
  checkpoint: object({ name: str({ maxLength: 256 }), description: str() }),
  targetDir: str(),
  reuseExternal: bool,
  strict: bool,
  bandwidthBytesPerSec: int(1),
});

interface BeginBody extends Omit<BackupBeginOptions, 'checkpoint' | 'ownedByCaller' | 'discardCheckpointOnFailure'> {
  spec?: BackupSpec;
  checkpoint?: CheckpointSpec;
}

/** The spec and options of a begin request; an XML body is a backup document with the checkpoint given by ?checkpoint=. */
function beginRequest(body: unknown, checkpoint: string | undefined): { spec: BackupSpec; options: BackupBeginOptions } {
  if (typeof body === 'string') return { spec: parseBackupSpec(body), options: checkpoint !== undefined ? { checkpoint: { name: checkpoint } } : {} };
  const b = (body ?? {}) as BeginBody;
  if (checkpoint !== undefined && b.checkpoint !== undefined) throw new QbackupError('INVALID_ARGUMENT', 'Give the new checkpoint either in the body or with ?checkpoint=, not both');
  const { spec, checkpoint: cp, ...options } = b;
  const chk = cp ?? (checkpoint !== undefined ? { name: checkpoint } : undefined);
  return { spec: spec ?? { mode: 'push' }, options: { ...options, ...(chk !== undefined ? { checkpoint: chk } : {}) } };
}

export function jobRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  addRoute<DomainParams, { checkpoint?: string }, unknown>(app, service, {
    method: 'POST', url: '/api/domains/:domain/job', tag, params: domainParams, status: 201,
    summary: 'Begin a backup job: JSON { spec: BackupSpec, checkpoint, targetDir, reuseExternal, strict, bandwidthBytesPerSec } or libvirt backup XML (?checkpoint=NAME creates a checkpoint with it)',
    query: object({ checkpoint: str({ maxLength: 256 }) }),
    body: jsonOrXml(beginSchema),
    handler: ({ params: p, query: q, body }) => {
      const { spec, options } = beginRequest(body, q.checkpoint);
      return qb.backups.begin(p.domain, spec, options);
    },
  });
  addRoute<DomainParams, { completed?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/job', tag, params: domainParams, summary: 'The running backup job with fresh progress (?completed=true: the last finished one)',
    query: object({ completed: queryFlag }),
    handler: async ({ params: p, query: q }) => {
      const completed = flagValue(q.completed);
      const job = completed ? await qb.backups.lastResult(p.domain) : await qb.backups.info(p.domain);
      if (job === undefined) throw new QbackupError('JOB_NOT_FOUND', completed ? `Domain "${p.domain}" has no finished backup job` : `Domain "${p.domain}" has no running backup job`);
      return job;
    },
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'DELETE', url: '/api/domains/:domain/job', tag, params: domainParams, summary: 'End the running job: a push job is aborted and its targets removed; a pull job ends normally',
    handler: ({ params: p }) => qb.backups.abort(p.domain),
  });
}
