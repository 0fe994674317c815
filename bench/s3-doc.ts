// The S3 section of docs/benchmarks.md is written by `npm run bench:s3`
// (bench/s3.ts) between two markers; `npm run bench`, which writes the rest
// of the document, carries that section over unchanged.

import { existsSync, readFileSync } from 'node:fs';

export const S3_BEGIN = '<!-- bench:s3 begin -->';
export const S3_END = '<!-- bench:s3 end -->';

/** The marked S3 section of the document at `file`, or undefined. */
function s3Section(text: string): string | undefined {
  const a = text.indexOf(S3_BEGIN);
  const b = text.indexOf(S3_END);
  return a >= 0 && b > a ? text.slice(a, b + S3_END.length) : undefined;
}

/** `report` with the S3 section of the current document (if any) appended. */
export function keepS3Section(file: string, report: string): string {
  const old = existsSync(file) ? s3Section(readFileSync(file, 'utf8')) : undefined;
  return old === undefined ? report : `${report.trimEnd()}\n\n${old}\n`;
}

/** `text` with its S3 section replaced by `section` (appended when it has none). */
export function withS3Section(text: string, section: string): string {
  const block = `${S3_BEGIN}\n${section.trim()}\n${S3_END}`;
  const old = s3Section(text);
  return old === undefined ? `${text.trimEnd()}\n\n${block}\n` : text.replace(old, block);
}
