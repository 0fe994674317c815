// The shape rules of the library's code, checked on the sources so they stay
// true: libvirt XML lives only at the edges (src/libvirt, src/cli, src/http), and no
// function is longer than 100 lines, nor longer than 60 without a reason
// written above it ("Long: …" in its leading comment).

import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
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

describe('code shape', () => {
  it('no function in src/ is over 100 lines, or over 60 without a reason above it', () => {
    const bad = sources(srcDir)
      .flatMap((f) => longFunctions(f, 60))
      .filter((f) => f.lines > 100 || !f.reason)
      .map((f) => `${f.where} (${f.lines} lines${f.lines <= 100 ? ', no "Long:" reason' : ''})`);
    assert.deepEqual(bad, []);
  });

  it('libvirt backup and checkpoint XML appear only in src/libvirt and the edges (src/cli, src/http)', () => {
    const offenders = sources(srcDir)
      .filter((f) => !/\/src\/(libvirt|cli|http)\//.test(f))
      .filter((f) => /domainbackup|domaincheckpoint/.test(readFileSync(f, 'utf8')))
      .map((f) => relative(repoRoot, f));
    assert.deepEqual(offenders, []);
  });
});
