// Validation of user-supplied names before they reach a path, a QEMU id or
// SQL. Domain names become directory names in the state directory, so they
// must never contain "/", "..", or control characters.

import { QbackupError } from '../errors.js';

const DOMAIN_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}$/;
const TARGET_NAME = /^(sd|vd)[a-z]{1,3}$/;

export function assertDomainName(name: string): void {
  if (!DOMAIN_NAME.test(name) || name.includes('..')) {
    throw new QbackupError(
      'INVALID_NAME',
      `Invalid domain name ${JSON.stringify(name)}: use 1 to 64 letters, digits, "_", "-", "+" or "." (not starting with "." and without "..")`,
    );
  }
}

export function assertTargetName(target: string): void {
  if (!TARGET_NAME.test(target)) {
    throw new QbackupError(
      'INVALID_NAME',
      `Invalid disk target ${JSON.stringify(target)}: use "sd" (SCSI) or "vd" (virtio) followed by 1 to 3 lower-case letters, e.g. "sda" or "vdb"`,
    );
  }
}

/** The bus a target name implies: sdX → scsi, vdX → virtio. */
export function busForTarget(target: string): 'scsi' | 'virtio' {
  return target.startsWith('vd') ? 'virtio' : 'scsi';
}
