// `npm run bench`: measures qbackup against QEMU's own tools on the same data
// in the same run, prints medians (min–max) and ratios, and writes
// docs/benchmarks.md. Performance is reported here, never asserted.
//
// Options: --size-gib N (default 4), --reps N (default 3), --quick (a small,
// fast run for development), --chain N (checkpoints in the long chain,
// default 1000), --only LIST (comma-separated sections: full, incremental,
// repository, control, writes, libvirt), --peers (the repository section also runs
// virtnbdbackup, with a libvirtd the bench starts and stops, and restic, and
// the libvirt section (bench/libvirt.ts) runs; without it, or without them
// installed, it says "skipped: …"),
// --method inprocess|cli|both (§5: qbackup's library in this process with warm
// caches, its command line as a user types it with the page cache dropped, or
// both in the same run; default both with --peers, else inprocess),
// --no-drop-caches (the cli method warms inputs instead of dropping the page
// cache; dropping needs root, and without it the section says so),
// --doc FILE (default docs/benchmarks.md; a run of only repository and
// libvirt replaces their sections, between their markers, in the document),
// --no-doc, --json FILE (the raw results, to regenerate the doc with
// --from-json FILE without measuring again).

import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { benchControl, type ControlResults } from './control.js';
import { BenchEnv, createRandomImage, halfDataLayout } from './env.js';
import { benchFull, type FullResults } from './full.js';
import { benchIncremental, type IncrementalCase } from './incremental.js';
import { benchLibvirt, formatLibvirt, type LibvirtResults } from './libvirt.js';
import { loadAverage, machineInfo } from './machine.js';
import { formatReport, printSummary, type BenchConfig, type BenchResults } from './report.js';
import { repoSection } from './report-repository.js';
import { keepMarkedSections, withSection } from './doc-sections.js';
import { benchRepository, METHODS, type Method, type RepoResults } from './repository.js';
import { GiB, MiB, now } from './util.js';
import { benchWrites, type WriteResults } from './writes.js';

const SECTIONS = ['full', 'incremental', 'repository', 'control', 'writes', 'libvirt'] as const;
type Section = (typeof SECTIONS)[number];

interface Options extends BenchConfig {
  only: Set<Section>;
  methods: Method[];
  dropCaches: boolean;
  doc: string | undefined;
  json: string | undefined;
  fromJson: string | undefined;
}

function parseOptions(argv: readonly string[]): Options {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      'size-gib': { type: 'string' },
      reps: { type: 'string' },
      quick: { type: 'boolean', default: false },
      peers: { type: 'boolean', default: false },
      chain: { type: 'string' },
      only: { type: 'string' },
      method: { type: 'string' },
      'no-drop-caches': { type: 'boolean', default: false },
      doc: { type: 'string' },
      'no-doc': { type: 'boolean', default: false },
      json: { type: 'string' },
      'from-json': { type: 'string' },
    },
    strict: true,
  });
  const quick = values.quick === true;
  const num = (v: string | undefined, dflt: number, what: string): number => {
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${what} needs a positive number, got "${v}"`);
    return n;
  };
  const sizeGiB = num(values['size-gib'], quick ? 0.25 : 4, 'size-gib');
  const only = new Set<Section>();
  for (const s of (values.only ?? SECTIONS.join(',')).split(',')) {
    if (!(SECTIONS as readonly string[]).includes(s)) throw new Error(`--only: unknown section "${s}" (sections: ${SECTIONS.join(', ')})`);
    only.add(s as Section);
  }
  const peers = values.peers === true;
  const method = values.method ?? (peers ? 'both' : 'inprocess');
  if (method !== 'both' && !(METHODS as readonly string[]).includes(method)) throw new Error(`--method: unknown method "${method}" (methods: inprocess, cli, both)`);
  const methods = method === 'both' ? [...METHODS] : [method as Method];
  const here = dirname(fileURLToPath(import.meta.url));
  const defaultDoc = resolve(here, '..', '..', 'docs', 'benchmarks.md');
  return {
    quick,
    peers,
    sizeBytes: Math.round((sizeGiB * GiB) / MiB) * MiB,
    reps: Math.round(num(values.reps, quick ? 2 : 3, 'reps')),
    chainLength: Math.round(num(values.chain, quick ? 100 : 1000, 'chain')),
    controlSamples: quick ? 10 : 20,
    writeDiskBytes: (quick ? 256 : 512) * MiB,
    smallWrites: quick ? 500 : 2000,
    benchWrites: quick ? 20_000 : 200_000,
    argv: [...argv],
    only,
    methods,
    dropCaches: values['no-drop-caches'] !== true,
    doc: values['no-doc'] === true ? undefined : resolve(values.doc ?? defaultDoc),
    json: values.json !== undefined ? resolve(values.json) : undefined,
    fromJson: values['from-json'] !== undefined ? resolve(values['from-json']) : undefined,
  };
}

async function main(): Promise<void> {
  const config = parseOptions(process.argv.slice(2));
  const log = (line: string): void => {
    process.stdout.write(`${line}\n`);
  };
  if (config.fromJson !== undefined) {
    const saved = JSON.parse(readFileSync(config.fromJson, 'utf8')) as BenchResults;
    printSummary(saved, log);
    if (config.doc !== undefined) {
      writeDoc(config.doc, saved);
      log(`wrote ${config.doc}`);
    }
    return;
  }
  const loadStart = loadAverage();
  const startedAt = new Date();
  const t0 = now();
  const env = new BenchEnv();
  // Interrupted: stop the QEMUs this run started and remove its files before exiting.
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      log(`${signal}: cleaning up`);
      void env.cleanup().finally(() => process.exit(130));
    });
  }
  // A promise that never settles with nothing else pending would end the process without the finally below
  // (leaving QEMUs running): clean up and say so instead.
  let finished = false;
  process.once('beforeExit', () => {
    if (finished) return;
    log('bench stopped: it was waiting for something that can no longer happen (a bug in the bench); cleaning up');
    process.exitCode = 1;
    void env.cleanup();
  });
  log(`qbackup bench: ${config.sizeBytes / GiB} GiB disk, ${config.reps} repetitions${config.quick ? ' (quick)' : ''}; load average ${loadStart}; work dir ${env.dir}`);
  let full: FullResults | undefined;
  let incremental: IncrementalCase[] | undefined;
  let repository: RepoResults | undefined;
  let control: ControlResults | undefined;
  let writes: WriteResults | undefined;
  let libvirt: LibvirtResults | undefined;
  try {
    const domain = 'bench';
    const layout = halfDataLayout(config.sizeBytes, 7);
    const source = env.path('bench-sda.qcow2');
    log(`creating the source disk: ${(layout.dataBytes / MiB).toFixed(0)} MiB of random data in ${layout.extents.length} extents`);
    await createRandomImage(source, layout);
    await env.defineAndStart(domain, [{ target: 'sda', file: source }]);
    const machine = await machineInfo(env, domain);
    log(`machine: ${machine.nproc} CPUs (${machine.cpuModel}), ${machine.memoryGiB} GiB, kernel ${machine.kernel}, ${machine.qemu}, ${machine.accel}`);

    if (config.only.has('full')) {
      log('§1 full backup');
      full = await benchFull({ env, domain, source, sizeBytes: config.sizeBytes, reps: config.reps, log });
    }
    if (config.only.has('incremental')) {
      log('§2 incremental backup');
      incremental = await benchIncremental({ env, domain, device: 'sda', sizeBytes: config.sizeBytes, reps: config.reps, fractions: [0.001, 0.01, 0.1], log });
    }
    if (config.only.has('repository')) {
      log(`§5 repository against virtnbdbackup and restic (${config.methods.join(' and ')})${config.peers ? '' : ' (skipped: the peers; run with --peers)'}`);
      repository = await benchRepository({
        env,
        sizeBytes: config.sizeBytes,
        reps: config.reps,
        peers: config.peers,
        accel: machine.accel === 'KVM' ? 'kvm' : 'qemu',
        methods: config.methods,
        dropCaches: config.dropCaches,
        log,
      });
    }
    if (config.only.has('control')) {
      log(`§3 control plane (chain of ${config.chainLength})`);
      control = await benchControl({ env, chainLength: config.chainLength, bigDomain: domain, samples: config.controlSamples, log });
    }
    if (config.only.has('writes')) {
      log('§4 guest write cost with bitmaps');
      writes = await benchWrites({ env, reps: config.reps, diskBytes: config.writeDiskBytes, smallWrites: config.smallWrites, benchWrites: config.benchWrites, log });
    }
    if (config.only.has('libvirt') && config.peers) {
      log('§12 libvirt domains: qbackup (libvirt driver) against virtnbdbackup');
      libvirt = await benchLibvirt({ sizeBytes: config.sizeBytes, reps: config.reps, log });
    }
    const results: BenchResults = {
      config,
      machine,
      layout: { sizeBytes: layout.sizeBytes, dataBytes: layout.dataBytes, extents: layout.extents.length },
      startedAt: startedAt.toISOString(),
      durationMs: 0,
      loadStart,
      loadEnd: '',
      ...(full !== undefined ? { full } : {}),
      ...(incremental !== undefined ? { incremental } : {}),
      ...(repository !== undefined ? { repository } : {}),
      ...(control !== undefined ? { control } : {}),
      ...(writes !== undefined ? { writes } : {}),
      ...(libvirt !== undefined ? { libvirt } : {}),
    };
    results.loadEnd = loadAverage();
    results.durationMs = now() - t0;
    printSummary(results, log);
    if (config.json !== undefined) {
      writeFileSync(config.json, `${JSON.stringify(results, null, 1)}\n`);
      log(`wrote ${config.json}`);
    }
    if (config.doc !== undefined) {
      writeDoc(config.doc, results);
      log(`wrote ${config.doc}`);
    }
  } finally {
    finished = true;
    await env.cleanup();
  }
}

/**
 * Writes the document: the whole report, keeping the other benches' marked
 * sections; or, when this run measured only the repository (§5) and libvirt
 * (§12) sections, just those between their markers in the existing document.
 */
function writeDoc(doc: string, results: BenchResults): void {
  const onlyMarked = results.full === undefined && results.incremental === undefined && results.control === undefined && results.writes === undefined;
  if (onlyMarked && existsSync(doc)) {
    let text = readFileSync(doc, 'utf8');
    if (results.repository !== undefined) text = withSection(text, 'repository', repoSection(results.repository, `npm run bench -- ${results.config.argv.join(' ')}`));
    text = withLibvirt(text, results, results.config.argv);
    writeFileSync(doc, text);
    return;
  }
  writeFileSync(doc, keepMarkedSections(doc, withLibvirt(formatReport(results), results, results.config.argv)));
}

/** The report with the libvirt section (§12) of this run, when it ran. */
function withLibvirt(report: string, results: BenchResults, argv: readonly string[]): string {
  if (results.libvirt === undefined) return report;
  return withSection(report, 'libvirt', formatLibvirt(results.libvirt, `npm run bench -- ${argv.join(' ')}`));
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exitCode = 1;
});
