// The Node.js SIP edge (host-shims/node/edge.js) on loopback, driven by sipp
// (Debian's sip-tester; scripts/test-js installs it): a PBX registers and calls
// through it to a sipp carrier, stolen credentials and a peer-to-peer trunk outside
// its access list are refused with alerts, the core's call is routed to the
// registered PBX. Run once with one socket and once with a separate core socket.
// 127.0.0.x addresses are distinct sources here: .2 the PBX, .3 an intruder, .4 a
// third party an attacker would like to reach, .9 the carrier core.
//
// The attacks of docs/policy.md (threat model) are replayed through the real edge,
// each with a listening far end standing for the carrier (or the PBX, or the third
// party) that asserts nothing of the attack reached it. TG_EDGE_JS runs the suite
// against another edge.js (for instance the previous one, to see the attacks succeed
// there).

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import { createServer } from 'node:http';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../..', import.meta.url));
const SIPP = process.env.SIPP ?? 'sipp';
const TIMEOUT = { timeout: 30_000 };
const REALM = 'trunks.example.net';
const HQ = { user: 'hq1', password: 's3cret' };
const P2P = { user: 'branch1', password: 'p2p-s3cret' };
const CALLED = '+15559876543';
const TOKEN = 'edge-test-token';

// sipp answers the first challenge header and only knows MD5; with a `password` the
// policy offers SHA-256 first. `ha1` (MD5 only) keeps SHA-256 out of the challenges.
const ha1 = ({ user, password }) => createHash('md5').update(`${user}:${REALM}:${password}`).digest('hex');

const EDGE_JS = process.env.TG_EDGE_JS ?? join(root, 'host-shims/node/edge.js');

// coreSockets: the socket the core sends to (the only one where 127.0.0.9 is the core).
function config({ broken = false, coreSockets } = {}) {
  return {
    realm: REALM,
    core_networks: ['127.0.0.9/32'],
    core_sockets: coreSockets,
    locations: [
      { id: 'hq', contacts: ['noc@example.com'], trunk_groups: [
        { id: 'hq-pbx1', username: HQ.user, ha1: ha1(HQ), require_registration: true, dids: ['+15551230000'] }] },
      { id: 'branch', contacts: ['branch-it@example.com'], trunk_groups: [
        { id: 'branch-p2p', username: P2P.user, ha1: ha1(P2P), require_registration: false,
          acl: [broken ? '127.0.0.300/32' : '127.0.0.2/32'], dids: ['+15557770000'] }] },
    ],
  };
}

// Every process started here, killed at the end whatever happened.
const children = new Set();
function start(cmd, args, opts = {}) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}
const killAll = () => { for (const child of children) child.kill('SIGKILL'); };
process.on('exit', killAll);

async function waitFor(what, check, ms = 10_000) {
  for (const until = Date.now() + ms; Date.now() < until;) {
    const value = check();
    if (value) return value;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function udpSocket(ip, port = 0) {
  const sock = dgram.createSocket('udp4');
  await new Promise((resolve, reject) => { sock.once('error', reject); sock.bind(port, ip, resolve); });
  return sock;
}
async function freePort(ip) {
  const sock = await udpSocket(ip);
  const { port } = sock.address();
  await new Promise((resolve) => sock.close(resolve));
  return port;
}

// The alert endpoint the edge posts to (--alerts-url).
const posted = [];
// Statuses the relay answers to the next posts, in order (then 202).
const relayAnswers = [];
let alertServer;
let alertsUrl;

// Missing sipp is a failure, never a skip: this test fails and the rest are cancelled.
const probe = spawnSync(SIPP, ['-v']);
const sippMissing = probe.error && `sipp not found (${probe.error.message}): install Debian's sip-tester, as scripts/test-js does`;
test('sipp is installed', () => assert.ok(!sippMissing, sippMissing));

before(async () => {
  if (sippMissing) throw new Error(sippMissing);
  alertServer = createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      const status = relayAnswers.shift() ?? 202;
      posted.push({ authorization: req.headers.authorization, alert: JSON.parse(body), status });
      res.writeHead(status, { 'content-type': 'application/json' }).end(status === 202 ? '{"status":"queued"}' : '{"error":"no"}');
    });
  });
  await new Promise((resolve) => alertServer.listen(0, '127.0.0.1', resolve));
  alertsUrl = `http://127.0.0.1:${alertServer.address().port}/v1/alerts`;
});

after(() => {
  killAll();
  alertServer?.close();
});

async function startEdge(coreListen, env = {}, extraArgs = [], makeConfig = config) {
  const dir = mkdtempSync(join(tmpdir(), 'tg-edge-'));
  const cfg = join(dir, 'config.json');
  // The configuration names the core-facing socket, so its ports are chosen here.
  const listenPort = await freePort('127.0.0.1');
  const corePort = coreListen ? await freePort('127.0.0.1') : listenPort;
  const coreSockets = [`127.0.0.1:${corePort}`];
  writeFileSync(cfg, JSON.stringify(makeConfig({ coreSockets }), null, 2));
  writeFileSync(join(dir, 'token'), `${TOKEN}\n`);
  const upstreamPort = await freePort('127.0.0.1');
  const args = [EDGE_JS, '--config', cfg, '--listen', `127.0.0.1:${listenPort}`,
    '--upstream', `127.0.0.1:${upstreamPort}`, '--alerts-url', alertsUrl, '--alerts-token-file', join(dir, 'token'), '--verbose'];
  if (coreListen) args.push('--core-listen', `127.0.0.1:${corePort}`);
  args.push(...extraArgs);
  return launch({ dir, cfg, coreSockets, upstreamPort, args, env: { ...process.env, ...env } });
}

// Starts the edge process of `edge` (again, after a restart: the same sockets,
// configuration and arguments), with a fresh log and alert list.
async function launch(edge) {
  const proc = start(process.execPath, edge.args, { env: edge.env });
  Object.assign(edge, { proc, log: '', alerts: [], exit: new Promise((resolve) => proc.once('exit', resolve)) });
  let pending = '';
  proc.stdout.on('data', (d) => {
    const lines = (pending + d).split('\n');
    pending = lines.pop();
    for (const line of lines) edge.alerts.push(JSON.parse(line).alert);
  });
  proc.stderr.on('data', (d) => { edge.log += d; });
  let exited = false;
  proc.on('exit', () => { exited = true; });
  const m = await waitFor('the edge to listen', () => {
    if (exited) throw new Error(`the edge exited:\n${edge.log}`);
    return /listening on 127\.0\.0\.1:(\d+)(?:, core side on 127\.0\.0\.1:(\d+))?/.exec(edge.log);
  });
  edge.address = `127.0.0.1:${m[1]}`;
  edge.coreAddress = `127.0.0.1:${m[2] ?? m[1]}`;
  return edge;
}

// Runs one sipp scenario to its end; resolves with its exit code and message log.
function sipp(edge, name, scenario, args) {
  const messages = join(edge.dir, `${name}.messages.log`);
  const errors = join(edge.dir, `${name}.errors.log`);
  const child = start(SIPP, ['-sf', join(root, 'tests/sipp', scenario), '-m', '1', '-nostdin', '-bind_local',
    '-timeout', '20s', '-timeout_error', '-trace_msg', '-message_file', messages, '-trace_err', '-error_file', errors, ...args],
  { cwd: edge.dir });
  let out = '';
  const keep = (d) => { out = (out + d).slice(-3000); };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  const run = new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      const read = (f) => (existsSync(f) ? readFileSync(f, 'latin1') : '');
      resolve({ name, code, signal, messages: read(messages), errors: read(errors), out });
    });
  });
  run.child = child;
  return run;
}

function assertPassed(edge, ...runs) {
  for (const run of runs) {
    assert.equal(run.code, 0, `sipp ${run.name} exited ${run.code ?? run.signal}\n--- its errors:\n${run.errors}\n--- its screen:\n${run.out}\n--- edge log:\n${edge.log}`);
  }
  return runs.at(-1);
}

// A far end (sipp UAS) on ip:port for one call: `done` settles when it ends. It is
// given a head start; the caller retransmits its INVITE should it bind late anyway.
async function farEnd(edge, name, scenario, ip, port) {
  const run = sipp(edge, name, scenario, ['-i', ip, '-p', String(port)]);
  await new Promise((resolve) => setTimeout(resolve, 300));
  return { run };
}
// The far end's result once the caller is done; a failed caller leaves it waiting, so end it.
function ended(far, caller) {
  if (caller.code !== 0) far.run.child.kill('SIGKILL');
  return far.run;
}

// A far end that answers nothing and records what reaches it (the carrier's port,
// the PBX's, a third party's) while nothing else listens there.
async function watch(ip, port) {
  const sock = await udpSocket(ip, port);
  const seen = [];
  sock.on('message', (m) => seen.push(m.toString('latin1')));
  return { sock, seen, port: sock.address().port, close: () => new Promise((resolve) => sock.close(resolve)) };
}
const watchUpstream = (edge) => watch('127.0.0.1', edge.upstreamPort);

// Runs fn with far ends listening, then asserts none of them received anything (after
// a grace period for late datagrams), and closes them whatever happened.
async function nothingReaches(farEnds, fn) {
  try {
    await fn();
    await new Promise((resolve) => setTimeout(resolve, 300));
    for (const [name, far] of Object.entries(farEnds)) assert.deepEqual(far.seen, [], `something reached ${name}`);
  } finally {
    for (const far of Object.values(farEnds)) await far.close();
  }
}

// sipp's digest uri is the address it sends to unless -auth_uri names another; the
// policy wants the Request-URI's (RFC 3261 §22.4).
function uac(edge, name, scenario, ip, { creds, service = CALLED, to = edge.address } = {}) {
  const args = ['-i', ip, '-s', service];
  if (creds) args.push('-key', 'user', creds.user, '-au', creds.user, '-ap', creds.password, '-auth_uri', `${service}@trunks.example.net`);
  return sipp(edge, name, scenario, [...args, to]);
}

// The peer-to-peer trunk's INVITE from `pbx` (a socket on 127.0.0.2 whose messages
// `got` collects), answered with credentials after the 407. Resolves with the
// authenticated INVITE as sent (to send again as a retransmission).
async function authenticatedInvite(edge, pbx, got, callId, { creds = P2P, cseq = 1, fromTag = 'pbx-tag', trailer = '' } = {}) {
  const [host, port] = edge.address.split(':');
  const ruri = `sip:${CALLED}@trunks.example.net`;
  const invite = (n, auth = '') => ['INVITE ' + ruri + ' SIP/2.0',
    `Via: SIP/2.0/UDP 127.0.0.2:${pbx.address().port};branch=z9hG4bK-hand-${n};rport`, 'Max-Forwards: 70',
    `From: <sip:${creds.user}@trunks.example.net>;tag=${fromTag}`, `To: <${ruri}>`, `Call-ID: ${callId}`, `CSeq: ${n} INVITE`,
    `Contact: <sip:${creds.user}@127.0.0.2:${pbx.address().port}>`, ...(auth ? [auth] : []), 'Content-Length: 0', '', ''].join('\r\n');
  pbx.send(invite(cseq), Number(port), host);
  const challenge = await waitFor('the 407', () => got.find((m) => /^SIP\/2\.0 407 /.test(m) && m.includes(callId)
    && m.includes(`CSeq: ${cseq} INVITE`)));
  const nonce = /nonce="([^"]+)"/.exec(challenge)[1];
  const md5 = (x) => createHash('md5').update(x).digest('hex');
  const response = md5(`${ha1(creds)}:${nonce}:00000001:0a4f113b:auth:${md5(`INVITE:${ruri}`)}`);
  const authed = invite(cseq + 1, `Proxy-Authorization: Digest username="${creds.user}", realm="${REALM}", nonce="${nonce}", uri="${ruri}", response="${response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"`);
  pbx.send(authed + trailer, Number(port), host);
  return authed;
}

// A call set up by hand, for attacks inside a live dialog: the PBX (a socket on
// 127.0.0.2) calls with the peer-to-peer trunk's credentials, answering the 407; the
// carrier (a socket on the upstream port) answers 200 (or `status`: 183, reliable, an
// early dialog) with the edge's Record-Route (below `carrierProxy`'s, a carrier
// proxy's that record-routes, when given) and records everything it gets. Resolves
// with the dialog as the PBX sees it.
async function handCall(edge, carrierProxy, status = 200) {
  const carrier = await watch('127.0.0.1', edge.upstreamPort);
  carrier.sock.on('message', (m, rinfo) => {
    const text = m.toString('latin1');
    if (!/^INVITE /.test(text) || /^To:.*;tag=/mi.test(text)) return;
    const keep = text.split('\r\n').filter((l) => /^(Via|From|Call-ID|CSeq|Record-Route):/i.test(l));
    const to = /^To: (.*)$/mi.exec(text)[1];
    const proxied = carrierProxy ? [`Record-Route: ${carrierProxy}`] : [];
    const early = status === 183 ? ['Require: 100rel', 'RSeq: 1'] : [];
    const answer = [status === 183 ? 'SIP/2.0 183 Session Progress' : 'SIP/2.0 200 OK', ...proxied, ...early, ...keep, `To: ${to};tag=carrier-tag`, `Contact: <sip:carrier@127.0.0.1:${edge.upstreamPort}>`, 'Content-Length: 0', '', ''];
    carrier.sock.send(answer.join('\r\n'), rinfo.port, rinfo.address);
  });
  const pbx = await udpSocket('127.0.0.2');
  const got = [];
  pbx.on('message', (m) => got.push(m.toString('latin1')));
  const callId = `hand-${Date.now()}@127.0.0.2`;
  const ruri = `sip:${CALLED}@trunks.example.net`;
  await authenticatedInvite(edge, pbx, got, callId);
  const ok = await waitFor(`the ${status} through the edge`, () => got.find((m) => m.startsWith(`SIP/2.0 ${status} `)));
  const recordRoute = [...ok.matchAll(/^Record-Route: (.*?)\r?$/gmi)].flatMap((m) => m[1].split(/,\s*(?=<)/));
  return {
    carrier, pbx, callId,
    from: `<sip:${P2P.user}@trunks.example.net>;tag=pbx-tag`, to: `<${ruri}>;tag=carrier-tag`,
    routes: `Route: ${recordRoute.reverse().join(', ')}\n`, routeSet: recordRoute, got,
    close: async () => { pbx.close(); await carrier.close(); },
  };
}

const inDialogRequest = (call, method, target, ip, n) => `${method} ${target} SIP/2.0
Via: SIP/2.0/UDP ${ip}:5060;branch=z9hG4bK-live-${n};rport
${call.routes}Max-Forwards: 70
From: ${call.from}
To: ${call.to}
Call-ID: ${call.callId}
CSeq: ${10 + n} ${method}
Content-Length: 0

`;

const alertFor = (edge, cause) => waitFor(`an alert with cause ${cause}`, () => edge.alerts.find((a) => a.cause === cause));

// Sends one datagram from ip and returns the first answer (or undefined).
async function exchange(ip, to, text, ms = 1000) {
  const sock = await udpSocket(ip);
  const [host, port] = to.split(':');
  const answer = new Promise((resolve) => {
    sock.on('message', (m) => resolve(m.toString('latin1')));
    setTimeout(resolve, ms);
  });
  sock.send(text.replaceAll('\n', '\r\n'), Number(port), host);
  const got = await answer;
  sock.close();
  return got;
}

for (const coreListen of [false, true]) {
  describe(coreListen ? 'edge with a separate core socket (--core-listen)' : 'edge on one socket', () => {
    let edge;
    let pbxPort;

    before(async () => {
      edge = await startEdge(coreListen);
      pbxPort = await freePort('127.0.0.2');
    }, TIMEOUT);

    after(async () => {
      if (edge) {
        edge.proc.kill('SIGTERM');
        rmSync(edge.dir, { recursive: true, force: true });
      }
    });

    test('a PBX registers with digest: 401, then 200 with its Contact and expiry', TIMEOUT, async () => {
      const run = await sipp(edge, 'register', 'register.xml',
        ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]);
      assertPassed(edge, run);
      assert.match(run.messages, /SIP\/2\.0 401 Unauthorized[\s\S]*WWW-Authenticate: Digest realm="trunks\.example\.net"/);
      assert.match(edge.log, /REGISTER \S+: accept 200 registered hq-pbx1/);
    });

    test('its call is challenged 407, sent again with credentials, and completes with the carrier', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier', 'uas.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'call', 'call.xml', '127.0.0.2', { creds: HQ });
      const got = assertPassed(edge, pbx, await ended(carrier, pbx)).messages;
      assert.match(pbx.messages, /SIP\/2\.0 407 Proxy Authentication Required/);
      // The carrier saw only the authenticated INVITE, through the edge, and no ACK of the 407.
      assert.doesNotMatch(got, /CSeq: 1 (INVITE|ACK)/);
      assert.match(got, new RegExp(`INVITE sip:\\${CALLED}@trunks\\.example\\.net SIP/2\\.0\\r?\\n(?:.+\\r?\\n)*?Via: SIP/2\\.0/UDP ${edge.coreAddress};branch=z9hG4bK`));
      assert.match(got, /Max-Forwards: 69/);
      // One Record-Route per socket the call crossed, the one facing the carrier on top (RFC 5658).
      const invite = got.slice(0, got.indexOf('SIP/2.0 180'));
      const recorded = [...invite.matchAll(/^Record-Route: <sip:([\d.:]+);lr>/gm)].map((m) => m[1]);
      assert.deepEqual(recorded, coreListen ? [edge.coreAddress, edge.address] : [edge.address]);
      assert.match(got, /^BYE /m);
      assert.match(edge.log, /ACK absorbed \(it acknowledges our 407\)/);
    });

    // Threat model: the verdict's strip and insert are applied to what is relayed.
    test('attack: what the PBX put in its call does not reach the carrier; the edge asserts identity and trunk group', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier-dressed', 'uas.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'call-dressed', 'call.xml', '127.0.0.2', { creds: HQ });
      const got = assertPassed(edge, pbx, await ended(carrier, pbx)).messages;
      const invite = got.slice(0, got.indexOf('SIP/2.0 180'));
      assert.match(invite, /^INVITE /m);
      assert.doesNotMatch(invite, /^(Proxy-)?Authorization:/im, 'credentials for our realm end at the edge');
      assert.doesNotMatch(invite, /^Route:/im, 'the PBX\'s preloaded Route set ends at the edge');
      assert.doesNotMatch(invite, /pbx\.example\.com|someone-else/, 'the PBX\'s own identity and trunk-group claim are gone');
      assert.match(invite, /^P-Asserted-Identity: <sip:\+15551230000@trunks\.example\.net>\r?$/im);
      assert.match(invite, /^X-Trunkguard-Trunk-Group: hq-pbx1\r?$/im);
      assert.equal((invite.match(/^P-Asserted-Identity:/gim) ?? []).length, 1);
      const bye = got.slice(got.search(/^BYE /m));
      assert.doesNotMatch(bye.slice(0, bye.indexOf('SIP/2.0 200')), /^X-Trunkguard-Trunk-Group:/im, 'nor in its BYE');
    });

    test('both parties re-INVITE the call, and the carrier ends it', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier-reinvite', 'uas-reinvite.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'call-reinvite', 'call-reinvite.xml', '127.0.0.2', { creds: HQ });
      assertPassed(edge, pbx, await ended(carrier, pbx));
      // Each way, judged in_dialog and relayed within the dialog the edge recorded.
      assert.match(edge.log, /127\.0\.0\.2:\d+ INVITE \S+: allow\s+in_dialog/);
      for (const method of ['INVITE', 'ACK', 'BYE']) {
        assert.match(edge.log, new RegExp(`127\\.0\\.0\\.1:${edge.upstreamPort} ${method} \\S+: allow\\s+in_dialog`));
      }
    });

    test('a CANCEL and the ACK of the 487 follow the INVITE to the carrier', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier-cancel', 'uas-cancel.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'cancel', 'cancel.xml', '127.0.0.2', { creds: HQ });
      const got = assertPassed(edge, pbx, await ended(carrier, pbx)).messages;
      const branches = [...got.matchAll(/^(?:INVITE|CANCEL|ACK) [^\n]*\n(?:[^\n]*\n)*?Via: SIP\/2\.0\/UDP [^;]+;branch=(\w+)/gm)].map((m) => m[1]);
      assert.equal(branches.length, 3, got);
      assert.equal(new Set(branches).size, 1, `INVITE, CANCEL and ACK must share the edge's branch: ${branches}`);
    });

    test('a retransmitted authenticated INVITE is forwarded again on its branch, never judged again', TIMEOUT, async () => {
      // UDP: the PBX sends its INVITE again when no answer came in time. Judged again,
      // its credentials would read as a replayed nonce (407 stale), ending its call
      // while the first INVITE went on to the carrier.
      const carrier = await watch('127.0.0.1', edge.upstreamPort);
      const pbx = await udpSocket('127.0.0.2');
      const got = [];
      pbx.on('message', (m) => got.push(m.toString('latin1')));
      try {
        const callId = `rexmit-${Date.now()}@127.0.0.2`;
        const invites = () => carrier.seen.filter((m) => m.startsWith('INVITE ') && m.includes(callId));
        const authed = await authenticatedInvite(edge, pbx, got, callId);
        await waitFor('the INVITE at the carrier', () => invites().length === 1);
        const [host, port] = edge.address.split(':');
        pbx.send(authed, Number(port), host);
        await waitFor('the retransmission at the carrier', () => invites().length === 2);
        await new Promise((resolve) => setTimeout(resolve, 300));
        assert.deepEqual(got.filter((m) => /^SIP\/2\.0 [2-6]\d\d /.test(m) && /CSeq: 2 INVITE/.test(m)), [],
          'the retransmission got an answer of its own');
        const branch = (m) => /^Via: SIP\/2\.0\/UDP [^;]+;branch=([^;\r\n]+)/m.exec(m)[1];
        assert.equal(branch(invites()[0]), branch(invites()[1]), 'a retransmission keeps its branch (RFC 3261 §16.11)');
        assert.match(edge.log, /INVITE retransmitted: forwarded again/);
      } finally {
        pbx.close();
        await carrier.close();
      }
    });

    test('attack: another trunk reusing a ringing call\'s Call-ID and From tag gets 482, and the call stays its caller\'s', TIMEOUT, async () => {
      // hq-pbx1 (registered from 127.0.0.2 by the first test) has seen branch-p2p's
      // INVITE on the wire while it rings.
      const carrier = await watch('127.0.0.1', edge.upstreamPort);
      const victim = await udpSocket('127.0.0.2');
      const thief = await udpSocket('127.0.0.2');
      const [victimGot, thiefGot] = [[], []];
      victim.on('message', (m) => victimGot.push(m.toString('latin1')));
      thief.on('message', (m) => thiefGot.push(m.toString('latin1')));
      try {
        const callId = `ring-${Date.now()}@127.0.0.2`;
        const invites = () => carrier.seen.filter((m) => m.startsWith('INVITE ') && m.includes(callId));
        await authenticatedInvite(edge, victim, victimGot, callId);
        await waitFor('the INVITE at the carrier', () => invites().length === 1);
        // Another CSeq, and the very CSeq of the ringing INVITE (its answers would pass
        // for the call's own): both refused.
        for (const cseq of [11, 1]) {
          await authenticatedInvite(edge, thief, thiefGot, callId, { creds: HQ, cseq });
          const refused = await waitFor(`the answer to the INVITE with CSeq ${cseq + 1}`, () => thiefGot.find((m) => /^SIP\/2\.0 [2-6]\d\d /.test(m) && m.includes(`CSeq: ${cseq + 1} INVITE`)));
          assert.match(refused, /^SIP\/2\.0 482 /);
        }
        await new Promise((resolve) => setTimeout(resolve, 300));
        assert.equal(invites().length, 1, 'the second INVITE reached the carrier');
        // The carrier answers the first INVITE and hangs up: its BYE reaches the victim.
        const first = invites()[0];
        const keep = first.split('\r\n').filter((l) => /^(Via|From|Call-ID|CSeq|Record-Route):/i.test(l));
        const to = /^To: (.*)$/mi.exec(first)[1];
        const [host, port] = edge.coreAddress.split(':');
        carrier.sock.send(['SIP/2.0 200 OK', ...keep, `To: ${to};tag=carrier-tag`, `Contact: <sip:carrier@127.0.0.1:${edge.upstreamPort}>`, 'Content-Length: 0', '', ''].join('\r\n'), Number(port), host);
        await waitFor('the 200 at the victim', () => victimGot.find((m) => /^SIP\/2\.0 200 /.test(m)));
        const routes = [...first.matchAll(/^Record-Route: (.*?)\r?$/gmi)].flatMap((m) => m[1].split(/,\s*(?=<)/));
        const from = /^From: (.*)$/mi.exec(first)[1];
        carrier.sock.send([`BYE sip:${P2P.user}@127.0.0.2:${victim.address().port} SIP/2.0`,
          `Via: SIP/2.0/UDP 127.0.0.1:${edge.upstreamPort};branch=z9hG4bK-ring-bye;rport`, `Route: ${routes.join(', ')}`,
          'Max-Forwards: 70', `From: ${to};tag=carrier-tag`, `To: ${from}`, `Call-ID: ${callId}`, 'CSeq: 1 BYE', 'Content-Length: 0', '', ''].join('\r\n'), Number(port), host);
        await waitFor('the BYE at the victim', () => victimGot.find((m) => m.startsWith('BYE ')));
        assert.equal(thiefGot.filter((m) => m.startsWith('BYE ')).length, 0, 'the BYE reached the thief');
      } finally {
        victim.close();
        thief.close();
        await carrier.close();
      }
    });

    test('attack: a CANCEL from elsewhere with a ringing INVITE\'s transaction is refused, and the caller\'s own CANCEL still reaches the carrier', TIMEOUT, async () => {
      const carrier = await watch('127.0.0.1', edge.upstreamPort);
      const pbx = await udpSocket('127.0.0.2');
      const got = [];
      pbx.on('message', (m) => got.push(m.toString('latin1')));
      try {
        const callId = `cancel-${Date.now()}@127.0.0.2`;
        const invite = await authenticatedInvite(edge, pbx, got, callId);
        await waitFor('the INVITE at the carrier', () => carrier.seen.find((m) => m.startsWith('INVITE ') && m.includes(callId)));
        // The INVITE's CANCEL (RFC 3261 §9.1: its Request-URI, Call-ID, From, To,
        // CSeq number and top Via), from the PBX or, spoofed, from 127.0.0.3.
        const cancel = invite.replace(/^INVITE /, 'CANCEL ').replace(/CSeq: (\d+) INVITE/, 'CSeq: $1 CANCEL')
          .replace(/\r\nProxy-Authorization: [^\r]*/, '').replace(/\r\nContact: [^\r]*/, '');
        const spoofed = await exchange('127.0.0.3', edge.address, cancel.replaceAll('\r\n', '\n'));
        assert.match(spoofed ?? '', /^SIP\/2\.0 481 /);
        // An OPTIONS from elsewhere with the INVITE's Call-ID, CSeq number and branch
        // is answered, and does not take the INVITE's place: until 2026-12-02 its 200
        // did, and the edge then answered the PBX's CANCEL itself.
        const options = cancel.replace(/^CANCEL /, 'OPTIONS ').replace(/CSeq: (\d+) CANCEL/, 'CSeq: $1 OPTIONS');
        assert.match(await exchange('127.0.0.3', edge.address, options.replaceAll('\r\n', '\n')) ?? '', /^SIP\/2\.0 200 /);
        const [host, port] = edge.address.split(':');
        pbx.send(cancel, Number(port), host);
        await waitFor('the PBX\'s CANCEL at the carrier', () => carrier.seen.find((m) => m.startsWith('CANCEL ') && m.includes(callId)));
        assert.equal(got.filter((m) => /^SIP\/2\.0 200 /.test(m) && /CSeq: \d+ CANCEL/.test(m)).length, 0,
          'the edge answered the PBX\'s CANCEL itself instead of passing it on');
      } finally {
        pbx.close();
        await carrier.close();
      }
    });

    test('attack: a PBX\'s CANCEL reaches the carrier with nothing of its own but what names the transaction', TIMEOUT, async () => {
      // Until 2026-12-02 the PBX's CANCEL went on as it came, with the edge's Via on
      // top: its Proxy-Authorization, an asserted identity, a Route of its own and
      // a trunk-group header reached the carrier, which the INVITE's verdict had
      // stripped. Now it is what Kamailio's tm would send: the INVITE's transaction
      // and the INVITE's Route as the edge sent it (none here).
      const carrier = await watch('127.0.0.1', edge.upstreamPort);
      const pbx = await udpSocket('127.0.0.2');
      const got = [];
      pbx.on('message', (m) => got.push(m.toString('latin1')));
      try {
        const callId = `cancel-claims-${Date.now()}@127.0.0.2`;
        const invite = await authenticatedInvite(edge, pbx, got, callId);
        await waitFor('the INVITE at the carrier', () => carrier.seen.find((m) => m.startsWith('INVITE ') && m.includes(callId)));
        const cancel = invite.replace(/^INVITE /, 'CANCEL ').replace(/CSeq: (\d+) INVITE/, 'CSeq: $1 CANCEL')
          .replace(/\r\nContact: [^\r]*/, '')
          .replace(/\r\nCall-ID: /, '\r\nP-Asserted-Identity: <sip:+19005550100@carrier.example.net>'
            + '\r\nRoute: <sip:127.0.0.1:5999;lr>\r\nX-Trunkguard-Trunk-Group: victim\r\nCall-ID: ');
        assert.match(cancel, /\r\nProxy-Authorization: /);
        const [host, port] = edge.address.split(':');
        pbx.send(cancel, Number(port), host);
        const relayed = await waitFor('the PBX\'s CANCEL at the carrier',
          () => carrier.seen.find((m) => m.startsWith('CANCEL ') && m.includes(callId)));
        for (const name of ['Proxy-Authorization', 'P-Asserted-Identity', 'Route', 'X-Trunkguard-Trunk-Group']) {
          assert.doesNotMatch(relayed, new RegExp(`\r\n${name}:`, 'i'), `${name} reached the carrier:\n${relayed}`);
        }
        for (const name of ['Via', 'From', 'To', 'Call-ID', 'CSeq', 'Max-Forwards']) {
          assert.match(relayed, new RegExp(`\r\n${name}:`, 'i'), `${name} missing:\n${relayed}`);
        }
      } finally {
        pbx.close();
        await carrier.close();
      }
    });

    test('attack: what follows an authenticated INVITE\'s Content-Length does not reach the carrier', TIMEOUT, async () => {
      // The policy reads a datagram up to its Content-Length (RFC 3261 §18.3); until
      // 2026-12-02 the edge relayed the rest with it, a second message nobody judged
      // for any hop that puts the datagram on a stream.
      const carrier = await watch('127.0.0.1', edge.upstreamPort);
      const pbx = await udpSocket('127.0.0.2');
      const got = [];
      pbx.on('message', (m) => got.push(m.toString('latin1')));
      try {
        const callId = `trailer-${Date.now()}@127.0.0.2`;
        const smuggled = `INVITE sip:+19005550100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKsm\r\n`
          + 'From: <sip:x@x>;tag=s\r\nTo: <sip:+19005550100@x>\r\nCall-ID: smuggled\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n';
        await authenticatedInvite(edge, pbx, got, callId, { trailer: smuggled });
        const invite = await waitFor('the INVITE at the carrier', () => carrier.seen.find((m) => m.startsWith('INVITE ') && m.includes(callId)));
        assert.doesNotMatch(invite, /smuggled|\+19005550100/, 'the bytes after its Content-Length went on with it');
        assert.match(invite, /\r\n\r\n$/);
      } finally {
        pbx.close();
        await carrier.close();
      }
    });

    test('the same call with the same credentials from 127.0.0.3 is refused 403, with an alert', TIMEOUT, async () => {
      const upstream = await watchUpstream(edge);
      try {
        const intruder = await uac(edge, 'stolen', 'call-refused.xml', '127.0.0.3', { creds: HQ });
        assertPassed(edge, intruder);
        const alert = await alertFor(edge, 'not_registered_address');
        assert.equal(alert.kind, 'blocked_call');
        assert.equal(alert.trunk_group, 'hq-pbx1');
        assert.match(alert.source, /^127\.0\.0\.3:\d+$/);
        assert.equal(alert.registered, `127.0.0.2:${pbxPort}`);
        const post = await waitFor('the alert to be posted', () => posted.find((p) => p.alert.id === alert.id));
        assert.equal(post.authorization, `Bearer ${TOKEN}`);
        assert.deepEqual(upstream.seen, [], 'nothing reaches the carrier');
      } finally {
        await upstream.close();
      }
    });

    test('a peer-to-peer trunk calls from 127.0.0.2, inside its access list', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier-p2p', 'uas.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'p2p', 'call.xml', '127.0.0.2', { creds: P2P });
      assertPassed(edge, pbx, await ended(carrier, pbx));
      assert.match(edge.log, /INVITE \S+: allow\s+trunk branch-p2p/);
    });

    test('the peer-to-peer trunk from 127.0.0.3 is refused 403 not_in_access_list', TIMEOUT, async () => {
      const upstream = await watchUpstream(edge);
      try {
        const intruder = await uac(edge, 'p2p-refused', 'call-refused.xml', '127.0.0.3', { creds: P2P });
        assertPassed(edge, intruder);
        const alert = await alertFor(edge, 'not_in_access_list');
        assert.equal(alert.trunk_group, 'branch-p2p');
        assert.match(alert.source, /^127\.0\.0\.3:\d+$/);
        assert.deepEqual(upstream.seen, []);
      } finally {
        await upstream.close();
      }
    });

    test('a call from the core (127.0.0.9) to a DID is routed to the registered PBX', TIMEOUT, async () => {
      const registeredPbx = await farEnd(edge, 'pbx', 'uas.xml', '127.0.0.2', pbxPort);
      const core = await uac(edge, 'inbound', 'inbound.xml', '127.0.0.9', { service: '+15551230000', to: edge.coreAddress });
      const got = assertPassed(edge, core, await ended(registeredPbx, core)).messages;
      // The Request-URI is the registered Contact; ACK and BYE come along the route set.
      assert.match(got, new RegExp(`^INVITE sip:hq1@127\\.0\\.0\\.2:${pbxPort};transport=UDP SIP/2\\.0`, 'm'));
      assert.match(got, new RegExp(`^BYE sip:127\\.0\\.0\\.2:${pbxPort};transport=UDP SIP/2\\.0`, 'm'));
      assert.match(edge.log, /INVITE \S+: route\s+registered_contact hq-pbx1/);
    });

    test('in-dialog requests outside the edge\'s dialogs are refused 404; stray responses are dropped', TIMEOUT, async () => {
      const upstream = await watchUpstream(edge);
      try {
        const request = (method, extra) => `${method} sip:${CALLED}@trunks.example.net SIP/2.0
Via: SIP/2.0/UDP 127.0.0.3:5060;branch=z9hG4bK-forged-${method};rport
Max-Forwards: 70
From: <sip:${HQ.user}@trunks.example.net>;tag=a
To: <sip:${CALLED}@trunks.example.net>;tag=forged
Call-ID: forged-${method}@127.0.0.3
CSeq: 5 ${method}
${extra}Content-Length: 0

`;
        // A To-tag makes the policy pass a request unauthenticated; the edge still refuses it.
        assert.match(await exchange('127.0.0.3', edge.address, request('INVITE', '')), /^SIP\/2\.0 404 Not Found/);
        const forgedRoute = `Route: <sip:${edge.address};lr;tg=0123456789abcdef>\n`;
        assert.match(await exchange('127.0.0.3', edge.address, request('BYE', forgedRoute)), /^SIP\/2\.0 404 Not Found/);
        const stray = `SIP/2.0 200 OK
Via: SIP/2.0/UDP ${edge.address};branch=z9hG4bKa0123456789abcdef01234567;rport
Via: SIP/2.0/UDP 127.0.0.1:${edge.upstreamPort};branch=z9hG4bK-victim
From: <sip:a@b>;tag=1
To: <sip:c@d>;tag=2
Call-ID: stray@127.0.0.3
CSeq: 1 INVITE
Content-Length: 0

`;
        assert.equal(await exchange('127.0.0.3', edge.address, stray, 800), undefined);
        assert.deepEqual(upstream.seen, [], 'nothing forged reaches the carrier');
      } finally {
        await upstream.close();
      }
    });

    // Threat model: a To tag the policy and a proxy could read differently.
    test('attack: an uncredentialed INVITE with an ambiguous To tag is refused 400', TIMEOUT, async () => {
      const upstream = await watchUpstream(edge);
      const pbx = await watch('127.0.0.2', pbxPort);
      await nothingReaches({ carrier: upstream, pbx }, async () => {
        const to = '<sip:+19005550100@carrier.example.net>';
        const forms = {
          'a bare second tag': `To: ${to};tag=a;tag\n`,
          'an empty quoted second tag': `To: ${to};tag=a;tag=""\n`,
          'a second tag in other letter case': `To: ${to};tag=a;TAG=b\n`,
          'the addr-spec form': 'To: sip:+19005550100@carrier.example.net;tag=a;tag\n',
          'a second To header, compact': `To: ${to};tag=a\nt: ${to}\n`,
          'a folded continuation line': `To: ${to};tag=a\n ;tag\n`,
        };
        for (const [form, toLines] of Object.entries(forms)) {
          const n = Object.keys(forms).indexOf(form);
          const invite = `INVITE sip:+19005550100@127.0.0.1:${edge.upstreamPort} SIP/2.0
Via: SIP/2.0/UDP 127.0.0.3:5060;branch=z9hG4bK-ambiguous-${n};rport
Max-Forwards: 70
From: <sip:anyone@127.0.0.3>;tag=x${n}
${toLines}Call-ID: ambiguous-${n}@127.0.0.3
CSeq: 1 INVITE
Contact: <sip:anyone@127.0.0.3:5060>
Content-Length: 0

`;
          assert.match(await exchange('127.0.0.3', edge.address, invite) ?? 'no answer', /^SIP\/2\.0 400 /, form);
        }
      });
    });

    // Threat model: nothing unauthenticated from the access side goes upstream.
    test('attack: out-of-dialog OPTIONS, ACK and CANCEL from anyone stay at the edge', TIMEOUT, async () => {
      const upstream = await watchUpstream(edge);
      await nothingReaches({ carrier: upstream }, async () => {
        const request = (method) => `${method} sip:+19005550100@127.0.0.1:${edge.upstreamPort} SIP/2.0
Via: SIP/2.0/UDP 127.0.0.3:5060;branch=z9hG4bK-stray-${method};rport
Max-Forwards: 70
From: <sip:anyone@127.0.0.3>;tag=s1
To: <sip:+19005550100@carrier.example.net>
Call-ID: stray-${method}@127.0.0.3
CSeq: 1 ${method}
Content-Length: 0

`;
        assert.match(await exchange('127.0.0.3', edge.address, request('OPTIONS')) ?? 'no answer', /^SIP\/2\.0 200 /, 'OPTIONS answered by the edge');
        assert.equal(await exchange('127.0.0.3', edge.address, request('ACK'), 500), undefined, 'an ACK of nothing is dropped');
        assert.match(await exchange('127.0.0.3', edge.address, request('CANCEL')) ?? 'no answer', /^SIP\/2\.0 481 /, 'a CANCEL of nothing');
      });
    });

    // Threat model: what a customer learns from its own call opens nothing later.
    test('attack: a finished call\'s route set and tags, replayed with its Call-ID or a new one, are refused 404', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier-reuse', 'uas.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'call-reuse', 'call.xml', '127.0.0.2', { creds: HQ });
      assertPassed(edge, pbx, await ended(carrier, pbx));
      // What the PBX received in the 200 OK to its INVITE: the dialog's identifiers and route set.
      const ok = pbx.messages.split(/^-{20,}.*$/m).find((m) => /message received/.test(m) && /^SIP\/2\.0 200 /m.test(m) && /^CSeq: 2 INVITE/m.test(m));
      assert.ok(ok, pbx.messages);
      const line = (name) => new RegExp(`^${name}: (.*?)\r?$`, 'mi').exec(ok)[1];
      const recordRoute = [...ok.matchAll(/^Record-Route: (.*?)\r?$/gmi)].flatMap((m) => m[1].split(/,\s*(?=<)/));
      const routes = `Route: ${recordRoute.reverse().join(', ')}\n`;
      const [from, to, callId] = [line('From'), line('To'), line('Call-ID')];
      const third = await watch('127.0.0.4', 0);
      const upstream = await watchUpstream(edge);
      await nothingReaches({ carrier: upstream, 'the third party': third }, async () => {
        const attempts = [
          ['the PBX, its call\'s Call-ID, after the BYE', '127.0.0.2', callId],
          ['the PBX, a new Call-ID', '127.0.0.2', `reuse-new@127.0.0.2`],
          ['an intruder, the call\'s Call-ID', '127.0.0.3', callId],
        ];
        for (const [who, ip, id] of attempts) {
          for (const [method, target] of [['INVITE', `sip:+19005550100@127.0.0.4:${third.port}`], ['BYE', `sip:+19005550100@127.0.0.1:${edge.upstreamPort}`]]) {
            const request = `${method} ${target} SIP/2.0
Via: SIP/2.0/UDP ${ip}:5060;branch=z9hG4bK-reuse-${method}-${ip}-${id.length};rport
${routes}Max-Forwards: 70
From: ${from}
To: ${to}
Call-ID: ${id}
CSeq: 10 ${method}
Contact: <sip:hq1@${ip}:5060>
Content-Length: 0

`;
            assert.match(await exchange(ip, edge.address, request) ?? 'no answer', /^SIP\/2\.0 404 /, `${method} from ${who}`);
          }
        }
      });
    });

    // Threat model: the core is trusted only on the socket that faces it.
    test('attack: a core address on the access socket is challenged, not routed to the PBX', TIMEOUT, async (t) => {
      if (!coreListen) return t.skip('one socket faces both sides: the core is whatever comes from core_networks (filter spoofing upstream of it)');
      const upstream = await watchUpstream(edge);
      const pbx = await watch('127.0.0.2', pbxPort);
      await nothingReaches({ carrier: upstream, pbx }, async () => {
        const invite = `INVITE sip:+15551230000@trunks.example.net SIP/2.0
Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bK-spoofed-core;rport
Max-Forwards: 70
From: <sip:+15550001111@carrier.example.net>;tag=c1
To: <sip:+15551230000@trunks.example.net>
Call-ID: spoofed-core@127.0.0.9
CSeq: 1 INVITE
Contact: <sip:core@127.0.0.9:5060>
Content-Length: 0

`;
        assert.match(await exchange('127.0.0.9', edge.address, invite) ?? 'no answer', /^SIP\/2\.0 407 /);
      });
    });

    // Threat model: the core's out-of-dialog requests go by Request-URI, but never
    // to the edge itself (it would loop until Max-Forwards ran out).
    test('the core\'s MESSAGE goes to the PBX by its Request-URI; one addressed to the edge is refused 482; REGISTER 405', TIMEOUT, async () => {
      const upstream = await watchUpstream(edge);
      const pbx = await watch('127.0.0.2', pbxPort);
      try {
        const request = (method, ruri, n) => `${method} ${ruri} SIP/2.0
Via: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bK-core-${method}-${n};rport
Max-Forwards: 70
From: <sip:+15550001111@carrier.example.net>;tag=c${n}
To: <sip:hq1@trunks.example.net>
Call-ID: core-${method}-${n}@127.0.0.9
CSeq: 1 ${method}
Content-Length: 0

`;
        await exchange('127.0.0.9', edge.coreAddress, request('MESSAGE', `sip:hq1@127.0.0.2:${pbxPort}`, 1), 300);
        await waitFor('the MESSAGE at the PBX', () => pbx.seen.length === 1);
        assert.match(pbx.seen[0], /^MESSAGE sip:hq1@127\.0\.0\.2:\d+ SIP\/2\.0\r\nVia: SIP\/2\.0\/UDP /);
        for (const [i, self] of [...new Set([edge.address, edge.coreAddress])].entries()) {
          assert.match(await exchange('127.0.0.9', edge.coreAddress, request('MESSAGE', `sip:hq1@${self}`, 2 + i)) ?? 'no answer', /^SIP\/2\.0 482 /);
        }
        assert.match(await exchange('127.0.0.9', edge.coreAddress, request('REGISTER', `sip:trunks.example.net`, 9)) ?? 'no answer', /^SIP\/2\.0 405 /);
        await new Promise((resolve) => setTimeout(resolve, 300));
        assert.deepEqual(upstream.seen, []);
        assert.equal(pbx.seen.length, 1, 'only the MESSAGE addressed to the PBX reached it');
      } finally {
        await upstream.close();
        await pbx.close();
      }
    });

    // Threat model: inside a live call, its Request-URI and Route set choose nothing.
    test('attack: in a live call, an in-dialog request goes to the other party only, and only from a party', TIMEOUT, async () => {
      const call = await handCall(edge);
      const third = await watch('127.0.0.4', 0);
      try {
        const before = call.carrier.seen.length;
        // The PBX's re-INVITE aimed at a third party reaches the carrier, and only it.
        call.pbx.send(inDialogRequest(call, 'INVITE', `sip:+19005550100@127.0.0.4:${third.port}`, '127.0.0.2', 1).replaceAll('\n', '\r\n'),
          Number(edge.address.split(':')[1]), '127.0.0.1');
        await waitFor('the re-INVITE at the carrier', () => call.carrier.seen.length === before + 1);
        assert.match(call.carrier.seen.at(-1), /^INVITE sip:\+19005550100@127\.0\.0\.4:\d+ SIP\/2\.0/);
        // The same dialog's identifiers and route set from another address: refused.
        const intruder = inDialogRequest(call, 'INVITE', `sip:+19005550100@127.0.0.4:${third.port}`, '127.0.0.3', 2);
        assert.match(await exchange('127.0.0.3', edge.address, intruder) ?? 'no answer', /^SIP\/2\.0 404 /);
        await new Promise((resolve) => setTimeout(resolve, 300));
        assert.equal(call.carrier.seen.length, before + 1, 'the intruder\'s request did not reach the carrier');
        assert.deepEqual(third.seen, [], 'nothing reached the third party');
      } finally {
        await call.close();
        await third.close();
      }
    });

    // A loose router of the carrier's follows the Route entries after the edge's: a
    // PBX within its call must not choose them (docs/policy.md, threat model).
    for (const [when, status, method] of [['answered', 200, 'INFO'], ['ringing (an early dialog)', 183, 'PRACK']]) test(`attack: in a live call ${when}, the Route entries after the edge's are the carrier's route set, whatever the PBX writes`, TIMEOUT, async () => {
      const proxy = '<sip:127.0.0.1:5199;lr;tg=carrier>';
      const elsewhere = '<sip:127.0.0.99:5199;lr>';
      const call = await handCall(edge, proxy, status);
      const routesOf = (m) => [...m.matchAll(/^Route: (.*?)\r?$/gmi)].flatMap((r) => r[1].split(/,\s*(?=<)/));
      try {
        // The carrier proxy's entry stays at the edge, which writes it on the PBX's
        // requests: the PBX learns the edge's alone (docs/kamailio.md, "Responses").
        assert.ok(!call.routeSet.includes(proxy), 'the PBX learnt the carrier proxy\'s Record-Route');
        const ours = call.routeSet;
        const sets = [[...ours, proxy], [...ours, elsewhere], [...ours, proxy, elsewhere], [...ours, elsewhere, proxy], ours,
          [...ours, proxy.replace(';lr', ';lr;maddr=127.0.0.99')]];
        for (const [n, set] of sets.entries()) {
          const before = call.carrier.seen.length;
          const info = inDialogRequest({ ...call, routes: `Route: ${set.join(', ')}\n` }, method,
            `sip:carrier@127.0.0.1:${edge.upstreamPort}`, '127.0.0.2', 20 + n);
          call.pbx.send(info.replaceAll('\n', '\r\n'), Number(edge.address.split(':')[1]), '127.0.0.1');
          await waitFor(`${method} ${n} at the carrier`, () => call.carrier.seen.length === before + 1);
          assert.deepEqual(routesOf(call.carrier.seen.at(-1)), [proxy], `sent with ${set.join(', ')}`);
        }
        // The carrier's own request: the PBX's INVITE brought no Record-Route, so none.
        const fromCarrier = [`INFO sip:pbx@127.0.0.2:${call.pbx.address().port} SIP/2.0`,
          `Via: SIP/2.0/UDP 127.0.0.1:${edge.upstreamPort};branch=z9hG4bK-carrier-info;rport`, 'Max-Forwards: 70',
          `Route: ${[...call.routeSet].reverse().concat(elsewhere).join(', ')}`,
          `From: ${call.to}`, `To: ${call.from}`, `Call-ID: ${call.callId}`, 'CSeq: 50 INFO', 'Content-Length: 0', '', ''];
        const before = call.got.length;
        // To the edge's entry facing the carrier (the last of the PBX's route set).
        const [, host, port] = /<sip:([\d.]+):(\d+)/.exec(ours.at(-1));
        call.carrier.sock.send(fromCarrier.join('\r\n'), Number(port), host);
        const info = await waitFor('the carrier\'s INFO at the PBX', () => call.got.slice(before).find((m) => /^INFO /.test(m)));
        assert.deepEqual(routesOf(info), []);
      } finally {
        await call.close();
      }
    });

    test('a refused configuration is logged with its path and the last good one stays', TIMEOUT, async () => {
      const generation = (edge.log.match(/generation (\d+) in force/g) ?? []).length;
      writeFileSync(edge.cfg, JSON.stringify(config({ broken: true, coreSockets: edge.coreSockets }), null, 2));
      const refusal = /config \S+ refused at locations\[1\]\.trunk_groups\[0\]\.acl\[0\]: [^\n]*; generation 1 stays in force/g;
      await waitFor('the file change to be noticed', () => (edge.log.match(refusal) ?? []).length >= 1);
      edge.proc.kill('SIGHUP');
      await waitFor('SIGHUP to re-read it', () => (edge.log.match(refusal) ?? []).length >= 2);
      const again = await sipp(edge, 'register-again', 'register.xml',
        ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]);
      assertPassed(edge, again);
      writeFileSync(edge.cfg, JSON.stringify(config({ coreSockets: edge.coreSockets }), null, 2));
      await waitFor('the good file to be taken', () => (edge.log.match(/generation (\d+) in force/g) ?? []).length > generation);
      assert.match(edge.log, /generation 2 in force/);
    });
  });
}

test('an exception while judging is answered 500 and nothing is forwarded', TIMEOUT, async () => {
  // A policy package whose judge() throws, loaded through TRUNKGUARD_JS.
  const stubDir = mkdtempSync(join(tmpdir(), 'tg-stub-'));
  const stub = join(stubDir, 'throwing.js');
  writeFileSync(stub, `const real = require(${JSON.stringify(join(root, 'target/js/node/trunkguard.js'))});
class TrunkPolicy extends real.TrunkPolicy { judge() { throw new Error('judge failed'); } }
module.exports = { TrunkPolicy };
`);
  const edge = await startEdge(false, { TRUNKGUARD_JS: stub });
  const upstream = await watchUpstream(edge);
  try {
    const invite = `INVITE sip:${CALLED}@trunks.example.net SIP/2.0
Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK-throws;rport
Max-Forwards: 70
From: <sip:${HQ.user}@trunks.example.net>;tag=a
To: <sip:${CALLED}@trunks.example.net>
Call-ID: throws@127.0.0.2
CSeq: 1 INVITE
Content-Length: 0

`;
    assert.match(await exchange('127.0.0.2', edge.address, invite), /^SIP\/2\.0 500 /);
    assert.match(edge.log, /judge failed; refused 500/);
    assert.deepEqual(upstream.seen, []);
  } finally {
    await upstream.close();
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
    rmSync(stubDir, { recursive: true, force: true });
  }
});

// Threat model: the edge routes by the verdict's cause, and by nothing else.
test('attack: an allow whose cause the edge does not know is refused 500 and goes nowhere', TIMEOUT, async () => {
  // A policy package whose verdicts the request itself dictates (X-Test-Verdict),
  // loaded through TRUNKGUARD_JS.
  const stubDir = mkdtempSync(join(tmpdir(), 'tg-stub-'));
  const stub = join(stubDir, 'dictated.js');
  writeFileSync(stub, `const real = require(${JSON.stringify(join(root, 'target/js/node/trunkguard.js'))});
class TrunkPolicy extends real.TrunkPolicy {
  judge(message, ...rest) {
    const dictated = /^X-Test-Verdict: (.*?)\\r?$/mi.exec(Buffer.from(message).toString('latin1'));
    return dictated ? JSON.parse(dictated[1]) : super.judge(message, ...rest);
  }
}
module.exports = { TrunkPolicy };
`);
  const edge = await startEdge(false, { TRUNKGUARD_JS: stub });
  const upstream = await watchUpstream(edge);
  try {
    await nothingReaches({ carrier: upstream }, async () => {
      const cases = [
        ['INVITE', { action: 'allow', cause: 'mystery', trunk_group: 'hq-pbx1' }, 500],
        ['OPTIONS', { action: 'allow' }, 500],
        ['INVITE', { action: 'allow', cause: 'trunk' }, 500],
        ['INVITE', { action: 'allow', cause: 'response', trunk_group: 'hq-pbx1' }, 500],
        ['ACK', { action: 'allow', cause: 'mystery', trunk_group: 'hq-pbx1' }, undefined],
        // A cause names where the request may go, whatever else the verdict holds.
        ['INVITE', { action: 'allow', cause: 'in_dialog', trunk_group: 'hq-pbx1' }, 404],
      ];
      for (const [i, [method, verdict, code]] of cases.entries()) {
        const request = `${method} sip:+19005550100@127.0.0.1:${edge.upstreamPort} SIP/2.0
Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK-dictated-${i};rport
Max-Forwards: 70
From: <sip:${HQ.user}@trunks.example.net>;tag=a
To: <sip:+19005550100@trunks.example.net>;tag=b
Call-ID: dictated-${i}@127.0.0.2
CSeq: 1 ${method}
X-Test-Verdict: ${JSON.stringify(verdict)}
Content-Length: 0

`;
        const answer = await exchange('127.0.0.2', edge.address, request, code ? 1000 : 500);
        if (code) assert.match(answer ?? 'no answer', new RegExp(`^SIP/2\\.0 ${code} `), JSON.stringify(verdict));
        else assert.equal(answer, undefined, `an ACK is never answered: ${JSON.stringify(verdict)}`);
      }
    });
  } finally {
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
    rmSync(stubDir, { recursive: true, force: true });
  }
});

// Threat model: a dialog's entry expires (--dialog-ttl after its last request).
// RFC 3261 §18.2.1: `received` is the server's to write. One the sender wrote itself,
// with a sent-by that is its own address (so the edge has no reason to add one), must
// not send the edge's answers elsewhere: a reflector with a larger answer (a 407 with
// two challenges) than the request.
test('attack: a received parameter the sender wrote does not choose where the answer goes', TIMEOUT, async () => {
  const edge = await startEdge(false);
  const victim = await watch('127.0.0.98', 0);
  let sock;
  try {
    sock = await udpSocket('127.0.0.2', victim.port);
    const answer = new Promise((resolve) => {
      sock.on('message', (m) => resolve(m.toString('latin1')));
      setTimeout(resolve, 1000);
    });
    const invite = [`INVITE sip:${CALLED}@trunks.example.net SIP/2.0`,
      `Via: SIP/2.0/UDP 127.0.0.2:${victim.port};branch=z9hG4bK-recv-1;received=127.0.0.98`, 'Max-Forwards: 70',
      'From: <sip:hq1@trunks.example.net>;tag=r1', `To: <sip:${CALLED}@trunks.example.net>`, 'Call-ID: recv-1@x',
      'CSeq: 1 INVITE', `Contact: <sip:hq1@127.0.0.2:${victim.port}>`, 'Content-Length: 0', '', ''].join('\r\n');
    const [host, port] = edge.address.split(':');
    sock.send(invite, Number(port), host);
    assert.match(await answer ?? 'no answer', /^SIP\/2\.0 407 /);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.deepEqual(victim.seen, [], 'the answer went to the received= address');
  } finally {
    sock?.close();
    await victim.close();
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
  }
});

test('attack: an in-dialog request after the dialog expired is refused 404', TIMEOUT, async () => {
  const edge = await startEdge(false, {}, ['--dialog-ttl', '1']);
  let call;
  try {
    call = await handCall(edge);
    const before = call.carrier.seen.length;
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const bye = inDialogRequest(call, 'BYE', `sip:carrier@127.0.0.1:${edge.upstreamPort}`, '127.0.0.2', 1);
    assert.match(await exchange('127.0.0.2', edge.address, bye) ?? 'no answer', /^SIP\/2\.0 404 /);
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(call.carrier.seen.length, before, 'nothing more reached the carrier');
  } finally {
    await call?.close();
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
  }
});

// Alert delivery follows the core's rule (docs/alerts.md, "Posting from a host"). A
// peer-to-peer trunk called from outside its access list raises a blocked-call alert
// at once; a one-second alert window lets the second call raise its own.
test('an alert the relay fails is posted again, same body, until taken; one it refuses is logged whole, never retried', TIMEOUT, async () => {
  const edge = await startEdge(false, {}, [], (opts) => ({ ...config(opts), alerts: { window_s: 1 } }));
  try {
    relayAnswers.push(503, 429);
    assertPassed(edge, await uac(edge, 'outside-acl', 'call-refused.xml', '127.0.0.3', { creds: P2P }));
    const retried = await alertFor(edge, 'not_in_access_list');
    const tries = await waitFor('three posts of it', () => {
      const p = posted.filter((x) => x.alert.id === retried.id);
      return p.length >= 3 && p;
    }, 15_000);
    assert.deepEqual(tries.map((p) => p.status), [503, 429, 202]);
    assert.ok(tries.every((p) => JSON.stringify(p.alert) === JSON.stringify(retried)), 'the same body each time');

    await new Promise((resolve) => setTimeout(resolve, 1100));
    relayAnswers.push(401);
    assertPassed(edge, await uac(edge, 'outside-acl-2', 'call-refused.xml', '127.0.0.3', { creds: P2P }));
    const refused = await waitFor('a second alert', () => edge.alerts.find((a) => a.cause === 'not_in_access_list' && a.id !== retried.id));
    await waitFor('its refusal in the log', () => edge.log.includes(`re-deliver by hand: ${JSON.stringify(refused)}`));
    await new Promise((resolve) => setTimeout(resolve, 2500));
    assert.deepEqual(posted.filter((x) => x.alert.id === refused.id).map((p) => p.status), [401], 'never retried');
  } finally {
    relayAnswers.length = 0;
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
  }
});

// The refusal log (docs/policy.md, "The refusal log"): `--refusal-log FILE` gets one
// `trunkguard-refusal {json}` line per refused or re-challenged request, at most
// TRUNKGUARD_REFUSAL_LOG_RATE a second, and `trunkguard-refusal-summary` lines for the rest.
const REFUSAL_RATE = 20;
function refusalLines(file) {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'latin1').split('\n').flatMap((line) => {
    const m = /^(\S+) (trunkguard-refusal(?:-summary)?) (\{.*\})$/.exec(line);
    return m ? [{ prefix: m[1], marker: m[2], text: m[3], obj: JSON.parse(m[3]) }] : [];
  });
}

async function refusalEdge() {
  const dir = mkdtempSync(join(tmpdir(), 'tg-refusals-'));
  const file = join(dir, 'refusals.log');
  const edge = await startEdge(false, { TRUNKGUARD_REFUSAL_LOG_RATE: String(REFUSAL_RATE) }, ['--refusal-log', file]);
  return { edge, file, close: () => { edge.proc.kill('SIGTERM'); rmSync(edge.dir, { recursive: true, force: true }); rmSync(dir, { recursive: true, force: true }); } };
}

test('refusal log: one line per refusal and re-challenge, none for a first challenge', TIMEOUT, async () => {
  const { edge, file, close } = await refusalEdge();
  try {
    const sock = await udpSocket('127.0.0.6');
    const got = [];
    sock.on('message', (m) => got.push(m.toString('latin1')));
    const [host, port] = edge.address.split(':');
    const send = (text) => sock.send(Buffer.from(text.replaceAll('\n', '\r\n'), 'latin1'), Number(port), host);
    const answer = (n) => waitFor(`answer ${n}`, () => got[n - 1]);
    const me = `127.0.0.6:${sock.address().port}`;
    const register = (callId, cseq, auth = '') => `REGISTER sip:${REALM} SIP/2.0
Via: SIP/2.0/UDP ${me};branch=z9hG4bK-reg-${cseq}-${callId.length};rport
Max-Forwards: 70
From: <sip:${HQ.user}@${REALM}>;tag=f
To: <sip:${HQ.user}@${REALM}>
Call-ID: ${callId}
CSeq: ${cseq} REGISTER
Contact: <sip:${HQ.user}@${me}>
${auth}Content-Length: 0

`;
    // The sender's Call-ID (a quote, a backslash, a control byte, 80 more characters)
    // comes out as printable ASCII, 64 characters at most, JSON-escaped (the policy
    // refuses the control byte: 400).
    send(register(`q"b\\n\x01-${'x'.repeat(80)}`, 1));
    assert.match(await answer(1), /^SIP\/2\.0 400 /);
    // A wrong password: its first challenge is no line, the 403 is one.
    send(register('wrong@127.0.0.6', 2));
    const challenge = await answer(2);
    assert.match(challenge, /^SIP\/2\.0 401 /);
    const nonceOf = (c) => /nonce="([^"]+)"/.exec(c)[1];
    const md5 = (x) => createHash('md5').update(x).digest('hex');
    const digest = (password, nonce) => {
      const h1 = md5(`${HQ.user}:${REALM}:${password}`);
      const response = md5(`${h1}:${nonce}:00000001:0a4f113b:auth:${md5(`REGISTER:sip:${REALM}`)}`);
      return `Authorization: Digest username="${HQ.user}", realm="${REALM}", nonce="${nonce}", uri="sip:${REALM}", response="${response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="0a4f113b"\n`;
    };
    send(register('wrong@127.0.0.6', 3, digest('not-it', nonceOf(challenge))));
    assert.match(await answer(3), /^SIP\/2\.0 403 /);
    // The right answer, on a challenge of its own (the wrong one spent its nonce),
    // taken, then replayed (same nonce and nc): challenged again, a line.
    send(register('right@127.0.0.6', 4));
    const fresh = nonceOf(await answer(4));
    send(register('right@127.0.0.6', 5, digest(HQ.password, fresh)));
    assert.match(await answer(5), /^SIP\/2\.0 200 /);
    send(register('right@127.0.0.6', 6, digest(HQ.password, fresh)));
    assert.match(await answer(6), /^SIP\/2\.0 401 /);
    sock.close();
    const lines = await waitFor('three refusal lines', () => { const l = refusalLines(file); return l.length >= 3 && l; });
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(refusalLines(file).length, 3, JSON.stringify(refusalLines(file)));
    const [garbled, bad, replay] = lines;
    for (const l of lines) {
      assert.equal(l.marker, 'trunkguard-refusal');
      assert.match(l.prefix, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.match(l.obj.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    }
    // Exactly this text: the fields in this order, none without a value (no trunk
    // group here), as every host writes it (src/refusal_log.rs).
    assert.equal(garbled.text, JSON.stringify({ time: garbled.obj.time, source: me, transport: 'udp', method: 'REGISTER',
      code: 400, cause: 'malformed', call_id: `q"b\\n-${'x'.repeat(80)}`.slice(0, 64) }));
    assert.deepEqual([bad.obj.code, bad.obj.cause, bad.obj.call_id, bad.obj.source], [403, 'bad_credentials', 'wrong@127.0.0.6', me]);
    assert.deepEqual([replay.obj.code, replay.obj.cause, replay.obj.call_id], [401, 'replayed_nonce', 'right@127.0.0.6']);
  } finally {
    close();
  }
});

test('refusal log: a flood gets at most the rate of lines a second, and summaries that add up', TIMEOUT, async () => {
  const { edge, file, close } = await refusalEdge();
  const FLOOD = 500;
  try {
    const sock = await udpSocket('127.0.0.4');
    let answers = 0;
    sock.on('message', (m) => { if (m.toString('latin1').startsWith('SIP/2.0 483 ')) answers++; });
    const [host, port] = edge.address.split(':');
    // 500 requests refused 483 (Max-Forwards 0), 50 every quarter of a second: the
    // flood spans three seconds or more, so the limit is seen to start afresh.
    const started = Date.now();
    for (let burst = 0; burst < FLOOD / 50; burst++) {
      for (let i = 0; i < 50; i++) {
        const n = burst * 50 + i;
        sock.send(`INVITE sip:${CALLED}@${REALM} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.4:${sock.address().port};branch=z9hG4bK-flood-${n};rport\r\n`
          + `Max-Forwards: 0\r\nFrom: <sip:f@${REALM}>;tag=f\r\nTo: <sip:${CALLED}@${REALM}>\r\nCall-ID: flood-${n}@127.0.0.4\r\n`
          + 'CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n', Number(port), host);
      }
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, started + 250 * (burst + 1) - Date.now())));
    }
    await waitFor('every request of the flood answered 483', () => answers >= FLOOD);
    const seconds = (Date.now() - started) / 1000;
    sock.close();
    const count = () => {
      const lines = refusalLines(file);
      const written = lines.filter((l) => l.marker === 'trunkguard-refusal');
      const summaries = lines.filter((l) => l.marker === 'trunkguard-refusal-summary');
      const leftOut = summaries.reduce((sum, l) => sum + l.obj.suppressed, 0);
      return { written, summaries, leftOut };
    };
    const { written, summaries, leftOut } = await waitFor('the summaries to account for the whole flood',
      () => { const c = count(); return c.written.length + c.leftOut >= FLOOD && c; }, 5000).catch((e) => {
      const c = count();
      throw new Error(`${e.message}: ${c.written.length} lines, summaries ${JSON.stringify(c.summaries.map((l) => l.obj))}`);
    });
    // Every refused request is a line or counted in a summary, exactly once.
    assert.equal(written.length + leftOut, FLOOD);
    assert.ok(written.every((l) => l.obj.cause === 'too_many_hops' && l.obj.code === 483));
    const perSecond = {};
    for (const l of written) perSecond[l.obj.time.slice(0, 19)] = (perSecond[l.obj.time.slice(0, 19)] ?? 0) + 1;
    assert.ok(Math.max(...Object.values(perSecond)) <= REFUSAL_RATE, JSON.stringify(perSecond));
    assert.ok(Object.values(perSecond).filter((n) => n === REFUSAL_RATE).length >= 2, JSON.stringify(perSecond));
    assert.ok(written.length <= REFUSAL_RATE * (Math.floor(seconds) + 2), `${written.length} lines in ${seconds} s`);
    // One summary a second at most.
    const stamps = summaries.map((l) => l.obj.time.slice(0, 19));
    assert.equal(new Set(stamps).size, stamps.length, JSON.stringify(stamps));
  } finally {
    close();
  }
});

// ---------------------------------------------------------------- inbound failover
// docs/policy.md, "Inbound calls": the core's call to a registered PBX goes to the
// trunk group's failover when the PBX says nothing for inbound.no_answer_ms, or gives
// a final answer the core's failsOver() accepts. fo-pbx registers from 127.0.0.61 and
// fails over to 127.0.0.62; nf-pbx (127.0.0.63) has no failover.

const FO = { user: 'fo1', password: 'fo-s3cret' };
const NF = { user: 'nf1', password: 'nf-s3cret' };
const FO_DID = '+15553330000';
const NF_DID = '+15554440000';
const FO_PBX = '127.0.0.61';
const FAILOVER = '127.0.0.62';
const NF_PBX = '127.0.0.63';
// Between sipp's INVITE retransmissions (500 and 1500 ms after the first): at 1500 a
// retransmission that the edge relays on the new branch just after the failover's INVITE
// reaches sipp's UAS after its 200, which sipp takes for an unexpected message and
// aborts on (a real UAS absorbs it, RFC 3261 §17.2.1). CI failed on that coincidence.
const NO_ANSWER_MS = 1000;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const failoverConfig = (failoverPort) => ({ coreSockets }) => ({
  realm: REALM,
  core_networks: ['127.0.0.9/32'],
  core_sockets: coreSockets,
  inbound: { no_answer_ms: NO_ANSWER_MS },
  locations: [{ id: 'fo', contacts: ['noc@example.com'], trunk_groups: [
    { id: 'fo-pbx', username: FO.user, ha1: ha1(FO), require_registration: true, dids: [FO_DID],
      failover: `sip:${FO_DID}@${FAILOVER}:${failoverPort}` },
    { id: 'nf-pbx', username: NF.user, ha1: ha1(NF), require_registration: true, dids: [NF_DID] }] }],
});

// The times (ms) of the messages of a sipp message trace that went `direction`
// ('sent' or 'received') and begin with `first`.
function sippTimes(log, direction, first) {
  return [...log.matchAll(/^-+ (\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d\.\d{3})\d*\r?\n\S+ message (sent|received)[^\n]*\n\s*\n(.*)/gm)]
    .filter((m) => m[3] === direction && m[4].startsWith(first))
    .map((m) => Date.parse(`${m[1]}T${m[2]}`));
}

const firstLines = (messages) => messages.map((m) => m.split('\r\n', 1)[0]);

// The core's INVITE for `did` from a socket on 127.0.0.9: resolves with its final
// answer (ACKed when a failure), or undefined after `ms`. With `cancelAfter`, the call
// is cancelled that long after the first 180.
async function coreInvite(edge, did, { cancelAfter, ms = 5000 } = {}) {
  const sock = await udpSocket('127.0.0.9');
  const got = [];
  sock.on('message', (m) => got.push(m.toString('latin1')));
  const [host, port] = edge.coreAddress.split(':');
  const me = `127.0.0.9:${sock.address().port}`;
  const tag = `core-${Date.now()}`;
  const request = (method, to) => [`${method} sip:${did}@${REALM} SIP/2.0`, `Via: SIP/2.0/UDP ${me};branch=z9hG4bK-${tag};rport`,
    'Max-Forwards: 70', `From: <sip:+15550001111@carrier.example.net>;tag=${tag}`, `To: ${to}`, `Call-ID: ${tag}@127.0.0.9`,
    `CSeq: 1 ${method}`, `Contact: <sip:core@${me}>`, 'Content-Length: 0', '', ''].join('\r\n');
  const send = (text) => sock.send(text, Number(port), host);
  const answer = (re) => got.find((m) => re.test(m));
  try {
    send(request('INVITE', `<sip:${did}@${REALM}>`));
    if (cancelAfter !== undefined) {
      await waitFor('the 180', () => answer(/^SIP\/2\.0 180 /));
      await pause(cancelAfter);
      send(request('CANCEL', `<sip:${did}@${REALM}>`));
      await waitFor('the 200 to the CANCEL', () => answer(/^SIP\/2\.0 200 [^]*^CSeq: 1 CANCEL/m));
    }
    const final = await waitFor('the final answer', () => answer(/^SIP\/2\.0 [2-6]\d\d [^]*^CSeq: 1 INVITE/m), ms).catch(() => undefined);
    if (final && !/^SIP\/2\.0 2/.test(final)) send(request('ACK', /^To: (.*?)\r?$/mi.exec(final)[1]));
    await pause(100);
    return final;
  } finally {
    sock.close();
  }
}

describe('inbound failover', () => {
  let edge;
  let failoverPort;
  let pbxPort;
  let nfPort;

  before(async () => {
    failoverPort = await freePort(FAILOVER);
    edge = await startEdge(true, {}, [], failoverConfig(failoverPort));
    pbxPort = await freePort(FO_PBX);
    nfPort = await freePort(NF_PBX);
    for (const [ip, port, who] of [[FO_PBX, pbxPort, FO], [NF_PBX, nfPort, NF]]) {
      assertPassed(edge, await sipp(edge, `register-${who.user}`, 'register.xml',
        ['-i', ip, '-p', String(port), '-s', who.user, '-au', who.user, '-ap', who.password, '-auth_uri', 'trunks.example.net', edge.address]));
    }
  }, TIMEOUT);

  after(() => {
    if (edge) {
      edge.proc.kill('SIGTERM');
      rmSync(edge.dir, { recursive: true, force: true });
    }
  });

  // A registered PBX played by sipp (scenario and its -key arguments), given a head start.
  async function pbxUas(name, scenario, ...args) {
    const run = sipp(edge, name, scenario, ['-i', FO_PBX, '-p', String(pbxPort), ...args]);
    await pause(300);
    return { run };
  }

  test('a PBX silent for no_answer_ms: the call goes to the failover, and completes there', TIMEOUT, async () => {
    const pbx = await watch(FO_PBX, pbxPort);
    try {
      const failover = await farEnd(edge, 'failover-silent', 'uas.xml', FAILOVER, failoverPort);
      const core = await uac(edge, 'core-silent', 'inbound.xml', '127.0.0.9', { service: FO_DID, to: edge.coreAddress });
      const got = assertPassed(edge, core, await ended(failover, core)).messages;
      assert.match(got, new RegExp(`^INVITE sip:\\${FO_DID}@${FAILOVER}:${failoverPort} SIP/2\\.0`, 'm'));
      // The call's BYE went to the failover: the dialog's callee.
      assert.match(got, /^BYE /m);
      const waited = sippTimes(got, 'received', 'INVITE ')[0] - sippTimes(core.messages, 'sent', 'INVITE ')[0];
      assert.ok(waited >= NO_ANSWER_MS - 100 && waited < NO_ANSWER_MS + 1000, `failed over after ${waited} ms`);
      assert.ok(pbx.seen.some((m) => m.startsWith(`INVITE sip:${FO.user}@${FO_PBX}:${pbxPort}`)), firstLines(pbx.seen).join('\n'));
      // No CANCEL to a PBX that never answered (RFC 3261 §9.1), nor anything else.
      assert.deepEqual(firstLines(pbx.seen).filter((l) => !l.startsWith('INVITE ')), []);
      assert.match(edge.log, new RegExp(`no response from the PBX in ${NO_ANSWER_MS} ms; to the failover`));
    } finally {
      await pbx.close();
    }
  });

  test('a 503 without Retry-After goes to the failover at once', TIMEOUT, async () => {
    const pbx = await pbxUas('pbx-503', 'uas-503.xml', '-key', 'extra', 'Server: test-pbx');
    const failover = await farEnd(edge, 'failover-503', 'uas.xml', FAILOVER, failoverPort);
    const core = await uac(edge, 'core-503', 'inbound.xml', '127.0.0.9', { service: FO_DID, to: edge.coreAddress });
    const got = assertPassed(edge, core, await ended(pbx, core), await ended(failover, core)).messages;
    const waited = sippTimes(got, 'received', 'INVITE ')[0] - sippTimes(core.messages, 'sent', 'INVITE ')[0];
    assert.ok(waited < NO_ANSWER_MS, `the 503 should fail over, not the timer (${waited} ms)`);
    assert.doesNotMatch(core.messages, /^SIP\/2\.0 (503|500) /m, 'the PBX\'s 503 never reaches the core');
  });

  test('when the failover fails too, the core gets the PBX\'s failure', TIMEOUT, async () => {
    const pbx = await pbxUas('pbx-503-then', 'uas-503.xml', '-key', 'extra', 'Server: test-pbx');
    const failover = await farEnd(edge, 'failover-486', 'uas-486.xml', FAILOVER, failoverPort);
    try {
      // The PBX's 503 (as a proxy relays one: 500), not the failover's 486.
      assert.match(await coreInvite(edge, FO_DID) ?? 'no answer', /^SIP\/2\.0 500 /);
      assertPassed(edge, await pbx.run, await failover.run);
    } finally {
      pbx.run.child.kill('SIGKILL');
      failover.run.child.kill('SIGKILL');
    }
  });

  test('a 503 with Retry-After reaches the core (as 500) and not the failover', TIMEOUT, async () => {
    const pbx = await pbxUas('pbx-503-retry', 'uas-503.xml', '-key', 'extra', 'Retry-After: 30');
    const failover = await watch(FAILOVER, failoverPort);
    await nothingReaches({ failover }, async () => {
      const final = await coreInvite(edge, FO_DID);
      // A proxy relays a 503 as 500 (RFC 3261 §16.7 step 6), as Kamailio does.
      assert.match(final ?? 'no answer', /^SIP\/2\.0 500 /);
      assertPassed(edge, await ended(pbx, { code: 0 }));
    }).finally(() => pbx.run.child.kill('SIGKILL'));
  });

  test('busy (486) reaches the core and not the failover', TIMEOUT, async () => {
    const pbx = await pbxUas('pbx-486', 'uas-486.xml');
    const failover = await watch(FAILOVER, failoverPort);
    await nothingReaches({ failover }, async () => {
      assert.match(await coreInvite(edge, FO_DID) ?? 'no answer', /^SIP\/2\.0 486 /);
      assertPassed(edge, await ended(pbx, { code: 0 }));
    }).finally(() => pbx.run.child.kill('SIGKILL'));
  });

  test('a ringing PBX is alive past no_answer_ms: no failover, and the core\'s CANCEL ends it', TIMEOUT, async () => {
    const pbx = await pbxUas('pbx-ringing', 'uas-cancel.xml');
    const failover = await watch(FAILOVER, failoverPort);
    await nothingReaches({ failover }, async () => {
      assert.match(await coreInvite(edge, FO_DID, { cancelAfter: NO_ANSWER_MS + 1000 }) ?? 'no answer', /^SIP\/2\.0 487 /);
      assertPassed(edge, await ended(pbx, { code: 0 }));
    }).finally(() => pbx.run.child.kill('SIGKILL'));
  });

  test('a PBX that rings only after the failover took the call is cancelled (RFC 3261 §9.1)', TIMEOUT, async () => {
    const pbx = await udpSocket(FO_PBX, pbxPort);
    const seen = [];
    // A UAS answers a request from its own header lines (RFC 3261 §8.2.6).
    const answer = (request, status) => [`SIP/2.0 ${status}`, ...request.split('\r\n').filter((l) => /^(Via|From|Call-ID|CSeq):/i.test(l)),
      `To: ${/^To: (.*?)\r?$/mi.exec(request)[1]};tag=pbx-late`, 'Content-Length: 0', '', ''].join('\r\n');
    let ringing;
    pbx.on('message', (m, rinfo) => {
      const text = m.toString('latin1');
      seen.push(text);
      const invite = seen.find((s) => /^INVITE /.test(s));
      if (invite && !ringing) {
        ringing = setTimeout(() => pbx.send(answer(invite, '180 Ringing'), rinfo.port, rinfo.address), NO_ANSWER_MS + 500);
      } else if (/^CANCEL /.test(text)) {
        pbx.send(answer(text, '200 OK'), rinfo.port, rinfo.address);
        pbx.send(answer(invite, '487 Request Terminated'), rinfo.port, rinfo.address);
      }
    });
    try {
      const failover = await farEnd(edge, 'failover-late', 'uas.xml', FAILOVER, failoverPort);
      const core = await uac(edge, 'core-late', 'inbound.xml', '127.0.0.9', { service: FO_DID, to: edge.coreAddress });
      assertPassed(edge, core, await ended(failover, core));
      const cancel = await waitFor('the CANCEL at the PBX', () => seen.find((m) => /^CANCEL /.test(m)));
      const branchOf = (m) => /^Via: [^\r\n]*;branch=([^;\r\n]+)/mi.exec(m)[1];
      assert.equal(branchOf(cancel), branchOf(seen.find((m) => /^INVITE /.test(m))), 'the CANCEL names the PBX\'s INVITE');
      await waitFor('the ACK of the 487', () => seen.find((m) => /^ACK /.test(m)));
      assert.doesNotMatch(core.messages, /pbx-late/, 'nothing of the PBX\'s branch reached the core');
    } finally {
      clearTimeout(ringing);
      pbx.close();
    }
  });

  test('without a failover, a silent PBX\'s call goes nowhere else', TIMEOUT, async () => {
    const pbx = await watch(NF_PBX, nfPort);
    const failover = await watch(FAILOVER, failoverPort);
    try {
      await nothingReaches({ failover }, async () => {
        // The edge gives no answer of its own: the core's transaction times out.
        assert.equal(await coreInvite(edge, NF_DID, { ms: NO_ANSWER_MS + 1000 }), undefined);
      });
      assert.ok(pbx.seen.some((m) => m.startsWith(`INVITE sip:${NF.user}@${NF_PBX}:${nfPort}`)));
    } finally {
      await pbx.close();
    }
  });
});

// ---------------------------------------------------------------- --state FILE

// The core's call to hq-pbx1 answered by a PBX socket on 127.0.0.2:pbxPort, both ends
// played here: INVITE, 200 with the edge's Record-Route (and `recordRouteBelow`, an
// entry of the PBX's own below it), ACK along the route set. Resolves with the 200 as
// the core got it and `bye()`, which hangs it up from the core and checks the PBX got it.
async function inboundHandCall(edge, pbxPort, name, { recordRouteBelow, rewrite = (answer) => answer } = {}) {
  const core = await udpSocket('127.0.0.9');
  const pbx = await udpSocket('127.0.0.2', pbxPort);
  const atCore = [];
  const atPbx = [];
  core.on('message', (m) => atCore.push(m.toString('latin1')));
  pbx.on('message', (m, rinfo) => {
    const text = m.toString('latin1');
    atPbx.push(text);
    if (/^(ACK|SIP)/.test(text)) return;
    const keep = text.split('\r\n').filter((l) => /^(Via|From|Call-ID|CSeq|Record-Route):/i.test(l));
    if (recordRouteBelow) keep.push(`Record-Route: ${recordRouteBelow}`);
    const to = /^To: (.*?)\r?$/mi.exec(text)[1];
    pbx.send(rewrite([`SIP/2.0 200 OK`, ...keep, `To: ${to}${/tag=/.test(to) ? '' : ';tag=pbx-tag'}`,
      `Contact: <sip:hq1@127.0.0.2:${pbxPort}>`, 'Content-Length: 0', '', ''].join('\r\n')), rinfo.port, rinfo.address);
  });
  const me = `127.0.0.9:${core.address().port}`;
  const callId = `${name}@127.0.0.9`;
  const [host, port] = edge.coreAddress.split(':');
  const request = (method, ruri, cseq, to, routes = []) => [`${method} ${ruri} SIP/2.0`,
    `Via: SIP/2.0/UDP ${me};branch=z9hG4bK-${name}-${method}-${cseq};rport`, ...routes.map((r) => `Route: ${r}`), 'Max-Forwards: 70',
    'From: <sip:+15550001111@carrier.example.net>;tag=core', `To: ${to}`, `Call-ID: ${callId}`,
    `CSeq: ${cseq} ${method}`, `Contact: <sip:core@${me}>`, 'Content-Length: 0', '', ''].join('\r\n');
  core.send(request('INVITE', `sip:+15551230000@${REALM}`, 1, `<sip:+15551230000@${REALM}>`), Number(port), host);
  const ok = await waitFor('the PBX\'s 200 at the core', () => atCore.find((m) => /^SIP\/2\.0 200 [^]*CSeq: 1 INVITE/m.test(m)));
  const routes = [...ok.matchAll(/^Record-Route: (.*?)\r?$/gmi)].flatMap((m) => m[1].split(/,\s*(?=<)/)).reverse();
  const to = /^To: (.*?)\r?$/mi.exec(ok)[1];
  const contact = /^Contact: <([^>]+)>/mi.exec(ok)[1];
  const sendRouted = (text) => {
    const [h, p] = /<sip:([\d.]+:\d+)/.exec(routes[0])[1].split(':');
    core.send(text, Number(p), h);
  };
  sendRouted(request('ACK', contact, 1, to, routes));
  await waitFor('the ACK at the PBX', () => atPbx.find((m) => /^ACK /.test(m)));
  return {
    ok,
    bye: async () => {
      sendRouted(request('BYE', contact, 2, to, routes));
      await waitFor('the BYE at the PBX', () => atPbx.find((m) => /^BYE /.test(m)));
      await waitFor('the 200 to the BYE at the core', () => atCore.find((m) => /^SIP\/2\.0 200 [^]*CSeq: 2 BYE/m.test(m)));
    },
    close: () => { core.close(); pbx.close(); },
  };
}

// docs/kamailio.md, "Responses": the core takes the route of its in-dialog requests
// from the Record-Route of the PBX's answer (RFC 3261 §12.1.2). Before, the PBX's
// entries reached the core as written, and one below the edge's had the core's ACK and
// BYE go first to a host the PBX chose.
test('attack: a PBX\'s Record-Route entry below the edge\'s never reaches the core; the call works through the edge', TIMEOUT, async () => {
  const edge = await startEdge(true);
  const pbxPort = await freePort('127.0.0.2');
  const elsewhere = await watch('127.0.0.99');
  let call;
  try {
    assertPassed(edge, await sipp(edge, 'register', 'register.xml',
      ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]));
    call = await inboundHandCall(edge, pbxPort, 'rr-below', { recordRouteBelow: `<sip:127.0.0.99:${elsewhere.port};lr>` });
    assert.doesNotMatch(call.ok, /127\.0\.0\.99/, 'the PBX\'s entry reached the core');
    await call.bye();
    assert.deepEqual(elsewhere.seen, [], 'something reached the PBX\'s entry');
  } finally {
    call?.close();
    await elsewhere.close();
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
  }
});

// The edge found the dialog an answer makes by the From tag and CSeq method the
// answer wrote, read its own way (the text after the last `>`, the first `;tag=`
// there): a `>` or a `;tag=` inside a quoted parameter, or `CSeq: 1 invite`, hid the
// dialog from it while the core read the INVITE's, so the PBX's own Record-Route
// reached the core as written (until 2026-12-02). It now reads them as the policy
// does, and its branch signs them: an answer naming another From tag or method than
// its INVITE's is not relayed.
test('attack: a PBX\'s answer that hides its From tag or CSeq method from a reader of its own never gives the core its Record-Route', TIMEOUT, async () => {
  const edge = await startEdge(true);
  const pbxPort = await freePort('127.0.0.2');
  const elsewhere = await watch('127.0.0.99');
  const entry = `Record-Route: <sip:127.0.0.99:${elsewhere.port};lr>`;
  const calls = [];
  try {
    assertPassed(edge, await sipp(edge, 'register', 'register.xml',
      ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]));
    const onlyEntry = (answer) => answer.replace(/^Record-Route: [^\r\n]*/mi, entry);
    for (const [name, rewrite] of [
      ['a `>` quoted after the tag', (a) => onlyEntry(a).replace(/^(From: .*;tag=core)(?=\r?$)/mi, '$1;x=">"')],
      ['a `;tag=` quoted before the tag', (a) => onlyEntry(a).replace(/^From: (.*);tag=core(?=\r?$)/mi, 'From: $1;x="a;tag=zz;";tag=core')],
    ]) {
      const call = await inboundHandCall(edge, pbxPort, `hidden-${name.length}`, { rewrite });
      calls.push(call);
      assert.doesNotMatch(call.ok, /127\.0\.0\.99/, `${name}: the PBX's entry reached the core`);
      await call.bye();
      calls.pop().close();
    }
    // `CSeq: 1 invite` is another method: the answer is no INVITE's, and goes nowhere.
    // The DID's call goes to the binding, whose port now answers this way.
    const core = await watch('127.0.0.9');
    const pbx = await udpSocket('127.0.0.2', pbxPort);
    let invited = false;
    try {
      pbx.on('message', (m, rinfo) => {
        const text = m.toString('latin1');
        if (!/^INVITE /.test(text)) return;
        invited = true;
        const keep = text.split('\r\n').filter((l) => /^(Via|From|Call-ID):/i.test(l));
        pbx.send([`SIP/2.0 200 OK`, ...keep, entry, 'CSeq: 1 invite', `To: ${/^To: (.*?)\r?$/mi.exec(text)[1]};tag=pbx-tag`,
          `Contact: <sip:hq1@127.0.0.2:${pbxPort}>`, 'Content-Length: 0', '', ''].join('\r\n'), rinfo.port, rinfo.address);
      });
      const [host, port] = edge.coreAddress.split(':');
      core.sock.send([`INVITE sip:+15551230000@${REALM} SIP/2.0`, `Via: SIP/2.0/UDP 127.0.0.9:${core.port};branch=z9hG4bK-lower;rport`,
        'Max-Forwards: 70', 'From: <sip:+15550001111@carrier.example.net>;tag=core', `To: <sip:+15551230000@${REALM}>`,
        'Call-ID: lower@127.0.0.9', 'CSeq: 1 INVITE', `Contact: <sip:core@127.0.0.9:${core.port}>`, 'Content-Length: 0', '', ''].join('\r\n'), Number(port), host);
      await waitFor('the INVITE at the PBX', () => invited);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      assert.deepEqual(core.seen.filter((m) => /127\.0\.0\.99/.test(m)), [], 'the lower-case answer reached the core with the PBX\'s entry');
    } finally {
      pbx.close();
      await core.close();
    }
    assert.deepEqual(elsewhere.seen, [], 'something reached the PBX\'s entry');
  } finally {
    for (const call of calls) call.close();
    await elsewhere.close();
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
  }
});

// The edge matched in-dialog requests by tags it read its own way (the first `;tag=`
// after the URI, even inside a quoted parameter), the carrier by RFC 3261's: a
// customer with a call of its own under a victim's Call-ID wrote its own tags in
// quoted parameters and the victim's as the real ones, and the edge relayed its BYE to
// the carrier as the victim's (until 2026-12-02).
test('attack: a BYE whose quoted parameters carry the sender\'s own tags and whose tags are another call\'s never reaches the carrier', TIMEOUT, async () => {
  const edge = await startEdge(true);
  const carrier = await watch('127.0.0.1', edge.upstreamPort);
  const victim = await udpSocket('127.0.0.2');
  const thief = await udpSocket('127.0.0.4');
  const [victimGot, thiefGot] = [[], []];
  victim.on('message', (m) => victimGot.push(m.toString('latin1')));
  thief.on('message', (m) => thiefGot.push(m.toString('latin1')));
  // The carrier answers each INVITE 200, with a To tag of its own per caller.
  carrier.sock.on('message', (m, rinfo) => {
    const text = m.toString('latin1');
    if (!/^INVITE /.test(text)) return;
    const keep = text.split('\r\n').filter((l) => /^(Via|From|Call-ID|CSeq|Record-Route):/i.test(l));
    const tag = /;tag=thief-tag/.test(/^From: .*$/mi.exec(text)[0]) ? 'thief-carrier' : 'carrier-tag';
    carrier.sock.send(['SIP/2.0 200 OK', ...keep, `To: ${/^To: (.*?)\r?$/mi.exec(text)[1]};tag=${tag}`,
      `Contact: <sip:carrier@127.0.0.1:${edge.upstreamPort}>`, 'Content-Length: 0', '', ''].join('\r\n'), rinfo.port, rinfo.address);
  });
  try {
    // hq-pbx1 registered from 127.0.0.4: the thief, a customer of its own.
    assertPassed(edge, await sipp(edge, 'register-thief', 'register.xml',
      ['-i', '127.0.0.4', '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]));
    const callId = `twice-${Date.now()}@127.0.0.2`;
    await authenticatedInvite(edge, victim, victimGot, callId);
    await waitFor('the 200 at the victim', () => victimGot.find((m) => /^SIP\/2\.0 200 /.test(m)));
    await authenticatedInvite(edge, thief, thiefGot, callId, { creds: HQ, fromTag: 'thief-tag' });
    const ok = await waitFor('the 200 at the thief', () => thiefGot.find((m) => /^SIP\/2\.0 200 /.test(m)));
    const routes = [...ok.matchAll(/^Record-Route: (.*?)\r?$/gmi)].flatMap((m) => m[1].split(/,\s*(?=<)/)).reverse();
    const ruri = `sip:${CALLED}@trunks.example.net`;
    const [host, port] = edge.address.split(':');
    const before = carrier.seen.length;
    thief.send([`BYE sip:carrier@127.0.0.1:${edge.upstreamPort} SIP/2.0`,
      `Via: SIP/2.0/UDP 127.0.0.4:${thief.address().port};branch=z9hG4bK-twice-bye;rport`, `Route: ${routes.join(', ')}`,
      'Max-Forwards: 70', `From: <sip:${HQ.user}@trunks.example.net>;x="q;tag=thief-tag;";tag=pbx-tag`,
      `To: <${ruri}>;x="q;tag=thief-carrier;";tag=carrier-tag`, `Call-ID: ${callId}`, 'CSeq: 9 BYE', 'Content-Length: 0', '', ''].join('\r\n'),
    Number(port), host);
    const answer = await waitFor('the answer to the BYE', () => thiefGot.find((m) => /^SIP\/2\.0 [2-6]\d\d /.test(m) && /CSeq: 9 BYE/.test(m)));
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.deepEqual(carrier.seen.slice(before).filter((m) => m.startsWith('BYE ')), [], 'the thief\'s BYE reached the carrier');
    assert.match(answer, /^SIP\/2\.0 404 /);
    // The victim's own BYE still ends its call at the carrier.
    victim.send([`BYE sip:carrier@127.0.0.1:${edge.upstreamPort} SIP/2.0`,
      `Via: SIP/2.0/UDP 127.0.0.2:${victim.address().port};branch=z9hG4bK-twice-vbye;rport`, `Route: ${routes.join(', ')}`,
      'Max-Forwards: 70', `From: <sip:${P2P.user}@trunks.example.net>;tag=pbx-tag`, `To: <${ruri}>;tag=carrier-tag`,
      `Call-ID: ${callId}`, 'CSeq: 3 BYE', 'Content-Length: 0', '', ''].join('\r\n'), Number(port), host);
    await waitFor('the victim\'s BYE at the carrier', () => carrier.seen.slice(before).find((m) => m.startsWith('BYE ') && /CSeq: 3 BYE/.test(m)));
  } finally {
    victim.close();
    thief.close();
    await carrier.close();
    edge.proc.kill('SIGTERM');
    rmSync(edge.dir, { recursive: true, force: true });
  }
});

test('--state: a registration and live calls outlive restarts and kill -9; a move is alerted once', { timeout: 60_000 }, async () => {
  const stateDir = mkdtempSync(join(tmpdir(), 'tg-edge-state-'));
  const stateFile = join(stateDir, 'edge-state.json');
  const edge = await startEdge(true, {}, ['--state', stateFile]);
  const pbxPort = await freePort('127.0.0.2');
  const restart = async (signal) => {
    edge.proc.kill(signal);
    await edge.exit;
    await launch(edge);
  };
  const calls = [];
  try {
    assertPassed(edge, await sipp(edge, 'register', 'register.xml',
      ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]));
    // Killed right after its 200 OK: the binding was on disk before the 200 left.
    await restart('SIGKILL');
    assert.equal(statSync(stateFile).mode & 0o777, 0o600);
    assert.match(edge.log, /state in \S+: [1-9]\d* store entries/);
    // The PBX's next call passes without registering again.
    const carrier = await farEnd(edge, 'carrier-after-restart', 'uas.xml', '127.0.0.1', edge.upstreamPort);
    const pbx = await uac(edge, 'call-after-restart', 'call.xml', '127.0.0.2', { creds: HQ });
    assertPassed(edge, pbx, await ended(carrier, pbx));
    assert.match(edge.log, /INVITE \S+: allow\s+trunk hq-pbx1/);
    // Calls set up before a restart (SIGTERM) and before a kill -9 are hung up after it.
    for (const signal of ['SIGTERM', 'SIGKILL']) {
      const call = await inboundHandCall(edge, pbxPort, `live-${signal}`);
      calls.push(call);
      await restart(signal);
      await call.bye();
      call.close();
      calls.pop();
    }
    // The registration moves: the last registration IP was kept, so the move is seen.
    assertPassed(edge, await sipp(edge, 'register-moved', 'register.xml',
      ['-i', '127.0.0.5', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, '-auth_uri', 'trunks.example.net', edge.address]));
    const moves = () => edge.alerts.filter((a) => a.kind === 'reg_ip_change');
    await waitFor('the reg_ip_change alert', () => moves().length);
    await pause(300);
    assert.equal(moves().length, 1, JSON.stringify(moves()));
    assert.deepEqual([moves()[0].old_ip, moves()[0].new_ip, moves()[0].trunk_group], ['127.0.0.2', '127.0.0.5', 'hq-pbx1']);
  } finally {
    for (const call of calls) call.close();
    edge.proc.kill('SIGKILL');
    rmSync(edge.dir, { recursive: true, force: true });
    rmSync(stateDir, { recursive: true, force: true });
  }
});
