// Domains: definitions, their disks with stable ids, and the QEMU process that
// runs them. Every command that reads or changes one domain runs under that
// domain's lock (src/store/lock.ts) through `withDomain`, which also notices a
// QEMU that died since the last command and records it as crashed.
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
// - A start records a `starting` runtime with QEMU's pid the moment QEMU is
//   spawned, before QMP; a start killed at any point leaves a QEMU that the
//   next command under the lock adopts (it answers QMP) or kills (recorded as
//   shut off, reason "failed").

import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, realpathSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QbackupError, describeError, isQbackupError } from '../errors.js';
import { domainVirtType, formatDomainXml, parseDomainXml } from '../libvirt/domain.js';
import { hotplugDisk, unplugDisk } from '../qemu/devices.js';
import { readBlockNodes } from '../qemu/block-nodes.js';
import { nodeNamesFor, qemuIoDevicePath } from '../qemu/nodes.js';
import { runTool } from '../qemu/tools.js';
import { killProcess, launchQemu, qmpChardevArg, waitForExit, waitForQmp, type LaunchOptions, type QemuProcessInfo } from '../qemu/process.js';
import { QmpClient } from '../qmp/index.js';
import type { DiskEventRow, DomainRow, DomainStore, RuntimeRow } from '../store/domains.js';
import { acquireDomainLock } from '../store/lock.js';
import { assert } from '../util/assert.js';
import { makePrivateDir } from '../util/private-dir.js';
import { findProcessWithArg, isProcessAlive, processStartTime } from '../util/proc.js';
import { checkDiskImage, imageIdentity, refuseUnsupportedDisk } from './images.js';
import { assertDomainName, assertTargetName, busForTarget } from './names.js';
import type { DiskBus, DiskDefinition, DiskFormat, DomainDefinition, NbdBacking } from './types.js';

export type DomainState = 'running' | 'shut off' | 'crashed';

export interface DomainSummary {
  name: string;
  uuid: string;
  state: DomainState;
  /**
   * Why it is in that state: booted, paused, shutdown, destroyed, crashed,
   * defined, failed (a start that did not finish), starting (a start runs, or
   * died and no command has settled it yet).
   */
  reason: string;
  pid?: number;
}

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

export interface UndefineOptions {
  /** Also remove checkpoint metadata (libvirt's --checkpoints-metadata); bitmaps stay in the images. */
  checkpointsMetadata?: boolean;
}

export interface DomainServiceOptions {
  stateDir: string;
  lockTimeoutMs: number;
  accel?: 'auto' | 'kvm' | 'tcg';
  qemuBinary?: string;
  /** Sees every QMP message sent and received (for diagnostics and tests). */
  qmpTrace?: (direction: 'send' | 'recv', message: object) => void;
  /** How long detach waits for the guest to release a device (virtio needs a guest). */
  detachTimeoutMs?: number;
  shutdownTimeoutMs?: number;
  /** How long a start (or the adoption of a QEMU a killed start left) waits for QMP. Default 30 s. */
  startTimeoutMs?: number;
}

/** What a command sees of its domain while it holds the lock. */
export interface DomainContext {
  readonly row: DomainRow;
  readonly definition: DomainDefinition;
  readonly runtime: RuntimeRow | undefined;
  readonly running: boolean;
  /** Attached disks with their ids, in definition order. */
  readonly disks: readonly AttachedDisk[];
}

export interface AttachedDisk extends DiskDefinition {
  diskId: string;
}

/**
 * What other subsystems do at domain lifecycle points. Qbackup (src/qbackup.ts)
 * sets them once, in one place, in the order they must run.
 */
export interface DomainHooks {
  /** Runs before QEMU is launched, e.g. to bring up what a disk's declared backing needs. */
  beforeStart?: (ctx: DomainContext) => Promise<void>;
  afterStart?: (ctx: DomainContext, qmp: QmpClient) => Promise<void>;
  afterAttach?: (ctx: DomainContext, disk: AttachedDisk, qmp: QmpClient | undefined) => Promise<void>;
  /** Runs inside withDomain, before the command; e.g. to finish an interrupted operation. */
  onOpen?: (ctx: DomainContext) => Promise<void>;
  /** A disk's size may have changed (a monitor command, blockresize): look at the sizes again. */
  sizesMayHaveChanged?: (ctx: DomainContext, qmp: QmpClient | undefined) => Promise<void>;
  /** A change to the domain's configuration is about to happen; throw to refuse it. */
  beforeConfigChange?: (ctx: DomainContext, what: string) => void;
  beforeUndefine?: (ctx: DomainContext, options: UndefineOptions) => void;
}

/**
 * Refuses `what` while a disk still reads from a backup served over NBD (an
 * instant restore is copying it in): checkpoints, backups and changes of the
 * disks wait until every byte is local.
 */
export function refuseWhileRestoring(ctx: DomainContext, what: string): void {
  const disk = ctx.disks.find((d) => d.nbdBacking !== undefined);
  if (disk === undefined) return;
  throw new QbackupError(
    'RESTORE_RUNNING',
    `Cannot ${what} on domain "${ctx.row.name}": disk "${disk.target}" still reads from its backup while an instant restore copies the data in (domjobinfo shows the progress); try again when it ends`,
  );
}

export class DomainService {
  private hooksSet = false;
  hooks: Readonly<DomainHooks> = {};

  /** Installs the lifecycle hooks; once, by the library's entry point. */
  setHooks(hooks: DomainHooks): void {
    assert(!this.hooksSet, 'domain hooks are set once');
    this.hooksSet = true;
    this.hooks = hooks;
  }

  constructor(
    readonly store: DomainStore,
    readonly options: DomainServiceOptions,
  ) {}

  // ---- reading -------------------------------------------------------------

  list(options: { all?: boolean } = {}): DomainSummary[] {
    const out: DomainSummary[] = [];
    for (const row of this.store.listDomains()) {
      const summary = this.summarize(row, this.refreshRuntime(row.name));
      if (options.all || summary.state !== 'shut off') out.push(summary);
    }
    return out;
  }

  info(name: string): DomainSummary {
    const row = this.requireDomain(name);
    return this.summarize(row, this.refreshRuntime(name));
  }

  dumpXml(name: string): string {
    return this.requireDomain(name).xml;
  }

  blockList(name: string): BlockInfo[] {
    const row = this.requireDomain(name);
    return this.attachedDisks(row, parseDomainXml(row.xml)).map((d) => blockInfo(d));
  }

  domainDir(name: string): string {
    return join(this.options.stateDir, 'domains', name);
  }

  /** The state directory's area for sockets of long-running commands (serve-backup). */
  runDir(): string {
    return join(this.options.stateDir, 'run');
  }

  /** Where the guest's serial console is written (truncated at each start). */
  consoleLog(name: string): string {
    return join(this.domainDir(name), 'console.log');
  }

  /** The socket of the domain's guest agent channel; undefined when the definition has none. */
  guestAgentSocket(definition: DomainDefinition): string | undefined {
    if (definition.guestAgent === undefined) return undefined;
    return definition.guestAgent.path ?? join(this.domainDir(definition.name), 'agent.sock');
  }

  private guestLaunchOptions(definition: DomainDefinition): Pick<LaunchOptions, 'consoleLog' | 'kernelBoot' | 'agentSocket'> {
    const agentSocket = this.guestAgentSocket(definition);
    return {
      consoleLog: this.consoleLog(definition.name),
      ...(definition.kernelBoot !== undefined ? { kernelBoot: definition.kernelBoot } : {}),
      ...(agentSocket !== undefined ? { agentSocket } : {}),
    };
  }

  // ---- definition ----------------------------------------------------------

  /**
   * Defines a new domain, or updates the definition of a shut-off domain with
   * the same name and UUID (as virsh define does).
   */
  async define(xml: string): Promise<DomainSummary> {
    const def = parseDomainXml(xml);
    assertDomainName(def.name);
    for (const d of def.disks) assertTargetName(d.target);
    const existing = this.store.getDomain(def.name);
    if (existing === undefined) {
      const other = this.store.getDomainByUuid(def.uuid);
      if (other !== undefined) {
        throw new QbackupError('DOMAIN_EXISTS', `Cannot define domain "${def.name}": UUID ${def.uuid} already belongs to domain "${other.name}"`);
      }
      const disks = await this.checkImages(def.name, def.disks);
      this.store.transaction(() => {
        if (this.store.getDomain(def.name) !== undefined) {
          throw new QbackupError('DOMAIN_EXISTS', `Cannot define domain "${def.name}": a domain with that name already exists`);
        }
        this.store.insertDomain({ name: def.name, uuid: def.uuid, xml: formatDomainXml(def), created_ms: Date.now() });
        this.store.setRuntime({ domain: def.name, state: 'shutoff', reason: 'defined', pid: null, pid_start: null, qmp_socket: null });
        for (const d of disks) this.recordAttach(def.name, d, false);
      });
      return this.info(def.name);
    }
    if (existing.uuid !== def.uuid) {
      throw new QbackupError('DOMAIN_EXISTS', `Cannot define domain "${def.name}": a domain with that name already exists with UUID ${existing.uuid}`);
    }
    return this.withDomain(def.name, 'define', async (ctx) => {
      if (ctx.running) {
        throw new QbackupError('DOMAIN_RUNNING', `Cannot redefine domain "${def.name}": it is running; shut it down first`);
      }
      this.hooks.beforeConfigChange?.(ctx, 'redefine');
      const disks = await this.checkImages(def.name, def.disks);
      const keep = new Set(disks.map((d) => d.resolved));
      this.store.transaction(() => {
        const rows = this.store.disksOf(def.name);
        for (const old of ctx.disks) {
          const row = rows.find((r) => r.id === old.diskId);
          if (row === undefined || !keep.has(row.source)) this.recordDetach(def.name, old, false);
        }
        for (const d of disks) {
          const row = this.store.diskBySource(def.name, d.resolved);
          if (row === undefined || row.attached === 0) this.recordAttach(def.name, d, false);
          else this.store.upsertDisk({ ...row, target: d.def.target, format: d.def.format });
        }
        this.store.updateDomainXml(def.name, formatDomainXml(def));
      });
      return this.info(def.name);
    });
  }

  async undefine(name: string, options: UndefineOptions = {}): Promise<void> {
    await this.withDomain(name, 'undefine', async (ctx) => {
      this.hooks.beforeConfigChange?.(ctx, 'undefine');
      if (ctx.running) {
        throw new QbackupError('DOMAIN_RUNNING', `Cannot undefine domain "${name}": it is running; shut it down or destroy it first`);
      }
      this.hooks.beforeUndefine?.(ctx, options);
      this.store.transaction(() => this.store.deleteDomain(name));
      rmSync(this.domainDir(name), { recursive: true, force: true });
    });
  }

  // ---- lifecycle -----------------------------------------------------------

  async start(name: string, options: { paused?: boolean } = {}): Promise<DomainSummary> {
    return this.withDomain(name, 'start', async (ctx) => {
      if (ctx.running) throw new QbackupError('DOMAIN_RUNNING', `Cannot start domain "${name}": it is already running`);
      for (const d of ctx.disks) {
        refuseUnsupportedDisk(name, d);
        await checkDiskImage(d, `Cannot start domain "${name}": image "${d.source}" of disk "${d.target}"`);
      }
      await this.hooks.beforeStart?.(ctx);
      const dir = this.domainDir(name);
      makePrivateDir(dir);
      const qmpSocket = join(dir, 'qmp.sock');
      // Recorded before QEMU exists and again, with its pid, the moment it does:
      // from here on a start killed at any instant leaves a row the next command settles.
      this.recordStarting(name, null, qmpSocket);
      let launched: QemuProcessInfo;
      try {
        launched = await launchQemu({
          name,
          uuid: ctx.definition.uuid,
          memoryKiB: ctx.definition.memoryKiB,
          vcpus: ctx.definition.vcpus,
          disks: ctx.disks,
          qmpSocket,
          logFile: join(dir, 'qemu.log'),
          ...this.guestLaunchOptions(ctx.definition),
          paused: options.paused ?? false,
          accel: this.options.accel ?? 'auto',
          virtType: domainVirtType(ctx.definition.sourceXml),
          onSpawn: (pid) => this.recordStarting(name, pid, qmpSocket),
          ...(this.options.startTimeoutMs !== undefined ? { startTimeoutMs: this.options.startTimeoutMs } : {}),
          ...(this.options.qemuBinary !== undefined ? { binary: this.options.qemuBinary } : {}),
        });
      } catch (err) {
        this.store.transaction(() => this.store.setRuntime({ domain: name, state: 'shutoff', reason: 'failed', pid: null, pid_start: null, qmp_socket: null }));
        throw err;
      }
      const reason = options.paused ? 'paused' : 'booted';
      this.store.transaction(() =>
        this.store.setRuntime({ domain: name, state: 'running', reason, pid: launched.pid, pid_start: launched.pidStart, qmp_socket: launched.qmpSocket }),
      );
      await this.runAfterStart(ctx);
      return this.info(name);
    });
  }

  /** Runs the afterStart hook on a domain whose QEMU has just started (or been adopted). */
  private async runAfterStart(ctx: DomainContext): Promise<void> {
    const hook = this.hooks.afterStart;
    if (hook === undefined) return;
    const started: DomainContext = { ...ctx, runtime: this.store.getRuntime(ctx.row.name), running: true };
    await this.withQmp(started, 'start', (qmp) => hook(started, qmp));
  }

  private recordStarting(name: string, pid: number | null, qmpSocket: string): void {
    const pidStart = pid === null ? null : processStartTime(pid) ?? null;
    this.store.transaction(() => this.store.setRuntime({ domain: name, state: 'starting', reason: 'starting', pid, pid_start: pidStart, qmp_socket: qmpSocket }));
  }

  /** The QEMU process a `starting` runtime stands for, found by pid or, when none was recorded, by its QMP socket. */
  private startingProcess(rt: RuntimeRow): { pid: number; startTime: string | undefined } | undefined {
    if (rt.pid !== null) return isProcessAlive(rt.pid, rt.pid_start) ? { pid: rt.pid, startTime: rt.pid_start ?? undefined } : undefined;
    return rt.qmp_socket === null ? undefined : findProcessWithArg(qmpChardevArg(rt.qmp_socket));
  }

  /**
   * Under the lock, a `starting` runtime means its start died (the start holds
   * the lock until it records the outcome). Its QEMU is adopted when it
   * answers QMP within the start timeout; otherwise it is killed and the
   * domain recorded as shut off (failed). True when a QEMU was adopted.
   */
  private async settleStarting(name: string): Promise<boolean> {
    const rt = this.store.getRuntime(name);
    if (rt?.state !== 'starting') return false;
    const qemu = this.startingProcess(rt);
    if (qemu !== undefined && rt.qmp_socket !== null) {
      const status = await waitForQmp(rt.qmp_socket, qemu.pid, qemu.startTime, Date.now() + (this.options.startTimeoutMs ?? 30_000));
      if (status !== undefined) {
        const reason = status === 'running' ? 'booted' : 'paused';
        this.store.transaction(() =>
          this.store.setRuntime({ domain: name, state: 'running', reason, pid: qemu.pid, pid_start: qemu.startTime ?? null, qmp_socket: rt.qmp_socket }),
        );
        return true;
      }
      killProcess(qemu.pid);
      await waitForExit(qemu.pid, qemu.startTime, 10_000);
    }
    this.store.transaction(() => this.store.setRuntime({ domain: name, state: 'shutoff', reason: 'failed', pid: null, pid_start: null, qmp_socket: null }));
    return false;
  }

  /** Clean stop: QMP quit, so QEMU stores persistent bitmaps in the images. */
  async shutdown(name: string): Promise<DomainSummary> {
    return this.withDomain(name, 'shutdown', async (ctx) => {
      const rt = this.requireRunning(ctx, 'shut down');
      this.store.transaction(() => this.store.setRuntime({ ...rt, state: 'stopping', reason: 'shutdown' }));
      try {
        const qmp = await this.connect(ctx);
        try {
          await qmp.execute('quit');
        } catch (err) {
          // QEMU may close the socket before its reply to quit arrives.
          if (!isQbackupError(err, 'QMP_DISCONNECTED')) throw err;
        } finally {
          await qmp.close();
        }
      } catch (err) {
        if (isProcessAlive(rt.pid ?? -1, rt.pid_start)) {
          this.store.transaction(() => this.store.setRuntime({ ...rt, state: 'running' }));
          throw err;
        }
      }
      const gone = await waitForExit(rt.pid ?? -1, rt.pid_start ?? undefined, this.options.shutdownTimeoutMs ?? 30_000);
      if (!gone) {
        this.store.transaction(() => this.store.setRuntime({ ...rt, state: 'running' }));
        throw new QbackupError('QMP_TIMEOUT', `Cannot shut down domain "${name}": QEMU did not exit after "quit"; use destroy to kill it`);
      }
      this.store.transaction(() =>
        this.store.setRuntime({ domain: name, state: 'shutoff', reason: 'shutdown', pid: null, pid_start: null, qmp_socket: null }),
      );
      return this.info(name);
    });
  }

  /** Hard stop (SIGKILL): bitmaps created in this run are lost, loaded ones become inconsistent. */
  async destroy(name: string): Promise<DomainSummary> {
    return this.withDomain(name, 'destroy', async (ctx) => {
      const rt = this.requireRunning(ctx, 'destroy');
      if (rt.pid !== null) {
        killProcess(rt.pid);
        await waitForExit(rt.pid, rt.pid_start ?? undefined, 10_000);
      }
      this.store.transaction(() =>
        this.store.setRuntime({ domain: name, state: 'shutoff', reason: 'destroyed', pid: null, pid_start: null, qmp_socket: null }),
      );
      return this.info(name);
    });
  }

  // ---- disks ---------------------------------------------------------------

  async attachDisk(name: string, request: AttachDiskRequest): Promise<BlockInfo> {
    assertTargetName(request.target);
    return this.withDomain(name, 'attach-disk', async (ctx) => {
      this.hooks.beforeConfigChange?.(ctx, 'attach-disk');
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
      const existingRow = this.store.diskBySource(name, checked.resolved);
      const diskId = existingRow?.id ?? newDiskId();
      const disk: AttachedDisk = { ...def, diskId };
      if (ctx.running) {
        await this.withQmp(ctx, 'attach-disk', async (qmp) => {
          await hotplugDisk(qmp, disk);
          this.commitAttach(ctx, { def, resolved: checked.resolved }, diskId, true);
          if (this.hooks.afterAttach !== undefined) {
            await this.hooks.afterAttach(this.reloadContext(ctx), disk, qmp);
          }
        });
      } else {
        this.commitAttach(ctx, { def, resolved: checked.resolved }, diskId, false);
        await this.hooks.afterAttach?.(this.reloadContext(ctx), disk, undefined);
      }
      return blockInfo(disk);
    });
  }

  async detachDisk(name: string, target: string): Promise<void> {
    await this.withDomain(name, 'detach-disk', async (ctx) => {
      this.hooks.beforeConfigChange?.(ctx, 'detach-disk');
      const disk = ctx.disks.find((d) => d.target === target);
      if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${name}" has no disk "${target}"`);
      if (ctx.running) {
        await this.withQmp(ctx, 'detach-disk', (qmp) => unplugDisk(qmp, name, disk, this.options.detachTimeoutMs ?? 10_000));
      }
      const def = { ...ctx.definition, disks: ctx.definition.disks.filter((d) => d.target !== target) };
      this.store.transaction(() => {
        this.recordDetach(name, disk, ctx.running);
        this.store.updateDomainXml(name, formatDomainXml(def));
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
    return this.withDomain(name, 'blockresize', async (ctx) => {
      this.hooks.beforeConfigChange?.(ctx, 'blockresize');
      const disk = ctx.disks.find((d) => d.target === target);
      if (disk === undefined) throw new QbackupError('DISK_NOT_FOUND', `Domain "${name}" has no disk "${target}"`);
      if (ctx.running) {
        await this.withQmp(ctx, 'blockresize', async (qmp) => {
          const before = (await readBlockNodes(qmp)).get(nodeNamesFor(disk.diskId).format)?.virtualSize ?? 0;
          if (sizeBytes < before && !options.shrink) throw new QbackupError('INVALID_ARGUMENT', `Cannot shrink disk "${target}" of domain "${name}" from ${before} to ${sizeBytes} bytes without --shrink`);
          await qmp.execute('block_resize', { 'node-name': nodeNamesFor(disk.diskId).format, size: sizeBytes });
          await this.hooks.sizesMayHaveChanged?.(ctx, qmp);
        });
      } else {
        await this.hooks.sizesMayHaveChanged?.(ctx, undefined); // remember the size before
        await runTool('qemu-img', ['resize', '-f', disk.format, ...(options.shrink ? ['--shrink'] : []), disk.source, String(sizeBytes)], { what: `Resizing disk "${target}" of domain "${name}"` });
        await this.hooks.sizesMayHaveChanged?.(ctx, undefined);
      }
      return blockInfo(disk);
    });
  }

  // ---- monitor passthrough -------------------------------------------------

  /**
   * Raw QMP (a JSON {"execute": …, "arguments": …} document, or a bare command
   * name) or, with `hmp`, an HMP command line. Returns QMP's `return` value or
   * HMP's text output.
   */
  async monitorCommand(name: string, command: string, options: { hmp?: boolean } = {}): Promise<unknown> {
    return this.withDomain(name, 'qemu-monitor-command', async (ctx) => {
      this.requireRunning(ctx, 'send a monitor command to');
      return this.withQmp(ctx, 'qemu-monitor-command', async (qmp) => {
        const { execute, args } = options.hmp ? { execute: '', args: undefined } : parseMonitorCommand(name, command);
        const result = options.hmp ? await qmp.humanMonitorCommand(command) : await qmp.execute(execute, args);
        // Anything can be done through the monitor, a block_resize too.
        await this.hooks.sizesMayHaveChanged?.(ctx, qmp);
        return result;
      });
    });
  }

  // ---- the frame every command runs in --------------------------------------

  /**
   * Runs `fn` holding the domain's lock, with a fresh view of the domain. The
   * lock is released however `fn` ends.
   */
  async withDomain<T>(name: string, command: string, fn: (ctx: DomainContext) => Promise<T>): Promise<T> {
    assertDomainName(name);
    this.requireDomain(name);
    using _lock = await acquireDomainLock(this.store.db, name, command, { timeoutMs: this.options.lockTimeoutMs });
    // First the runtime a killed start left, so that recovery sees QEMU as it is.
    const adopted = await this.settleStarting(name);
    const ctx = this.loadContext(name);
    if (this.hooks.onOpen !== undefined) await this.hooks.onOpen(ctx);
    if (adopted) await this.runAfterStart(this.loadContext(name));
    // `return await`: the lock must outlive fn, not just the call that starts it.
    return await fn(this.loadContext(name));
  }

  /**
   * Runs `fn` with a QMP connection to the domain's QEMU. If QEMU dies during
   * `fn`, the domain is recorded as crashed and the error says so.
   */
  async withQmp<T>(ctx: DomainContext, what: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const qmp = await this.connect(ctx);
    try {
      return await fn(qmp);
    } catch (err) {
      if (isQbackupError(err, 'QMP_DISCONNECTED') || isQbackupError(err, 'QMP_TIMEOUT')) {
        const rt = ctx.runtime;
        if (rt?.pid != null && (await waitForExit(rt.pid, rt.pid_start ?? undefined, 500))) {
          this.markCrashed(ctx.row.name);
          throw new QbackupError('QEMU_DIED', `Domain "${ctx.row.name}" crashed during ${what}: its QEMU process exited`, { cause: err });
        }
      }
      throw err;
    } finally {
      await qmp.close();
    }
  }

  async connect(ctx: DomainContext): Promise<QmpClient> {
    const rt = this.requireRunning(ctx, 'connect to');
    try {
      return await QmpClient.connect(rt.qmp_socket ?? '', {
        connectTimeoutMs: 10_000,
        defaultTimeoutMs: 60_000,
        ...(this.options.qmpTrace !== undefined ? { onTrace: this.options.qmpTrace } : {}),
      });
    } catch (err) {
      if (!isProcessAlive(rt.pid ?? -1, rt.pid_start)) {
        this.markCrashed(ctx.row.name);
        throw new QbackupError('QEMU_DIED', `Domain "${ctx.row.name}" is not running: its QEMU process exited`, { cause: err });
      }
      throw new QbackupError('QMP_DISCONNECTED', `Cannot reach the QEMU of domain "${ctx.row.name}": ${describeError(err)}`, { cause: err });
    }
  }

  loadContext(name: string): DomainContext {
    const row = this.requireDomain(name);
    const definition = parseDomainXml(row.xml);
    const runtime = this.refreshRuntime(name);
    return {
      row,
      definition,
      runtime,
      // "stopping" with QEMU alive: a shutdown died half-way; the domain still runs.
      running: runtime?.state === 'running' || runtime?.state === 'stopping',
      disks: this.attachedDisks(row, definition),
    };
  }

  private reloadContext(ctx: DomainContext): DomainContext {
    return this.loadContext(ctx.row.name);
  }

  requireDomain(name: string): DomainRow {
    assertDomainName(name);
    const row = this.store.getDomain(name);
    if (row === undefined) throw new QbackupError('DOMAIN_NOT_FOUND', `Domain "${name}" does not exist`);
    return row;
  }

  requireRunning(ctx: DomainContext, verb: string): RuntimeRow {
    const rt = ctx.runtime;
    if (!ctx.running || rt === undefined || rt.pid === null) {
      const why = rt?.state === 'crashed' ? 'it crashed' : 'it is not running';
      throw new QbackupError('DOMAIN_NOT_RUNNING', `Cannot ${verb} domain "${ctx.row.name}": ${why}`);
    }
    return rt;
  }

  // ---- internals -----------------------------------------------------------

  /** Notices a QEMU that exited without our quit and records it as a crash. */
  private refreshRuntime(name: string): RuntimeRow | undefined {
    const rt = this.store.getRuntime(name);
    if (rt === undefined || (rt.state !== 'running' && rt.state !== 'stopping')) return rt;
    if (rt.pid !== null && isProcessAlive(rt.pid, rt.pid_start)) return rt;
    if (rt.state === 'stopping') {
      this.store.transaction(() =>
        this.store.setRuntime({ domain: name, state: 'shutoff', reason: 'shutdown', pid: null, pid_start: null, qmp_socket: null }),
      );
    } else {
      this.markCrashed(name);
    }
    return this.store.getRuntime(name);
  }

  private markCrashed(name: string): void {
    this.store.transaction(() =>
      this.store.setRuntime({ domain: name, state: 'crashed', reason: 'crashed', pid: null, pid_start: null, qmp_socket: null }),
    );
  }

  private summarize(row: DomainRow, rt: RuntimeRow | undefined): DomainSummary {
    if (rt?.state === 'starting') {
      // Read without the lock: a start runs (or died) and nothing is settled here.
      const qemu = this.startingProcess(rt);
      const summary: DomainSummary = { name: row.name, uuid: row.uuid, state: qemu !== undefined ? 'running' : 'shut off', reason: 'starting' };
      if (qemu !== undefined) summary.pid = qemu.pid;
      return summary;
    }
    const state: DomainState = rt?.state === 'running' || rt?.state === 'stopping' ? 'running' : rt?.state === 'crashed' ? 'crashed' : 'shut off';
    const summary: DomainSummary = { name: row.name, uuid: row.uuid, state, reason: rt?.reason ?? 'defined' };
    if (state === 'running' && rt?.pid != null) summary.pid = rt.pid;
    return summary;
  }

  private attachedDisks(row: DomainRow, def: DomainDefinition): AttachedDisk[] {
    const rows = this.store.disksOf(row.name).filter((d) => d.attached === 1);
    return def.disks.map((d) => {
      const match = rows.find((r) => r.target === d.target);
      if (match === undefined) {
        throw new QbackupError('METADATA_INCONSISTENT', `Metadata of domain "${row.name}" is inconsistent: disk "${d.target}" has no disk id`);
      }
      return { ...d, diskId: match.id };
    });
  }

  /**
   * Checks what the definition asks of every disk can be honoured, and that
   * every image exists, is its declared format, names no backing file and is
   * no other disk's image: of this domain or another, under any path (the
   * same device and inode is the same image, so a hard link is too).
   */
  private async checkImages(
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
      const elsewhere = this.store.attachedElsewhere(domain, resolved) ?? this.store.attachedDisksOfOthers(domain).find((r) => imageIdentity(r.source) === identity);
      if (elsewhere !== undefined) {
        throw new QbackupError('DISK_EXISTS', `Cannot use image "${def.source}" for domain "${domain}": it is disk "${elsewhere.target}" of domain "${elsewhere.domain}"`);
      }
      out.push({ def, resolved });
    }
    return out;
  }

  private commitAttach(ctx: DomainContext, disk: { def: DiskDefinition; resolved: string }, diskId: string, live: boolean): void {
    const def = { ...ctx.definition, disks: [...ctx.definition.disks, disk.def] };
    this.store.transaction(() => {
      this.recordAttach(ctx.row.name, disk, live, diskId);
      this.store.updateDomainXml(ctx.row.name, formatDomainXml(def));
    });
  }

  private recordAttach(domain: string, disk: { def: DiskDefinition; resolved: string }, live: boolean, id?: string): string {
    const existing = this.store.diskBySource(domain, disk.resolved);
    const diskId = id ?? existing?.id ?? newDiskId();
    this.store.upsertDisk({ id: diskId, domain, source: disk.resolved, format: disk.def.format, target: disk.def.target, attached: 1 });
    this.store.recordDiskEvent(diskId, 'attach', disk.def.target, live);
    return diskId;
  }

  private recordDetach(domain: string, disk: AttachedDisk, live: boolean): void {
    const row = this.store.disksOf(domain).find((r) => r.id === disk.diskId);
    if (row === undefined) return;
    this.store.upsertDisk({ ...row, attached: 0 });
    this.store.recordDiskEvent(disk.diskId, 'detach', disk.target, live);
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
    this.store.transaction(() => this.store.updateDomainXml(ctx.row.name, formatDomainXml({ ...ctx.definition, disks })));
  }

  // ---- reads for other subsystems ------------------------------------------
  // What checkpoints need of disk identity and the attach/detach journal, so
  // they call these instead of reaching into DomainStore.

  /** The id of the domain's disk (attached or not) whose image is `source` once resolved; null when none is. */
  diskIdForSource(domain: string, source: string): string | null {
    const resolved = resolveSource(source);
    return this.store.disksOf(domain).find((r) => r.source === resolved)?.id ?? null;
  }

  /** The newest disk journal sequence number: a point in the global order of attach/detach events. */
  journalHead(): number {
    return this.store.journalHead();
  }

  /** The newest disk journal sequence number of an event at or before `atMs` (0 when none). */
  journalSeqAt(atMs: number): number {
    return this.store.journalSeqAt(atMs);
  }

  /** Attach/detach events of a disk after journal sequence number `afterSeq`, oldest first. */
  diskEvents(diskId: string, afterSeq = 0): DiskEventRow[] {
    return this.store.diskEvents(diskId, afterSeq);
  }

  /** The virtual size each disk of the domain was last seen with, by disk id. */
  diskSizesSeen(domain: string): Map<string, number> {
    return this.store.diskSizes(domain);
  }

  /** Records the size a disk is seen with now. */
  noteDiskSize(diskId: string, size: number): void {
    this.store.transaction(() => this.store.setDiskSize(diskId, size));
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

function parseMonitorCommand(domain: string, command: string): { execute: string; args?: Record<string, unknown> } {
  const text = command.trim();
  if (!text.startsWith('{')) return { execute: text };
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send monitor command to domain "${domain}": it is not valid JSON (${describeError(err)})`);
  }
  if (typeof doc !== 'object' || doc === null || typeof (doc as Record<string, unknown>)['execute'] !== 'string') {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send monitor command to domain "${domain}": a QMP command needs an "execute" member`);
  }
  const rec = doc as Record<string, unknown>;
  const args = rec['arguments'];
  if (args !== undefined && (typeof args !== 'object' || args === null || Array.isArray(args))) {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot send monitor command to domain "${domain}": "arguments" must be an object`);
  }
  return args === undefined ? { execute: rec['execute'] as string } : { execute: rec['execute'] as string, args: args as Record<string, unknown> };
}
