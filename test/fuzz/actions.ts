// The oracle's actions: a discriminated union of everything a scenario does to
// the domain, a seeded generator that picks valid actions by simulating them on
// the pure model, and a one-line text form (`formatAction` / `parseAction`) so
// a failing scenario is a printable list that replays from a file.
//
// Invariants: a scenario is a pure function of (seed, steps, options); every
// random choice is made here, none in the driver. An action names what it
// touches (disk "disk2", checkpoint "c4"), never an index, so removing earlier
// actions (shrinking) leaves it meaningful; the driver skips an action whose
// disk or checkpoint does not exist at that point.

import { GRAIN, MAX_DISK_BYTES, MIN_DISK_BYTES, Model, type DiskModel, type DiskSpec } from './model.js';
import { Prng } from './prng.js';

export const KILL_POINTS = [
  'checkpoint-create:after-intent',
  'checkpoint-create:after-qemu',
  'checkpoint-delete:after-intent',
  'checkpoint-delete:after-qemu',
  'backup-begin:before-qemu',
  'backup-begin:after-qemu',
] as const;
export type KillPoint = (typeof KILL_POINTS)[number];

/**
 * How a resize is done: `blockresize` = the library's blockResize while
 * running (QMP block_resize); `qmp` = a raw QMP block_resize on the disk's
 * node through monitorCommand; `offline` = shut down, blockResize (qemu-img
 * resize), start again.
 */
export const RESIZE_PATHS = ['blockresize', 'qmp', 'offline'] as const;
export type ResizePath = (typeof RESIZE_PATHS)[number];

export type Action =
  | { kind: 'write'; disk: string; offset: number; length: number; pattern: number }
  | { kind: 'zero'; disk: string; offset: number; length: number }
  | { kind: 'discard'; disk: string; offset: number; length: number }
  | { kind: 'checkpoint'; name: string }
  | { kind: 'delete'; name: string; children: boolean }
  /** A push backup-begin, full or since a checkpoint, optionally creating one. */
  | { kind: 'push'; since?: string; checkpoint?: string }
  /** A pull backup-begin; the guest writes 64 KiB of 0xee at offset 0 of `during` while the exports are read. */
  | { kind: 'pull'; since?: string; checkpoint?: string; during: string }
  /** A repository backup (format 2: read through a pull export); `alias` names its checkpoint in the model. */
  | { kind: 'repo'; alias: string }
  /** A repository backup with only `headroom` bytes free on the repository's file system. */
  | { kind: 'repo-full'; alias: string; headroom: number }
  /** The repository's prune with keep-last `keep` (older backups and their checkpoints go). */
  | { kind: 'repo-prune'; keep: number }
  /** The repository's gc; then every backup still listed restores. */
  | { kind: 'repo-gc' }
  /** The repository's verify with --read-data: no problem. */
  | { kind: 'repo-verify' }
  /** An earlier repository backup (still listed) restored and compared with the disks at its time. */
  | { kind: 'repo-restore'; alias: string }
  /** The disk's virtual size set to `size` (grow or shrink) along `via`. */
  | { kind: 'resize'; disk: string; size: number; via: ResizePath }
  /** Hot-plug of a new, empty disk. */
  | { kind: 'attach'; disk: string; size: number; cluster: number }
  /** Unplug; `back`: plug it in again at once, before any checkpoint. */
  | { kind: 'detach'; disk: string; back: boolean }
  /** Plug a detached disk in again, after someone wrote 0x5c at `offline` (64 KiB) if given. */
  | { kind: 'reattach'; disk: string; offline?: number }
  | { kind: 'restart' }
  /** QEMU killed (destroy) and started again. */
  | { kind: 'crash' }
  /** The CLI killed (SIGKILL) at `point`; `name` is the checkpoint it creates or deletes. */
  | { kind: 'kill'; point: KillPoint; name: string }
  /** The library's QMP connection dropped at its `at`-th command that changes something, before it reaches QEMU or after QEMU ran it. */
  | { kind: 'qmp-drop'; op: 'checkpoint' | 'delete' | 'push'; name: string; since?: string; at: number; when: 'before' | 'after' }
  /** Ask checkpoint-coverage since a checkpoint and compare with the model. */
  | { kind: 'coverage'; since: string };

export type ActionKind = Action['kind'];

export interface Scenario {
  seed: number;
  /** The disks the domain is defined with, attached as sda, sdb, … */
  setup: DiskSpec[];
  actions: Action[];
}

export interface GenerateOptions {
  /** The driver can stage a full repository file system (it can mount a tmpfs). */
  repoFull?: boolean;
  /**
   * A libvirt domain through the libvirt driver: only what libvirt supports
   * (LIBVIRT_WEIGHTS): repository backups, guest writes, restart, the
   * repository's checkpoint deleted by an admin, grows, hot-plug and unplug,
   * restores; one checkpoint per repository in the model.
   */
  libvirt?: boolean;
}

// ---- text form -----------------------------------------------------------------

/** Field order per kind; a trailing "?" marks an optional field. */
const FIELDS: Record<ActionKind, readonly string[]> = {
  write: ['disk', 'offset', 'length', 'pattern'],
  zero: ['disk', 'offset', 'length'],
  discard: ['disk', 'offset', 'length'],
  checkpoint: ['name'],
  delete: ['name', 'children'],
  push: ['since?', 'checkpoint?'],
  pull: ['since?', 'checkpoint?', 'during'],
  repo: ['alias'],
  'repo-full': ['alias', 'headroom'],
  'repo-prune': ['keep'],
  'repo-gc': [],
  'repo-verify': [],
  'repo-restore': ['alias'],
  resize: ['disk', 'size', 'via'],
  attach: ['disk', 'size', 'cluster'],
  detach: ['disk', 'back'],
  reattach: ['disk', 'offline?'],
  restart: [],
  crash: [],
  kill: ['point', 'name'],
  'qmp-drop': ['op', 'name', 'since?', 'at', 'when'],
  coverage: ['since'],
};

/** One line: the kind, then key=value in a fixed order. */
export function formatAction(a: Action): string {
  const fields = a as unknown as Record<string, string | number | boolean | undefined>;
  const parts: string[] = [a.kind];
  for (const f of FIELDS[a.kind]) {
    const key = f.replace('?', '');
    const v = fields[key];
    if (v !== undefined) parts.push(`${key}=${String(v)}`);
  }
  return parts.join(' ');
}

/** Parses what formatAction printed; throws on an unknown kind, an unknown field or a missing one. */
export function parseAction(line: string): Action {
  const [kind, ...rest] = line.trim().split(/\s+/);
  if (kind === undefined || !(kind in FIELDS)) throw new Error(`unknown action "${line}"`);
  const fields = FIELDS[kind as ActionKind];
  const out: Record<string, string | number | boolean> = { kind };
  for (const part of rest) {
    const eq = part.indexOf('=');
    const key = part.slice(0, eq);
    if (eq < 1 || !fields.some((f) => f.replace('?', '') === key)) throw new Error(`action "${line}": unknown field "${part}"`);
    const raw = part.slice(eq + 1);
    out[key] = /^-?\d+$/.test(raw) ? Number(raw) : raw === 'true' ? true : raw === 'false' ? false : raw;
  }
  for (const f of fields) if (!f.endsWith('?') && !(f in out)) throw new Error(`action "${line}": missing field "${f}"`);
  return out as unknown as Action;
}

/** The replay file: a comment, the setup line, one action a line. */
export function formatScenario(s: Scenario, comment: string): string {
  const setup = s.setup.map((d) => `${d.name}=${d.sizeBytes}/${d.clusterSizeBytes}`).join(' ');
  return [`# ${comment}`, `seed ${s.seed}`, `setup ${setup}`, ...s.actions.map(formatAction)].join('\n') + '\n';
}

/** Reads a replay file: the text form above, or JSON of a Scenario. */
export function parseScenario(text: string): Scenario {
  if (text.trimStart().startsWith('{')) return JSON.parse(text) as Scenario;
  const s: Scenario = { seed: 0, setup: [], actions: [] };
  for (const line of text.split('\n').map((l) => l.trim())) {
    if (line === '' || line.startsWith('#')) continue;
    if (line.startsWith('seed ')) s.seed = Number(line.slice(5));
    else if (line.startsWith('setup ')) {
      s.setup = line.slice(6).trim().split(/\s+/).map((p) => {
        const m = /^([\w]+)=(\d+)\/(\d+)$/.exec(p);
        if (m === null) throw new Error(`bad setup disk "${p}"`);
        return { name: m[1] ?? '', sizeBytes: Number(m[2]), clusterSizeBytes: Number(m[3]) };
      });
    } else s.actions.push(parseAction(line));
  }
  if (s.setup.length === 0) throw new Error('the scenario has no setup line');
  return s;
}

// ---- generator -----------------------------------------------------------------

const WEIGHTS = {
  write: 28,
  zero: 5,
  discard: 5,
  checkpoint: 12,
  delete: 8,
  push: 10,
  pull: 6,
  repo: 6,
  'repo-full': 2,
  'repo-prune': 4,
  'repo-gc': 1,
  'repo-verify': 2,
  resize: 2,
  attach: 2,
  detach: 4,
  reattach: 3,
  restart: 2,
  crash: 1,
  kill: 3,
  'qmp-drop': 3,
  coverage: 2,
  // last, at weight 0 here: the scenarios of earlier seeds stay as they were
  'repo-restore': 0,
} satisfies Record<ActionKind, number>;

/** Under the libvirt driver: the actions libvirt supports, the rest at 0. */
const LIBVIRT_WEIGHTS = {
  write: 28,
  zero: 5,
  discard: 4,
  checkpoint: 0,
  delete: 3,
  push: 0,
  pull: 0,
  repo: 14,
  'repo-full': 0,
  'repo-prune': 2,
  'repo-gc': 1,
  'repo-verify': 1,
  resize: 3,
  attach: 2,
  detach: 2,
  reattach: 0,
  restart: 3,
  crash: 0,
  kill: 0,
  'qmp-drop': 0,
  coverage: 0,
  'repo-restore': 3,
} satisfies Record<ActionKind, number>;

class Generator {
  readonly model = new Model();
  /** Actions that must follow the last one (a prune's gc). */
  readonly followUps: Action[] = [];
  private counter = 0;
  private diskCounter = 0;

  constructor(
    readonly rng: Prng,
    readonly options: GenerateOptions,
  ) {}

  name(prefix: string): string {
    return `${prefix}${++this.counter}`;
  }

  diskSpec(): DiskSpec {
    return { name: `disk${this.diskCounter++}`, sizeBytes: (2 + this.rng.int(3)) << 20, clusterSizeBytes: this.rng.pick([65536, 65536, 262144]) };
  }

  /** Mostly a checkpoint that still covers something, often the oldest: its span crosses deletions, detaches and restarts. */
  since(): string | undefined {
    const { rng, model } = this;
    if (model.chain.length === 0 || rng.chance(0.1)) return undefined;
    const covered = model.covered();
    if (covered.length > 0 && rng.chance(0.85)) return (rng.chance(0.5) ? covered[0] : rng.pick(covered))?.name;
    return rng.pick(model.chain).name;
  }

  /** Middle checkpoints most often: deleting them must merge into the parent. */
  victim(): string | undefined {
    const { rng, model } = this;
    if (model.chain.length === 0) return undefined;
    const middle = model.chain.slice(1, -1);
    return (middle.length > 0 && rng.chance(0.6) ? rng.pick(middle) : rng.pick(model.chain)).name;
  }

  // One case per kind; each returns undefined when the kind does not apply now.
  next(kind: ActionKind): Action | undefined {
    const { rng, model } = this;
    switch (kind) {
      case 'write':
      case 'zero':
      case 'discard':
        return this.guestWrite(kind);
      case 'checkpoint':
        return { kind, name: this.name('c') };
      case 'delete': {
        // under libvirt: an admin deletes the repository's one checkpoint
        if (this.options.libvirt === true) return model.chain.length === 0 ? undefined : { kind, name: model.chain[model.chain.length - 1]?.name ?? '', children: false };
        const name = this.victim();
        return name === undefined ? undefined : { kind, name, children: rng.chance(0.15) };
      }
      case 'push':
      case 'pull':
        return this.backup(kind);
      case 'repo':
        return { kind, alias: this.name('r') };
      case 'repo-full':
        if (this.options.repoFull !== true) return undefined;
        return { kind, alias: this.name('r'), headroom: rng.pick([0, 4096, 65536, 262144, 1 << 20]) };
      case 'repo-prune':
      case 'repo-gc':
      case 'repo-verify':
        return this.repoMaintenance(kind);
      case 'repo-restore':
        return model.repoBackups.length === 0 ? undefined : { kind, alias: rng.pick(model.repoBackups).alias };
      case 'resize':
        return this.resize();
      case 'attach': {
        if (model.attached().length >= 4) return undefined;
        const d = this.diskSpec();
        return { kind, disk: d.name, size: d.sizeBytes, cluster: d.clusterSizeBytes };
      }
      case 'detach':
        if (model.attached().length <= 1) return undefined;
        // under libvirt a disk unplugged stays away (no reattach)
        return { kind, disk: rng.pick(model.attached()).name, back: this.options.libvirt === true ? false : rng.chance(0.5) };
      case 'reattach':
        return this.reattach();
      case 'restart':
      case 'crash':
        return { kind };
      case 'kill':
        return this.kill();
      case 'qmp-drop':
        return this.qmpDrop();
      case 'coverage': {
        const since = this.since();
        return since === undefined ? undefined : { kind, since };
      }
    }
  }

  /** Only once the repository holds backups; a prune (keeping 1-3, fewer than there are) is mostly followed by a gc at once. */
  repoMaintenance(kind: 'repo-prune' | 'repo-gc' | 'repo-verify'): Action | undefined {
    const { rng } = this;
    const n = this.model.repoBackups.length;
    if (kind !== 'repo-prune') return n === 0 ? undefined : { kind };
    if (n < 2) return undefined;
    if (rng.chance(0.8)) this.followUps.push({ kind: 'repo-gc' });
    return { kind, keep: 1 + rng.int(Math.min(3, n - 1)) };
  }

  /**
   * A new size for an attached disk, in whole clusters of its image (QEMU
   * 7.2's qcow2 keeps the rest of a partial last cluster on a shrink and shows
   * it again on a grow), within MIN_DISK_BYTES..MAX_DISK_BYTES: a step of a
   * few clusters or anywhere in the range. A shrink is sometimes followed by
   * a grow back to the old size at once — the case QEMU does not mark dirty.
   */
  resize(): Action | undefined {
    const { rng } = this;
    const d = rng.pick(this.model.attached());
    const size = this.newSize(d);
    if (size === undefined) return undefined;
    if (size < d.sizeBytes && this.options.libvirt !== true && rng.chance(0.4)) this.followUps.push({ kind: 'resize', disk: d.name, size: d.sizeBytes, via: rng.pick(RESIZE_PATHS) });
    return { kind: 'resize', disk: d.name, size, via: rng.pick(RESIZE_PATHS) };
  }

  newSize(d: DiskModel): number | undefined {
    const { rng } = this;
    const unit = d.clusterSizeBytes;
    const lo = Math.ceil(MIN_DISK_BYTES / unit);
    const hi = Math.floor(MAX_DISK_BYTES / unit);
    const now = Math.round(d.sizeBytes / unit);
    const units = rng.chance(0.5) ? now + (rng.chance(0.5) ? -1 : 1) * (1 + rng.int(8)) : lo + rng.int(hi - lo + 1);
    const clamped = Math.min(hi, Math.max(lo, units));
    // libvirt 9.0's blockresize grows only
    if (this.options.libvirt === true && clamped <= now) return undefined;
    return clamped === now ? undefined : clamped * unit;
  }

  guestWrite(kind: 'write' | 'zero' | 'discard'): Action {
    const { rng } = this;
    const d = rng.pick(this.model.attached());
    const unit = kind === 'discard' ? d.clusterSizeBytes : 512;
    const offset = rng.int(Math.floor(d.sizeBytes / unit)) * unit;
    const length = Math.min((1 + rng.int(kind === 'discard' ? 2 : 256)) * unit, d.sizeBytes - offset);
    return kind === 'write' ? { kind, disk: d.name, offset, length, pattern: 1 + rng.int(255) } : { kind, disk: d.name, offset, length };
  }

  backup(kind: 'push' | 'pull'): Action {
    const since = this.since();
    const checkpoint = this.rng.chance(0.7) ? this.name('b') : undefined;
    const opt = { ...(since !== undefined ? { since } : {}), ...(checkpoint !== undefined ? { checkpoint } : {}) };
    return kind === 'push' ? { kind, ...opt } : { kind, ...opt, during: this.rng.pick(this.model.attached()).name };
  }

  reattach(): Action | undefined {
    const detached = this.model.disks.filter((d) => d.target === undefined);
    if (detached.length === 0) return undefined;
    const d = this.rng.pick(detached);
    // someone else writes the image while it is detached, most of the time
    return this.rng.chance(0.7) ? { kind: 'reattach', disk: d.name, offline: this.rng.int(Math.floor(d.sizeBytes / 512)) * 512 } : { kind: 'reattach', disk: d.name };
  }

  kill(): Action | undefined {
    const point = this.rng.pick(KILL_POINTS);
    if (point.startsWith('checkpoint-delete')) {
      const name = this.model.chain.length === 0 ? undefined : this.rng.pick(this.model.chain).name;
      return name === undefined ? undefined : { kind: 'kill', point, name };
    }
    return { kind: 'kill', point, name: this.name('k') };
  }

  qmpDrop(): Action | undefined {
    const { rng } = this;
    const op = rng.pick(['checkpoint', 'delete', 'push'] as const);
    const at = 1 + rng.int(3);
    const when = rng.chance(0.5) ? 'before' : 'after';
    if (op === 'delete') {
      const name = this.victim();
      return name === undefined ? undefined : { kind: 'qmp-drop', op, name, at, when };
    }
    const since = op === 'push' ? this.since() : undefined;
    return { kind: 'qmp-drop', op, name: this.name(op === 'push' ? 'b' : 'c'), ...(since !== undefined ? { since } : {}), at, when };
  }
}

/** What the generator assumes an action did: the outcome where it is certain, a guess for faults (the driver skips what turns out invalid). */
export function simulate(model: Model, a: Action): void {
  switch (a.kind) {
    case 'write':
    case 'zero':
    case 'discard': {
      const d = model.disk(a.disk);
      if (d?.target !== undefined) model.write(d, a.offset, a.length, a.kind === 'write' ? a.pattern : 0);
      break;
    }
    case 'checkpoint':
      model.addCheckpoint(a.name);
      break;
    case 'delete':
      model.deleteCheckpoint(a.name, a.children);
      break;
    case 'push':
    case 'pull':
      if (a.checkpoint !== undefined) model.addCheckpoint(a.checkpoint);
      if (a.kind === 'pull') {
        const d = model.disk(a.during);
        if (d?.target !== undefined) model.write(d, 0, GRAIN, 0xee);
      }
      break;
    case 'repo':
      model.addRepoBackup(a.alias);
      break;
    case 'repo-prune':
      model.pruneRepo(a.keep);
      break;
    case 'attach':
      model.attach(model.addDisk({ name: a.disk, sizeBytes: a.size, clusterSizeBytes: a.cluster }));
      break;
    default:
      simulateMore(model, a);
  }
}

function simulateMore(model: Model, a: Action): void {
  switch (a.kind) {
    case 'detach': {
      const d = model.disk(a.disk);
      if (d?.target === undefined) break;
      model.detach(d);
      if (a.back) model.attach(d);
      break;
    }
    case 'reattach': {
      const d = model.disk(a.disk);
      if (d === undefined || d.target !== undefined) break;
      if (a.offline !== undefined && a.offline < d.sizeBytes) model.writeOffline(d, a.offline, Math.min(GRAIN, d.sizeBytes - a.offline), 0x5c);
      model.attach(d);
      break;
    }
    case 'resize': {
      const d = model.disk(a.disk);
      if (d?.target !== undefined) model.resize(d, a.size);
      break;
    }
    case 'crash':
      model.crash();
      break;
    case 'kill':
      if (a.point.startsWith('checkpoint-delete')) model.deleteCheckpoint(a.name, false);
      break;
    case 'qmp-drop':
      if (a.op === 'delete') model.deleteCheckpoint(a.name, false);
      else model.addCheckpoint(a.name);
      break;
    default:
      break; // repo-full, repo-gc, repo-verify, restart, coverage: no change the generator relies on
  }
}

/** A seeded scenario: the initial disks and `steps` actions, each valid for the model at its point. */
export function generateScenario(seed: number, steps: number, options: GenerateOptions = {}): Scenario {
  const g = new Generator(new Prng(seed), options);
  g.model.latestCheckpointOnly = options.libvirt === true;
  const weights = options.libvirt === true ? LIBVIRT_WEIGHTS : WEIGHTS;
  const setup: DiskSpec[] = [];
  const initial = 2 + g.rng.int(2);
  for (let i = 0; i < initial; i++) {
    const spec = g.diskSpec();
    setup.push(spec);
    g.model.attach(g.model.addDisk(spec));
  }
  const actions: Action[] = [];
  while (actions.length < steps) {
    const a = g.followUps.shift() ?? g.next(g.rng.weighted(weights));
    if (a === undefined) continue;
    simulate(g.model, a);
    actions.push(a);
  }
  return { seed, setup, actions };
}

/** The actions alone, as the issue names it. */
export function generateActions(seed: number, steps: number, options: GenerateOptions = {}): Action[] {
  return generateScenario(seed, steps, options).actions;
}
