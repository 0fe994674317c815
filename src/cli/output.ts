// How CLI commands print: a JSON document with --json, otherwise text for
// people. Errors never go through here; main.ts prints them on stderr.

export interface OutputOptions {
  json: boolean;
}

export function emit(options: OutputOptions, value: unknown, human: () => string): void {
  if (options.json) {
    process.stdout.write(`${JSON.stringify(value ?? null, null, 2)}\n`);
    return;
  }
  const text = human();
  if (text !== '') process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}

/** A plain left-aligned table in the style of virsh. */
export function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    ' ' + cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('   ');
  const sep = '-'.repeat(widths.reduce((a, w) => a + w + 3, 0) + 1);
  return [line(headers), sep, ...rows.map(line)].join('\n');
}
