#!/usr/bin/env node
// trunkguard's Node.js SIP edge: a stateless UDP proxy in front of a carrier that
// asks the policy (target/js/node, built by scripts/build-js) about every request it
// receives and applies the verdict. See README.md beside this file.
'use strict';

const crypto = require('node:crypto');
const dgram = require('node:dgram');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { parseArgs } = require('node:util');

const { TrunkPolicy } = require(process.env.TRUNKGUARD_JS ?? path.join(__dirname, '../../target/js/node/trunkguard.js'));

const USAGE = `usage: node edge.js --config FILE --listen IP:PORT --upstream HOST:PORT
         [--core-listen IP:PORT] [--alerts-url URL [--alerts-token-file FILE]] [--verbose]`;

// ---------------------------------------------------------------- SIP text

const COMPACT = { v: 'via', f: 'from', t: 'to', i: 'call-id', m: 'contact', l: 'content-length' };
const canon = (name) => COMPACT[name.toLowerCase()] ?? name.toLowerCase();
// Reasons and header values from elsewhere never get to start a new header line.
const oneLine = (s) => String(s).replace(/[\r\n]+/g, ' ');

function parse(buf) {
  // latin1 maps each byte to one character, so the body and any bytes that are not
  // UTF-8 come out of serialize() exactly as they came in.
  const text = buf.toString('latin1');
  const end = /\r?\n\r?\n/.exec(text);
  if (!end) throw new Error('no end of headers');
  const lines = text.slice(0, end.index).split(/\r?\n/);
  const start = lines.shift();
  const headers = [];
  for (const line of lines) {
    if (/^[ \t]/.test(line) && headers.length) {
      headers.at(-1).value += ` ${line.trim()}`; // a folded header line
      continue;
    }
    const colon = line.indexOf(':');
    if (colon <= 0) throw new Error(`bad header line ${JSON.stringify(line.slice(0, 40))}`);
    headers.push({ name: line.slice(0, colon).trim(), value: line.slice(colon + 1).trim() });
  }
  return { start, headers, body: text.slice(end.index + end[0].length) };
}

function serialize(msg) {
  const head = msg.headers.map((h) => `${h.name}: ${h.value}\r\n`).join('');
  return Buffer.from(`${msg.start}\r\n${head}\r\n${msg.body}`, 'latin1');
}

const header = (msg, name) => msg.headers.find((h) => canon(h.name) === name)?.value;

// Splits a header value at commas that are not inside <...> or quotes.
function splitList(value) {
  const parts = [];
  let depth = 0, quoted = false, from = 0;
  for (let i = 0; i < value.length; i++) {
    const c = value[i];
    if (c === '"' && value[i - 1] !== '\\') quoted = !quoted;
    else if (!quoted && c === '<') depth++;
    else if (!quoted && c === '>') depth--;
    else if (!quoted && depth === 0 && c === ',') { parts.push(value.slice(from, i).trim()); from = i + 1; }
  }
  parts.push(value.slice(from).trim());
  return parts.filter(Boolean);
}

// All values of a list header (Via, Route, Record-Route), however they were split into lines.
const list = (msg, name) => msg.headers.filter((h) => canon(h.name) === name).flatMap((h) => splitList(h.value));

// Replaces a list header by one line per value, where its first line was (else on top).
function setList(msg, name, display, values) {
  const at = Math.max(0, msg.headers.findIndex((h) => canon(h.name) === name));
  msg.headers = msg.headers.filter((h) => canon(h.name) !== name);
  msg.headers.splice(at, 0, ...values.map((value) => ({ name: display, value })));
}

function hostPort(s) {
  const m = /^\[([^\]]+)\](?::(\d+))?$/.exec(s) ?? /^([^:[\]]+)(?::(\d+))?$/.exec(s);
  if (!m) throw new Error(`not host[:port]: ${s}`);
  return { host: m[1], port: m[2] === undefined ? undefined : Number(m[2]) };
}
const fmtHostPort = (host, port) => (net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`);

function parseVia(value) {
  const m = /^(\S+)\s+([^;\s]+)\s*(;.*)?$/.exec(value);
  if (!m) throw new Error(`bad Via ${JSON.stringify(value)}`);
  const params = (m[3] ?? '').split(';').slice(1).map((p) => {
    const eq = p.indexOf('=');
    return eq < 0 ? [p.trim(), null] : [p.slice(0, eq).trim(), p.slice(eq + 1).trim()];
  });
  return { proto: m[1], sentBy: m[2], params };
}
const formatVia = (v) => `${v.proto} ${v.sentBy}${v.params.map(([k, x]) => (x === null ? `;${k}` : `;${k}=${x}`)).join('')}`;
const param = (via, name) => via.params.find(([k]) => k.toLowerCase() === name)?.[1];
function setParam(via, name, value) {
  const p = via.params.find(([k]) => k.toLowerCase() === name);
  if (p) p[1] = value;
  else via.params.push([name, value]);
}

// Where a response to this Via goes (RFC 3261 §18.2.2, RFC 3581).
function viaDestination(via) {
  const { host, port } = hostPort(via.sentBy);
  return { host: param(via, 'received') || host, port: Number(param(via, 'rport')) || port || 5060 };
}

function uriHostPort(uri) {
  const m = /^\s*<?\s*sips?:(?:[^@>]*@)?(\[[^\]]+\]|[^:;>?]+)(?::(\d+))?/i.exec(uri);
  if (!m) throw new Error(`no host in ${JSON.stringify(uri)}`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port: m[2] ? Number(m[2]) : 5060 };
}

const toHasTag = (to) => /;\s*tag\s*=/i.test(to.includes('>') ? to.slice(to.lastIndexOf('>')) : to);

// ---------------------------------------------------------------- the edge

const TXN_MAX = 10000;
// An INVITE may ring for minutes before its CANCEL; answered requests need 32 s.
const TXN_TTL_MS = 5 * 60 * 1000;
const sha256 = (data) => crypto.createHash('sha256').update(data).digest('hex');
const realmOf = (credentials) => /realm\s*=\s*"([^"]*)"/i.exec(credentials)?.[1];

class Edge {
  constructor({ policy, access, core, upstream, verbose }) {
    Object.assign(this, { policy, access, core, upstream, verbose });
    this.sides = access === core ? [access] : [access, core];
    // Keys the edge's Via branches and Record-Route entries. Only responses to
    // requests this edge forwarded are relayed (else anyone could bounce datagrams
    // off it), and an in-dialog request is forwarded only along a route set the
    // edge made (docs/policy.md: otherwise a forged To-tag would skip authentication).
    this.secret = crypto.randomBytes(32);
    // Requests this edge answered (to absorb their ACK/CANCEL and answer
    // retransmissions) and INVITEs it forwarded (so their CANCEL and non-2xx ACK take
    // the same path). Bounded: the oldest entries go first.
    this.txns = new Map();
    for (const side of this.sides) side.sock.on('message', (buf, rinfo) => this.receive(side, buf, rinfo));
  }

  log(line) { process.stderr.write(`${new Date().toISOString()} ${line}\n`); }
  trace(line) { if (this.verbose) this.log(line); }

  // Pushes the configuration file; a refused one leaves the last good one in force.
  load(file) {
    let text;
    try {
      text = fs.readFileSync(file, 'utf8');
      const generation = this.policy.configure(text);
      this.realm = JSON.parse(text).realm;
      this.log(`config ${file}: generation ${generation} in force`);
      return true;
    } catch (e) {
      const where = e.path !== undefined ? ` at ${e.path || '(document)'}: ${e.reason}` : `: ${e.message}`;
      this.log(`config ${file} refused${where}; generation ${this.policy.generation} stays in force`);
      return false;
    }
  }

  receive(side, buf, rinfo) {
    let msg;
    try {
      msg = parse(buf);
    } catch (e) {
      // Without a Via there is no one to answer; a garbled datagram is never forwarded.
      this.log(`dropped ${buf.length} bytes from ${fmtHostPort(rinfo.address, rinfo.port)}: ${e.message}`);
      return;
    }
    if (msg.start.startsWith('SIP/2.0 ')) this.response(msg);
    else this.request({ side, msg, buf, rinfo, source: fmtHostPort(rinfo.address, rinfo.port), method: msg.start.split(' ')[0] });
  }

  // A stateless proxy's branch (RFC 3261 §16.11): the same for retransmissions and for
  // the CANCEL and non-2xx ACK of an INVITE, different for any other request. It
  // names the socket the request came in on (its responses go back out there) and
  // signs where they go.
  branch(letter, back, callId, cseq, clientBranch) {
    const mac = crypto.createHmac('sha256', this.secret)
      .update([letter, fmtHostPort(back.host, back.port), callId, cseq, clientBranch].join('\n'));
    return `z9hG4bK${letter}${mac.digest('hex').slice(0, 24)}`;
  }

  request(req) {
    const { side, msg, buf, rinfo, source, method } = req;
    try {
      const vias = list(msg, 'via');
      if (!vias.length) throw new Error('no Via');
      const top = parseVia(vias[0]);
      // The server transport's part (RFC 3261 §18.2.1, RFC 3581): note where it came from.
      const rport = param(top, 'rport') !== undefined;
      if (rport || hostPort(top.sentBy).host !== rinfo.address) setParam(top, 'received', rinfo.address);
      if (rport) setParam(top, 'rport', String(rinfo.port));
      vias[0] = formatVia(top);
      setList(msg, 'via', 'Via', vias);

      req.callId = header(msg, 'call-id') ?? '';
      const cseq = (header(msg, 'cseq') ?? '').split(/\s+/)[0];
      const clientBranch = param(top, 'branch') ?? '';
      req.key = `${req.callId}\n${cseq}\n${clientBranch}`;
      req.branch = this.branch(side.letter, viaDestination(top), req.callId, cseq, clientBranch);
      req.digest = sha256(buf);

      const known = this.lookup(req.key);
      if (known?.answer) {
        if (method === 'ACK') return this.trace(`${source} ACK absorbed (it acknowledges our ${known.code})`);
        if (method === 'CANCEL') return this.reply(req, 200, 'OK', [], false);
        if (method === known.method && known.digest === req.digest) {
          this.trace(`${source} ${method} retransmitted: our ${known.code} again`);
          return this.send(side, known.answer, known.to);
        }
      }

      const verdict = this.policy.judge(buf, source, 'udp', Date.now());
      this.trace(`${source} ${method} ${req.callId}: ${verdict.action} ${verdict.code ?? ''} ${verdict.cause ?? ''} ${verdict.trunk_group ?? ''}`);
      switch (verdict.action) {
        case 'challenge':
        case 'reject':
          return this.refuse(req, verdict.code, verdict.reason, verdict.headers ?? []);
        case 'accept':
          return this.reply(req, verdict.code ?? 200, verdict.reason ?? 'OK', verdict.headers ?? []);
        case 'route':
          return this.forward(req, this.access, uriHostPort(verdict.next_hop ?? verdict.target), { ruri: verdict.target, recordRoute: true });
        case 'allow':
          return this.allow(req, verdict, known);
        default:
          throw new Error(`unknown verdict action ${verdict.action}`);
      }
    } catch (e) {
      // Fail closed: an error is answered 500 and the request is never forwarded.
      this.log(`${source} ${method}: ${e.message}; refused 500`);
      try { this.refuse(req, 500, 'Server Internal Error', []); } catch { /* no Via to answer */ }
    }
  }

  allow(req, verdict, known) {
    const { msg, method, callId } = req;
    if ((method === 'ACK' || method === 'CANCEL') && known?.forward) {
      const { dest, ruri, out } = known.forward;
      return this.forward(req, out, dest, { ruri });
    }
    const routes = list(msg, 'route');
    if (verdict.trunk_group) {
      // Authenticated, so out of dialog: upstream. A PBX's outbound-proxy Route naming
      // this edge and its credentials for this realm end here.
      while (this.ourRoute(routes[0])) routes.shift();
      setList(msg, 'route', 'Route', routes);
      msg.headers = msg.headers.filter((h) => !(['proxy-authorization', 'authorization'].includes(canon(h.name)) && realmOf(h.value) === this.realm));
      return this.forward(req, this.core, this.upstream, { recordRoute: true });
    }
    if (this.ourRoute(routes[0])) {
      // Pop our entries (two when the dialog crosses sockets); the last one names the
      // socket facing the next hop.
      let out;
      while (this.ourRoute(routes[0])) {
        if (routeTag(routes[0]) !== this.tag(callId)) return this.refuse(req, 404, 'Not Found (route set not issued by this edge)', []);
        out = this.ourRoute(routes.shift());
      }
      setList(msg, 'route', 'Route', routes);
      return this.forward(req, out, uriHostPort(routes[0] ?? msg.start.split(' ')[1]), {});
    }
    if (method === 'ACK' || method === 'CANCEL' || method === 'OPTIONS') {
      return this.forward(req, this.core, this.upstream, {});
    }
    // The policy let it through without credentials because it claims to be in a
    // dialog, but it does not follow a route set this edge made.
    return this.refuse(req, 404, 'Not Found (no route set)', []);
  }

  tag(callId) { return crypto.createHmac('sha256', this.secret).update(callId).digest('hex').slice(0, 16); }

  // The side whose address a Route entry names, if it names one of ours.
  ourRoute(route) {
    if (!route) return undefined;
    const { host, port } = uriHostPort(route.replace(/^[^<]*</, ''));
    return this.sides.find((s) => s.host === host && s.port === port);
  }

  forward(req, out, dest, { ruri, recordRoute }) {
    const { side, msg, method, rinfo } = req;
    if (dest.host === rinfo.address && dest.port === rinfo.port) return this.refuse(req, 482, 'Loop Detected', []);
    const mf = header(msg, 'max-forwards');
    // The policy answers 483 itself, except for ACK and OPTIONS (RFC 3261 §16.3).
    if (mf !== undefined && !(Number(mf) > 0)) return this.refuse(req, 483, 'Too Many Hops', []);
    const hops = String(mf === undefined ? 70 : Number(mf) - 1);
    const mfHeader = msg.headers.find((h) => canon(h.name) === 'max-forwards');
    if (mfHeader) mfHeader.value = hops;
    else msg.headers.push({ name: 'Max-Forwards', value: hops });
    if (ruri) msg.start = `${method} ${oneLine(ruri)} SIP/2.0`;
    if (recordRoute) {
      // Two entries when the request crosses from one socket to the other (RFC 5658),
      // so each side's in-dialog requests come back to the socket facing it.
      const rr = [...new Set([out, side])].map((s) => `<sip:${s.hostport};lr;tg=${this.tag(req.callId)}>`);
      setList(msg, 'record-route', 'Record-Route', [...rr, ...list(msg, 'record-route')]);
    }
    setList(msg, 'via', 'Via', [`SIP/2.0/UDP ${out.hostport};branch=${req.branch};rport`, ...list(msg, 'via')]);
    if (method === 'INVITE') this.remember(req.key, { method, forward: { dest, ruri, out } });
    this.send(out, serialize(msg), dest);
  }

  // Answers a request, except an ACK, which is never answered (RFC 3261 §17.2.3).
  refuse(req, code, reason, headers) {
    if (req.method !== 'ACK') this.reply(req, code, reason, headers);
  }

  // Builds the answer to a request from the request itself (RFC 3261 §8.2.6).
  reply(req, code, reason, extra, remember = true) {
    const out = { start: `SIP/2.0 ${Number(code)} ${oneLine(reason)}`, headers: [], body: '' };
    for (const h of req.msg.headers) {
      const name = canon(h.name);
      if (name === 'to' && !toHasTag(h.value)) out.headers.push({ name: h.name, value: `${h.value};tag=${crypto.randomBytes(8).toString('hex')}` });
      else if (['via', 'from', 'to', 'call-id', 'cseq'].includes(name)) out.headers.push({ ...h });
    }
    for (const [name, value] of extra) out.headers.push({ name: oneLine(name), value: oneLine(value) });
    out.headers.push({ name: 'Content-Length', value: '0' });
    const to = viaDestination(parseVia(list(req.msg, 'via')[0]));
    const bytes = serialize(out);
    if (remember && req.key !== undefined) this.remember(req.key, { method: req.method, code, answer: bytes, to, digest: req.digest });
    this.send(req.side, bytes, to);
  }

  response(msg) {
    const vias = list(msg, 'via');
    const ours = vias.length >= 2 ? parseVia(vias[0]) : undefined;
    const next = ours && parseVia(vias[1]);
    const branch = (ours && param(ours, 'branch')) ?? '';
    // Sent from one socket (the Via's), answered out of the one the request came in on (the branch's).
    const side = this.sides.find((s) => s.letter === branch[7]);
    const dest = next && viaDestination(next);
    const cseq = (header(msg, 'cseq') ?? '').split(/\s+/)[0];
    if (!side || !this.sides.some((s) => s.hostport === ours.sentBy) || branch !== this.branch(side.letter, dest, header(msg, 'call-id') ?? '', cseq, param(next, 'branch') ?? '')) {
      return this.trace(`dropped a response that is not for us: ${msg.start} (top Via ${vias[0] ?? 'none'})`);
    }
    setList(msg, 'via', 'Via', vias.slice(1));
    this.send(side, serialize(msg), dest);
  }

  send(side, bytes, { host, port }) {
    side.sock.send(bytes, port, host, (e) => e && this.log(`send to ${fmtHostPort(host, port)} failed: ${e.message}`));
  }

  remember(key, entry) {
    this.txns.delete(key);
    this.txns.set(key, { ...entry, at: Date.now() });
    if (this.txns.size > TXN_MAX) this.txns.delete(this.txns.keys().next().value);
  }

  lookup(key) {
    const entry = this.txns.get(key);
    return entry && Date.now() - entry.at < TXN_TTL_MS ? entry : undefined;
  }
}

const routeTag = (route) => /;tg=([0-9a-f]+)/i.exec(route)?.[1];

// ---------------------------------------------------------------- alerts

function alertSink(url, tokenFile, log) {
  const token = tokenFile ? fs.readFileSync(tokenFile, 'utf8').split('\n')[0].trim() : process.env.TRUNKGUARD_RELAY_TOKEN;
  return (alert) => {
    process.stdout.write(`${JSON.stringify({ alert })}\n`);
    if (!url) return;
    const body = JSON.stringify(alert);
    const headers = { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) };
    // Off the SIP path; a retry repeats the same body (and id), so the relay
    // (docs/alerts.md) recognises it and never mails twice. A 4xx is not retried.
    const post = (attempt) => fetch(url, { method: 'POST', headers, body, signal: AbortSignal.timeout(5000) })
      .then(async (res) => {
        if (res.ok) return;
        const text = (await res.text()).slice(0, 200);
        if (res.status < 500) return log(`alert ${alert.id}: ${url} answered ${res.status} ${text}`);
        throw new Error(`HTTP ${res.status} ${text}`);
      })
      .catch((e) => {
        log(`alert ${alert.id}: post to ${url} failed (${e.message})${attempt < 5 ? ', retrying' : ', giving up'}`);
        if (attempt < 5) setTimeout(() => post(attempt + 1), 1000 * 2 ** attempt).unref();
      });
    post(0);
  };
}

// ---------------------------------------------------------------- main

async function bind(spec, letter) {
  const { host, port } = hostPort(spec);
  if (port === undefined) throw new Error(`${spec}: give a port`);
  const sock = dgram.createSocket(net.isIPv6(host) ? 'udp6' : 'udp4');
  await new Promise((resolve, reject) => {
    sock.once('error', reject);
    sock.bind(port, host, resolve);
  });
  const bound = sock.address().port;
  return { sock, letter, host, port: bound, hostport: fmtHostPort(host, bound) };
}

async function main() {
  const { values: opt } = parseArgs({
    options: {
      config: { type: 'string' }, listen: { type: 'string' }, upstream: { type: 'string' },
      'core-listen': { type: 'string' }, 'alerts-url': { type: 'string' }, 'alerts-token-file': { type: 'string' },
      verbose: { type: 'boolean', short: 'v' }, help: { type: 'boolean', short: 'h' },
    },
  });
  if (opt.help || !opt.config || !opt.listen || !opt.upstream) {
    process.stderr.write(`${USAGE}\n`);
    process.exit(opt.help ? 0 : 2);
  }
  const log = (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`);

  const policy = new TrunkPolicy(new Map());
  policy.onAlert(alertSink(opt['alerts-url'], opt['alerts-token-file'], log));
  const upstream = hostPort(opt.upstream);
  upstream.port ??= 5060;
  const access = await bind(opt.listen, 'a');
  const core = opt['core-listen'] ? await bind(opt['core-listen'], 'c') : access;
  const edge = new Edge({ policy, access, core, upstream, verbose: opt.verbose });
  // Synchronous, so no datagram is judged before the first configuration is in force.
  if (!edge.load(opt.config)) process.exit(1);
  process.on('SIGHUP', () => edge.load(opt.config));
  // Polling the file's stat survives editors that replace it by a rename.
  fs.watchFile(opt.config, { interval: 1000 }, (cur, prev) => {
    if (cur.mtimeMs !== prev.mtimeMs || cur.size !== prev.size || cur.ino !== prev.ino) edge.load(opt.config);
  });
  log(`listening on ${access.hostport}${core === access ? '' : `, core side on ${core.hostport}`}, upstream ${fmtHostPort(upstream.host, upstream.port)}`);

  setInterval(() => {
    try { policy.tick(Date.now()); } catch (e) { log(`tick: ${e.message}`); }
  }, 5000);
  for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
}

main().catch((e) => {
  process.stderr.write(`edge: ${e.message}\n`);
  process.exit(1);
});
