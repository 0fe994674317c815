// Runs the repository soak (soak.ts) from the command line and prints its figures.
//   npm run soak -- --rounds 3 --seed 1          every kill point of every round, plain and encrypted
//   --max-kills N: at most N kill points per operation run; --no-instant; --no-corruption;
//   --plain / --encrypted: one kind of repository; --verbose: every kill and check; --keep: keep the directory.
// Exits non-zero when any invariant failed (each failure is printed).

import { parseArgs } from 'node:util';
import { formatFigures, runSoak } from './soak.js';

const { values } = parseArgs({
  options: {
    seed: { type: 'string', default: '1' },
    rounds: { type: 'string', default: '1' },
    'max-kills': { type: 'string' },
    'no-instant': { type: 'boolean', default: false },
    'no-corruption': { type: 'boolean', default: false },
    plain: { type: 'boolean', default: false },
    encrypted: { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
    keep: { type: 'boolean', default: false },
  },
});
const kinds: Array<'plain' | 'encrypted'> = values.plain === values.encrypted ? ['plain', 'encrypted'] : values.plain ? ['plain'] : ['encrypted'];
const figures = await runSoak({
  seed: Number(values.seed),
  rounds: Number(values.rounds),
  ...(values['max-kills'] !== undefined ? { maxKillsPerOp: Number(values['max-kills']) } : {}),
  instant: !values['no-instant'],
  corruption: !values['no-corruption'],
  kinds,
  keep: values.keep,
  log: values.verbose ? (l) => console.log(l) : (l) => (l.startsWith('FAIL') ? console.log(l) : undefined),
});
console.log(formatFigures(figures));
for (const f of figures.failures) console.log(`failure: ${f}`);
process.exit(figures.failures.length === 0 ? 0 : 1);
