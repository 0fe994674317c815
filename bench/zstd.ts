// zstd for chunks: the native zstd-napi module (src/repository/compress.ts)
// against the zstd that node:zlib has carried since Node.js 22.15 / 23.8, on
// the same 64 KiB chunks in one run, interleaved: compressing text-like data
// (level 1), the 4 KiB head probe that tells incompressible chunks apart, and
// decompressing with a bound. node:zlib would replace the native dependency
// only if it is at least as fast in each.
//
// `node dist/bench/zstd.js [--reps N] [--doc FILE | --no-doc]`

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import zlib from 'node:zlib';
import { ChunkCompressor } from '../src/repository/compress.js';
import { withSection } from './doc-sections.js';
import { loadAverage } from './machine.js';
import { fmtRatio, KiB, MiB, now, summarize } from './util.js';

const here = dirname(fileURLToPath(import.meta.url));
const CHUNK = 64 * KiB;
const PROBE = 4 * KiB;
const CHUNKS = 64;
const ROUNDS = 40;

/** Chunks like a guest's text files and logs: words, numbers, line breaks (zstd level 1 stores ~a third). */
function textChunk(): Buffer {
  const words = ['kernel', 'backup', 'qemu', 'libvirt', 'disk', 'block', 'chunk', 'index', 'pack', 'journal', 'error', 'ok'];
  const parts: string[] = [];
  let n = 0;
  while (n < CHUNK) {
    const w = `${words[Math.floor(Math.random() * words.length)]}${Math.random() < 0.1 ? '\n' : ' '}${Math.floor(Math.random() * 1000)} `;
    parts.push(w);
    n += w.length;
  }
  return Buffer.from(parts.join('').slice(0, CHUNK));
}

type Case = { name: string; napi: (b: Buffer) => number; zlib: (b: Buffer) => number; data: Buffer[]; bytesPerCall: number };

/** MiB/s of `f` over `data` (ROUNDS passes), counted in `bytesPerCall` units. */
function rate(f: (b: Buffer) => number, data: Buffer[], bytesPerCall: number): number {
  const t = now();
  let sink = 0;
  for (let r = 0; r < ROUNDS; r++) for (const b of data) sink += f(b);
  const ms = now() - t;
  if (sink < 0) throw new Error('unreachable');
  return (ROUNDS * data.length * bytesPerCall) / MiB / (ms / 1000);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { reps: { type: 'string', default: '5' }, doc: { type: 'string' }, 'no-doc': { type: 'boolean', default: false } }, strict: true });
  const reps = Math.max(1, Math.floor(Number(values.reps)));
  const loadStart = loadAverage();
  const ours = new ChunkCompressor(1);
  const level1 = { params: { [zlib.constants.ZSTD_c_compressionLevel]: 1 } };
  const text = Array.from({ length: CHUNKS }, textChunk);
  const random = Array.from({ length: CHUNKS }, () => randomBytes(CHUNK));
  const frames = text.map((b) => zlib.zstdCompressSync(b, level1));
  const cases: Case[] = [
    { name: 'compress 64 KiB text-like chunks (level 1)', napi: (b) => ours.compress(b)?.length ?? 0, zlib: (b) => zlib.zstdCompressSync(b, level1).length, data: text, bytesPerCall: CHUNK },
    { name: 'probe the 4 KiB head of random chunks', napi: (b) => ours.compress(b)?.length ?? 0, zlib: (b) => zlib.zstdCompressSync(b.subarray(0, PROBE), level1).length, data: random, bytesPerCall: PROBE },
    { name: 'decompress 64 KiB chunks, bounded', napi: (b) => ours.decompress(b, CHUNK, 'chunk').length, zlib: (b) => zlib.zstdDecompressSync(b, { maxOutputLength: CHUNK }).length, data: frames, bytesPerCall: CHUNK },
  ];
  // The random case through ChunkCompressor.compress stops at the probe: it compresses PROBE bytes per call, as zlib does here.
  const results = cases.map(() => ({ napi: [] as number[], zlib: [] as number[] }));
  for (let r = 0; r < reps; r++) {
    cases.forEach((c, i) => {
      const first = r % 2 === 0 ? 'napi' : 'zlib';
      for (const which of [first, first === 'napi' ? 'zlib' : 'napi'] as const) results[i]![which].push(rate(c[which], c.data, c.bytesPerCall));
    });
    process.stdout.write(`rep ${r + 1}/${reps}\n`);
  }
  const ratios = cases.map((_, i) => summarize(results[i]!.zlib).median / summarize(results[i]!.napi).median);
  const rows = cases.map((c, i) => `| ${c.name} | ${summarize(results[i]!.napi).median.toFixed(0)} MiB/s | ${summarize(results[i]!.zlib).median.toFixed(0)} MiB/s | ${fmtRatio(ratios[i]!)} |`);
  const slower = cases.filter((_, i) => ratios[i]! < 1).map((c) => c.name);
  const verdict =
    slower.length === 0
      ? 'node:zlib is at least as fast in every row: it can replace the native module.'
      : `zstd-napi stays: node:zlib is slower to ${slower.join(' and to ')} (its one-shot functions set up a zstd context on every call; the native module keeps one).`;
  const loadEnd = loadAverage();
  const section = [
    '## 15. zstd: the native module against node:zlib',
    '',
    `\`node dist/bench/zstd.js --reps ${reps}\` (bench/zstd.ts), ${new Date().toISOString()}, Node.js ${process.version}; load average ${loadStart} → ${loadEnd}.`,
    '',
    `${CHUNKS} chunks of 64 KiB each way, ${ROUNDS} passes per measurement, medians of ${reps} interleaved measurements;`,
    'zstd-napi through `ChunkCompressor` (one compression and one decompression context, reused), node:zlib through',
    '`zstdCompressSync` / `zstdDecompressSync` (a context per call). Throughput counts the bytes each call handles.',
    '',
    '| Work | zstd-napi | node:zlib | zlib ÷ napi |',
    '|---|---|---|---|',
    ...rows,
    '',
    'node:zlib would replace the native module only if it were at least as fast in every row (below 1.00× it is slower).',
    verdict,
  ].join('\n');
  process.stdout.write(`${section}\n`);
  if (!values['no-doc']) {
    const doc = resolve(values.doc ?? join(here, '..', '..', 'docs', 'benchmarks.md'));
    writeFileSync(doc, withSection(readFileSync(doc, 'utf8'), 'zstd', section));
    process.stdout.write(`wrote ${doc}\n`);
  }
}

await main();
