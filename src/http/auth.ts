// Who may call the API: every request to /api needs `Authorization: Bearer
// TOKEN` with a token created by `qbackup token create` (stored hashed, see
// src/store/tokens.ts). Read-only tokens may only read (GET/HEAD); anything
// else is 403 READ_ONLY_TOKEN. The page at / is static and public: it holds
// no data and asks the person for a token.

import type { FastifyInstance, FastifyRequest } from 'fastify';
import { QbackupError } from '../errors.js';
import type { TokenStore } from '../store/tokens.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The name and access of the token the request came with (set by the auth hook). */
    tokenName?: string;
    tokenReadOnly?: boolean;
  }
}

function bearer(request: FastifyRequest): string | undefined {
  const h = request.headers.authorization;
  if (h === undefined) return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(h);
  return m?.[1];
}

export function installAuth(app: FastifyInstance, tokens: TokenStore): void {
  app.addHook('onRequest', async (request) => {
    const path = request.url.split('?')[0] ?? '';
    if (!path.startsWith('/api/') && path !== '/api') return;
    const secret = bearer(request);
    if (secret === undefined) throw new QbackupError('AUTH_REQUIRED', 'This request needs an API token: send "Authorization: Bearer TOKEN" (create one with qbackup token create)');
    const info = tokens.authenticate(secret);
    if (info === undefined) throw new QbackupError('AUTH_REQUIRED', 'The API token is not valid: it is unknown or has been revoked');
    request.tokenName = info.name;
    request.tokenReadOnly = info.readOnly;
    tokens.touch(info);
    if (info.readOnly && request.method !== 'GET' && request.method !== 'HEAD') {
      throw new QbackupError('READ_ONLY_TOKEN', `Token "${info.name}" is read-only: it cannot ${request.method} ${path}`);
    }
  });
}
