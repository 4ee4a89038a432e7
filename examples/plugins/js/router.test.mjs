// Unit tests of router.js on Node, with the host import stubbed: `node --test router.test.mjs`.
import { register } from 'node:module';
import { test } from 'node:test';
import assert from 'node:assert/strict';

// `wasmgate:plugin/host@0.6.1` exists only inside the gateway; give Node a stand-in.
const stub = 'data:text/javascript,export function log() {}';
const hooks = `export async function resolve(specifier, context, next) {
  return specifier.startsWith('wasmgate:') ? { url: ${JSON.stringify(stub)}, shortCircuit: true } : next(specifier, context);
}`;
register('data:text/javascript,' + encodeURIComponent(hooks));
const { lifecycle, handshake } = await import('./router.js');

const conn = () => ({ meta: {}, setMeta(k, v) { this.meta[k] = v; } });
const req = (...headers) => ({ method: 'GET', path: '/', query: '', host: 'h', clientAddr: '127.0.0.1:1', subprotocols: [], scheme: 'ws',
  headers: headers.map(([name, value]) => `${name}: ${value}\n`).join('') });

test('the header picks the upstream', () => {
  const hooks = lifecycle.init(JSON.stringify({ header: 'X-Backend', backends: { blue: 'pool-blue', green: 'pool-green' } }));
  assert.deepEqual(hooks, { handshake: true, balancer: false, messages: false, close: false });
  const c = conn();
  const v = handshake.onHandshake(c, req(['x-backend', 'green']));
  assert.equal(v.tag, 'accept');
  assert.equal(v.val.upstream, 'pool-green');
  assert.equal(c.meta.backend, 'pool-green');
  // Unknown or missing: the route's own upstream.
  assert.equal(handshake.onHandshake(conn(), req(['x-backend', 'red'])).val.upstream, undefined);
  assert.equal(handshake.onHandshake(conn(), req()).val.upstream, undefined);
});

test('strict refuses what it cannot route', () => {
  lifecycle.init(JSON.stringify({ backends: { blue: 'b' }, strict: true }));
  assert.deepEqual(handshake.onHandshake(conn(), req(['x-backend', 'red'])),
    { tag: 'reject', val: { status: 400, reason: 'unknown x-backend "red"', headers: [] } });
  assert.equal(handshake.onHandshake(conn(), req()).val.reason, 'missing x-backend header');
});

test('bad config is an error string', () => {
  for (const bad of ['{}', '{"backends": {"a": 1}}', '{"backends": {}, "typo": 1}', 'nope', '{"backends": {}, "header": "a b"}']) {
    assert.throws(() => lifecycle.init(bad), (e) => typeof e === 'string' && e.startsWith('bad config: '), bad);
  }
});
