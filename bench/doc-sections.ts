// docs/benchmarks.md is written by several benches. `npm run bench` writes
// the document; the others (bench/s3.ts, bench/instant.ts, and sections
// measured by hand: the HTTP API, serve-backup, copy) each own a section
// between two markers, `<!-- section:NAME begin -->` and
// `<!-- section:NAME end -->`. A bench replaces its own section and carries
// every other marked section over unchanged.

import { existsSync, readFileSync } from 'node:fs';

const MARKED = /<!-- section:([a-z0-9-]+) begin -->[\s\S]*?<!-- section:\1 end -->/g;

function markers(name: string): { begin: string; end: string } {
  return { begin: `<!-- section:${name} begin -->`, end: `<!-- section:${name} end -->` };
}

/** `section` wrapped in the markers of `name`. */
export function markedSection(name: string, section: string): string {
  const { begin, end } = markers(name);
  return `${begin}\n${section.trim()}\n${end}`;
}

/** `text` with the marked section `name` replaced by `section` (appended when it has none). */
export function withSection(text: string, name: string, section: string): string {
  const { begin, end } = markers(name);
  const a = text.indexOf(begin);
  const b = text.indexOf(end);
  const block = markedSection(name, section);
  return a >= 0 && b > a ? `${text.slice(0, a)}${block}${text.slice(b + end.length)}` : `${text.trimEnd()}\n\n${block}\n`;
}

/** `report` followed by every marked section of the document at `file` that `report` lacks. */
export function keepMarkedSections(file: string, report: string): string {
  if (!existsSync(file)) return report;
  const kept = [...readFileSync(file, 'utf8').matchAll(MARKED)].filter((m) => !report.includes(markers(m[1] ?? '').begin)).map((m) => m[0]);
  return kept.length === 0 ? report : `${report.trimEnd()}\n\n${kept.join('\n\n')}\n`;
}
