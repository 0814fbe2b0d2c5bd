#!/usr/bin/env node
// trunkguard's Node.js SIP edge: a stateless UDP proxy in front of a carrier that
// asks the policy (target/js/node, built by scripts/build-js) about every request it
// receives and applies the verdict. See README.md beside this file.
'use strict';

const crypto = require('node:crypto');
const dgram = require('node:dgram');
const dns = require('node:dns/promises');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { parseArgs } = require('node:util');

const BUILT = path.join(__dirname, '../../target/js/node/trunkguard.js');
const { TrunkPolicy } = require(process.env.TRUNKGUARD_JS ?? BUILT);
// The core's rule for a PBX's final response (docs/policy.md, "Inbound calls"); a
// TRUNKGUARD_JS package without it (a test's stub policy) lends the built one's.
const failsOver = require(process.env.TRUNKGUARD_JS ?? BUILT).failsOver ?? require(BUILT).failsOver;
// The core's rule for the relay's answer to an alert (docs/alerts.md, "Posting from
// a host"), lent the same way.
const alertDelivery = require(process.env.TRUNKGUARD_JS ?? BUILT).alertDelivery ?? require(BUILT).alertDelivery;
// The core renders every answer the edge gives (RFC 3261 §8.2.6), lent the same way.
const renderReply = require(process.env.TRUNKGUARD_JS ?? BUILT).renderReply ?? require(BUILT).renderReply;
// Every message's Call-ID, tags and CSeq as the policy reads them (and its length, by
// its Content-Length), lent the same way: the edge matches transactions and dialogs by
// these alone, so that it never reads a message one way and the policy, or the next
// hop, another (a `;tag=` inside a quoted parameter, a `>` in one, `CSeq: 1 invite`).
const dialogIds = require(process.env.TRUNKGUARD_JS ?? BUILT).dialogIds ?? require(BUILT).dialogIds;

const USAGE = `usage: node edge.js --config FILE --listen IP:PORT --upstream HOST:PORT
         [--core-listen IP:PORT] [--state FILE] [--dialog-ttl SECONDS]
         [--alerts-url URL [--alerts-token-file FILE]] [--refusal-log FILE] [--verbose]`;

// ---------------------------------------------------------------- SIP text

// Compact header names (RFC 3261 §7.3.3 and the RFCs that added the later ones), so
// that a header the verdict says to strip goes in either form.
const COMPACT = {
  a: 'accept-contact', b: 'referred-by', c: 'content-type', d: 'request-disposition', e: 'content-encoding',
  f: 'from', i: 'call-id', j: 'reject-contact', k: 'supported', l: 'content-length', m: 'contact', n: 'identity-info',
  o: 'event', r: 'refer-to', s: 'subject', t: 'to', u: 'allow-events', v: 'via', x: 'session-expires', y: 'identity',
};
const canon = (name) => COMPACT[name.toLowerCase()] ?? name.toLowerCase();
// What of a CANCEL, or of the ACK of a failure, goes on along its INVITE's
// transaction (alongTransaction): what names the transaction and the hops.
const ALONG = new Set(['via', 'from', 'to', 'call-id', 'cseq', 'max-forwards', 'content-length']);
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

const copyMessage = (msg) => ({ start: msg.start, headers: msg.headers.map((h) => ({ ...h })), body: msg.body });

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

// What of a message's `dialogIds` its transaction's branch signs (Edge.branch): a
// CANCEL and the ACK of a failure share their INVITE's branch (RFC 3261 §9.1,
// §17.1.1.3), so they, and the answers to a CANCEL, count as the INVITE's.
const txnIds = (ids) => {
  const method = ids?.method === 'CANCEL' || ids?.method === 'ACK' ? 'INVITE' : ids?.method ?? '';
  return [ids?.callId ?? '', String(ids?.cseq ?? ''), ids?.fromTag ?? '', method];
};
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

// ---------------------------------------------------------------- the refusal log

// The policy decides which verdicts get a `trunkguard-refusal {json}` line, renders it
// and keeps the rate (docs/policy.md, "The refusal log"): at most
// TRUNKGUARD_REFUSAL_LOG_RATE lines a second (default 20), then a summary line a second
// counting the rest (written by policy.tick). The edge only writes the lines, to
// stderr or --refusal-log FILE, reopened on SIGHUP (after logrotate moved it).
function refusalLogRate(env = process.env.TRUNKGUARD_REFUSAL_LOG_RATE) {
  const rate = Number.parseInt(env ?? '', 10);
  return Number.isNaN(rate) ? 20 : Math.max(0, rate);
}

function logWriter(file) {
  const stamp = (line) => `${new Date().toISOString()} ${line}\n`;
  if (!file) return { write: (line) => process.stderr.write(stamp(line)), reopen: () => {} };
  let fd = fs.openSync(file, 'a');
  return {
    // A log that cannot be written (a full disk) loses the line, never the request.
    write: (line) => { try { fs.writeSync(fd, stamp(line)); } catch { /* nothing better to do */ } },
    reopen: () => { const old = fd; fd = fs.openSync(file, 'a'); fs.closeSync(old); },
  };
}

// ---------------------------------------------------------------- the edge

const TXN_MAX = 10000;
// An INVITE may ring for minutes before its CANCEL; answered requests need 32 s.
const TXN_TTL_MS = 5 * 60 * 1000;
// How long, and how often, a forwarded INVITE's retransmission is forwarded again
// unjudged: Timer B, 64*T1 (RFC 3261 §17.1.1.2), and T1, 2T1, 4T1 ... fit in it 7 times.
const RETRANSMIT_WINDOW_MS = 64 * 500;
const RETRANSMIT_MAX = 10;
// Dialogs this edge set up: at most this many (the least recently used go first), an
// unanswered one kept as long as an INVITE may ring, an answered one --dialog-ttl
// after its last in-dialog request.
const DIALOG_MAX = 50000;
const EARLY_TTL_MS = TXN_TTL_MS;
// Early dialogs (1xx To tags) of one call whose route sets are kept.
const EARLY_ROUTES_MAX = 4;
const DIALOG_TTL_S = 12 * 3600;
const sha256 = (data) => crypto.createHash('sha256').update(data).digest('hex');

// The dialogs this edge created, keyed by Call-ID and the caller's tag (the From tag of
// the initial INVITE). Each records both parties: the socket that faces it and the
// address its requests are relayed to. The callee's tag is learnt from the responses
// to the initial INVITE. In-dialog requests are relayed only within these dialogs
// and only to the other party: a To tag alone authorises nothing (docs/policy.md,
// threat model).
class Dialogs {
  constructor(ttlMs, max = DIALOG_MAX) {
    Object.assign(this, { ttlMs, max, map: new Map() });
  }

  static key(callId, tag) { return `${callId}\n${tag}`; }

  get(callId, tag) {
    const key = Dialogs.key(callId, tag);
    const entry = this.map.get(key);
    if (entry && entry.expires <= Date.now()) this.map.delete(key);
    else return entry;
    return undefined;
  }

  // Every change sets `changed`: the edge writes the dialogs to its state file
  // (--state) before it sends what the change came with.
  touch(entry, ttlMs) {
    const key = Dialogs.key(entry.callId, entry.callerTag);
    this.changed = true;
    entry.expires = Date.now() + ttlMs;
    this.map.delete(key);
    this.map.set(key, entry);
    if (this.map.size > this.max) this.map.delete(this.map.keys().next().value);
  }

  // When the initial INVITE is relayed, with the caller's route set (the Record-Route
  // entries it came with). Its retransmissions keep what was learnt.
  create(callId, callerTag, cseq, caller, callee, callerRoutes) {
    const known = this.get(callId, callerTag);
    if (known && known.cseq === cseq) return this.touch(known, known.confirmed ? this.ttlMs : EARLY_TTL_MS);
    this.touch({
      callId, callerTag, cseq, caller, callee, early: new Set(), calleeTag: undefined, confirmed: false, bye: undefined,
      callerRoutes, calleeRoutes: [], earlyRoutes: new Map(),
    }, EARLY_TTL_MS);
  }

  // The route set the party a request goes to gave when the dialog was made (RFC 3261
  // §12.1.2): the caller's from its INVITE; the callee's from its 2xx, or while early
  // from the 1xx of the early dialog the request's To tag names.
  // undefined for a dialog from a state file of a version that recorded none.
  routeSet(entry, toCallee, toTag) {
    if (entry.callerRoutes === undefined) return undefined;
    if (!toCallee) return entry.callerRoutes;
    return (entry.confirmed ? entry.calleeRoutes : entry.earlyRoutes?.get(toTag)) ?? [];
  }

  // An inbound call that went to its failover: the failover is the callee now, and
  // nothing the PBX said before counts.
  retarget(callId, callerTag, callee) {
    const entry = this.get(callId, callerTag);
    if (!entry || entry.confirmed) return;
    Object.assign(entry, { callee, early: new Set(), earlyRoutes: new Map() });
    this.changed = true;
  }

  // The dialogs as the state file keeps them: sockets by their letter.
  save() {
    const now = Date.now();
    const party = (p) => ({ side: p.side.letter, hop: p.hop, customer: p.customer });
    return [...this.map.values()].filter((e) => e.expires > now)
      .map((e) => ({ ...e, caller: party(e.caller), callee: party(e.callee), early: [...e.early], earlyRoutes: [...(e.earlyRoutes ?? [])] }));
  }

  load(entries, sideOf) {
    const now = Date.now();
    const party = (p) => ({ side: sideOf(p.side), hop: { host: p.hop.host, port: p.hop.port }, customer: Boolean(p.customer) });
    for (const e of entries ?? []) {
      if (!(e.expires > now)) continue;
      this.map.set(Dialogs.key(e.callId, e.callerTag), {
        ...e, caller: party(e.caller), callee: party(e.callee), early: new Set(e.early ?? []), earlyRoutes: new Map(e.earlyRoutes ?? []),
      });
    }
  }

  // The dialog a request belongs to, and which party sent it.
  find(callId, fromTag, toTag) {
    if (!callId || !fromTag || !toTag) return undefined;
    const matches = (entry, tag) => entry && (entry.confirmed ? entry.calleeTag === tag : entry.early.has(tag));
    let entry = this.get(callId, fromTag);
    if (matches(entry, toTag)) return { entry, sender: entry.caller, peer: entry.callee };
    entry = this.get(callId, toTag);
    if (matches(entry, fromTag)) return { entry, sender: entry.callee, peer: entry.caller };
    return undefined;
  }

  // Responses this edge relays (their branch verified): the callee's tag and route set
  // (`calleeRoutes`: the Record-Route entries above the edge's own, in the order the
  // caller's Route lists them) from the answers to the initial INVITE (early dialogs
  // from 1xx, the dialog from the 2xx, RFC 3261 §12.1), no dialog after a failure, and
  // the end of it with the final answer to a BYE.
  learn(status, ids, calleeRoutes = []) {
    const { callId, fromTag, toTag, method } = ids;
    const cseq = String(ids.cseq);
    if (method === 'BYE' && status >= 200) {
      const found = this.find(callId, fromTag, toTag);
      if (found) this.map.delete(Dialogs.key(found.entry.callId, found.entry.callerTag));
      this.changed ||= Boolean(found);
      return;
    }
    const entry = method === 'INVITE' && this.get(callId, fromTag);
    if (!entry || entry.confirmed || entry.cseq !== cseq) return;
    if (status >= 300) {
      this.map.delete(Dialogs.key(callId, fromTag));
      this.changed = true;
    } else if (status >= 200 && toTag) {
      Object.assign(entry, { calleeTag: toTag, confirmed: true, calleeRoutes });
      this.touch(entry, this.ttlMs);
    } else if (status > 100 && toTag && !entry.early.has(toTag)) {
      // The latest EARLY_ROUTES_MAX early dialogs (a callee's side that sent 1xx with
      // ever new tags would grow the entry, and the state file written for each,
      // without bound), as the Kamailio edge keeps their route sets.
      if (entry.early.size >= EARLY_ROUTES_MAX) entry.early.delete(entry.early.values().next().value);
      entry.early.add(toTag);
      entry.earlyRoutes ??= new Map();
      if (entry.earlyRoutes.size >= EARLY_ROUTES_MAX) entry.earlyRoutes.delete(entry.earlyRoutes.keys().next().value);
      entry.earlyRoutes.set(toTag, calleeRoutes);
      this.changed = true;
    }
  }
}

class Edge {
  constructor({ policy, access, core, upstream, verbose, dialogTtlMs = DIALOG_TTL_S * 1000, state, saved, store }) {
    Object.assign(this, { policy, access, core, upstream, verbose, state, store });
    this.sides = access === core ? [access] : [access, core];
    // Keys the edge's Via branches: only responses to requests this edge forwarded
    // are relayed, else anyone could bounce datagrams off it. Kept in the state file,
    // so the answers to what was relayed before a restart still find their way.
    this.secret = saved?.branch_key ? Buffer.from(saved.branch_key, 'hex') : crypto.randomBytes(32);
    // Inbound calls that may still go to their failover, by transaction (watch()).
    this.failovers = new Map();
    // Requests this edge answered (to absorb their ACK/CANCEL and answer
    // retransmissions) and INVITEs it forwarded (so their CANCEL and non-2xx ACK take
    // the same path). Bounded: the oldest entries go first.
    this.txns = new Map();
    this.dialogs = new Dialogs(dialogTtlMs);
    this.dialogs.load(saved?.dialogs, (letter) => this.sides.find((s) => s.letter === letter) ?? this.core);
    for (const side of this.sides) side.sock.on('message', (buf, rinfo) => this.receive(side, buf, rinfo));
  }

  // Writes the state file (--state): the policy's store, the dialogs, the branch key.
  save() {
    if (!this.state) return;
    this.state.write({ version: 1, store: [...this.store.map], dialogs: this.dialogs.save(), branch_key: this.secret.toString('hex') });
    this.dialogs.changed = false;
  }

  // Runs fn holding back what it sends until the dialogs it changed are in the state
  // file: a dialog is on disk before the answer that made it leaves, so a kill -9 right
  // after cannot lose it. (The policy's own writes are on disk before judge() returns,
  // DurableStore.)
  batch(fn) {
    if (this.outbox) return fn();
    this.outbox = [];
    try {
      return fn();
    } finally {
      const out = this.outbox;
      this.outbox = undefined;
      if (this.state && this.dialogs.changed) {
        try { this.save(); } catch (e) { this.log(`state file ${this.state.file}: ${e.message}; the dialogs are not saved`); }
      }
      for (const [side, bytes, to] of out) this.sendNow(side, bytes, to);
    }
  }

  log(line) { process.stderr.write(`${new Date().toISOString()} ${line}\n`); }
  trace(line) { if (this.verbose) this.log(line); }

  // Pushes the configuration file; a refused one leaves the last good one in force.
  load(file) {
    try {
      const generation = this.policy.configure(fs.readFileSync(file, 'utf8'));
      this.log(`config ${file}: generation ${generation} in force`);
      return true;
    } catch (e) {
      const where = e.path !== undefined ? ` at ${e.path || '(document)'}: ${e.reason}` : `: ${e.message}`;
      this.log(`config ${file} refused${where}; generation ${this.policy.generation} stays in force`);
      return false;
    }
  }

  receive(side, buf, rinfo) {
    this.batch(() => this.take(side, buf, rinfo));
  }

  take(side, buf, rinfo) {
    let msg;
    const ids = dialogIds(buf);
    // What follows the Content-Length is no part of the message the policy read.
    if (ids) buf = buf.subarray(0, ids.length);
    try {
      msg = parse(buf);
    } catch (e) {
      // Without a Via there is no one to answer; a garbled datagram is never forwarded.
      this.log(`dropped ${buf.length} bytes from ${fmtHostPort(rinfo.address, rinfo.port)}: ${e.message}`);
      return;
    }
    if (msg.start.startsWith('SIP/2.0 ')) this.response(msg, ids);
    else this.request({ side, msg, buf, ids, rinfo, source: fmtHostPort(rinfo.address, rinfo.port), method: msg.start.split(' ')[0] });
  }

  // A stateless proxy's branch (RFC 3261 §16.11): the same for retransmissions and for
  // the CANCEL and non-2xx ACK of an INVITE, different for any other request. It
  // names the socket the request came in on (its responses go back out there) and
  // signs where they go, and the transaction a response must belong to: its Call-ID,
  // CSeq, From tag and method (`txnIds`), each as the policy reads it. A response
  // that names another From tag or method than its request's fails it: the edge
  // finds the dialog it makes by these, and a far end writing its own would choose
  // which dialog's route set it rewrites, or none.
  // `attempt` 1: the failover's branch, a new client transaction (RFC 3261 §16.6)
  // after the PBX's.
  branch(letter, back, ids, clientBranch, attempt = 0) {
    const parts = [letter, fmtHostPort(back.host, back.port), ...txnIds(ids), clientBranch];
    if (attempt) parts.push(`attempt ${attempt}`);
    const mac = crypto.createHmac('sha256', this.secret).update(parts.join('\n'));
    return `z9hG4bK${letter}${mac.digest('hex').slice(0, 24)}`;
  }

  request(req) {
    const { side, msg, buf, rinfo, source, method } = req;
    try {
      const vias = list(msg, 'via');
      if (!vias.length) throw new Error('no Via');
      const top = parseVia(vias[0]);
      // The server transport's part (RFC 3261 §18.2.1, RFC 3581): note where it came from.
      // A `received` the sender wrote itself is overwritten, never followed: answers go
      // where the request came from, not where its sender would reflect them.
      const rport = param(top, 'rport') !== undefined;
      if (rport || hostPort(top.sentBy).host !== rinfo.address || param(top, 'received') !== undefined) {
        setParam(top, 'received', rinfo.address);
      }
      if (rport) setParam(top, 'rport', String(rinfo.port));
      vias[0] = formatVia(top);
      setList(msg, 'via', 'Via', vias);

      // A request whose identifiers the policy cannot read one way is refused by it
      // (400), or, within a dialog, here (below): it is never forwarded.
      req.callId = req.ids?.callId ?? '';
      req.cseq = req.ids ? String(req.ids.cseq) : '';
      const clientBranch = param(top, 'branch') ?? '';
      req.key = `${req.callId}\n${req.cseq}\n${clientBranch}`;
      Object.assign(req, { back: viaDestination(top), clientBranch });
      req.branch = this.branch(side.letter, req.back, req.ids, clientBranch);
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
      // A retransmission of an INVITE this edge forwarded (the same bytes, same
      // transaction): sent again as it went, on its branch (a stateless proxy,
      // RFC 3261 §16.11), never judged again: its credentials would read as a
      // replayed nonce (407 stale), ending the caller's call while the first INVITE
      // went on. An inbound call that failed over goes where its call is now.
      // Only while the caller may still retransmit (64*T1, RFC 3261 §17.1.1.2) and
      // a few times: later, the same bytes are a replay, judged (and refused) as one.
      const fwd = known?.forward;
      if (fwd?.bytes && method === known.method && known.digest === req.digest && this.sameSender(known, req)
          && Date.now() - fwd.firstAt <= RETRANSMIT_WINDOW_MS && (fwd.resent = (fwd.resent ?? 0) + 1) <= RETRANSMIT_MAX) {
        const call = this.failovers.get(req.key);
        if (call?.state === 'failover') return this.toFailover(call);
        this.trace(`${source} ${method} retransmitted: forwarded again`);
        return this.send(fwd.out, fwd.bytes, fwd.dest);
      }

      // The socket it came in on goes along: the policy trusts core_networks sources
      // only on the sockets its configuration lists in core_sockets (docs/policy.md,
      // core traffic), so a spoofed core address on the access socket is a stranger.
      const verdict = this.policy.judge(buf, source, 'udp', Date.now(), side.hostport);
      this.trace(`${source} ${method} ${req.callId}: ${verdict.action} ${verdict.code ?? ''} ${verdict.cause ?? ''} ${verdict.trunk_group ?? ''} (on ${side.hostport})`);
      switch (verdict.action) {
        case 'challenge':
        case 'reject':
          return this.refuse(req, verdict.code, verdict.reason, verdict.headers ?? []);
        case 'accept':
          return this.reply(req, verdict.code ?? 200, verdict.reason ?? 'OK', verdict.headers ?? []);
        case 'route':
        case 'allow':
          if (!req.ids) return this.refuse(req, 400, 'Bad Request', [], 'its Call-ID, tags or CSeq read more than one way');
          return verdict.action === 'route' ? this.inbound(req, verdict) : this.allow(req, verdict, known);
        default:
          throw new Error(`unknown verdict action ${verdict.action}`);
      }
    } catch (e) {
      // Fail closed: an error is answered 500 and the request is never forwarded.
      this.log(`${source} ${method}: ${e.message}; refused 500`);
      try { this.refuse(req, 500, 'Server Internal Error', []); } catch { /* no Via to answer */ }
    }
  }

  // An allow says why (its cause), and that alone decides where the request may go
  // (docs/policy.md). A cause this edge does not know is refused: it fails closed.
  allow(req, verdict, known) {
    switch (verdict.cause) {
      case 'trunk': return this.toCarrier(req, verdict);
      case 'in_dialog': return this.inDialog(req, verdict, known);
      case 'core': return this.fromCore(req, verdict, known);
      case 'pass_through': return this.passThrough(req, verdict, known);
      default: throw new Error(`allow with cause ${JSON.stringify(verdict.cause ?? null)}, which this edge does not relay`);
    }
  }

  // A new call (an INVITE of another transaction: its CSeq differs, or it comes from
  // another sender) with the Call-ID and From tag of a dialog that lives never takes
  // that dialog's parties over: written over, the far end's requests would go to the
  // newcomer. The same refusal as the Kamailio edges' (docs/kamailio.md, "Limits"); a
  // retransmission, or the retry after a failure (which ended the dialog), is not one.
  reusesDialog(req) {
    if (req.method !== 'INVITE') return false;
    const open = this.dialogs.get(req.callId, req.ids.fromTag);
    if (!open) return false;
    // The same transaction again (its CSeq, from its caller) is a retransmission; the
    // same CSeq from anyone else is not (the far end's answers to it would be taken
    // for the dialog's own).
    const { side, hop } = open.caller;
    return open.cseq !== req.cseq || side !== req.side || hop.host !== req.rinfo.address || hop.port !== req.rinfo.port;
  }

  // An authenticated trunk's request: to the carrier only, never where its
  // Request-URI or Route points.
  toCarrier(req, verdict) {
    if (!verdict.trunk_group) throw new Error('allow for a trunk without trunk_group');
    if (this.reusesDialog(req)) return this.refuse(req, 482, 'Loop Detected', [], 'the Call-ID and From tag of a live dialog');
    this.popOurRoutes(req.msg);
    const opts = { recordRoute: req.method === 'INVITE', verdict };
    if (req.method === 'INVITE') {
      opts.dialog = { caller: this.party(req.side, req.rinfo, true), callee: this.party(this.core, this.upstream, false) };
    }
    return this.forward(req, this.core, this.upstream, opts);
  }

  // The core's call to a DID: to the registered PBX (next_hop) or the failover (target).
  inbound(req, verdict) {
    if (this.reusesDialog(req)) return this.refuse(req, 482, 'Loop Detected', [], 'the Call-ID and From tag of a live dialog');
    const dest = uriHostPort(verdict.next_hop ?? verdict.target);
    this.popOurRoutes(req.msg);
    const opts = { ruri: verdict.target, recordRoute: true, verdict };
    if (req.method === 'INVITE') {
      opts.dialog = { caller: this.party(req.side, req.rinfo, false), callee: this.party(this.access, dest, true) };
      if (verdict.failover) {
        const call = this.failovers.get(req.key);
        // The caller's retransmission goes where its call is now.
        if (call?.state === 'failover') return this.toFailover(call);
        if (!call) this.watch(req, verdict);
      }
    }
    return this.forward(req, this.access, dest, opts);
  }

  // Inbound failover (docs/policy.md, "Inbound calls"): while the registered PBX has
  // the call, the edge keeps its INVITE. No response at all within the verdict's
  // failover_after_ms (any response, 100 Trying included, means the PBX is alive), or
  // a final response the core's failsOver() accepts, sends it to the failover, once.
  // States: pbx -> failover -> answered (the edge gave the caller the PBX's failure),
  // or passed (a final answer went to the caller; the rest of its branch goes by as
  // usual). Once failed over, nothing of the PBX's branch reaches the caller.
  watch(req, verdict) {
    const call = {
      key: req.key, verdict, state: 'pbx', replied: false, cancelled: false, original: undefined,
      req: { ...req, msg: copyMessage(req.msg) },
      branches: [req.branch, this.branch(req.side.letter, req.back, req.ids, req.clientBranch, 1)],
      dests: [uriHostPort(verdict.next_hop ?? verdict.target), uriHostPort(verdict.failover)],
      ruris: [verdict.target, verdict.failover],
    };
    call.timer = setTimeout(() => this.batch(() => this.noAnswer(call)), verdict.failover_after_ms ?? 5000);
    this.failovers.set(req.key, call);
    setTimeout(() => { if (this.failovers.get(call.key) === call) this.failovers.delete(call.key); }, TXN_TTL_MS).unref();
  }

  noAnswer(call) {
    if (call.state !== 'pbx' || call.replied || call.cancelled) return;
    // Nothing to CANCEL yet: not before a provisional response (RFC 3261 §9.1); one
    // that comes later is cancelled then (failoverResponse).
    this.toFailover(call, `no response from the PBX in ${call.verdict.failover_after_ms} ms`);
  }

  // The INVITE as the PBX got it (strip, insert, Record-Route), to the failover's URI,
  // on its own branch; its CANCEL and ACK follow it there (forward() remembers).
  toFailover(call, why) {
    const req = { ...call.req, msg: copyMessage(call.req.msg), branch: call.branches[1] };
    const callee = this.party(this.access, call.dests[1], true);
    if (call.state === 'pbx') {
      clearTimeout(call.timer);
      call.state = 'failover';
      call.failedOver = true;
      this.log(`inbound ${req.callId}: ${why}; to the failover ${call.verdict.failover}`);
      this.dialogs.retarget(req.callId, req.ids.fromTag, callee);
    }
    return this.forward(req, this.access, call.dests[1], {
      ruri: call.verdict.failover, recordRoute: true, verdict: call.verdict,
      dialog: { caller: this.party(req.side, req.rinfo, false), callee },
    });
  }

  // A response to a watched INVITE transaction (either branch): true when the edge
  // takes it instead of relaying it.
  failoverResponse(call, msg, ids, attempt) {
    const status = Number(msg.start.split(' ')[1]);
    const { method } = ids;
    if (attempt === 0 && call.failedOver) {
      // The PBX's branch, given up: nothing of it reaches the caller.
      if (method !== 'INVITE') return true; // the answer to the edge's CANCEL
      if (status < 200) {
        if (!call.cancelSent) this.cancelPbx(call);
      } else if (status >= 300) {
        this.ack(call, msg, 0);
      } else {
        this.log(`inbound ${call.req.callId}: the PBX answered ${status} after the call went to the failover; dropped (unacknowledged, the PBX ends it, RFC 3261 §13.3.1.4)`);
      }
      return true;
    }
    if (call.state === 'passed') return false;
    if (method !== 'INVITE') return false; // the answer to the caller's CANCEL
    if (attempt === 0) {
      clearTimeout(call.timer);
      call.replied = true;
      if (status < 200) return false;
      const retryAfter = header(msg, 'retry-after') !== undefined;
      if (status >= 300 && !call.cancelled && failsOver(status, retryAfter, Boolean(call.verdict.failover_on_6xx))) {
        this.ack(call, msg, 0);
        call.original = copyMessage(msg);
        this.toFailover(call, `the PBX answered ${status}`);
        return true;
      }
      call.state = 'passed';
      return false;
    }
    if (call.state === 'answered') {
      if (status >= 300) this.ack(call, msg, 1); // its retransmission: our ACK got lost
      return true;
    }
    if (status < 300 || call.cancelled) {
      if (status >= 200) call.state = 'passed';
      return false;
    }
    // The failover failed too: the caller gets the PBX's failure (docs/policy.md).
    this.ack(call, msg, 1);
    this.dialogs.learn(status, ids);
    call.state = 'answered';
    this.answerOriginal(call);
    return true;
  }

  // The ACK of a failure the edge takes itself (RFC 3261 §17.1.1.3): the INVITE's
  // branch, Request-URI, From, Call-ID and Route, the response's To.
  ack(call, response, attempt) {
    this.toBranch(call, attempt, 'ACK', header(response, 'to'));
  }

  // A PBX that answers provisionally after the call went to the failover: cancelled
  // (RFC 3261 §9.1), once.
  cancelPbx(call) {
    call.cancelSent = true;
    this.toBranch(call, 0, 'CANCEL', header(call.req.msg, 'to'));
  }

  toBranch(call, attempt, method, to) {
    const invite = call.req.msg;
    const lines = [`${method} ${oneLine(call.ruris[attempt])} SIP/2.0`,
      `Via: SIP/2.0/UDP ${this.access.hostport};branch=${call.branches[attempt]};rport`, 'Max-Forwards: 70',
      `From: ${header(invite, 'from')}`, `To: ${to}`, `Call-ID: ${call.req.callId}`, `CSeq: ${call.req.cseq} ${method}`,
      ...list(invite, 'route').map((r) => `Route: ${r}`), 'Content-Length: 0', '', ''];
    this.send(this.access, Buffer.from(lines.join('\r\n'), 'latin1'), call.dests[attempt]);
  }

  // The PBX's failure (408 when it said nothing), answered by the edge and kept for
  // the caller's retransmissions, CANCEL and ACK.
  answerOriginal(call) {
    const req = { ...call.req, msg: copyMessage(call.req.msg) };
    if (!call.original) return this.reply(req, 408, 'Request Timeout', []);
    const msg = copyMessage(call.original);
    setList(msg, 'via', 'Via', list(msg, 'via').slice(1));
    relayable(msg);
    const bytes = serialize(msg);
    this.remember(req.key, { method: 'INVITE', code: Number(msg.start.split(' ')[1]), answer: bytes, to: req.back, digest: req.digest });
    this.send(req.side, bytes, req.back);
  }

  // A request with a To tag. The policy passed it without credentials; it is relayed
  // only inside a dialog this edge created, from one of its parties, on the socket
  // that faces that party, and only to the other party's recorded address: neither
  // its Request-URI nor its Route set choose where it goes.
  inDialog(req, verdict, known) {
    const { msg, method, source, rinfo } = req;
    // The ACK of a non-2xx answer, and a CANCEL, of an INVITE this edge relayed
    // (same branch, RFC 3261 §17.1.1.3 and §9.1) follow that INVITE.
    if ((method === 'ACK' || method === 'CANCEL') && this.sameSender(known, req)) return this.alongTransaction(req, verdict, known);
    const found = this.dialogs.find(req.callId, req.ids.fromTag, req.ids.toTag);
    const { entry, sender, peer } = found ?? {};
    let why;
    if (!found) why = 'no such dialog';
    else if (sender.side !== req.side) why = `dialog party on ${sender.side.hostport}, not ${req.side.hostport}`;
    // A customer, and anyone when one socket faces both sides, is also held to its address.
    else if ((sender.customer || this.access === this.core) && sender.hop.host !== rinfo.address) why = `dialog party at ${sender.hop.host}`;
    // After the BYE, only that BYE again (its retransmission).
    else if (entry.bye !== undefined && entry.bye !== req.key) why = 'dialog ended';
    if (why) {
      if (method === 'ACK') return this.trace(`${source} ACK dropped: ${why}`);
      return this.refuse(req, 404, 'Not Found', [], `${why}`);
    }
    if (method === 'BYE') entry.bye = req.key;
    this.dialogs.touch(entry, entry.confirmed ? this.dialogs.ttlMs : EARLY_TTL_MS);
    // The Route entries after the edge's own are the sender's to write too, and a
    // loose router of the other party's side follows them (RFC 3261 §16.12): the
    // request leaves with the route set that side gave, whatever the sender wrote.
    const routes = this.dialogs.routeSet(entry, peer === entry.callee, req.ids.toTag);
    if (routes === undefined) this.popOurRoutes(msg); // a call set up before an upgrade: as it went before
    else setList(msg, 'route', 'Route', routes);
    return this.forward(req, peer.side, peer.hop, { verdict });
  }

  // An out-of-dialog request from the core (other than an INVITE to a DID, which is a
  // route): by its Request-URI, out of the other socket, never back to this edge.
  fromCore(req, verdict, known) {
    const { msg, method } = req;
    // The core's CANCEL of a call this edge relayed follows that INVITE (RFC 3261
    // §9.1), wherever its Request-URI points.
    if (method === 'CANCEL' && this.sameSender(known, req)) return this.alongTransaction(req, verdict, known);
    if (method === 'REGISTER') return this.refuse(req, 405, 'Method Not Allowed', [['Allow', 'INVITE, ACK, CANCEL, BYE, OPTIONS']]);
    this.popOurRoutes(msg);
    const dest = uriHostPort(msg.start.split(' ')[1]);
    const out = req.side === this.core ? this.access : this.core;
    return this.forward(req, out, dest, { verdict });
  }

  // OPTIONS, ACK and CANCEL out of dialog from the access side: nothing the policy
  // authenticated, so nothing of it reaches the carrier. OPTIONS (a keep-alive) is
  // answered here; an ACK or CANCEL goes on only within an INVITE transaction this
  // edge relayed, else the ACK is dropped and the CANCEL answered 481 (RFC 3261 §9.2).
  passThrough(req, verdict, known) {
    const { method, source } = req;
    if (method === 'OPTIONS') return this.reply(req, 200, 'OK', [['Allow', 'INVITE, ACK, CANCEL, BYE, OPTIONS']]);
    if (method !== 'ACK' && method !== 'CANCEL') throw new Error(`pass_through for ${method}`);
    if (this.sameSender(known, req)) return this.alongTransaction(req, verdict, known);
    if (method === 'ACK') return this.trace(`${source} ACK dropped: no transaction of ours`);
    return this.refuse(req, 481, 'Call/Transaction Does Not Exist', []);
  }

  // An ACK or CANCEL matching an INVITE this edge relayed, from where that INVITE came.
  sameSender(known, { side, rinfo }) {
    const f = known?.forward;
    return Boolean(f && f.from.side === side && f.from.host === rinfo.address && f.from.port === rinfo.port);
  }

  alongTransaction(req, verdict, known) {
    const { dest, ruri, out, branch, routes } = known.forward;
    // After a failover, the failover's branch.
    if (branch) req.branch = branch;
    // As a stateful proxy writes them itself (RFC 3261 §9.1, §16.10, §17.1.1.3): the
    // request's Via, From, To, Call-ID and CSeq, and the INVITE's Route as this edge
    // sent it. Nothing else of the sender's goes on: its credentials, a claim of
    // identity, a Route of its own (Kamailio's tm builds its CANCEL so too).
    req.msg.headers = req.msg.headers.filter((h) => ALONG.has(canon(h.name)));
    setList(req.msg, 'route', 'Route', routes ?? []);
    const call = req.method === 'CANCEL' && this.failovers.get(req.key);
    if (call) {
      // The caller gave up: no failover from now on.
      call.cancelled = true;
      clearTimeout(call.timer);
    }
    return this.forward(req, out, dest, { ruri, verdict });
  }

  party(side, hop, customer) { return { side, hop: { host: hop.host ?? hop.address, port: hop.port }, customer }; }

  // A preloaded Route or a route set entry naming this edge ends here (RFC 3261 §16.4);
  // two entries when the dialog crosses sockets.
  popOurRoutes(msg) {
    const routes = list(msg, 'route');
    if (!this.ourRoute(routes[0])) return;
    while (this.ourRoute(routes[0])) routes.shift();
    setList(msg, 'route', 'Route', routes);
  }

  // The route set a response to an INVITE gives the caller: the Record-Route entries
  // the callee's side added above the edge's own, taken in reverse (RFC 3261 §12.1.2).
  calleeRoutes(msg) {
    const rr = list(msg, 'record-route');
    const ours = rr.findIndex((r) => { try { return this.ourRoute(r); } catch { return false; } });
    return ours < 0 ? [] : rr.slice(0, ours).reverse();
  }

  // The Record-Route an answer that makes a dialog gives the caller (RFC 3261
  // §12.1.2): the edge's own entries as it wrote them on the INVITE, then those the
  // INVITE came with. The far end writes the answer: a PBX's own entry below the
  // edge's would have the carrier's in-dialog requests go first to a host it chose
  // inside the carrier; none of the edge's, straight to its Contact; an maddr on its
  // copy of them, wherever that names. So nothing of its is kept: its entries above
  // the edge's go too (the edge keeps them for that side: calleeRoutes), as they could
  // open a quote one parser reads and another does not over the entries after them.
  // A re-INVITE's answer changes no route set (§12.2.1.2) and stays as it is.
  // docs/kamailio.md, "Responses".
  callerRecordRoute(msg, ids) {
    const status = Number(msg.start.split(' ')[1]);
    if (ids.method !== 'INVITE' || !(status > 100 && status < 300) || (status < 200 && !ids.toTag)) return;
    const entry = this.dialogs.get(ids.callId, ids.fromTag);
    if (!entry || entry.cseq !== String(ids.cseq)) return;
    // As forward() wrote them: the socket facing the callee, then the caller's.
    const ours = [...new Set([entry.callee.side, entry.caller.side])].map((s) => `<sip:${s.hostport};lr>`);
    setList(msg, 'record-route', 'Record-Route', [...ours, ...(entry.callerRoutes ?? [])]);
  }

  // The side whose address a Route entry names, if it names one of ours.
  ourRoute(route) {
    if (!route) return undefined;
    const { host, port } = uriHostPort(route.replace(/^[^<]*</, ''));
    return this.sides.find((s) => s.host === host && s.port === port);
  }

  forward(req, out, dest, { ruri, recordRoute, verdict, dialog }) {
    const { side, msg, method, rinfo } = req;
    // Never back where it came from, nor to this edge itself (it would loop until 483).
    if ((dest.host === rinfo.address && dest.port === rinfo.port) || this.sides.some((s) => s.host === dest.host && s.port === dest.port)) {
      return this.refuse(req, 482, 'Loop Detected', []);
    }
    const mf = header(msg, 'max-forwards');
    // The policy answers 483 itself, except for ACK and OPTIONS (RFC 3261 §16.3).
    if (mf !== undefined && !(Number(mf) > 0)) return this.refuse(req, 483, 'Too Many Hops', []);
    // What the verdict says leaves with it: headers removed (every instance, either
    // form of the name), then headers added (docs/policy.md, threat model).
    const strip = new Set((verdict?.strip ?? []).map((name) => canon(String(name))));
    msg.headers = msg.headers.filter((h) => !strip.has(canon(h.name)));
    for (const [name, value] of verdict?.insert ?? []) {
      if (!TOKEN.test(name)) throw new Error(`verdict inserts a header named ${JSON.stringify(name)}`);
      msg.headers.push({ name, value: oneLine(value) });
    }
    const hops = String(mf === undefined ? 70 : Number(mf) - 1);
    const mfHeader = msg.headers.find((h) => canon(h.name) === 'max-forwards');
    if (mfHeader) mfHeader.value = hops;
    else msg.headers.push({ name: 'Max-Forwards', value: hops });
    if (ruri) msg.start = `${method} ${oneLine(ruri)} SIP/2.0`;
    const callerRoutes = list(msg, 'record-route');
    if (recordRoute) {
      // Two entries when the request crosses from one socket to the other (RFC 5658),
      // so each side's in-dialog requests come back to the socket facing it.
      const rr = [...new Set([out, side])].map((s) => `<sip:${s.hostport};lr>`);
      setList(msg, 'record-route', 'Record-Route', [...rr, ...list(msg, 'record-route')]);
    }
    setList(msg, 'via', 'Via', [`SIP/2.0/UDP ${out.hostport};branch=${req.branch};rport`, ...list(msg, 'via')]);
    const bytes = serialize(msg);
    if (method === 'INVITE') {
      // A failover forwards the same transaction again: its window runs from the first.
      const firstAt = this.lookup(req.key)?.forward?.firstAt ?? Date.now();
      this.remember(req.key, {
        method, digest: req.digest,
        forward: {
          dest, ruri, out, branch: req.branch, bytes, firstAt, routes: list(msg, 'route'),
          from: { side, host: rinfo.address, port: rinfo.port },
        },
      });
    }
    if (dialog) this.dialogs.create(req.callId, req.ids.fromTag, req.cseq, dialog.caller, dialog.callee, callerRoutes);
    this.send(out, bytes, dest);
  }

  // Answers a request, except an ACK, which is never answered (RFC 3261 §17.2.3).
  refuse(req, code, reason, headers, why) {
    if (why) this.trace(`${req.source} ${req.method} refused ${code}: ${why}`);
    if (req.method !== 'ACK') this.reply(req, code, reason, headers);
  }

  // Answers a request: the core renders the answer from the request as the edge has
  // it (its top Via with received/rport) and the code, reason and headers.
  reply(req, code, reason, extra, remember = true) {
    const rendered = renderReply(serialize(req.msg), Number(code), String(reason),
      JSON.stringify(extra), crypto.randomBytes(8).toString('hex'));
    if (!rendered) return this.log(`cannot answer ${req.method} from ${req.source}: its headers do not parse`);
    const bytes = Buffer.from(rendered);
    const to = viaDestination(parseVia(list(req.msg, 'via')[0]));
    // Not a CANCEL's answer: a CANCEL shares its INVITE's key (RFC 3261 §9.1), and
    // anyone's CANCEL answered here (481 to a stranger) would replace the INVITE's
    // entry, so that the caller's own CANCEL no longer followed its INVITE. Nor any
    // answer over a forwarded INVITE's entry: a stranger's OPTIONS with that
    // INVITE's Call-ID, CSeq number and branch would have the caller's CANCEL
    // answered here, and never reach the callee.
    if (remember && req.key !== undefined && req.method !== 'CANCEL' && !this.lookup(req.key)?.forward) {
      this.remember(req.key, { method: req.method, code, answer: bytes, to, digest: req.digest });
    }
    this.send(req.side, bytes, to);
  }

  response(msg, ids) {
    // Identifiers the policy cannot read one way (or a line a CR or LF alone ends,
    // which one reader ends a header at and another does not): the edge never relays
    // what it cannot match by the policy's reading.
    if (!ids) return this.trace(`dropped a response whose identifiers do not parse: ${msg.start}`);
    const vias = list(msg, 'via');
    const ours = vias.length >= 2 ? parseVia(vias[0]) : undefined;
    const next = ours && parseVia(vias[1]);
    const branch = (ours && param(ours, 'branch')) ?? '';
    // Sent from one socket (the Via's), answered out of the one the request came in on (the branch's).
    const side = this.sides.find((s) => s.letter === branch[7]);
    const dest = next && viaDestination(next);
    const clientBranch = (next && param(next, 'branch')) ?? '';
    const attempt = side && this.sides.some((s) => s.hostport === ours.sentBy)
      ? [0, 1].find((a) => branch === this.branch(side.letter, dest, ids, clientBranch, a)) : undefined;
    if (attempt === undefined) {
      return this.trace(`dropped a response that is not for us: ${msg.start} (top Via ${vias[0] ?? 'none'})`);
    }
    const call = this.failovers.get(`${ids.callId}\n${ids.cseq}\n${clientBranch}`);
    if (call && this.failoverResponse(call, msg, ids, attempt)) return;
    this.dialogs.learn(Number(msg.start.split(' ')[1]), ids, this.calleeRoutes(msg));
    this.callerRecordRoute(msg, ids);
    setList(msg, 'via', 'Via', vias.slice(1));
    relayable(msg);
    this.send(side, serialize(msg), dest);
  }

  send(side, bytes, to) {
    if (this.outbox) this.outbox.push([side, bytes, to]);
    else this.sendNow(side, bytes, to);
  }

  sendNow(side, bytes, { host, port }) {
    side.sock.send(bytes, port, host, (e) => e && this.log(`send to ${fmtHostPort(host, port)} failed: ${e.message}`));
  }

  remember(key, entry) {
    this.txns.delete(key);
    this.txns.set(key, { ...entry, at: Date.now() });
    if (this.txns.size <= TXN_MAX) return;
    // Full: the oldest answer goes first, a forwarded INVITE only when nothing else is
    // left. Answers go to anyone (a scanner's flood of them), forwarded INVITEs only
    // to callers the policy let through, and evicting one would leave its CANCEL and
    // retransmissions nothing to follow.
    for (const [k, e] of this.txns) {
      if (!e.forward) return void this.txns.delete(k);
    }
    this.txns.delete(this.txns.keys().next().value);
  }

  lookup(key) {
    const entry = this.txns.get(key);
    return entry && Date.now() - entry.at < TXN_TTL_MS ? entry : undefined;
  }
}

// A proxy never passes on a 503 (RFC 3261 §16.7 step 6): whoever gets it would take
// this edge for the unavailable one (a 503 with Retry-After from one PBX would stop
// the carrier sending any call here). Kamailio's tm does the same (remap_503_500).
function relayable(msg) {
  if (/^SIP\/2\.0 503 /.test(msg.start)) msg.start = 'SIP/2.0 500 Server Internal Error';
}

// ---------------------------------------------------------------- durable state

// --state FILE: the edge's state in one JSON file (README.md, "Upgrade and restart"):
// the policy's store (bindings, last registration IPs, the nonce secret, alert
// throttles, replay and lockout counts), the dialogs, the key of the Via branches.
// Written whole and atomically: a file beside it, fsync, rename over, fsync of the
// directory; mode 0600 (it holds the nonce secret and the branch key).
class StateFile {
  constructor(file) { this.file = path.resolve(file); }

  // The saved state, undefined when there is no file yet; throws on one it cannot
  // read (the edge does not start: it would forget every registration).
  read() {
    let text;
    try {
      text = fs.readFileSync(this.file, 'utf8');
    } catch (e) {
      if (e.code === 'ENOENT') return undefined;
      throw e;
    }
    const state = JSON.parse(text);
    if (state?.version !== 1 || !Array.isArray(state.store) || !Array.isArray(state.dialogs)) {
      throw new Error('not a state file of this edge (version 1)');
    }
    return state;
  }

  write(state) {
    const tmp = `${this.file}.${process.pid}.tmp`;
    try {
      const fd = fs.openSync(tmp, 'w', 0o600);
      try {
        fs.fchmodSync(fd, 0o600); // whatever the umask, or a leftover file's mode
        fs.writeSync(fd, JSON.stringify(state));
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, this.file);
    } catch (e) {
      try { fs.unlinkSync(tmp); } catch { /* it was never made */ }
      throw e;
    }
    const dir = fs.openSync(path.dirname(this.file), 'r');
    try { fs.fsyncSync(dir); } finally { fs.closeSync(dir); }
  }
}

// The policy's store (a Map for TrunkPolicy) written through to the state file: every
// change is on disk before the policy goes on, so before the edge answers the request
// that made it (a 200 to a REGISTER leaves only once its binding is saved). A change
// that cannot be saved is undone and reported to the policy, which refuses the request
// 500 store_unavailable (docs/policy.md).
class DurableStore {
  constructor(entries, save) {
    this.map = new Map(entries);
    this.save = save;
  }

  get(key) { return this.map.get(key); }

  set(key, value) {
    if (this.map.get(key) === value) return this;
    return this.change(key, () => this.map.set(key, value));
  }

  delete(key) {
    if (!this.map.has(key)) return false;
    return this.change(key, () => this.map.delete(key));
  }

  change(key, apply) {
    const had = this.map.has(key);
    const old = this.map.get(key);
    apply();
    try {
      this.save();
    } catch (e) {
      if (had) this.map.set(key, old);
      else this.map.delete(key);
      throw new Error(`cannot save ${key} in the state file: ${e.message}`);
    }
    return true;
  }
}

// ---------------------------------------------------------------- alerts

// Alerts waiting for a retry at most (a relay down for long costs memory up to this,
// then each further alert is written to the log whole, for re-delivery by hand).
const ALERT_RETRY_MAX = 10000;

function alertSink(url, tokenFile, log) {
  const token = tokenFile ? fs.readFileSync(tokenFile, 'utf8').split('\n')[0].trim() : process.env.TRUNKGUARD_RELAY_TOKEN;
  let waiting = 0;
  return (alert) => {
    process.stdout.write(`${JSON.stringify({ alert })}\n`);
    if (!url) return;
    const body = JSON.stringify(alert);
    const headers = { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) };
    // Off the SIP path. What an answer means is the core's rule, as in every host: a
    // retry repeats the same body (and id), so the relay recognises it and never
    // mails twice, and it goes on (1 s doubling to 60 s) until the relay takes it; a
    // refusal is kept whole in the log for the operator, never dropped.
    const settle = (status, detail, attempt) => {
      const what = alertDelivery(status);
      if (what === 'sent') return;
      if (what === 'refused') {
        return log(`alert ${alert.id}: ${url} refused it (${status} ${detail}); re-deliver by hand: ${body}`);
      }
      if (attempt === 0 && waiting >= ALERT_RETRY_MAX) {
        return log(`alert ${alert.id}: ${waiting} alerts already wait for ${url}; re-deliver by hand: ${body}`);
      }
      if (attempt === 0) waiting += 1;
      log(`alert ${alert.id}: post to ${url} failed (${detail}), retrying`);
      setTimeout(() => post(attempt + 1), Math.min(60000, 1000 * 2 ** Math.min(attempt, 6))).unref();
    };
    const post = (attempt) => fetch(url, { method: 'POST', headers, body, signal: AbortSignal.timeout(5000) })
      .then(async (res) => {
        const text = res.ok ? '' : (await res.text()).slice(0, 200);
        if (attempt > 0 && alertDelivery(res.status) !== 'retry') waiting -= 1;
        settle(res.status, text, attempt);
      })
      .catch((e) => settle(undefined, e.message, attempt));
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
      'core-listen': { type: 'string' }, 'dialog-ttl': { type: 'string' }, 'alerts-url': { type: 'string' }, 'alerts-token-file': { type: 'string' },
      state: { type: 'string' },
      'refusal-log': { type: 'string' },
      verbose: { type: 'boolean', short: 'v' }, help: { type: 'boolean', short: 'h' },
    },
  });
  if (opt.help || !opt.config || !opt.listen || !opt.upstream) {
    process.stderr.write(`${USAGE}\n`);
    process.exit(opt.help ? 0 : 2);
  }
  const log = (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`);
  const dialogTtl = Number(opt['dialog-ttl'] ?? DIALOG_TTL_S);
  if (!(dialogTtl > 0)) {
    process.stderr.write(`--dialog-ttl: give a number of seconds\n${USAGE}\n`);
    process.exit(2);
  }

  // --state: what the edge knows outlives a restart; without it, a restart forgets
  // every registration and dialog.
  const state = opt.state ? new StateFile(opt.state) : undefined;
  let saved;
  try {
    saved = state?.read();
  } catch (e) {
    process.stderr.write(`edge: state file ${state.file}: ${e.message}; not starting (move it aside to start afresh)\n`);
    process.exit(1);
  }
  let saveAll = () => {};
  const store = state ? new DurableStore(saved?.store ?? [], () => saveAll()) : new Map();
  const policy = new TrunkPolicy(store);
  policy.onAlert(alertSink(opt['alerts-url'], opt['alerts-token-file'], log));
  const refusalLog = logWriter(opt['refusal-log']);
  policy.onRefusalLog((line) => refusalLog.write(line), refusalLogRate());
  const upstream = hostPort(opt.upstream);
  upstream.port ??= 5060;
  // Resolved once: the carrier's in-dialog requests are recognised by its address.
  if (!net.isIP(upstream.host)) upstream.host = (await dns.lookup(upstream.host)).address;
  const access = await bind(opt.listen, 'a');
  const core = opt['core-listen'] ? await bind(opt['core-listen'], 'c') : access;
  const edge = new Edge({ policy, access, core, upstream, verbose: opt.verbose, dialogTtlMs: dialogTtl * 1000, state, saved, store });
  if (state) {
    saveAll = () => edge.save();
    // Written at once: a state file that cannot be written stops the edge here, not
    // at the first registration.
    try {
      edge.save();
    } catch (e) {
      process.stderr.write(`edge: state file ${state.file}: ${e.message}; not starting\n`);
      process.exit(1);
    }
    log(`state in ${state.file}: ${store.map.size} store entries, ${edge.dialogs.map.size} dialogs`);
  }
  // Synchronous, so no datagram is judged before the first configuration is in force.
  if (!edge.load(opt.config)) process.exit(1);
  process.on('SIGHUP', () => {
    edge.load(opt.config);
    try { refusalLog.reopen(); } catch (e) { log(`refusal log ${opt['refusal-log']}: ${e.message}`); }
  });
  // Polling the file's stat survives editors that replace it by a rename.
  fs.watchFile(opt.config, { interval: 1000 }, (cur, prev) => {
    if (cur.mtimeMs !== prev.mtimeMs || cur.size !== prev.size || cur.ino !== prev.ino) edge.load(opt.config);
  });
  log(`listening on ${access.hostport}${core === access ? '' : `, core side on ${core.hostport}`}, upstream ${fmtHostPort(upstream.host, upstream.port)}`);

  // Every second: closes alert windows, and writes the refusal log's summary of a
  // second that left lines out.
  setInterval(() => {
    try { policy.tick(Date.now()); } catch (e) { log(`tick: ${e.message}`); }
  }, 1000);
  for (const signal of ['SIGINT', 'SIGTERM']) {
    process.on(signal, () => {
      // The dialogs' last expiry times (every other change is saved already).
      try { edge.save(); } catch (e) { log(`state file: ${e.message}`); }
      process.exit(0);
    });
  }
}

main().catch((e) => {
  process.stderr.write(`edge: ${e.message}\n`);
  process.exit(1);
});
