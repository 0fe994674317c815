// Public surface of NBD: wire constants, codec, the push parser,
// the handshake state machine, the connection, the high-level NbdClient and
// copyExtents, and the server (sessions over bytes, the listening NbdServer).
// Other modules import from here, not from the files.

export * from './constants.js';
export {
  checkBlockSizes,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeExportNameReply,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeOffsetData,
  decodeOffsetHole,
  decodeOptionErrorMessage,
  decodeOptionReplyHeader,
  decodeServerHello,
  decodeSimpleReplyHeader,
  decodeStructuredReplyHeader,
  encodeAbortOption,
  encodeClientFlags,
  encodeExportNameOption,
  encodeGoOption,
  encodeMetaContextOption,
  encodeNbdString,
  encodeOption,
  encodeRequest,
  encodeStructuredReplyOption,
  readReplyMagic,
  readU64,
  type NbdBlockDescriptor,
  type NbdBlockSizes,
  type NbdBlockStatusPayload,
  type NbdErrorPayload,
  type NbdExportNameReply,
  type NbdInfo,
  type NbdMetaContextReply,
  type NbdOptionReplyHeader,
  type NbdRequestHeader,
  type NbdServerHello,
  type NbdSimpleReplyHeader,
  type NbdStructuredReplyHeader,
} from './codec.js';
export { NbdCommandError, NbdProtocolError, type NbdCommandErrorInit, type NbdProtocolReason } from './errors.js';
export { ByteQueue } from './byte-queue.js';
export {
  CHUNK_OVERHEAD_BYTES,
  DEFAULT_MAX_DESCRIPTORS,
  DEFAULT_MAX_PAYLOAD_BYTES,
  NbdReplyParser,
  type NbdReply,
  type NbdReplyChunk,
  type NbdReplyParserOptions,
  type NbdRequestInfo,
} from './parser.js';
export {
  MAX_OPTION_REPLY_BYTES,
  NbdHandshake,
  defaultBlockSizes,
  type NbdHandshakeOptions,
  type NbdHandshakeStatus,
  type NbdHandshakeStep,
} from './handshake.js';
export {
  DEFAULT_NBD_REQUEST_TIMEOUT_MS,
  NbdConnection,
  NbdConnectionState,
  formatNbdAddress,
  type NbdAddress,
  type NbdConnectionOptions,
  type NbdNegotiated,
  type NbdRequestOptions,
  type NbdTlsOptions,
} from './connection.js';
export { NBD_DEFAULT_PORT, formatNbdUri, parseNbdUri, type NbdUri } from './uri.js';
export { NbdClient, type NbdClientOptions, type NbdExtent, type NbdWriteZeroesOptions } from './client.js';
export { copyExtents, type CopyExtentsOptions, type CopyExtentsResult } from './copy.js';
export {
  BASE_ALLOCATION_ID,
  ByteBudget,
  MAX_IN_FLIGHT,
  MAX_OPTION_BYTES,
  MAX_REQUEST_BYTES,
  NbdExportError,
  NbdServerSession,
  type NbdExportSegment,
  type NbdServerExport,
  type NbdSessionState,
  type NbdSessionTransport,
} from './server-session.js';
export { NbdServer, listenUri, loadTlsCredentials, type NbdListen, type NbdServerOptions, type NbdTlsCredentials } from './server.js';
