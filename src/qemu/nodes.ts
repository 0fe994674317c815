// How a qbackup disk appears inside QEMU. Node names derive from the stable
// disk id (never from the target name, which can be reused by another image),
// and the guest device id is the target name so that users can address a disk
// in HMP recipes as they know it: `qemu-io -d sda "write …"`. Every disk is
// opened with its declared format and without a backing chain.

import type { DiskBus, DiskDefinition } from '../model/definition.js';

/** A disk as QEMU sees it: its definition plus the stable id its node names derive from. */
export type QemuDiskSpec = DiskDefinition & { diskId: string };

export interface DiskNodeNames {
  /** The protocol (file) node. */
  file: string;
  /** The format node (qcow2/raw): bitmaps live here, devices attach here. */
  format: string;
  /** The NBD node a declared NBD backing (an instant restore) is opened as. */
  backing: string;
}

export function nodeNamesFor(diskId: string): DiskNodeNames {
  return { file: `${diskId}-file`, format: `${diskId}-fmt`, backing: `${diskId}-nbd` };
}

/**
 * How long QEMU's NBD client holds guest reads while the server of a backing
 * export is away (it reconnects on its own meanwhile); after that, reads fail
 * until it is back. Short, because QEMU 7.2's monitor can stall while
 * requests are held (measured: QMP unanswered until the delay ran out).
 */
export const NBD_RECONNECT_DELAY_S = 5;

/** The blockdev-add argument object of a disk's declared NBD backing, or undefined when it has none. */
export function backingNodeSpec(disk: QemuDiskSpec): Record<string, unknown> | undefined {
  if (disk.nbdBacking === undefined) return undefined;
  return {
    driver: 'nbd',
    'node-name': nodeNamesFor(disk.diskId).backing,
    server: { type: 'unix', path: disk.nbdBacking.socket },
    export: disk.nbdBacking.exportName,
    'read-only': true,
    'reconnect-delay': NBD_RECONNECT_DELAY_S,
  };
}

/** The two blockdev-add argument objects (file node first) for a disk. */
export function blockdevSpecs(disk: QemuDiskSpec): [Record<string, unknown>, Record<string, unknown>] {
  const names = nodeNamesFor(disk.diskId);
  const file = {
    driver: 'file',
    'node-name': names.file,
    filename: disk.source,
    discard: 'unmap',
    'read-only': disk.readonly,
  };
  // An explicit driver (never probed), and backing: null so that a qcow2
  // header naming a backing file never makes QEMU open a host file; the one
  // backing QEMU opens is a declared NBD export, as its own explicit node.
  const format = {
    driver: disk.format,
    'node-name': names.format,
    file: names.file,
    discard: 'unmap',
    'read-only': disk.readonly,
    ...(disk.format === 'qcow2' ? { backing: disk.nbdBacking !== undefined ? names.backing : null } : {}),
  };
  return [file, format];
}

export const SCSI_CONTROLLER_ID = 'scsi0';
/** Hot-pluggable PCIe root ports created at start, for virtio-blk disks. */
export const ROOT_PORT_COUNT = 8;
export function rootPortId(index: number): string {
  return `rp${index}`;
}

/** device_add arguments; `rootPort` is required for virtio disks. */
export function deviceSpec(disk: QemuDiskSpec, rootPort?: string): Record<string, unknown> {
  const names = nodeNamesFor(disk.diskId);
  const spec: Record<string, unknown> =
    disk.bus === 'scsi'
      ? { driver: 'scsi-hd', drive: names.format, id: disk.target, bus: `${SCSI_CONTROLLER_ID}.0` }
      : { driver: 'virtio-blk-pci', drive: names.format, id: disk.target, bus: rootPort };
  if (disk.serial !== undefined) spec['serial'] = disk.serial;
  return spec;
}

/** The QOM path qemu-io needs to address a disk's device: `qemu-io -d PATH "…"`. */
export function qemuIoDevicePath(target: string, bus: DiskBus): string {
  return bus === 'scsi' ? target : `/machine/peripheral/${target}/virtio-backend`;
}
