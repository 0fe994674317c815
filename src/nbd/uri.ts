// NBD URIs as nbdinfo, nbdcopy, qemu-img and libnbd take them (the NBD
// project's doc/uri.md): nbd:// and nbds:// over TCP, nbd+unix:// and
// nbds+unix:// over a unix socket; the "s" means TLS. The export name is the
// path after the first "/", percent-decoded. Query parameters read here:
// socket= (unix, required), tls-certificates=DIR (the client's certificate
// directory, see src/util/pki.ts) and tls-hostname= (the name the server's
// certificate must carry).
//
// Invariants:
// - A TLS scheme always means TLS: there is no parameter that weakens it
//   (tls-verify-peer=false is refused), and a plain scheme with TLS
//   parameters is refused rather than silently talking in the clear.
// - Anything not understood (another transport, an unknown parameter, a
//   port outside 1..65535) is INVALID_ARGUMENT naming the URI.

import { QbackupError } from '../errors.js';
import type { NbdAddress } from './connection.js';

export const NBD_DEFAULT_PORT = 10809;

export interface NbdUri {
  address: NbdAddress;
  exportName: string;
  tls: boolean;
  /** tls-certificates=: the client's certificate directory. */
  tlsCertificates?: string;
  /** tls-hostname=: the name the server's certificate is checked against. */
  tlsHostname?: string;
}

const SCHEMES: Record<string, { tls: boolean; unix: boolean }> = {
  'nbd:': { tls: false, unix: false },
  'nbds:': { tls: true, unix: false },
  'nbd+unix:': { tls: false, unix: true },
  'nbds+unix:': { tls: true, unix: true },
};

/** Parses an NBD URI; throws INVALID_ARGUMENT (or NOT_SUPPORTED for weakened TLS) with one sentence. */
export function parseNbdUri(uri: string): NbdUri {
  const fail = (why: string): never => {
    throw new QbackupError('INVALID_ARGUMENT', `Cannot use NBD URI "${uri}": ${why}`);
  };
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    return fail('it is not a URI');
  }
  const scheme = SCHEMES[url.protocol];
  if (scheme === undefined) return fail('the scheme must be nbd, nbds, nbd+unix or nbds+unix');
  if (url.username !== '' || url.password !== '') fail('user names and passwords are not supported');
  if (url.hash !== '') fail('it has a fragment');
  const params = readParams(url, fail);
  const exportName = decodeExportName(url.pathname, fail);
  let address: NbdAddress;
  if (scheme.unix) {
    if (url.host !== '') fail('a unix socket URI has no host');
    const socket = params.get('socket');
    if (socket === undefined || socket === '') return fail('a unix socket URI needs ?socket=PATH');
    address = { socket };
  } else {
    if (params.has('socket')) fail('socket= is only for nbd+unix and nbds+unix');
    const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    if (host === '') fail('it has no host');
    const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
    if (!Number.isInteger(port) || port < 1 || port > 65535) fail(`port ${url.port} is outside 1..65535`);
    address = { host, port };
  }
  const tlsParams = [...params.keys()].filter((k) => k.startsWith('tls-'));
  if (!scheme.tls && tlsParams.length > 0) fail(`${tlsParams.join(', ')} asks for TLS, but ${url.protocol}// is unencrypted (use nbds)`);
  const verify = params.get('tls-verify-peer');
  if (verify !== undefined && !['true', '1', 'yes', 'on'].includes(verify.toLowerCase())) {
    throw new QbackupError('NOT_SUPPORTED', `Cannot use NBD URI "${uri}": qbackup always verifies the server's certificate (tls-verify-peer=${verify})`);
  }
  const out: NbdUri = { address, exportName, tls: scheme.tls };
  const certs = params.get('tls-certificates');
  if (certs !== undefined) out.tlsCertificates = certs;
  const hostname = params.get('tls-hostname');
  if (hostname !== undefined) out.tlsHostname = hostname;
  return out;
}

/** The URI of an export; percent-encodes the export name and socket path. */
export function formatNbdUri(u: NbdUri): string {
  const scheme = `nbd${u.tls ? 's' : ''}${'socket' in u.address ? '+unix' : ''}`;
  const path = `/${encodeURIComponent(u.exportName).replace(/%2F/g, '/')}`;
  const query: string[] = [];
  if ('socket' in u.address) query.push(`socket=${encodeQuery(u.address.socket)}`);
  if (u.tlsCertificates !== undefined) query.push(`tls-certificates=${encodeQuery(u.tlsCertificates)}`);
  if (u.tlsHostname !== undefined) query.push(`tls-hostname=${encodeQuery(u.tlsHostname)}`);
  const q = query.length > 0 ? `?${query.join('&')}` : '';
  if ('socket' in u.address) return `${scheme}://${path}${q}`;
  const host = u.address.host.includes(':') ? `[${u.address.host}]` : u.address.host;
  return `${scheme}://${host}:${u.address.port}${path}${q}`;
}

const KNOWN_PARAMS = new Set(['socket', 'tls-certificates', 'tls-hostname', 'tls-verify-peer']);

function readParams(url: URL, fail: (why: string) => never): Map<string, string> {
  const params = new Map<string, string>();
  for (const [key, value] of url.searchParams) {
    if (!KNOWN_PARAMS.has(key)) fail(`query parameter "${key}" is not supported`);
    if (params.has(key)) fail(`query parameter "${key}" is given twice`);
    params.set(key, value);
  }
  return params;
}

function decodeExportName(pathname: string, fail: (why: string) => never): string {
  const raw = pathname.startsWith('/') ? pathname.slice(1) : pathname;
  try {
    return decodeURIComponent(raw);
  } catch {
    return fail('its export name is not valid percent-encoding');
  }
}

/** Paths keep their slashes readable; everything that would end or split a parameter is encoded. */
function encodeQuery(value: string): string {
  return encodeURIComponent(value).replace(/%2F/g, '/');
}
