// The wire layer of QMP: framing, parsing and validation of what QEMU sends,
// and encoding of what we send. It needs no socket, so every framing edge case
// can be tested by pushing bytes.
//
// Invariants:
// - Bytes from the peer are hostile. A line is never buffered beyond
//   maxLineBytes (+1 for a CR), and nothing leaves this module as a message
//   unless it has been checked field by field against the shape QEMU documents.
// - Every problem with the peer's bytes is reported as a QmpProtocolError
//   (code QMP_PROTOCOL) whose `reason` says which rule was broken; push()
//   reports through onError and only throws what a callback throws.

import { QbackupError } from '../errors.js';
import { assert } from '../util/assert.js';

/** QEMU's default limit on a QMP line is far lower; 16 MiB leaves room for large query replies. */
export const DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024;

export type QmpProtocolErrorReason =
  /** A line grew beyond maxLineBytes. */
  | 'line-too-long'
  /** A line was not valid UTF-8 JSON. */
  | 'malformed-json'
  /** A line was valid JSON but not a JSON object. */
  | 'not-an-object'
  /** An object did not have the shape of any QMP message. */
  | 'invalid-message'
  /** A well-formed message arrived when the protocol does not allow it. */
  | 'unexpected-message';

export class QmpProtocolError extends QbackupError {
  readonly reason: QmpProtocolErrorReason;

  constructor(reason: QmpProtocolErrorReason, message: string, details: Record<string, unknown> = {}) {
    super('QMP_PROTOCOL', message, { details: { reason, ...details } });
    this.name = 'QmpProtocolError';
    this.reason = reason;
  }
}

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  /** Distribution package string, e.g. "Debian 1:7.2+dfsg-7"; may be empty. */
  package: string;
}

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpGreeting {
  kind: 'greeting';
  version: QmpVersion;
  capabilities: string[];
}

export interface QmpReturn {
  kind: 'return';
  /** The id echoed by QEMU; absent when the peer sent none. Any JSON value. */
  id?: unknown;
  value: unknown;
}

export interface QmpErrorReply {
  kind: 'error';
  id?: unknown;
  errorClass: string;
  desc: string;
}

export interface QmpEventMessage {
  kind: 'event';
  event: string;
  /** Empty when QEMU sent no `data` (e.g. STOP, RESUME). */
  data: Record<string, unknown>;
  timestamp: QmpTimestamp;
}

export type QmpMessage = QmpGreeting | QmpReturn | QmpErrorReply | QmpEventMessage;

/** An event as the client hands it out: numbered in arrival order, starting at 1. */
export interface QmpEvent {
  readonly seq: number;
  readonly event: string;
  readonly data: Readonly<Record<string, unknown>>;
  readonly timestamp: Readonly<QmpTimestamp>;
}

export interface QmpLineParserOptions {
  /** Longest accepted line in bytes, excluding the line terminator. Default 16 MiB. */
  maxLineBytes?: number;
  onMessage: (message: Record<string, unknown>) => void;
  onError: (error: QmpProtocolError) => void;
}

const NEWLINE = 0x0a;
const CARRIAGE_RETURN = 0x0d;
const EXCERPT_CHARS = 80;

/**
 * Splits a byte stream into lines and parses each as a JSON object.
 *
 * After an error the parser resynchronises at the next newline, so it can keep
 * going; whether that makes sense is the caller's decision (the client closes).
 */
export class QmpLineParser {
  readonly maxLineBytes: number;
  private readonly onMessage: (message: Record<string, unknown>) => void;
  private readonly onError: (error: QmpProtocolError) => void;
  private readonly decoder = new TextDecoder('utf-8', { fatal: true });
  private pending: Buffer[] = [];
  private pendingLength = 0;
  /** Set once an oversized line has been reported; its remaining bytes are skipped, not stored. */
  private discarding = false;

  constructor(options: QmpLineParserOptions) {
    const maxLineBytes = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!Number.isSafeInteger(maxLineBytes) || maxLineBytes < 1) {
      throw new QbackupError('INVALID_ARGUMENT', `maxLineBytes must be a positive integer, got ${String(maxLineBytes)}`);
    }
    this.maxLineBytes = maxLineBytes;
    this.onMessage = options.onMessage;
    this.onError = options.onError;
  }

  /** Bytes of an unfinished line held (0 when the stream is at a line boundary). */
  get bufferedBytes(): number {
    return this.pendingLength;
  }

  push(chunk: Buffer): void {
    let start = 0;
    while (start < chunk.length) {
      const newline = chunk.indexOf(NEWLINE, start);
      if (newline === -1) {
        this.append(chunk.subarray(start));
        return;
      }
      this.finishLine(chunk.subarray(start, newline));
      start = newline + 1;
    }
  }

  private append(part: Buffer): void {
    if (this.discarding || part.length === 0) return;
    const total = this.pendingLength + part.length;
    // +1: the line may still turn out to end in a CR, which does not count.
    if (total > this.maxLineBytes + 1) {
      this.discarding = true;
      this.reportTooLong(total);
      return;
    }
    // The caller may reuse its buffer once push returns, so a retained tail is copied.
    this.pending.push(Buffer.from(part));
    this.pendingLength = total;
  }

  private finishLine(tail: Buffer): void {
    if (this.discarding) {
      this.discarding = false;
      return;
    }
    const total = this.pendingLength + tail.length;
    const endsInCr = tail.length > 0 ? tail[tail.length - 1] === CARRIAGE_RETURN : this.lastPendingByteIsCr();
    const contentLength = endsInCr ? total - 1 : total;
    // Checked before concatenating, so an oversized line is never copied.
    if (contentLength > this.maxLineBytes) {
      this.reportTooLong(contentLength);
      return;
    }
    let line: Buffer;
    if (this.pending.length === 0) {
      line = tail;
    } else {
      this.pending.push(tail);
      line = Buffer.concat(this.pending, total);
    }
    this.pending = [];
    this.pendingLength = 0;
    this.parseLine(endsInCr ? line.subarray(0, contentLength) : line);
  }

  private lastPendingByteIsCr(): boolean {
    const last = this.pending[this.pending.length - 1];
    return last !== undefined && last.length > 0 && last[last.length - 1] === CARRIAGE_RETURN;
  }

  private reportTooLong(seen: number): void {
    this.pending = [];
    this.pendingLength = 0;
    this.onError(
      new QmpProtocolError(
        'line-too-long',
        `QMP peer sent a line longer than ${this.maxLineBytes} bytes (at least ${seen})`,
        { maxLineBytes: this.maxLineBytes },
      ),
    );
  }

  private parseLine(line: Buffer): void {
    let text: string;
    try {
      text = this.decoder.decode(line);
    } catch {
      this.onError(new QmpProtocolError('malformed-json', 'QMP peer sent a line that is not valid UTF-8'));
      return;
    }
    // Blank lines carry nothing; QEMU does not send them, but they are harmless.
    if (text.trim() === '') return;
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      // Catches RangeError from absurd nesting as well as SyntaxError.
      this.onError(new QmpProtocolError('malformed-json', `QMP peer sent a line that is not JSON: ${excerpt(text)}`));
      return;
    }
    if (!isPlainObject(value)) {
      this.onError(new QmpProtocolError('not-an-object', `QMP peer sent JSON that is not an object: ${excerpt(text)}`));
      return;
    }
    this.onMessage(value);
  }
}

/** The line QEMU expects for one command. `id` is echoed back in the reply. */
export function encodeCommand(id: number | string, command: string, args?: Record<string, unknown>): string {
  if (typeof command !== 'string' || command === '') {
    throw new QbackupError('INVALID_ARGUMENT', 'QMP command name must be a non-empty string');
  }
  assert(args === undefined || isPlainObject(args), `arguments of QMP command "${command}" must be an object`);
  const message: Record<string, unknown> = { execute: command };
  if (args !== undefined) message['arguments'] = args;
  message['id'] = id;
  let line: string;
  try {
    line = JSON.stringify(message);
  } catch (err) {
    // Cycles and BigInts are caller bugs, but they must not reach the socket half-written.
    throw new QbackupError('INVALID_ARGUMENT', `arguments of QMP command "${command}" cannot be encoded as JSON`, {
      cause: err,
    });
  }
  // JSON.stringify escapes control characters, so a raw newline can only be the terminator.
  return `${line}\n`;
}

/** Checks a parsed object against the four QMP message shapes. Throws QmpProtocolError. */
export function classifyMessage(value: Record<string, unknown>): QmpMessage {
  const kinds = ['QMP', 'return', 'error', 'event'].filter((key) => Object.hasOwn(value, key));
  if (kinds.length !== 1) {
    throw invalid(
      kinds.length === 0 ? 'QMP message has none of QMP, return, error, event' : `QMP message mixes ${kinds.join(', ')}`,
      value,
    );
  }
  const hasId = Object.hasOwn(value, 'id');
  switch (kinds[0]) {
    case 'QMP':
      return parseGreeting(value['QMP'], value);
    case 'return': {
      const reply: QmpReturn = { kind: 'return', value: value['return'] };
      if (hasId) reply.id = value['id'];
      return reply;
    }
    case 'error': {
      const error = value['error'];
      if (!isPlainObject(error) || typeof error['class'] !== 'string' || typeof error['desc'] !== 'string') {
        throw invalid('QMP error reply lacks string class and desc', value);
      }
      const reply: QmpErrorReply = { kind: 'error', errorClass: error['class'], desc: error['desc'] };
      if (hasId) reply.id = value['id'];
      return reply;
    }
    default:
      return parseEvent(value);
  }
}

function parseGreeting(body: unknown, whole: Record<string, unknown>): QmpGreeting {
  if (!isPlainObject(body)) throw invalid('QMP greeting is not an object', whole);
  const version = body['version'];
  if (!isPlainObject(version)) throw invalid('QMP greeting lacks version', whole);
  const qemu = version['qemu'];
  if (!isPlainObject(qemu)) throw invalid('QMP greeting lacks version.qemu', whole);
  const { major, minor, micro } = qemu;
  if (!isVersionNumber(major) || !isVersionNumber(minor) || !isVersionNumber(micro)) {
    throw invalid('QMP greeting has a malformed QEMU version', whole);
  }
  const pkg = version['package'] ?? '';
  if (typeof pkg !== 'string') throw invalid('QMP greeting has a non-string version.package', whole);
  const capabilities = body['capabilities'];
  if (!Array.isArray(capabilities) || !capabilities.every((c): c is string => typeof c === 'string')) {
    throw invalid('QMP greeting lacks a capabilities list of strings', whole);
  }
  return { kind: 'greeting', version: { qemu: { major, minor, micro }, package: pkg }, capabilities: [...capabilities] };
}

function parseEvent(value: Record<string, unknown>): QmpEventMessage {
  const event = value['event'];
  if (typeof event !== 'string' || event === '') throw invalid('QMP event has no name', value);
  const data = value['data'] ?? {};
  if (!isPlainObject(data)) throw invalid(`QMP event ${event} has non-object data`, value);
  const timestamp = value['timestamp'];
  if (
    !isPlainObject(timestamp) ||
    typeof timestamp['seconds'] !== 'number' ||
    typeof timestamp['microseconds'] !== 'number' ||
    !Number.isFinite(timestamp['seconds']) ||
    !Number.isFinite(timestamp['microseconds'])
  ) {
    throw invalid(`QMP event ${event} has a malformed timestamp`, value);
  }
  return {
    kind: 'event',
    event,
    data,
    timestamp: { seconds: timestamp['seconds'], microseconds: timestamp['microseconds'] },
  };
}

function isVersionNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function invalid(what: string, value: Record<string, unknown>): QmpProtocolError {
  return new QmpProtocolError('invalid-message', `${what}: ${excerpt(safeStringify(value))}`);
}

function safeStringify(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    // Only feeds an error message about the value; the message must not fail over it.
    return '[unprintable]';
  }
}

/** Peer text goes into error messages, so it is cut short and escaped to keep terminals and logs intact. */
function excerpt(text: string): string {
  const cut = text.length > EXCERPT_CHARS ? `${text.slice(0, EXCERPT_CHARS)}…` : text;
  return JSON.stringify(cut);
}
