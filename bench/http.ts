// Benchmark of the daemon (run on its own: `npm run build && node
// dist/bench/http.js [--checkpoints N]`): API request latency for listing
// and for coverage on a domain with N checkpoints (default 1000, real
// bitmaps in a running QEMU), and the daemon's memory at rest (VmRSS of a
// `qbackup serve` process, after start and after the requests). The list is
// also measured with a commit by another process before each request, so
// the daemon makes its body again every time. It stands
// apart from bench/main.ts so it can run while that suite is reworked.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { Qbackup } from '../src/qbackup.js';
import { createImage } from '../src/image/qemu-img.js';

const root = resolve(fileURLToPath(import.meta.url), '..', '..', '..');

function rssMiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) / 1024;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}

async function timed(url: string, token: string, n: number, before?: () => void): Promise<{ medianMs: number; p95Ms: number; bytes: number }> {
  const times: number[] = [];
  let bytes = 0;
  for (let i = 0; i < n; i++) {
    before?.();
    const t0 = performance.now();
    const res = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
    const body = await res.text();
    times.push(performance.now() - t0);
    if (res.status !== 200) throw new Error(`${url}: ${res.status} ${body}`);
    bytes = body.length;
  }
  const sorted = [...times].sort((a, b) => a - b);
  return { medianMs: median(times), p95Ms: sorted[Math.floor(sorted.length * 0.95)] ?? NaN, bytes };
}

function serve(stateDir: string): Promise<{ pid: number; url: string; token: string; stop: () => void }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [join(root, 'bin', 'qbackup'), '--state-dir', stateDir, '--json', 'serve', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      try {
        const j = JSON.parse(out) as { url: string; bootstrapToken: { token: string } };
        resolvePromise({ pid: child.pid ?? 0, url: j.url, token: j.bootstrapToken.token, stop: () => child.kill('SIGTERM') });
      } catch {
        // not complete yet
      }
    });
    child.on('exit', (code) => reject(new Error(`qbackup serve exited with ${String(code)}`)));
  });
}

// Long: one linear script (set up, measure, print, clean up).
async function main(): Promise<void> {
  const n = Number(process.argv[process.argv.indexOf('--checkpoints') + 1] ?? '') || 1000;
  const dir = mkdtempSync(join(tmpdir(), 'qbbench-http-'));
  const stateDir = join(dir, 'state');
  const qb = Qbackup.open({ stateDir });
  let qemuPid: number | undefined;
  try {
    const image = join(dir, 'vm-sda.qcow2');
    await createImage(image, 'qcow2', 64 << 20);
    await qb.domains.define(`<domain type='kvm'><name>vm</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${image}'/><target dev='sda' bus='scsi'/></disk></devices></domain>`);
    qemuPid = (await qb.domains.start('vm', { paused: true })).pid;
    const t0 = performance.now();
    for (let i = 0; i < n; i++) await qb.checkpoints.create('vm', { name: `c${String(i).padStart(4, '0')}` });
    const createS = (performance.now() - t0) / 1000;
    // The same calls in-process (the library alone), for the daemon's ratio to them.
    const inProcess = async (fn: () => unknown): Promise<number> => {
      const times: number[] = [];
      for (let i = 0; i < 30; i++) {
        const t = performance.now();
        await fn();
        times.push(performance.now() - t);
      }
      return median(times);
    };
    const newest = `c${String(n - 1).padStart(4, '0')}`;
    const local = {
      list: await inProcess(() => qb.checkpoints.list('vm')),
      coverageOldest: await inProcess(() => qb.checkpoints.coverage('vm', 'c0000')),
      coverageNewest: await inProcess(() => qb.checkpoints.coverage('vm', newest)),
    };
    qb.close();
    const d = await serve(stateDir);
    try {
      await new Promise((r) => setTimeout(r, 1000));
      const rssStart = rssMiB(d.pid);
      const base = `${d.url}/api/domains/vm`;
      const list = await timed(`${base}/checkpoints`, d.token, 30);
      const domains = await timed(`${d.url}/api/domains?all=true`, d.token, 30);
      const coverageOldest = await timed(`${base}/checkpoints/c0000/coverage`, d.token, 30);
      const coverageNewest = await timed(`${base}/checkpoints/${newest}/coverage`, d.token, 30);
      // The daemon keeps the list's body until the metadata changes: a commit by
      // another process before each request (a row in a table the list does not
      // read) makes it list and serialize again, as after a real change.
      const other = new Database(join(stateDir, 'qbackup.db'));
      const bump = other.prepare("INSERT OR REPLACE INTO locks (domain, owner_pid, owner_token, command, acquired_ms) VALUES ('bench-other', 0, 'x', 'bench', 0)");
      const listRemade = await timed(`${base}/checkpoints`, d.token, 30, () => bump.run());
      other.prepare("DELETE FROM locks WHERE domain = 'bench-other'").run();
      other.close();
      await new Promise((r) => setTimeout(r, 1000));
      const rssAfter = rssMiB(d.pid);
      const row = (what: string, r: { medianMs: number; p95Ms: number; bytes: number }, localMs?: number): string =>
        `| ${what} | ${r.medianMs.toFixed(1)} | ${r.p95Ms.toFixed(1)} | ${(r.bytes / 1024).toFixed(0)} KiB | ${localMs === undefined ? '–' : `${localMs.toFixed(1)} (${(r.medianMs / localMs).toFixed(2)}×)`} |`;
      console.log(`${n} checkpoints created in ${createS.toFixed(1)} s (library, one at a time); load average ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}\n`);
      console.log('| request | median ms | p95 ms | response | in-process median ms (daemon ÷ in-process) |\n|---|---|---|---|---|');
      console.log(row(`GET /api/domains/vm/checkpoints (${n})`, list, local.list));
      console.log(row(`GET /api/domains/vm/checkpoints (${n}), after another process's commit (body made again)`, listRemade, local.list));
      console.log(row('GET /api/domains?all=true', domains));
      console.log(row('GET …/checkpoints/c0000/coverage (oldest)', coverageOldest, local.coverageOldest));
      console.log(row('GET …/checkpoints/newest/coverage', coverageNewest, local.coverageNewest));
      console.log(`\ndaemon memory at rest (VmRSS): ${rssStart.toFixed(0)} MiB after start, ${rssAfter.toFixed(0)} MiB after the requests`);
    } finally {
      d.stop();
    }
  } finally {
    qb.close();
    if (qemuPid !== undefined) {
      try {
        process.kill(qemuPid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
