// The QEMU driver: the driver interface (../driver.ts) over our own engine
// (./engine.ts), which runs QEMU itself and speaks QMP to it. The URI is
// qbackup:/// (or none). A pull backup is a backup job of the engine owned
// by this process (its reader): if the process dies, the next command on the
// domain ends the job and merges its checkpoint away.

import type { JobInfo } from '../../backup/job.js';
import type { BackupSpec } from '../../backup/spec.js';
import { QbackupError, describeError } from '../../errors.js';
import { GuestAgentClient } from '../../qemu/guest-agent.js';
import { createZeroOverlay } from '../../image/overlay.js';
import { assert } from '../../util/assert.js';
import type {
  DiskCoverage,
  DomainSession,
  DriverDisk,
  DriverDomain,
  GuestAgentSession,
  HypervisorDriver,
  LifecycleHooks,
  PullBackup,
  PullBackupRequest,
} from '../driver.js';
import { driverDisk } from './disks.js';
import type { QemuEngine } from './engine.js';

export const QEMU_DRIVER_URI = 'qbackup:///';

export class QemuDriver implements HypervisorDriver {
  readonly uri = QEMU_DRIVER_URI;

  constructor(readonly engine: QemuEngine) {}

  private get domains() {
    return this.engine.domains;
  }

  async listDomains(): Promise<DriverDomain[]> {
    return this.domains.list({ all: true }).map(({ name, uuid, state, reason }) => ({ name, uuid, state, reason }));
  }

  async describeDomain(name: string): Promise<DriverDomain> {
    const { uuid, state, reason } = this.domains.info(name);
    return { name, uuid, state, reason };
  }

  async domainXml(name: string): Promise<string> {
    return this.domains.dumpXml(name);
  }

  async disks(name: string): Promise<DriverDisk[]> {
    return this.domains.loadContext(name).disks.map(driverDisk);
  }

  async defineDomain(xml: string): Promise<DriverDomain> {
    const { name, uuid, state, reason } = await this.domains.define(xml);
    return { name, uuid, state, reason };
  }

  async startDomain(name: string, options: { paused?: boolean | undefined } = {}): Promise<DriverDomain> {
    await this.domains.start(name, { paused: options.paused ?? false });
    return this.describeDomain(name);
  }

  async shutdownDomain(name: string): Promise<DriverDomain> {
    await this.domains.shutdown(name);
    return this.describeDomain(name);
  }

  async undefineDomain(name: string): Promise<void> {
    await this.domains.undefine(name);
  }

  /** The agent's unix socket, one connection held until close (the socket takes one client at a time). */
  async guestAgent(name: string): Promise<GuestAgentSession> {
    const ctx = this.domains.loadContext(name);
    if (!ctx.running) throw new QbackupError('GUEST_AGENT', `Cannot reach the guest agent of domain "${name}": it is not running`);
    const socket = this.domains.guestAgentSocket(ctx.definition);
    if (socket === undefined) throw new QbackupError('GUEST_AGENT', `Cannot reach the guest agent of domain "${name}": it has no guest agent channel (<channel type="unix"> with target org.qemu.guest_agent.0)`);
    let client: GuestAgentClient;
    try {
      client = await GuestAgentClient.connect(socket, name);
    } catch (err) {
      throw new QbackupError('GUEST_AGENT', `The guest agent of domain "${name}" does not answer, or another client holds its socket (${describeError(err)})`, { cause: err });
    }
    return {
      domain: name,
      execute: (command, args, timeoutMs) => client.execute(command, args, timeoutMs),
      close: async () => client.close(),
    };
  }

  async withShutOffDisks<T>(name: string, what: string, fn: (disks: readonly DriverDisk[]) => Promise<T>): Promise<T> {
    return this.domains.withDomain(name, what, async (ctx) => {
      if (ctx.running) throw new QbackupError('DOMAIN_RUNNING', `Cannot ${what} domain "${name}": it is running; shut it down first`);
      this.engine.backups.assertNoJob(ctx, 'write the disks');
      return fn(ctx.disks.map(driverDisk));
    });
  }

  // ---- checkpoints and backups ----

  async checkpoints(domain: string): Promise<string[]> {
    return this.engine.checkpoints.list(domain).map((c) => c.name);
  }

  async deleteCheckpoint(domain: string, name: string): Promise<void> {
    await this.engine.checkpoints.delete(domain, name);
  }

  async coverage(domain: string, checkpoint: string): Promise<DiskCoverage[]> {
    return (await this.engine.checkpoints.coverage(domain, checkpoint)).map(({ target, diskId, mode, reasons }) => ({ target, diskId, mode, reasons }));
  }

  get defaultTlsCertDir(): string | undefined {
    return this.engine.backups.defaultTlsCertDir;
  }

  async beginPullBackup(domain: string, request: PullBackupRequest): Promise<PullBackup> {
    const spec: BackupSpec = {
      mode: 'pull',
      ...(request.tcp !== undefined ? { server: { transport: 'tcp' as const, host: request.tcp.host, port: request.tcp.port, tls: true } } : {}),
      disks: request.disks.map((d) => (d.since !== undefined ? { target: d.target, mode: 'incremental' as const, since: d.since } : { target: d.target, mode: 'full' as const })),
    };
    const job = await this.engine.backups.begin(domain, spec, {
      checkpoint: { name: request.checkpoint },
      strict: true,
      ownedByCaller: true,
      discardCheckpointOnFailure: true,
      quiesce: request.quiesce,
      tlsCertDir: request.tlsCertDir,
      skipUnchanged: request.skipUnchanged,
    });
    return pullBackupOf(job, request.checkpoint);
  }

  async endBackup(domain: string, backupId: string): Promise<void> {
    await this.engine.backups.abort(domain, backupId);
  }

  async endOrphanedBackup(domain: string): Promise<void> {
    // Every command on the domain first ends a job whose reader died (BackupService.reap, from the onOpen hook).
    await this.domains.withDomain(domain, 'end an orphaned backup', async () => undefined);
  }

  async assertNoBackup(domain: string, what: string): Promise<void> {
    await this.domains.withDomain(domain, what, async (ctx) => this.engine.backups.assertNoJob(ctx, what));
  }

  // ---- instant restore ----

  async createOverlay(path: string, sizeBytes: number, zeroRanges: ReadonlyArray<{ offset: number; length: number }>): Promise<void> {
    await createZeroOverlay(path, sizeBytes, zeroRanges);
  }

  async withSession<T>(domain: string, what: string, fn: (s: DomainSession) => Promise<T>): Promise<T> {
    return this.domains.withDomain(domain, what, (ctx) => fn(this.engine.session(ctx)));
  }

  setLifecycleHooks(hooks: LifecycleHooks): void {
    this.engine.setLifecycleHooks(hooks);
  }
}

/** The driver's view of an engine pull job: per disk its export, dirty context and size. */
function pullBackupOf(job: JobInfo, checkpoint: string): PullBackup {
  const server = job.server;
  assert(server !== undefined, `pull job "${job.id}" has a server`);
  return {
    id: job.id,
    domain: job.domain,
    checkpoint,
    consistency: job.consistency ?? 'crash',
    server: server.transport === 'unix' ? { transport: 'unix', socket: server.socket } : { transport: 'tcp', host: server.host, port: server.port, tls: server.tls },
    disks: job.disks.map((d) => {
      const dirtyContext = d.mode === 'incremental' && d.tmpBitmap !== undefined ? `qemu:dirty-bitmap:${d.tmpBitmap}` : undefined;
      return { target: d.target, exportName: d.pull?.exportName ?? d.target, dirtyContext, virtualSize: d.virtualSize ?? 0, unchanged: job.unchanged };
    }),
  };
}
