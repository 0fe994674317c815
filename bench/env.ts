// The benchmark's environment: one temporary directory holding the state
// directory, images, repository and outputs; one Qbackup instance; domains
// defined with plain libvirt XML; guest writes over one QMP connection; and
// cleanup that stops every QEMU and qemu-nbd it started by pid and removes
// the directory.

import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackendSettings } from '../src/repository/backend/open.js';
import { Qbackup } from '../src/qbackup.js';
import type { QmpClient } from '../src/qmp/index.js';
import { KiB, MiB, Prng, run, sleep } from './util.js';

export const CLUSTER_BYTES = 64 * KiB;

export interface DataLayout {
  sizeBytes: number;
  /** Data extents (offset, length), cluster-aligned, in offset order. */
  extents: Array<{ offset: number; length: number }>;
  dataBytes: number;
}

export class BenchEnv {
  readonly dir: string;
  readonly stateDir: string;
  readonly qb: Qbackup;
  private readonly domainNames: string[] = [];
  private cleaned = false;
  private readonly cleanups: Array<() => Promise<void>> = [];

  /** `backends`: how the library reaches s3:// repositories (the S3 bench). */
  constructor(backends?: BackendSettings) {
    this.dir = mkdtempSync(join(tmpdir(), 'qbbench-'));
    this.stateDir = join(this.dir, 'state');
    this.qb = Qbackup.open({ stateDir: this.stateDir, lockTimeoutMs: 60_000, ...(backends !== undefined ? { backends } : {}) });
  }

  path(...parts: string[]): string {
    return join(this.dir, ...parts);
  }

  subdir(name: string): string {
    const d = this.path(name);
    mkdirSync(d, { recursive: true });
    return d;
  }

  async defineAndStart(name: string, disks: ReadonlyArray<{ target: string; file: string }>): Promise<void> {
    const diskXml = disks
      .map(
        (d) => `    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${d.file}'/>
      <target dev='${d.target}' bus='scsi'/>
    </disk>`,
      )
      .join('\n');
    await this.qb.domains.define(`<domain type='kvm'>
  <name>${name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <devices>
${diskXml}
  </devices>
</domain>
`);
    this.domainNames.push(name);
    await this.qb.domains.start(name);
    await this.waitGuestIdle(name);
  }

  /**
   * Without an OS the guest firmware keeps a vCPU busy for a few seconds
   * after start (boot attempts) before it halts; on a 2-CPU machine that
   * would distort whatever is measured next. Waits until QEMU uses less than
   * 10 % of a CPU, at most 30 s.
   */
  async waitGuestIdle(name: string): Promise<void> {
    const pid = this.qb.domains.info(name).pid;
    if (pid !== undefined) await waitProcessIdle(pid);
  }

  /** Runs `fn` in cleanup(), before the domains stop (last added, first run). */
  onCleanup(fn: () => Promise<void>): void {
    this.cleanups.unshift(fn);
  }

  /** Runs `fn` with one QMP connection to the domain (holding its lock), e.g. for many guest writes. */
  async withQmp<T>(domain: string, fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    return this.qb.domains.withDomain(domain, 'bench', (ctx) => this.qb.domains.withQmp(ctx, 'bench', fn));
  }

  /** Stops every domain this run defined (SIGKILL by pid when destroy fails) and removes the directory. Idempotent. */
  async cleanup(): Promise<void> {
    if (this.cleaned) return;
    this.cleaned = true;
    try {
      for (const fn of this.cleanups) {
        try {
          await fn();
        } catch (err) {
          process.stderr.write(`cleanup: ${err instanceof Error ? err.message : String(err)}\n`);
        }
      }
      for (const name of this.domainNames) {
        const info = this.qb.domains.list({ all: true }).find((d) => d.name === name);
        if (info?.state !== 'running') continue;
        try {
          await this.qb.domains.destroy(name);
        } catch {
          if (info.pid !== undefined) {
            try {
              process.kill(info.pid, 'SIGKILL');
            } catch {
              // already gone
            }
          }
        }
      }
    } finally {
      this.qb.close();
      rmSync(this.dir, { recursive: true, force: true });
    }
  }
}

/**
 * A layout with about half of the clusters holding data: runs of 1–32
 * clusters, each a data run or a hole with equal probability, so data and
 * holes are scattered over the whole disk.
 */
export function halfDataLayout(sizeBytes: number, seed: number): DataLayout {
  const prng = new Prng(seed);
  const clusters = Math.floor(sizeBytes / CLUSTER_BYTES);
  const extents: DataLayout['extents'] = [];
  let dataBytes = 0;
  for (let c = 0; c < clusters; ) {
    const run = Math.min(prng.int(1, 32), clusters - c);
    if (prng.next() < 0.5) {
      const last = extents.at(-1);
      const offset = c * CLUSTER_BYTES;
      if (last !== undefined && last.offset + last.length === offset) last.length += run * CLUSTER_BYTES;
      else extents.push({ offset, length: run * CLUSTER_BYTES });
      dataBytes += run * CLUSTER_BYTES;
    }
    c += run;
  }
  return { sizeBytes, extents, dataBytes };
}

/**
 * Writes the layout's data extents with random bytes into a sparse raw file,
 * then converts it to qcow2 (holes stay unallocated) and removes the raw file.
 */
export async function createRandomImage(file: string, layout: DataLayout): Promise<void> {
  const raw = `${file}.raw`;
  const fd = openSync(raw, 'w');
  try {
    ftruncateSync(fd, layout.sizeBytes);
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (const e of layout.extents) {
      for (let pos = e.offset; pos < e.offset + e.length; pos += buf.length) {
        const n = Math.min(buf.length, e.offset + e.length - pos);
        randomFillSync(buf, 0, n);
        writeSync(fd, buf, 0, n, pos);
      }
    }
  } finally {
    closeSync(fd);
  }
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, file]);
  rmSync(raw, { force: true });
}

/** Writes a pattern into the guest disk as the guest would (HMP qemu-io), over an open QMP connection. */
export async function hmpWrite(qmp: QmpClient, device: string, offset: number, length: number, pattern = 0xcd): Promise<void> {
  const out = await qmp.humanMonitorCommand(`qemu-io -d ${device} "write -q -P ${pattern} ${offset} ${length}"`);
  if (/error|failed/i.test(out)) throw new Error(`qemu-io write failed: ${out}`);
}

/** Reads a file once, so that every method timed after it finds it in the page cache. */
export function warmFile(file: string): void {
  const fd = openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 * MiB);
    for (let pos = 0; ; ) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) break;
      pos += n;
    }
  } finally {
    closeSync(fd);
  }
}

/** Waits until a process uses less than 10 % of a CPU (a guest without an OS halts after its firmware gives up booting), at most 30 s. */
export async function waitProcessIdle(pid: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  let last = processCpuMs(pid);
  while (Date.now() < deadline) {
    await sleep(500);
    const cpu = processCpuMs(pid);
    if (cpu - last < 50) return;
    last = cpu;
  }
}

/** USER_HZ, the unit of /proc/PID/stat times (100 on Linux everywhere that matters). */
const CLOCK_TICKS = 100;

/** User + system (or with `userOnly`, user) CPU time of a process so far, in ms (from /proc/PID/stat; 10 ms resolution). */
export function processCpuMs(pid: number, options: { userOnly?: boolean } = {}): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces) start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + (options.userOnly === true ? 0 : Number(fields[12]));
  return (ticks * 1000) / CLOCK_TICKS;
}
