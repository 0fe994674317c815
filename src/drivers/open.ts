// Choosing a hypervisor driver from a connection URI, as libvirt's clients do:
//
//   (none), qbackup:///                      our own QEMU engine (src/drivers/qemu/)
//   qemu:///system, qemu:///session,
//   qemu+unix:///system?socket=PATH          a libvirt daemon, over its RPC protocol
//
// A libvirt driver registers itself in LIBVIRT_DRIVERS below; until one does,
// a libvirt URI fails with DRIVER_UNAVAILABLE in one sentence instead of
// silently using the local engine.

import { QbackupError } from '../errors.js';
import type { HypervisorDriver } from './driver.js';

/** A connection URI, read. */
export type ConnectionUri =
  | { kind: 'qbackup'; uri: string }
  | { kind: 'libvirt'; uri: string; instance: 'system' | 'session'; transport: 'unix'; socket: string | undefined };

/** What opening a driver may use: the local engine's driver, made on demand. */
export interface DriverSources {
  qemu: () => HypervisorDriver;
}

/** A driver for libvirt URIs, registered by the module that implements it. */
export type LibvirtDriverFactory = (uri: Extract<ConnectionUri, { kind: 'libvirt' }>) => HypervisorDriver;

const LIBVIRT_DRIVERS: LibvirtDriverFactory[] = [];

export function registerLibvirtDriver(factory: LibvirtDriverFactory): void {
  LIBVIRT_DRIVERS.push(factory);
}

export function parseConnectionUri(uri: string | undefined): ConnectionUri {
  if (uri === undefined || uri === '' || uri === 'qbackup:///' || uri === 'qbackup://') return { kind: 'qbackup', uri: 'qbackup:///' };
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new QbackupError('DRIVER_UNAVAILABLE', `Cannot read connection URI "${uri}": give qbackup:/// or a libvirt URI such as qemu:///system`);
  }
  const scheme = u.protocol.replace(/:$/, '');
  if (scheme === 'qemu' || scheme === 'qemu+unix') {
    const instance = u.pathname.replace(/^\/+/, '');
    if (u.host !== '' || (instance !== 'system' && instance !== 'session')) {
      throw new QbackupError('DRIVER_UNAVAILABLE', `Cannot use connection URI "${uri}": only local libvirt URIs (qemu:///system, qemu:///session, qemu+unix:///system?socket=PATH) are understood`);
    }
    const socket = u.searchParams.get('socket') ?? undefined;
    return { kind: 'libvirt', uri, instance, transport: 'unix', socket };
  }
  throw new QbackupError('DRIVER_UNAVAILABLE', `Cannot use connection URI "${uri}": no driver handles "${scheme}:" (qbackup:/// is our own QEMU engine, qemu:///system a libvirt daemon)`);
}

export function openDriver(uri: string | undefined, sources: DriverSources): HypervisorDriver {
  const parsed = parseConnectionUri(uri);
  if (parsed.kind === 'qbackup') return sources.qemu();
  const factory = LIBVIRT_DRIVERS[0];
  if (factory === undefined) {
    throw new QbackupError('DRIVER_UNAVAILABLE', `Cannot connect to "${parsed.uri}": libvirt support is not built into this qbackup; use qbackup:/// (the default) for domains qbackup runs itself`);
  }
  return factory(parsed);
}
