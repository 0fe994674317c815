// What a backup job asks of QEMU, and how it is taken apart again: the one
// transaction that starts the job (temporary merged bitmaps, the new
// checkpoint's bitmap changes, every copy or fleecing job), the pull-mode
// exports, progress from query-jobs, and the ordered teardown. No metadata is
// touched here; service.ts decides when each step runs.

import { mergedBitmapActions, toTransaction, type BitmapAction } from '../checkpoint/bitmaps.js';
import { QbackupError, describeError } from '../errors.js';
import { nodeNamesFor } from '../qemu/nodes.js';
import { QmpCommandError, type QmpClient, type QmpTransactionAction } from '../qmp/index.js';
import { assert } from '../util/assert.js';
import { sleep } from '../util/proc.js';
import type { JobDisk, JobInfo, NbdServer } from './job.js';

/** The one transaction that starts the job: temporary merged bitmaps, the new checkpoint, and every copy job. */
export function startActions(info: JobInfo, checkpointActions: readonly BitmapAction[], speed: number | undefined): QmpTransactionAction[] {
  const actions: QmpTransactionAction[] = [];
  for (const d of info.disks) {
    if (d.tmpBitmap !== undefined) actions.push(...mergedBitmapActions(d.diskId, d.tmpBitmap, d.bitmaps ?? []));
  }
  actions.push(...toTransaction(checkpointActions));
  for (const d of info.disks) {
    // Pull: fleecing (sync none; copy-before-write keeps the view at this instant
    // and the scratch image takes the old data). Push: the copy itself.
    const copy =
      info.mode === 'pull'
        ? { sync: 'none', 'filter-node-name': d.pull?.cbwNode }
        : {
            sync: d.tmpBitmap !== undefined ? 'bitmap' : 'full',
            ...(d.tmpBitmap !== undefined ? { bitmap: d.tmpBitmap, 'bitmap-mode': 'never' } : {}),
            ...(speed !== undefined ? { speed } : {}),
          };
    actions.push({
      type: 'blockdev-backup',
      data: { 'job-id': d.qemuJobId, device: nodeNamesFor(d.diskId).format, target: d.targetNodes.format, ...copy, 'auto-finalize': true, 'auto-dismiss': false },
    });
  }
  return actions;
}

/** Opens a job's target (push) or scratch (pull) image as QEMU nodes; a LUKS one with its secret object first. */
export async function addTargetNodes(qmp: QmpClient, d: JobDisk): Promise<void> {
  const enc = d.encryption;
  if (enc !== undefined) await qmp.execute('object-add', { 'qom-type': 'secret', id: enc.secretId, file: enc.secretFile });
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': d.targetNodes.file, filename: d.targetFile });
  // backing: null — the job writes every cluster it copies, so a previous backup is never opened.
  await qmp.execute('blockdev-add', {
    driver: d.targetFormat,
    'node-name': d.targetNodes.format,
    file: d.targetNodes.file,
    ...(d.targetFormat === 'qcow2' ? { backing: null } : {}),
    ...(enc !== undefined ? { encrypt: { format: 'luks', 'key-secret': enc.secretId } } : {}),
  });
}

/**
 * Pull mode over TLS, before the transaction: QEMU's x509 credentials for the
 * NBD server, loaded from the job's certificate directory (QEMU reads and
 * checks the files now, so a bad certificate fails the job before it starts).
 * Clients must present a certificate signed by the same CA (verify-peer).
 */
export async function addTlsCredentials(qmp: QmpClient, server: NbdServer): Promise<void> {
  if (server.transport !== 'tcp' || !server.tls) return;
  const { tlsCredsId: id, tlsCertDir: dir, tlsAuthzId, tlsClientIdentity } = server;
  assert(id !== undefined && dir !== undefined, 'a TLS server has a credentials id and directory');
  if (tlsAuthzId !== undefined && tlsClientIdentity !== undefined) {
    await qmp.execute('object-add', { 'qom-type': 'authz-simple', id: tlsAuthzId, identity: tlsClientIdentity });
  }
  try {
    await qmp.execute('object-add', { 'qom-type': 'tls-creds-x509', id, dir, endpoint: 'server', 'verify-peer': true });
  } catch (err) {
    if (!(err instanceof QmpCommandError)) throw err;
    throw new QbackupError('TLS_CREDENTIALS', `Cannot serve NBD exports over TLS with the certificates in "${dir}": QEMU refused them (${err.desc})`, { cause: err, details: { dir } });
  }
}

/** Pull mode, after the transaction: snapshot-access nodes over the fleecing filters, one read-only export each. */
export async function exportDisks(qmp: QmpClient, server: NbdServer, disks: readonly JobDisk[]): Promise<void> {
  for (const d of disks) {
    if (d.pull !== undefined) await qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': d.pull.snapNode, file: d.pull.cbwNode });
  }
  const addr =
    server.transport === 'tcp' ? { type: 'inet', data: { host: server.host, port: String(server.port) } } : { type: 'unix', data: { path: server.socket } };
  const tlsCreds =
    server.transport === 'tcp' && server.tls
      ? { 'tls-creds': server.tlsCredsId, ...(server.tlsAuthzId !== undefined ? { 'tls-authz': server.tlsAuthzId } : {}) }
      : {};
  await qmp.execute('nbd-server-start', { addr, ...tlsCreds });
  for (const d of disks) {
    if (d.pull === undefined) continue;
    await qmp.execute('block-export-add', {
      type: 'nbd',
      id: d.pull.exportId,
      'node-name': d.pull.snapNode,
      name: d.pull.exportName,
      writable: false,
      'allocation-depth': true,
      ...(d.tmpBitmap !== undefined ? { bitmaps: [{ node: nodeNamesFor(d.diskId).format, name: d.tmpBitmap }] } : {}),
    });
  }
}

export interface QemuJob {
  id: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

export async function queryJobs(qmp: QmpClient): Promise<Map<string, QemuJob>> {
  const jobs = await qmp.execute<QemuJob[]>('query-jobs');
  return new Map(jobs.map((j) => [j.id, j]));
}

/** Copies QEMU's progress and per-disk outcomes into the job. */
export function applyProgress(info: JobInfo, jobs: ReadonlyMap<string, QemuJob>): void {
  let done = 0;
  let total = 0;
  for (const d of info.disks) {
    const j = jobs.get(d.qemuJobId);
    if (j === undefined) continue;
    d.bytesDone = j['current-progress'];
    d.bytesTotal = j['total-progress'];
    done += j['current-progress'];
    total += j['total-progress'];
    if (j.status === 'concluded') {
      d.state = j.error !== undefined ? (/cancel/i.test(j.error) ? 'cancelled' : 'failed') : 'completed';
      if (j.error !== undefined) d.error = j.error;
    }
  }
  info.bytesDone = done;
  info.bytesTotal = total;
}

export async function waitConcluded(qmp: QmpClient, ids: readonly string[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const jobs = await queryJobs(qmp);
    if (ids.every((id) => jobs.get(id) === undefined || jobs.get(id)?.status === 'concluded')) return;
    if (Date.now() > deadline) throw new QbackupError('QMP_TIMEOUT', `Backup jobs ${ids.join(', ')} did not stop within ${timeoutMs} ms`);
    await sleep(50);
  }
}

/**
 * Removes everything a job put into QEMU, in the order QEMU requires (exports,
 * then the frozen views, then the jobs, then the scratch or target nodes).
 * Every step runs even when an earlier one failed; what is already gone is
 * fine. Returns the errors of steps that failed otherwise, for the job record.
 */
export async function teardown(qmp: QmpClient, info: JobInfo): Promise<string[]> {
  const errors: string[] = [];
  const step = async (what: string, fn: () => Promise<unknown>): Promise<boolean> => {
    try {
      await fn();
      return true;
    } catch (err) {
      if (!isAlreadyGone(err)) errors.push(`${what}: ${describeError(err)}`);
      return false;
    }
  };
  for (const d of info.disks) {
    if (d.pull === undefined) continue;
    const { exportId } = d.pull;
    const cursor = qmp.eventCursor();
    if (await step(`remove export "${exportId}"`, () => qmp.execute('block-export-del', { id: exportId, mode: 'hard' }))) {
      await step(`wait for export "${exportId}" to go`, () => qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data['id'] === exportId, 10_000, cursor));
    }
  }
  for (const d of info.disks) {
    const snap = d.pull?.snapNode;
    if (snap !== undefined) await step(`remove node "${snap}"`, () => qmp.execute('blockdev-del', { 'node-name': snap }));
  }
  const jobs = await queryJobs(qmp).catch((err: unknown) => {
    errors.push(`query jobs: ${describeError(err)}`);
    return new Map<string, QemuJob>();
  });
  const live = info.disks.filter((d) => jobs.has(d.qemuJobId) && jobs.get(d.qemuJobId)?.status !== 'concluded').map((d) => d.qemuJobId);
  for (const id of live) await step(`cancel job "${id}"`, () => qmp.execute('job-cancel', { id }));
  if (live.length > 0) await step('wait for cancelled jobs', () => waitConcluded(qmp, live, 30_000));
  for (const d of info.disks) {
    await step(`dismiss job "${d.qemuJobId}"`, () => qmp.execute('job-dismiss', { id: d.qemuJobId }));
    await step(`remove node "${d.targetNodes.format}"`, () => qmp.execute('blockdev-del', { 'node-name': d.targetNodes.format }));
    await step(`remove node "${d.targetNodes.file}"`, () => qmp.execute('blockdev-del', { 'node-name': d.targetNodes.file }));
    const secret = d.encryption?.secretId;
    if (secret !== undefined) await step(`remove secret "${secret}"`, () => qmp.execute('object-del', { id: secret }));
    const tmp = d.tmpBitmap;
    if (tmp !== undefined) await step(`remove bitmap "${tmp}"`, () => qmp.execute('block-dirty-bitmap-remove', { node: nodeNamesFor(d.diskId).format, name: tmp }));
  }
  // One job per domain, and the NBD server of a domain's QEMU is the pull job's own.
  if (info.mode === 'pull') await step('stop the NBD server', () => qmp.execute('nbd-server-stop'));
  // After the server, which holds a reference to it (QEMU refuses to delete an object in use).
  const server = info.server?.transport === 'tcp' ? info.server : undefined;
  for (const [what, id] of [['TLS credentials', server?.tlsCredsId], ['TLS client authorization', server?.tlsAuthzId]] as const) {
    if (id !== undefined) await step(`remove ${what} "${id}"`, () => qmp.execute('object-del', { id }));
  }
  return errors;
}

/**
 * QEMU's answers when the object a teardown step removes does not exist (it
 * was never made, or an earlier attempt removed it): not errors for teardown.
 */
function isAlreadyGone(err: unknown): boolean {
  return err instanceof QmpCommandError && (err.errorClass === 'DeviceNotFound' || /not found|failed to find|not running/i.test(err.desc));
}
