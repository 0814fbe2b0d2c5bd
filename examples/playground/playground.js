// The playground: the policy module (wasm-bindgen build in ./pkg, made by
// scripts/build-js) judging messages typed or generated here. Scenarios answer the
// policy's digest challenges with SHA-256 (Web Crypto), as a PBX would.

import init, { TrunkPolicy } from './pkg/trunkguard.js';

const $ = (id) => document.getElementById(id);
const REALM_DEFAULT = 'trunks.example.net';
let policy;
let rows = 0;

async function sha256(text) {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function realm() {
  try { return JSON.parse($('config').value).realm ?? REALM_DEFAULT; } catch { return REALM_DEFAULT; }
}

async function buildMessage(step, nonce) {
  const method = step.method;
  const register = method === 'REGISTER';
  const user = step.user ?? 'pbx';
  const r = realm();
  const ruri = step.ruri ?? (register ? `sip:${r}` : `sip:+15559876543@${r}`);
  const to = register ? `<sip:${user}@${r}>` : `<${ruri}>`;
  const callId = step.callId ?? `${method.toLowerCase()}-${Math.random().toString(36).slice(2, 10)}@playground`;
  let m = `${method} ${ruri} SIP/2.0\r\nVia: SIP/2.0/${(step.transport ?? 'udp').toUpperCase()} ${step.source};branch=z9hG4bK-${Math.random().toString(36).slice(2, 10)}\r\n` +
    `Max-Forwards: 70\r\nFrom: <sip:${user}@${r}>;tag=pg1\r\nTo: ${to}\r\nCall-ID: ${callId}\r\nCSeq: ${nonce ? 2 : 1} ${method}\r\n` +
    `Contact: <sip:${user}@${step.source}>\r\n`;
  if (register) m += 'Expires: 600\r\n';
  if (nonce) {
    const ha1 = await sha256(`${user}:${r}:${step.password}`);
    const ha2 = await sha256(`${method}:${ruri}`);
    const response = await sha256(`${ha1}:${nonce}:00000001:pg0c0ffee:auth:${ha2}`);
    const header = register ? 'Authorization' : 'Proxy-Authorization';
    m += `${header}: Digest username="${user}", realm="${r}", nonce="${nonce}", uri="${ruri}", response="${response}", algorithm=SHA-256, qop=auth, nc=00000001, cnonce="pg0c0ffee"\r\n`;
  }
  return m + 'Content-Length: 0\r\n\r\n';
}

const HQ = { user: 'hq1', password: 'correct horse battery staple' };
// The example configuration's public listener; its core-facing one is 10.0.0.1:5060.
const PUBLIC_SOCKET = '192.0.2.1:5060';
const SCENARIOS = {
  'Registered PBX registers and calls': [
    { method: 'REGISTER', source: '203.0.113.7:5060', ...HQ, auth: true },
    { method: 'INVITE', source: '203.0.113.7:5060', ...HQ, auth: true },
  ],
  'Blocked call from an unregistered IP': [
    { method: 'REGISTER', source: '203.0.113.7:5060', ...HQ, auth: true },
    { method: 'INVITE', source: '198.51.100.66:5060', ...HQ, auth: true },
  ],
  'Peer-to-peer trunk: inside and outside its ACL': [
    { method: 'INVITE', source: '192.0.2.10:5060', user: 'branch1', password: 'branch-secret', auth: true },
    { method: 'INVITE', source: '203.0.113.200:5060', user: 'branch1', password: 'branch-secret', auth: true },
  ],
  'Inbound call from the carrier core': [
    { method: 'REGISTER', source: '203.0.113.7:5060', ...HQ, auth: true },
    { method: 'INVITE', source: '10.0.0.5:5060', local: '10.0.0.1:5060', user: 'carrier', ruri: 'sip:+15551230000@edge.example.net' },
  ],
  'Configuration error (ACL typo)': 'config-error',
};

const EXAMPLE_CONFIG = {
  realm: 'trunks.example.net',
  core_networks: ['10.0.0.0/8'],
  core_sockets: ['10.0.0.1:5060'],
  locations: [
    { id: 'hq', contacts: ['noc@example.com'], trunk_groups: [
      { id: 'hq-pbx1', username: 'hq1', password: 'correct horse battery staple', dids: ['+15551230000'],
        failover: 'sip:+15551230000@198.51.100.20:5060' } ] },
    { id: 'branch', contacts: ['branch-it@example.com'], trunk_groups: [
      { id: 'branch-p2p', username: 'branch1', password: 'branch-secret', require_registration: false,
        acl: ['192.0.2.0/28', '2001:db8:7::/48'], dids: ['+15557770000'] } ] },
  ],
};

function nowMs() {
  const t = $('time').value;
  return t ? new Date(`${t}Z`).getTime() : Date.now();
}

function newPolicy() {
  policy = new TrunkPolicy();
  policy.onAlert((a) => {
    const li = document.createElement('li');
    li.className = `alert alert-${a.kind}`;
    li.textContent = `${a.time} ${a.kind}${a.summary ? ` (summary of ${a.count})` : ''}: ${a.trunk_group} at ${a.location} — ${a.description ?? ''} (source ${a.source ?? a.new_ip}${a.registered ? `, registered ${a.registered}` : ''}) → ${a.recipients.join(', ')}`;
    $('alerts').append(li);
  });
}

function applyConfig() {
  const status = $('config-status');
  const box = $('config-error');
  try {
    const generation = policy.configure($('config').value);
    status.textContent = `generation ${generation} in force`;
    status.className = 'status ok';
    box.hidden = true;
    return true;
  } catch (e) {
    status.textContent = policy.generation ? `refused; generation ${policy.generation} still in force` : 'refused';
    status.className = 'status bad';
    box.hidden = false;
    box.textContent = e.path !== undefined ? `${e.path}\n${e.reason}` : String(e);
    box.dataset.path = e.path ?? '';
    return false;
  }
}

// `local`: the proxy socket the message arrived on; only a core-facing one
// (config core_sockets) makes a core source the core.
function show(message, source, transport, at, local) {
  const verdict = policy.judge(message, source, transport, at, local);
  rows += 1;
  const tr = document.createElement('tr');
  const first = message.split('\r\n')[0];
  const cells = [rows, first.slice(0, 60), source, verdict.action, verdict.code ?? '', verdict.cause ?? '', verdict.trunk_group ?? ''];
  cells.forEach((c, i) => {
    const td = document.createElement('td');
    td.textContent = String(c);
    if (i === 3) td.className = `action-${verdict.action}`;
    tr.append(td);
  });
  $('results').querySelector('tbody').append(tr);
  $('detail').textContent = JSON.stringify(verdict, null, 2);
  return verdict;
}

async function runScenario(name) {
  const steps = SCENARIOS[name];
  if (steps === 'config-error') {
    const bad = structuredClone(EXAMPLE_CONFIG);
    bad.locations[1].trunk_groups[0].acl[0] = '192.0.2.0/33';
    $('config').value = JSON.stringify(bad, null, 2);
    applyConfig();
    return;
  }
  newPolicy();
  if (!applyConfig()) return;
  let at = nowMs();
  for (const step of steps) {
    const transport = step.transport ?? 'udp';
    let message = await buildMessage(step);
    $('message').value = message;
    $('source').value = step.source;
    $('local').value = step.local ?? PUBLIC_SOCKET;
    let verdict = show(message, step.source, transport, at, $('local').value);
    if (step.auth && verdict.action === 'challenge') {
      const nonce = verdict.headers.map((h) => h[1]).find((v) => v.includes('SHA-256'))?.match(/nonce="([^"]*)"/)?.[1];
      message = await buildMessage(step, nonce);
      $('message').value = message;
      at += 50;
      verdict = show(message, step.source, transport, at, $('local').value);
    }
    at += 1000;
  }
}

async function main() {
  await init();
  newPolicy();
  let config = EXAMPLE_CONFIG;
  try {
    const r = await fetch('../config.json');
    if (r.ok) config = await r.json();
  } catch { /* served on its own: keep the embedded example */ }
  $('config').value = JSON.stringify(config, null, 2);
  applyConfig();
  for (const name of Object.keys(SCENARIOS)) {
    const o = document.createElement('option');
    o.textContent = name;
    $('scenario').append(o);
  }
  $('time').value = new Date().toISOString().slice(0, 19);
  $('message').value = await buildMessage({ method: 'OPTIONS', source: '203.0.113.7:5060', ruri: `sip:${realm()}` });
  $('apply').onclick = applyConfig;
  $('config-file').onchange = async (e) => {
    const f = e.target.files[0];
    if (f) { $('config').value = await f.text(); applyConfig(); }
  };
  $('judge').onclick = () => {
    try {
      show($('message').value.replace(/\r?\n/g, '\r\n'), $('source').value, $('transport').value, nowMs(), $('local').value);
    } catch (e) {
      $('detail').textContent = `error: ${e.message ?? e}`;
    }
  };
  $('run-scenario').onclick = () => runScenario($('scenario').value);
  document.body.dataset.ready = 'true';
}

main();
