// The Node.js SIP edge (host-shims/node/edge.js) on loopback, driven by sipp
// (Debian's sip-tester; scripts/test-js installs it): a PBX registers and calls
// through it to a sipp carrier, stolen credentials and a peer-to-peer trunk outside
// its access list are refused with alerts, the core's call is routed to the
// registered PBX. Run once with one socket and once with a separate core socket.
// 127.0.0.x addresses are distinct sources here: .2 the PBX, .3 an intruder, .9 the
// carrier core.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import { createServer } from 'node:http';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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

function config({ broken = false } = {}) {
  return {
    realm: REALM,
    core_networks: ['127.0.0.9/32'],
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
      posted.push({ authorization: req.headers.authorization, alert: JSON.parse(body) });
      res.writeHead(202, { 'content-type': 'application/json' }).end('{"status":"queued"}');
    });
  });
  await new Promise((resolve) => alertServer.listen(0, '127.0.0.1', resolve));
  alertsUrl = `http://127.0.0.1:${alertServer.address().port}/v1/alerts`;
});

after(() => {
  killAll();
  alertServer?.close();
});

async function startEdge(coreListen, env = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'tg-edge-'));
  const cfg = join(dir, 'config.json');
  writeFileSync(cfg, JSON.stringify(config(), null, 2));
  writeFileSync(join(dir, 'token'), `${TOKEN}\n`);
  const upstreamPort = await freePort('127.0.0.1');
  const args = [join(root, 'host-shims/node/edge.js'), '--config', cfg, '--listen', '127.0.0.1:0',
    '--upstream', `127.0.0.1:${upstreamPort}`, '--alerts-url', alertsUrl, '--alerts-token-file', join(dir, 'token'), '--verbose'];
  if (coreListen) args.push('--core-listen', '127.0.0.1:0');
  const proc = start(process.execPath, args, { env: { ...process.env, ...env } });
  const edge = { proc, dir, cfg, upstreamPort, log: '', alerts: [] };
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
  const child = start(SIPP, ['-sf', join(root, 'tests/node/sipp', scenario), '-m', '1', '-nostdin', '-bind_local',
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

// Records what reaches the upstream port while nothing else listens there.
async function watchUpstream(edge) {
  const sock = await udpSocket('127.0.0.1', edge.upstreamPort);
  const seen = [];
  sock.on('message', (m) => seen.push(m.toString('latin1')));
  return { seen, close: () => new Promise((resolve) => sock.close(resolve)) };
}

function uac(edge, name, scenario, ip, { creds, service = CALLED, to = edge.address } = {}) {
  const args = ['-i', ip, '-s', service];
  if (creds) args.push('-key', 'user', creds.user, '-au', creds.user, '-ap', creds.password);
  return sipp(edge, name, scenario, [...args, to]);
}

const alertFor = (edge, cause) => waitFor(`an alert with cause ${cause}`, () => edge.alerts.find((a) => a.cause === cause));

// Sends one datagram from ip and returns the first answer (or undefined).
async function exchange(ip, to, text, ms = 1500) {
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
        ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, edge.address]);
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
      const recorded = [...invite.matchAll(/^Record-Route: <sip:([\d.:]+);lr;tg=[0-9a-f]{16}>/gm)].map((m) => m[1]);
      assert.deepEqual(recorded, coreListen ? [edge.coreAddress, edge.address] : [edge.address]);
      assert.doesNotMatch(got, /Proxy-Authorization/, 'credentials for our realm are consumed by the edge');
      assert.match(got, /^BYE /m);
      assert.match(edge.log, /ACK absorbed \(it acknowledges our 407\)/);
    });

    test('a CANCEL and the ACK of the 487 follow the INVITE to the carrier', TIMEOUT, async () => {
      const carrier = await farEnd(edge, 'carrier-cancel', 'uas-cancel.xml', '127.0.0.1', edge.upstreamPort);
      const pbx = await uac(edge, 'cancel', 'cancel.xml', '127.0.0.2', { creds: HQ });
      const got = assertPassed(edge, pbx, await ended(carrier, pbx)).messages;
      const branches = [...got.matchAll(/^(?:INVITE|CANCEL|ACK) [^\n]*\n(?:[^\n]*\n)*?Via: SIP\/2\.0\/UDP [^;]+;branch=(\w+)/gm)].map((m) => m[1]);
      assert.equal(branches.length, 3, got);
      assert.equal(new Set(branches).size, 1, `INVITE, CANCEL and ACK must share the edge's branch: ${branches}`);
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
      assert.match(edge.log, /INVITE \S+: allow\s+branch-p2p/);
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

    test('in-dialog requests off the edge\'s route sets are refused 404; stray responses are dropped', TIMEOUT, async () => {
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
        assert.match(await exchange('127.0.0.3', edge.address, request('INVITE', '')), /^SIP\/2\.0 404 Not Found \(no route set\)/);
        const forgedRoute = `Route: <sip:${edge.address};lr;tg=0123456789abcdef>\n`;
        assert.match(await exchange('127.0.0.3', edge.address, request('BYE', forgedRoute)), /^SIP\/2\.0 404 Not Found \(route set not issued/);
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

    test('a refused configuration is logged with its path and the last good one stays', TIMEOUT, async () => {
      const generation = (edge.log.match(/generation (\d+) in force/g) ?? []).length;
      writeFileSync(edge.cfg, JSON.stringify(config({ broken: true }), null, 2));
      const refusal = /config \S+ refused at locations\[1\]\.trunk_groups\[0\]\.acl\[0\]: [^\n]*; generation 1 stays in force/g;
      await waitFor('the file change to be noticed', () => (edge.log.match(refusal) ?? []).length >= 1);
      edge.proc.kill('SIGHUP');
      await waitFor('SIGHUP to re-read it', () => (edge.log.match(refusal) ?? []).length >= 2);
      const again = await sipp(edge, 'register-again', 'register.xml',
        ['-i', '127.0.0.2', '-p', String(pbxPort), '-s', HQ.user, '-au', HQ.user, '-ap', HQ.password, edge.address]);
      assertPassed(edge, again);
      writeFileSync(edge.cfg, JSON.stringify(config(), null, 2));
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
