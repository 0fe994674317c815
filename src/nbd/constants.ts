// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md),
// named as in the spec and in libnbd's lib/nbd-protocol.h so that a reader can
// grep either document for a name found here.
//
// Invariants:
// - Values are exactly the spec's; nothing here is configuration.
// - 64-bit magic numbers are bigints (they do not fit a double); everything
//   else is a plain number.
// - The *_NAME helpers never throw: an unknown value is shown as a number,
//   because the value usually came from a peer.

/** Longest string (export name, context name, error message) the spec allows. */
export const NBD_MAX_STRING = 4096;

// ---- Handshake magic numbers ----------------------------------------------

/** ASCII "NBDMAGIC": first 8 bytes the server sends (INIT_PASSWD). */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** `cliserv_magic`: second magic of the oldstyle handshake, which we refuse. */
export const NBD_OLD_VERSION = 0x0000420281861253n;
/** ASCII "IHAVEOPT": second magic of the newstyle handshake, and the magic of every option. */
export const NBD_NEW_VERSION = 0x49484156454f5054n;
/** Magic of every fixed-newstyle option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;

// ---- Transmission magic numbers -------------------------------------------

export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Reserved for the experimental EXTENDED_HEADERS extension; never negotiated by us. */
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

// ---- Handshake flags (server, 16 bits) -------------------------------------

export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// ---- Client flags (32 bits) --------------------------------------------------

export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// ---- Transmission flags (per export, 16 bits) -------------------------------

export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- Options ---------------------------------------------------------------

export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

// ---- Option reply types ----------------------------------------------------

/** Bit 31 marks an option reply as an error. */
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 0x80000008;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;

// ---- NBD_REP_INFO types -----------------------------------------------------

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// ---- Commands --------------------------------------------------------------

export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// ---- Command flags -----------------------------------------------------------

export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- Structured replies ----------------------------------------------------

export const NBD_REPLY_FLAG_DONE = 1 << 0;

/** Bit 15 marks a structured reply type as an error chunk. */
export const NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_FLAG_ERROR | 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---- base:allocation status flags -------------------------------------------

export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap:NAME sets bit 0 on dirty extents. */
export const NBD_STATE_DIRTY = 1 << 0;

/** The metadata context every allocation-aware server offers. */
export const NBD_CONTEXT_BASE_ALLOCATION = 'base:allocation';

// ---- Error values -----------------------------------------------------------

export const NBD_SUCCESS = 0;
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- Sizes -------------------------------------------------------------------

/** Bytes of a request header on the wire. */
export const NBD_REQUEST_SIZE = 28;
/** Bytes of a simple reply header on the wire. */
export const NBD_SIMPLE_REPLY_SIZE = 16;
/** Bytes of a structured reply chunk header on the wire. */
export const NBD_STRUCTURED_REPLY_SIZE = 20;
/** Bytes of an option header (magic, option, length). */
export const NBD_OPTION_HEADER_SIZE = 16;
/** Bytes of an option reply header (magic, option, reply type, length). */
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** Payload limit the spec asks every server to accept when it advertises none (2^25). */
export const NBD_DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** A max payload of 0xffffffff means the server has no fixed limit. */
export const NBD_MAX_PAYLOAD_UNLIMITED = 0xffffffff;

// ---- Names for messages --------------------------------------------------------

const COMMAND_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_CMD_READ, 'NBD_CMD_READ'],
  [NBD_CMD_WRITE, 'NBD_CMD_WRITE'],
  [NBD_CMD_DISC, 'NBD_CMD_DISC'],
  [NBD_CMD_FLUSH, 'NBD_CMD_FLUSH'],
  [NBD_CMD_TRIM, 'NBD_CMD_TRIM'],
  [NBD_CMD_CACHE, 'NBD_CMD_CACHE'],
  [NBD_CMD_WRITE_ZEROES, 'NBD_CMD_WRITE_ZEROES'],
  [NBD_CMD_BLOCK_STATUS, 'NBD_CMD_BLOCK_STATUS'],
]);

const OPTION_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_OPT_EXPORT_NAME, 'NBD_OPT_EXPORT_NAME'],
  [NBD_OPT_ABORT, 'NBD_OPT_ABORT'],
  [NBD_OPT_LIST, 'NBD_OPT_LIST'],
  [NBD_OPT_STARTTLS, 'NBD_OPT_STARTTLS'],
  [NBD_OPT_INFO, 'NBD_OPT_INFO'],
  [NBD_OPT_GO, 'NBD_OPT_GO'],
  [NBD_OPT_STRUCTURED_REPLY, 'NBD_OPT_STRUCTURED_REPLY'],
  [NBD_OPT_LIST_META_CONTEXT, 'NBD_OPT_LIST_META_CONTEXT'],
  [NBD_OPT_SET_META_CONTEXT, 'NBD_OPT_SET_META_CONTEXT'],
]);

const REPLY_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_REP_ACK, 'NBD_REP_ACK'],
  [NBD_REP_SERVER, 'NBD_REP_SERVER'],
  [NBD_REP_INFO, 'NBD_REP_INFO'],
  [NBD_REP_META_CONTEXT, 'NBD_REP_META_CONTEXT'],
  [NBD_REP_ERR_UNSUP, 'NBD_REP_ERR_UNSUP'],
  [NBD_REP_ERR_POLICY, 'NBD_REP_ERR_POLICY'],
  [NBD_REP_ERR_INVALID, 'NBD_REP_ERR_INVALID'],
  [NBD_REP_ERR_PLATFORM, 'NBD_REP_ERR_PLATFORM'],
  [NBD_REP_ERR_TLS_REQD, 'NBD_REP_ERR_TLS_REQD'],
  [NBD_REP_ERR_UNKNOWN, 'NBD_REP_ERR_UNKNOWN'],
  [NBD_REP_ERR_SHUTDOWN, 'NBD_REP_ERR_SHUTDOWN'],
  [NBD_REP_ERR_BLOCK_SIZE_REQD, 'NBD_REP_ERR_BLOCK_SIZE_REQD'],
  [NBD_REP_ERR_TOO_BIG, 'NBD_REP_ERR_TOO_BIG'],
]);

const REPLY_TYPE_NAMES: ReadonlyMap<number, string> = new Map([
  [NBD_REPLY_TYPE_NONE, 'NBD_REPLY_TYPE_NONE'],
  [NBD_REPLY_TYPE_OFFSET_DATA, 'NBD_REPLY_TYPE_OFFSET_DATA'],
  [NBD_REPLY_TYPE_OFFSET_HOLE, 'NBD_REPLY_TYPE_OFFSET_HOLE'],
  [NBD_REPLY_TYPE_BLOCK_STATUS, 'NBD_REPLY_TYPE_BLOCK_STATUS'],
  [NBD_REPLY_TYPE_ERROR, 'NBD_REPLY_TYPE_ERROR'],
  [NBD_REPLY_TYPE_ERROR_OFFSET, 'NBD_REPLY_TYPE_ERROR_OFFSET'],
]);

const ERROR_NAMES: ReadonlyMap<number, readonly [string, string]> = new Map([
  [NBD_EPERM, ['EPERM', 'operation not permitted']],
  [NBD_EIO, ['EIO', 'input/output error']],
  [NBD_ENOMEM, ['ENOMEM', 'cannot allocate memory']],
  [NBD_EINVAL, ['EINVAL', 'invalid argument']],
  [NBD_ENOSPC, ['ENOSPC', 'no space left on device']],
  [NBD_EOVERFLOW, ['EOVERFLOW', 'value too large']],
  [NBD_ENOTSUP, ['ENOTSUP', 'operation not supported']],
  [NBD_ESHUTDOWN, ['ESHUTDOWN', 'server is shutting down']],
]);

export function nbdCommandName(command: number): string {
  return COMMAND_NAMES.get(command) ?? `command ${command}`;
}

export function nbdOptionName(option: number): string {
  return OPTION_NAMES.get(option) ?? `option ${option}`;
}

export function nbdReplyName(reply: number): string {
  return REPLY_NAMES.get(reply) ?? `reply type 0x${reply.toString(16)}`;
}

export function nbdReplyTypeName(type: number): string {
  return REPLY_TYPE_NAMES.get(type) ?? `reply chunk type 0x${type.toString(16)}`;
}

/** "EIO (input/output error)"; unknown values keep their number (the spec says to treat them as EINVAL). */
export function nbdErrorName(error: number): string {
  const known = ERROR_NAMES.get(error);
  return known === undefined ? `error ${error}` : `${known[0]} (${known[1]})`;
}

export function isNbdReplyError(reply: number): boolean {
  return (reply & NBD_REP_FLAG_ERROR) !== 0;
}

export function isNbdReplyTypeError(type: number): boolean {
  return (type & NBD_REPLY_TYPE_FLAG_ERROR) !== 0;
}
