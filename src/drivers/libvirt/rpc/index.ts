// Public surface of libvirt's RPC protocol: wire constants, XDR codecs, the
// framing and its push parser, the structures and the procedure table, the
// connection. Other modules import from here (or from ../client.ts).

export * as LIBVIRT from './constants.js';
export * from './xdr.js';
export { LibvirtFrameParser, decodeHeader, encodeMessage, type LibvirtFrame, type LibvirtFrameParserOptions, type LibvirtHeader } from './frame.js';
export { LibvirtCallError, LibvirtProtocolError, errorCodeForLibvirt, type LibvirtProtocolReason, type LibvirtRemoteError } from './errors.js';
export * from './structs.js';
export { EVENTS, EVENT_BODIES, PROCEDURES, type ArgsOf, type LibvirtDomainEvent, type LibvirtProcedure, type LibvirtProcedureName, type RetOf } from './procedures.js';
export { LibvirtConnection, LibvirtConnectionState, type LibvirtCallOptions, type LibvirtConnectionOptions, type LibvirtEvent, type LibvirtEventListener } from './connection.js';
