// The kill -9 and corruption soak of the repository (docs/testing.md, "The
// repository soak"), against real QEMU and the CLI in subprocesses.
//
// Kills: each operation (backup, prune, gc, copy) is run with
// QBACKUP_CRASH_AT=repo-write:N for N = 1, 2, … (the process kills itself just
// before its N-th repository write or delete: src/repository/backend/
// faulting.ts) until a run completes; instant restore is killed at each named
// step of its begin and server start (instant-restore:*). After every kill:
// every listed backup is one whose bytes the soak knows and nothing that was
// listed and must stay is gone; the newest and every newly listed backup
// restore byte for byte; after each operation completes every listed backup
// restores and `verify --read-data` passes. An instant restore killed at any
// step is settled by the next command (start, domjobinfo, or the restore run
// again), its copy completes with the backup's bytes, and no backup server
// outlives its domain.
//
// Corruption: in a scratch copy of each repository (plain and encrypted), one
// object of every kind (manifest, disk index, pack index, pack, key, config,
// lock) is flipped (one byte), truncated (to half) and deleted; verify must
// name the damaged object (a deleted manifest is a deleted backup and a lock
// is no data: there verify must pass), and every listed backup either
// restores byte for byte or fails in one sentence, never with other bytes.
//
// Everything is decided by the seed (which bytes are written and flipped);
// kills happen at counted points, never after a delay.

import { cpSync, existsSync, readFileSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Prng } from '../fuzz/prng.js';
import { TestEnv, guestWrite, type CliResult } from '../helpers/env.js';
import { MiB, KiB, imageDiffers, referenceCopy } from '../helpers/repo.js';

export interface SoakOptions {
  seed?: number;
  /** Rounds of backup, prune, gc, copy (and instant restore) per repository. */
  rounds?: number;
  /** Kill at most this many points of one operation run (default: all of them). */
  maxKillsPerOp?: number;
  /** Repositories: plain, encrypted or both (default both). */
  kinds?: ReadonlyArray<'plain' | 'encrypted'>;
  instant?: boolean;
  corruption?: boolean;
  log?: ((line: string) => void) | undefined;
  keep?: boolean;
}

export interface SoakFigures {
  kills: Record<string, number>;
  totalKills: number;
  restoresChecked: number;
  verifies: number;
  damages: number;
  damagesNamed: number;
  failures: string[];
  durationMs: number;
}

const PASSWORD = 'soak-passphrase-1';
const TARGET_PASSWORD = 'soak-passphrase-2';
const DOMAIN = 'vm';
const INSTANT_POINTS = ['instant-restore:after-record', 'instant-restore:after-overlays', 'instant-restore:after-define', 'instant-restore:after-spawn', 'instant-restore:after-server', 'instant-restore:after-start'];
const KINDS = ['manifest', 'index', 'pack-index', 'pack', 'key', 'config', 'lock'] as const;
type Kind = (typeof KINDS)[number];
const MODES = ['flip', 'truncate', 'delete'] as const;
type Mode = (typeof MODES)[number];

interface Repo {
  name: string;
  dir: string;
  env: Record<string, string>;
  encrypted: boolean;
  /** Where copies of it go, and the variables a copy needs. */
  copyTo: string;
  copyEnv: Record<string, string>;
}

interface Listed {
  id: string;
  domain: string;
}

export async function runSoak(options: SoakOptions = {}): Promise<SoakFigures> {
  const started = Date.now();
  const prng = new Prng(options.seed ?? 1);
  const log = options.log ?? ((): void => undefined);
  const figures: SoakFigures = { kills: {}, totalKills: 0, restoresChecked: 0, verifies: 0, damages: 0, damagesNamed: 0, failures: [], durationMs: 0 };
  const env = new TestEnv('qb-soak-', { accel: 'tcg' });
  const refs = new Map<string, string>(); // backup id → raw reference of sda
  let currentRef = '';
  let refCount = 0;
  let files = 0;
  const fail = (what: string): void => {
    figures.failures.push(what);
    log(`FAIL ${what}`);
  };
  const kill = (what: string): void => {
    figures.kills[what] = (figures.kills[what] ?? 0) + 1;
    figures.totalKills++;
  };

  const cli = (args: string[], extra: Record<string, string> = {}): Promise<CliResult> => env.cli(args, { env: extra });
  async function write(): Promise<void> {
    const bytes = (1 + prng.int(4)) * 64 * KiB;
    const file = env.path(`w${++files}`);
    const buf = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i += 4) buf.writeUInt32LE(prng.u32(), i);
    writeFileSync(file, buf);
    const at = prng.int((8 * MiB - bytes) / (64 * KiB)) * 64 * KiB;
    await guestWrite(env.qb, DOMAIN, 'sda', `write -s ${file} ${at} ${bytes}`);
    rmSync(file);
    currentRef = await referenceCopy(env, DOMAIN, 'sda', env.path(`ref-${++refCount}.raw`));
  }
  async function list(repo: string, extra: Record<string, string>): Promise<Listed[] | undefined> {
    const r = await cli(['--json', 'backup-list', '--repo', repo], extra);
    if (r.code !== 0) {
      fail(`backup-list of ${repo} failed: ${r.stderr.trim()}`);
      return undefined;
    }
    return (JSON.parse(r.stdout) as Listed[]).map((m) => ({ id: m.id, domain: m.domain }));
  }
  let restores = 0;
  /** Restores one backup as raw and compares it with its reference; the reason when it fails. */
  async function restoreDiffers(repo: string, extra: Record<string, string>, id: string): Promise<string | undefined> {
    const ref = refs.get(id);
    if (ref === undefined) return `backup ${id} is listed but no backup with that id was taken`;
    const file = env.path(`restore-${++restores}.raw`);
    try {
      const r = await cli(['--json', 'export', DOMAIN, '--repo', repo, '--backup', id, '--disk', 'sda', '--to', file, '--format', 'raw'], extra);
      figures.restoresChecked++;
      if (r.code !== 0) return `restore of ${id} failed: ${r.stderr.trim()}`;
      return await imageDiffers(file, 'raw', ref);
    } finally {
      rmSync(file, { force: true });
    }
  }
  /**
   * The invariants after a kill or a completed run: listing works, nothing in
   * `mustStay` is gone, every listed id is known (a backup run may add
   * `adopt`'s), and the chosen backups restore exactly.
   */
  async function check(repo: Repo | { dir: string; env: Record<string, string>; name: string }, what: string, mustStay: readonly string[], restoreAll: boolean, adopt = false, before: readonly string[] = []): Promise<string[]> {
    const listed = await list(repo.dir, repo.env);
    if (listed === undefined) return [];
    const ids = listed.map((m) => m.id);
    for (const id of mustStay) if (!ids.includes(id)) fail(`${what}: backup ${id} of ${repo.name} is no longer listed`);
    for (const id of ids) if (adopt && !refs.has(id)) refs.set(id, currentRef);
    const chosen = restoreAll ? ids : ids.filter((id, i) => i === ids.length - 1 || !before.includes(id));
    for (const id of chosen) {
      const why = await restoreDiffers(repo.dir, repo.env, id);
      if (why !== undefined) fail(`${what}: ${repo.name}: ${why}`);
    }
    if (restoreAll) {
      const v = await cli(['--json', 'verify', '--read-data', '--repo', repo.dir], repo.env);
      figures.verifies++;
      if (v.code !== 0) fail(`${what}: verify of ${repo.name} fails: ${v.stdout.trim()} ${v.stderr.trim()}`);
    }
    return ids;
  }

  /** Runs `args` killed before its 1st, 2nd, … repository write until a run completes; checks after every kill. */
  async function killLoop(op: string, repo: Repo, args: string[], extra: Record<string, string>, after: (before: readonly string[]) => Promise<void>, mustStay: (before: readonly string[]) => readonly string[]): Promise<CliResult | undefined> {
    for (let n = 1; ; n++) {
      const before = (await list(repo.dir, repo.env))?.map((m) => m.id) ?? [];
      const last = options.maxKillsPerOp !== undefined && n > options.maxKillsPerOp;
      const r = await cli(args, last ? extra : { ...extra, QBACKUP_CRASH_AT: `repo-write:${n}` });
      if (r.signal === 'SIGKILL') {
        kill(op);
        log(`  ${op} ${repo.name} killed before write ${n}`);
        await check(repo, `${op} killed before write ${n}`, mustStay(before), false, op === 'backup', before);
        await after(before);
        continue;
      }
      if (r.code !== 0) {
        fail(`${op} on ${repo.name} (crash point ${last ? 'none' : n}) failed instead of completing: ${r.stderr.trim()}`);
        return undefined;
      }
      log(`  ${op} ${repo.name} completed after ${n - 1} kills`);
      return r;
    }
  }

  try {
    await env.defineDomain(DOMAIN, [{ target: 'sda', sizeBytes: 8 * MiB }]);
    await env.qb.domains.start(DOMAIN, { paused: true });
    const repos: Repo[] = [];
    for (const kind of options.kinds ?? ['plain', 'encrypted']) {
      const encrypted = kind === 'encrypted';
      const repo: Repo = {
        name: kind, dir: env.path(`repo-${kind}`), env: encrypted ? { QBACKUP_PASSWORD: PASSWORD } : {}, encrypted,
        copyTo: env.path(`copy-${kind}`), copyEnv: encrypted ? { QBACKUP_FROM_PASSWORD: PASSWORD, QBACKUP_PASSWORD: TARGET_PASSWORD } : {},
      };
      const init = await cli(['init', '--repo', repo.dir, ...(encrypted ? ['--encrypt'] : [])], repo.env);
      if (init.code !== 0) throw new Error(`init ${repo.dir}: ${init.stderr}`);
      if (encrypted) {
        const t = await cli(['init', '--repo', repo.copyTo, '--encrypt'], { QBACKUP_PASSWORD: TARGET_PASSWORD });
        if (t.code !== 0) throw new Error(`init ${repo.copyTo}: ${t.stderr}`);
      }
      repos.push(repo);
    }
    await write();

    for (let round = 1; round <= (options.rounds ?? 1); round++) {
      for (const repo of repos) {
        log(`round ${round}, ${repo.name} repository`);
        // Backups: a full at first, incrementals after, each over new data.
        for (let b = 0; b < 3; b++) {
          await write();
          const r = await killLoop('backup', repo, ['--json', 'backup', DOMAIN, '--repo', repo.dir], repo.env, async () => undefined, (before) => before);
          if (r !== undefined) refs.set((JSON.parse(r.stdout) as { id: string }).id, currentRef);
        }
        await check(repo, `after the backups of round ${round}`, [], true);
        // Prune to the newest two: those must never go.
        await killLoop('prune', repo, ['prune', DOMAIN, '--repo', repo.dir, '--keep-last', '2'], repo.env, async () => undefined, (before) => before.slice(-2));
        await check(repo, `after prune of round ${round}`, [], true);
        await killLoop('gc', repo, ['gc', '--repo', repo.dir], repo.env, async () => undefined, (before) => before);
        await check(repo, `after gc of round ${round}`, [], true);
        // Copy into the second repository: both keep what they listed.
        const target = { name: `${repo.name} copy`, dir: repo.copyTo, env: repo.encrypted ? { QBACKUP_PASSWORD: TARGET_PASSWORD } : {} };
        let targetBefore: string[] = [];
        if (existsSync(join(repo.copyTo, 'config'))) targetBefore = (await list(target.dir, target.env))?.map((m) => m.id) ?? [];
        await killLoop('copy', repo, ['copy', DOMAIN, '--from', repo.dir, '--to', repo.copyTo], repo.copyEnv, async () => {
          if (!existsSync(join(repo.copyTo, 'config'))) return;
          const ids = await check(target, 'copy killed (target)', targetBefore, false, false, targetBefore);
          targetBefore = ids;
        }, (before) => before);
        await check(target, `after copy of round ${round}`, targetBefore, true);
        if (options.instant !== false) await instantKills(repo);
      }
    }
    // Nothing left running or locked: a gc removes the locks of dead processes, then none may remain.
    for (const repo of repos) {
      const g = await cli(['gc', '--repo', repo.dir], repo.env);
      if (g.code !== 0) fail(`final gc of ${repo.name}: ${g.stderr.trim()}`);
      const locks = existsSync(join(repo.dir, 'locks')) ? readdirSync(join(repo.dir, 'locks')) : [];
      if (locks.length > 0) fail(`${repo.name}: locks left after the final gc: ${locks.join(', ')}`);
      await check(repo, 'at the end', [], true);
    }
    const servers = backupServers(env.stateDir);
    if (servers.length > 0) fail(`backup servers left running: ${servers.join(', ')}`);
    if (options.corruption !== false) for (const repo of repos) await corruptions(repo);
  } finally {
    figures.durationMs = Date.now() - started;
    if (options.keep === true) log(`kept ${env.dir}`);
    else await env.cleanup();
  }
  return figures;

  // ---- instant restore --------------------------------------------------------

  async function instantKills(repo: Repo): Promise<void> {
    const listed = (await list(repo.dir, repo.env)) ?? [];
    const newest = listed.at(-1)?.id;
    if (newest === undefined) return;
    for (const point of INSTANT_POINTS) {
      const args = ['restore', DOMAIN, '--repo', repo.dir, '--instant', '--as', 'ir'];
      const r = await cli(args, { ...repo.env, QBACKUP_CRASH_AT: point });
      if (r.signal !== 'SIGKILL') {
        fail(`instant restore from ${repo.name} was not killed at ${point}: ${r.code} ${r.stderr.trim()}`);
      } else {
        kill('instant restore');
        log(`  instant restore ${repo.name} killed at ${point}`);
      }
      // The next command settles what the killed one left.
      const doms = JSON.parse((await cli(['--json', 'list', '--all'])).stdout) as Array<{ name: string; state: string }>;
      const ir = doms.find((d) => d.name === 'ir');
      const next = ir === undefined ? await cli(args, repo.env) : ir.state === 'running' ? await cli(['domjobinfo', 'ir'], repo.env) : await cli(['start', 'ir'], repo.env);
      if (next.code !== 0) {
        fail(`after instant restore killed at ${point} (${repo.name}): the next command failed: ${next.stderr.trim()}`);
      } else {
        // Poll the condition (the copy completed), not a time.
        let state = '';
        for (let i = 0; i < 600 && state !== 'completed'; i++) {
          const j = await cli(['--json', 'domjobinfo', 'ir'], repo.env);
          // null: no job and no restore left (a finished copy is finalized by the command itself).
          const o = j.code === 0 ? (JSON.parse(j.stdout) as { state?: string; instant?: { state?: string } } | null) : undefined;
          state = o === null ? 'completed' : (o?.instant?.state ?? o?.state ?? '');
          if (j.code !== 0) {
            fail(`domjobinfo ir after a kill at ${point}: ${j.stderr.trim()}`);
            break;
          }
          if (state !== 'completed') await new Promise((res) => setTimeout(res, 200));
        }
        const overlay = join(env.stateDir, 'images', 'ir', 'sda.qcow2');
        const why = state === 'completed' ? await imageDiffers(overlay, 'qcow2', refs.get(newest) ?? '') : `the copy did not complete (state "${state}")`;
        figures.restoresChecked++;
        if (why !== undefined) fail(`instant restore from ${repo.name} killed at ${point}: ${why}`);
      }
      await cli(['destroy', 'ir']);
      const u = await cli(['undefine', 'ir']);
      if (u.code !== 0 && ir !== undefined) fail(`undefine ir after ${point}: ${u.stderr.trim()}`);
      rmSync(join(env.stateDir, 'images', 'ir'), { recursive: true, force: true });
      const servers = backupServers(env.stateDir);
      if (servers.length > 0) fail(`after instant restore killed at ${point}: backup servers outlive the domain: ${servers.join(', ')}`);
    }
  }

  // ---- corruption ---------------------------------------------------------------

  async function corruptions(repo: Repo): Promise<void> {
    const listed = ((await list(repo.dir, repo.env)) ?? []).map((m) => m.id);
    const newest = listed.at(-1);
    if (newest === undefined) return;
    for (const kind of KINDS) {
      if (kind === 'key' && !repo.encrypted) continue;
      for (const mode of MODES) {
        const dir = env.path(`damaged-${repo.name}-${kind}-${mode}`);
        cpSync(repo.dir, dir, { recursive: true });
        const scratch = { name: `${repo.name} (${kind} ${mode})`, dir, env: repo.env };
        if (kind === 'lock') {
          // A lock of a dead process: a gc killed just after writing it.
          const g = await cli(['gc', '--repo', dir], { ...repo.env, QBACKUP_CRASH_AT: 'repo-write:2' });
          if (g.signal !== 'SIGKILL') fail(`${scratch.name}: the gc meant to leave a lock was not killed`);
        }
        const key = pickObject(dir, kind, newest);
        if (key === undefined) {
          fail(`${scratch.name}: no object of kind ${kind} to damage`);
          continue;
        }
        damage(join(dir, key), mode, prng);
        figures.damages++;
        const v = await cli(['--json', 'verify', '--read-data', '--repo', dir], repo.env);
        figures.verifies++;
        const harmless = kind === 'lock' || (kind === 'manifest' && mode === 'delete');
        // A deleted key file cannot be named by its id (nothing records it): the error must say keys/ is empty.
        const name = kind === 'key' && mode === 'delete' ? 'no key file under keys/' : (key.split('/').at(-1) ?? key);
        const said = v.stdout + v.stderr;
        if (harmless) {
          if (v.code !== 0) fail(`${scratch.name}: verify fails over harmless damage to "${key}": ${said.trim()}`);
          else figures.damagesNamed++;
        } else if (v.code === 0 || !said.includes(name)) {
          fail(`${scratch.name}: verify does not name "${key}" (exit ${v.code}): ${said.trim().slice(0, 400)}`);
        } else {
          figures.damagesNamed++;
          if (v.code !== 1 || /^\s+at /m.test(v.stderr)) fail(`${scratch.name}: verify did not fail cleanly: ${v.stderr.trim()}`);
        }
        // Never a wrong byte: every backup restores exactly or fails in one sentence.
        for (const id of listed) {
          const ref = refs.get(id) ?? '';
          const file = env.path(`restore-${++restores}.raw`);
          const r = await cli(['--json', 'export', DOMAIN, '--repo', dir, '--backup', id, '--disk', 'sda', '--to', file, '--format', 'raw'], repo.env);
          figures.restoresChecked++;
          if (r.code === 0) {
            const why = await imageDiffers(file, 'raw', ref);
            if (why !== undefined) fail(`${scratch.name}: backup ${id} restored WRONG bytes: ${why}`);
          } else {
            if (r.signal !== null || /^\s+at /m.test(r.stderr)) fail(`${scratch.name}: restore of ${id} did not fail cleanly: ${r.stderr.trim()}`);
            if (existsSync(file)) fail(`${scratch.name}: a failed restore of ${id} left "${file}"`);
          }
          rmSync(file, { force: true });
        }
        if (kind === 'lock') {
          // A lock that still parses may now name another host or boot: it is honoured until its lease runs out (one sentence), never forever.
          const b = await cli(['--json', 'gc', '--repo', dir], repo.env);
          if (b.code !== 0 && !/"code":\s*"REPO_LOCKED"/.test(b.stdout + b.stderr)) fail(`${scratch.name}: gc after a damaged stale lock fails: ${b.stderr.trim()}`);
        }
        log(`  ${scratch.name}: verify exit ${v.code}`);
        rmSync(dir, { recursive: true, force: true });
      }
    }
  }
}

/** The object of `kind` to damage: the newest backup's where it has one, else the first by name. */
function pickObject(dir: string, kind: Kind, newest: string): string | undefined {
  const under = (sub: string): string[] => {
    const out: string[] = [];
    const walk = (d: string, rel: string): void => {
      if (!existsSync(d)) return;
      for (const e of readdirSync(d, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
        if (e.isDirectory()) walk(join(d, e.name), `${rel}${e.name}/`);
        else if (!e.name.startsWith('.')) out.push(`${rel}${e.name}`);
      }
    };
    walk(join(dir, sub), `${sub}/`);
    return out;
  };
  switch (kind) {
    case 'manifest':
      return under('snapshots').filter((k) => k.includes(newest)).at(-1);
    case 'index': {
      const m = under('snapshots').filter((k) => k.includes(newest)).at(-1);
      if (m === undefined) return undefined;
      const text = readFileSync(join(dir, m), 'utf8');
      const index = /"index": "([0-9a-f]{64})"/.exec(text)?.[1];
      // Encrypted manifests are sealed: take the first disk index by name then.
      return index !== undefined ? under('indexes').find((k) => k.endsWith(index)) : under('indexes')[0];
    }
    case 'pack-index':
      return under('index')[0];
    case 'pack':
      return under('data')[0];
    case 'key':
      return under('keys')[0];
    case 'config':
      return existsSync(join(dir, 'config')) ? 'config' : undefined;
    case 'lock':
      return under('locks')[0];
  }
}

function damage(file: string, mode: Mode, prng: Prng): void {
  const size = statSync(file).size;
  if (mode === 'delete') rmSync(file);
  else if (mode === 'truncate') truncateSync(file, Math.floor(size / 2));
  else {
    const bytes = readFileSync(file);
    const at = prng.int(size);
    bytes[at] = (bytes[at] ?? 0) ^ (1 << prng.int(8));
    writeFileSync(file, bytes);
  }
}

/** Backup server processes (serve-backup) started for this state directory. */
export function backupServers(stateDir: string): number[] {
  const out: number[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    let cmd: string;
    try {
      cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if (cmd.includes('serve-backup') && cmd.includes(stateDir)) out.push(Number(pid));
  }
  return out;
}

export function formatFigures(f: SoakFigures): string {
  const kills = Object.entries(f.kills).map(([k, n]) => `${k} ${n}`).join(', ');
  return [
    `kills: ${f.totalKills} (${kills})`,
    `restores checked: ${f.restoresChecked}, verifies: ${f.verifies}`,
    `damages: ${f.damages}, named by verify (or harmless and passed): ${f.damagesNamed}`,
    `failures: ${f.failures.length}`,
    `time: ${Math.round(f.durationMs / 1000)} s`,
  ].join('\n');
}

