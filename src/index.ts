// Public library API of qbackup.
export { Qbackup, type QbackupOptions } from './qbackup.js';
export { QbackupError, isQbackupError, type ErrorCode } from './errors.js';
export * from './domain/service.js';
export type { DomainDefinition, DiskDefinition, DiskBus, DiskFormat } from './domain/types.js';
export { parseDomainXml, formatDomainXml } from './libvirt/domain.js';
export { QmpClient } from './qmp/index.js';
