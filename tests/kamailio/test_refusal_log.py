"""The refusal log (docs/policy.md, "The refusal log") end to end: Debian's Kamailio
running host-shims/kamailio writes one `trunkguard-refusal {json}` line per refused
request (and replayed-nonce challenge), at most TRUNKGUARD_REFUSAL_LOG_RATE a second per
worker, and `trunkguard-refusal-summary` lines for the rest; a real fail2ban-server (Debian's
fail2ban) with the shipped filter and jail (host-shims/fail2ban/) reads that log and
bans a password guesser, not the PBX whose captured answers are replayed.

  127.0.0.1  the PBX of hq-pbx1 (registers with the right password)
  127.0.0.2  a password guesser: banned by fail2ban
  127.0.0.3  right credentials of branch-p2p from outside its access list
  127.0.0.4  a flood of requests refused 483
  127.0.0.6  one wrong password (the line's format)
  127.0.0.7  messages Kamailio's parser refuses, logged with a forged refusal line
             naming 127.0.0.9: never banned

Each class its own Kamailio with one worker per listener, so one process judges each
listener's traffic: RefusalLog the KEMI shim on 127.0.0.1:5360 (core side 5380),
RefusalLogModule the native module (run --engine module) on 127.0.0.1:5362 (5382),
the same lines from either. Run by scripts/test-kamailio after
tests/kamailio/test_kamailio.py, which installs Kamailio and the extension; the script
installs fail2ban. Every wait is bounded.
"""

import calendar
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from e2e import wait_for  # noqa: E402

import sip_client as sip  # noqa: E402

# TG_KAMAILIO_SHIM_DIR runs another copy of host-shims/kamailio (with CARGO_TARGET_DIR
# naming this tree's target/), for instance one with the limit taken out, to see the
# tests fail.
RUN = os.path.join(os.environ.get("TG_KAMAILIO_SHIM_DIR") or os.path.join(ROOT, "host-shims", "kamailio"), "run")
FILTER = os.path.join(ROOT, "host-shims", "fail2ban", "filter.d", "trunkguard.conf")
JAIL = os.path.join(ROOT, "host-shims", "fail2ban", "jail.d", "trunkguard.conf")
PBX, GUESSER, OUTSIDER, FLOODER, WRONG = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.6"
# A sender of messages Kamailio's parser refuses, and the address its forged refusal
# lines name (the carrier core, say).
FORGER, FRAMED = "127.0.0.7", "127.0.0.9"
HQ = ("hq1", "s3cret")
P2P = ("branch1", "p2p-s3cret")
REALM = sip.REALM
# Below the default (20) of the shim and the module alike: the limit seen is the one
# run passed on.
RATE = 15
FLOOD = 500
# Kamailio's stderr log (run --daemon: <state>/kamailio.log), one line per message:
# ` 1(26932) NOTICE: <core> [core/kemi.c:126]: sr_kemi_core_notice(): trunkguard-refusal {...}`.
LINE = re.compile(r"^\s*\d+\((\d+)\) NOTICE: .*?: (trunkguard-refusal(?:-summary)?) (\{.*\})$")


def ha1(user, password):
    return hashlib.md5(("%s:%s:%s" % (user, REALM, password)).encode()).hexdigest()


def trunk_config(core_socket):
    return {
        "realm": REALM,
        "core_networks": ["127.0.0.9/32"],
        "core_sockets": [core_socket],
        "registration": {"min_expires": 1},
        "locations": [{"id": "hq", "contacts": ["noc@example.com"], "trunk_groups": [
            {"id": "hq-pbx1", "username": HQ[0], "ha1": ha1(*HQ), "require_registration": True,
             "dids": ["+15551230000"]},
            {"id": "branch-p2p", "username": P2P[0], "ha1": ha1(*P2P), "require_registration": False,
             "acl": ["127.0.0.5/32"], "dids": ["+15557770000"]},
        ]}],
    }


def register_request(endpoint, user, call_id, cseq=1, auth=None):
    extra = [("Contact", "<sip:%s@%s:%d>" % (user, endpoint.ip, endpoint.port)), ("Expires", "60")]
    if auth:
        extra.append(auth)
    return sip.request("REGISTER", "sip:" + REALM, from_user=user, call_id=call_id, cseq=cseq,
                       via_ip=endpoint.ip, via_port=endpoint.port, extra=extra)


def answered_register(endpoint, user, password, call_id):
    """A REGISTER answering its 401: (the answered request's bytes, the final answer)."""
    first = endpoint.final(register_request(endpoint, user, call_id))
    assert sip.status(first) == 401, first
    auth = sip.authorization(sip.header(first, "WWW-Authenticate"), "REGISTER", "sip:" + REALM, user,
                             password, "Authorization")
    data = register_request(endpoint, user, call_id, cseq=2, auth=auth)
    return data, endpoint.final(data)


class KamailioRefusalLog:
    """The lines Kamailio writes, and fail2ban reading them, with `run --engine
    ENGINE` on PORT (its core side PORT + 20, the carrier PORT + 30)."""

    ENGINE = None
    PORT = None

    @classmethod
    def setUpClass(cls):
        cls.EDGE = ("127.0.0.1", cls.PORT)
        core_socket = "127.0.0.1:%d" % (cls.PORT + 20)
        cls.workdir = tempfile.mkdtemp(prefix="tg-refusal-log-%s-" % cls.ENGINE)
        cls.state = os.path.join(cls.workdir, "state")
        cls.config = os.path.join(cls.workdir, "config.json")
        with open(cls.config, "w", encoding="utf-8") as f:
            json.dump(trunk_config(core_socket), f)
        env = dict(os.environ, TRUNKGUARD_REFUSAL_LOG_RATE=str(RATE))
        out = subprocess.run(
            [RUN, "--no-install", "--daemon", "--engine", cls.ENGINE, "--config", cls.config,
             "--listen", "127.0.0.1:%d" % cls.PORT, "--core-listen", core_socket,
             "--carrier", "sip:127.0.0.1:%d" % (cls.PORT + 30), "--state", cls.state, "--workers", "1"],
            capture_output=True, text=True, timeout=60, env=env)
        if out.returncode != 0:
            raise RuntimeError("run --daemon failed:\n%s%s" % (out.stdout, out.stderr))
        cls.log_path = os.path.join(cls.state, "kamailio.log")
        # The same lines, and nothing else: what fail2ban reads. There from the start,
        # or a jail pointing at it would not start.
        cls.refusal_path = os.path.join(cls.state, "refusal.log")
        if not os.path.exists(cls.refusal_path):
            raise AssertionError("run left no %s before the first refusal" % cls.refusal_path)

    @classmethod
    def tearDownClass(cls):
        subprocess.run([RUN, "stop", "--state", cls.state], capture_output=True, timeout=30)
        if os.environ.get("KEEP_KAMAILIO_TEST_DIR") != "1":
            shutil.rmtree(cls.workdir, ignore_errors=True)

    def log_size(self):
        return os.path.getsize(self.log_path)

    def lines(self, since=0):
        """[(pid, marker, object, text)] of the refusal log, from byte `since` on."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("latin-1")
        out = []
        for line in text.splitlines():
            m = LINE.match(line)
            if m:
                out.append((m.group(1), m.group(2), json.loads(m.group(3)), m.group(3)))
        return out

    def refusals(self, since=0, **match):
        return [obj for _, marker, obj, _ in self.lines(since)
                if marker == "trunkguard-refusal" and all(obj.get(k) == v for k, v in match.items())]

    def endpoint(self, ip):
        ep = sip.Endpoint(ip, server=self.EDGE)
        self.addCleanup(ep.close)
        return ep

    # --- the lines Kamailio writes ------------------------------------------------

    def test_2_each_refusal_and_rechallenge_is_one_line_a_first_challenge_none(self):
        since = self.log_size()
        # A Call-ID's quote, backslash and control byte, and its length, are the
        # sender's: the line keeps printable ASCII, 64 characters at most, JSON-escaped
        # (the policy refuses the control byte: 400).
        wrong = self.endpoint(WRONG)
        hostile = sip.request("INVITE", "sip:+15559876543@" + REALM, from_user="x", call_id='q"b\\n\x01-' + "x" * 80,
                              via_ip=WRONG, via_port=wrong.port)
        self.assertEqual(sip.status(wrong.final(hostile)), 400)
        # A wrong password: the first challenge is not logged, the 403 is, once.
        _, answer = answered_register(wrong, HQ[0], "not-it", "wrong@127.0.0.6")
        self.assertEqual(sip.status(answer), 403, answer)
        # Right credentials outside the trunk group's access list: its trunk group.
        outsider = self.endpoint(OUTSIDER)
        _, answer = answered_register(outsider, P2P[0], P2P[1], "outside@127.0.0.3")
        self.assertEqual(sip.status(answer), 403, answer)
        # The PBX registers; its answer replayed (same nonce and nc) is challenged again.
        pbx = self.endpoint(PBX)
        data, answer = answered_register(pbx, HQ[0], HQ[1], "pbx-reg@127.0.0.1")
        self.assertEqual(sip.status(answer), 200, answer)
        self.assertEqual(sip.status(pbx.final(data)), 401)

        lines = wait_for("four refusal lines", lambda: len(self.refusals(since)) >= 4 and self.lines(since))
        mine = [(obj, text) for _, marker, obj, text in lines if marker == "trunkguard-refusal"]
        self.assertEqual(len(mine), 4, lines)
        (garbled, garbled_text), (bad, _), (acl, _), (replay, _) = mine
        # Exactly this text: the fields in this order, none without a value (no trunk
        # group here), as every host writes it (src/refusal_log.rs).
        cleaned = ('q"b\\n-' + "x" * 80)[:64]
        self.assertEqual(garbled_text, json.dumps({
            "time": garbled["time"], "source": "%s:%d" % (WRONG, wrong.port), "transport": "udp",
            "method": "INVITE", "code": 400, "cause": "malformed", "call_id": cleaned}, separators=(",", ":")))
        self.assertEqual((bad["source"], bad["method"], bad["code"], bad["cause"], bad.get("trunk_group"),
                          bad["call_id"]),
                         ("%s:%d" % (WRONG, wrong.port), "REGISTER", 403, "bad_credentials", None, "wrong@127.0.0.6"))
        self.assertRegex(bad["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        logged = calendar.timegm(time.strptime(bad["time"][:19], "%Y-%m-%dT%H:%M:%S"))
        self.assertLess(abs(time.time() - logged), 60, "the line's time is UTC and now")
        self.assertEqual((acl["source"], acl["code"], acl["cause"], acl["trunk_group"], acl["call_id"]),
                         ("%s:%d" % (OUTSIDER, outsider.port), 403, "not_in_access_list", "branch-p2p",
                          "outside@127.0.0.3"))
        self.assertEqual((replay["source"], replay["code"], replay["cause"], replay["method"]),
                         ("%s:%d" % (PBX, pbx.port), 401, "replayed_nonce", "REGISTER"))

    # --- fail2ban -------------------------------------------------------------------

    def fail2ban(self):
        """A fail2ban-server in the foreground with its own configuration, socket, pid
        and database under the test's directory: Debian's jail.conf and paths, the
        shipped filter and jail, and a jail.local that points it at this Kamailio's log
        and bans by writing the address to a file (no firewall)."""
        base = os.path.join(self.workdir, "fail2ban")
        conf = os.path.join(base, "conf")
        os.makedirs(os.path.join(conf, "filter.d"))
        os.makedirs(os.path.join(conf, "action.d"))
        os.makedirs(os.path.join(conf, "jail.d"))
        for name in os.listdir("/etc/fail2ban"):
            if name == "jail.conf" or name.startswith("paths-"):
                shutil.copy(os.path.join("/etc/fail2ban", name), conf)
        shutil.copy(FILTER, os.path.join(conf, "filter.d"))
        shutil.copy(JAIL, os.path.join(conf, "jail.d"))
        banned = os.path.join(base, "banned")
        with open(os.path.join(conf, "fail2ban.conf"), "w", encoding="utf-8") as f:
            f.write("[Definition]\nloglevel = INFO\nlogtarget = %s\nsocket = %s\npidfile = %s\n"
                    "dbfile = %s\ndbpurgeage = 1d\n" % (os.path.join(base, "fail2ban.log"),
                                                      os.path.join(base, "fail2ban.sock"),
                                                      os.path.join(base, "fail2ban.pid"),
                                                      os.path.join(base, "fail2ban.sqlite3")))
        with open(os.path.join(conf, "action.d", "record.conf"), "w", encoding="utf-8") as f:
            f.write("[Definition]\nactionstart =\nactionstop =\nactioncheck =\n"
                    "actionban = echo <ip> >> %s\nactionunban =\n" % banned)
        # The shipped jail as it is, but for where it reads (run's refusal log, as the
        # jail's comment says), how, and what a ban does; nothing is ignored, so the
        # PBX stays unbanned by the filter's doing alone.
        with open(os.path.join(conf, "jail.local"), "w", encoding="utf-8") as f:
            f.write("[trunkguard]\nlogpath = %s\nbackend = polling\nbanaction = record\n"
                    "ignoreip =\nignoreself = false\n" % self.refusal_path)
        sock = os.path.join(base, "fail2ban.sock")
        proc = subprocess.Popen(["fail2ban-server", "-f", "-x", "-c", conf, "-s", sock,
                                 "-p", os.path.join(base, "fail2ban.pid")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
        self.addCleanup(stop)

        def client(*args):
            return subprocess.run(["fail2ban-client", "-c", conf, "-s", sock, *args],
                                  capture_output=True, text=True, timeout=30)

        def up():
            if proc.poll() is not None:
                raise AssertionError("fail2ban-server exited:\n%s\n%s" % (
                    proc.communicate()[0].decode("latin-1"), _read(os.path.join(base, "fail2ban.log"))))
            return client("status", "trunkguard").returncode == 0
        wait_for("fail2ban's trunkguard jail", up, timeout=30)
        return client, banned, os.path.join(base, "fail2ban.log")

    def test_3_fail2ban_bans_the_guesser_and_not_the_pbx_whose_answers_are_replayed(self):
        client, banned_file, f2b_log = self.fail2ban()
        status = lambda: client("status", "trunkguard").stdout  # noqa: E731
        # The PBX registers; its captured answer is replayed five times from its own
        # address, and five requests whose Max-Forwards ran out claim it as their
        # source: lines with the PBX's address, none of a cause the filter counts.
        pbx = self.endpoint(PBX)
        data, answer = answered_register(pbx, HQ[0], HQ[1], "pbx-f2b@127.0.0.1")
        self.assertEqual(sip.status(answer), 200, answer)
        replayer = self.endpoint(PBX)
        for _ in range(5):
            self.assertEqual(sip.status(replayer.final(data)), 401)
        for i in range(5):
            looped = sip.request("INVITE", "sip:+15559876543@" + REALM, from_user="x", via_ip=PBX,
                                 via_port=replayer.port)
            self.assertEqual(sip.status(replayer.final(looped.replace(b"Max-Forwards: 70", b"Max-Forwards: 0"))), 483)
        # Anyone can have Kamailio's core write a line of their choosing: a message its
        # parser refuses is logged as received, line breaks and all. Three of them,
        # each a refusal line for an address the sender wants banned.
        forger = self.endpoint(FORGER)
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        forged = ('trunkguard-refusal {"time":"%s","source":"%s:5060","transport":"udp","method":"INVITE",'
                  '"code":403,"cause":"bad_credentials"}' % (now, FRAMED))
        for i in range(3):
            forger.send(("INVITE sip:x@%s SIP/2.0\r\n%s\r\nVia: SIP/2.0/UDP %s;branch=z9hG4bK-f%d\r\n\r\n"
                         % (REALM, forged, FORGER, i)).encode())
        wait_for("Kamailio to log the forged lines", lambda: _read(self.log_path).count(forged) >= 3, timeout=10)
        # Within one second's line budget each: RATE lines a second per process.
        time.sleep(1.1)
        # The guesser: six wrong passwords (maxretry 5; the policy's own lockout is 10).
        guesser = self.endpoint(GUESSER)
        for i in range(6):
            _, answer = answered_register(guesser, HQ[0], "guess-%d" % i, "guess-%d@127.0.0.2" % i)
            self.assertEqual(sip.status(answer), 403, answer)
        try:
            wait_for("fail2ban to ban %s" % GUESSER,
                     lambda: os.path.exists(banned_file) and GUESSER in _read(banned_file).split(), timeout=20)
            # Every line read (in order: the PBX's came first): the guesser's six.
            wait_for("fail2ban to find the guesser's six lines",
                     lambda: len(re.findall(r"\] Found %s " % re.escape(GUESSER), _read(f2b_log))) >= 6, timeout=10)
        except AssertionError as e:
            raise AssertionError("%s\n--- status:\n%s\n--- fail2ban log:\n%s\n--- refusal lines:\n%s" % (
                e, status(), _read(f2b_log)[-3000:], "\n".join(t for *_, t in self.lines()[-30:])))
        self.assertRegex(status(), r"Banned IP list:\s+%s\s*$" % re.escape(GUESSER))
        self.assertEqual(_read(banned_file).split(), [GUESSER])
        # The refusal log holds the module's or the shim's lines alone, the ones
        # Kamailio's own log has, and none of the forged ones.
        kept = _read(self.refusal_path).splitlines()
        ours = {marker + " " + text for _, marker, _, text in self.lines()}
        self.assertNotIn(forged, kept)
        self.assertEqual([k for k in kept if k not in ours], [])
        self.assertEqual(len([k for k in kept if '"source":"%s:' % GUESSER in k]), 6, kept)
        self.assertEqual(len(re.findall(r"\] Found %s " % re.escape(GUESSER), _read(f2b_log))), 6)
        self.assertNotRegex(_read(f2b_log), r"\] Found %s " % re.escape(PBX))
        # The PBX's replayed-answer and malformed lines are in the log, unbanned.
        self.assertGreaterEqual(len([o for o in self.refusals(cause="replayed_nonce")
                                     if o["source"].startswith(PBX + ":")]), 5)
        self.assertGreaterEqual(len([o for o in self.refusals(cause="too_many_hops")
                                     if o["source"].startswith(PBX + ":")]), 5)

    # --- the rate limit -------------------------------------------------------------

    def test_4_a_flood_gets_at_most_the_rate_of_lines_a_second_and_summaries_that_add_up(self):
        since = self.log_size()
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(flood.close)
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        flood.bind((FLOODER, 0))
        port = flood.getsockname()[1]
        answers = 0

        def drain(block):
            nonlocal answers
            flood.settimeout(block)
            try:
                while True:
                    if flood.recv(65535).startswith(b"SIP/2.0 483 "):
                        answers += 1
            except (BlockingIOError, socket.timeout):
                pass
        # 500 requests refused 483 (Max-Forwards 0), 50 every quarter of a second: the
        # flood spans three seconds or more, so the limit is seen to start afresh.
        started = time.monotonic()
        for burst in range(FLOOD // 50):
            for i in range(50):
                n = burst * 50 + i
                data = sip.request("INVITE", "sip:+15559876543@" + REALM, from_user="f",
                                   call_id="flood-%d@127.0.0.4" % n, via_ip=FLOODER, via_port=port)
                flood.sendto(data.replace(b"Max-Forwards: 70", b"Max-Forwards: 0"), self.EDGE)
            drain(0)
            time.sleep(max(0.0, started + 0.25 * (burst + 1) - time.monotonic()))
        deadline = time.monotonic() + 10
        while answers < FLOOD and time.monotonic() < deadline:
            drain(0.5)
        self.assertEqual(answers, FLOOD, "every request of the flood answered 483")
        # A worker writes the summary of its last flooded second with its next request
        # in a later second (only it holds the count): a keepalive, as PBXs send.
        time.sleep(1.1)
        keepalive = sip.request("OPTIONS", "sip:" + REALM, from_user="f", via_ip=FLOODER, via_port=port)
        flood.sendto(keepalive, self.EDGE)

        def settled():
            lines = self.lines(since)
            written = [obj for _, marker, obj, _ in lines if marker == "trunkguard-refusal"]
            left_out = sum(obj["suppressed"] for _, marker, obj, _ in lines if marker == "trunkguard-refusal-summary")
            return (lines, written, left_out) if len(written) + left_out >= FLOOD else None
        try:
            lines, written, left_out = wait_for("the summaries to account for the whole flood", settled, timeout=10)
        except AssertionError as e:
            lines = self.lines(since)
            raise AssertionError("%s: %d lines, summaries %s" % (
                e, len([1 for _, m, _, _ in lines if m == "trunkguard-refusal"]),
                [o for _, m, o, _ in lines if m == "trunkguard-refusal-summary"]))
        # Every refused request is a line or counted in a summary, exactly once.
        self.assertEqual(len(written) + left_out, FLOOD)
        self.assertTrue(all(o["cause"] == "too_many_hops" and o["code"] == 483 for o in written), written[:3])
        # At most RATE lines per process in each second, and the limit was reached in
        # at least two seconds (it starts afresh each second).
        per_second = {}
        for pid, marker, obj, _ in lines:
            if marker == "trunkguard-refusal":
                key = (pid, obj["time"][:19])
                per_second[key] = per_second.get(key, 0) + 1
        self.assertLessEqual(max(per_second.values()), RATE, per_second)
        self.assertGreaterEqual(sum(1 for n in per_second.values() if n == RATE), 2, per_second)
        seconds = time.monotonic() - started
        self.assertLessEqual(len(written), RATE * (int(seconds) + 2), (len(written), seconds))
        # One summary a second at most.
        summaries = [obj["time"][:19] for _, marker, obj, _ in lines if marker == "trunkguard-refusal-summary"]
        self.assertEqual(len(summaries), len(set(summaries)), summaries)
        self.assertLessEqual(len(summaries), int(seconds) + 12)


class RefusalLog(KamailioRefusalLog, unittest.TestCase):
    """With the KEMI shim (run's default engine); and the shipped filter alone."""

    ENGINE = "shim"
    PORT = 5360

    # --- the filter alone ---------------------------------------------------------

    def test_1_the_shipped_filter_takes_the_source_ipv4_and_ipv6_and_only_proven_causes(self):
        def line(source, cause, call_id="c@x", trunk_group=None, method="REGISTER",
                 prefix=" 5(4242) NOTICE: <core> [core/kemi.c:126]: sr_kemi_core_notice(): "):
            # As src/refusal_log.rs renders it: a field without a value is left out.
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            fields = {"time": now, "source": source, "transport": "udp", "method": method, "code": 403,
                      "cause": cause, "trunk_group": trunk_group, "call_id": call_id}
            return prefix + "trunkguard-refusal " + json.dumps(
                {k: v for k, v in fields.items() if v is not None}, separators=(",", ":"))
        sample = [
            line("[2001:db8::7]:5060", "bad_credentials"),
            # The Node.js edge's prefix, and Envoy's.
            line("203.0.113.7:5060", "not_registered_address", trunk_group="hq-pbx1",
                 prefix="2026-11-30T11:00:00.000Z "),
            line("[::1]:5070", "bad_credentials", method='IN"VITE', call_id=None,
                 prefix="[2026-11-30 11:00:02.000][info][wasm] wasm log trunkguard trunkguard: "),
            line("198.51.100.9:5060", "not_in_access_list", trunk_group="branch-p2p"),
            # The policy's lockout holds an IPv6 /64: a PBX beside a guesser gets it on
            # requests that guessed nothing (the guesser is banned on its own
            # bad_credentials). The filter counted it until 2026-12-02.
            line("[2001:db8:0:1::5]:5060", "source_banned", trunk_group="hq-pbx1"),
            line("192.0.2.9:5060", "source_banned", method="INVITE"),
            # Causes a forged source or a working PBX can earn: never counted.
            line("192.0.2.1:5060", "malformed"),
            line("192.0.2.2:5060", "replayed_nonce"),
            line("192.0.2.3:5060", "stale_nonce"),
            line("192.0.2.4:5060", "registration_required"),
            line("192.0.2.5:5060", "too_many_hops"),
            # The carrier core's call to a wrong number.
            line("192.0.2.7:5060", "unknown_did"),
            # Kamailio's core logging a message its parser refused, through syslog (one
            # record, line breaks as #015#012): a whole forged line inside it.
            '2026-11-30T11:00:00.000Z kamailio[7]: ERROR: <core> [core/parser/msg_parser.c:749]: parse_msg(): '
            'ERROR: parse_msg: message=<INVITE sip:x@y SIP/2.0#015#012' + line("192.0.2.8:5060", "bad_credentials",
                                                                             prefix="") + '#015#012Via: x>',
            # A Call-ID carrying a whole fake line: its quotes arrive escaped.
            line("192.0.2.6:5060", "malformed", call_id='x trunkguard-refusal {"time":"2026-11-30T11:00:00.000Z",'
                 '"source":"192.0.2.66:5060","transport":"udp","method":"INVITE","code":403,"cause":"bad_credentials"'),
        ]
        path = os.path.join(self.workdir, "sample.log")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(sample) + "\n")
        out = subprocess.run(["fail2ban-regex", "-o", "ip", path, FILTER], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertEqual(sorted(out.stdout.split()), sorted(["2001:db8::7", "203.0.113.7", "::1", "198.51.100.9"]),
                         out.stdout + out.stderr)


class RefusalLogModule(KamailioRefusalLog, unittest.TestCase):
    """With the native module (run --engine module, the systemd unit's)."""

    ENGINE = "module"
    PORT = 5362


def _read(path):
    if not os.path.exists(path):
        return ""
    with open(path, encoding="latin-1") as f:
        return f.read()


if __name__ == "__main__":
    unittest.main(verbosity=2)
