// Runs the compiled test files with node's built-in runner.
// Usage: node scripts/run-tests.mjs [unit|integration|fuzz ...]  (default: all three; fuzz runs the CI budget of the oracle)
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

const suites = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const extra = process.argv.slice(2).filter((a) => a.startsWith('-'));
const chosen = suites.length > 0 ? suites : ['unit', 'integration', 'fuzz'];

function collect(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .flatMap((name) => {
      const p = join(dir, name);
      return statSync(p).isDirectory() ? collect(p) : name.endsWith('.test.js') ? [p] : [];
    })
    .sort();
}

const files = chosen.flatMap((s) => collect(join('dist', 'test', s)));
if (files.length === 0) {
  console.error(`no test files found for ${chosen.join(', ')} (did the build run?)`);
  process.exit(1);
}
const result = spawnSync(process.execPath, ['--test', '--test-reporter=spec', ...extra, ...files], { stdio: 'inherit' });
process.exit(result.status ?? 1);
