// A small client for the daemon's API in tests: JSON (or raw) requests with
// a bearer token, and a reader of a task's server-sent events.

export interface ApiResponse {
  status: number;
  body: unknown;
  text: string;
  headers: Headers;
}

export interface RequestOptions {
  /** Overrides the client's token; undefined sends none. */
  token?: string | undefined;
  json?: unknown;
  /** A raw body with its content type, e.g. XML or malformed JSON. */
  raw?: { body: string; type: string };
  headers?: Record<string, string>;
}

export class ApiClient {
  constructor(
    readonly baseUrl: string,
    public token: string | undefined,
  ) {}

  async request(method: string, path: string, options: RequestOptions = {}): Promise<ApiResponse> {
    const token = 'token' in options ? options.token : this.token;
    const headers: Record<string, string> = { ...(token !== undefined ? { authorization: `Bearer ${token}` } : {}), ...options.headers };
    let body: string | undefined;
    if (options.json !== undefined) {
      headers['content-type'] = 'application/json';
      body = JSON.stringify(options.json);
    } else if (options.raw !== undefined) {
      headers['content-type'] = options.raw.type;
      body = options.raw.body;
    }
    const res = await fetch(`${this.baseUrl}${path}`, { method, headers, ...(body !== undefined ? { body } : {}) });
    const text = await res.text();
    let parsed: unknown = undefined;
    try {
      parsed = text === '' ? undefined : JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    return { status: res.status, body: parsed, text, headers: res.headers };
  }

  get(path: string, options: RequestOptions = {}): Promise<ApiResponse> {
    return this.request('GET', path, options);
  }

  post(path: string, json?: unknown, options: RequestOptions = {}): Promise<ApiResponse> {
    return this.request('POST', path, { ...options, ...(json !== undefined ? { json } : {}) });
  }

  delete(path: string, options: RequestOptions = {}): Promise<ApiResponse> {
    return this.request('DELETE', path, options);
  }

  /** Reads a task's event stream to its end; returns every task snapshot sent. */
  async events(taskId: string): Promise<Array<Record<string, unknown>>> {
    const res = await fetch(`${this.baseUrl}/api/tasks/${taskId}/events`, { headers: { authorization: `Bearer ${this.token ?? ''}` } });
    if (res.status !== 200 || res.body === null) throw new Error(`events: status ${res.status}: ${await res.text()}`);
    const out: Array<Record<string, unknown>> = [];
    const decoder = new TextDecoder();
    let buffer = '';
    for await (const chunk of res.body) {
      buffer += decoder.decode(chunk as Uint8Array, { stream: true });
      let i: number;
      while ((i = buffer.indexOf('\n\n')) >= 0) {
        const frame = buffer.slice(0, i);
        buffer = buffer.slice(i + 2);
        const data = frame.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
        if (data !== '') out.push(JSON.parse(data) as Record<string, unknown>);
      }
    }
    return out;
  }

  /** Polls a task until it has ended. */
  async waitTask(taskId: string, timeoutMs = 120_000): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = await this.get(`/api/tasks/${taskId}`);
      const t = r.body as Record<string, unknown>;
      if (r.status !== 200) throw new Error(`task ${taskId}: ${r.text}`);
      if (t['endedMs'] !== null) return t;
      if (Date.now() > deadline) throw new Error(`task ${taskId} did not end in time`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}
