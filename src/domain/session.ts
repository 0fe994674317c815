// The frame every command on a domain runs in: `withDomain` holds the
// domain's lock (src/store/lock.ts), settles a start a killed command left,
// runs the onOpen hooks and hands the command a fresh `DomainContext`;
// `withQmp` opens QEMU's monitor for the length of a call and turns a QEMU
// that died meanwhile into a recorded crash. Also what the other parts of the
// domain service share: the runtime rows, the summaries, the attached disks.
//
// Invariants:
// - A start records a `starting` runtime with QEMU's pid the moment QEMU is
//   spawned, before QMP; a start killed at any point leaves a QEMU that the
//   next command under the lock adopts (it answers QMP) or kills (recorded as
//   shut off, reason "failed").
// - The stored XML is parsed once per version of it (a command that looks at
//   its domain three times parses it once).

import { QbackupError, describeError, isQbackupError } from '../errors.js';
import { parseDomainXml } from '../model/definition-xml.js';
import type { DiskDefinition, DomainDefinition } from '../model/definition.js';
import { killProcess, qmpChardevArg, waitForExit, waitForQmp } from '../qemu/process.js';
import { QmpClient } from '../qmp/index.js';
import type { DomainRow, DomainStore, RuntimeRow } from '../store/domains.js';
import { acquireDomainLock } from '../store/lock.js';
import { findProcessWithArg, isProcessAlive, processStartTime } from '../util/proc.js';
import { assertDomainName } from './names.js';

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

export interface UndefineOptions {
  /** Also remove checkpoint metadata (libvirt's --checkpoints-metadata); bitmaps stay in the images. */
  checkpointsMetadata?: boolean;
}

export interface DomainServiceOptions {
  stateDir: string;
  lockTimeoutMs: number;
  accel?: 'auto' | 'kvm' | 'tcg' | undefined;
  qemuBinary?: string | undefined;
  /** Sees every QMP message sent and received (for diagnostics and tests). */
  qmpTrace?: ((direction: 'send' | 'recv', message: object) => void) | undefined;
  /** How long detach waits for the guest to release a device (virtio needs a guest). */
  detachTimeoutMs?: number | undefined;
  shutdownTimeoutMs?: number | undefined;
  /** How long a start (or the adoption of a QEMU a killed start left) waits for QMP. Default 30 s. */
  startTimeoutMs?: number | undefined;
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
 * What other subsystems do at domain lifecycle points. The engine
 * (src/drivers/qemu/engine.ts) sets them once, in one place, in the order they must run.
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

export class DomainSessions {
  hooks: Readonly<DomainHooks> = {};
  /** The last definition parsed, by the XML it was parsed from. */
  private parsed: { xml: string; definition: DomainDefinition } | undefined;

  constructor(
    readonly store: DomainStore,
    readonly options: DomainServiceOptions,
  ) {}

  /** The row's definition, parsed once per version of its XML. */
  definitionOf(row: DomainRow): DomainDefinition {
    if (this.parsed?.xml !== row.xml) this.parsed = { xml: row.xml, definition: parseDomainXml(row.xml) };
    return this.parsed.definition;
  }

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
    await using qmp = await this.connect(ctx);
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
    }
  }

  async connect(ctx: DomainContext): Promise<QmpClient> {
    const rt = this.requireRunning(ctx, 'connect to');
    try {
      return await QmpClient.connect(rt.qmp_socket ?? '', {
        connectTimeoutMs: 10_000,
        defaultTimeoutMs: 60_000,
        onTrace: this.options.qmpTrace,
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
    const definition = this.definitionOf(row);
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

  reloadContext(ctx: DomainContext): DomainContext {
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

  /** Notices a QEMU that exited without our quit and records it as a crash. */
  refreshRuntime(name: string): RuntimeRow | undefined {
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

  markCrashed(name: string): void {
    this.store.transaction(() =>
      this.store.setRuntime({ domain: name, state: 'crashed', reason: 'crashed', pid: null, pid_start: null, qmp_socket: null }),
    );
  }

  summarize(row: DomainRow, rt: RuntimeRow | undefined): DomainSummary {
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

  attachedDisks(row: DomainRow, def: DomainDefinition): AttachedDisk[] {
    const rows = this.store.disksOf(row.name).filter((d) => d.attached === 1);
    return def.disks.map((d) => {
      const match = rows.find((r) => r.target === d.target);
      if (match === undefined) {
        throw new QbackupError('METADATA_INCONSISTENT', `Metadata of domain "${row.name}" is inconsistent: disk "${d.target}" has no disk id`);
      }
      return { ...d, diskId: match.id };
    });
  }

  /** Runs the afterStart hook on a domain whose QEMU has just started (or been adopted). */
  async runAfterStart(ctx: DomainContext): Promise<void> {
    const hook = this.hooks.afterStart;
    if (hook === undefined) return;
    const started: DomainContext = { ...ctx, runtime: this.store.getRuntime(ctx.row.name), running: true };
    await this.withQmp(started, 'start', (qmp) => hook(started, qmp));
  }

  recordStarting(name: string, pid: number | null, qmpSocket: string): void {
    const pidStart = pid === null ? null : processStartTime(pid) ?? null;
    this.store.transaction(() => this.store.setRuntime({ domain: name, state: 'starting', reason: 'starting', pid, pid_start: pidStart, qmp_socket: qmpSocket }));
  }

  /** The QEMU process a `starting` runtime stands for, found by pid or, when none was recorded, by its QMP socket. */
  startingProcess(rt: RuntimeRow): { pid: number; startTime: string | undefined } | undefined {
    if (rt.pid !== null) return isProcessAlive(rt.pid, rt.pid_start) ? { pid: rt.pid, startTime: rt.pid_start ?? undefined } : undefined;
    return rt.qmp_socket === null ? undefined : findProcessWithArg(qmpChardevArg(rt.qmp_socket));
  }

  /**
   * Under the lock, a `starting` runtime means its start died (the start holds
   * the lock until it records the outcome). Its QEMU is adopted when it
   * answers QMP within the start timeout; otherwise it is killed and the
   * domain recorded as shut off (failed). True when a QEMU was adopted.
   */
  async settleStarting(name: string): Promise<boolean> {
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
}
