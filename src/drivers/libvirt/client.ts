// The client of libvirt's RPC protocol that the libvirt driver stands on: it
// opens a libvirt connection on the daemon's socket (auth list, then
// connect-open with the URI's name) and offers one method per procedure of
// procedures.ts, with domains and checkpoints named by the references
// libvirt returns (LibvirtDomainRef, LibvirtCheckpointRef).
//
// Invariants:
// - Only REMOTE_AUTH_NONE is spoken. A daemon that asks for polkit is tried
//   with auth-polkit (which succeeds when polkit allows this process); SASL
//   or a polkit refusal fail with LIBVIRT_ACCESS_DENIED in one sentence.
// - Every libvirt error keeps libvirt's message (LibvirtCallError) and maps
//   to qbackup's code (DOMAIN_NOT_FOUND, CHECKPOINT_NOT_FOUND, …).
// - close() says connect-close when it can, then closes the socket; it is
//   idempotent, and a connection already lost is no error to it.

import { QbackupError, describeError, isQbackupError } from '../../errors.js';
import * as C from './rpc/constants.js';
import { LibvirtConnection, type LibvirtCallOptions, type LibvirtConnectionOptions, type LibvirtEvent } from './rpc/connection.js';
import { LibvirtCallError } from './rpc/errors.js';
import { PROCEDURES } from './rpc/procedures.js';
import { typedParamsRecord, type LibvirtCheckpointRef, type LibvirtDomainRef, type LibvirtTypedParam } from './rpc/structs.js';
import { parseConnectUri, type ParseConnectUriOptions } from './uri.js';

export interface LibvirtClientOptions extends LibvirtConnectionOptions, ParseConnectUriOptions {}

export interface LibvirtJobStats {
  /** virDomainJobType: VIR_DOMAIN_JOB_NONE, _UNBOUNDED, _COMPLETED, … */
  type: number;
  params: LibvirtTypedParam[];
  /** The same parameters by name; 64-bit values as numbers when exact. */
  fields: Record<string, number | bigint | boolean | string>;
}

export interface LibvirtBlockJobInfo {
  /** virDomainBlockJobType */
  type: number;
  bandwidth: bigint;
  cur: bigint;
  end: bigint;
}

export class LibvirtClient {
  readonly connection: LibvirtConnection;
  /** The URI the client was opened with (or the label / socket path given to connectSocket). */
  readonly uri: string;
  private closing: Promise<void> | undefined;

  private constructor(connection: LibvirtConnection, uri: string) {
    this.connection = connection;
    this.uri = uri;
  }

  /** Opens a libvirt connection at a qemu:// URI (see uri.ts). */
  static async connect(uri: string, options: LibvirtClientOptions = {}): Promise<LibvirtClient> {
    const parsed = parseConnectUri(uri, options);
    if (parsed.driver !== 'libvirt') throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${uri}" selects qbackup's own driver, not libvirt`);
    return LibvirtClient.connectSocket(parsed.socketPath, parsed.name, { ...options, label: uri });
  }

  /**
   * Opens a libvirt connection on a daemon's socket, sending `name` (e.g.
   * "qemu:///system") in connect-open; for callers that resolved the URI
   * themselves. `options.label` names the daemon in messages.
   */
  static async connectSocket(socketPath: string, name: string, options: LibvirtConnectionOptions = {}): Promise<LibvirtClient> {
    const connection = await LibvirtConnection.connect(socketPath, options);
    const client = new LibvirtClient(connection, connection.label);
    try {
      await client.authenticate();
      await connection.call(PROCEDURES.connectOpen, { name, flags: 0 });
      return client;
    } catch (err) {
      await connection.close();
      throw err;
    }
  }

  private async authenticate(): Promise<void> {
    const { types } = await this.connection.call(PROCEDURES.authList, undefined);
    if (types.length === 0 || types.includes(C.REMOTE_AUTH_NONE)) return;
    if (types.includes(C.REMOTE_AUTH_POLKIT)) {
      try {
        const { complete } = await this.connection.call(PROCEDURES.authPolkit, undefined);
        if (complete !== 0) return;
      } catch (err) {
        throw new QbackupError('LIBVIRT_ACCESS_DENIED', `libvirt at ${this.uri} asks for polkit authorization and polkit refused this process: run as root or allow it in polkit (${describeError(err)})`, { cause: err });
      }
      throw new QbackupError('LIBVIRT_ACCESS_DENIED', `libvirt at ${this.uri} asks for polkit authorization and it did not complete: run as root or allow it in polkit`);
    }
    throw new QbackupError('LIBVIRT_ACCESS_DENIED', `libvirt at ${this.uri} asks for authentication qbackup does not do (types ${types.join(', ')}; only none and polkit are supported): run as root over the local socket`);
  }

  /** libvirt's version as major * 1_000_000 + minor * 1000 + micro. */
  async getLibVersion(): Promise<number> {
    return Number((await this.connection.call(PROCEDURES.connectGetLibVersion, undefined)).libVer);
  }

  /** The host's capabilities XML (its security models with the DAC label QEMU runs under, among others). */
  async getCapabilities(): Promise<string> {
    return (await this.connection.call(PROCEDURES.connectGetCapabilities, undefined)).capabilities;
  }

  /** Every domain (flags: VIR_CONNECT_LIST_DOMAINS_ACTIVE / _INACTIVE to filter; 0 for all). */
  async listAllDomains(flags = 0): Promise<LibvirtDomainRef[]> {
    return (await this.connection.call(PROCEDURES.connectListAllDomains, { needResults: 1, flags })).domains;
  }

  async lookupDomainByName(name: string): Promise<LibvirtDomainRef> {
    return (await this.connection.call(PROCEDURES.domainLookupByName, { name })).dom;
  }

  /** By the 16 raw bytes, or by the canonical text form. */
  async lookupDomainByUuid(uuid: Buffer | string): Promise<LibvirtDomainRef> {
    return (await this.connection.call(PROCEDURES.domainLookupByUuid, { uuid: typeof uuid === 'string' ? uuidBytes(uuid) : uuid })).dom;
  }

  /** The domain's XML (flags: VIR_DOMAIN_XML_INACTIVE for the persistent definition, _SECURE). */
  async getXmlDesc(dom: LibvirtDomainRef, flags = 0): Promise<string> {
    return (await this.connection.call(PROCEDURES.domainGetXmlDesc, { dom, flags })).xml;
  }

  /** virDomainState and its reason. */
  async getState(dom: LibvirtDomainRef): Promise<{ state: number; reason: number }> {
    return this.connection.call(PROCEDURES.domainGetState, { dom, flags: 0 });
  }

  async getInfo(dom: LibvirtDomainRef): Promise<{ state: number; maxMemKiB: bigint; memoryKiB: bigint; vcpus: number; cpuTimeNs: bigint }> {
    const info = await this.connection.call(PROCEDURES.domainGetInfo, { dom });
    return { state: info.state, maxMemKiB: info.maxMem, memoryKiB: info.memory, vcpus: info.nrVirtCpu, cpuTimeNs: info.cpuTime };
  }

  async defineXml(xml: string, flags = 0): Promise<LibvirtDomainRef> {
    return (await this.connection.call(PROCEDURES.domainDefineXmlFlags, { xml, flags })).dom;
  }

  /** Starts a defined domain; returns it with its new id. */
  async create(dom: LibvirtDomainRef, flags = 0): Promise<LibvirtDomainRef> {
    return (await this.connection.call(PROCEDURES.domainCreateWithFlags, { dom, flags })).dom;
  }

  async destroy(dom: LibvirtDomainRef, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainDestroyFlags, { dom, flags });
  }

  /** Pauses the guest's CPUs (QEMU flushes every disk as it stops). */
  async suspend(dom: LibvirtDomainRef): Promise<void> {
    await this.connection.call(PROCEDURES.domainSuspend, { dom });
  }

  async resume(dom: LibvirtDomainRef): Promise<void> {
    await this.connection.call(PROCEDURES.domainResume, { dom });
  }

  /** Asks the guest to shut down (ACPI or agent); a guest without an OS ignores it: use destroy with VIR_DOMAIN_DESTROY_GRACEFUL. */
  async shutdown(dom: LibvirtDomainRef, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainShutdownFlags, { dom, flags });
  }

  /** Hot-plugs a device from its XML (flags: VIR_DOMAIN_AFFECT_LIVE | _CONFIG). */
  async attachDevice(dom: LibvirtDomainRef, xml: string, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainAttachDeviceFlags, { dom, xml, flags });
  }

  async detachDevice(dom: LibvirtDomainRef, xml: string, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainDetachDeviceFlags, { dom, xml, flags });
  }

  /** A disk's sizes in bytes: capacity (virtual size), allocation, physical. */
  async getBlockInfo(dom: LibvirtDomainRef, disk: string): Promise<{ capacity: bigint; allocation: bigint; physical: bigint }> {
    return this.connection.call(PROCEDURES.domainGetBlockInfo, { dom, path: disk, flags: 0 });
  }

  /** Resizes a disk; pass VIR_DOMAIN_BLOCK_RESIZE_BYTES for a size in bytes (else KiB). */
  async blockResize(dom: LibvirtDomainRef, disk: string, size: bigint, flags: number = C.VIR_DOMAIN_BLOCK_RESIZE_BYTES): Promise<void> {
    await this.connection.call(PROCEDURES.domainBlockResize, { dom, disk, size, flags });
  }

  /** flags: VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA is needed while checkpoints exist. */
  async undefine(dom: LibvirtDomainRef, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainUndefineFlags, { dom, flags });
  }

  /** Creates a checkpoint; with VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE it redefines one from its saved XML. */
  async checkpointCreateXml(dom: LibvirtDomainRef, xml: string, flags = 0): Promise<LibvirtCheckpointRef> {
    return (await this.connection.call(PROCEDURES.domainCheckpointCreateXml, { dom, xmlDesc: xml, flags })).checkpoint;
  }

  async listAllCheckpoints(dom: LibvirtDomainRef, flags = 0): Promise<LibvirtCheckpointRef[]> {
    return (await this.connection.call(PROCEDURES.domainListAllCheckpoints, { dom, needResults: 1, flags })).checkpoints;
  }

  async checkpointLookupByName(dom: LibvirtDomainRef, name: string): Promise<LibvirtCheckpointRef> {
    return (await this.connection.call(PROCEDURES.domainCheckpointLookupByName, { dom, name, flags: 0 })).checkpoint;
  }

  async checkpointGetXmlDesc(checkpoint: LibvirtCheckpointRef, flags = 0): Promise<string> {
    return (await this.connection.call(PROCEDURES.domainCheckpointGetXmlDesc, { checkpoint, flags })).xml;
  }

  async checkpointDelete(checkpoint: LibvirtCheckpointRef, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainCheckpointDelete, { checkpoint, flags });
  }

  /** Starts a backup job from its backup XML, with a checkpoint created atomically when checkpointXml is given. */
  async backupBegin(dom: LibvirtDomainRef, backupXml: string, checkpointXml?: string | undefined, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainBackupBegin, { dom, backupXml, checkpointXml, flags });
  }

  async backupGetXmlDesc(dom: LibvirtDomainRef): Promise<string> {
    return (await this.connection.call(PROCEDURES.domainBackupGetXmlDesc, { dom, flags: 0 })).xml;
  }

  async getJobInfo(dom: LibvirtDomainRef): Promise<{ type: number; dataTotal: bigint; dataProcessed: bigint; dataRemaining: bigint; timeElapsedMs: bigint }> {
    const r = await this.connection.call(PROCEDURES.domainGetJobInfo, { dom });
    return { type: r.type, dataTotal: r.dataTotal, dataProcessed: r.dataProcessed, dataRemaining: r.dataRemaining, timeElapsedMs: r.timeElapsed };
  }

  /** The current job's statistics (flags: VIR_DOMAIN_JOB_STATS_COMPLETED for the last completed job). */
  async getJobStats(dom: LibvirtDomainRef, flags = 0): Promise<LibvirtJobStats> {
    const r = await this.connection.call(PROCEDURES.domainGetJobStats, { dom, flags });
    return { type: r.type, params: r.params, fields: typedParamsRecord(r.params) };
  }

  /** Ends the domain's job (a backup job: its exports and scratch go away). */
  async abortJob(dom: LibvirtDomainRef, flags = 0): Promise<void> {
    if (flags === 0) await this.connection.call(PROCEDURES.domainAbortJob, { dom });
    else await this.connection.call(PROCEDURES.domainAbortJobFlags, { dom, flags });
  }

  async blockPull(dom: LibvirtDomainRef, disk: string, options: { bandwidth?: bigint; flags?: number } = {}): Promise<void> {
    await this.connection.call(PROCEDURES.domainBlockPull, { dom, path: disk, bandwidth: options.bandwidth ?? 0n, flags: options.flags ?? 0 });
  }

  async blockRebase(dom: LibvirtDomainRef, disk: string, base: string | undefined, options: { bandwidth?: bigint; flags?: number } = {}): Promise<void> {
    await this.connection.call(PROCEDURES.domainBlockRebase, { dom, path: disk, base, bandwidth: options.bandwidth ?? 0n, flags: options.flags ?? 0 });
  }

  /** Copies a disk to the destination described by `destXml` (a <disk>); params: bandwidth, granularity, buf-size. */
  async blockCopy(dom: LibvirtDomainRef, disk: string, destXml: string, params: LibvirtTypedParam[] = [], flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainBlockCopy, { dom, path: disk, destxml: destXml, params, flags });
  }

  /** The disk's block job, or undefined when it has none. */
  async getBlockJobInfo(dom: LibvirtDomainRef, disk: string): Promise<LibvirtBlockJobInfo | undefined> {
    const r = await this.connection.call(PROCEDURES.domainGetBlockJobInfo, { dom, path: disk, flags: 0 });
    return r.found === 0 ? undefined : { type: r.type, bandwidth: r.bandwidth, cur: r.cur, end: r.end };
  }

  /** Cancels, or with VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT completes, the disk's block job. */
  async blockJobAbort(dom: LibvirtDomainRef, disk: string, flags = 0): Promise<void> {
    await this.connection.call(PROCEDURES.domainBlockJobAbort, { dom, path: disk, flags });
  }

  /** Freezes the guest's filesystems through its agent; returns how many. Any refusal is GUEST_AGENT, with libvirt's message. */
  async fsFreeze(dom: LibvirtDomainRef, mountpoints: string[] = []): Promise<number> {
    return guestAgentCall(async () => (await this.connection.call(PROCEDURES.domainFsfreeze, { dom, mountpoints, flags: 0 })).filesystems);
  }

  async fsThaw(dom: LibvirtDomainRef, mountpoints: string[] = []): Promise<number> {
    return guestAgentCall(async () => (await this.connection.call(PROCEDURES.domainFsthaw, { dom, mountpoints, flags: 0 })).filesystems);
  }

  /** QEMU monitor passthrough (QMP JSON, or HMP with VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP). */
  async qemuMonitorCommand(dom: LibvirtDomainRef, command: string, flags = 0, options: LibvirtCallOptions = {}): Promise<string> {
    return (await this.connection.call(PROCEDURES.qemuDomainMonitorCommand, { dom, cmd: command, flags }, options)).result;
  }

  /**
   * Guest agent passthrough (virDomainQemuAgentCommand): one agent command as
   * JSON text, its whole answer back as JSON text. `timeoutSec` as libvirt's
   * (-2 block, -1 default, 0 no wait, >0 seconds). Any refusal is GUEST_AGENT.
   */
  async qemuAgentCommand(dom: LibvirtDomainRef, command: string, timeoutSec: number): Promise<string> {
    return guestAgentCall(async () => (await this.connection.call(PROCEDURES.qemuDomainAgentCommand, { dom, cmd: command, timeout: timeoutSec, flags: 0 })).result ?? '');
  }

  /** Registers for one event kind (VIR_DOMAIN_EVENT_ID_*), of one domain or all; returns the callback id events carry. */
  async registerDomainEvent(eventId: number, dom?: LibvirtDomainRef | undefined): Promise<number> {
    return (await this.connection.call(PROCEDURES.connectDomainEventCallbackRegisterAny, { eventID: eventId, dom })).callbackID;
  }

  async deregisterDomainEvent(callbackId: number): Promise<void> {
    await this.connection.call(PROCEDURES.connectDomainEventCallbackDeregisterAny, { callbackID: callbackId });
  }

  /** See LibvirtConnection.waitForEvent. */
  waitForEvent(matches: (event: LibvirtEvent) => boolean, timeoutMs?: number, after = 0): Promise<LibvirtEvent> {
    return this.connection.waitForEvent(matches, timeoutMs, after);
  }

  eventCursor(): number {
    return this.connection.eventCursor();
  }

  /** connect-close, then the socket. Idempotent; a lost connection is no error here. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        await this.connection.call(PROCEDURES.connectClose, undefined, { timeoutMs: 5_000 });
      } catch (err) {
        // The connection may already be gone; closing it is all that is left to do.
        if (!isQbackupError(err)) throw err;
      } finally {
        await this.connection.close();
      }
    })();
    return this.closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** libvirt says "argument unsupported: QEMU guest agent is not configured" (or "not valid" when the agent is absent): for quiescing all of it means the guest agent. */
async function guestAgentCall<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    if (err instanceof LibvirtCallError && err.code !== 'DOMAIN_NOT_FOUND') {
      throw new QbackupError('GUEST_AGENT', err.message, { cause: err, details: { ...err.details } });
    }
    throw err;
  }
}

/** The 16 bytes of a UUID's canonical text form. */
export function uuidBytes(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new QbackupError('INVALID_ARGUMENT', `"${text}" is not a UUID`);
  return Buffer.from(hex, 'hex');
}

/** The canonical text form of a UUID's 16 bytes. */
export function uuidText(bytes: Buffer): string {
  const h = bytes.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
