// What the numbers were measured on: CPU, memory, kernel, QEMU and tool
// versions, KVM or TCG (asked of the running QEMU), the filesystem under the
// temporary directory, and the load average.

import { readFileSync } from 'node:fs';
import { availableParallelism, release, tmpdir, totalmem } from 'node:os';
import type { BenchEnv } from './env.js';
import { GiB, run } from './util.js';

export interface MachineInfo {
  nproc: number;
  memoryGiB: number;
  cpuModel: string;
  kernel: string;
  qemu: string;
  qemuImg: string;
  nbdcopy: string;
  node: string;
  accel: string;
  tmpFilesystem: string;
  /** Proactive reclaim that drops idle page cache (DAMON), when the kernel runs it. */
  reclaim: string | undefined;
}

export function loadAverage(): string {
  try {
    return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  } catch {
    return 'unknown';
  }
}

async function firstLine(command: string, args: readonly string[]): Promise<string> {
  try {
    const r = await run(command, args);
    return (r.stdout.trim() || r.stderr.trim()).split('\n')[0] ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/** DAMON's first scheme, when a kdamond runs: what it does to memory idle for how long. */
function damonReclaim(): string | undefined {
  const base = '/sys/kernel/mm/damon/admin/kdamonds/0';
  try {
    if (readFileSync(`${base}/state`, 'utf8').trim() !== 'on') return undefined;
    const ctx = `${base}/contexts/0`;
    const action = readFileSync(`${ctx}/schemes/0/action`, 'utf8').trim();
    const minAge = Number(readFileSync(`${ctx}/schemes/0/access_pattern/age/min`, 'utf8'));
    const aggrUs = Number(readFileSync(`${ctx}/monitoring_attrs/intervals/aggr_us`, 'utf8'));
    return `DAMON ${action} of memory not accessed for ${((minAge * aggrUs) / 1e6).toFixed(0)} s`;
  } catch {
    return undefined;
  }
}

export async function machineInfo(env: BenchEnv, domain: string): Promise<MachineInfo> {
  let cpuModel = 'unknown';
  try {
    cpuModel = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? 'unknown';
  } catch {
    // not Linux
  }
  let accel = 'unknown';
  try {
    const kvm = (await env.qb.domains.monitorCommand(domain, 'query-kvm')) as { enabled?: boolean; present?: boolean };
    accel = kvm.enabled === true ? 'KVM' : `TCG (KVM ${kvm.present === true ? 'present but not used' : 'not available'})`;
  } catch {
    // leave unknown
  }
  let tmpFilesystem = 'unknown';
  try {
    const df = await run('df', ['-hT', tmpdir()]);
    const cols = (df.stdout.trim().split('\n')[1] ?? '').split(/\s+/);
    tmpFilesystem = `${cols[1] ?? '?'} on ${cols[0] ?? '?'} (${tmpdir()}, ${cols[4] ?? '?'} free)`;
  } catch {
    // leave unknown
  }
  return {
    nproc: availableParallelism(),
    memoryGiB: Math.round((totalmem() / GiB) * 10) / 10,
    cpuModel,
    kernel: release(),
    qemu: await firstLine('qemu-system-x86_64', ['--version']),
    qemuImg: await firstLine('qemu-img', ['--version']),
    nbdcopy: await firstLine('nbdcopy', ['--version']),
    node: process.version,
    accel,
    tmpFilesystem,
    reclaim: damonReclaim(),
  };
}
