// §4 What a guest write costs with dirty bitmaps: no bitmap; our chain model
// with 1 and with 100 checkpoints (one recording bitmap either way); and the
// flat model libvirt uses, 100 bitmaps all recording (added by hand with QMP
// block-dirty-bitmap-add). Four domains, one per configuration, measured in
// turn within each repetition. Writes run inside QEMU through HMP qemu-io:
// one 64 MiB write, and a batch of many 4 KiB writes over one QMP connection
// (per write the bitmap work is largest relative to the I/O). Besides wall
// time, QEMU's own CPU time (from /proc/PID/stat) is recorded: it is what the
// bitmaps add (user time: the bitmap work; system time is the I/O). Last, the same
// configurations offline with `qemu-img bench`, which issues the writes in a
// loop without a monitor round trip per write.

import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { run } from './util.js';
import { hmpWrite, processCpuMs, type BenchEnv } from './env.js';
import { KiB, MiB, now } from './util.js';

export type WriteConfig = 'none' | 'chain-1' | 'chain-100' | 'flat-100';
export const WRITE_CONFIGS: readonly WriteConfig[] = ['none', 'chain-1', 'chain-100', 'flat-100'];

export interface WriteSamples {
  wallMs: number[];
  /** User CPU of QEMU (or qemu-img): the bitmap work is there; system time is the I/O, and noisy here. */
  qemuCpuMs: number[];
}

export interface WriteResults {
  diskBytes: number;
  smallWrites: number;
  benchWrites: number;
  big: Record<WriteConfig, WriteSamples>;
  small: Record<WriteConfig, WriteSamples>;
  /** qemu-img bench: wall time, and user+system CPU when /usr/bin/time is there. */
  offline: Record<WriteConfig, WriteSamples>;
}

const SMALL_BYTES = 4 * KiB;
const STRIDE_BYTES = 64 * KiB;

function empty(): Record<WriteConfig, WriteSamples> {
  return { none: { wallMs: [], qemuCpuMs: [] }, 'chain-1': { wallMs: [], qemuCpuMs: [] }, 'chain-100': { wallMs: [], qemuCpuMs: [] }, 'flat-100': { wallMs: [], qemuCpuMs: [] } };
}

export interface WriteSetup {
  env: BenchEnv;
  reps: number;
  diskBytes: number;
  smallWrites: number;
  benchWrites: number;
  log: (line: string) => void;
}

export async function benchWrites(s: WriteSetup): Promise<WriteResults> {
  const { env, reps, diskBytes, log } = s;
  const r: WriteResults = { diskBytes, smallWrites: s.smallWrites, benchWrites: s.benchWrites, big: empty(), small: empty(), offline: empty() };
  const domains: Record<WriteConfig, string> = { none: 'w-none', 'chain-1': 'w-chain1', 'chain-100': 'w-chain100', 'flat-100': 'w-flat100' };

  for (const cfg of WRITE_CONFIGS) {
    // preallocation=metadata: every write lands on an allocated cluster, so no qcow2 allocation cost varies between runs.
    const file = join(env.dir, `${domains[cfg]}.qcow2`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', file, String(diskBytes)]);
    await env.defineAndStart(domains[cfg], [{ target: 'sda', file }]);
  }
  await env.qb.checkpoints.create(domains['chain-1'], { name: 'c0' });
  for (let i = 0; i < 100; i++) await env.qb.checkpoints.create(domains['chain-100'], { name: `c${i}` });
  const flat = env.qb.domains.blockList(domains['flat-100']).find((d) => d.target === 'sda');
  if (flat === undefined) throw new Error('no disk sda on the flat-model domain');
  await env.withQmp(domains['flat-100'], async (qmp) => {
    for (let i = 0; i < 100; i++) await qmp.execute('block-dirty-bitmap-add', { node: flat.nodeName, name: `b${i}`, persistent: true });
  });
  log('  write domains ready (chain-1, chain-100 by checkpoint create; flat-100 by block-dirty-bitmap-add)');

  // Warm-up: every configuration writes its measured areas once.
  const slots = Math.floor(diskBytes / STRIDE_BYTES);
  for (const cfg of WRITE_CONFIGS) {
    await env.withQmp(domains[cfg], async (qmp) => {
      await hmpWrite(qmp, 'sda', 0, 64 * MiB, 1);
      for (let i = 0; i < Math.min(s.smallWrites, slots); i++) await hmpWrite(qmp, 'sda', i * STRIDE_BYTES, SMALL_BYTES, 1);
    });
  }

  for (let rep = 0; rep < reps; rep++) {
    for (const cfg of WRITE_CONFIGS) {
      const domain = domains[cfg];
      const pid = env.qb.domains.info(domain).pid ?? 0;
      await env.withQmp(domain, async (qmp) => {
        const userCpu = (): number => processCpuMs(pid, { userOnly: true });
        let cpu0 = userCpu();
        let t0 = now();
        await hmpWrite(qmp, 'sda', 0, 64 * MiB, 2 + rep);
        r.big[cfg].wallMs.push(now() - t0);
        r.big[cfg].qemuCpuMs.push(userCpu() - cpu0);

        cpu0 = userCpu();
        t0 = now();
        for (let i = 0; i < s.smallWrites; i++) await hmpWrite(qmp, 'sda', (i % slots) * STRIDE_BYTES, SMALL_BYTES, 3 + rep);
        r.small[cfg].wallMs.push(now() - t0);
        r.small[cfg].qemuCpuMs.push(userCpu() - cpu0);
      });
    }
    log(`  writes rep ${rep + 1}/${reps}: small batch ${WRITE_CONFIGS.map((c) => `${c} ${(r.small[c].wallMs.at(-1) ?? 0).toFixed(0)} ms`).join(', ')}`);
  }

  // Offline: the same bitmap states in image files, written by qemu-img bench.
  const base = join(env.dir, 'wbench-base.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', base, String(diskBytes)]);
  const images: Record<WriteConfig, string> = { none: '', 'chain-1': '', 'chain-100': '', 'flat-100': '' };
  for (const cfg of WRITE_CONFIGS) {
    images[cfg] = join(env.dir, `wbench-${cfg}.qcow2`);
    await run('cp', ['--sparse=always', base, images[cfg]]);
  }
  await run('qemu-img', ['bitmap', '--add', images['chain-1'], 'c0']);
  for (let i = 0; i < 100; i++) {
    // The chain leaves every older bitmap disabled and the newest recording.
    await run('qemu-img', ['bitmap', '--add', ...(i < 99 ? ['--disable'] : []), images['chain-100'], `c${i}`]);
    await run('qemu-img', ['bitmap', '--add', images['flat-100'], `b${i}`]);
  }
  const timeTool = existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined;
  for (let rep = 0; rep < reps; rep++) {
    for (const cfg of WRITE_CONFIGS) {
      const args = ['bench', '-q', '-w', '-c', String(s.benchWrites), '-s', String(SMALL_BYTES), '-S', String(STRIDE_BYTES), '-d', '1', '-f', 'qcow2', images[cfg]];
      if (timeTool !== undefined) {
        const res = await run(timeTool, ['-f', 'QBTIME %e %U', 'qemu-img', ...args]);
        const m = /QBTIME ([\d.]+) ([\d.]+)/.exec(res.stderr);
        r.offline[cfg].wallMs.push(m !== null ? Number(m[1]) * 1000 : res.ms);
        if (m !== null) r.offline[cfg].qemuCpuMs.push(Number(m[2]) * 1000);
      } else {
        r.offline[cfg].wallMs.push((await run('qemu-img', args)).ms);
      }
    }
    log(`  qemu-img bench rep ${rep + 1}/${reps}: ${WRITE_CONFIGS.map((c) => `${c} ${(r.offline[c].wallMs.at(-1) ?? 0).toFixed(0)} ms`).join(', ')}`);
  }
  return r;
}
