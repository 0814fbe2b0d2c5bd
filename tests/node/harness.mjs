// The scenario table of tests/scenario/scenarios.json, run through the JavaScript
// package. A port of tests/scenario/harness.rs: same message builder, same digest
// client, same checks, so the three runs (native, wasmtime, JS) judge one table.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

export function table() {
  return JSON.parse(readFileSync(new URL('../scenario/scenarios.json', import.meta.url), 'utf8'));
}

const hash = (alg, s) => createHash(alg === 'SHA-256' ? 'sha256' : 'md5').update(s).digest('hex');

export function clientResponse(alg, user, realm, password, method, uri, nonce, nc, cnonce) {
  const ha1 = hash(alg, `${user}:${realm}:${password}`);
  const ha2 = hash(alg, `${method}:${uri}`);
  return hash(alg, `${ha1}:${nonce}:${nc}:${cnonce}:auth:${ha2}`);
}

// An RFC 2069 answer (no qop): H(HA1:nonce:HA2).
export function clientResponseRfc2069(alg, user, realm, password, method, uri, nonce) {
  const ha1 = hash(alg, `${user}:${realm}:${password}`);
  const ha2 = hash(alg, `${method}:${uri}`);
  return hash(alg, `${ha1}:${nonce}:${ha2}`);
}

export function buildMessage(send, source, transport, nonce) {
  const method = send.method ?? 'INVITE';
  const register = method === 'REGISTER';
  const user = send.auth?.user ?? send.from ?? 'pbx';
  const ruri = send.ruri ?? (register ? 'sip:trunks.example.net' : 'sip:+15559876543@trunks.example.net');
  const callId = send.call_id ?? 'call-1@pbx';
  const cseq = send.cseq ?? 1;
  const to = register ? `<sip:${user}@trunks.example.net>` : `<${ruri}>`;
  const toTag = send.to_tag ? `;tag=${send.to_tag}` : '';
  const branch = callId.replace(/[^A-Za-z0-9]/g, '-');
  let m = `${method} ${ruri} SIP/2.0\r\nVia: SIP/2.0/${transport.toUpperCase()} ${source};branch=z9hG4bK-${branch}-${cseq}\r\n` +
    `Max-Forwards: ${send.max_forwards ?? 70}\r\nFrom: <sip:${user}@trunks.example.net>;tag=from-${cseq}\r\nTo: ${to}${toTag}\r\n` +
    `Call-ID: ${callId}\r\nCSeq: ${cseq} ${method}\r\n`;
  if (send.contact === undefined || send.contact === null) {
    if (register || method === 'INVITE') {
      const exp = send.contact_expires !== undefined ? `;expires=${send.contact_expires}` : '';
      m += `Contact: <sip:${user}@${source};transport=${transport}>${exp}\r\n`;
    }
  } else if (send.contact !== '') {
    m += `Contact: ${send.contact}\r\n`;
  }
  if (send.expires !== undefined) m += `Expires: ${send.expires}\r\n`;
  if (nonce !== undefined) {
    const auth = send.auth;
    const username = auth.user ?? user;
    const realm = auth.realm ?? 'trunks.example.net';
    const alg = auth.algorithm ?? 'MD5';
    // `auth.uri`: credentials computed for another Request-URI (a captured answer
    // replayed towards another number).
    const digestUri = auth.uri ?? ruri;
    // `auth.nc`: the nonce count (8 hex digits); `auth.qop: "none"`: an RFC 2069
    // answer, without qop, nc and cnonce.
    const nc = auth.nc ?? '00000001';
    const header = register || auth.header === 'Authorization' ? 'Authorization' : 'Proxy-Authorization';
    if (auth.qop === 'none') {
      const response = clientResponseRfc2069(alg, username, realm, auth.password ?? '', method, digestUri, nonce);
      m += `${header}: Digest username="${username}", realm="${realm}", nonce="${nonce}", uri="${digestUri}", response="${response}", algorithm=${alg}\r\n`;
    } else {
      const response = clientResponse(alg, username, realm, auth.password ?? '', method, digestUri, nonce, nc, '0a4f113b');
      m += `${header}: Digest username="${username}", realm="${realm}", nonce="${nonce}", uri="${digestUri}", response="${response}", algorithm=${alg}, qop=auth, nc=${nc}, cnonce="0a4f113b"\r\n`;
    }
  }
  return m + 'Content-Length: 0\r\n\r\n';
}

function nonceFrom(verdict, algorithm) {
  const value = (verdict.headers ?? []).map((h) => h[1]).find((v) => !algorithm || v.includes(`algorithm=${algorithm},`));
  return value?.match(/nonce="([^"]*)"/)?.[1];
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// The eight groups of an IPv6 address, '::' expanded.
function hextets(v6) {
  const [head, tail] = v6.toLowerCase().split('::');
  const h = head ? head.split(':') : [];
  if (tail === undefined) return h;
  const t = tail ? tail.split(':') : [];
  return [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
}

// Whether an ip:port ([v6]:port) source is in the table's core networks, 10.0.0.0/8
// or fd00:c0::/32 (an IPv4-mapped IPv6 address counts as its IPv4 one).
function inCoreNetworks(source) {
  const v6 = /^\[([^\]]+)\]:\d+$/.exec(source)?.[1];
  const v4 = v6 ? /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(v6)?.[1] : source.replace(/:\d+$/, '');
  if (v4) return v4.split('.')[0] === '10';
  const [a, b] = hextets(v6).map((g) => parseInt(g, 16));
  return a === 0xfd00 && b === 0xc0;
}

// The proxy socket a step's message arrives on, as tests/scenario/harness.rs has it:
// `send.local` ("none": the host does not know, so undefined), else the table's
// core-facing socket for a core source and the public one for any other.
export function localFor(send) {
  if (send.local === 'none') return undefined;
  if (send.local !== undefined) return send.local;
  return inCoreNetworks(send.source) ? '10.0.0.1:5060' : '192.0.2.1:5060';
}

function checkVerdict(want, got) {
  if (!want) throw new Error('step has no expect');
  for (const [key, w] of Object.entries(want)) {
    const headers = got.headers ?? [];
    if (key === 'header') {
      if (!headers.some((h) => same(h, w))) throw new Error(`header ${JSON.stringify(w)} missing from ${JSON.stringify(got)}`);
    } else if (key === 'header_contains') {
      if (!headers.some((h) => h[0] === w[0] && h[1].includes(w[1]))) throw new Error(`no header ${JSON.stringify(w)} in ${JSON.stringify(got)}`);
    } else if (key === 'headers_count') {
      for (const [name, n] of Object.entries(w)) {
        const count = headers.filter((h) => h[0] === name).length;
        if (count !== n) throw new Error(`${count} ${name} headers, expected ${n}: ${JSON.stringify(got)}`);
      }
    } else if (key === 'algorithms') {
      // The algorithm= of each challenge header, in order.
      const algs = headers.map((h) => h[1]).filter((v) => typeof v === 'string' && v.includes('algorithm='))
        .map((v) => v.split('algorithm=')[1].split(',')[0]);
      if (!same(algs, w)) throw new Error(`algorithms ${JSON.stringify(algs)}, expected ${JSON.stringify(w)}: ${JSON.stringify(got)}`);
    } else if (key === 'reason_contains') {
      if (!(got.reason ?? '').includes(w)) throw new Error(`reason lacks ${w}: ${JSON.stringify(got)}`);
    } else if (!same(got[key] ?? null, w)) {
      throw new Error(`${key}: got ${JSON.stringify(got[key])}, expected ${JSON.stringify(w)} (verdict ${JSON.stringify(got)})`);
    }
  }
}

function checkAlerts(step, got) {
  const want = step.alerts ?? [];
  if (want.length !== got.length) throw new Error(`${got.length} alert(s), expected ${want.length}: ${JSON.stringify(got)}`);
  want.forEach((w, i) => {
    for (const [key, value] of Object.entries(w)) {
      if (!same(got[i][key] ?? null, value)) throw new Error(`alert ${key}: got ${JSON.stringify(got[i][key])}, expected ${JSON.stringify(value)}`);
    }
    for (const required of ['id', 'kind', 'location', 'trunk_group', 'recipients', 'time', 'at_ms', 'count']) {
      if (!(required in got[i])) throw new Error(`alert lacks ${required}`);
    }
  });
}

/** Runs one scenario on a subject: {configure(json), judge(worker, msg, src, transport, at, local) -> [verdict, alerts], tick(worker, at) -> alerts, reload(worker)}. */
export function runScenario(subject, configs, sc) {
  const configName = sc.config ?? 'base';
  if (configName !== 'none') subject.configure(JSON.stringify(configs[configName]));
  let lastNonce;
  let keptNonce;
  sc.steps.forEach((step, i) => {
    const at = step.at ?? 1000 + i * 1000;
    const worker = step.worker ?? 0;
    const ctx = (e) => new Error(`step ${i}: ${e.message}`);
    try {
      if ('configure' in step) {
        const json = typeof step.configure === 'string' ? JSON.stringify(configs[step.configure]) : step.configure.raw;
        let error;
        try { subject.configure(json); } catch (e) { error = e; }
        if (step.expect_error === undefined) {
          if (error) throw new Error(`config refused: ${error.message}`);
        } else {
          if (!error) throw new Error('a bad config was accepted');
          if (step.expect_error.path !== undefined && error.path !== step.expect_error.path) throw new Error(`refused at ${error.path}, expected ${step.expect_error.path}`);
          if (step.expect_error.reason_contains && !error.reason.includes(step.expect_error.reason_contains)) throw new Error(`reason ${error.reason} lacks ${step.expect_error.reason_contains}`);
        }
        return;
      }
      if ('reload' in step) { subject.reload(worker); return; }
      if ('tick' in step) { checkAlerts(step, subject.tick(worker, at)); return; }
      const send = step.send;
      const source = send.source;
      const transport = send.transport ?? 'udp';
      const local = localFor(send);
      const alertsSeen = [];
      let nonce;
      if (send.auth) {
        const mode = send.auth.nonce ?? 'challenge';
        if (mode === 'challenge') {
          const [v, alerts] = subject.judge(worker, buildMessage(send, source, transport), source, transport, at, local);
          alertsSeen.push(...alerts);
          if (v.action !== 'challenge') throw new Error(`first attempt was not challenged: ${JSON.stringify(v)}`);
          nonce = nonceFrom(v, send.auth.algorithm);
          lastNonce = nonce;
        } else if (mode === 'previous') {
          nonce = lastNonce;
        } else if (mode === 'kept') {
          if (keptNonce === undefined) throw new Error('no kept nonce');
          nonce = keptNonce;
        } else {
          nonce = mode;
        }
        if (send.auth.keep === true) keptNonce = nonce;
      }
      const msg = send.raw !== undefined ? send.raw.replaceAll('\\r\\n', '\r\n') : buildMessage(send, source, transport, nonce);
      const [verdict, alerts] = subject.judge(worker, msg, source, transport, at, local);
      alertsSeen.push(...alerts);
      if (verdict.action === 'challenge') {
        const n = nonceFrom(verdict, send.auth?.algorithm);
        if (n) lastNonce = n;
      }
      checkVerdict(step.expect, verdict);
      checkAlerts(step, alertsSeen);
    } catch (e) {
      throw ctx(e);
    }
  });
}
