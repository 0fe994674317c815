// The libvirt branch of the error tree.
//
// - LibvirtProtocolError (LIBVIRT_PROTOCOL): the daemon's bytes broke the
//   protocol (a bad header, a length over the cap, malformed XDR); the
//   connection that saw it is closed. `reason` names the broken rule.
// - LibvirtCallError: libvirt answered a call with its error structure
//   (remote_error). Its code is qbackup's (DOMAIN_NOT_FOUND,
//   CHECKPOINT_NOT_FOUND, INVALID_XML, …, else LIBVIRT_ERROR); the message is
//   libvirt's own sentence, kept as it was sent, and libvirt's numbers are in
//   the fields. The connection stays usable.

import { QbackupError, type ErrorCode } from '../../../errors.js';
import * as C from './constants.js';

export type LibvirtProtocolReason =
  /** The length word is below the header size or above VIR_NET_MESSAGE_MAX. */
  | 'bad-length'
  /** A header names a program, version, type or status we do not accept here. */
  | 'bad-header'
  /** A reply for a serial that is not in flight. */
  | 'unknown-serial'
  /** A body that is not the XDR the procedure declares. */
  | 'bad-xdr';

export class LibvirtProtocolError extends QbackupError {
  readonly reason: LibvirtProtocolReason;

  constructor(reason: LibvirtProtocolReason, detail: string) {
    super('LIBVIRT_PROTOCOL', `libvirt RPC protocol error: ${detail}`, { details: { reason } });
    this.name = 'LibvirtProtocolError';
    this.reason = reason;
  }
}

/** remote_error as sent: virErrorNumber, virErrorDomain, the message and the rest of virError. */
export interface LibvirtRemoteError {
  code: number;
  domain: number;
  message: string | undefined;
  level: number;
  dom: { name: string; uuid: Buffer; id: number } | undefined;
  str1: string | undefined;
  str2: string | undefined;
  str3: string | undefined;
  int1: number;
  int2: number;
  net: { name: string; uuid: Buffer } | undefined;
}

/** qbackup's code for a libvirt error number; LIBVIRT_ERROR for the rest. */
export function errorCodeForLibvirt(code: number): ErrorCode {
  switch (code) {
    case C.VIR_ERR_NO_DOMAIN:
      return 'DOMAIN_NOT_FOUND';
    case C.VIR_ERR_DOM_EXIST:
      return 'DOMAIN_EXISTS';
    case C.VIR_ERR_NO_DOMAIN_CHECKPOINT:
      return 'CHECKPOINT_NOT_FOUND';
    case C.VIR_ERR_INVALID_DOMAIN_CHECKPOINT:
      return 'CHECKPOINT_INVALID';
    case C.VIR_ERR_CHECKPOINT_INCONSISTENT:
      return 'BITMAP_INCONSISTENT';
    case C.VIR_ERR_NO_DOMAIN_BACKUP:
      return 'JOB_NOT_FOUND';
    case C.VIR_ERR_XML_ERROR:
    case C.VIR_ERR_XML_DETAIL:
    case C.VIR_ERR_XML_INVALID_SCHEMA:
      return 'INVALID_XML';
    case C.VIR_ERR_INVALID_ARG:
      return 'INVALID_ARGUMENT';
    case C.VIR_ERR_NO_SUPPORT:
    case C.VIR_ERR_CONFIG_UNSUPPORTED:
    case C.VIR_ERR_ARGUMENT_UNSUPPORTED:
    case C.VIR_ERR_OPERATION_UNSUPPORTED:
      return 'NOT_SUPPORTED';
    case C.VIR_ERR_AUTH_FAILED:
    case C.VIR_ERR_AUTH_CANCELLED:
    case C.VIR_ERR_AUTH_UNAVAILABLE:
    case C.VIR_ERR_ACCESS_DENIED:
    case C.VIR_ERR_OPERATION_DENIED:
      return 'LIBVIRT_ACCESS_DENIED';
    case C.VIR_ERR_AGENT_UNRESPONSIVE:
    case C.VIR_ERR_AGENT_UNSYNCED:
    case C.VIR_ERR_AGENT_COMMAND_TIMEOUT:
    case C.VIR_ERR_AGENT_COMMAND_FAILED:
      return 'GUEST_AGENT';
    default:
      return 'LIBVIRT_ERROR';
  }
}

function sentence(text: string): string {
  const t = text.trim();
  return t.length === 0 ? t : t.charAt(0).toUpperCase() + t.slice(1);
}

export class LibvirtCallError extends QbackupError {
  /** The procedure that failed, e.g. "domain-lookup-by-name". */
  readonly procedure: string;
  /** virErrorNumber */
  readonly libvirtCode: number;
  /** virErrorDomain (the libvirt subsystem that raised it) */
  readonly libvirtDomain: number;
  /** libvirt's message exactly as sent (empty when it sent none). */
  readonly libvirtMessage: string;

  constructor(procedure: string, error: LibvirtRemoteError) {
    const text = error.message ?? '';
    const message = text === '' ? `libvirt refused ${procedure} (error ${error.code}) without a message` : sentence(text);
    super(errorCodeForLibvirt(error.code), message, {
      details: {
        procedure,
        libvirtCode: error.code,
        libvirtDomain: error.domain,
        libvirtMessage: text,
        ...(error.dom === undefined ? {} : { domain: error.dom.name }),
      },
    });
    this.name = 'LibvirtCallError';
    this.procedure = procedure;
    this.libvirtCode = error.code;
    this.libvirtDomain = error.domain;
    this.libvirtMessage = text;
  }
}
