// Wire constants of libvirt's RPC protocol, named as in libvirt's own
// definitions: the message header and framing (src/rpc/virnetprotocol.x),
// the remote and QEMU programs with the procedure numbers qbackup uses
// (src/remote/remote_protocol.x, qemu_protocol.x), the array and string
// limits those files declare, and the public enums (virterror.h,
// libvirt-domain.h, libvirt-domain-checkpoint.h) whose values cross the wire.
//
// Invariants: a number here is libvirt's and never changes; nothing here
// depends on a socket or on qbackup's own types.

/** The remote program (virConnect*, virDomain* calls). */
export const REMOTE_PROGRAM = 0x20008086;
export const REMOTE_PROTOCOL_VERSION = 1;
/** The QEMU-specific program (monitor passthrough). */
export const QEMU_PROGRAM = 0x20008087;
export const QEMU_PROTOCOL_VERSION = 1;
/** The keepalive program ("keep"). */
export const KEEPALIVE_PROGRAM = 0x6b656570;
export const KEEPALIVE_PROTOCOL_VERSION = 1;
export const KEEPALIVE_PROC_PING = 1;
export const KEEPALIVE_PROC_PONG = 2;

/** Size of the length word that starts every message; it counts itself. */
export const VIR_NET_MESSAGE_LEN_MAX = 4;
/** Size of the fixed header after the length word. */
export const VIR_NET_MESSAGE_HEADER_MAX = 24;
/** Largest message payload libvirt sends or accepts (32 MiB). */
export const VIR_NET_MESSAGE_MAX = 33_554_432;

/** virNetMessageType */
export const VIR_NET_CALL = 0;
export const VIR_NET_REPLY = 1;
export const VIR_NET_MESSAGE = 2;
export const VIR_NET_STREAM = 3;
export const VIR_NET_CALL_WITH_FDS = 4;
export const VIR_NET_REPLY_WITH_FDS = 5;
export const VIR_NET_STREAM_HOLE = 6;

/** virNetMessageStatus */
export const VIR_NET_OK = 0;
export const VIR_NET_ERROR = 1;
export const VIR_NET_CONTINUE = 2;

// -- limits from remote_protocol.x
/** REMOTE_STRING_MAX (libvirt ≥ 1.3: 4 MiB). */
export const REMOTE_STRING_MAX = 4_194_304;
export const REMOTE_DOMAIN_LIST_MAX = 16_384;
export const REMOTE_DOMAIN_CHECKPOINT_LIST_MAX = 16_384;
export const REMOTE_AUTH_TYPE_LIST_MAX = 20;
export const REMOTE_DOMAIN_JOB_STATS_MAX = 64;
export const REMOTE_DOMAIN_BLOCK_COPY_PARAMETERS_MAX = 16;
export const REMOTE_DOMAIN_FSFREEZE_MOUNTPOINTS_MAX = 256;
/** Length of a domain's UUID in bytes (VIR_UUID_BUFLEN). */
export const VIR_UUID_BUFLEN = 16;

/** remote_auth_type */
export const REMOTE_AUTH_NONE = 0;
export const REMOTE_AUTH_SASL = 1;
export const REMOTE_AUTH_POLKIT = 2;

/** The remote program's procedures qbackup calls or receives (remote_procedure). */
export const REMOTE_PROC_CONNECT_OPEN = 1;
export const REMOTE_PROC_CONNECT_CLOSE = 2;
export const REMOTE_PROC_CONNECT_GET_CAPABILITIES = 7;
export const REMOTE_PROC_DOMAIN_CREATE = 9;
export const REMOTE_PROC_DOMAIN_DESTROY = 12;
export const REMOTE_PROC_DOMAIN_GET_XML_DESC = 14;
export const REMOTE_PROC_DOMAIN_GET_INFO = 16;
export const REMOTE_PROC_DOMAIN_LOOKUP_BY_NAME = 23;
export const REMOTE_PROC_DOMAIN_LOOKUP_BY_UUID = 24;
export const REMOTE_PROC_DOMAIN_RESUME = 28;
export const REMOTE_PROC_DOMAIN_SUSPEND = 34;
export const REMOTE_PROC_CONNECT_SUPPORTS_FEATURE = 60;
export const REMOTE_PROC_AUTH_LIST = 66;
export const REMOTE_PROC_AUTH_POLKIT = 70;
export const REMOTE_PROC_CONNECT_GET_LIB_VERSION = 157;
export const REMOTE_PROC_DOMAIN_ATTACH_DEVICE_FLAGS = 160;
export const REMOTE_PROC_DOMAIN_DETACH_DEVICE_FLAGS = 161;
export const REMOTE_PROC_DOMAIN_GET_JOB_INFO = 163;
export const REMOTE_PROC_DOMAIN_ABORT_JOB = 164;
export const REMOTE_PROC_DOMAIN_GET_BLOCK_INFO = 194;
export const REMOTE_PROC_DOMAIN_CREATE_WITH_FLAGS = 196;
export const REMOTE_PROC_DOMAIN_GET_STATE = 212;
export const REMOTE_PROC_DOMAIN_UNDEFINE_FLAGS = 231;
export const REMOTE_PROC_DOMAIN_DESTROY_FLAGS = 234;
export const REMOTE_PROC_DOMAIN_BLOCK_JOB_ABORT = 237;
export const REMOTE_PROC_DOMAIN_GET_BLOCK_JOB_INFO = 238;
export const REMOTE_PROC_DOMAIN_BLOCK_PULL = 240;
export const REMOTE_PROC_DOMAIN_BLOCK_RESIZE = 251;
export const REMOTE_PROC_DOMAIN_SHUTDOWN_FLAGS = 258;
export const REMOTE_PROC_DOMAIN_BLOCK_REBASE = 266;
export const REMOTE_PROC_CONNECT_LIST_ALL_DOMAINS = 273;
export const REMOTE_PROC_DOMAIN_GET_JOB_STATS = 298;
export const REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY = 316;
export const REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY = 317;
export const REMOTE_PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE = 318;
export const REMOTE_PROC_DOMAIN_EVENT_CALLBACK_BLOCK_JOB = 326;
export const REMOTE_PROC_DOMAIN_FSFREEZE = 335;
export const REMOTE_PROC_DOMAIN_FSTHAW = 336;
export const REMOTE_PROC_DOMAIN_EVENT_BLOCK_JOB_2 = 339;
export const REMOTE_PROC_DOMAIN_BLOCK_COPY = 345;
export const REMOTE_PROC_DOMAIN_DEFINE_XML_FLAGS = 350;
export const REMOTE_PROC_DOMAIN_EVENT_CALLBACK_JOB_COMPLETED = 363;
export const REMOTE_PROC_DOMAIN_CHECKPOINT_CREATE_XML = 411;
export const REMOTE_PROC_DOMAIN_CHECKPOINT_GET_XML_DESC = 412;
export const REMOTE_PROC_DOMAIN_LIST_ALL_CHECKPOINTS = 413;
export const REMOTE_PROC_DOMAIN_CHECKPOINT_LOOKUP_BY_NAME = 415;
export const REMOTE_PROC_DOMAIN_CHECKPOINT_DELETE = 417;
export const REMOTE_PROC_DOMAIN_BACKUP_BEGIN = 421;
export const REMOTE_PROC_DOMAIN_BACKUP_GET_XML_DESC = 422;
export const REMOTE_PROC_DOMAIN_ABORT_JOB_FLAGS = 442;

/** The QEMU program's procedures (qemu_procedure). */
export const QEMU_PROC_DOMAIN_MONITOR_COMMAND = 1;
export const QEMU_PROC_DOMAIN_AGENT_COMMAND = 3;

// -- public enums whose values cross the wire
/** virTypedParameterType */
export const VIR_TYPED_PARAM_INT = 1;
export const VIR_TYPED_PARAM_UINT = 2;
export const VIR_TYPED_PARAM_LLONG = 3;
export const VIR_TYPED_PARAM_ULLONG = 4;
export const VIR_TYPED_PARAM_DOUBLE = 5;
export const VIR_TYPED_PARAM_BOOLEAN = 6;
export const VIR_TYPED_PARAM_STRING = 7;

/** virDomainEventID */
export const VIR_DOMAIN_EVENT_ID_LIFECYCLE = 0;
export const VIR_DOMAIN_EVENT_ID_BLOCK_JOB = 8;
export const VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2 = 16;
export const VIR_DOMAIN_EVENT_ID_JOB_COMPLETED = 21;

/** virDomainEventType (the `event` of a lifecycle event) */
export const VIR_DOMAIN_EVENT_DEFINED = 0;
export const VIR_DOMAIN_EVENT_UNDEFINED = 1;
export const VIR_DOMAIN_EVENT_STARTED = 2;
export const VIR_DOMAIN_EVENT_SUSPENDED = 3;
export const VIR_DOMAIN_EVENT_RESUMED = 4;
export const VIR_DOMAIN_EVENT_STOPPED = 5;

/** virDomainState */
export const VIR_DOMAIN_NOSTATE = 0;
export const VIR_DOMAIN_RUNNING = 1;
export const VIR_DOMAIN_BLOCKED = 2;
export const VIR_DOMAIN_PAUSED = 3;
export const VIR_DOMAIN_SHUTDOWN = 4;
export const VIR_DOMAIN_SHUTOFF = 5;
export const VIR_DOMAIN_CRASHED = 6;
export const VIR_DOMAIN_PMSUSPENDED = 7;

/** virConnectListAllDomainsFlags (the ones qbackup uses) */
export const VIR_CONNECT_LIST_DOMAINS_ACTIVE = 1;
export const VIR_CONNECT_LIST_DOMAINS_INACTIVE = 2;
/** virDomainCreateFlags */
export const VIR_DOMAIN_START_PAUSED = 1;
/** virDomainDestroyFlagsValues: SIGTERM only, so QEMU closes its images cleanly (persistent bitmaps stored). */
export const VIR_DOMAIN_DESTROY_GRACEFUL = 1;
/** virDomainModificationImpact */
export const VIR_DOMAIN_AFFECT_LIVE = 1;
export const VIR_DOMAIN_AFFECT_CONFIG = 2;
/** virDomainBlockResizeFlags */
export const VIR_DOMAIN_BLOCK_RESIZE_BYTES = 1;
/** virDomainXMLFlags */
export const VIR_DOMAIN_XML_SECURE = 1;
export const VIR_DOMAIN_XML_INACTIVE = 2;
/** virDomainDefineFlags */
export const VIR_DOMAIN_DEFINE_VALIDATE = 1;
/** virDomainUndefineFlagsValues */
export const VIR_DOMAIN_UNDEFINE_MANAGED_SAVE = 1;
export const VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA = 2;
export const VIR_DOMAIN_UNDEFINE_NVRAM = 4;
export const VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA = 16;
/** virDomainCheckpointCreateFlags */
export const VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE = 1;
export const VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE = 2;
export const VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE = 4;
/** virDomainCheckpointXMLFlags */
export const VIR_DOMAIN_CHECKPOINT_XML_SECURE = 1;
export const VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN = 2;
export const VIR_DOMAIN_CHECKPOINT_XML_SIZE = 4;
/** virDomainCheckpointDeleteFlags */
export const VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN = 1;
export const VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY = 2;
export const VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY = 4;
/** virDomainBackupBeginFlags */
export const VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL = 1;
/** virDomainJobType */
export const VIR_DOMAIN_JOB_NONE = 0;
export const VIR_DOMAIN_JOB_BOUNDED = 1;
export const VIR_DOMAIN_JOB_UNBOUNDED = 2;
export const VIR_DOMAIN_JOB_COMPLETED = 3;
export const VIR_DOMAIN_JOB_FAILED = 4;
export const VIR_DOMAIN_JOB_CANCELLED = 5;
/** virDomainJobOperation (the "operation" job statistic) */
export const VIR_DOMAIN_JOB_OPERATION_BACKUP = 9;
/** virDomainGetJobStatsFlags */
export const VIR_DOMAIN_JOB_STATS_COMPLETED = 1;
export const VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED = 2;
/** virDomainBlockJobType */
export const VIR_DOMAIN_BLOCK_JOB_TYPE_UNKNOWN = 0;
export const VIR_DOMAIN_BLOCK_JOB_TYPE_PULL = 1;
export const VIR_DOMAIN_BLOCK_JOB_TYPE_COPY = 2;
export const VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT = 3;
export const VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT = 4;
export const VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP = 5;
/** virConnectDomainEventBlockJobStatus */
export const VIR_DOMAIN_BLOCK_JOB_COMPLETED = 0;
export const VIR_DOMAIN_BLOCK_JOB_FAILED = 1;
export const VIR_DOMAIN_BLOCK_JOB_CANCELED = 2;
export const VIR_DOMAIN_BLOCK_JOB_READY = 3;
/** virDomainBlockPullFlags */
export const VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES = 64;
/** virDomainBlockJobAbortFlags */
export const VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC = 1;
export const VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT = 2;
/** virDomainBlockRebaseFlags */
export const VIR_DOMAIN_BLOCK_REBASE_SHALLOW = 1;
export const VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT = 2;
export const VIR_DOMAIN_BLOCK_REBASE_COPY = 8;
/** virDomainBlockCopyFlags */
export const VIR_DOMAIN_BLOCK_COPY_SHALLOW = 1;
export const VIR_DOMAIN_BLOCK_COPY_REUSE_EXT = 2;
export const VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB = 4;
/** virDomainQemuMonitorCommandFlags */
export const VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT = 0;
export const VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP = 1;

/** virErrorNumber values qbackup maps to its own codes. */
export const VIR_ERR_INTERNAL_ERROR = 1;
export const VIR_ERR_NO_SUPPORT = 3;
export const VIR_ERR_INVALID_ARG = 8;
export const VIR_ERR_OPERATION_FAILED = 9;
export const VIR_ERR_XML_ERROR = 27;
export const VIR_ERR_DOM_EXIST = 28;
export const VIR_ERR_OPERATION_DENIED = 29;
export const VIR_ERR_XML_DETAIL = 35;
export const VIR_ERR_RPC = 39;
export const VIR_ERR_NO_DOMAIN = 42;
export const VIR_ERR_AUTH_FAILED = 45;
export const VIR_ERR_OPERATION_INVALID = 55;
export const VIR_ERR_CONFIG_UNSUPPORTED = 67;
export const VIR_ERR_OPERATION_TIMEOUT = 68;
export const VIR_ERR_ARGUMENT_UNSUPPORTED = 74;
export const VIR_ERR_OPERATION_ABORTED = 78;
export const VIR_ERR_AUTH_CANCELLED = 79;
export const VIR_ERR_OPERATION_UNSUPPORTED = 84;
export const VIR_ERR_AGENT_UNRESPONSIVE = 86;
export const VIR_ERR_RESOURCE_BUSY = 87;
export const VIR_ERR_ACCESS_DENIED = 88;
export const VIR_ERR_XML_INVALID_SCHEMA = 92;
export const VIR_ERR_AUTH_UNAVAILABLE = 94;
export const VIR_ERR_AGENT_UNSYNCED = 97;
export const VIR_ERR_INVALID_DOMAIN_CHECKPOINT = 102;
export const VIR_ERR_NO_DOMAIN_CHECKPOINT = 103;
export const VIR_ERR_NO_DOMAIN_BACKUP = 104;
export const VIR_ERR_CHECKPOINT_INCONSISTENT = 109;
export const VIR_ERR_AGENT_COMMAND_TIMEOUT = 112;
export const VIR_ERR_AGENT_COMMAND_FAILED = 113;

/** A message type's name for messages: "REPLY", or the number when unknown. */
export function messageTypeName(type: number): string {
  const names = ['CALL', 'REPLY', 'MESSAGE', 'STREAM', 'CALL_WITH_FDS', 'REPLY_WITH_FDS', 'STREAM_HOLE'];
  return names[type] ?? String(type);
}
