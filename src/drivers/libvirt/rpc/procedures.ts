// The table of libvirt procedures qbackup uses: for each, its program and
// number and the codecs of its arguments and reply, as remote_protocol.x and
// qemu_protocol.x declare them (REMOTE_PROC_X ↔ remote_x_args / remote_x_ret).
// The connection sends `args.encode` and reads `ret.decode`; nothing else
// knows a procedure's shape. Events the daemon sends (VIR_NET_MESSAGE) are
// in EVENTS, by procedure number.
//
// Invariant: a procedure's codecs are exactly its .x structures, field for
// field, so a reply that decodes with bytes left over is a protocol error
// (the connection checks that every byte was read).

import { assert } from '../../../util/assert.js';
import * as C from './constants.js';
import {
  remoteCheckpoint,
  remoteDomain,
  remoteOptionalString,
  remoteString,
  remoteUuid,
  typedParams,
} from './structs.js';
import { xdrArray, xdrInt, xdrOptional, xdrStruct, xdrUhyper, xdrUint, xdrVoid, type XdrType, type XdrValue } from './xdr.js';

export interface LibvirtProcedure<A, R> {
  /** libvirt's name without the prefix, in kebab case: "domain-lookup-by-name". */
  name: string;
  program: number;
  version: number;
  procedure: number;
  args: XdrType<A>;
  ret: XdrType<R>;
}

function remote<A, R>(name: string, procedure: number, args: XdrType<A>, ret: XdrType<R>): LibvirtProcedure<A, R> {
  return { name, program: C.REMOTE_PROGRAM, version: C.REMOTE_PROTOCOL_VERSION, procedure, args, ret };
}

const domFlags = xdrStruct({ dom: remoteDomain, flags: xdrUint });
const domOnly = xdrStruct({ dom: remoteDomain });
const domRet = xdrStruct({ dom: remoteDomain });
const xmlRet = xdrStruct({ xml: remoteString });
const checkpointRet = xdrStruct({ checkpoint: remoteCheckpoint });
const mountpoints = xdrStruct({ dom: remoteDomain, mountpoints: xdrArray(remoteString, C.REMOTE_DOMAIN_FSFREEZE_MOUNTPOINTS_MAX, 'mount points'), flags: xdrUint });
const filesystemsRet = xdrStruct({ filesystems: xdrInt });

export const PROCEDURES = {
  connectOpen: remote('connect-open', C.REMOTE_PROC_CONNECT_OPEN, xdrStruct({ name: remoteOptionalString, flags: xdrUint }), xdrVoid),
  connectClose: remote('connect-close', C.REMOTE_PROC_CONNECT_CLOSE, xdrVoid, xdrVoid),
  connectSupportsFeature: remote('connect-supports-feature', C.REMOTE_PROC_CONNECT_SUPPORTS_FEATURE, xdrStruct({ feature: xdrInt }), xdrStruct({ supported: xdrInt })),
  connectGetCapabilities: remote('connect-get-capabilities', C.REMOTE_PROC_CONNECT_GET_CAPABILITIES, xdrVoid, xdrStruct({ capabilities: remoteString })),
  connectGetLibVersion: remote('connect-get-lib-version', C.REMOTE_PROC_CONNECT_GET_LIB_VERSION, xdrVoid, xdrStruct({ libVer: xdrUhyper })),
  authList: remote('auth-list', C.REMOTE_PROC_AUTH_LIST, xdrVoid, xdrStruct({ types: xdrArray(xdrInt, C.REMOTE_AUTH_TYPE_LIST_MAX, 'auth types') })),
  authPolkit: remote('auth-polkit', C.REMOTE_PROC_AUTH_POLKIT, xdrVoid, xdrStruct({ complete: xdrInt })),
  connectListAllDomains: remote(
    'connect-list-all-domains',
    C.REMOTE_PROC_CONNECT_LIST_ALL_DOMAINS,
    xdrStruct({ needResults: xdrInt, flags: xdrUint }),
    xdrStruct({ domains: xdrArray(remoteDomain, C.REMOTE_DOMAIN_LIST_MAX, 'domains'), ret: xdrUint }),
  ),
  domainLookupByName: remote('domain-lookup-by-name', C.REMOTE_PROC_DOMAIN_LOOKUP_BY_NAME, xdrStruct({ name: remoteString }), domRet),
  domainLookupByUuid: remote('domain-lookup-by-uuid', C.REMOTE_PROC_DOMAIN_LOOKUP_BY_UUID, xdrStruct({ uuid: remoteUuid }), domRet),
  domainGetXmlDesc: remote('domain-get-xml-desc', C.REMOTE_PROC_DOMAIN_GET_XML_DESC, domFlags, xmlRet),
  domainGetState: remote('domain-get-state', C.REMOTE_PROC_DOMAIN_GET_STATE, domFlags, xdrStruct({ state: xdrInt, reason: xdrInt })),
  domainGetInfo: remote(
    'domain-get-info',
    C.REMOTE_PROC_DOMAIN_GET_INFO,
    domOnly,
    // unsigned char and unsigned short travel as 4-byte XDR unsigned ints.
    xdrStruct({ state: xdrUint, maxMem: xdrUhyper, memory: xdrUhyper, nrVirtCpu: xdrUint, cpuTime: xdrUhyper }),
  ),
  domainDefineXmlFlags: remote('domain-define-xml-flags', C.REMOTE_PROC_DOMAIN_DEFINE_XML_FLAGS, xdrStruct({ xml: remoteString, flags: xdrUint }), domRet),
  domainCreate: remote('domain-create', C.REMOTE_PROC_DOMAIN_CREATE, domOnly, xdrVoid),
  domainCreateWithFlags: remote('domain-create-with-flags', C.REMOTE_PROC_DOMAIN_CREATE_WITH_FLAGS, domFlags, domRet),
  domainDestroy: remote('domain-destroy', C.REMOTE_PROC_DOMAIN_DESTROY, domOnly, xdrVoid),
  domainDestroyFlags: remote('domain-destroy-flags', C.REMOTE_PROC_DOMAIN_DESTROY_FLAGS, domFlags, xdrVoid),
  domainShutdownFlags: remote('domain-shutdown-flags', C.REMOTE_PROC_DOMAIN_SHUTDOWN_FLAGS, domFlags, xdrVoid),
  domainAttachDeviceFlags: remote('domain-attach-device-flags', C.REMOTE_PROC_DOMAIN_ATTACH_DEVICE_FLAGS, xdrStruct({ dom: remoteDomain, xml: remoteString, flags: xdrUint }), xdrVoid),
  domainDetachDeviceFlags: remote('domain-detach-device-flags', C.REMOTE_PROC_DOMAIN_DETACH_DEVICE_FLAGS, xdrStruct({ dom: remoteDomain, xml: remoteString, flags: xdrUint }), xdrVoid),
  domainGetBlockInfo: remote(
    'domain-get-block-info',
    C.REMOTE_PROC_DOMAIN_GET_BLOCK_INFO,
    xdrStruct({ dom: remoteDomain, path: remoteString, flags: xdrUint }),
    xdrStruct({ allocation: xdrUhyper, capacity: xdrUhyper, physical: xdrUhyper }),
  ),
  domainBlockResize: remote('domain-block-resize', C.REMOTE_PROC_DOMAIN_BLOCK_RESIZE, xdrStruct({ dom: remoteDomain, disk: remoteString, size: xdrUhyper, flags: xdrUint }), xdrVoid),
  domainUndefineFlags: remote('domain-undefine-flags', C.REMOTE_PROC_DOMAIN_UNDEFINE_FLAGS, domFlags, xdrVoid),
  domainCheckpointCreateXml: remote(
    'domain-checkpoint-create-xml',
    C.REMOTE_PROC_DOMAIN_CHECKPOINT_CREATE_XML,
    xdrStruct({ dom: remoteDomain, xmlDesc: remoteString, flags: xdrUint }),
    checkpointRet,
  ),
  domainCheckpointGetXmlDesc: remote(
    'domain-checkpoint-get-xml-desc',
    C.REMOTE_PROC_DOMAIN_CHECKPOINT_GET_XML_DESC,
    xdrStruct({ checkpoint: remoteCheckpoint, flags: xdrUint }),
    xmlRet,
  ),
  domainListAllCheckpoints: remote(
    'domain-list-all-checkpoints',
    C.REMOTE_PROC_DOMAIN_LIST_ALL_CHECKPOINTS,
    xdrStruct({ dom: remoteDomain, needResults: xdrInt, flags: xdrUint }),
    xdrStruct({ checkpoints: xdrArray(remoteCheckpoint, C.REMOTE_DOMAIN_CHECKPOINT_LIST_MAX, 'checkpoints'), ret: xdrInt }),
  ),
  domainCheckpointLookupByName: remote(
    'domain-checkpoint-lookup-by-name',
    C.REMOTE_PROC_DOMAIN_CHECKPOINT_LOOKUP_BY_NAME,
    xdrStruct({ dom: remoteDomain, name: remoteString, flags: xdrUint }),
    checkpointRet,
  ),
  domainCheckpointDelete: remote('domain-checkpoint-delete', C.REMOTE_PROC_DOMAIN_CHECKPOINT_DELETE, xdrStruct({ checkpoint: remoteCheckpoint, flags: xdrUint }), xdrVoid),
  domainBackupBegin: remote(
    'domain-backup-begin',
    C.REMOTE_PROC_DOMAIN_BACKUP_BEGIN,
    xdrStruct({ dom: remoteDomain, backupXml: remoteString, checkpointXml: remoteOptionalString, flags: xdrUint }),
    xdrVoid,
  ),
  domainBackupGetXmlDesc: remote('domain-backup-get-xml-desc', C.REMOTE_PROC_DOMAIN_BACKUP_GET_XML_DESC, domFlags, xmlRet),
  domainGetJobInfo: remote(
    'domain-get-job-info',
    C.REMOTE_PROC_DOMAIN_GET_JOB_INFO,
    domOnly,
    xdrStruct({
      type: xdrInt,
      timeElapsed: xdrUhyper,
      timeRemaining: xdrUhyper,
      dataTotal: xdrUhyper,
      dataProcessed: xdrUhyper,
      dataRemaining: xdrUhyper,
      memTotal: xdrUhyper,
      memProcessed: xdrUhyper,
      memRemaining: xdrUhyper,
      fileTotal: xdrUhyper,
      fileProcessed: xdrUhyper,
      fileRemaining: xdrUhyper,
    }),
  ),
  domainGetJobStats: remote(
    'domain-get-job-stats',
    C.REMOTE_PROC_DOMAIN_GET_JOB_STATS,
    domFlags,
    xdrStruct({ type: xdrInt, params: typedParams(C.REMOTE_DOMAIN_JOB_STATS_MAX) }),
  ),
  domainSuspend: remote('domain-suspend', C.REMOTE_PROC_DOMAIN_SUSPEND, domOnly, xdrVoid),
  domainResume: remote('domain-resume', C.REMOTE_PROC_DOMAIN_RESUME, domOnly, xdrVoid),
  domainAbortJob: remote('domain-abort-job', C.REMOTE_PROC_DOMAIN_ABORT_JOB, domOnly, xdrVoid),
  domainAbortJobFlags: remote('domain-abort-job-flags', C.REMOTE_PROC_DOMAIN_ABORT_JOB_FLAGS, domFlags, xdrVoid),
  domainBlockPull: remote(
    'domain-block-pull',
    C.REMOTE_PROC_DOMAIN_BLOCK_PULL,
    xdrStruct({ dom: remoteDomain, path: remoteString, bandwidth: xdrUhyper, flags: xdrUint }),
    xdrVoid,
  ),
  domainBlockRebase: remote(
    'domain-block-rebase',
    C.REMOTE_PROC_DOMAIN_BLOCK_REBASE,
    xdrStruct({ dom: remoteDomain, path: remoteString, base: remoteOptionalString, bandwidth: xdrUhyper, flags: xdrUint }),
    xdrVoid,
  ),
  domainBlockCopy: remote(
    'domain-block-copy',
    C.REMOTE_PROC_DOMAIN_BLOCK_COPY,
    xdrStruct({ dom: remoteDomain, path: remoteString, destxml: remoteString, params: typedParams(C.REMOTE_DOMAIN_BLOCK_COPY_PARAMETERS_MAX), flags: xdrUint }),
    xdrVoid,
  ),
  domainGetBlockJobInfo: remote(
    'domain-get-block-job-info',
    C.REMOTE_PROC_DOMAIN_GET_BLOCK_JOB_INFO,
    xdrStruct({ dom: remoteDomain, path: remoteString, flags: xdrUint }),
    xdrStruct({ found: xdrInt, type: xdrInt, bandwidth: xdrUhyper, cur: xdrUhyper, end: xdrUhyper }),
  ),
  domainBlockJobAbort: remote('domain-block-job-abort', C.REMOTE_PROC_DOMAIN_BLOCK_JOB_ABORT, xdrStruct({ dom: remoteDomain, path: remoteString, flags: xdrUint }), xdrVoid),
  domainFsfreeze: remote('domain-fsfreeze', C.REMOTE_PROC_DOMAIN_FSFREEZE, mountpoints, filesystemsRet),
  domainFsthaw: remote('domain-fsthaw', C.REMOTE_PROC_DOMAIN_FSTHAW, mountpoints, filesystemsRet),
  connectDomainEventCallbackRegisterAny: remote(
    'connect-domain-event-callback-register-any',
    C.REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY,
    xdrStruct({ eventID: xdrInt, dom: xdrOptional(remoteDomain) }),
    xdrStruct({ callbackID: xdrInt }),
  ),
  connectDomainEventCallbackDeregisterAny: remote(
    'connect-domain-event-callback-deregister-any',
    C.REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY,
    xdrStruct({ callbackID: xdrInt }),
    xdrVoid,
  ),
  qemuDomainMonitorCommand: {
    name: 'qemu-domain-monitor-command',
    program: C.QEMU_PROGRAM,
    version: C.QEMU_PROTOCOL_VERSION,
    procedure: C.QEMU_PROC_DOMAIN_MONITOR_COMMAND,
    args: xdrStruct({ dom: remoteDomain, cmd: remoteString, flags: xdrUint }),
    ret: xdrStruct({ result: remoteString }),
  },
  qemuDomainAgentCommand: {
    name: 'qemu-domain-agent-command',
    program: C.QEMU_PROGRAM,
    version: C.QEMU_PROTOCOL_VERSION,
    procedure: C.QEMU_PROC_DOMAIN_AGENT_COMMAND,
    args: xdrStruct({ dom: remoteDomain, cmd: remoteString, timeout: xdrInt, flags: xdrUint }),
    ret: xdrStruct({ result: xdrOptional(remoteString) }),
  },
} as const;

export type LibvirtProcedureName = keyof typeof PROCEDURES;
export type ArgsOf<P> = P extends LibvirtProcedure<infer A, unknown> ? A : never;
export type RetOf<P> = P extends LibvirtProcedure<unknown, infer R> ? R : never;

// -- events (VIR_NET_MESSAGE on the remote program)

const jobCompletedMsg = xdrStruct({ callbackID: xdrInt, dom: remoteDomain, params: typedParams(C.REMOTE_DOMAIN_JOB_STATS_MAX) });
const blockJob2Msg = xdrStruct({ callbackID: xdrInt, dom: remoteDomain, dst: remoteString, type: xdrInt, status: xdrInt });
const callbackBlockJobMsg = xdrStruct({
  callbackID: xdrInt,
  msg: xdrStruct({ dom: remoteDomain, path: remoteString, type: xdrInt, status: xdrInt }),
});
const callbackLifecycleMsg = xdrStruct({ callbackID: xdrInt, msg: xdrStruct({ dom: remoteDomain, event: xdrInt, detail: xdrInt }) });

/** An event the daemon delivered for a registered callback, decoded. */
export type LibvirtDomainEvent =
  | ({ kind: 'job-completed' } & XdrValue<typeof jobCompletedMsg>)
  | ({ kind: 'block-job-2' } & XdrValue<typeof blockJob2Msg>)
  | ({ kind: 'block-job'; callbackID: number } & XdrValue<typeof callbackBlockJobMsg>['msg'])
  | ({ kind: 'lifecycle'; callbackID: number } & XdrValue<typeof callbackLifecycleMsg>['msg']);

/** The event procedures qbackup decodes; others are ignored (never registered). */
export const EVENTS: ReadonlyMap<number, XdrType<LibvirtDomainEvent>> = new Map<number, XdrType<LibvirtDomainEvent>>([
  [C.REMOTE_PROC_DOMAIN_EVENT_CALLBACK_JOB_COMPLETED, mapped(jobCompletedMsg, (m) => ({ kind: 'job-completed', ...m }))],
  [C.REMOTE_PROC_DOMAIN_EVENT_BLOCK_JOB_2, mapped(blockJob2Msg, (m) => ({ kind: 'block-job-2', ...m }))],
  [C.REMOTE_PROC_DOMAIN_EVENT_CALLBACK_BLOCK_JOB, mapped(callbackBlockJobMsg, (m) => ({ kind: 'block-job', callbackID: m.callbackID, ...m.msg }))],
  [C.REMOTE_PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE, mapped(callbackLifecycleMsg, (m) => ({ kind: 'lifecycle', callbackID: m.callbackID, ...m.msg }))],
]);

/** Encoders of the event bodies, for tests and fakes that play the daemon. */
export const EVENT_BODIES = { jobCompletedMsg, blockJob2Msg, callbackBlockJobMsg, callbackLifecycleMsg } as const;

function mapped<T>(codec: XdrType<T>, to: (value: T) => LibvirtDomainEvent): XdrType<LibvirtDomainEvent> {
  return {
    encode() {
      assert(false, 'events are only decoded; encode their body with EVENT_BODIES');
    },
    decode: (r) => to(codec.decode(r)),
  };
}

