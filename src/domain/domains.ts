// Domains: their definitions and the lifecycle of the QEMU process that runs
// them (define, undefine, start, shutdown, destroy). Every command that reads
// or changes one domain runs under that domain's lock through `withDomain`
// (./session.ts), which also notices a QEMU that died since the last command
// and records it as crashed. The disks and their journal are ./disks.ts, the
// monitor passthrough ./monitor.ts; DomainService offers all of it by name.
//
// Invariants (the disks' own are in ./disks.ts):
// - A start records a `starting` runtime with QEMU's pid the moment QEMU is
//   spawned, before QMP; a start killed at any point leaves a QEMU that the
//   next command under the lock adopts (it answers QMP) or kills (recorded as
//   shut off, reason "failed").

import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { QbackupError, isQbackupError } from '../errors.js';
import { formatDomainXml, parseDomainXml } from '../model/definition-xml.js';
import type { DomainDefinition, NbdBacking } from '../model/definition.js';
import { killProcess, launchQemu, waitForExit, type LaunchOptions, type QemuProcessInfo } from '../qemu/process.js';
import type { QmpClient } from '../qmp/index.js';
import type { DiskEventRow, DomainRow, DomainStore, RuntimeRow } from '../store/domains.js';
import { assert } from '../util/assert.js';
import { makePrivateDir } from '../util/private-dir.js';
import { isProcessAlive } from '../util/proc.js';
import { DomainDisks, type AttachDiskRequest, type BlockInfo } from './disks.js';
import { checkDiskImage, refuseUnsupportedDisk } from './images.js';
import { monitorCommand } from './monitor.js';
import { assertDomainName, assertTargetName } from './names.js';
import { DomainSessions, type DomainContext, type DomainHooks, type DomainServiceOptions, type DomainSummary, type UndefineOptions } from './session.js';

export type { AttachDiskRequest, BlockInfo } from './disks.js';
export type { AttachedDisk, DomainContext, DomainHooks, DomainServiceOptions, DomainState, DomainSummary, UndefineOptions } from './session.js';

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
  /** The frame every command runs in (the lock, the context, QMP). */
  readonly sessions: DomainSessions;
  /** Attach, detach, resize and the disk journal. */
  readonly disks: DomainDisks;

  constructor(
    readonly store: DomainStore,
    readonly options: DomainServiceOptions,
  ) {
    this.sessions = new DomainSessions(store, options);
    this.disks = new DomainDisks(this.sessions);
  }

  get hooks(): Readonly<DomainHooks> {
    return this.sessions.hooks;
  }

  /** Installs the lifecycle hooks; once, by the engine that wires them (src/drivers/qemu/engine.ts). */
  setHooks(hooks: DomainHooks): void {
    assert(!this.hooksSet, 'domain hooks are set once');
    this.hooksSet = true;
    this.sessions.hooks = hooks;
  }

  // ---- reading -------------------------------------------------------------

  list(options: { all?: boolean } = {}): DomainSummary[] {
    const out: DomainSummary[] = [];
    for (const row of this.store.listDomains()) {
      const summary = this.sessions.summarize(row, this.sessions.refreshRuntime(row.name));
      if (options.all || summary.state !== 'shut off') out.push(summary);
    }
    return out;
  }

  info(name: string): DomainSummary {
    const row = this.sessions.requireDomain(name);
    return this.sessions.summarize(row, this.sessions.refreshRuntime(name));
  }

  dumpXml(name: string): string {
    return this.sessions.requireDomain(name).xml;
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
      kernelBoot: definition.kernelBoot,
      agentSocket,
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
      const disks = await this.disks.checkImages(def.name, def.disks);
      this.store.transaction(() => {
        if (this.store.getDomain(def.name) !== undefined) {
          throw new QbackupError('DOMAIN_EXISTS', `Cannot define domain "${def.name}": a domain with that name already exists`);
        }
        this.store.insertDomain({ name: def.name, uuid: def.uuid, xml: formatDomainXml(def), created_ms: Date.now() });
        this.store.setRuntime({ domain: def.name, state: 'shutoff', reason: 'defined', pid: null, pid_start: null, qmp_socket: null });
        for (const d of disks) this.disks.recordAttach(def.name, d, false);
      });
      return this.info(def.name);
    }
    if (existing.uuid !== def.uuid) {
      throw new QbackupError('DOMAIN_EXISTS', `Cannot define domain "${def.name}": a domain with that name already exists with UUID ${existing.uuid}`);
    }
    return this.sessions.withDomain(def.name, 'define', async (ctx) => {
      if (ctx.running) {
        throw new QbackupError('DOMAIN_RUNNING', `Cannot redefine domain "${def.name}": it is running; shut it down first`);
      }
      this.hooks.beforeConfigChange?.(ctx, 'redefine');
      const disks = await this.disks.checkImages(def.name, def.disks);
      const keep = new Set(disks.map((d) => d.resolved));
      this.store.transaction(() => {
        const rows = this.store.disksOf(def.name);
        for (const old of ctx.disks) {
          const row = rows.find((r) => r.id === old.diskId);
          if (row === undefined || !keep.has(row.source)) this.disks.recordDetach(def.name, old, false);
        }
        for (const d of disks) {
          const row = this.store.diskBySource(def.name, d.resolved);
          if (row === undefined || row.attached === 0) this.disks.recordAttach(def.name, d, false);
          else this.store.upsertDisk({ ...row, target: d.def.target, format: d.def.format });
        }
        this.store.updateDomainXml(def.name, formatDomainXml(def));
      });
      return this.info(def.name);
    });
  }

  async undefine(name: string, options: UndefineOptions = {}): Promise<void> {
    await this.sessions.withDomain(name, 'undefine', async (ctx) => {
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
    return this.sessions.withDomain(name, 'start', async (ctx) => {
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
      this.sessions.recordStarting(name, null, qmpSocket);
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
          onSpawn: (pid) => this.sessions.recordStarting(name, pid, qmpSocket),
          startTimeoutMs: this.options.startTimeoutMs,
          binary: this.options.qemuBinary,
        });
      } catch (err) {
        this.store.transaction(() => this.store.setRuntime({ domain: name, state: 'shutoff', reason: 'failed', pid: null, pid_start: null, qmp_socket: null }));
        throw err;
      }
      const reason = options.paused ? 'paused' : 'booted';
      this.store.transaction(() =>
        this.store.setRuntime({ domain: name, state: 'running', reason, pid: launched.pid, pid_start: launched.pidStart, qmp_socket: launched.qmpSocket }),
      );
      await this.sessions.runAfterStart(ctx);
      return this.info(name);
    });
  }





  /** Clean stop: QMP quit, so QEMU stores persistent bitmaps in the images. */
  async shutdown(name: string): Promise<DomainSummary> {
    return this.sessions.withDomain(name, 'shutdown', async (ctx) => {
      const rt = this.sessions.requireRunning(ctx, 'shut down');
      this.store.transaction(() => this.store.setRuntime({ ...rt, state: 'stopping', reason: 'shutdown' }));
      try {
        const qmp = await this.sessions.connect(ctx);
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
    return this.sessions.withDomain(name, 'destroy', async (ctx) => {
      const rt = this.sessions.requireRunning(ctx, 'destroy');
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

  // ---- the other parts, by name (./session.ts, ./disks.ts, ./monitor.ts) ------

  withDomain<T>(name: string, command: string, fn: (ctx: DomainContext) => Promise<T>): Promise<T> {
    return this.sessions.withDomain(name, command, fn);
  }

  withQmp<T>(ctx: DomainContext, what: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    return this.sessions.withQmp(ctx, what, fn);
  }

  connect(ctx: DomainContext): Promise<QmpClient> {
    return this.sessions.connect(ctx);
  }

  loadContext(name: string): DomainContext {
    return this.sessions.loadContext(name);
  }

  requireDomain(name: string): DomainRow {
    return this.sessions.requireDomain(name);
  }

  requireRunning(ctx: DomainContext, verb: string): RuntimeRow {
    return this.sessions.requireRunning(ctx, verb);
  }

  monitorCommand(name: string, command: string, options: { hmp?: boolean | undefined } = {}): Promise<unknown> {
    return monitorCommand(this.sessions, name, command, options);
  }

  blockList(name: string): BlockInfo[] {
    return this.disks.blockList(name);
  }

  attachDisk(name: string, request: AttachDiskRequest): Promise<BlockInfo> {
    return this.disks.attachDisk(name, request);
  }

  detachDisk(name: string, target: string): Promise<void> {
    return this.disks.detachDisk(name, target);
  }

  blockResize(name: string, target: string, sizeBytes: number, options: { shrink?: boolean } = {}): Promise<BlockInfo> {
    return this.disks.blockResize(name, target, sizeBytes, options);
  }

  setNbdBackings(ctx: DomainContext, backings: ReadonlyMap<string, NbdBacking | undefined>): void {
    this.disks.setNbdBackings(ctx, backings);
  }

  diskIdForSource(domain: string, source: string): string | null {
    return this.disks.diskIdForSource(domain, source);
  }

  journalHead(): number {
    return this.disks.journalHead();
  }

  journalSeqAt(atMs: number): number {
    return this.disks.journalSeqAt(atMs);
  }

  diskEvents(diskId: string, afterSeq = 0): DiskEventRow[] {
    return this.disks.diskEvents(diskId, afterSeq);
  }

  diskSizesSeen(domain: string): Map<string, number> {
    return this.disks.diskSizesSeen(domain);
  }

  noteDiskSize(diskId: string, size: number): void {
    this.disks.noteDiskSize(diskId, size);
  }
}
