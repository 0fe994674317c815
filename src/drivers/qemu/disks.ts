// A disk of our engine's domain as the driver interface shows it.

import type { AttachedDisk } from '../../domain/domains.js';
import type { DriverDisk } from '../driver.js';

export function driverDisk(d: AttachedDisk): DriverDisk {
  return { target: d.target, diskId: d.diskId, source: d.source, format: d.format, readonly: d.readonly, nbdBacking: d.nbdBacking };
}
