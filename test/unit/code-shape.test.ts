// The shape rules of the library's code, checked on the sources so they stay
// true: imports only point down the declared layers (docs/design.md, "Layers"),
// only our QEMU engine and its driver speak QMP, the library reads no
// environment below the CLI, libvirt backup and checkpoint XML live only at
// the edges (src/libvirt, src/cli, src/http), and no function is longer than
// 100 lines, nor longer than 60 without a reason written above it ("Long: …"
// in its leading comment).

import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, it } from 'node:test';
import ts from 'typescript';
import { repoRoot } from '../helpers/env.js';

const srcDir = join(repoRoot, 'src');

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

interface LongFunction {
  where: string;
  lines: number;
  reason: boolean;
}

function longFunctions(file: string, minLines: number): LongFunction[] {
  const text = readFileSync(file, 'utf8');
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true);
  const out: LongFunction[] = [];
  const visit = (node: ts.Node): void => {
    if (ts.isFunctionLike(node) && 'body' in node && node.body !== undefined) {
      const start = sf.getLineAndCharacterOfPosition(node.getStart(sf)).line;
      const end = sf.getLineAndCharacterOfPosition(node.getEnd()).line;
      const lines = end - start + 1;
      if (lines > minLines) {
        // The comment above the declaration (or above the statement holding an arrow function).
        let holder: ts.Node = node;
        while (holder.parent !== undefined && !ts.isSourceFile(holder.parent) && !ts.isBlock(holder.parent) && !ts.isClassLike(holder.parent)) holder = holder.parent;
        const comments = ts.getLeadingCommentRanges(text, holder.getFullStart()) ?? [];
        const reason = comments.some((c) => /\bLong:/.test(text.slice(c.pos, c.end)));
        out.push({ where: `${relative(repoRoot, file)}:${start + 1}`, lines, reason });
      }
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  return out;
}

/**
 * The layers of src/, lowest first: a file may import its own layer and the
 * layers below, never one above. A folder ends with '/'; a longer prefix wins
 * (drivers/qemu/ is above drivers/driver.ts).
 */
const LAYERS: readonly (readonly string[])[] = [
  ['errors.ts'],
  ['util/'],
  ['qmp/', 'nbd/', 'store/', 'model/', 'image/'],
  ['qemu/'],
  ['domain/'],
  ['checkpoint/'],
  ['backup/'],
  ['drivers/driver.ts', 'drivers/open.ts', 'drivers/libvirt/uri.ts'],
  ['drivers/qemu/', 'drivers/libvirt/'],
  ['repository/'],
  ['instant/', 'files/'],
  ['qbackup.ts'],
  ['service/', 'config/'],
  ['libvirt/'],
  ['http/', 'cli/', 'index.ts'],
];

/**
 * Our QEMU engine: the only code that may import src/qmp/ and src/qemu/ (and
 * the package's face, src/index.ts, re-exports the clients); and the libvirt
 * driver's offline backups, which open a shut-off domain's images in a
 * qemu-storage-daemon of their own.
 */
const QEMU_ENGINE = ['qmp/', 'qemu/', 'domain/', 'checkpoint/', 'backup/', 'drivers/qemu/', 'drivers/libvirt/offline.ts', 'index.ts'];

/** Above the driver interface these talk to a HypervisorDriver, never to the engine behind it. */
const ABOVE_DRIVER = ['repository/', 'instant/', 'files/', 'service/'];
const ENGINE_ONLY = ['qmp/', 'qemu/', 'domain/', 'checkpoint/', 'backup/', 'drivers/qemu/'];
/** Pure rules every layer may share: the names of domains and checkpoints. */
const SHARED_RULES = ['domain/names.ts', 'checkpoint/spec.ts'];

function rankOf(file: string): number {
  let best = -1;
  let bestLength = -1;
  LAYERS.forEach((layer, rank) => {
    for (const prefix of layer) {
      const match = prefix.endsWith('/') ? file.startsWith(prefix) : file === prefix;
      if (match && prefix.length > bestLength) {
        best = rank;
        bestLength = prefix.length;
      }
    }
  });
  return best;
}

const startsWithAny = (file: string, prefixes: readonly string[]): boolean => prefixes.some((p) => (p.endsWith('/') ? file.startsWith(p) : file === p));

/** Every relative import of every file of src/, as paths relative to src/. */
function imports(): Array<{ from: string; to: string; spec: string }> {
  const out: Array<{ from: string; to: string; spec: string }> = [];
  for (const file of sources(srcDir)) {
    const sf = ts.createSourceFile(file, readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true);
    const specs: string[] = [];
    const visit = (node: ts.Node): void => {
      if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier !== undefined && ts.isStringLiteral(node.moduleSpecifier)) specs.push(node.moduleSpecifier.text);
      if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword && node.arguments[0] !== undefined && ts.isStringLiteral(node.arguments[0])) specs.push(node.arguments[0].text);
      ts.forEachChild(node, visit);
    };
    visit(sf);
    for (const spec of specs.filter((x) => x.startsWith('.'))) {
      out.push({ from: relative(srcDir, file), to: relative(srcDir, resolve(dirname(file), spec)).replace(/\.js$/, '.ts'), spec });
    }
  }
  return out;
}

describe('code shape', () => {
  it('every file of src/ belongs to a declared layer', () => {
    const unplaced = sources(srcDir).map((f) => relative(srcDir, f)).filter((f) => rankOf(f) < 0);
    assert.deepEqual(unplaced, [], 'add the new folder to LAYERS (and to docs/design.md, "Layers")');
  });

  it('no import climbs: a file imports only its own layer and those below', () => {
    const climbing = imports()
      .filter((i) => rankOf(i.to) > rankOf(i.from))
      .map((i) => `src/${i.from} imports ${i.spec} (src/${i.to}), a higher layer`);
    assert.deepEqual(climbing, []);
  });

  it('the HTTP adapter never imports the CLI (the CLI starts the daemon, nothing more)', () => {
    const crossing = imports()
      .filter((i) => i.from.startsWith('http/') && i.to.startsWith('cli/'))
      .map((i) => `src/${i.from} imports ${i.spec}`);
    assert.deepEqual(crossing, []);
  });

  it('only the QEMU engine and its driver import src/qmp/ and src/qemu/', () => {
    const offenders = imports()
      .filter((i) => startsWithAny(i.to, ['qmp/', 'qemu/']) && !startsWithAny(i.from, QEMU_ENGINE))
      .map((i) => `src/${i.from} imports ${i.spec}`);
    assert.deepEqual(offenders, []);
  });

  it('above the driver interface nothing imports the engine behind it', () => {
    const offenders = imports()
      .filter((i) => startsWithAny(i.from, ABOVE_DRIVER) && startsWithAny(i.to, ENGINE_ONLY) && !SHARED_RULES.includes(i.to))
      .map((i) => `src/${i.from} imports ${i.spec}: use the HypervisorDriver (src/drivers/driver.ts)`);
    assert.deepEqual(offenders, []);
  });

  it('nothing below the CLI reads process.env', () => {
    const readers = sources(srcDir)
      .filter((f) => !relative(srcDir, f).startsWith('cli/'))
      .flatMap((f) => readFileSync(f, 'utf8').split('\n').map((line, i) => ({ f, line, n: i + 1 })))
      .filter((x) => x.line.includes('process.env'))
      .map((x) => `${relative(repoRoot, x.f)}:${x.n}: ${x.line.trim()}`);
    assert.deepEqual(readers, []);
  });

  it('no function in src/ is over 100 lines, or over 60 without a reason above it', () => {
    const bad = sources(srcDir)
      .flatMap((f) => longFunctions(f, 60))
      .filter((f) => f.lines > 100 || !f.reason)
      .map((f) => `${f.where} (${f.lines} lines${f.lines <= 100 ? ', no "Long:" reason' : ''})`);
    assert.deepEqual(bad, []);
  });

  it('libvirt backup and checkpoint XML appear only in src/libvirt, the libvirt driver (it speaks them to libvirt) and the edges (src/cli, src/http)', () => {
    const offenders = sources(srcDir)
      .filter((f) => !/\/src\/(libvirt|drivers\/libvirt|cli|http)\//.test(f))
      .filter((f) => /domainbackup|domaincheckpoint/.test(readFileSync(f, 'utf8')))
      .map((f) => relative(repoRoot, f));
    assert.deepEqual(offenders, []);
  });
});
