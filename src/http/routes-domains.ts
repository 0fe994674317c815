// Domain endpoints: list, show, define (libvirt <domain> XML, raw or as
// { xml }), undefine, start, shutdown, destroy, disks (attach, detach).
// Start, shutdown and destroy answer when QEMU has done it (bounded by the
// library's timeouts), so they need no task.

import type { FastifyInstance } from 'fastify';
import type { AttachDiskRequest } from '../domain/domains.js';
import type { QbackupService } from '../service/daemon-service.js';
import { addRoute, bool, flagValue, jsonOrXml, object, queryFlag, str } from './route.js';

const tag = 'domains';
export const domainParams = object({ domain: str({ maxLength: 256 }) }, ['domain']);
type DomainParams = { domain: string };

/** The XML of a define request: the raw body, or its `xml` field. */
export function xmlOf(body: unknown): string {
  return typeof body === 'string' ? body : ((body as { xml: string }).xml ?? '');
}

export function domainRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  addRoute<unknown, { all?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/domains', tag, summary: 'List domains (running and crashed; ?all=true adds shut-off ones)',
    query: object({ all: queryFlag }),
    handler: ({ query }) => qb.domains.list({ all: flagValue(query.all) }),
  });
  addRoute<unknown, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/domains', tag, status: 201, summary: 'Define a domain from libvirt <domain> XML (raw application/xml, or JSON { xml })',
    body: jsonOrXml(object({ xml: str({ maxLength: 1 << 20 }) }, ['xml'])),
    handler: ({ body }) => qb.domains.define(xmlOf(body)),
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain', tag, params: domainParams, summary: 'A domain: its state and disks',
    handler: ({ params }) => ({ ...qb.domains.info(params.domain), disks: qb.domains.blockList(params.domain) }),
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/xml', tag, params: domainParams, summary: 'The domain definition as libvirt XML, including hot-plugged disks',
    handler: ({ params }) => ({ name: params.domain, xml: qb.domains.dumpXml(params.domain) }),
  });
  addRoute<DomainParams, { checkpointsMetadata?: string }, unknown>(app, service, {
    method: 'DELETE', url: '/api/domains/:domain', tag, params: domainParams, summary: 'Undefine a shut-off domain (its images are kept)',
    query: object({ checkpointsMetadata: queryFlag }),
    handler: async ({ params, query }) => {
      await qb.domains.undefine(params.domain, { checkpointsMetadata: flagValue(query.checkpointsMetadata) });
      return { name: params.domain, undefined: true };
    },
  });
  addRoute<DomainParams, unknown, { paused?: boolean } | undefined>(app, service, {
    method: 'POST', url: '/api/domains/:domain/start', tag, params: domainParams, summary: 'Start the domain in QEMU (paused: CPUs stopped)',
    body: object({ paused: bool }),
    handler: ({ params, body }) => qb.domains.start(params.domain, { paused: body?.paused === true }),
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/domains/:domain/shutdown', tag, params: domainParams, summary: 'Stop the domain cleanly (persistent bitmaps are stored)',
    handler: ({ params }) => qb.domains.shutdown(params.domain),
  });
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/domains/:domain/destroy', tag, params: domainParams, summary: "Kill the domain's QEMU at once; bitmaps of this run are lost",
    handler: ({ params }) => qb.domains.destroy(params.domain),
  });
  diskRoutes(app, service);
}

function diskRoutes(app: FastifyInstance, service: QbackupService): void {
  const qb = service.qb;
  addRoute<DomainParams, unknown, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain/disks', tag, params: domainParams, summary: "The domain's disks",
    handler: ({ params }) => qb.domains.blockList(params.domain),
  });
  addRoute<DomainParams, unknown, AttachDiskRequest>(app, service, {
    method: 'POST', url: '/api/domains/:domain/disks', tag, params: domainParams, status: 201, summary: 'Attach an image as a disk, live when the domain runs, and in its definition',
    body: object(
      { source: str(), target: str({ maxLength: 64 }), format: { type: 'string', enum: ['qcow2', 'raw'] }, bus: { type: 'string', enum: ['scsi', 'virtio'] }, serial: str({ maxLength: 64 }), readonly: bool },
      ['source', 'target'],
    ),
    handler: ({ params, body }) => qb.domains.attachDisk(params.domain, body),
  });
  addRoute<DomainParams & { target: string }, unknown, unknown>(app, service, {
    method: 'DELETE', url: '/api/domains/:domain/disks/:target', tag, summary: 'Detach a disk, live when the domain runs, and from its definition',
    params: object({ domain: str({ maxLength: 256 }), target: str({ maxLength: 64 }) }, ['domain', 'target']),
    handler: async ({ params }) => {
      await qb.domains.detachDisk(params.domain, params.target);
      return { name: params.domain, target: params.target, detached: true };
    },
  });
}
