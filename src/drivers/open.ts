// Choosing a hypervisor driver from a connection URI, as libvirt's clients do:
//
//   (none), qbackup:///                      our own QEMU engine (src/drivers/qemu/)
//   qemu:///system, qemu:///session,
//   qemu+unix:///system?socket=PATH          a libvirt daemon, over its RPC protocol
//
// The URI is read by src/drivers/libvirt/uri.ts (the one parser, strict:
// remote transports, other hypervisors and unknown parameters are refused);
// here any refusal is DRIVER_UNAVAILABLE in one sentence. The caller hands
// in the libvirt driver's factory (or registers one); without it a libvirt
// URI fails instead of silently using the local engine.

import { QbackupError, describeError } from '../errors.js';
import type { HypervisorDriver } from './driver.js';
import { parseConnectUri } from './libvirt/uri.js';

/** A connection URI, read. */
export type ConnectionUri =
  | { kind: 'qbackup'; uri: string }
  | { kind: 'libvirt'; uri: string; instance: 'system' | 'session'; transport: 'unix'; socket: string | undefined };

/** A driver for libvirt URIs. */
export type LibvirtDriverFactory = (uri: Extract<ConnectionUri, { kind: 'libvirt' }>) => HypervisorDriver;

/** What opening a driver may use: the local engine's driver and the libvirt driver, made on demand. */
export interface DriverSources {
  qemu: () => HypervisorDriver;
  libvirt?: LibvirtDriverFactory | undefined;
}

const LIBVIRT_DRIVERS: LibvirtDriverFactory[] = [];

export function registerLibvirtDriver(factory: LibvirtDriverFactory): void {
  LIBVIRT_DRIVERS.push(factory);
}

export function parseConnectionUri(uri: string | undefined): ConnectionUri {
  if (uri === undefined || uri === '' || uri === 'qbackup://') return { kind: 'qbackup', uri: 'qbackup:///' };
  let parsed;
  try {
    // The session socket is found later, with the caller's runtime directory; here the URI is only checked.
    parsed = parseConnectUri(uri, { runtimeDir: '/run/user/unknown' });
  } catch (err) {
    throw new QbackupError('DRIVER_UNAVAILABLE', describeError(err), { cause: err });
  }
  if (parsed.driver === 'qbackup') return { kind: 'qbackup', uri: 'qbackup:///' };
  const query = uri.includes('?') ? new URLSearchParams(uri.slice(uri.indexOf('?') + 1)) : new URLSearchParams();
  return { kind: 'libvirt', uri, instance: parsed.mode, transport: 'unix', socket: query.get('socket') ?? undefined };
}

export function openDriver(uri: string | undefined, sources: DriverSources): HypervisorDriver {
  const parsed = parseConnectionUri(uri);
  if (parsed.kind === 'qbackup') return sources.qemu();
  const factory = sources.libvirt ?? LIBVIRT_DRIVERS[0];
  if (factory === undefined) {
    throw new QbackupError('DRIVER_UNAVAILABLE', `Cannot connect to "${parsed.uri}": libvirt support is not built into this qbackup; use qbackup:/// (the default) for domains qbackup runs itself`);
  }
  return factory(parsed);
}
