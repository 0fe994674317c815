// Public surface of the QMP client: the wire layer (message.ts) and the
// connection (client.ts). Other modules import from here, not from the files.

export {
  QmpClient,
  QmpClientState,
  QmpCommandError,
  type QmpConnectOptions,
  type QmpEventListener,
  type QmpExecuteOptions,
  type QmpTraceDirection,
  type QmpTransactionAction,
  type QmpTransactionOptions,
} from './client.js';
export {
  DEFAULT_MAX_LINE_BYTES,
  QmpLineParser,
  QmpProtocolError,
  classifyMessage,
  encodeCommand,
  type QmpErrorReply,
  type QmpEvent,
  type QmpEventMessage,
  type QmpGreeting,
  type QmpLineParserOptions,
  type QmpMessage,
  type QmpProtocolErrorReason,
  type QmpReturn,
  type QmpTimestamp,
  type QmpVersion,
} from './message.js';
