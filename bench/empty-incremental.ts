// The fixed cost of a backup: an in-process incremental with nothing dirty
// (`repository.backup` of a running domain of ours into a local repository
// that already holds its full backup), with the pack indexes read from the
// repository (the process's index cache emptied first, as in a process that
// never opened the repository: the cost before the cache) and from the cache
// (as in the daemon, or the second backup of a process), interleaved in one
// run. Also the index load alone, both ways, and the CLI's start-up against
// `node -e 0`.
//
// `node dist/bench/empty-incremental.js [--size-mib N] [--reps N] [--doc FILE | --no-doc]`

import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { LocalBackend } from '../src/repository/backend/local.js';
import { clearPackIndexCache } from '../src/repository/index-cache.js';
import { Store } from '../src/repository/store.js';
import { withSection } from './doc-sections.js';
import { BenchEnv, createRandomImage, halfDataLayout } from './env.js';
import { loadAverage } from './machine.js';
import { fmtBytes, fmtMs, fmtSummaryMs, MiB, now, run, summarize } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { 'size-mib': { type: 'string', default: '1024' }, reps: { type: 'string', default: '10' }, doc: { type: 'string' }, 'no-doc': { type: 'boolean', default: false } }, strict: true });
  const sizeBytes = Number(values['size-mib']) * MiB;
  const reps = Math.max(1, Math.floor(Number(values.reps)));
  const log = (line: string): void => void process.stdout.write(`${line}\n`);
  const loadStart = loadAverage();
  const env = new BenchEnv();
  const res = { cold: [] as number[], warm: [] as number[], loadCold: [] as number[], loadWarm: [] as number[], cliStart: [] as number[], nodeStart: [] as number[], packs: 0, chunks: 0, dataBytes: 0 };
  try {
    const layout = halfDataLayout(sizeBytes, 5);
    res.dataBytes = layout.dataBytes;
    const image = env.path('sda.qcow2');
    await createRandomImage(image, layout);
    await env.defineAndStart('ei', [{ target: 'sda', file: image }]);
    const repo = env.path('repo');
    log(`full backup of ${fmtBytes(layout.dataBytes)} of data`);
    await env.qb.repository.backup('ei', { repo });
    const backend = new LocalBackend(repo);
    for (let i = 0; i < reps; i++) {
      for (const mode of i % 2 === 0 ? (['cold', 'warm'] as const) : (['warm', 'cold'] as const)) {
        if (mode === 'cold') clearPackIndexCache();
        const t0 = now();
        const m = await env.qb.repository.backup('ei', { repo });
        res[mode].push(now() - t0);
        if (m.disks.some((d) => d.level !== 'incremental' || d.bytesRead !== 0)) throw new Error(`backup ${m.id} was not an empty incremental`);
      }
      for (const mode of ['loadCold', 'loadWarm'] as const) {
        if (mode === 'loadCold') clearPackIndexCache();
        const t0 = now();
        const store = await Store.open(backend);
        await store.loadChunks();
        res[mode].push(now() - t0);
        res.chunks = store.chunkCount;
      }
      const bin = resolve(here, '..', '..', 'bin', 'qbackup');
      res.cliStart.push((await run('node', [bin, '--version'])).ms);
      res.nodeStart.push((await run('node', ['-e', '0'])).ms);
      log(`  rep ${i + 1}/${reps}: cold ${fmtMs(res.cold.at(-1) ?? NaN)}, warm ${fmtMs(res.warm.at(-1) ?? NaN)}; index load cold ${fmtMs(res.loadCold.at(-1) ?? NaN)}, warm ${fmtMs(res.loadWarm.at(-1) ?? NaN)}; qbackup --version ${fmtMs(res.cliStart.at(-1) ?? NaN)}, node -e 0 ${fmtMs(res.nodeStart.at(-1) ?? NaN)}`);
    }
    res.packs = (await backend.list('index/')).length;
  } finally {
    await env.cleanup();
  }
  const s = (xs: number[]): string => fmtSummaryMs(summarize(xs));
  const ratio = (a: number[], b: number[]): string => `${(summarize(a).median / summarize(b).median).toFixed(2)}×`;
  const section = [
    '## 13. The fixed cost of a backup, and the CLI\'s start-up',
    '',
    `\`node dist/bench/empty-incremental.js --size-mib ${values['size-mib'] ?? ''} --reps ${reps}\` (bench/empty-incremental.ts), ${new Date().toISOString()}: a ${fmtBytes(sizeBytes)} disk with ${fmtBytes(res.dataBytes)} of random data, its full backup in a local repository (${res.packs} packs, ${res.chunks} chunks), then in-process incrementals with nothing dirty (\`repository.backup\` of our own running domain), "cold" with the process's pack-index cache emptied first (every index read, as before the cache and in a new process), "warm" from the cache (as in the daemon), interleaved; median (min–max) of ${reps}. Load average of the 2-core machine, shared with other work: start ${loadStart}, end ${loadAverage()}.`,
    '',
    '| What | Cold (indexes read) | Warm (cached) | Warm ÷ cold | Target |',
    '|---|---|---|---|---|',
    `| incremental, nothing dirty | ${s(res.cold)} | ${s(res.warm)} | ${ratio(res.warm, res.cold)} | ≤ 100 ms in-process: ${summarize(res.warm).median <= 100 ? 'met' : '**not met**'} |`,
    `| open + load the pack indexes alone | ${s(res.loadCold)} | ${s(res.loadWarm)} | ${ratio(res.loadWarm, res.loadCold)} | |`,
    '',
    '| CLI start-up | Time | ÷ `node -e 0` | Target |',
    '|---|---|---|---|',
    `| \`qbackup --version\` | ${s(res.cliStart)} | ${ratio(res.cliStart, res.nodeStart)} | ≤ 1.5×: ${summarize(res.cliStart).median <= 1.5 * summarize(res.nodeStart).median ? 'met' : '**not met**'} |`,
    `| \`node -e 0\` | ${s(res.nodeStart)} | 1.00× | |`,
  ].join('\n');
  log(section);
  if (values['no-doc'] !== true) {
    const doc = resolve(values.doc ?? join(here, '..', '..', 'docs', 'benchmarks.md'));
    writeFileSync(doc, withSection(readFileSync(doc, 'utf8'), 'fixed-cost', section));
    log(`wrote ${doc}`);
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
