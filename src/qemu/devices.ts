// Hot-plug and unplug of a disk in a running QEMU: the blockdev nodes, the
// guest device (SCSI on the domain's controller, virtio-blk on a free PCIe
// root port), and their removal. A failed plug removes what it added; a
// rollback step that fails too is named in the error, not dropped.

import { QbackupError, describeError, isQbackupError } from '../errors.js';
import type { QmpClient } from '../qmp/index.js';
import { blockdevSpecs, deviceSpec, nodeNamesFor, ROOT_PORT_COUNT, rootPortId, type QemuDiskSpec } from './nodes.js';

/** Adds the disk's nodes and its guest device; on failure removes the nodes it added. */
export async function hotplugDisk(qmp: QmpClient, disk: QemuDiskSpec): Promise<void> {
  const [fileSpec, formatSpec] = blockdevSpecs(disk);
  const names = nodeNamesFor(disk.diskId);
  const added: string[] = [];
  try {
    await qmp.execute('blockdev-add', fileSpec);
    added.unshift(names.file);
    await qmp.execute('blockdev-add', formatSpec);
    added.unshift(names.format);
    const port = disk.bus === 'virtio' ? await freeRootPort(qmp) : undefined;
    await qmp.execute('device_add', deviceSpec(disk, port));
  } catch (err) {
    const failed: string[] = [];
    for (const node of added) {
      await qmp.execute('blockdev-del', { 'node-name': node }).catch((e: unknown) => failed.push(`node "${node}": ${describeError(e)}`));
    }
    if (failed.length === 0) throw err;
    throw new QbackupError('QMP_ERROR', `${describeError(err)} (and removing what was added failed: ${failed.join('; ')})`, { cause: err });
  }
}

/** Removes the guest device (waiting for the guest to release it) and then the disk's nodes. */
export async function unplugDisk(qmp: QmpClient, domain: string, disk: QemuDiskSpec, timeoutMs: number): Promise<void> {
  const cursor = qmp.eventCursor();
  await qmp.execute('device_del', { id: disk.target });
  try {
    await qmp.waitForEvent('DEVICE_DELETED', (e) => e.data['device'] === disk.target, timeoutMs, cursor);
  } catch (err) {
    if (!isQbackupError(err, 'QMP_TIMEOUT')) throw err;
    const hint = disk.bus === 'virtio' ? ': virtio disks are released only by a guest OS that answers the unplug request' : '';
    throw new QbackupError('QMP_TIMEOUT', `Cannot detach disk "${disk.target}" of domain "${domain}": the guest did not release it within ${timeoutMs} ms${hint}`, {
      cause: err,
    });
  }
  const names = nodeNamesFor(disk.diskId);
  await qmp.execute('blockdev-del', { 'node-name': names.format });
  await qmp.execute('blockdev-del', { 'node-name': names.file });
}

interface PciDevice {
  qdev_id?: string;
  pci_bridge?: { devices?: PciDevice[] };
}

/** The first of the domain's PCIe root ports with nothing plugged in. */
async function freeRootPort(qmp: QmpClient): Promise<string> {
  const buses = await qmp.execute<Array<{ devices: PciDevice[] }>>('query-pci');
  const used = new Map<string, number>();
  for (const bus of buses) {
    for (const dev of bus.devices) {
      if (dev.qdev_id !== undefined && dev.pci_bridge !== undefined) used.set(dev.qdev_id, dev.pci_bridge.devices?.length ?? 0);
    }
  }
  for (let i = 0; i < ROOT_PORT_COUNT; i++) {
    if (used.get(rootPortId(i)) === 0) return rootPortId(i);
  }
  throw new QbackupError('NOT_SUPPORTED', `No free PCIe root port for another virtio disk (at most ${ROOT_PORT_COUNT})`);
}
