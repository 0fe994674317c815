// Domain endpoints: the connections the daemon reaches, list and show
// (?connection= a configured name or a URI: qbackup's own domains or
// libvirt's, each naming its connection), and for qbackup's own domains
// define (libvirt <domain> XML, raw or as { xml }), undefine, start,
// shutdown, destroy, disks (attach, detach).
// Start, shutdown and destroy answer when QEMU has done it (bounded by the
// library's timeouts), so they need no task.

import type { FastifyInstance } from 'fastify';
import type { AttachDiskRequest } from '../domain/domains.js';
import { QEMU_DRIVER_URI } from '../drivers/qemu/driver.js';
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
  addRoute(app, service, {
    method: 'GET', url: '/api/connections', tag, summary: 'The hypervisor connections the daemon reaches (qbackup:/// is its own QEMU; qemu:///system is libvirt), the default first',
    handler: () => service.connections(),
  });
  addRoute<unknown, { all?: string; connection?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/domains', tag, summary: 'List the domains of a connection (running and crashed; ?all=true adds shut-off ones; ?connection= a configured name or a URI, default the daemon\'s)',
    query: object({ all: queryFlag, connection: str({ maxLength: 1024 }) }),
    handler: ({ query }) => service.listDomains(service.connectionUri(query.connection), { all: flagValue(query.all) }),
  });
  addRoute<unknown, unknown, unknown>(app, service, {
    method: 'POST', url: '/api/domains', tag, status: 201, summary: 'Define a domain from libvirt <domain> XML (raw application/xml, or JSON { xml })',
    body: jsonOrXml(object({ xml: str({ maxLength: 1 << 20 }) }, ['xml'])),
    handler: ({ body }) => qb.domains.define(xmlOf(body)),
  });
  addRoute<DomainParams, { connection?: string }, unknown>(app, service, {
    method: 'GET', url: '/api/domains/:domain', tag, params: domainParams, summary: 'A domain: its state and disks (?connection= as for the list)',
    query: object({ connection: str({ maxLength: 1024 }) }),
    handler: async ({ params, query }) => {
      const uri = service.connectionUri(query.connection);
      if (uri === QEMU_DRIVER_URI) return { ...qb.engine.domains.info(params.domain), disks: qb.engine.domains.blockList(params.domain), connection: uri };
      const driver = qb.connection(uri).driver;
      const domain = await driver.describeDomain(params.domain);
      return { ...domain, disks: await driver.disks(params.domain), connection: uri };
    },
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
