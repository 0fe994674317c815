// A small client of the QEMU guest agent (qemu-ga) over the unix socket QEMU
// listens on for the domain's org.qemu.guest_agent.0 virtio-serial port.
//
// The protocol is QMP's JSON without a greeting, capabilities or events: one
// command, one answer ({"return": …} or {"error": {class, desc}}). The socket
// carries no session: a previous client's late answer, or half a command it
// left in the agent's parser, may still be in flight. So every connection
// starts with the documented resynchronisation: a 0xFF byte (resets the
// agent's JSON parser), then guest-sync-delimited with a random id; the agent
// writes 0xFF before that answer, and everything before it is discarded, as
// are answers with another id.
//
// Invariants:
// - One command at a time; an answer is matched to the one in flight.
// - Every wait has a deadline; on a timeout the connection is closed (a late
//   answer would otherwise be taken for the next command's).
// - Lines are capped (MAX_LINE_BYTES): the guest is not trusted.
// - close() is idempotent and fails the command in flight.

import { randomInt } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { QbackupError } from '../errors.js';

const MAX_LINE_BYTES = 1 << 20;
const DELIMITER = 0xff;

/**
 * The pure part: bytes in, parsed JSON answers out. Until `expectDelimiter`
 * is cleared by a 0xFF byte, everything is dropped.
 */
export class AgentAnswerParser {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private skipping = false;

  /** Drops everything up to and including the next 0xFF byte. */
  expectDelimiter(): void {
    this.skipping = true;
    this.pending = [];
    this.pendingBytes = 0;
  }

  /**
   * Feeds bytes; returns the answers completed by them, an Error for a line
   * that is not a JSON object. Throws on a line over the cap.
   */
  push(chunk: Buffer): Array<object | Error> {
    let data = chunk;
    if (this.skipping) {
      const at = data.indexOf(DELIMITER);
      if (at < 0) return [];
      this.skipping = false;
      data = data.subarray(at + 1);
    }
    // 0xFF never occurs in UTF-8 JSON: another delimiter (a previous client's synced answer) is dropped.
    if (data.includes(DELIMITER)) data = Buffer.from(data.filter((b) => b !== DELIMITER));
    const out: Array<object | Error> = [];
    for (;;) {
      const nl = data.indexOf(0x0a);
      if (nl < 0) break;
      const line = Buffer.concat([...this.pending, data.subarray(0, nl)]).toString('utf8');
      this.pending = [];
      this.pendingBytes = 0;
      data = data.subarray(nl + 1);
      if (line.trim() !== '') out.push(parseAnswer(line));
    }
    if (data.length > 0) {
      this.pendingBytes += data.length;
      if (this.pendingBytes > MAX_LINE_BYTES) throw new Error(`an answer longer than ${MAX_LINE_BYTES} bytes`);
      this.pending.push(Buffer.from(data));
    }
    return out;
  }
}

function parseAnswer(line: string): object | Error {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return new Error('an answer that is not JSON');
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return new Error('an answer that is not a JSON object');
  return value;
}

export interface GuestAgentOptions {
  /** Connecting and the resynchronisation. Default 5 s. */
  connectTimeoutMs?: number;
  /** Default for each command. Default 10 s. */
  timeoutMs?: number;
}

type State = 'connecting' | 'ready' | 'closed';

interface InFlight {
  command: string;
  resolve: (answer: object) => void;
  reject: (err: Error) => void;
}

/** A connected, synchronised guest agent. Use `await using`, or close(). */
export class GuestAgentClient implements AsyncDisposable {
  private state: State = 'connecting';
  private readonly parser = new AgentAnswerParser();
  private inFlight: InFlight | undefined;
  private closeCause: Error | undefined;
  /** While resynchronising: the id whose answer ends it; anything else is a previous client's and dropped. */
  private syncId: number | undefined;

  private constructor(
    private readonly socket: Socket,
    readonly socketPath: string,
    readonly domain: string,
    private readonly options: GuestAgentOptions,
  ) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new Error('the connection closed')));
  }

  /** Connects to the agent's socket and resynchronises; fails with GUEST_AGENT when the agent does not answer in time. */
  static async connect(socketPath: string, domain: string, options: GuestAgentOptions = {}): Promise<GuestAgentClient> {
    const timeoutMs = options.connectTimeoutMs ?? 5_000;
    const socket = connect(socketPath);
    const client = new GuestAgentClient(socket, socketPath, domain, options);
    try {
      await withDeadline(
        new Promise<void>((resolve, reject) => {
          socket.once('connect', resolve);
          socket.once('error', reject);
        }),
        timeoutMs,
        `connecting to "${socketPath}"`,
      );
      await client.sync(timeoutMs);
    } catch (err) {
      client.close();
      throw agentError(domain, 'guest-sync', err);
    }
    client.state = 'ready';
    return client;
  }

  private async sync(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    this.syncId = id;
    this.parser.expectDelimiter();
    this.socket.write(Buffer.from([DELIMITER]));
    await this.send('guest-sync-delimited', { id }, timeoutMs);
  }

  /** Runs one command and returns its `return` value; an {"error"} answer, a timeout or a closed connection throws GUEST_AGENT. */
  async execute<T>(command: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T> {
    if (this.state !== 'ready') throw agentError(this.domain, command, new Error(`the connection is ${this.state}`));
    let answer: object;
    try {
      answer = await this.send(command, args, timeoutMs ?? this.options.timeoutMs ?? 10_000);
    } catch (err) {
      throw agentError(this.domain, command, err);
    }
    const error = (answer as { error?: { desc?: unknown } }).error;
    if (error !== undefined) throw agentError(this.domain, command, new Error(typeof error.desc === 'string' ? error.desc : JSON.stringify(error)));
    return (answer as { return?: unknown }).return as T;
  }

  /** Freezes every filesystem the agent can freeze; returns how many. */
  async freeze(timeoutMs?: number): Promise<number> {
    return this.execute<number>('guest-fsfreeze-freeze', undefined, timeoutMs);
  }

  /** Thaws the guest's filesystems; returns how many were thawed. */
  async thaw(timeoutMs?: number): Promise<number> {
    return this.execute<number>('guest-fsfreeze-thaw', undefined, timeoutMs);
  }

  async freezeStatus(): Promise<'frozen' | 'thawed'> {
    return this.execute<'frozen' | 'thawed'>('guest-fsfreeze-status');
  }

  private send(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<object> {
    if (this.state === 'closed') return Promise.reject(this.closeCause ?? new Error('the connection is closed'));
    if (this.inFlight !== undefined) return Promise.reject(new Error(`"${this.inFlight.command}" is still running`));
    const answer = new Promise<object>((resolve, reject) => {
      this.inFlight = { command, resolve, reject };
    });
    this.socket.write(`${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`);
    return withDeadline(answer, timeoutMs, `"${command}"`).catch((err: unknown) => {
      // Out of step with the agent from here on: nothing more can be trusted.
      this.close();
      throw err;
    });
  }

  private onData(chunk: Buffer): void {
    let answers: object[];
    try {
      answers = this.parser.push(chunk);
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    for (const answer of answers) {
      if (this.syncId !== undefined) {
        if (answer instanceof Error || (answer as { return?: unknown }).return !== this.syncId) continue;
        this.syncId = undefined;
      } else if (answer instanceof Error) {
        this.fail(answer);
        return;
      }
      const waiting = this.inFlight;
      this.inFlight = undefined;
      waiting?.resolve(answer);
    }
  }

  private fail(cause: Error): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.closeCause = cause;
    this.socket.destroy();
    const waiting = this.inFlight;
    this.inFlight = undefined;
    waiting?.reject(cause);
  }

  close(): void {
    this.fail(new Error('the connection was closed by qbackup'));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }
}

function withDeadline<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer to ${what} in ${Math.round(timeoutMs / 100) / 10} s`)), timeoutMs);
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}

function agentError(domain: string, command: string, cause: unknown): QbackupError {
  if (cause instanceof QbackupError) return cause;
  const reason = cause instanceof Error ? cause.message : String(cause);
  return new QbackupError('GUEST_AGENT', `The guest agent of domain "${domain}" failed "${command}": ${reason}`, { cause });
}
