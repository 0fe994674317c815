// The oracle's driver in libvirt mode: the same model and checks as driver.ts,
// against a domain the real libvirtd runs, backed up through qbackup's
// libvirt driver (`connect: qemu:///system`). What libvirt supports is done
// the way its users do it: guest writes by HMP qemu-io through libvirt's
// monitor passthrough, restart (graceful destroy, start paused), the
// repository's checkpoint deleted by an admin (virsh checkpoint-delete), a
// grow with libvirt's block resize, hot-plug and unplug (live and in the
// definition), and the repository's own actions (backup, prune, gc, verify,
// restore). Other kinds are refused: the libvirt generator never makes them.
//
// Checked after every action besides the action's own checks: libvirt's
// checkpoints are exactly the model's (one qb- checkpoint, the latest
// backup's, or none after an admin deleted it) and no job is left on the
// domain.

import { chmodSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { LIBVIRT, LibvirtClient, type LibvirtDomainRef } from '../../src/drivers/libvirt/index.js';
import { createImage } from '../../src/image/qemu-img.js';
import { diskAlias, removeTestDomain, testDiskXml, testDomainName, testDomainXml, virsh } from '../helpers/libvirt.js';
import type { Action } from './actions.js';
import { checkCheckpoints, fail } from './checks.js';
import { Driver, type Outcome } from './driver.js';
import type { DiskModel, DiskSpec } from './model.js';

/** discard='unmap': a guest's discard reaches the image (libvirt's default ignores it), as the model expects. */
const DISCARD = { discard: 'unmap' } as const;

export class LibvirtOracleDriver extends Driver {
  private client: LibvirtClient | undefined;
  private dom: LibvirtDomainRef | undefined;
  /** QEMU's device id (libvirt's alias) of each attached target, read from the live XML when needed. */
  private readonly aliases = new Map<string, string>();

  constructor(
    dir: string,
    log: (line: string) => void,
    private readonly uri: string,
  ) {
    super(dir, log, { connect: uri, domain: testDomainName('fz') });
    this.model.latestCheckpointOnly = true;
  }

  private get c(): LibvirtClient {
    return this.client ?? fail('error', 'the libvirt domain was not set up');
  }

  private get d(): LibvirtDomainRef {
    return this.dom ?? fail('error', 'the libvirt domain was not set up');
  }

  /** Defines and starts (paused) a TCG domain with the scenario's disks; the images live where libvirt's QEMU user can reach them. */
  override async setup(disks: readonly DiskSpec[]): Promise<void> {
    chmodSync(this.dir, 0o755);
    mkdirSync(join(this.dir, 'repofs'), { recursive: true });
    this.client = await LibvirtClient.connect(this.uri);
    for (const spec of disks) {
      await createImage(this.file(spec.name), 'qcow2', spec.sizeBytes, { clusterSizeBytes: spec.clusterSizeBytes });
      this.model.attach(this.model.addDisk(spec));
    }
    const testDisks = this.model.attached().map((d) => ({ target: d.target ?? '', file: this.file(d.name) }));
    const xml = testDomainXml(this.domain, testDisks, DISCARD);
    this.dom = await this.c.create(await this.c.defineXml(xml), LIBVIRT.VIR_DOMAIN_START_PAUSED);
  }

  private diskXml(d: DiskModel, target: string): string {
    return testDiskXml({ target, file: this.file(d.name) }, DISCARD);
  }

  override async close(keep: boolean): Promise<void> {
    if (this.client !== undefined) {
      await removeTestDomain(this.client, this.domain).catch(() => undefined);
      await this.client.close();
    }
    this.qb.close();
    await this.qb.driver.close?.();
    if (!keep) rmSync(this.dir, { recursive: true, force: true });
  }

  override async execute(a: Action): Promise<Outcome> {
    const outcome = await this.dispatch(a);
    checkCheckpoints(this.model, await this.libvirtCheckpoints());
    const job = await this.c.getJobStats(this.d);
    if (job.type !== LIBVIRT.VIR_DOMAIN_JOB_NONE) fail('job', `a job (type ${job.type}) is left on the domain after the action`);
    return outcome;
  }

  /** libvirt's checkpoints of the domain, by model name. */
  private async libvirtCheckpoints(): Promise<string[]> {
    const byReal = new Map([...this.real].map(([m, r]) => [r, m]));
    return (await this.c.listAllCheckpoints(this.d)).map((cp) => byReal.get(cp.name) ?? cp.name);
  }

  protected override async dispatch(a: Action): Promise<Outcome> {
    switch (a.kind) {
      case 'write':
      case 'zero':
      case 'discard':
      case 'repo':
      case 'repo-prune':
      case 'repo-gc':
      case 'repo-verify':
      case 'repo-restore':
        return super.dispatch(a);
      case 'delete':
        if (this.model.checkpoint(a.name) === undefined) return 'skipped';
        // an admin, with libvirt's own tool
        await virsh(['checkpoint-delete', this.domain, this.realName(a.name)]);
        this.model.deleteCheckpoint(a.name, false);
        return 'done';
      case 'restart':
        await this.c.destroy(this.d, LIBVIRT.VIR_DOMAIN_DESTROY_GRACEFUL);
        this.dom = await this.c.create(this.d, LIBVIRT.VIR_DOMAIN_START_PAUSED);
        this.aliases.clear();
        return 'done';
      case 'resize':
        return this.grow(a.disk, a.size);
      case 'attach':
        return this.hotPlug(a.disk, a.size, a.cluster);
      case 'detach':
        return this.unplug(a.disk);
      default:
        return fail('error', `action ${a.kind} is not one the libvirt mode does`);
    }
  }

  protected override async hmp(target: string, cmd: string): Promise<void> {
    let alias = this.aliases.get(target);
    if (alias === undefined) {
      alias = diskAlias(await this.c.getXmlDesc(this.d), target);
      this.aliases.set(target, alias);
    }
    const out = await this.c.qemuMonitorCommand(this.d, `qemu-io -d ${alias} "${cmd}"`, LIBVIRT.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP);
    if (/error|failed/i.test(out)) fail('error', `qemu-io "${cmd}" on ${target} through libvirt: ${out.trim()}`);
  }

  /** virsh blockresize, as an admin grows a disk (libvirt 9.0 grows only). */
  private async grow(disk: string, size: number): Promise<Outcome> {
    const d = this.model.disk(disk);
    if (d?.target === undefined || size <= d.sizeBytes) return 'skipped';
    this.log(`    grow ${d.target} from ${d.sizeBytes} to ${size} bytes`);
    await this.c.blockResize(this.d, d.target, BigInt(size));
    this.model.resize(d, size);
    return 'done';
  }

  private async hotPlug(disk: string, size: number, cluster: number): Promise<Outcome> {
    if (this.model.disk(disk) !== undefined) return 'skipped';
    await createImage(this.file(disk), 'qcow2', size, { clusterSizeBytes: cluster });
    const d = this.model.addDisk({ name: disk, sizeBytes: size, clusterSizeBytes: cluster });
    const target = this.model.freeTarget();
    this.log(`    attach ${d.name} as ${target}`);
    await this.c.attachDevice(this.d, this.diskXml(d, target), LIBVIRT.VIR_DOMAIN_AFFECT_LIVE | LIBVIRT.VIR_DOMAIN_AFFECT_CONFIG);
    this.model.attach(d);
    return 'done';
  }

  private async unplug(disk: string): Promise<Outcome> {
    const d = this.model.disk(disk);
    if (d?.target === undefined || this.model.attached().length <= 1) return 'skipped';
    await this.c.detachDevice(this.d, this.diskXml(d, d.target), LIBVIRT.VIR_DOMAIN_AFFECT_LIVE | LIBVIRT.VIR_DOMAIN_AFFECT_CONFIG);
    this.aliases.delete(d.target);
    this.model.detach(d);
    return 'done';
  }
}
