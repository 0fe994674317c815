// The fixed-newstyle NBD handshake as a state machine without I/O, after
// libnbd's generator/states-newstyle-opt-*.c: the server's bytes go in
// through push(), the bytes to send come out of takeOutput(), and each step
// of the negotiation is one small named method. The connection only pumps
// socket bytes through it, so every good and hostile handshake can be tested
// by feeding bytes.
//
// Steps, in the only order they can run:
//   recvGreeting → recvHandshakeFlags → (send client flags)
//   [startStartTls → recvStartTlsReply → tls-upgrade … tlsEstablished]   only with TLS
//   startStructuredReply → recvStructuredReplyReply
//   [startMetaContext → recvMetaContextReply …]   only with structured replies and contexts asked for
//   startGo → recvGoReply …                        NBD_REP_ERR_UNSUP falls back to:
//   [startExportName → recvExportNameReply → recvExportNameZeroes]
//   → done
//
// Invariants:
// - Bytes from the server are hostile: a step takes exactly the bytes its
//   message has, an option reply must answer the option in flight, and its
//   payload is capped (MAX_OPTION_REPLY_BYTES) before a byte of it is held.
// - Every step asserts the state it must be entered in; a failed assertion
//   is a bug here, never something a server can cause.
// - With TLS asked for, NBD_OPT_STARTTLS is the first option and every later
//   one goes over TLS. The handshake never continues in the clear: a server
//   that refuses STARTTLS (unsupported, policy, anything) ends it with
//   NBD_TLS, and bytes sent in the clear after its ACK are a violation. The
//   TLS session itself is the connection's work: in step `tls-upgrade` the
//   handshake waits until the connection calls tlsEstablished().
// - The first refusal or violation ends the handshake in `failed` with a
//   QbackupError (NbdProtocolError naming the export for violations); after
//   that push() drops its input; after `done` it only queues bytes: what
//   follows the handshake is transmission data, for takeLeftover().

import { QbackupError } from '../errors.js';
import { assert } from '../util/assert.js';
import {
  NBD_DEFAULT_MAX_PAYLOAD,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAX_STRING,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  isNbdReplyError,
  nbdOptionName,
  nbdReplyName,
} from './constants.js';
import {
  decodeExportNameReply,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOptionErrorMessage,
  decodeOptionReplyHeader,
  decodeServerHello,
  encodeClientFlags,
  encodeExportNameOption,
  encodeGoOption,
  encodeMetaContextOption,
  encodeOption,
  encodeStructuredReplyOption,
  type NbdBlockSizes,
  type NbdExportNameReply,
} from './codec.js';
import { NbdProtocolError } from './errors.js';
import { ByteQueue } from './byte-queue.js';

/** Option replies carry at most a string of NBD_MAX_STRING bytes plus fixed fields. */
export const MAX_OPTION_REPLY_BYTES = NBD_MAX_STRING + 16;
/** Bytes of the server greeting: NBDMAGIC and IHAVEOPT (or the oldstyle magic). */
const GREETING_BYTES = 16;
/** Bytes of the reply to NBD_OPT_EXPORT_NAME before its optional zero padding. */
const EXPORT_NAME_REPLY_BYTES = 10;
const EXPORT_NAME_ZEROES_BYTES = 124;

/** What the handshake settled. */
export interface NbdNegotiated {
  exportName: string;
  size: number;
  /** NBD_FLAG_* transmission flags. */
  transmissionFlags: number;
  blockSizes: NbdBlockSizes;
  /** False when the server sent no NBD_INFO_BLOCK_SIZE and the spec's defaults apply. */
  blockSizesAdvertised: boolean;
  structuredReplies: boolean;
  /** True when everything after NBD_OPT_STARTTLS, transmission included, runs over TLS. */
  tls: boolean;
  /** Contexts the server selected: name → context id. */
  contexts: ReadonlyMap<string, number>;
  /** NBD_INFO_NAME, when the server sent one. */
  canonicalName: string | undefined;
  /** NBD_INFO_DESCRIPTION, when the server sent one. */
  description: string | undefined;
}

export interface NbdHandshakeOptions {
  exportName: string;
  /** Metadata contexts to select; already checked, without duplicates. */
  metaContexts: readonly string[];
  /** The server as shown in messages: "unix:/path" or "host:port". */
  address: string;
  /** Start with NBD_OPT_STARTTLS and go on only over TLS. */
  tls?: boolean;
}

/** Where the handshake is: the message it waits for, or how it ended. */
export type NbdHandshakeStep =
  | { readonly name: 'greeting' }
  | { readonly name: 'handshake-flags' }
  | { readonly name: 'option-reply-header'; readonly option: number }
  | { readonly name: 'option-reply-payload'; readonly option: number; readonly reply: number; readonly length: number }
  /** The server accepted NBD_OPT_STARTTLS: the connection sets up TLS, then calls tlsEstablished(). */
  | { readonly name: 'tls-upgrade' }
  | { readonly name: 'export-name-reply' }
  | { readonly name: 'export-name-zeroes'; readonly reply: NbdExportNameReply }
  | { readonly name: 'done' }
  | { readonly name: 'failed' };

export type NbdHandshakeStatus = 'running' | 'done' | 'failed';

/** What NBD_OPT_GO has told so far. */
interface GoInfo {
  exportInfo: { size: number; transmissionFlags: number } | undefined;
  blockSizes: NbdBlockSizes | undefined;
  canonicalName: string | undefined;
  description: string | undefined;
}

export class NbdHandshake {
  readonly exportName: string;
  readonly address: string;
  private readonly metaContexts: readonly string[];
  private readonly tlsRequired: boolean;
  private tlsActive = false;
  private readonly input = new ByteQueue();
  private output: Buffer[] = [];
  private stepValue: NbdHandshakeStep = { name: 'greeting' };
  private errorValue: QbackupError | undefined;
  private resultValue: NbdNegotiated | undefined;
  private clientFlagsSent = false;
  private noZeroes = false;
  private structuredReplies = false;
  private contexts = new Map<string, number>();
  private readonly go: GoInfo = { exportInfo: undefined, blockSizes: undefined, canonicalName: undefined, description: undefined };

  constructor(options: NbdHandshakeOptions) {
    this.exportName = options.exportName;
    this.address = options.address;
    this.metaContexts = options.metaContexts;
    this.tlsRequired = options.tls === true;
  }

  get step(): NbdHandshakeStep {
    return this.stepValue;
  }

  get status(): NbdHandshakeStatus {
    const name = this.stepValue.name;
    return name === 'done' || name === 'failed' ? name : 'running';
  }

  /** Why the handshake failed; undefined unless status is 'failed'. */
  get error(): QbackupError | undefined {
    return this.errorValue;
  }

  /** What was settled; only once status is 'done'. */
  get result(): NbdNegotiated {
    assert(this.resultValue !== undefined, 'NBD handshake has not finished');
    return this.resultValue;
  }

  /** True once our client flags are out: from then on a refusal is answered with NBD_OPT_ABORT. */
  get optionsStarted(): boolean {
    return this.clientFlagsSent;
  }

  /** Server bytes received and not yet consumed by a step. */
  get bufferedBytes(): number {
    return this.input.length;
  }

  /** Feeds server bytes and runs every step they complete. Throws only on a bug. */
  push(bytes: Buffer): void {
    // After a failure nothing the server says matters, and holding it would let it grow without bound.
    if (this.status === 'failed') return;
    this.input.push(bytes);
    try {
      for (;;) {
        if (this.stepValue.name === 'tls-upgrade') {
          // Anything now is either a TLS record for the connection's TLS layer, which never reaches here, or plaintext.
          if (this.input.length > 0) {
            throw new NbdProtocolError('unexpected-reply', `server sent ${this.input.length} bytes in the clear after accepting NBD_OPT_STARTTLS`);
          }
          return;
        }
        const needed = this.bytesNeeded();
        if (needed === undefined) return;
        const piece = this.input.take(needed);
        if (piece === undefined) return;
        this.receive(piece);
      }
    } catch (err) {
      if (!(err instanceof QbackupError)) throw err;
      this.fail(err);
    }
  }

  /** Bytes to send to the server, in order, since the last call (empty when there are none). */
  takeOutput(): Buffer {
    const out = this.output.length === 1 ? (this.output[0] ?? Buffer.alloc(0)) : Buffer.concat(this.output);
    this.output = [];
    return out;
  }

  /** Bytes that arrived after the handshake ended: the start of transmission. */
  takeLeftover(): Buffer {
    assert(this.status !== 'running', 'leftover bytes are taken after the handshake ended');
    return this.input.takeAll();
  }

  // ---- Dispatch --------------------------------------------------------------

  /** How many bytes the current step consumes; undefined once the handshake ended. */
  private bytesNeeded(): number | undefined {
    const step = this.stepValue;
    switch (step.name) {
      case 'greeting':
        return GREETING_BYTES;
      case 'handshake-flags':
        return 2;
      case 'option-reply-header':
        return NBD_OPTION_REPLY_HEADER_SIZE;
      case 'option-reply-payload':
        return step.length;
      case 'export-name-reply':
        return EXPORT_NAME_REPLY_BYTES;
      case 'export-name-zeroes':
        return EXPORT_NAME_ZEROES_BYTES;
      case 'tls-upgrade':
      case 'done':
      case 'failed':
        return undefined;
    }
  }

  private receive(bytes: Buffer): void {
    const step = this.stepValue;
    switch (step.name) {
      case 'greeting':
        return this.recvGreeting(bytes);
      case 'handshake-flags':
        return this.recvHandshakeFlags(bytes);
      case 'option-reply-header':
        return this.recvOptionReplyHeader(step.option, bytes);
      case 'option-reply-payload':
        return this.recvOptionReply(step.option, step.reply, bytes);
      case 'export-name-reply':
        return this.recvExportNameReply(bytes);
      case 'export-name-zeroes':
        return this.finish(step.reply, false);
      case 'tls-upgrade':
      case 'done':
      case 'failed':
        assert(false, `NBD handshake received bytes in step ${step.name}`);
    }
  }

  private send(bytes: Buffer): void {
    this.output.push(bytes);
  }

  private fail(error: QbackupError): void {
    this.errorValue = error instanceof NbdProtocolError ? error.forExport(this.exportName) : error;
    this.stepValue = { name: 'failed' };
  }

  // ---- Greeting ----------------------------------------------------------------

  private recvGreeting(bytes: Buffer): void {
    assert(this.stepValue.name === 'greeting', 'greeting is the first step');
    if (decodeServerHello(bytes) === 'oldstyle') {
      throw new QbackupError(
        'NBD_HANDSHAKE',
        `NBD server at ${this.address} uses the oldstyle handshake, which cannot select export "${this.exportName}"; a newstyle server is required`,
        { details: { exportName: this.exportName, address: this.address } },
      );
    }
    this.stepValue = { name: 'handshake-flags' };
  }

  private recvHandshakeFlags(bytes: Buffer): void {
    assert(this.stepValue.name === 'handshake-flags' && !this.clientFlagsSent, 'handshake flags follow the greeting, once');
    const handshakeFlags = bytes.readUInt16BE(0);
    if ((handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) === 0) {
      throw new QbackupError(
        'NBD_HANDSHAKE',
        `NBD server at ${this.address} does not support fixed newstyle negotiation, which export "${this.exportName}" needs`,
        { details: { exportName: this.exportName, address: this.address, handshakeFlags } },
      );
    }
    this.noZeroes = (handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
    this.send(encodeClientFlags(NBD_FLAG_C_FIXED_NEWSTYLE | (this.noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));
    this.clientFlagsSent = true;
    if (this.tlsRequired) this.startStartTls();
    else this.startStructuredReply();
  }

  // ---- Option replies (shared framing) -------------------------------------------

  private expectOptionReply(option: number): void {
    this.stepValue = { name: 'option-reply-header', option };
  }

  private recvOptionReplyHeader(option: number, bytes: Buffer): void {
    const header = decodeOptionReplyHeader(bytes);
    if (header.option !== option) {
      throw new NbdProtocolError('unexpected-reply', `option reply is for ${nbdOptionName(header.option)}, but ${nbdOptionName(option)} was sent`);
    }
    if (header.length > MAX_OPTION_REPLY_BYTES) {
      throw new NbdProtocolError(
        'bad-length',
        `${nbdReplyName(header.reply)} to ${nbdOptionName(option)} has length ${header.length}, more than ${MAX_OPTION_REPLY_BYTES}`,
      );
    }
    this.stepValue = { name: 'option-reply-payload', option, reply: header.reply, length: header.length };
  }

  private recvOptionReply(option: number, reply: number, payload: Buffer): void {
    switch (option) {
      case NBD_OPT_STARTTLS:
        return this.recvStartTlsReply(reply, payload);
      case NBD_OPT_STRUCTURED_REPLY:
        return this.recvStructuredReplyReply(reply, payload);
      case NBD_OPT_SET_META_CONTEXT:
        return this.recvMetaContextReply(reply, payload);
      case NBD_OPT_GO:
        return this.recvGoReply(reply, payload);
      default:
        assert(false, `NBD handshake waits for a reply to ${nbdOptionName(option)}, which it never sends`);
    }
  }

  // ---- NBD_OPT_STARTTLS -------------------------------------------------------------

  private startStartTls(): void {
    assert(this.clientFlagsSent && this.tlsRequired && !this.tlsActive, 'NBD_OPT_STARTTLS is the first option, sent once');
    this.send(encodeOption(NBD_OPT_STARTTLS));
    this.expectOptionReply(NBD_OPT_STARTTLS);
  }

  private recvStartTlsReply(reply: number, payload: Buffer): void {
    if (reply === NBD_REP_ACK) {
      checkEmptyAck(NBD_OPT_STARTTLS, payload);
      this.stepValue = { name: 'tls-upgrade' };
    } else if (isNbdReplyError(reply)) {
      // Whatever the refusal, never go on in the clear.
      throw this.tlsRefused(reply, payload);
    } else {
      throw unexpectedOptionReply(NBD_OPT_STARTTLS, reply);
    }
  }

  /**
   * The connection finished the TLS handshake the server agreed to: every
   * later byte, both ways, goes over TLS. Negotiation goes on from the first
   * option. Returns nothing; the next bytes to send are in takeOutput().
   */
  tlsEstablished(): void {
    assert(this.stepValue.name === 'tls-upgrade', 'tlsEstablished() follows an accepted NBD_OPT_STARTTLS');
    this.tlsActive = true;
    this.startStructuredReply();
  }

  private tlsRefused(reply: number, payload: Buffer): QbackupError {
    const serverMessage = decodeOptionErrorMessage(payload);
    const why =
      reply === NBD_REP_ERR_UNSUP
        ? 'the server does not support TLS'
        : reply === NBD_REP_ERR_POLICY
          ? 'the server refused TLS by policy'
          : reply === NBD_REP_ERR_INVALID
            ? 'the server refused NBD_OPT_STARTTLS as invalid'
            : `the server answered NBD_OPT_STARTTLS with ${nbdReplyName(reply)}`;
    return new QbackupError(
      'NBD_TLS',
      `Cannot open NBD export "${this.exportName}" on ${this.address} with TLS: ${why}, and qbackup does not fall back to an unencrypted connection${serverMessage === '' ? '' : ` (server: ${serverMessage})`}`,
      { details: { exportName: this.exportName, address: this.address, option: nbdOptionName(NBD_OPT_STARTTLS), reply: nbdReplyName(reply), serverMessage } },
    );
  }

  // ---- NBD_OPT_STRUCTURED_REPLY ----------------------------------------------------

  private startStructuredReply(): void {
    assert(this.clientFlagsSent && !this.structuredReplies && this.tlsActive === this.tlsRequired, 'NBD_OPT_STRUCTURED_REPLY is the first option (after TLS, when asked for)');
    this.send(encodeStructuredReplyOption());
    this.expectOptionReply(NBD_OPT_STRUCTURED_REPLY);
  }

  private recvStructuredReplyReply(reply: number, payload: Buffer): void {
    if (reply === NBD_REP_ACK) {
      checkEmptyAck(NBD_OPT_STRUCTURED_REPLY, payload);
      this.structuredReplies = true;
    } else if (isNbdReplyError(reply)) {
      // Any other refusal: go on with simple replies.
      this.throwIfFatalOptionError(NBD_OPT_STRUCTURED_REPLY, reply, payload);
    } else {
      throw unexpectedOptionReply(NBD_OPT_STRUCTURED_REPLY, reply);
    }
    if (this.structuredReplies && this.metaContexts.length > 0) this.startMetaContext();
    else this.startGo();
  }

  // ---- NBD_OPT_SET_META_CONTEXT ------------------------------------------------------

  private startMetaContext(): void {
    assert(this.structuredReplies && this.metaContexts.length > 0, 'metadata contexts need structured replies and a query');
    this.send(encodeMetaContextOption(this.exportName, this.metaContexts, NBD_OPT_SET_META_CONTEXT));
    this.expectOptionReply(NBD_OPT_SET_META_CONTEXT);
  }

  private recvMetaContextReply(reply: number, payload: Buffer): void {
    if (reply === NBD_REP_META_CONTEXT) {
      const { contextId, name } = decodeMetaContextReply(payload);
      if (!this.metaContexts.includes(name)) {
        throw new NbdProtocolError('bad-context', `server selected metadata context "${name}", which was not requested`);
      }
      if (this.contexts.has(name) || [...this.contexts.values()].includes(contextId)) {
        throw new NbdProtocolError('bad-context', `server selected metadata context "${name}" (id ${contextId}) twice or reused its id`);
      }
      this.contexts.set(name, contextId);
      this.expectOptionReply(NBD_OPT_SET_META_CONTEXT);
      return;
    }
    if (reply === NBD_REP_ACK) {
      checkEmptyAck(NBD_OPT_SET_META_CONTEXT, payload);
    } else if (isNbdReplyError(reply)) {
      // A refused selection selects nothing; callers see it in `contexts`.
      this.throwIfFatalOptionError(NBD_OPT_SET_META_CONTEXT, reply, payload);
      this.contexts = new Map();
    } else {
      throw unexpectedOptionReply(NBD_OPT_SET_META_CONTEXT, reply);
    }
    this.startGo();
  }

  // ---- NBD_OPT_GO ---------------------------------------------------------------------

  private startGo(): void {
    assert(this.clientFlagsSent && this.go.exportInfo === undefined, 'NBD_OPT_GO is sent once, after the other options');
    this.send(encodeGoOption(this.exportName, [NBD_INFO_BLOCK_SIZE], NBD_OPT_GO));
    this.expectOptionReply(NBD_OPT_GO);
  }

  private recvGoReply(reply: number, payload: Buffer): void {
    if (reply === NBD_REP_INFO) {
      const info = decodeInfoReply(payload);
      if (info.info === NBD_INFO_EXPORT) this.go.exportInfo = { size: info.size, transmissionFlags: info.transmissionFlags };
      else if (info.info === NBD_INFO_BLOCK_SIZE) this.go.blockSizes = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
      else if (info.info === NBD_INFO_NAME) this.go.canonicalName = info.name;
      else if (info.info === NBD_INFO_DESCRIPTION) this.go.description = info.description;
      // Unknown info types are ignored, as the spec demands.
      this.expectOptionReply(NBD_OPT_GO);
    } else if (reply === NBD_REP_ACK) {
      checkEmptyAck(NBD_OPT_GO, payload);
      if (this.go.exportInfo === undefined) throw new NbdProtocolError('incomplete-reply', 'NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
      this.finish(this.go.exportInfo, true);
    } else if (reply === NBD_REP_ERR_UNSUP) {
      // Servers without NBD_OPT_GO: the spec asks clients to fall back to NBD_OPT_EXPORT_NAME.
      this.startExportName();
    } else if (isNbdReplyError(reply)) {
      this.throwIfFatalOptionError(NBD_OPT_GO, reply, payload);
      throw this.optionRefused(NBD_OPT_GO, reply, payload);
    } else {
      throw unexpectedOptionReply(NBD_OPT_GO, reply);
    }
  }

  // ---- NBD_OPT_EXPORT_NAME fallback ----------------------------------------------------

  private startExportName(): void {
    assert(this.stepValue.name === 'option-reply-payload' && this.stepValue.option === NBD_OPT_GO, 'NBD_OPT_EXPORT_NAME only after NBD_OPT_GO was refused');
    this.send(encodeExportNameOption(this.exportName));
    this.stepValue = { name: 'export-name-reply' };
  }

  private recvExportNameReply(bytes: Buffer): void {
    const reply = decodeExportNameReply(bytes);
    // Without NBD_FLAG_NO_ZEROES the server pads with 124 zero bytes, which carry nothing.
    if (this.noZeroes) this.finish(reply, false);
    else this.stepValue = { name: 'export-name-zeroes', reply };
  }

  // ---- End ---------------------------------------------------------------------------

  /** viaGo: NBD_OPT_GO succeeded, so its NBD_INFO_BLOCK_SIZE (if any) applies; the fallback has none. */
  private finish(exportInfo: { size: number; transmissionFlags: number }, viaGo: boolean): void {
    assert(this.resultValue === undefined, 'the NBD handshake finishes once');
    const blockSizes = viaGo ? this.go.blockSizes : undefined;
    this.resultValue = {
      exportName: this.exportName,
      size: exportInfo.size,
      transmissionFlags: exportInfo.transmissionFlags,
      blockSizes: blockSizes ?? defaultBlockSizes(),
      blockSizesAdvertised: blockSizes !== undefined,
      structuredReplies: this.structuredReplies,
      tls: this.tlsActive,
      contexts: this.contexts,
      canonicalName: this.go.canonicalName,
      description: this.go.description,
    };
    this.stepValue = { name: 'done' };
  }

  /** Errors after which negotiation cannot go on, whatever the option. */
  private throwIfFatalOptionError(option: number, reply: number, payload: Buffer): void {
    if (reply === NBD_REP_ERR_SHUTDOWN || reply === NBD_REP_ERR_TLS_REQD) throw this.optionRefused(option, reply, payload);
  }

  private optionRefused(option: number, reply: number, payload: Buffer): QbackupError {
    const serverMessage = decodeOptionErrorMessage(payload);
    const suffix = serverMessage === '' ? '' : `: ${serverMessage}`;
    const details = { exportName: this.exportName, address: this.address, option: nbdOptionName(option), reply: nbdReplyName(reply), serverMessage };
    if (reply === NBD_REP_ERR_UNKNOWN) {
      return new QbackupError('NBD_EXPORT_NOT_FOUND', `NBD export "${this.exportName}" not found on ${this.address}${suffix}`, { details });
    }
    const why =
      reply === NBD_REP_ERR_TLS_REQD
        ? 'the server requires TLS, and this connection was not asked to use it (give TLS credentials, e.g. a certificate directory)'
        : reply === NBD_REP_ERR_SHUTDOWN
          ? 'the server is shutting down'
          : reply === NBD_REP_ERR_POLICY
            ? 'the server refused it by policy'
            : `the server replied ${nbdReplyName(reply)}`;
    return new QbackupError('NBD_HANDSHAKE', `Cannot open NBD export "${this.exportName}" on ${this.address}: ${why}${suffix}`, { details });
  }
}

export function defaultBlockSizes(): NbdBlockSizes {
  return { minimum: 1, preferred: 4096, maximum: NBD_DEFAULT_MAX_PAYLOAD };
}

function checkEmptyAck(option: number, payload: Buffer): void {
  if (payload.length !== 0) throw new NbdProtocolError('bad-length', `NBD_REP_ACK to ${nbdOptionName(option)} carries ${payload.length} bytes`);
}

function unexpectedOptionReply(option: number, reply: number): NbdProtocolError {
  return new NbdProtocolError('unexpected-reply', `unexpected ${nbdReplyName(reply)} in reply to ${nbdOptionName(option)}`);
}
