// Checkpoint endpoints: create (JSON CheckpointSpec or <domaincheckpoint>-style
// libvirt XML), redefine, list, tree, info, coverage, delete. The XML is
// parsed at this edge by src/libvirt, as the CLI does.

import type { FastifyInstance } from 'fastify';
import type { CheckpointInfo } from '../checkpoint/checkpoints.js';
import type { CheckpointSpec } from '../checkpoint/spec.js';
import { QbackupError } from '../errors.js';
import { parseCheckpointXml } from '../libvirt/checkpoint.js';
import { SerializedBodyCache } from './body-cache.js';
import type { QbackupService } from '../service/daemon-service.js';
import { domainParams } from './routes-domains.js';
import { addRoute, flagValue, int, jsonOrXml, object, queryFlag, str, type JsonSchema } from './route.js';

const tag = 'checkpoints';
const params = object({ domain: str({ maxLength: 256 }), checkpoint: str({ maxLength: 256 }) }, ['domain', 'checkpoint']);
type Params = { domain: string; checkpoint: string };
type DomainParams = { domain: string };

const diskSpec = object({ name: str({ maxLength: 64 }), checkpoint: { type: 'string', enum: ['bitmap', 'no'] }, bitmap: str({ maxLength: 256 }) }, ['name', 'checkpoint']);
const createSchema: JsonSchema = object({ name: str({ maxLength: 256 }), description: str(), disks: { type: 'array', items: diskSpec, maxItems: 256 } });
const redefineSchema: JsonSchema = object({
  name: str({ maxLength: 256 }),
  description: str(),
  parent: str({ maxLength: 256 }),
  creationTime: int(),
  disks: { type: 'array', items: diskSpec, maxItems: 256 },
  domainXml: str({ maxLength: 1 << 20 }),
}, ['name']);

/** The spec of a create or redefine request: XML text parsed by src/libvirt, or the JSON body as it is. */
function specOf(body: unknown): CheckpointSpec {
  if (typeof body === 'string') return parseCheckpointXml(body);
  return (body ?? {}) as CheckpointSpec;
}

export interface CheckpointNode {
  name: string;
  creationTime: number;
  current: boolean;
  children: CheckpointNode[];
}

/** The checkpoints as a forest (roots first, children in creation order). */
export function checkpointTree(list: readonly CheckpointInfo[]): CheckpointNode[] {
  const nodes = new Map(list.map((c) => [c.name, { name: c.name, creationTime: c.creationTime, current: c.current, children: [] as CheckpointNode[] }]));
  const roots: CheckpointNode[] = [];
  for (const c of list) {
    const node = nodes.get(c.name);
    if (node === undefined) continue;
    const parent = c.parent !== null ? nodes.get(c.parent) : undefined;
    (parent?.children ?? roots).push(node);
  }
  return roots;
}

export function checkpointRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  // The list and the tree are the metadata alone: their bodies are kept until it changes.
  const bodies = new SerializedBodyCache();
  addRoute<DomainParams, { roots?: string; leaves?: string; topological?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/checkpoints', tag, params: domainParams, summary: 'List the checkpoints of a domain',
    query: object({ roots: queryFlag, leaves: queryFlag, topological: queryFlag }),
    handler: ({ params: p, query: q, request, reply }) => {
      const filters = { roots: flagValue(q.roots), leaves: flagValue(q.leaves), topological: flagValue(q.topological) };
      const key = `list ${p.domain} ${Number(filters.roots)}${Number(filters.leaves)}${Number(filters.topological)}`;
      return bodies.send(request, reply, key, qb.checkpoints.listStamp(), () => qb.checkpoints.list(p.domain, filters));
    },
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/checkpoint-tree', tag, params: domainParams, summary: 'The checkpoints of a domain as a parent/child tree',
    handler: ({ params: p, request, reply }) =>
      bodies.send(request, reply, `tree ${p.domain}`, qb.checkpoints.listStamp(), () => checkpointTree(qb.checkpoints.list(p.domain, { topological: true }))),
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/domains/:domain/checkpoints', tag, params: domainParams, status: 201,
    summary: 'Create a checkpoint (JSON { name, description, disks } or libvirt checkpoint XML)',
    body: jsonOrXml(createSchema),
    handler: ({ params: p, body }) => {
      const spec = specOf(body);
      if (spec.parent !== undefined || spec.creationTime !== undefined || spec.domainXml !== undefined) {
        throw new QbackupError('INVALID_ARGUMENT', `Cannot create checkpoint of domain "${p.domain}": <parent>, <creationTime> and <domain> are only accepted with --redefine`);
      }
      return qb.checkpoints.create(p.domain, spec);
    },
  });
  addRoute<DomainParams, { validate?: string }, unknown>(app, service, {
    method: 'POST', url: '/api/domains/:domain/checkpoints/redefine', tag, params: domainParams, status: 201,
    summary: 'Redefine a checkpoint from saved metadata (name, creationTime, parent) without touching bitmaps; ?validate=true checks the bitmaps',
    query: object({ validate: queryFlag }),
    body: jsonOrXml(redefineSchema),
    handler: ({ params: p, query: q, body }) => qb.checkpoints.redefine(p.domain, specOf(body), { validate: flagValue(q.validate) }),
  });
  addRoute<Params, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/checkpoints/:checkpoint', tag, params, summary: "A checkpoint's place in the chain",
    handler: ({ params: p }) => qb.checkpoints.info(p.domain, p.checkpoint),
  });
  addRoute<Params, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/checkpoints/:checkpoint/coverage', tag, params,
    summary: 'Per current disk: can a backup since this checkpoint be incremental, and if not, why',
    handler: ({ params: p }) => qb.checkpoints.coverage(p.domain, p.checkpoint),
  });
  addRoute<Params, { children?: string; childrenOnly?: string; metadata?: string }, unknown>(app, service, {
    method: 'DELETE', url: '/api/domains/:domain/checkpoints/:checkpoint', tag, params,
    summary: "Delete a checkpoint, merging its bitmap into its parent's (children, childrenOnly, metadata as virsh)",
    query: object({ children: queryFlag, childrenOnly: queryFlag, metadata: queryFlag }),
    handler: async ({ params: p, query: q }) => ({
      deleted: await qb.checkpoints.delete(p.domain, p.checkpoint, { children: flagValue(q.children), childrenOnly: flagValue(q.childrenOnly), metadata: flagValue(q.metadata) }),
    }),
  });
}
