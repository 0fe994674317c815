// Running the QEMU command-line tools (qemu-img, qemu-io, …). Failures become
// TOOL_FAILED errors that carry the tool's own error text, since that text is
// usually the most precise explanation a user can get.

import { spawn } from 'node:child_process';
import { QbackupError, type ErrorCode } from '../errors.js';

export interface ToolResult {
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Human description of what is being done, used in error messages. */
  what?: string;
  timeoutMs?: number;
  /** Streams stdout to this callback instead of collecting it (ToolResult.stdout is then empty). */
  onStdout?: (chunk: Buffer) => void;
  /** The code of the error when the tool fails (default TOOL_FAILED). */
  errorCode?: ErrorCode;
  /** Written to the tool's standard input, which is then closed (default: no input). */
  input?: string;
}

/** The last lines of a tool's error output, as one line: usually its most precise explanation. */
export function outputTail(chunks: readonly Buffer[], lines = 3): string {
  return Buffer.concat(chunks).toString('utf8').trim().split('\n').slice(-lines).join(' ').trim();
}

export function runTool(command: string, args: readonly string[], options: RunOptions = {}): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    child.stdin.on('error', () => undefined); // a tool that exits without reading its input
    child.stdin.end(options.input ?? '');
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const onStdout = options.onStdout;
    child.stdout.on('data', onStdout !== undefined ? onStdout : (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    let timer: NodeJS.Timeout | undefined;
    if (options.timeoutMs !== undefined) {
      timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs);
    }
    child.on('error', (e) => {
      if (timer) clearTimeout(timer);
      reject(new QbackupError('TOOL_FAILED', `Cannot run "${command}": ${e.message}`, { cause: e }));
    });
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8');
      if (code === 0) {
        resolve({ stdout, stderr });
        return;
      }
      const text = outputTail(err) || outputTail(out);
      const how = signal !== null ? `was killed by ${signal}` : `exited with status ${code ?? '?'}`;
      reject(
        new QbackupError(options.errorCode ?? 'TOOL_FAILED', `${options.what ?? `"${command} ${args.join(' ')}"`} failed: ${text || `${command} ${how}`}`, {
          details: { command, args, code, signal, stderr },
        }),
      );
    });
  });
}
