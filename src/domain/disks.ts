// The disks of domains: attach, detach and resize (live through QMP, or in
// the stored definition of a shut-off domain), the images' checks, and the
// attach/detach journal that the coverage rules read.
//
// Invariants:
// - A domain's stored XML and its rows in `disks` (attached = 1) describe the
//   same set of disks; both change in one SQLite transaction, after QEMU has
//   accepted the change (or before starting it, for a shut-off domain).
// - Every attach and detach of a disk, live or offline, appends to the disk's
//   journal; the coverage rules read it to know whether an image may have been
//   written outside our sight.
// - A disk id belongs to one image of one domain: re-attaching the same image
//   (same real path) reuses the id, another image under the same target gets a
//   new one. An image (one file: device + inode, whatever its path) is a disk
//   of at most one domain.
// - Images never choose host files and formats are never probed (./images.ts).

import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, realpathSync } from 'node:fs';
import { QbackupError } from '../errors.js';
import { runTool } from '../image/tools.js';
import { formatDomainXml } from '../model/definition-xml.js';
import type { DiskBus, DiskDefinition, DiskFormat, NbdBacking } from '../model/definition.js';
import { readBlockNodes } from '../qemu/block-nodes.js';
import { hotplugDisk, unplugDisk } from '../qemu/devices.js';
import { nodeNamesFor, qemuIoDevicePath } from '../qemu/nodes.js';
import type { DiskEventRow } from '../store/domains.js';
import { assert } from '../util/assert.js';
import { checkDiskImage, imageIdentity, refuseUnsupportedDisk } from './images.js';
import { assertTargetName, busForTarget } from './names.js';
import type { AttachedDisk, DomainContext, DomainSessions } from './session.js';

export interface BlockInfo {
  target: string;
  source: string;
  format: DiskFormat;
  bus: DiskBus;
  readonly: boolean;
  serial?: string;
  diskId: string;
  /** QEMU node name of the format layer: bitmaps live here. */
  nodeName: string;
  /** What `qemu-io -d` takes to write to this disk as the guest would. */
  qemuIoDevice: string;
}

export interface AttachDiskRequest {
  source: string;
  target: string;
  /** Image format; raw when absent (libvirt's rule: a format is never probed). */
  format?: DiskFormat;
  bus?: DiskBus;
  serial?: string;
  readonly?: boolean;
}

export class DomainDisks {
  constructor(private readonly sessions: DomainSessions) {}

  blockList(name: string): BlockInfo[] {
    const row = this.sessions.requireDomain(name);
    return this.sessions.attachedDisks(row, this.sessions.definitionOf(row)).map((d) => blockInfo(d));
  }

  async attachDisk(name: string, request: AttachDiskRequest): Promise<BlockInfo> {
    assertTargetName(request.target);
    return this.sessions.withDomain(name, 'attach-disk', async (ctx) => {
      this.sessions.hooks.beforeConfigChange?.(ctx, 'attach-disk');
      if (ctx.disks.some((d) => d.target === request.target)) {
        throw new QbackupError('DISK_EXISTS', `Cannot attach a disk to domain "${name}": target "${request.target}" is already in use`);
      }
      const source = absoluteSource(name, request.source);
      if (request.format === undefined) refuseAmbiguousFormat(name, request.target, source);
      const def: DiskDefinition = {
        target: request.target,
        source,
        format: request.format ?? 'raw',
        bus: request.bus ?? busForTarget(request.target),
        readonly: request.readonly ?? false,
        ...(request.serial !== undefined ? { serial: request.serial } : {}),
      };
      const [checked] = await this.checkImages(name, [def], ctx.disks);
      assert(checked !== undefined, 'checkImages returns one entry per disk');
      const existingRow = this.sessions.store.diskBySource(name, checked.resolved);
      const diskId = existingRow?.id ?? newDiskId();
      const disk: AttachedDisk = { ...def, diskId };
      if (ctx.running) {
        await this.sessions.withQmp(ctx, 'attach-disk', async (qmp) => {
          await hotplugDisk(qmp, disk);
          this.commitAttach(ctx, { def, resolved: checked.resolved }, diskId, true);
          if (this.sessions.hooks.afterAttach !== undefined) {
            await this.sessions.hooks.afterAttach(this.sessions.loadContext(ctx.row.name), disk, qmp);
          }
        });
      } else {
        this.commitAttach(ctx, { def, resolved: checked.resolved }, diskId, false);
        await this.sessions.hooks.afterAttach?.(this.sessions.loadContext(ctx.row.name), disk, undefined);
      }
      return blockInfo(disk);
    });
  }

  async detachDisk(name: string, target: string): Promise<void> {
    await this.sessions.withDomain(name, 'detach-disk', async (ctx) => {
      this.sessions.hooks.beforeConfigChange?.(ctx, 'detach-disk');
      const disk = ctx.disks.find((d) => d.target === target);
      if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${name}" has no disk "${target}"`);
      if (ctx.running) {
        await this.sessions.withQmp(ctx, 'detach-disk', (qmp) => unplugDisk(qmp, name, disk, this.sessions.options.detachTimeoutMs ?? 10_000));
      }
      const def = { ...ctx.definition, disks: ctx.definition.disks.filter((d) => d.target !== target) };
      this.sessions.store.transaction(() => {
        this.recordDetach(name, disk, ctx.running);
        this.sessions.store.updateDomainXml(name, formatDomainXml(def));
      });
    });
  }

  /**
   * Changes a disk's virtual size (virsh blockresize): QMP block_resize when
   * running, qemu-img resize when shut off. A resize loses the disk's
   * coverage (see src/checkpoint/resize.ts); growing is always allowed,
   * shrinking only with `shrink`.
   */
  async blockResize(name: string, target: string, sizeBytes: number, options: { shrink?: boolean } = {}): Promise<BlockInfo> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % 512 !== 0) {
      throw new QbackupError('INVALID_ARGUMENT', `Invalid size ${sizeBytes} for disk "${target}": use a positive multiple of 512 bytes`);
    }
    return this.sessions.withDomain(name, 'blockresize', async (ctx) => {
      this.sessions.hooks.beforeConfigChange?.(ctx, 'blockresize');
      const disk = ctx.disks.find((d) => d.target === target);
      if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${name}" has no disk "${target}"`);
      if (ctx.running) {
        await this.sessions.withQmp(ctx, 'blockresize', async (qmp) => {
          const before = (await readBlockNodes(qmp)).get(nodeNamesFor(disk.diskId).format)?.virtualSize ?? 0;
          if (sizeBytes < before && !options.shrink) throw new QbackupError('INVALID_ARGUMENT', `Cannot shrink disk "${target}" of domain "${name}" from ${before} to ${sizeBytes} bytes without --shrink`);
          await qmp.execute('block_resize', { 'node-name': nodeNamesFor(disk.diskId).format, size: sizeBytes });
          await this.sessions.hooks.sizesMayHaveChanged?.(ctx, qmp);
        });
      } else {
        await this.sessions.hooks.sizesMayHaveChanged?.(ctx, undefined); // remember the size before
        await runTool('qemu-img', ['resize', '-f', disk.format, ...(options.shrink ? ['--shrink'] : []), disk.source, String(sizeBytes)], { what: `Resizing disk "${target}" of domain "${name}"` });
        await this.sessions.hooks.sizesMayHaveChanged?.(ctx, undefined);
      }
      return blockInfo(disk);
    });
  }

  /**
   * Checks what the definition asks of every disk can be honoured, and that
   * every image exists, is its declared format, names no backing file and is
   * no other disk's image: of this domain or another, under any path (the
   * same device and inode is the same image, so a hard link is too).
   */
  async checkImages(
    domain: string,
    disks: readonly DiskDefinition[],
    alsoAttached: readonly AttachedDisk[] = [],
  ): Promise<Array<{ def: DiskDefinition; resolved: string }>> {
    const out: Array<{ def: DiskDefinition; resolved: string }> = [];
    const seen = new Map<string, string>();
    for (const d of alsoAttached) seen.set(imageIdentity(d.source) ?? resolveSource(d.source), d.target);
    for (const def of disks) {
      refuseUnsupportedDisk(domain, def);
      const subject = `Cannot use image "${def.source}" for disk "${def.target}" of domain "${domain}": it`;
      await checkDiskImage(def, subject);
      const resolved = resolveSource(def.source);
      const identity = imageIdentity(def.source) ?? resolved;
      const twin = seen.get(identity);
      if (twin !== undefined) throw new QbackupError('DISK_EXISTS', `${subject} is already disk "${twin}"`);
      seen.set(identity, def.target);
      const elsewhere = this.sessions.store.attachedElsewhere(domain, resolved) ?? this.sessions.store.attachedDisksOfOthers(domain).find((r) => imageIdentity(r.source) === identity);
      if (elsewhere !== undefined) {
        throw new QbackupError('DISK_EXISTS', `Cannot use image "${def.source}" for domain "${domain}": it is disk "${elsewhere.target}" of domain "${elsewhere.domain}"`);
      }
      out.push({ def, resolved });
    }
    return out;
  }

  private commitAttach(ctx: DomainContext, disk: { def: DiskDefinition; resolved: string }, diskId: string, live: boolean): void {
    const def = { ...ctx.definition, disks: [...ctx.definition.disks, disk.def] };
    this.sessions.store.transaction(() => {
      this.recordAttach(ctx.row.name, disk, live, diskId);
      this.sessions.store.updateDomainXml(ctx.row.name, formatDomainXml(def));
    });
  }

  recordAttach(domain: string, disk: { def: DiskDefinition; resolved: string }, live: boolean, id?: string): string {
    const existing = this.sessions.store.diskBySource(domain, disk.resolved);
    const diskId = id ?? existing?.id ?? newDiskId();
    this.sessions.store.upsertDisk({ id: diskId, domain, source: disk.resolved, format: disk.def.format, target: disk.def.target, attached: 1 });
    this.sessions.store.recordDiskEvent(diskId, 'attach', disk.def.target, live);
    return diskId;
  }

  recordDetach(domain: string, disk: AttachedDisk, live: boolean): void {
    const row = this.sessions.store.disksOf(domain).find((r) => r.id === disk.diskId);
    if (row === undefined) return;
    this.sessions.store.upsertDisk({ ...row, attached: 0 });
    this.sessions.store.recordDiskEvent(disk.diskId, 'detach', disk.target, live);
  }

  /**
   * Sets or drops the declared NBD backing of disks in the stored definition
   * (an instant restore adds them, and drops them once QEMU has copied every
   * byte into the images). Only the backing changes.
   */
  setNbdBackings(ctx: DomainContext, backings: ReadonlyMap<string, NbdBacking | undefined>): void {
    const disks = ctx.definition.disks.map((d) => {
      if (!backings.has(d.target)) return d;
      const { nbdBacking: _old, ...rest } = d;
      const next = backings.get(d.target);
      return next === undefined ? rest : { ...rest, nbdBacking: next };
    });
    this.sessions.store.transaction(() => this.sessions.store.updateDomainXml(ctx.row.name, formatDomainXml({ ...ctx.definition, disks })));
  }

  /** The id of the domain's disk (attached or not) whose image is `source` once resolved; null when none is. */
  diskIdForSource(domain: string, source: string): string | null {
    const resolved = resolveSource(source);
    return this.sessions.store.disksOf(domain).find((r) => r.source === resolved)?.id ?? null;
  }

  /** The newest disk journal sequence number: a point in the global order of attach/detach events. */
  journalHead(): number {
    return this.sessions.store.journalHead();
  }

  /** The newest disk journal sequence number of an event at or before `atMs` (0 when none). */
  journalSeqAt(atMs: number): number {
    return this.sessions.store.journalSeqAt(atMs);
  }

  /** Attach/detach events of a disk after journal sequence number `afterSeq`, oldest first. */
  diskEvents(diskId: string, afterSeq = 0): DiskEventRow[] {
    return this.sessions.store.diskEvents(diskId, afterSeq);
  }

  /** The virtual size each disk of the domain was last seen with, by disk id. */
  diskSizesSeen(domain: string): Map<string, number> {
    return this.sessions.store.diskSizes(domain);
  }

  /** Records the size a disk is seen with now. */
  noteDiskSize(diskId: string, size: number): void {
    this.sessions.store.transaction(() => this.sessions.store.setDiskSize(diskId, size));
  }
}

// ---- small helpers -------------------------------------------------------------

function blockInfo(d: AttachedDisk): BlockInfo {
  return {
    target: d.target,
    source: d.source,
    format: d.format,
    bus: d.bus,
    readonly: d.readonly,
    ...(d.serial !== undefined ? { serial: d.serial } : {}),
    diskId: d.diskId,
    nodeName: nodeNamesFor(d.diskId).format,
    qemuIoDevice: qemuIoDevicePath(d.target, d.bus),
  };
}

function newDiskId(): string {
  return `dk${randomBytes(4).toString('hex')}`;
}

function resolveSource(source: string): string {
  try {
    return realpathSync(source);
  } catch {
    return source;
  }
}

/**
 * Without a format a disk is raw (libvirt's rule), but an image that starts
 * with a qcow2 header is ambiguous: a qcow2 the user meant (whose header may
 * name a host file) or a raw disk a guest wrote a header into. qbackup never
 * guesses: it asks for --subdriver.
 */
function refuseAmbiguousFormat(domain: string, target: string, source: string): void {
  let head = Buffer.alloc(0);
  try {
    const fd = openSync(source, 'r');
    try {
      head = Buffer.alloc(4);
      readSync(fd, head, 0, 4, 0);
    } finally {
      closeSync(fd);
    }
  } catch {
    return; // a missing or unreadable image is reported by the checks that follow, with its reason
  }
  if (head.equals(QCOW2_MAGIC)) {
    throw new QbackupError(
      'INVALID_ARGUMENT',
      `Cannot attach "${source}" as disk "${target}" of domain "${domain}" without a format: it starts with a qcow2 header; give its format, qcow2 (a backing file it names is refused) or raw`,
    );
  }
}

const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

function absoluteSource(domain: string, source: string): string {
  if (!source.startsWith('/')) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot attach "${source}" to domain "${domain}": the image path must be absolute`);
  }
  return source;
}
