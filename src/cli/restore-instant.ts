// `qbackup restore --instant`: starts the domain from the backup at once and,
// with --wait, follows QEMU's copy of the data into local overlays to its end
// with a progress bar. The options were checked against each other by the
// restore command; what only --instant refuses is checked here.

import { QbackupError } from '../errors.js';
import type { Qbackup } from '../qbackup.js';
import type { InstantRestoreInfo } from '../instant/restore.js';
import type { RepoAccess } from '../repository/repository.js';
import { describeInstant } from './formatters.js';
import { positiveNumber } from './options.js';
import { emit, type OutputOptions } from './output.js';
import { progressReporter } from './progress.js';

const MiB = 1024 * 1024;

/** `restore --instant`: starts the domain from the backup; with --wait, follows the copy to its end. */
export async function runInstantRestore(
  qb: Qbackup,
  out: OutputOptions,
  access: RepoAccess,
  domain: string,
  o: { to?: string | undefined; as?: string | undefined; backup?: string | undefined; until: Date | undefined; intoDomain?: string | undefined; disk: string[]; format: string; wait: boolean; bandwidth?: string | undefined },
): Promise<void> {
  if (o.intoDomain !== undefined || o.disk.length > 0 || o.format !== 'qcow2') {
    throw new QbackupError('INVALID_ARGUMENT', 'Option --instant restores every disk of the backup into qcow2 overlays; it takes neither --into-domain, --disk nor --format');
  }
  const speed = o.bandwidth !== undefined ? Math.round(positiveNumber('--bandwidth', o.bandwidth, 'MiB/s') * MiB) : undefined;
  const started = await qb.instant.restore(domain, { ...access, to: o.to, as: o.as, backup: o.backup, until: o.until, speedBytesPerSec: speed });
  if (!o.wait) {
    // A hypervisor that copies one disk at a time (libvirt) starts each next copy when a command looks at the domain.
    const follow = started.disks.some((d) => d.status === 'waiting')
      ? `; its disks are copied one at a time, the next one started by the next command on it (domjobinfo ${started.domain}, or restore --instant --wait)`
      : ` (see domjobinfo ${started.domain})`;
    emit(out, started, () => `Domain ${started.domain} runs from backup ${started.backup}; its data is being copied in${follow}\n${describeInstant(started)}`);
    return;
  }
  const bar = progressReporter(out);
  let result: InstantRestoreInfo;
  try {
    result = await qb.instant.wait(started.domain, { onProgress: (p) => bar.update({ ...p, phase: `copying into ${started.domain}` }) });
  } finally {
    bar.stop();
  }
  emit(out, result, () => `Domain ${result.domain} runs on its local images; backup ${result.backup} is no longer served\n${describeInstant(result)}`);
}

