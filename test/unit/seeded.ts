// Seeded randomness for unit tests: a small PRNG (mulberry32) and a runner
// that prints the seed and a replay command when the body fails. The default
// seed is fixed, so a run is deterministic; an environment variable picks
// another seed to explore or to replay.

export interface Random {
  /** Uniform in [0, 1). */
  next(): number;
  /** Integer in [0, n). */
  int(n: number): number;
  chance(p: number): boolean;
  pick<T>(items: readonly T[]): T;
  bytes(n: number): Buffer;
}

export function seededRandom(seed: number): Random {
  let a = seed >>> 0;
  const next = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number): number => Math.floor(next() * n);
  return {
    next,
    int,
    chance: (p) => next() < p,
    pick: <T>(items: readonly T[]): T => {
      const item = items[int(items.length)];
      if (item === undefined) throw new Error('pick from an empty list');
      return item;
    },
    bytes: (n) => {
      const out = Buffer.alloc(n);
      for (let i = 0; i < n; i++) out[i] = int(256);
      return out;
    },
  };
}

/**
 * Runs body with a PRNG seeded from process.env[envVar] or defaultSeed. On
 * failure prints the seed and how to replay it, then rethrows.
 */
export function withSeed(envVar: string, defaultSeed: number, testFile: string, body: (random: Random, seed: number) => void): void {
  const fromEnv = process.env[envVar];
  const seed = fromEnv === undefined || fromEnv === '' ? defaultSeed : Number(fromEnv);
  if (!Number.isSafeInteger(seed)) throw new Error(`${envVar} must be an integer, got ${String(fromEnv)}`);
  try {
    body(seededRandom(seed), seed);
  } catch (err) {
    console.error(`seeded test failed with seed ${seed}; replay with: ${envVar}=${seed} node --test dist/test/unit/${testFile}`);
    throw err;
  }
}

/** Splits `bytes` into consecutive pieces of random length from 0 to maxPiece (empty pieces included). */
export function randomSplit(random: Random, bytes: Buffer, maxPiece: number): Buffer[] {
  const pieces: Buffer[] = [];
  let pos = 0;
  while (pos < bytes.length) {
    const n = random.int(maxPiece + 1);
    pieces.push(bytes.subarray(pos, pos + n));
    pos += n;
  }
  return pieces;
}
