// One shape for every API route: method, url, a summary and tag for the
// OpenAPI document, JSON schemas for params, query and body (unknown fields
// are refused: every object schema says additionalProperties: false), the
// success status, and a handler that calls the library. Whether a route
// changes anything follows from its method (GET reads; the rest write), so
// read-only tokens are checked in one place (auth.ts).

import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { QbackupService } from '../service/daemon-service.js';
import { ERROR_BODY_SCHEMA } from './errors.js';

export type JsonSchema = Readonly<Record<string, unknown>>;

export interface RouteInput<P, Q, B> {
  params: P;
  query: Q;
  body: B;
  /** The name of the token that made the request. */
  who: string;
  request: FastifyRequest;
  reply: FastifyReply;
}

export interface RouteSpec<P, Q, B> {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  url: string;
  summary: string;
  tag: string;
  params?: JsonSchema;
  query?: JsonSchema;
  /** A JSON body schema, or per content type (XML bodies are strings). */
  body?: JsonSchema;
  /** Status on success (default 200). */
  status?: number;
  handler(input: RouteInput<P, Q, B>, service: QbackupService): Promise<unknown> | unknown;
}

/** An object schema that refuses unknown fields. */
export function object(properties: Record<string, JsonSchema>, required: readonly string[] = []): JsonSchema {
  return { type: 'object', properties, required: [...required], additionalProperties: false };
}

export const str = (extra: JsonSchema = {}): JsonSchema => ({ type: 'string', maxLength: 4096, ...extra });
export const bool: JsonSchema = { type: 'boolean' };
export const int = (minimum = 0): JsonSchema => ({ type: 'integer', minimum });
export const strings: JsonSchema = { type: 'array', items: { type: 'string', maxLength: 256 }, maxItems: 256 };
/** A query-string flag: "true" or "false" (query values are never coerced). */
export const queryFlag: JsonSchema = { type: 'string', enum: ['true', 'false', '1', '0', ''] };

export function flagValue(v: string | undefined): boolean {
  return v === 'true' || v === '1' || v === '';
}

/** A body given as JSON (validated by `json`) or as libvirt XML text. */
export function jsonOrXml(json: JsonSchema): JsonSchema {
  return {
    content: {
      'application/json': { schema: json },
      'application/xml': { schema: { type: 'string', maxLength: 1 << 20 } },
    },
  };
}

export function addRoute<P, Q, B>(app: FastifyInstance, service: QbackupService, spec: RouteSpec<P, Q, B>): void {
  app.route({
    method: spec.method,
    url: spec.url,
    schema: {
      summary: spec.summary,
      tags: [spec.tag],
      ...(spec.params !== undefined ? { params: spec.params } : {}),
      ...(spec.query !== undefined ? { querystring: spec.query } : {}),
      ...(spec.body !== undefined ? { body: spec.body } : {}),
      response: { '4XX': ERROR_BODY_SCHEMA, '5XX': ERROR_BODY_SCHEMA },
    },
    // No body at all is an empty object, so a POST with only optional
    // fields needs none, and a missing required field is named as such.
    preValidation: async (request) => {
      if (spec.body !== undefined && request.body === undefined) request.body = {};
    },
    handler: async (request, reply) => {
      const result = await spec.handler(
        { params: request.params as P, query: request.query as Q, body: request.body as B, who: request.tokenName ?? '', request, reply },
        service,
      );
      if (reply.sent) return reply;
      reply.code(spec.status ?? 200);
      return result ?? null;
    },
  });
}
