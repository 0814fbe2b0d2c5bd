// The project's scenario table through the JavaScript package (target/js/node, built
// by scripts/build-js): the same verdicts as the native core and the wasmtime host.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { table, runScenario } from './harness.mjs';

const require = createRequire(import.meta.url);
const { TrunkPolicy } = require('../../target/js/node/trunkguard.js');

class JsSubject {
  constructor() {
    this.store = new Map();
    this.alerts = [];
    this.workers = [this.make(), this.make()];
    this.lastGood = undefined;
  }
  make() {
    const p = new TrunkPolicy(this.store);
    p.onAlert((a) => this.alerts.push(a));
    return p;
  }
  configure(json) {
    for (const w of this.workers) w.configure(json);
    this.lastGood = json;
  }
  judge(worker, msg, source, transport, at, local) {
    const v = this.workers[worker].judge(msg, source, transport, at, local);
    return [v, this.alerts.splice(0)];
  }
  tick(worker, at) {
    this.workers[worker].tick(at);
    return this.alerts.splice(0);
  }
  reload(worker) {
    const p = this.make();
    if (this.lastGood) p.configure(this.lastGood);
    this.workers[worker] = p;
  }
}

const { configs, scenarios } = table();

test('the table is complete', () => {
  assert.ok(scenarios.length >= 75, `only ${scenarios.length} scenarios`);
});

for (const sc of scenarios) {
  test(sc.name, () => runScenario(new JsSubject(), configs, sc));
}

test('a refused configuration throws an Error with path and reason', () => {
  const p = new TrunkPolicy();
  assert.throws(() => p.configure('{"realm": "r", "locations": [], "bogus": 1}'), (e) => {
    assert.ok(e instanceof Error);
    assert.equal(e.path, 'bogus');
    assert.match(e.reason, /unknown field/);
    assert.equal(e.message, `${e.path}: ${e.reason}`);
    return true;
  });
  assert.equal(p.generation, 0);
});

test('bad arguments throw instead of judging', () => {
  const p = new TrunkPolicy();
  p.configure(JSON.stringify(configs.base));
  assert.throws(() => p.judge('OPTIONS sip:x SIP/2.0\r\n\r\n', '203.0.113.7', 'udp', 0), /ip:port/);
  assert.throws(() => p.judge('x', '203.0.113.7:5060', 'pigeon', 0), /transport/);
  assert.throws(() => p.judge(42, '203.0.113.7:5060', 'udp', 0), /string or a Uint8Array/);
});

test('bytes that are not UTF-8 are judged, not crashed on', () => {
  const p = new TrunkPolicy();
  p.configure(JSON.stringify(configs.base));
  const v = p.judge(new Uint8Array([0xff, 0xfe, 0, 1]), '203.0.113.7:5060', 'udp', 1000);
  assert.equal(v.action, 'reject');
  assert.equal(v.code, 400);
});
