// Connection URIs as libvirt's tools take them (`--connect URI`), parsed into
// what qbackup needs: which driver, and for libvirt the daemon's socket and
// the name to open on it.
//
//   (none) or qbackup:///          qbackup's own QEMU driver
//   qemu:///system                 libvirt's system daemon, /var/run/libvirt/libvirt-sock
//   qemu:///session                the user's daemon, RUNTIME_DIR/libvirt/libvirt-sock
//   qemu+unix:///system?socket=P   libvirt's daemon at the socket P
//
// Invariants: the library reads no environment: the caller passes the
// runtime directory ($XDG_RUNTIME_DIR) a session URI needs. Remote
// transports (ssh, tls, tcp, libssh, ext) and other hypervisor drivers are
// refused with one sentence (NOT_SUPPORTED); a malformed URI is
// INVALID_ARGUMENT.

import { isAbsolute, join } from 'node:path';
import { QbackupError } from '../../errors.js';

export const LIBVIRT_SYSTEM_SOCKET = '/var/run/libvirt/libvirt-sock';

export type ConnectUri =
  | { driver: 'qbackup'; uri: string }
  | {
      driver: 'libvirt';
      /** The URI as given. */
      uri: string;
      /** What is sent in connect-open: the URI without transport and socket, e.g. "qemu:///system". */
      name: string;
      mode: 'system' | 'session';
      socketPath: string;
    };

export interface ParseConnectUriOptions {
  /** $XDG_RUNTIME_DIR of the caller, for qemu:///session without ?socket=. */
  runtimeDir?: string | undefined;
}

const REMOTE_TRANSPORTS = new Set(['ssh', 'tls', 'tcp', 'libssh', 'libssh2', 'ext']);

/** Parses a connection URI; undefined or '' selects qbackup's own driver. */
export function parseConnectUri(input: string | undefined, options: ParseConnectUriOptions = {}): ConnectUri {
  if (input === undefined || input === '') return { driver: 'qbackup', uri: 'qbackup:///' };
  const match = /^([a-z][a-z0-9]*)(?:\+([a-z0-9]+))?:\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(input);
  if (match === null) throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${input}" is not of the form DRIVER[+TRANSPORT]://[HOST]/PATH (e.g. qemu:///system)`);
  const scheme = (match[1] ?? '').toLowerCase();
  const transport = match[2]?.toLowerCase();
  const host = match[3] ?? '';
  const path = match[4] ?? '/';
  const query = new URLSearchParams(match[5] ?? '');
  if (scheme === 'qbackup') {
    if (transport !== undefined || host !== '' || path !== '/' || [...query.keys()].length > 0) {
      throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${input}" is not valid for qbackup's own driver: write qbackup:///`);
    }
    return { driver: 'qbackup', uri: input };
  }
  if (scheme !== 'qemu') throw new QbackupError('NOT_SUPPORTED', `Connection URI "${input}" names the libvirt driver "${scheme}", and qbackup supports only qemu (qemu:///system) and its own (qbackup:///)`);
  if (transport !== undefined && REMOTE_TRANSPORTS.has(transport)) {
    throw new QbackupError('NOT_SUPPORTED', `Connection URI "${input}" uses the remote transport "${transport}", which qbackup does not support: run qbackup on the host itself with qemu:///system`);
  }
  if (transport !== undefined && transport !== 'unix') throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${input}" names the unknown transport "${transport}"`);
  if (host !== '') throw new QbackupError('NOT_SUPPORTED', `Connection URI "${input}" names the host "${host}", and qbackup talks only to the libvirt of the host it runs on: write qemu:///system`);
  const mode = path === '/system' ? 'system' : path === '/session' ? 'session' : undefined;
  if (mode === undefined) throw new QbackupError('NOT_SUPPORTED', `Connection URI "${input}" has the path "${path}", and qbackup supports /system and /session`);
  for (const key of query.keys()) {
    if (key !== 'socket') throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${input}" has the parameter "${key}", and qbackup takes only socket=PATH`);
  }
  const socket = query.get('socket');
  let socketPath: string;
  if (socket !== null) {
    if (!isAbsolute(socket)) throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${input}" has a socket path "${socket}" that is not absolute`);
    socketPath = socket;
  } else if (mode === 'system') {
    socketPath = LIBVIRT_SYSTEM_SOCKET;
  } else {
    const runtimeDir = options.runtimeDir;
    if (runtimeDir === undefined || runtimeDir === '') {
      throw new QbackupError('INVALID_ARGUMENT', `Connection URI "${input}" needs the user's runtime directory (XDG_RUNTIME_DIR) to find the session daemon's socket, and none is set`);
    }
    socketPath = join(runtimeDir, 'libvirt', 'libvirt-sock');
  }
  return { driver: 'libvirt', uri: input, name: `qemu:///${mode}`, mode, socketPath };
}
