// The NBD branch of the error tree: what a peer or a server can cause while we
// talk NBD. All are QbackupErrors with stable codes.
//
// Invariants:
// - NbdProtocolError (NBD_PROTOCOL) means the peer broke the protocol; the
//   connection that saw it is closed. Its `reason` names the broken rule.
//   Once the export is known its message names it.
// - NbdCommandError (NBD_ERROR) means the server answered a request with an
//   error; the connection stays usable.

import { QbackupError } from '../errors.js';
import { nbdCommandName, nbdErrorName } from './constants.js';

export type NbdProtocolReason =
  /** A magic number was not the one the protocol demands at that point. */
  | 'bad-magic'
  /** The server does not speak (fixed) newstyle, or refused a mandatory step. */
  | 'unsupported-server'
  /** A length field is larger than we accept or inconsistent with its message. */
  | 'bad-length'
  /** A reply carries a cookie (handle) that is not in flight. */
  | 'unknown-cookie'
  /** A reply type or option reply type is unknown or not allowed here. */
  | 'unexpected-reply'
  /** An offset or extent lies outside the request or the export. */
  | 'out-of-range'
  /** Content chunks of one reply overlap. */
  | 'overlap'
  /** A successful reply did not describe everything it had to. */
  | 'incomplete-reply'
  /** A block status chunk names a context that was not negotiated, or repeats one. */
  | 'bad-context'
  /** Any other field with a value the spec forbids. */
  | 'invalid-field';

export class NbdProtocolError extends QbackupError {
  readonly reason: NbdProtocolReason;
  /** The rule that was broken, without the export; `message` adds the export when known. */
  readonly detail: string;
  readonly exportName: string | undefined;

  constructor(reason: NbdProtocolReason, detail: string, exportName?: string, extra: Record<string, unknown> = {}) {
    super(
      'NBD_PROTOCOL',
      exportName === undefined ? `NBD protocol error: ${detail}` : `NBD server of export "${exportName}" broke the protocol: ${detail}`,
      { details: { reason, ...(exportName === undefined ? {} : { exportName }), ...extra } },
    );
    this.name = 'NbdProtocolError';
    this.reason = reason;
    this.detail = detail;
    this.exportName = exportName;
  }

  /** The same error naming the export; `this` when it already does. */
  forExport(exportName: string): NbdProtocolError {
    if (this.exportName !== undefined) return this;
    return new NbdProtocolError(this.reason, this.detail, exportName, { ...this.details });
  }
}

export interface NbdCommandErrorInit {
  exportName: string;
  command: number;
  offset: number;
  length: number;
  /** NBD_E* value the server sent (unknown values are kept as sent). */
  error: number;
  /** Human-readable text from an error chunk; empty for simple replies. */
  serverMessage: string;
  /** Offset the server named in NBD_REPLY_TYPE_ERROR_OFFSET. */
  errorOffset?: number;
}

export class NbdCommandError extends QbackupError {
  readonly exportName: string;
  readonly command: number;
  readonly error: number;
  readonly serverMessage: string;
  readonly errorOffset: number | undefined;

  constructor(init: NbdCommandErrorInit) {
    const at = init.errorOffset === undefined ? '' : ` at offset ${init.errorOffset}`;
    const text = init.serverMessage === '' ? '' : `: ${init.serverMessage}`;
    super(
      'NBD_ERROR',
      `${nbdCommandName(init.command)} of ${init.length} bytes at offset ${init.offset} on export "${init.exportName}" failed${at}: ` +
        `${nbdErrorName(init.error)}${text}`,
      {
        details: {
          exportName: init.exportName,
          command: nbdCommandName(init.command),
          offset: init.offset,
          length: init.length,
          error: init.error,
          serverMessage: init.serverMessage,
          ...(init.errorOffset === undefined ? {} : { errorOffset: init.errorOffset }),
        },
      },
    );
    this.name = 'NbdCommandError';
    this.exportName = init.exportName;
    this.command = init.command;
    this.error = init.error;
    this.serverMessage = init.serverMessage;
    this.errorOffset = init.errorOffset;
  }
}
