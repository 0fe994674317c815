// Backups of shut-off libvirt domains without starting them: the domain's
// qcow2 images (with the persistent bitmaps libvirt's checkpoints left in
// them) are opened by a qemu-storage-daemon of ours, driven over QMP, and
// each disk is exported read-only over NBD on a unix socket in a private
// directory, with a disabled copy of the previous checkpoint's bitmap as its
// `qemu:dirty-bitmap:backup-TARGET` meta context. The new checkpoint's
// bitmap (persistent, recording, named after the checkpoint as libvirt names
// them) is added to every backed-up disk in the same process: nothing writes
// while the domain is off, so its instant is the exported view's.
//
// Invariants:
// - The daemon holds every image with write permission, so QEMU's image
//   locking makes libvirt's start of the domain fail while it runs; an image
//   already locked (the domain started before us) fails the open.
// - The daemon stores the bitmaps only when it closes the images cleanly
//   (QMP `quit`, or SIGTERM); close() waits for that and says whether it was.
// - Each daemon is recorded (owner pid, daemon pid, both with start times,
//   the domain, the checkpoint and the images) in its private directory
//   TMP/qbackup-lvoff-PID-…/record.json before it opens anything, so a later
//   command finds the daemon of an owner that died and stops it (SIGTERM
//   first: the images close cleanly), then discards the checkpoint.
// - A daemon still running when this process exits is sent SIGTERM.

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, lstatSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { QbackupError, describeError } from '../../errors.js';
import { QmpClient, QmpCommandError, type QmpTransactionAction } from '../../qmp/client.js';
import { isProcessAlive, processStartTime, sleep } from '../../util/proc.js';
import { openLogFile } from '../../util/safe-create.js';

const execFileAsync = promisify(execFile);

/** The prefix of the private directory of an offline backup. */
export const OFFLINE_DIR_PREFIX = 'qbackup-lvoff-';
const RECORD = 'record.json';

export interface OfflineDisk {
  target: string;
  /** The image file or block device. */
  source: string;
  /** Incremental since this checkpoint (its bitmap in the image); full when undefined. */
  since: string | undefined;
}

/** What a later command needs to stop the daemon of a dead owner and discard its checkpoint. */
export interface OfflineRecord {
  owner: number;
  ownerStart: string | undefined;
  daemon: number;
  daemonStart: string | undefined;
  domain: string;
  uuid: string;
  checkpoint: string;
  images: Array<{ target: string; source: string }>;
}

export interface OfflineExport {
  target: string;
  exportName: string;
  dirtyContext: string | undefined;
  virtualSize: number;
}

export interface OfflineOpenOptions {
  /** Where the private directory is made. */
  parentDir: string;
  domain: string;
  uuid: string;
  /** The new checkpoint: its bitmap is added to every disk. */
  checkpoint: string;
  disks: readonly OfflineDisk[];
  /** Default `qemu-storage-daemon`. */
  binary?: string | undefined;
  /** How long the daemon may take to answer QMP (default 30 s). */
  startTimeoutMs?: number | undefined;
}

/** The images of a shut-off domain, held by our storage daemon and exported for one backup. */
export class OfflineExports {
  private closing: Promise<{ clean: boolean }> | undefined;

  private constructor(
    private readonly daemon: RecordedDaemon,
    private readonly qmp: QmpClient,
    readonly socket: string,
    readonly disks: OfflineExport[],
    private readonly nodes: ReadonlyArray<{ node: string; target: string }>,
    private readonly checkpoint: string,
  ) {}

  /** Opens the images (failing if another process holds one), adds the new checkpoint's bitmaps and exports every disk. */
  static async open(options: OfflineOpenOptions): Promise<OfflineExports> {
    const daemon = new RecordedDaemon(options);
    let qmp: QmpClient | undefined;
    try {
      qmp = await daemon.connect(options.startTimeoutMs ?? 30_000);
      const nodes = options.disks.map((d, i) => ({ node: `disk${i}`, target: d.target }));
      for (const [i, d] of options.disks.entries()) await openImage(qmp, options.domain, d, i);
      const found = await namedNodes(qmp);
      const actions: QmpTransactionAction[] = [];
      const disks: OfflineExport[] = [];
      for (const [i, d] of options.disks.entries()) {
        const node = found.get(`disk${i}`);
        if (node === undefined) throw new QbackupError('QEMU_START_FAILED', `qemu-storage-daemon of domain "${options.domain}" did not open disk "${d.target}"`);
        actions.push({ type: 'block-dirty-bitmap-add', data: { node: `disk${i}`, name: options.checkpoint, persistent: true } });
        if (d.since !== undefined) {
          checkSinceBitmap(options.domain, d, node.bitmaps);
          // An enabled bitmap cannot be exported read-only: a frozen copy is.
          actions.push({ type: 'block-dirty-bitmap-add', data: { node: `disk${i}`, name: `backup-${d.target}`, persistent: false, disabled: true } });
          actions.push({ type: 'block-dirty-bitmap-merge', data: { node: `disk${i}`, target: `backup-${d.target}`, bitmaps: [d.since] } });
        }
        disks.push({ target: d.target, exportName: d.target, dirtyContext: d.since === undefined ? undefined : `qemu:dirty-bitmap:backup-${d.target}`, virtualSize: node.virtualSize });
      }
      await qmp.transaction(actions);
      const socket = join(daemon.dir, 'nbd.sock');
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
      for (const [i, d] of options.disks.entries()) {
        await qmp.execute('block-export-add', { type: 'nbd', id: `export${i}`, 'node-name': `disk${i}`, name: d.target, writable: false, ...(d.since !== undefined ? { bitmaps: [`backup-${d.target}`] } : {}) });
      }
      return new OfflineExports(daemon, qmp, socket, disks, nodes, options.checkpoint);
    } catch (err) {
      // Nothing of this attempt may stay in the images: the new bitmaps go before the daemon closes them.
      if (qmp !== undefined) await removeBitmaps(qmp, options.disks.map((_, i) => `disk${i}`), options.checkpoint).catch(() => undefined);
      await daemon.stop(qmp);
      throw err;
    }
  }

  /**
   * Ends the exports and closes the images; idempotent. `discard` removes
   * the new checkpoint's bitmaps first. `clean` is false when the daemon did
   * not close the images itself (its bitmaps are then not stored).
   */
  close(options: { discard?: boolean | undefined } = {}): Promise<{ clean: boolean }> {
    this.closing ??= (async () => {
      if (options.discard) await removeBitmaps(this.qmp, this.nodes.map((n) => n.node), this.checkpoint).catch(() => undefined);
      return { clean: await this.daemon.stop(this.qmp) };
    })();
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

async function openImage(qmp: QmpClient, domain: string, d: OfflineDisk, i: number): Promise<void> {
  const blockDevice = statSync(d.source, { throwIfNoEntry: false })?.isBlockDevice() === true;
  try {
    await qmp.execute('blockdev-add', { driver: blockDevice ? 'host_device' : 'file', 'node-name': `file${i}`, filename: d.source });
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': `disk${i}`, file: `file${i}` });
  } catch (err) {
    if (err instanceof QmpCommandError && /Failed to get .* lock/.test(err.desc)) {
      throw new QbackupError('DOMAIN_RUNNING', `Cannot back up shut-off domain "${domain}": image "${d.source}" of disk "${d.target}" is in use by another process`, { cause: err });
    }
    throw new QbackupError('BACKUP_FAILED', `Cannot open image "${d.source}" of disk "${d.target}" of domain "${domain}": ${describeError(err)}`, { cause: err });
  }
}

interface BitmapInfo {
  name: string;
  recording: boolean;
  inconsistent: boolean;
}

/** The daemon's nodes by name: virtual size and dirty bitmaps. */
async function namedNodes(qmp: QmpClient): Promise<Map<string, { virtualSize: number; bitmaps: BitmapInfo[] }>> {
  type Node = { 'node-name': string; image: { 'virtual-size': number }; 'dirty-bitmaps'?: Array<{ name: string; recording: boolean; inconsistent?: boolean }> };
  const nodes = await qmp.execute<Node[]>('query-named-block-nodes', { flat: true });
  return new Map(nodes.map((n) => [n['node-name'], { virtualSize: n.image['virtual-size'], bitmaps: (n['dirty-bitmaps'] ?? []).map((b) => ({ name: b.name, recording: b.recording, inconsistent: b.inconsistent === true })) }]));
}

/** The bitmap an incremental disk is read through: present, consistent and recording since its checkpoint. */
function checkSinceBitmap(domain: string, d: OfflineDisk, bitmaps: readonly BitmapInfo[]): void {
  const b = bitmaps.find((x) => x.name === d.since);
  const what = `Cannot back up disk "${d.target}" of domain "${domain}" incrementally since checkpoint "${String(d.since)}"`;
  if (b === undefined) throw new QbackupError('BITMAP_INCONSISTENT', `${what}: its image "${d.source}" has no bitmap "${String(d.since)}"`);
  if (b.inconsistent) throw new QbackupError('BITMAP_INCONSISTENT', `${what}: bitmap "${b.name}" in image "${d.source}" was left in use by a QEMU that did not close the image`);
  if (!b.recording) throw new QbackupError('BITMAP_INCONSISTENT', `${what}: bitmap "${b.name}" in image "${d.source}" is not recording`);
}

async function removeBitmaps(qmp: QmpClient, nodes: readonly string[], name: string): Promise<void> {
  const present = await namedNodes(qmp);
  const actions = nodes.filter((n) => present.get(n)?.bitmaps.some((b) => b.name === name)).map((node) => ({ type: 'block-dirty-bitmap-remove', data: { node, name } }));
  if (actions.length > 0) await qmp.transaction(actions);
}

// ---- the daemon process ----

/** Our qemu-storage-daemon in its private directory, recorded before it opens anything. */
class RecordedDaemon {
  readonly dir: string;
  private readonly qmpSocket: string;
  private readonly child: ChildProcess;
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private spawnError: Error | undefined;
  private readonly exited: Promise<void>;
  private stopping: Promise<boolean> | undefined;
  private readonly onProcessExit = (): void => {
    if (this.exit === undefined) this.child.kill('SIGTERM');
  };

  constructor(private readonly options: OfflineOpenOptions) {
    this.dir = mkdtempSync(join(options.parentDir, `${OFFLINE_DIR_PREFIX}${process.pid}-`));
    this.qmpSocket = join(this.dir, 'qmp.sock');
    const logFd = openLogFile(join(this.dir, 'daemon.log'), 'append');
    try {
      this.child = spawn(options.binary ?? 'qemu-storage-daemon', ['--chardev', `socket,path=${this.qmpSocket},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], { stdio: ['ignore', logFd, logFd] });
    } finally {
      closeSync(logFd);
    }
    this.exited = new Promise<void>((resolve) => {
      this.child.on('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve();
      });
      this.child.on('error', (err) => {
        this.spawnError = err;
        resolve();
      });
    });
    process.on('exit', this.onProcessExit);
    const pid = this.child.pid;
    if (pid !== undefined) {
      const record: OfflineRecord = { owner: process.pid, ownerStart: processStartTime(process.pid), daemon: pid, daemonStart: processStartTime(pid), domain: options.domain, uuid: options.uuid, checkpoint: options.checkpoint, images: options.disks.map((d) => ({ target: d.target, source: d.source })) };
      // Written aside and renamed: a reaper never reads half a record.
      writeFileSync(join(this.dir, `${RECORD}.tmp`), JSON.stringify(record), { mode: 0o600 });
      renameSync(join(this.dir, `${RECORD}.tmp`), join(this.dir, RECORD));
    }
  }

  private failure(): QbackupError {
    const log = tail(join(this.dir, 'daemon.log'));
    const why = this.spawnError?.message ?? (this.exit !== undefined ? `it exited (${String(this.exit.code ?? this.exit.signal)})${log ? `: ${log}` : ''}` : 'it did not answer QMP in time');
    return new QbackupError('QEMU_START_FAILED', `Cannot open the images of domain "${this.options.domain}" in qemu-storage-daemon: ${why}`);
  }

  async connect(timeoutMs: number): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.spawnError !== undefined || this.exit !== undefined) throw this.failure();
      try {
        return await QmpClient.connect(this.qmpSocket, { connectTimeoutMs: 5_000 });
      } catch {
        if (Date.now() > deadline) throw this.failure();
        await sleep(20);
      }
    }
  }

  /** Closes the images (quit, then SIGTERM, then SIGKILL) and removes the directory; true when the daemon exited by itself, cleanly. Idempotent. */
  stop(qmp: QmpClient | undefined): Promise<boolean> {
    this.stopping ??= (async () => {
      let clean = false;
      if (this.exit === undefined && this.spawnError === undefined) {
        await qmp?.execute('quit', undefined, { timeoutMs: 10_000 }).catch(() => undefined);
        clean = await within(this.exited, 60_000);
        if (!clean) {
          this.child.kill('SIGTERM');
          if (!(await within(this.exited, 15_000))) this.child.kill('SIGKILL');
          await this.exited;
        }
        // Set by the exit handler meanwhile.
        clean = clean && (this.exit as { code: number | null } | undefined)?.code === 0;
      }
      await qmp?.close();
      process.off('exit', this.onProcessExit);
      rmSync(this.dir, { recursive: true, force: true });
      return clean;
    })();
    return this.stopping;
  }
}

function within(p: Promise<void>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]).finally(() => clearTimeout(timer));
}

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-3).join(' ').replace(/qemu-storage-daemon: /g, '');
  } catch {
    return '';
  }
}

// ---- what a dead owner left ----

export interface StaleOffline {
  record: OfflineRecord;
  /** Stops the recorded daemon if it still runs (SIGTERM, so the images close cleanly; SIGKILL if it hangs). */
  stopDaemon(): Promise<void>;
  /** Removes the private directory (once the checkpoint is dealt with). */
  remove(): void;
}

/**
 * The offline backups of domain `uuid` recorded under `parentDir`: `busy`
 * those whose owner runs, `stale` those whose owner died. Only directories
 * this user owns are read.
 */
export function offlineRecords(parentDir: string, uuid: string): { busy: OfflineRecord[]; stale: StaleOffline[] } {
  const busy: OfflineRecord[] = [];
  const stale: StaleOffline[] = [];
  let names: string[];
  try {
    names = readdirSync(parentDir).filter((n) => n.startsWith(OFFLINE_DIR_PREFIX));
  } catch {
    return { busy, stale };
  }
  for (const name of names) {
    const dir = join(parentDir, name);
    const st = lstatSync(dir, { throwIfNoEntry: false });
    if (st === undefined || !st.isDirectory() || st.uid !== process.getuid?.()) continue;
    let record: OfflineRecord;
    try {
      record = JSON.parse(readFileSync(join(dir, RECORD), 'utf8')) as OfflineRecord;
    } catch {
      continue; // not recorded yet (its owner writes it right after the spawn), or being removed
    }
    if (record.uuid !== uuid) continue;
    if (isProcessAlive(record.owner, record.ownerStart)) {
      busy.push(record);
      continue;
    }
    stale.push({
      record,
      stopDaemon: async () => {
        if (!isProcessAlive(record.daemon, record.daemonStart)) return;
        signal(record.daemon, 'SIGTERM');
        const deadline = Date.now() + 15_000;
        while (isProcessAlive(record.daemon, record.daemonStart) && Date.now() < deadline) await sleep(50);
        if (isProcessAlive(record.daemon, record.daemonStart)) signal(record.daemon, 'SIGKILL');
        while (isProcessAlive(record.daemon, record.daemonStart)) await sleep(50);
      },
      remove: () => rmSync(dir, { recursive: true, force: true }),
    });
  }
  return { busy, stale };
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone meanwhile
  }
}

// ---- bitmaps of an image nobody holds (qemu-img) ----

export interface ImageBitmap {
  name: string;
  /** Recording (qcow2's `auto` flag). */
  recording: boolean;
  /** Left `in-use` by a QEMU that did not close the image: unusable. */
  inUse: boolean;
}

/** The persistent bitmaps of a qcow2 image, read without taking its lock. */
export async function imageBitmaps(path: string): Promise<ImageBitmap[]> {
  const { stdout } = await execFileAsync('qemu-img', ['info', '-U', '--output=json', path], { maxBuffer: 16 << 20 });
  const info = JSON.parse(stdout) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
  return (info['format-specific']?.data?.bitmaps ?? []).map((b) => ({ name: b.name, recording: b.flags.includes('auto'), inUse: b.flags.includes('in-use') }));
}

/** Removes bitmap `name` from a qcow2 image (taking its write lock: fails while a QEMU holds it); absent is fine. */
export async function removeImageBitmap(path: string, name: string): Promise<void> {
  if (!(await imageBitmaps(path)).some((b) => b.name === name)) return;
  try {
    await execFileAsync('qemu-img', ['bitmap', '--remove', path, name]);
  } catch (err) {
    const stderr = String((err as { stderr?: unknown }).stderr ?? '').trim().split('\n')[0] ?? '';
    throw new QbackupError(/lock/.test(stderr) ? 'DOMAIN_RUNNING' : 'BACKUP_FAILED', `Cannot remove bitmap "${name}" from image "${path}": ${stderr.replace(/^qemu-img: /, '') || describeError(err)}`, { cause: err });
  }
}
