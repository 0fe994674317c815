// The libvirt driver: the driver interface (../driver.ts) over libvirt's own
// RPC protocol (./client.ts), for the domains a libvirt daemon already runs
// (qemu:///system, qemu:///session, qemu+unix:///system?socket=PATH).
//
// A pull backup is one virDomainBackupBegin: `<domainbackup mode='pull'>`
// with per-disk `backupmode` (full, or incremental since a named
// checkpoint) and a new checkpoint created in the same call, served on a
// unix socket in a private directory only QEMU's user and this process can
// reach. Every export is named after its disk target; an incremental disk's
// export carries `qemu:dirty-bitmap:backup-TARGET`.
//
// Invariants:
// - Checkpoints this driver creates are named `qb-…`, and it deletes no
//   other (deleteCheckpoint refuses one that is not ours).
// - A backup job is recognized as ours by its socket: OWN_PREFIX-PID-…/CHECKPOINT.sock.
//   A job whose process (PID) is dead is an orphan: the next backup (or
//   endOrphanedBackup) ends it and deletes the checkpoint it created. A job
//   that is not ours, or is ours and alive, is never touched: refused in one sentence.
// - The libvirt connection is opened on first use, opened again when it
//   closed (libvirtd restarted: tried again for reconnectTimeoutMs), and
//   closed by close(). A libvirt older than 7.2.0 (no checkpoint and backup
//   API without extra configuration) is refused at connect in one sentence.
// - A backup whose connection closed before its data was committed is lost:
//   its job's signal fires and confirmBackup refuses, naming the disconnect;
//   the job libvirt may have recovered on restart is ended by the cleanup
//   or, if that cannot reach libvirt, as an orphan by the next command.
// - A shut-off domain is backed up without starting it (./offline.ts): its
//   images are opened by a qemu-storage-daemon of ours, whose image locks
//   keep libvirt from starting the domain meanwhile; the new checkpoint's
//   bitmaps are added there and the checkpoint is registered in libvirt with
//   a REDEFINE. A daemon whose owner died is stopped, and its checkpoint
//   discarded, by the next call on the domain.
// - Deleting a checkpoint of ours: libvirt's own delete for a running
//   domain; where libvirt cannot (a shut-off domain: libvirt 9.0 refuses; an
//   image that lacks the bitmap: removed by an admin, or the image replaced)
//   one step, the bitmaps removed where they still are (QEMU's nodes, or the
//   images with qemu-img) and then libvirt's metadata only. A bitmap already
//   gone is no error.
// - An incremental asked with skipUnchanged, of a running domain whose disks
//   are all since one checkpoint P, first reads P's size (checkpoint XML with
//   VIR_DOMAIN_CHECKPOINT_XML_SIZE: bytes written since P up to now, through
//   every later checkpoint). When it is 0 on every disk, the new checkpoint N
//   is created alone (no job, no export) and P's size read again: still 0, no
//   write fell between P and a moment after N, so the disks are `unchanged`;
//   otherwise (or unreadable) N is deleted (libvirt merges its bitmap into
//   its parent, nothing is lost) and the backup job runs as usual. A record
//   file (UNCHANGED_PREFIX-UUID-PID-CHECKPOINT in socketParentDir) is written
//   before N and removed by endBackup: a record whose process died means
//   its backup never ended, and the next call on the domain deletes N.
// - Coverage of a shut-off domain reads its images' bitmaps. A running
//   domain is never read through the monitor passthrough on the normal path
//   (libvirt marks a domain it is used on as tainted, "custom-monitor"):
//   libvirt's backup begin checks each incremental disk's bitmap itself, and
//   when it refuses one as missing or broken, that disk is made full with
//   libvirt's sentence as the reason and the backup begun again (once per
//   disk; a refused begin leaves nothing behind). Only the deletion of a
//   checkpoint whose bitmap libvirt cannot find uses the passthrough.
// - An instant restore pulls one disk at a time, and nothing here asks for
//   virDomainGetBlockInfo while a pull may run: libvirt reads QEMU's node
//   graph for that and after each finished pull, which crashes QEMU 7.2 if
//   another pull is ending (docs/design.md, "QEMU 7.2's stream crash").

import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { QbackupError, describeError, isQbackupError } from '../../errors.js';
import type { Element } from '@xmldom/xmldom';
import type { Faults } from '../../util/faults.js';
import { attr, childElements, firstChild, parseXmlDocument, serializeIndented } from '../../util/xml.js';
import { createZeroOverlay } from '../../image/overlay.js';
import { makePrivateDir } from '../../util/private-dir.js';
import {
  COPY_JOB_PREFIX,
  type CopyJob,
  type DomainSession,
  type InstantPlacement,
  type Consistency,
  type CoverageProblem,
  type DiskCoverage,
  type DomainState,
  type DriverDisk,
  type DriverDomain,
  type GuestAgentSession,
  type HypervisorDriver,
  type LifecycleHooks,
  type PullBackup,
  type PullBackupRequest,
} from '../driver.js';
import { LibvirtClient } from './client.js';
import { OfflineExports, imageBitmaps, offlineRecords, removeImageBitmap, type OfflineRecord } from './offline.js';
import * as C from './rpc/constants.js';
import { LibvirtCallError } from './rpc/errors.js';
import type { LibvirtCheckpointRef, LibvirtDomainRef } from './rpc/structs.js';

/** The prefix of every checkpoint this driver creates. */
export const OWN_CHECKPOINT_PREFIX = 'qb-';
/** The prefix of the private directory of a backup's socket. */
const OWN_SOCKET_PREFIX = 'qbackup-lv-';
/** The prefix of the record of a backup whose checkpoint was made alone (nothing changed). */
const UNCHANGED_PREFIX = 'qbackup-lvu-';
/** libvirt 7.2.0: the first release with the checkpoint and backup API enabled for QEMU without extra configuration. */
export const MIN_LIBVIRT_VERSION = 7_002_000;
/** The prefix of the directory of an instant restore's socket. */
const OWN_INSTANT_PREFIX = 'qbackup-lvi-';
/** Where libvirt keeps images by default (its `default` pool on Debian and Fedora): instant restores put their overlays under it. */
const DEFAULT_IMAGE_DIR = '/var/lib/libvirt/images';

export interface LibvirtDriverOptions {
  /** The connection URI (see uri.ts). */
  uri: string;
  /** $XDG_RUNTIME_DIR of the caller, for qemu:///session. */
  runtimeDir?: string | undefined;
  /** Where the private directories of backup sockets are made; QEMU's user must be able to traverse it (e.g. /tmp). */
  socketParentDir: string;
  /** Where an instant restore puts a new domain's overlays (NAME/TARGET.qcow2) when QEMU runs as another user. Default /var/lib/libvirt/images. */
  imageDir?: string | undefined;
  /** How long shutdownDomain waits for the guest before stopping QEMU gracefully. Default 60 s. */
  shutdownTimeoutMs?: number | undefined;
  /** How long a lost connection is tried again while libvirtd restarts (no socket or nothing listening). Default 10 s. */
  reconnectTimeoutMs?: number | undefined;
  /** How long the end of a backup waits for libvirt to finish the aborted job. Default 60 s. */
  jobEndTimeoutMs?: number | undefined;
  /** Test-only fault injection (src/util/faults.ts): 'libvirt-backup-begun' once the job runs; 'libvirt-unchanged-created' once a checkpoint made alone exists. */
  faults?: Faults | undefined;
  /** The qemu-storage-daemon that opens a shut-off domain's images (default: found on PATH). */
  storageDaemon?: string | undefined;
}

/** One disk of a libvirt domain XML. */
interface XmlDisk {
  target: string;
  source: string | undefined;
  format: string;
  device: string;
  readonly: boolean;
  /** A declared `<backingStore type='network'>` that is an NBD export on a unix socket. */
  nbdBacking: { socket: string; exportName: string } | undefined;
}

export class LibvirtDriver implements HypervisorDriver {
  readonly uri: string;
  readonly defaultTlsCertDir = undefined;
  /** libvirt keeps one checkpoint per repository: the repository deletes the previous one once the next backup commits. */
  readonly keepsLatestCheckpointOnly = true;
  /** A shut-off domain is backed up without starting it. */
  readonly backsUpShutOffDomains = true;
  private connecting: Promise<LibvirtClient> | undefined;
  /** Offline backups begun here and not ended, by backup id. */
  private readonly offline = new Map<string, { domain: string; exports: OfflineExports }>();
  /** Whether a connection was open before: a new one is then tried again while libvirtd restarts. */
  private connectedBefore = false;
  /** The backups this driver began, by id: the connection that began each, and the signal that fires when it closes. */
  private readonly jobs = new Map<string, { client: LibvirtClient; dom: LibvirtDomainRef; domain: string; lost: AbortController }>();
  /** Backups begun here whose checkpoint was made alone (nothing changed), by id: their record file. */
  private readonly unchanged = new Map<string, string>();

  constructor(private readonly options: LibvirtDriverOptions) {
    this.uri = options.uri;
  }

  /** The open connection; one that closed (libvirtd restarted) is replaced by a new one. */
  private async client(): Promise<LibvirtClient> {
    const current = this.connecting;
    if (current !== undefined) {
      const open = await current.catch(() => undefined);
      if (open !== undefined && open.connection.state !== 'closed') return open;
      if (this.connecting === current) this.connecting = undefined;
    }
    this.connecting ??= this.open();
    try {
      const c = await this.connecting;
      this.connectedBefore = true;
      return c;
    } catch (err) {
      this.connecting = undefined;
      throw err;
    }
  }

  /** A new connection, of a libvirt recent enough; while libvirtd restarts (it answered before), tried again for a while. */
  private async open(): Promise<LibvirtClient> {
    const deadline = Date.now() + (this.connectedBefore ? (this.options.reconnectTimeoutMs ?? 10_000) : 0);
    let c: LibvirtClient;
    for (;;) {
      try {
        c = await LibvirtClient.connect(this.uri, { runtimeDir: this.options.runtimeDir });
        break;
      } catch (err) {
        const restarting = isQbackupError(err, 'LIBVIRT_UNAVAILABLE') || isQbackupError(err, 'LIBVIRT_DISCONNECTED');
        if (!restarting || Date.now() >= deadline) throw err;
        await sleep(250);
      }
    }
    const version = await c.getLibVersion().catch(async (err: unknown) => {
      await c.close();
      throw err;
    });
    if (version < MIN_LIBVIRT_VERSION) {
      await c.close();
      throw new QbackupError('NOT_SUPPORTED', `libvirt at ${this.uri} is version ${versionText(version)}, and qbackup needs libvirt ${versionText(MIN_LIBVIRT_VERSION)} or newer (its checkpoint and backup API)`, { details: { version, minimum: MIN_LIBVIRT_VERSION } });
    }
    return c;
  }

  /** Closes the libvirt connection; idempotent. */
  async close(): Promise<void> {
    // An offline backup nobody ended: its checkpoint goes with it.
    for (const [id, o] of this.offline) {
      this.offline.delete(id);
      await o.exports.close({ discard: true });
      await this.lookup(o.domain).then(({ c, dom }) => c.checkpointLookupByName(dom, id).then((cp) => c.checkpointDelete(cp, C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY))).catch(() => undefined);
    }
    const c = this.connecting;
    this.connecting = undefined;
    if (c !== undefined) await (await c.catch(() => undefined))?.close();
  }

  /** The domain by name; one libvirt does not know is DOMAIN_NOT_FOUND in our words (libvirt's message kept as the cause). */
  private async lookup(name: string): Promise<{ c: LibvirtClient; dom: LibvirtDomainRef }> {
    const c = await this.client();
    try {
      return { c, dom: await c.lookupDomainByName(name) };
    } catch (err) {
      if (isQbackupError(err, 'DOMAIN_NOT_FOUND')) throw new QbackupError('DOMAIN_NOT_FOUND', `libvirt at ${this.uri} has no domain "${name}"`, { cause: err, details: { domain: name } });
      throw err;
    }
  }

  // ---- domains ----

  async listDomains(): Promise<DriverDomain[]> {
    const c = await this.client();
    const out: DriverDomain[] = [];
    for (const dom of await c.listAllDomains()) out.push(await describe(c, dom));
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  async describeDomain(name: string): Promise<DriverDomain> {
    const { c, dom } = await this.lookup(name);
    return describe(c, dom);
  }

  /** libvirt's agent passthrough (virDomainQemuAgentCommand): each command a JSON text of its own; libvirt keeps the agent connection. */
  async guestAgent(name: string): Promise<GuestAgentSession> {
    const { c, dom } = await this.lookup(name);
    const cannot = (why: string, cause?: unknown): QbackupError =>
      new QbackupError('GUEST_AGENT', `The guest agent of domain "${name}" ${why}`, cause === undefined ? {} : { cause });
    const execute = async <T>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> => {
      const text = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
      let answer: { return?: unknown; error?: { desc?: unknown } };
      try {
        answer = JSON.parse(await c.qemuAgentCommand(dom, text, Math.max(1, Math.ceil((timeoutMs ?? 10_000) / 1000)))) as typeof answer;
      } catch (err) {
        throw cannot(`failed "${command}": ${describeError(err)}`, err);
      }
      if (answer.error !== undefined) throw cannot(`failed "${command}": ${typeof answer.error.desc === 'string' ? answer.error.desc : JSON.stringify(answer.error)}`);
      return answer.return as T;
    };
    // One cheap command first, so a domain without an agent gets its one sentence now.
    await execute('guest-ping', undefined, 5_000);
    return { domain: name, execute, close: async () => undefined };
  }

  async domainXml(name: string): Promise<string> {
    const { c, dom } = await this.lookup(name);
    return c.getXmlDesc(dom, C.VIR_DOMAIN_XML_INACTIVE);
  }

  async disks(name: string): Promise<DriverDisk[]> {
    const { c, dom } = await this.lookup(name);
    return driverDisks(await c.getXmlDesc(dom), name);
  }

  async defineDomain(xml: string): Promise<DriverDomain> {
    const c = await this.client();
    return describe(c, await c.defineXml(xml));
  }

  /** Starts the domain; an instant restore's server is brought up first (beforeStart) and its copies after (afterStart), or the domain is stopped again. */
  async startDomain(name: string, options: { paused?: boolean | undefined } = {}): Promise<DriverDomain> {
    const { c, dom } = await this.lookup(name);
    await this.hooks.beforeStart?.(await this.session(c, dom));
    await c.create(dom, options.paused ? C.VIR_DOMAIN_START_PAUSED : 0);
    try {
      await this.hooks.afterStart?.(await this.session(c, dom));
    } catch (err) {
      await c.destroy(dom).catch(() => undefined);
      throw err;
    }
    return describe(c, dom);
  }

  async shutdownDomain(name: string): Promise<DriverDomain> {
    const { c, dom } = await this.lookup(name);
    const { state } = await c.getState(dom);
    if (state === C.VIR_DOMAIN_SHUTOFF) return describe(c, dom);
    // A paused guest (e.g. started paused for a backup) runs no code to answer ACPI: QEMU is stopped with SIGTERM, which closes its images cleanly.
    if (state !== C.VIR_DOMAIN_PAUSED) {
      await c.shutdown(dom);
      const deadline = Date.now() + (this.options.shutdownTimeoutMs ?? 60_000);
      while (Date.now() < deadline && (await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) await sleep(200);
    }
    if ((await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) await c.destroy(dom, C.VIR_DOMAIN_DESTROY_GRACEFUL);
    return describe(c, dom);
  }

  async undefineDomain(name: string): Promise<void> {
    const { c, dom } = await this.lookup(name);
    this.hooks.beforeUndefine?.(await this.session(c, dom));
    await c.undefine(dom, C.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA);
  }

  async withShutOffDisks<T>(name: string, what: string, fn: (disks: readonly DriverDisk[]) => Promise<T>): Promise<T> {
    const { c, dom } = await this.lookup(name);
    await this.settleInstant(c, dom, what);
    if ((await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) throw new QbackupError('DOMAIN_RUNNING', `Cannot ${what} domain "${name}": it is running; shut it down first`);
    await this.reapOffline(c, dom, name, what);
    const result = await fn(driverDisks(await c.getXmlDesc(dom, C.VIR_DOMAIN_XML_INACTIVE), name));
    if ((await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) throw new QbackupError('DOMAIN_RUNNING', `Cannot ${what} domain "${name}": libvirt started it meanwhile, so its disks may hold a mix of both`);
    return result;
  }

  // ---- checkpoints and backups ----

  async checkpoints(domain: string): Promise<string[]> {
    const { c, dom } = await this.lookup(domain);
    await this.reapOffline(c, dom, domain);
    return (await c.listAllCheckpoints(dom)).map((cp) => cp.name);
  }

  async deleteCheckpoint(domain: string, name: string): Promise<void> {
    if (!name.startsWith(OWN_CHECKPOINT_PREFIX)) throw new QbackupError('NOT_SUPPORTED', `Cannot delete checkpoint "${name}" of domain "${domain}": qbackup did not create it (its checkpoints are named ${OWN_CHECKPOINT_PREFIX}…)`);
    const { c, dom } = await this.lookup(domain);
    await this.deleteOwnCheckpoint(c, dom, domain, name);
  }

  /**
   * libvirt deletes the checkpoint of a running domain (and its bitmaps).
   * Where it cannot, one step serves: a shut-off domain (libvirt 9.0 deletes
   * no checkpoint of an inactive domain), and a running one whose image lacks
   * the bitmap (an admin removed it, or the image under a target was
   * replaced; libvirt then refuses): the checkpoint's bitmaps are removed
   * where they still are, then libvirt's metadata only. A bitmap already gone
   * is no error; the next backup of that disk is full, with the reason. An
   * image a QEMU holds fails the offline removal (its lock), so nothing is
   * half done unnoticed.
   */
  private async deleteOwnCheckpoint(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, name: string): Promise<void> {
    const cp = await c.checkpointLookupByName(dom, name);
    if ((await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) {
      try {
        await c.checkpointDelete(cp);
        return;
      } catch (err) {
        const bitmapGone = isQbackupError(err, 'BITMAP_INCONSISTENT') || (isQbackupError(err, 'LIBVIRT_ERROR') && /bitmap/i.test(describeError(err)));
        // Else the domain was shut off meanwhile (libvirt: "inactive domain"); both are the step below.
        if (!bitmapGone && !/inactive domain/.test(describeError(err))) throw err;
      }
    }
    await this.removeCheckpointBitmaps(c, dom, domain, name, cp);
    await c.checkpointDelete(cp, C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY);
  }

  /**
   * Removes a checkpoint's bitmaps wherever they still are, and is content
   * with none: of a running domain, from QEMU's nodes through the monitor
   * (every checkpoint's bitmap records on its own since the checkpoint, so
   * nothing else needs it); of a shut-off one, from the image the checkpoint
   * saw under each target and the one there now (qemu-img). A domain that
   * stopped or started meanwhile is handled as it is now.
   */
  private async removeCheckpointBitmaps(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, name: string, cp: LibvirtCheckpointRef): Promise<void> {
    const root = parseXmlDocument(await c.checkpointGetXmlDesc(cp), `checkpoint "${name}" of domain "${domain}"`, 'domaincheckpoint');
    const bitmaps = checkpointBitmaps(root, name);
    for (let attempt = 0; ; attempt += 1) {
      const shutOff = (await c.getState(dom)).state === C.VIR_DOMAIN_SHUTOFF;
      try {
        if (shutOff) {
          const current = new Map(xmlDisks(await c.getXmlDesc(dom, C.VIR_DOMAIN_XML_INACTIVE), domain).map((d) => [d.target, d.source] as const));
          const savedDomain = firstChild(root, 'domain');
          const saved = new Map(savedDomain === undefined ? [] : xmlDisksOf(savedDomain).map((d) => [d.target, d.source] as const));
          for (const d of bitmaps) {
            for (const source of new Set([saved.get(d.target), current.get(d.target)])) {
              if (source !== undefined && existsSync(source)) await removeImageBitmap(source, d.bitmap);
            }
          }
        } else {
          const names = new Set(bitmaps.map((b) => b.bitmap));
          for (const n of await liveNodes(c, dom, `delete checkpoint "${name}" of domain "${domain}"`)) {
            for (const b of n.bitmaps) if (names.has(b.name)) await monitorCommand(c, dom, 'block-dirty-bitmap-remove', { node: n.nodeName, name: b.name }, `delete checkpoint "${name}" of domain "${domain}"`);
          }
        }
        return;
      } catch (err) {
        // Started or stopped while we worked: once more, the other way.
        if (attempt > 0 || ((await c.getState(dom)).state === C.VIR_DOMAIN_SHUTOFF) === shutOff) throw err;
      }
    }
  }

  /**
   * Per current disk: incremental when the checkpoint has a bitmap of that
   * disk and the disk's image is the one the checkpoint saw (shut off: and
   * the image holds the bitmap, recording and consistent); else full, with
   * the reason. Reads nothing of a running QEMU: libvirt checks its bitmaps
   * when the backup begins.
   */
  async coverage(domain: string, checkpoint: string): Promise<DiskCoverage[]> {
    const { c, dom } = await this.lookup(domain);
    await this.reapOffline(c, dom, domain);
    const shutOff = (await c.getState(dom)).state === C.VIR_DOMAIN_SHUTOFF;
    const disks = driverDisks(await c.getXmlDesc(dom), domain);
    let cpXml: string;
    try {
      cpXml = await c.checkpointGetXmlDesc(await c.checkpointLookupByName(dom, checkpoint));
    } catch (err) {
      if (!isQbackupError(err, 'CHECKPOINT_NOT_FOUND')) throw err;
      return disks.map((d) => ({ target: d.target, diskId: d.diskId, mode: 'full', reasons: [{ code: 'CHECKPOINT_NOT_FOUND', detail: `libvirt no longer has checkpoint "${checkpoint}"` }] }));
    }
    const root = parseXmlDocument(cpXml, `checkpoint "${checkpoint}" of domain "${domain}"`, 'domaincheckpoint');
    const bitmaps = new Map(checkpointBitmaps(root, checkpoint).map((b) => [b.target, b.bitmap] as const));
    // The definition saved with the checkpoint: which image each target had then.
    const savedDomain = firstChild(root, 'domain');
    const sourcesThen = new Map(savedDomain === undefined ? [] : xmlDisksOf(savedDomain).map((d) => [d.target, d.source] as const));
    const out: DiskCoverage[] = [];
    for (const d of disks) {
      const reasons = [];
      const bitmap = bitmaps.get(d.target);
      if (bitmap === undefined) reasons.push({ code: 'DISK_NOT_IN_CHECKPOINT', detail: `checkpoint "${checkpoint}" has no bitmap of disk "${d.target}" (added since)` });
      const then = sourcesThen.get(d.target);
      if (then !== undefined && then !== d.source) reasons.push({ code: 'SOURCE_REPLACED', detail: `disk "${d.target}" reads "${d.source}", and at checkpoint "${checkpoint}" it read "${then}"` });
      // Shut off, the image is read directly (libvirt checks it only when it runs the domain).
      if (shutOff && reasons.length === 0 && bitmap !== undefined) reasons.push(...(await imageCoverage(d, checkpoint, bitmap)));
      // Running, libvirt's backup begin checks the bitmap in QEMU; a disk it refuses is made full there (beginPullBackup).
      out.push({ target: d.target, diskId: d.diskId, mode: reasons.length === 0 ? 'incremental' : 'full', reasons });
    }
    return out;
  }

  /**
   * A running domain: one virDomainBackupBegin with the new checkpoint. A
   * disk whose incremental libvirt refuses (its bitmap missing or broken in
   * QEMU, or its checkpoint gone) is asked full in a second begin, its
   * export carrying libvirt's sentence as the reason; at most once per disk.
   */
  async beginPullBackup(domain: string, request: PullBackupRequest): Promise<PullBackup> {
    if (request.tcp !== undefined) throw new QbackupError('NOT_SUPPORTED', `Cannot back up libvirt domain "${domain}" over TCP: its exports are read over a private unix socket`);
    if (!request.checkpoint.startsWith(OWN_CHECKPOINT_PREFIX)) throw new QbackupError('INVALID_ARGUMENT', `Checkpoint "${request.checkpoint}" is not named ${OWN_CHECKPOINT_PREFIX}…`);
    const { c, dom } = await this.lookup(domain);
    await this.settleInstant(c, dom, 'back up');
    await this.reapOffline(c, dom, domain, 'back up');
    if ((await c.getState(dom)).state === C.VIR_DOMAIN_SHUTOFF) return this.beginShutOff(c, dom, domain, request);
    await this.endOrphan(c, dom, domain, 'back up');
    const liveXml = await c.getXmlDesc(dom);
    const all = xmlDisks(liveXml, domain);
    for (const d of request.disks) {
      if (!all.some((x) => x.target === d.target && x.source !== undefined)) throw new QbackupError('DISK_NOT_FOUND', `Domain "${domain}" has no disk "${d.target}"`);
    }
    if (request.skipUnchanged === true && request.quiesce === undefined) {
      const unchanged = await this.beginUnchanged(c, dom, domain, request, all);
      if (unchanged !== undefined) return unchanged;
    }
    const dir = mkdtempSync(join(this.options.socketParentDir, `${OWN_SOCKET_PREFIX}${process.pid}-`));
    try {
      // Only QEMU's user (libvirt's DAC label of the domain) and this process reach the socket.
      const owner = dacOwner(liveXml);
      if (owner !== undefined && process.getuid?.() === 0) chownSync(dir, owner.uid, owner.gid);
      const socket = join(dir, `${request.checkpoint}.sock`);
      const wanted = new Map(request.disks.map((d) => [d.target, d.since]));
      const checkpointXml = checkpointXmlOf(request.checkpoint, all, wanted);
      // Per disk made full because libvirt refused its incremental: why, in libvirt's words.
      const refused = new Map<string, string>();
      let consistency: Consistency;
      for (;;) {
        consistency = await this.freeze(c, dom, domain, request.quiesce);
        try {
          await c.backupBegin(dom, pullBackupXml(socket, dir, all, wanted), checkpointXml);
          break;
        } catch (err) {
          // libvirt refuses before it creates anything (no checkpoint, job, scratch file or NBD server): begin again with that disk full.
          const lost = refusedIncremental(err, wanted, refused);
          if (lost === undefined) throw err;
          refused.set(lost.target, lost.reason);
          wanted.set(lost.target, undefined);
        } finally {
          if (consistency === 'filesystem') await c.fsThaw(dom).catch(() => undefined);
        }
      }
      this.watch(c, dom, domain, request.checkpoint);
      this.options.faults?.at('libvirt-backup-begun');
      const disks = [];
      for (const d of request.disks) {
        // libvirt reads this with query-named-block-nodes (as backupBegin did): safe here, as settleInstant let no backup begin while a pull of an instant restore may run.
        const virtualSize = Number((await c.getBlockInfo(dom, d.target)).capacity);
        const since = wanted.get(d.target);
        disks.push({ target: d.target, exportName: d.target, dirtyContext: since !== undefined ? `qemu:dirty-bitmap:backup-${d.target}` : undefined, virtualSize, fullReason: refused.get(d.target) });
      }
      const signal = this.jobs.get(request.checkpoint)?.lost.signal;
      return { id: request.checkpoint, domain, checkpoint: request.checkpoint, consistency, server: { transport: 'unix', socket }, disks, signal };
    } catch (err) {
      this.jobs.delete(request.checkpoint);
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * The backup of a running domain none of whose disks changed since their
   * common checkpoint P: the new checkpoint alone, checked after it exists
   * (see the invariants). Undefined when a disk changed, the size cannot be
   * read, or libvirt refuses the checkpoint: the caller runs the backup job,
   * with nothing left of the attempt.
   */
  private async beginUnchanged(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, request: PullBackupRequest, all: readonly XmlDisk[]): Promise<PullBackup | undefined> {
    const since = new Set(request.disks.map((d) => d.since));
    const [parent] = since;
    if (since.size !== 1 || parent === undefined || request.disks.length === 0) return undefined;
    const targets = request.disks.map((d) => d.target);
    // The common case (something was written): one call, and the job runs.
    if (!(await unchangedSince(c, dom, parent, targets))) return undefined;
    const record = join(this.options.socketParentDir, `${UNCHANGED_PREFIX}${uuidString(dom.uuid)}-${process.pid}-${request.checkpoint}`);
    writeFileSync(record, '', { flag: 'wx', mode: 0o600 });
    let created = false;
    try {
      await c.checkpointCreateXml(dom, checkpointXmlOf(request.checkpoint, all, new Map(request.disks.map((d) => [d.target, d.since]))));
      created = true;
      this.options.faults?.at('libvirt-unchanged-created');
      if (await unchangedSince(c, dom, parent, targets)) {
        const disks = [];
        for (const target of targets) disks.push({ target, exportName: target, dirtyContext: undefined, virtualSize: Number((await c.getBlockInfo(dom, target)).capacity), unchanged: true });
        this.unchanged.set(request.checkpoint, record);
        return { id: request.checkpoint, domain, checkpoint: request.checkpoint, consistency: 'crash', server: { transport: 'unix', socket: record }, disks };
      }
      // A write landed since the first look: N goes, its bitmap merged into its parent.
      await c.checkpointDelete(await c.checkpointLookupByName(dom, request.checkpoint));
      created = false;
    } catch (err) {
      // A refused create made nothing: the job's own begin says why, if anything is wrong.
      if (!created) return undefined;
      await this.deleteOwnCheckpoint(c, dom, domain, request.checkpoint).then(() => (created = false), () => undefined);
      throw err;
    } finally {
      if (!this.unchanged.has(request.checkpoint) && !created) rmSync(record, { force: true });
    }
    return undefined;
  }

  /**
   * Records of backups whose checkpoint was made alone: one whose process
   * died never ended, and its checkpoint goes (merged into its parent); with
   * `what`, refuses while a live process holds one.
   */
  private async reapUnchanged(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, what: string): Promise<void> {
    const prefix = `${UNCHANGED_PREFIX}${uuidString(dom.uuid)}-`;
    let names: string[];
    try {
      names = readdirSync(this.options.socketParentDir).filter((n) => n.startsWith(prefix));
    } catch {
      return;
    }
    for (const n of names) {
      const m = /^(\d+)-(.+)$/.exec(n.slice(prefix.length));
      if (m === null) continue;
      const pid = Number(m[1]);
      const checkpoint = m[2] ?? '';
      // This process's own record is live only while its backup is (one whose cleanup failed is not).
      const alive = pid === process.pid ? this.unchanged.has(checkpoint) : processAlive(pid);
      if (alive) throw new QbackupError('BACKUP_RUNNING', `Cannot ${what} domain "${domain}": qbackup process ${pid} is backing it up (checkpoint "${checkpoint}")`);
      if ((await c.listAllCheckpoints(dom)).some((cp) => cp.name === checkpoint)) await this.deleteOwnCheckpoint(c, dom, domain, checkpoint);
      rmSync(join(this.options.socketParentDir, n), { force: true });
    }
  }

  private async freeze(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, quiesce: PullBackupRequest['quiesce']): Promise<Consistency> {
    if (quiesce === undefined) return 'crash';
    try {
      await c.fsFreeze(dom);
      return 'filesystem';
    } catch (err) {
      if (quiesce === 'optional' && isQbackupError(err, 'GUEST_AGENT')) return 'crash';
      throw new QbackupError('GUEST_AGENT', `Cannot quiesce domain "${domain}": ${describeError(err)}`, { cause: err });
    }
  }

  /**
   * A shut-off domain's backup: its images opened and exported by our
   * storage daemon (which keeps libvirt from starting it), the new
   * checkpoint's bitmaps added there, and the checkpoint registered in
   * libvirt as libvirt itself would have written it.
   */
  private async beginShutOff(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, request: PullBackupRequest): Promise<PullBackup> {
    if (request.quiesce === 'required') throw new QbackupError('GUEST_AGENT', `Cannot quiesce domain "${domain}": it is shut off`);
    const inactiveXml = await c.getXmlDesc(dom, C.VIR_DOMAIN_XML_INACTIVE);
    const all = xmlDisks(inactiveXml, domain);
    const disks = request.disks.map((r) => {
      const d = all.find((x) => x.target === r.target && x.source !== undefined);
      if (d?.source === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${domain}" has no disk "${r.target}"`);
      if (d.format !== 'qcow2') throw new QbackupError('NOT_SUPPORTED', `Cannot back up disk "${d.target}" of shut-off domain "${domain}": its image "${d.source}" is ${d.format}, which holds no bitmaps`);
      return { target: d.target, source: d.source, since: r.since };
    });
    const previous = await newestCheckpoint(c, dom);
    let exports: OfflineExports | undefined;
    let redefined = false;
    try {
      exports = await OfflineExports.open({ parentDir: this.options.socketParentDir, domain, uuid: uuidString(dom.uuid), checkpoint: request.checkpoint, disks, binary: this.options.storageDaemon });
      // The images are ours now, so libvirt cannot start the domain; it may have started before we took them.
      if ((await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) throw startedMeanwhile(domain);
      const checkpointXml = redefinedCheckpointXml(request.checkpoint, previous, all, new Set(disks.map((d) => d.target)), inactiveXml);
      await c.checkpointCreateXml(dom, checkpointXml, C.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE);
      redefined = true;
      this.offline.set(request.checkpoint, { domain, exports });
      this.options.faults?.at('libvirt-backup-begun');
      return { id: request.checkpoint, domain, checkpoint: request.checkpoint, consistency: 'crash', server: { transport: 'unix', socket: exports.socket }, disks: exports.disks };
    } catch (err) {
      this.offline.delete(request.checkpoint);
      await exports?.close({ discard: true });
      if (redefined) await c.checkpointLookupByName(dom, request.checkpoint).then((cp) => c.checkpointDelete(cp, C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)).catch(() => undefined);
      if (isQbackupError(err, 'DOMAIN_RUNNING') && (await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) throw startedMeanwhile(domain, err);
      throw err;
    }
  }

  /** Remembers the connection that began a backup; its signal fires if that connection closes before the backup ends. */
  private watch(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, backupId: string): void {
    const lost = new AbortController();
    this.jobs.set(backupId, { client: c, dom, domain, lost });
    void c.connection.closed.then((cause) => {
      // undefined: closed by this driver (close()), not lost.
      if (cause !== undefined && this.jobs.get(backupId)?.lost === lost) lost.abort(lostBackup(this.uri, domain, backupId, cause));
    });
  }

  async confirmBackup(domain: string, backupId: string): Promise<void> {
    const job = this.jobs.get(backupId);
    if (job === undefined) return;
    if (job.lost.signal.aborted) throw job.lost.signal.reason;
    let stats;
    try {
      // A round trip on the connection that began the job: a closed one fails here even before its close is noticed.
      stats = await job.client.getJobStats(job.dom);
    } catch (err) {
      if (isQbackupError(err, 'LIBVIRT_DISCONNECTED') || isQbackupError(err, 'LIBVIRT_STATE')) throw lostBackup(this.uri, domain, backupId, err);
      throw err;
    }
    if (stats.type === C.VIR_DOMAIN_JOB_NONE) throw new QbackupError('JOB_NOT_FOUND', `Backup "${backupId}" of domain "${domain}" failed: libvirt ended its backup job before the disks were read to the end`);
  }

  async endBackup(domain: string, backupId: string): Promise<void> {
    this.jobs.delete(backupId);
    const record = this.unchanged.get(backupId);
    if (record !== undefined) {
      // Nothing runs in libvirt: the checkpoint stays, and its backup ended.
      this.unchanged.delete(backupId);
      rmSync(record, { force: true });
      return;
    }
    const offline = this.offline.get(backupId);
    if (offline !== undefined) {
      this.offline.delete(backupId);
      if ((await offline.exports.close()).clean) return;
      // The daemon did not store the new bitmaps: the checkpoint goes, so the next backup is full instead of wrong.
      const { c, dom } = await this.lookup(domain);
      await c.checkpointDelete(await c.checkpointLookupByName(dom, backupId), C.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY).catch(() => undefined);
      throw new QbackupError('BACKUP_FAILED', `qemu-storage-daemon did not close the images of domain "${domain}" cleanly, so checkpoint "${backupId}" was discarded`);
    }
    const { c, dom } = await this.lookup(domain);
    const job = await runningBackup(c, dom);
    if (job === undefined) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" runs no backup job`);
    if (job.own?.checkpoint !== backupId) throw new QbackupError('JOB_NOT_FOUND', `Domain "${domain}" runs a backup job that is not "${backupId}"`);
    await c.abortJob(dom);
    await this.waitJobEnded(c, dom, domain, backupId);
    rmSync(dirname(job.own.socket), { recursive: true, force: true });
  }

  /**
   * libvirt's abort of a backup job cancels QEMU's block jobs and returns;
   * the job ends when their cancellation events arrive. Until then the
   * domain still shows the job (a next backup would find it running), so the
   * end of a backup waits for it.
   */
  private async waitJobEnded(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, backupId: string): Promise<void> {
    const deadline = Date.now() + (this.options.jobEndTimeoutMs ?? 60_000);
    while ((await runningBackup(c, dom))?.own?.checkpoint === backupId) {
      if (Date.now() > deadline) throw new QbackupError('LIBVIRT_TIMEOUT', `libvirt at ${this.uri} did not end backup job "${backupId}" of domain "${domain}" within ${Math.round((this.options.jobEndTimeoutMs ?? 60_000) / 1000)} s of its abort`);
      await sleep(50);
    }
  }

  async endOrphanedBackup(domain: string): Promise<void> {
    const { c, dom } = await this.lookup(domain);
    await this.reapOffline(c, dom, domain);
    await this.endOrphan(c, dom, domain, 'end an orphaned backup of');
  }

  async assertNoBackup(domain: string, what: string): Promise<void> {
    const { c, dom } = await this.lookup(domain);
    await this.reapOffline(c, dom, domain, what);
    await this.endOrphan(c, dom, domain, what);
  }

  /**
   * Stops the storage daemons of offline backups of the domain whose owner
   * died and discards their checkpoints; with `what`, refuses while another
   * live process backs the domain up offline.
   */
  private async reapOffline(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, what?: string): Promise<void> {
    const { busy, stale } = offlineRecords(this.options.socketParentDir, uuidString(dom.uuid));
    for (const s of stale) {
      await s.stopDaemon();
      // A discard that fails (the domain started meanwhile and holds the images) is retried by a later call.
      if (await this.discardOrphan(c, dom, domain, s.record).catch(() => false)) s.remove();
    }
    const other = busy[0];
    if (what !== undefined && other !== undefined) throw new QbackupError('BACKUP_RUNNING', `Cannot ${what} domain "${domain}": qbackup process ${other.owner} is backing it up (checkpoint "${other.checkpoint}")`);
  }

  /**
   * The checkpoint of a dead offline backup: deleted from libvirt, or, never
   * registered, its bitmaps removed from the images. False when that must
   * wait (the domain runs and holds the images): the record stays for a later call.
   */
  private async discardOrphan(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, r: OfflineRecord): Promise<boolean> {
    if ((await c.listAllCheckpoints(dom)).some((cp) => cp.name === r.checkpoint)) {
      await this.deleteOwnCheckpoint(c, dom, domain, r.checkpoint);
      return true;
    }
    if ((await c.getState(dom)).state !== C.VIR_DOMAIN_SHUTOFF) return false;
    for (const image of r.images) if (existsSync(image.source)) await removeImageBitmap(image.source, r.checkpoint);
    return true;
  }

  /** Ends our backup job whose process died (and deletes its checkpoint); refuses any other job. */
  private async endOrphan(c: LibvirtClient, dom: LibvirtDomainRef, domain: string, what: string): Promise<void> {
    await this.reapUnchanged(c, dom, domain, what);
    const job = await runningBackup(c, dom);
    if (job === undefined) return;
    if (job.own === undefined) throw new QbackupError('BACKUP_RUNNING', `Cannot ${what} domain "${domain}": libvirt runs a ${job.kind} on it that qbackup did not start, and qbackup leaves it alone`);
    if (processAlive(job.own.pid)) throw new QbackupError('BACKUP_RUNNING', `Cannot ${what} domain "${domain}": qbackup process ${job.own.pid} is backing it up (checkpoint "${job.own.checkpoint}")`);
    await c.abortJob(dom).catch((err: unknown) => {
      if (!isQbackupError(err, 'LIBVIRT_ERROR') || !/no job is active/.test(describeError(err))) throw err;
    });
    await this.waitJobEnded(c, dom, domain, job.own.checkpoint);
    rmSync(dirname(job.own.socket), { recursive: true, force: true });
    const names = (await c.listAllCheckpoints(dom)).map((cp) => cp.name);
    if (names.includes(job.own.checkpoint)) await c.checkpointDelete(await c.checkpointLookupByName(dom, job.own.checkpoint));
  }

  // ---- instant restore ----

  /** libvirt takes its whole schema: a new domain is the saved XML edited as restore --define does. */
  readonly newDefinitions = 'saved-xml';
  private hooks: LifecycleHooks = {};
  private qemuUser: Promise<{ uid: number; gid: number } | undefined> | undefined;

  async createOverlay(path: string, sizeBytes: number, zeroRanges: ReadonlyArray<{ offset: number; length: number }>): Promise<void> {
    await createZeroOverlay(path, sizeBytes, zeroRanges);
  }

  setLifecycleHooks(hooks: LifecycleHooks): void {
    this.hooks = hooks;
  }

  async withSession<T>(domain: string, _what: string, fn: (s: DomainSession) => Promise<T>): Promise<T> {
    const { c, dom } = await this.lookup(domain);
    await this.hooks.onOpen?.(await this.session(c, dom));
    return fn(await this.session(c, dom));
  }

  /**
   * The restore's own private directories when libvirt's QEMU runs as this
   * process (qemu:///session); else overlays under libvirt's image directory
   * and the socket in a fresh directory of the socket parent (e.g. /tmp),
   * both of which QEMU's user can reach (see prepareInstantDir).
   */
  async instantPlacement(domain: string, defaults: InstantPlacement): Promise<InstantPlacement> {
    const owner = await this.foreignQemuUser();
    if (owner === undefined) return defaults;
    return {
      overlayDir: join(this.options.imageDir ?? DEFAULT_IMAGE_DIR, domain),
      socket: join(this.options.socketParentDir, `${OWN_INSTANT_PREFIX}${randomBytes(6).toString('hex')}`, 'backup.sock'),
    };
  }

  /**
   * Overlays: a directory others may traverse but not list (0711; libvirt
   * hands the image files themselves to QEMU's user when it starts the
   * domain), on a path QEMU's user can traverse. The socket: a directory
   * owned by QEMU's user, mode 0700 (this process, root, reaches it too).
   */
  async prepareInstantDir(dir: string, holds: 'overlays' | 'socket'): Promise<void> {
    const owner = await this.foreignQemuUser();
    if (owner === undefined) {
      makePrivateDir(dir);
      return;
    }
    if (holds === 'overlays') {
      // Refused before anything is made when QEMU's user cannot pass through what exists of the path.
      let existing = dir;
      while (!existsSync(existing) && dirname(existing) !== existing) existing = dirname(existing);
      assertReachable(existing, owner, `Cannot put the overlays of an instant restore in "${dir}"`);
      const first = mkdirSync(dir, { recursive: true, mode: 0o711 });
      if (first !== undefined) for (let d = dir; ; d = dirname(d)) {
        chmodSync(d, 0o711);
        if (d === first || dirname(d) === d) break;
      }
      assertReachable(dir, owner, `Cannot put the overlays of an instant restore in "${dir}"`);
      return;
    }
    try {
      mkdirSync(dir, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const st = lstatSync(dir);
    if (!st.isDirectory() || (st.uid !== owner.uid && st.uid !== process.getuid?.())) {
      throw new QbackupError('STATE_DIR', `Cannot serve an instant restore on a socket in "${dir}": it is not a directory qbackup made (owner uid ${st.uid})`);
    }
    chownSync(dir, owner.uid, owner.gid);
    chmodSync(dir, 0o700);
    assertReachable(dir, owner, `Cannot serve an instant restore on a socket in "${dir}"`);
  }

  async shareSocket(socket: string): Promise<void> {
    const owner = await this.foreignQemuUser();
    if (owner !== undefined) chownSync(socket, owner.uid, owner.gid);
  }

  /** The uid:gid libvirt runs QEMU as (its DAC base label), when that is another user than this process's. */
  private async foreignQemuUser(): Promise<{ uid: number; gid: number } | undefined> {
    this.qemuUser ??= (async () => {
      const caps = await (await this.client()).getCapabilities();
      const owner = dacBaseLabel(caps);
      return owner === undefined || owner.uid === process.getuid?.() ? undefined : owner;
    })();
    try {
      return await this.qemuUser;
    } catch (err) {
      this.qemuUser = undefined;
      throw err;
    }
  }

  /** The domain as an instant restore's copy sees it: the live definition while QEMU runs, else the persistent one. */
  private async session(c: LibvirtClient, dom: LibvirtDomainRef): Promise<LibvirtSession> {
    const { state } = await c.getState(dom);
    const running = state !== C.VIR_DOMAIN_SHUTOFF && state !== C.VIR_DOMAIN_CRASHED;
    const xml = await c.getXmlDesc(dom, running ? 0 : C.VIR_DOMAIN_XML_INACTIVE);
    return new LibvirtSession(c, dom, running, driverDisks(xml, dom.name));
  }

  /** Runs the instant restore's onOpen hook (finalize a finished copy, bring back a dead server or copy); then refuses `what` while a disk still reads from a backup. */
  private async settleInstant(c: LibvirtClient, dom: LibvirtDomainRef, what: string): Promise<void> {
    const s = await this.session(c, dom);
    if (!s.disks.some((d) => d.nbdBacking !== undefined)) return;
    await this.hooks.onOpen?.(s);
    const backed = (await this.session(c, dom)).disks.find((d) => d.nbdBacking !== undefined);
    if (backed !== undefined) {
      throw new QbackupError('RESTORE_RUNNING', `Cannot ${what} domain "${dom.name}": disk "${backed.target}" still reads from its backup while an instant restore copies the data in; wait for it with restore --instant --wait or domjobinfo`);
    }
  }
}

/**
 * One libvirt domain as the instant restore's copy drives it: one block pull
 * (QEMU block-stream) per disk copies the NBD backing into the overlay;
 * libvirt ends the job itself and, when it completes, drops the backing
 * from the live and the persistent definition. A disk that still declares
 * its backing but runs no job lost its job (it failed, e.g. the server
 * died): the copy starts it again.
 */
class LibvirtSession implements DomainSession {
  constructor(
    private readonly c: LibvirtClient,
    private readonly dom: LibvirtDomainRef,
    readonly running: boolean,
    readonly disks: readonly DriverDisk[],
  ) {}

  get domain(): string {
    return this.dom.name;
  }

  /** One pull at a time: libvirt reads the node graph when it finishes one, which crashes QEMU 7.2 if another pull ends meanwhile. */
  readonly copiesAtOnce = 1;

  /**
   * Progress from libvirt's block job info (QEMU's query-block-jobs), never
   * from virDomainGetBlockInfo: libvirt answers that with
   * query-named-block-nodes, which crashes QEMU 7.2 while a pull ends.
   */
  async copyJobs(): Promise<Map<string, CopyJob>> {
    const out = new Map<string, CopyJob>();
    if (!this.running) return out;
    for (const d of this.disks) {
      const id = `${COPY_JOB_PREFIX}${d.target}`;
      if (d.nbdBacking === undefined) {
        // Nothing left to copy: the pull completed (or the disk never read from a backup); the restore's record has the size.
        out.set(id, { status: 'concluded' });
        continue;
      }
      const job = await this.c.getBlockJobInfo(this.dom, d.target);
      if (job === undefined) continue;
      out.set(id, { status: job.type === C.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL ? 'running' : 'busy', doneBytes: Number(job.cur), totalBytes: Number(job.end) });
    }
    return out;
  }

  async startCopy(target: string, _jobId: string, speedBytesPerSec: number): Promise<void> {
    const live = driverDisks(await this.c.getXmlDesc(this.dom), this.dom.name);
    const disk = live.find((d) => d.target === target);
    if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${this.domain}" has no disk "${target}" to restore into`);
    // Another command got there first: its pull runs, or completed.
    if (disk.nbdBacking === undefined || (await this.c.getBlockJobInfo(this.dom, target)) !== undefined) return;
    // Or it started another disk's pull meanwhile: this one waits for a later settle (copiesAtOnce).
    for (const other of live) {
      if (other.target !== target && other.nbdBacking !== undefined && (await this.c.getBlockJobInfo(this.dom, other.target)) !== undefined) return;
    }
    try {
      await this.c.blockPull(this.dom, target, speedBytesPerSec > 0 ? { bandwidth: BigInt(speedBytesPerSec), flags: C.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES } : {});
    } catch (err) {
      // Another command started the same disk's pull between the look above and ours (libvirt: "already in active block job"); it may have completed since.
      if ((await this.c.getBlockJobInfo(this.dom, target)) !== undefined) return;
      const now = driverDisks(await this.c.getXmlDesc(this.dom), this.dom.name).find((d) => d.target === target);
      if (now !== undefined && now.nbdBacking !== undefined) throw err;
    }
  }

  async dismissCopy(_jobId: string): Promise<void> {
    // libvirt dismisses its block jobs itself.
  }

  /** Pauses the guest for a moment: QEMU flushes every disk when it stops. False when it is paused (nothing would be flushed). */
  async flush(): Promise<boolean> {
    if ((await this.c.getState(this.dom)).state !== C.VIR_DOMAIN_RUNNING) return false;
    await this.c.suspend(this.dom);
    await this.c.resume(this.dom);
    return true;
  }

  /** libvirt dropped each completed disk's backing itself; a persistent definition that still declares one is redefined without it. */
  async dropBackings(targets: readonly string[]): Promise<void> {
    const xml = await this.c.getXmlDesc(this.dom, C.VIR_DOMAIN_XML_INACTIVE | C.VIR_DOMAIN_XML_SECURE);
    const root = parseXmlDocument(xml, `the definition of domain "${this.domain}"`, 'domain');
    let changed = false;
    for (const disk of childElements(firstChild(root, 'devices') ?? root, 'disk')) {
      const target = firstChild(disk, 'target');
      if (target === undefined || !targets.includes(attr(target, 'dev') ?? '')) continue;
      for (const b of childElements(disk, 'backingStore')) {
        if (attr(b, 'type') !== 'network') continue;
        disk.removeChild(b);
        changed = true;
      }
    }
    if (changed) await this.c.defineXml(serializeIndented(root));
  }
}

/** The DAC base label of QEMU's user in libvirt's capabilities (`<secmodel><model>dac</model><baselabel type='kvm'>+64055:+64055</baselabel>`). */
export function dacBaseLabel(capabilities: string): { uid: number; gid: number } | undefined {
  for (const m of capabilities.matchAll(/<secmodel>([\s\S]*?)<\/secmodel>/g)) {
    const body = m[1] ?? '';
    if (!/<model>dac<\/model>/.test(body)) continue;
    const label = /<baselabel\b[^>]*type=['"]kvm['"][^>]*>\+?(\d+):\+?(\d+)</.exec(body) ?? /<baselabel\b[^>]*>\+?(\d+):\+?(\d+)</.exec(body);
    if (label !== null) return { uid: Number(label[1]), gid: Number(label[2]) };
  }
  return undefined;
}

/** Refuses a directory QEMU's user cannot reach: every directory on its path must let that user search it. */
function assertReachable(dir: string, owner: { uid: number; gid: number }, what: string): void {
  for (let d = dir; ; d = dirname(d)) {
    const st = statSync(d);
    const searchable = st.uid === owner.uid ? (st.mode & 0o100) !== 0 : st.gid === owner.gid ? (st.mode & 0o010) !== 0 : (st.mode & 0o001) !== 0;
    if (!searchable) {
      throw new QbackupError('INVALID_ARGUMENT', `${what}: libvirt's QEMU runs as uid ${owner.uid} and cannot pass through "${d}" (mode 0${(st.mode & 0o777).toString(8)}); choose another directory with --to`);
    }
    if (dirname(d) === d) return;
  }
}

/** A checkpoint as libvirt itself writes one (name, parent, creation time, a bitmap per disk named after it, the definition), for a REDEFINE. */
function redefinedCheckpointXml(checkpoint: string, parent: string | undefined, all: readonly XmlDisk[], wanted: ReadonlySet<string>, inactiveXml: string): string {
  return `<domaincheckpoint>
  <name>${xmlEscape(checkpoint)}</name>
  <description>created by qbackup</description>
${parent === undefined ? '' : `  <parent>\n    <name>${xmlEscape(parent)}</name>\n  </parent>\n`}  <creationTime>${Math.floor(Date.now() / 1000)}</creationTime>
  <disks>
${all
  .filter((d) => d.device === 'disk' || wanted.has(d.target))
  .map((d) => (wanted.has(d.target) ? `    <disk name='${xmlEscape(d.target)}' checkpoint='bitmap' bitmap='${xmlEscape(checkpoint)}'/>` : `    <disk name='${xmlEscape(d.target)}' checkpoint='no'/>`))
  .join('\n')}
  </disks>
${inactiveXml.trim()}
</domaincheckpoint>`;
}

function startedMeanwhile(domain: string, cause?: unknown): QbackupError {
  return new QbackupError('DOMAIN_RUNNING', `Cannot back up domain "${domain}" while it is shut off: libvirt started it meanwhile; back it up again`, { cause });
}

/** The checkpoint created last (libvirt makes it the parent of the next one). */
async function newestCheckpoint(c: LibvirtClient, dom: LibvirtDomainRef): Promise<string | undefined> {
  let newest: { name: string; time: number } | undefined;
  for (const cp of await c.listAllCheckpoints(dom)) {
    const xml = await c.checkpointGetXmlDesc(cp, C.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN);
    const time = Number(/<creationTime>(\d+)<\/creationTime>/.exec(xml)?.[1] ?? 0);
    if (newest === undefined || time >= newest.time) newest = { name: cp.name, time };
  }
  return newest?.name;
}

/** The disks a checkpoint has a bitmap of, with the bitmap's name (the checkpoint's unless the XML names another). */
function checkpointBitmaps(root: Element, checkpoint: string): Array<{ target: string; bitmap: string }> {
  return childElements(firstChild(root, 'disks') ?? root, 'disk').flatMap((d) => {
    const target = attr(d, 'name');
    return attr(d, 'checkpoint') === 'bitmap' && target !== undefined ? [{ target, bitmap: attr(d, 'bitmap') ?? checkpoint }] : [];
  });
}

/** A shut-off disk's image: the checkpoint's bitmap is there, consistent and recording. */
async function imageCoverage(d: DriverDisk, checkpoint: string, bitmap: string): Promise<CoverageProblem[]> {
  if (d.format !== 'qcow2') return [{ code: 'BITMAP_MISSING', detail: `image "${d.source}" of disk "${d.target}" is ${d.format}, which holds no bitmaps` }];
  let found;
  try {
    found = (await imageBitmaps(d.source)).find((b) => b.name === bitmap);
  } catch (err) {
    return [{ code: 'BITMAP_MISSING', detail: `image "${d.source}" of disk "${d.target}" cannot be read: ${describeError(err)}` }];
  }
  if (found === undefined) return [{ code: 'BITMAP_MISSING', detail: `image "${d.source}" of disk "${d.target}" has no bitmap "${bitmap}" of checkpoint "${checkpoint}"` }];
  if (found.inUse) return [{ code: 'BITMAP_INCONSISTENT', detail: `bitmap "${bitmap}" in image "${d.source}" of disk "${d.target}" was left in use by a QEMU that did not close the image` }];
  if (!found.recording) return [{ code: 'BITMAP_DISABLED', detail: `bitmap "${bitmap}" in image "${d.source}" of disk "${d.target}" is not recording` }];
  return [];
}

/** A bitmap of a running QEMU's node, as query-named-block-nodes shows it. */
interface LiveBitmap {
  name: string;
  recording: boolean;
  inconsistent: boolean;
}

/**
 * One QMP command through libvirt's monitor passthrough; QEMU's error is
 * LIBVIRT_ERROR in one sentence. libvirt marks the domain tainted
 * ("custom-monitor") on the first use, so only the rare fallback of deleting
 * a checkpoint whose bitmap libvirt cannot find comes here, never a normal
 * backup.
 */
async function monitorCommand(c: LibvirtClient, dom: LibvirtDomainRef, execute: string, args: Record<string, unknown>, what: string): Promise<unknown> {
  const reply = JSON.parse(await c.qemuMonitorCommand(dom, JSON.stringify({ execute, arguments: args }))) as { return?: unknown; error?: { desc?: string } };
  if (reply.error !== undefined) throw new QbackupError('LIBVIRT_ERROR', `Cannot ${what}: QEMU refused ${execute}: ${reply.error.desc ?? 'no reason given'}`);
  return reply.return;
}

/** A running domain's block nodes with their image file and bitmaps. */
async function liveNodes(c: LibvirtClient, dom: LibvirtDomainRef, what: string): Promise<Array<{ nodeName: string; driver: string; file: string; bitmaps: LiveBitmap[] }>> {
  const nodes = (await monitorCommand(c, dom, 'query-named-block-nodes', { flat: true }, what)) as Array<{ 'node-name'?: string; drv?: string; file?: string; 'dirty-bitmaps'?: Array<{ name?: string; recording?: boolean; inconsistent?: boolean }> }>;
  return nodes.flatMap((n) => (n['node-name'] === undefined ? [] : [{
    nodeName: n['node-name'],
    driver: n.drv ?? '',
    file: n.file ?? '',
    bitmaps: (n['dirty-bitmaps'] ?? []).flatMap((b) => (b.name === undefined ? [] : [{ name: b.name, recording: b.recording === true, inconsistent: b.inconsistent === true }])),
  }]));
}

async function describe(c: LibvirtClient, dom: LibvirtDomainRef): Promise<DriverDomain> {
  const { state } = await c.getState(dom);
  return { name: dom.name, uuid: uuidString(dom.uuid), state: stateOf(state), reason: reasonOf(state) };
}

function uuidString(uuid: Buffer | string): string {
  if (typeof uuid === 'string') return uuid;
  const h = uuid.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function stateOf(state: number): DomainState {
  if (state === C.VIR_DOMAIN_SHUTOFF) return 'shut off';
  if (state === C.VIR_DOMAIN_CRASHED) return 'crashed';
  return 'running';
}

function reasonOf(state: number): string {
  return ['unknown', 'booted', 'blocked', 'paused', 'shutdown', 'shut off', 'crashed', 'suspended'][state] ?? 'unknown';
}

/** A running job of the domain, and whether it is a pull backup of ours (by its socket). */
async function runningBackup(c: LibvirtClient, dom: LibvirtDomainRef): Promise<{ kind: string; own: { pid: number; checkpoint: string; socket: string } | undefined } | undefined> {
  const stats = await c.getJobStats(dom);
  if (stats.type === C.VIR_DOMAIN_JOB_NONE) return undefined;
  if (stats.fields['operation'] !== C.VIR_DOMAIN_JOB_OPERATION_BACKUP) return { kind: `job (operation ${String(stats.fields['operation'] ?? 'unknown')})`, own: undefined };
  let xml: string;
  try {
    xml = await c.backupGetXmlDesc(dom);
  } catch (err) {
    if (isQbackupError(err, 'JOB_NOT_FOUND')) return undefined;
    throw err;
  }
  const socket = /<server\b[^>]*\bsocket=['"]([^'"]+)['"]/.exec(xml)?.[1];
  if (socket === undefined) return { kind: 'backup job', own: undefined };
  const dir = basename(dirname(socket));
  const m = new RegExp(`^${OWN_SOCKET_PREFIX}(\\d+)-`).exec(dir);
  const checkpoint = basename(socket).replace(/\.sock$/, '');
  if (m === null || !checkpoint.startsWith(OWN_CHECKPOINT_PREFIX)) return { kind: 'backup job', own: undefined };
  return { kind: 'backup job', own: { pid: Number(m[1]), checkpoint, socket } };
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Whether no byte of `targets` was written since checkpoint `checkpoint` up
 * to now (libvirt's size of the checkpoint: through every later one). A disk
 * without a size, or a size that cannot be read, counts as written.
 */
async function unchangedSince(c: LibvirtClient, dom: LibvirtDomainRef, checkpoint: string, targets: readonly string[]): Promise<boolean> {
  let xml: string;
  try {
    xml = await c.checkpointGetXmlDesc(await c.checkpointLookupByName(dom, checkpoint), C.VIR_DOMAIN_CHECKPOINT_XML_SIZE | C.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN);
  } catch {
    return false;
  }
  let root: Element;
  try {
    root = parseXmlDocument(xml, `checkpoint "${checkpoint}"`, 'domaincheckpoint');
  } catch {
    return false;
  }
  const sizes = new Map<string, string | undefined>();
  for (const d of childElements(firstChild(root, 'disks') ?? root, 'disk')) {
    const name = attr(d, 'name');
    if (name !== undefined && attr(d, 'checkpoint') === 'bitmap') sizes.set(name, attr(d, 'size'));
  }
  return targets.every((t) => sizes.get(t) === '0');
}

/** The uid:gid QEMU runs as, from libvirt's DAC label of a running domain. */
function dacOwner(liveXml: string): { uid: number; gid: number } | undefined {
  for (const m of liveXml.matchAll(/<seclabel\b[^>]*model=['"]dac['"][^>]*>([\s\S]*?)<\/seclabel>/g)) {
    const label = /<label>\+?(\d+):\+?(\d+)<\/label>/.exec(m[1] ?? '');
    if (label !== null) return { uid: Number(label[1]), gid: Number(label[2]) };
  }
  return undefined;
}

function xmlDisks(xml: string, domain: string): XmlDisk[] {
  return xmlDisksOf(parseXmlDocument(xml, `the definition of domain "${domain}"`, 'domain'));
}

function xmlDisksOf(root: Element): XmlDisk[] {
  const devices = firstChild(root, 'devices');
  if (devices === undefined) return [];
  return childElements(devices, 'disk').flatMap((d) => {
    const target = firstChild(d, 'target');
    const dev = target === undefined ? undefined : attr(target, 'dev');
    if (dev === undefined) return [];
    const source = firstChild(d, 'source');
    const driver = firstChild(d, 'driver');
    return [{
      target: dev,
      source: source === undefined ? undefined : (attr(source, 'file') ?? attr(source, 'dev')),
      format: (driver === undefined ? undefined : attr(driver, 'type')) ?? 'raw',
      device: attr(d, 'device') ?? 'disk',
      readonly: firstChild(d, 'readonly') !== undefined || attr(d, 'device') === 'cdrom',
      nbdBacking: nbdBackingOf(d),
    }];
  });
}

/** The disks qbackup can back up: file or block images of qcow2 or raw, with a stable id per image under its target. */
function driverDisks(xml: string, domain: string): DriverDisk[] {
  return xmlDisks(xml, domain).flatMap((d) => {
    if (d.source === undefined || (d.format !== 'qcow2' && d.format !== 'raw')) return [];
    return [{ target: d.target, diskId: diskIdOf(d.target, d.source), source: d.source, format: d.format, readonly: d.readonly, nbdBacking: d.nbdBacking }];
  });
}

/** `<backingStore type='network'><source protocol='nbd' name=EXPORT><host transport='unix' socket=PATH/>`, as an instant restore declares it. */
function nbdBackingOf(disk: Element): XmlDisk['nbdBacking'] {
  const backing = firstChild(disk, 'backingStore');
  if (backing === undefined || attr(backing, 'type') !== 'network') return undefined;
  const source = firstChild(backing, 'source');
  const host = source === undefined ? undefined : firstChild(source, 'host');
  if (source === undefined || host === undefined || attr(source, 'protocol') !== 'nbd' || attr(host, 'transport') !== 'unix') return undefined;
  const socket = attr(host, 'socket');
  return socket === undefined ? undefined : { socket, exportName: attr(source, 'name') ?? '' };
}

/** dkXXXXXXXX, as the repository takes it: a new image under the same target (another path, or a new file at the same path) gets a new id. */
function diskIdOf(target: string, source: string): string {
  let inode = '';
  try {
    inode = String(statSync(source).ino);
  } catch {
    // Not reachable by this user: the path alone identifies the image.
  }
  return `dk${createHash('sha256').update(`${target}\0${source}\0${inode}`).digest('hex').slice(0, 8)}`;
}

function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

/** The checkpoint created with a backup: a bitmap of each disk backed up, none of the others. */
function checkpointXmlOf(name: string, all: readonly XmlDisk[], wanted: ReadonlyMap<string, unknown>): string {
  return `<domaincheckpoint>
  <name>${xmlEscape(name)}</name>
  <description>created by qbackup</description>
  <disks>
${all
  .filter((d) => d.device === 'disk' || wanted.has(d.target))
  .map((d) => `    <disk name='${xmlEscape(d.target)}' checkpoint='${wanted.has(d.target) ? 'bitmap' : 'no'}'/>`)
  .join('\n')}
  </disks>
</domaincheckpoint>`;
}

/**
 * The pull backup's XML: every disk of the definition (backup='no' for the
 * ones not wanted), each wanted one full or incremental since its checkpoint,
 * its scratch image in the private directory (it goes with it).
 */
function pullBackupXml(socket: string, dir: string, all: readonly XmlDisk[], wanted: ReadonlyMap<string, string | undefined>): string {
  return `<domainbackup mode='pull'>
  <server transport='unix' socket='${xmlEscape(socket)}'/>
  <disks>
${all
  .filter((d) => d.device === 'disk' || wanted.has(d.target))
  .map((d) => {
    if (!wanted.has(d.target)) return `    <disk name='${xmlEscape(d.target)}' backup='no'/>`;
    const since = wanted.get(d.target);
    const mode = since === undefined ? `backupmode='full'` : `backupmode='incremental' incremental='${xmlEscape(since)}'`;
    return `    <disk name='${xmlEscape(d.target)}' backup='yes' type='file' ${mode}><scratch file='${xmlEscape(join(dir, `${d.target}.scratch`))}'/></disk>`;
  })
  .join('\n')}
  </disks>
</domainbackup>`;
}

/**
 * A backup begin that libvirt refused because one disk's incremental cannot
 * be had: its checkpoint bitmap is missing or inconsistent in QEMU (libvirt
 * 9.0: VIR_ERR_CHECKPOINT_INCONSISTENT, "missing or broken bitmap 'CP' for
 * disk 'TARGET'"), or the checkpoint went away since the plan
 * (VIR_ERR_NO_DOMAIN_CHECKPOINT, "Checkpoint 'CP' for incremental backup of
 * disk 'TARGET' not found"). The disk, when it is one still asked
 * incrementally and not refused before; else undefined (the error stands).
 */
export function refusedIncremental(err: unknown, wanted: ReadonlyMap<string, string | undefined>, refused: ReadonlyMap<string, string>): { target: string; reason: string } | undefined {
  if (!(err instanceof LibvirtCallError)) return undefined;
  const text = err.libvirtMessage;
  let match: RegExpExecArray | null = null;
  let code: string;
  if (err.libvirtCode === C.VIR_ERR_CHECKPOINT_INCONSISTENT) {
    match = /bitmap '([^']*)' for disk '([^']+)'/.exec(text);
    code = 'BITMAP_INCONSISTENT';
  } else if (err.libvirtCode === C.VIR_ERR_NO_DOMAIN_CHECKPOINT) {
    match = /Checkpoint '([^']*)' for incremental backup of disk '([^']+)'/.exec(text);
    code = 'CHECKPOINT_NOT_FOUND';
  } else {
    return undefined;
  }
  const checkpoint = match?.[1];
  const target = match?.[2];
  if (checkpoint === undefined || target === undefined || refused.has(target) || wanted.get(target) !== checkpoint) return undefined;
  return { target, reason: `${code}: libvirt refused the incremental of disk "${target}" since checkpoint "${checkpoint}": ${text}` };
}

/** The one sentence of a backup whose libvirt connection closed under it. */
function lostBackup(uri: string, domain: string, backupId: string, cause: unknown): QbackupError {
  return new QbackupError('LIBVIRT_DISCONNECTED', `Backup "${backupId}" of domain "${domain}" failed: the connection to libvirt at ${uri} closed while its disks were read (libvirtd stopped or restarted), so nothing of it was kept`, { cause });
}

/** 9000000 → "9.0.0". */
function versionText(v: number): string {
  return `${Math.floor(v / 1_000_000)}.${Math.floor(v / 1000) % 1000}.${v % 1000}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
