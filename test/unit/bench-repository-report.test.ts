// §5 of docs/benchmarks.md from given results (no QEMU): both methods'
// tables and targets, the side-by-side table, the restore order, the NBD
// client's CPU target, results of older runs (in-process only), and the
// section written between its markers with the rest of the document kept.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { withSection } from '../../bench/doc-sections.js';
import { repoSection, repoTargets } from '../../bench/report-repository.js';
import type { BackupSample, MethodSamples, RepoResults } from '../../bench/repository.js';

const MiB = 1024 * 1024;

function sample(ms: number): BackupSample {
  return { ms, cpuMs: ms / 2, qemuCpuMs: 100, bytesRead: 100 * MiB, growthBytes: 90 * MiB };
}

/** Two repetitions of every step by every tool; `k` scales every time. */
function samples(k: number, first: Array<'qcow2' | 'raw'> | undefined): MethodSamples {
  const tools = () => ({ qbackup: [sample(1000 * k), sample(1200 * k)], virtnbdbackup: [sample(2000 * k), sample(2000 * k)], restic: [sample(4000 * k), sample(4000 * k)] });
  const v = (ms: number) => [{ ms, cpuMs: ms, repoBytes: 90 * MiB }, { ms, cpuMs: ms, repoBytes: 90 * MiB }];
  return {
    backups: { full: tools(), spread: tools(), clustered: tools() },
    qbackupFullStoredBytes: [90 * MiB, 90 * MiB],
    emptyIncremental: { qbackup: [50 * k, 60 * k], virtnbdbackup: [1000 * k, 1000 * k] },
    restore: {
      ...(first !== undefined ? { firstFormat: first, cpuMs: { qbackupQcow2: [700 * k, 700 * k], qbackupRaw: [600 * k, 600 * k], virtnbdrestore: [1000 * k, 1000 * k], restic: [2000 * k, 2000 * k], convertQcow2: [300 * k, 300 * k], convertRaw: [300 * k, 300 * k] } } : {}),
      qbackupQcow2: [900 * k, 1100 * k], qbackupRaw: [800 * k, 800 * k], virtnbdrestore: [3000 * k, 3000 * k], restic: [3000 * k, 3000 * k], convertQcow2: [400 * k, 400 * k], convertRaw: [400 * k, 400 * k],
    },
    encryptedFull: [sample(1300 * k), sample(1300 * k)],
    verify: { qbackup: v(900 * k), qbackupEncrypted: v(1300 * k), restic: v(2600 * k) },
    restoreCheck: ['qbackup qcow2 vs qbackup raw: identical'],
  };
}

function results(withCli: boolean): RepoResults {
  return {
    ...samples(1, withCli ? ['qcow2', 'raw'] : undefined),
    ...(withCli ? { startedAt: '2026-12-07T00:00:00.000Z', durationMs: 60_000, methods: ['inprocess' as const, 'cli' as const], cli: { ...samples(2, ['qcow2', 'raw']), caches: 'dropped before each timed step of every tool' } } : {}),
    sizeBytes: 512 * MiB,
    randomBytes: 200 * MiB,
    compressibleBytes: 50 * MiB,
    dirtyBytes: 5 * MiB,
    reps: 2,
    peers: { virtnbdbackup: 'ran', restic: 'ran' },
    libvirt: 'the running libvirtd',
    versions: {},
    accel: 'TCG',
    fixedCosts: undefined,
    dedup: undefined,
    workers: { '1': [], '2': [] },
    breakdown: {
      dataBytes: 1024 * MiB,
      chunks: 16384,
      nbdReadMs: 500,
      ...(withCli ? { nbdReadCpuMs: 300, nbdcopyNullCpuMs: 400 } : {}),
      nbdcopyNullMs: 400,
      zeroCheckMs: 10,
      hashMs: 300,
      compressMs: 300,
      compressedBytes: 900 * MiB,
      packFinishMs: 200,
      packWriteMs: 300,
      packs: 60,
    },
    load: ['1.00 1.00 1.00', '1.00 1.00 1.00'],
  };
}

describe('§5 of the benchmarks document', () => {
  it('reports the CLI method with the same targets, on its own samples', () => {
    const r = results(true);
    const cli = r.cli;
    assert.ok(cli !== undefined);
    const full = repoTargets(r, cli).find((t) => t.what === 'Full backup time vs virtnbdbackup full (uncompressed)');
    // The CLI samples are twice the in-process ones for every tool: the same ratio (1100 ms vs 2000 ms, doubled).
    assert.equal(full?.measured, '0.55× (2.20 s vs 4.00 s)');
    assert.equal(full?.ok, true);
    const whats = repoTargets(r, cli).map((t) => t.what);
    assert.ok(whats.includes('Restore (qcow2) vs virtnbdrestore'));
    assert.ok(whats.includes('`verify --read-data` vs `restic check --read-data`'));
    assert.ok(!whats.some((w) => w.startsWith('Dedup') || w.includes('NBD pull client') || w.includes('bytes read')));
  });

  it("marks the NBD pull client's CPU per GiB against nbdcopy's", () => {
    const t = repoTargets(results(true)).find((x) => x.what.includes('NBD pull client'));
    assert.equal(t?.measured, '0.75× (300 ms/GiB vs 400 ms/GiB)');
    assert.equal(t?.ok, true);
  });

  it('writes both tables, the side-by-side table and the restore order', () => {
    const text = repoSection(results(true), 'npm run bench -- --peers --only repository');
    for (const part of ['**Targets (in-process)**', '### As a user runs it: the CLI, caches dropped', '**Targets (as a user runs it)**', '**Both methods side by side**', 'Page cache: dropped before each timed step of every tool']) {
      assert.ok(text.includes(part), part);
    }
    assert.ok(text.includes('This section comes from `npm run bench -- --peers --only repository` at 2026-12-07T00:00:00.000Z (1.0 minutes'));
    // qcow2 ran first in the first repetition (900 ms) and second in the other (1100 ms).
    assert.ok(text.includes('qcow2 900 ms (900 ms–900 ms) when it ran first (1×), 1.10 s (1.10 s–1.10 s) when second (1×)'));
    assert.ok(text.includes('| full: virtnbdbackup | 2.00 s | 4.00 s | 2.00× |'));
    // Restores with their CPU, in both methods' tables and side by side.
    assert.ok(text.includes('| virtnbdrestore → qcow2 | 3.00 s (3.00 s–3.00 s) | 1.00 s (1.00 s–1.00 s) | 7.50× |'));
    assert.ok(text.includes('| restore: restic | 3.00 s | 6.00 s | 2.00× | 2.00 s → 4.00 s |'));
  });

  it('still writes the results of an older run (in-process only)', () => {
    const text = repoSection(results(false));
    assert.ok(text.includes('**Targets (in-process)**'));
    assert.ok(!text.includes('As a user runs it'));
    assert.ok(!text.includes('when it ran first'));
    assert.ok(text.includes('| Method | Time | ÷ floor |'));
    assert.ok(!repoTargets(results(false)).some((t) => t.what.includes('NBD pull client')));
  });

  it('writes a run of the CLI method alone without empty in-process tables', () => {
    const r = results(true);
    const only: RepoResults = { ...r, ...samples(1, undefined), methods: ['cli'] };
    for (const step of ['full', 'spread', 'clustered'] as const) only.backups[step] = { qbackup: [], virtnbdbackup: [], restic: [] };
    const text = repoSection(only);
    assert.ok(text.includes('**Targets measured once per run**'));
    assert.ok(text.includes('**Targets (as a user runs it)**'));
    assert.ok(!text.includes('(in-process)'));
    assert.ok(!text.includes('Both methods side by side'));
    assert.deepEqual(
      repoTargets(only).map((t) => t.what),
      ["The NBD pull client's CPU per GiB vs nbdcopy's (the same export to null)"],
    );
  });

  it('replaces only what is between its markers', () => {
    const doc = 'before\n<!-- section:repository begin -->\nold §5\n<!-- section:repository end -->\nafter\n';
    const out = withSection(doc, 'repository', repoSection(results(true)));
    assert.ok(out.startsWith('before\n<!-- section:repository begin -->\n## 5. Repository'));
    assert.ok(out.endsWith('<!-- section:repository end -->\nafter\n'));
    assert.ok(!out.includes('old §5'));
  });
});
