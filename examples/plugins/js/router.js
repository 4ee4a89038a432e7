// A header-based router plugin for wasmgate, in JavaScript (ComponentizeJS, world
// handshake-plugin): the value of a request header picks the upstream pool.
//
// Config (the plugin's `config` table, handed to `init` as JSON):
//   header   = "x-backend"                          which request header to read
//   backends = { blue = "pool-blue", green = "pool-green" }   header value -> [[upstream]] name
//   strict   = false                                true: refuse unknown or missing values with 400
//
// Without the header (or with an unknown value, unless strict) the connection goes to its
// route's upstream unchanged.

import { log } from 'wasmgate:plugin/host@0.6.1';

// Set by init; one per instance, shared by the connections the instance serves.
let config = null;

export function parseConfig(text) {
  const raw = text.trim() === '' || text.trim() === 'null' ? {} : JSON.parse(text);
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new Error('config must be a table');
  }
  for (const key of Object.keys(raw)) {
    if (!['header', 'backends', 'strict'].includes(key)) throw new Error(`unknown key "${key}"`);
  }
  const header = raw.header ?? 'x-backend';
  if (typeof header !== 'string' || !/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/.test(header)) {
    throw new Error('header must be a header name');
  }
  const backends = raw.backends;
  if (typeof backends !== 'object' || backends === null || Array.isArray(backends)) {
    throw new Error('backends must be a table of header value = upstream name');
  }
  for (const [value, pool] of Object.entries(backends)) {
    if (typeof pool !== 'string' || pool === '') throw new Error(`backends.${value} must be an upstream name`);
  }
  const strict = raw.strict ?? false;
  if (typeof strict !== 'boolean') throw new Error('strict must be true or false');
  return { header: header.toLowerCase(), backends: new Map(Object.entries(backends)), strict };
}

/// The request's headers (one text, a line "name: value" each, names lower-case) as
/// {name, value} pairs.
export function headerLines(text) {
  return text.split('\n').filter((line) => line !== '').map((line) => {
    const colon = line.indexOf(':');
    return { name: line.slice(0, colon), value: line.slice(colon + 1).trim() };
  });
}

/// The verdict for a request's headers (the request's `headers` text).
export function route(cfg, headers) {
  const found = headerLines(headers).find((h) => h.name === cfg.header);
  const pool = found === undefined ? undefined : cfg.backends.get(found.value);
  if (pool === undefined && cfg.strict) {
    const reason = found === undefined ? `missing ${cfg.header} header` : `unknown ${cfg.header} "${found.value}"`;
    return { tag: 'reject', val: { status: 400, reason, headers: [] } };
  }
  return {
    tag: 'accept',
    val: {
      upstream: pool,
      addHeaders: [],
      removeHeaders: [],
      rewritePath: undefined,
      subprotocol: undefined,
      compression: undefined,
    },
  };
}

export const lifecycle = {
  // result<hooks, string>: the return value is `ok`, a thrown string is `err`.
  init(json) {
    try {
      config = parseConfig(json);
    } catch (e) {
      throw `bad config: ${e.message}`;
    }
    log('debug', `routing on ${config.header} to ${config.backends.size} backends`);
    return { handshake: true, balancer: false, messages: false, close: false };
  },
  onClose(_conn, _code, _stats) {},
};

export const handshake = {
  onHandshake(conn, req) {
    const verdict = route(config, req.headers);
    if (verdict.tag === 'accept' && verdict.val.upstream !== undefined) {
      conn.setMeta('backend', verdict.val.upstream);
    }
    return verdict;
  },
};
