// The libvirt driver's foundation: connection URIs and the client of
// libvirt's own RPC protocol (rpc/). The driver built on it imports from here.

export * from './rpc/index.js';
export { LibvirtClient, uuidBytes, uuidText, type LibvirtBlockJobInfo, type LibvirtClientOptions, type LibvirtJobStats } from './client.js';
export { LIBVIRT_SYSTEM_SOCKET, parseConnectUri, type ConnectUri, type ParseConnectUriOptions } from './uri.js';
