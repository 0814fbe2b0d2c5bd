"""A small SIP client for the Kamailio end-to-end tests: sends one request from a
chosen loopback address over UDP or TCP and collects the answers, and answers a digest
challenge (MD5, qop=auth) the way a PBX does. sipp drives the call flows; this covers
what sipp cannot express (chosen expiry, binary bodies, garbage, exact status checks).
"""

import hashlib
import os
import re
import socket
import threading
import time

REALM = "trunks.example.net"


def request(method, ruri, *, from_user, to_user=None, call_id=None, cseq=1, via_ip="127.0.0.2",
            via_port=5060, transport="UDP", extra=(), body=b"", to_tag=None):
    """The bytes of one request; `extra` are (name, value) headers."""
    call_id = call_id or "%s-%s@%s" % (method.lower(), os.urandom(6).hex(), via_ip)
    to = "<sip:%s@%s>" % (to_user or from_user, REALM)
    if to_tag:
        to += ";tag=" + to_tag
    lines = [
        "%s %s SIP/2.0" % (method, ruri),
        "Via: SIP/2.0/%s %s:%d;branch=z9hG4bK%s;rport" % (transport, via_ip, via_port, os.urandom(8).hex()),
        "Max-Forwards: 70",
        "From: <sip:%s@%s>;tag=%s" % (from_user, REALM, os.urandom(4).hex()),
        "To: " + to,
        "Call-ID: " + call_id,
        "CSeq: %d %s" % (cseq, method),
    ]
    lines += ["%s: %s" % h for h in extra]
    lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Endpoint:
    """One socket bound to `ip` (a distinct loopback source)."""

    def __init__(self, ip, transport="udp", server=("127.0.0.1", 5060), port=0):
        self.transport = transport
        self.server = server
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        if transport == "tcp":
            self.sock.settimeout(5)
            self.sock.connect(server)
        self.ip, self.port = self.sock.getsockname()
        self.pending = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def recv(self, timeout=3.0):
        """The next SIP message, or None when nothing came in time."""
        deadline = time.monotonic() + timeout
        while True:
            if self.transport == "tcp":
                message = self._frame()
                if message is not None:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except (socket.timeout, ConnectionResetError):
                return None
            if self.transport == "udp":
                return data.decode("latin-1")
            if not data:
                return None
            self.pending += data

    def _frame(self):
        head, sep, rest = self.pending.partition(b"\r\n\r\n")
        if not sep:
            return None
        m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
        length = int(m.group(1)) if m else 0
        if len(rest) < length:
            return None
        self.pending = rest[length:]
        return (head + sep + rest[:length]).decode("latin-1")

    def final(self, data, timeout=3.0):
        """Sends `data` and returns the first final (>= 200) response, or None."""
        self.send(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.recv(deadline - time.monotonic())
            if answer is None:
                return None
            if status(answer) >= 200:
                return answer
        return None


def status(message):
    m = re.match(r"SIP/2\.0 (\d{3})", message or "")
    return int(m.group(1)) if m else 0


def header(message, name):
    m = re.search(r"(?im)^%s\s*:\s*(.*?)\r?$" % re.escape(name), message or "")
    return m.group(1) if m else None


# Requests sent with each nonce: a client counts them per nonce (RFC 7616 §3.4), and
# the edge refuses a nonce count it has seen (replayed_nonce).
_NONCE_COUNTS = {}


def authorization(challenge, method, uri, user, password, header_name):
    """The Authorization/Proxy-Authorization header answering an MD5 challenge."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.split(" ", 1)[1]))
    ha1 = hashlib.md5(("%s:%s:%s" % (user, params["realm"], password)).encode()).hexdigest()
    ha2 = hashlib.md5(("%s:%s" % (method, uri)).encode()).hexdigest()
    _NONCE_COUNTS[params["nonce"]] = _NONCE_COUNTS.get(params["nonce"], 0) + 1
    cnonce, nc = os.urandom(4).hex(), "%08x" % _NONCE_COUNTS[params["nonce"]]
    response = hashlib.md5(("%s:%s:%s:%s:auth:%s" % (ha1, params["nonce"], nc, cnonce, ha2)).encode()).hexdigest()
    value = ('Digest username="%s", realm="%s", nonce="%s", uri="%s", response="%s", algorithm=MD5, '
             'qop=auth, nc=%s, cnonce="%s"' % (user, params["realm"], params["nonce"], uri, response, nc, cnonce))
    if "opaque" in params:
        value += ', opaque="%s"' % params["opaque"]
    return (header_name, value)


def register(endpoint, user, password, expires, contact_port=None):
    """REGISTER with digest from `endpoint`; returns the final answer."""
    port = contact_port or endpoint.port
    uri = "sip:" + REALM
    contact = ("Contact", "<sip:%s@%s:%d;transport=%s>" % (user, endpoint.ip, port, endpoint.transport))
    base = dict(from_user=user, via_ip=endpoint.ip, via_port=port, transport=endpoint.transport.upper())
    call_id = "reg-%s@%s" % (os.urandom(6).hex(), endpoint.ip)
    first = endpoint.final(request("REGISTER", uri, call_id=call_id, extra=[contact, ("Expires", str(expires))], **base))
    if status(first) != 401:
        return first
    auth = authorization(header(first, "WWW-Authenticate"), "REGISTER", uri, user, password, "Authorization")
    return endpoint.final(request("REGISTER", uri, call_id=call_id, cseq=2,
                                  extra=[contact, ("Expires", str(expires)), auth], **base))


# --- dialogs: both ends of a real call, for in-dialog flows and the attacks on them ---

def headers(message, name, compact=None):
    """Every value of header `name` (and its compact form), in order."""
    names = {name.lower()} | ({compact.lower()} if compact else set())
    head = (message or "").split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    out = []
    for line in head:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in names:
            out.append(value.strip())
    return out


def method(message):
    m = re.match(r"([A-Z]+) \S+ SIP/2\.0\r\n", message or "")
    return m.group(1) if m else None


def uri_addr(uri):
    """(host, port) of a SIP URI, with or without <>; port 5060 by default."""
    m = re.search(r"sips?:(?:[^@;>]*@)?([0-9.]+|\[[^\]]+\])(?::(\d+))?", uri)
    return m.group(1), int(m.group(2) or 5060)


def tag_of(value):
    m = re.search(r";\s*tag=([^;>\s]+)", value or "")
    return m.group(1) if m else None


def response(req, code, reason, *, to_tag=None, contact=None, extra=(), body=b"", record_route=()):
    """A response to `req` (text) as a UAS writes it (RFC 3261 §8.2.6): Via, From, To
    (with our tag), Call-ID, CSeq copied; Record-Route copied into a 2xx/1xx of a
    dialog-creating request (§12.1.1), below `record_route`: the entries the proxies
    of the UAS's side added on the way (§16.6, step 4)."""
    lines = ["SIP/2.0 %d %s" % (code, reason)]
    lines += ["Via: " + v for v in headers(req, "Via", "v")]
    lines.append("From: " + headers(req, "From", "f")[0])
    to = headers(req, "To", "t")[0]
    if to_tag and not tag_of(to):
        to += ";tag=" + to_tag
    lines.append("To: " + to)
    lines.append("Call-ID: " + headers(req, "Call-ID", "i")[0])
    lines.append("CSeq: " + headers(req, "CSeq")[0])
    if 100 < code < 300:
        lines += ["Record-Route: " + r for r in list(record_route) + headers(req, "Record-Route")]
    if contact:
        lines.append("Contact: " + contact)
    lines += ["%s: %s" % h for h in extra]
    lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Party:
    """A UDP SIP party on (ip, port) that talks to whoever it is told to and answers
    its requests at their source (RFC 3581: the edge asks for rport)."""

    def __init__(self, ip, port=0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.ip, self.port = self.sock.getsockname()
        self.seen = []  # every message received, in order

    def close(self):
        self.sock.close()

    def send(self, data, addr):
        self.sock.sendto(data, addr)

    def recv(self, timeout=3.0, want=None):
        """(message, source) of the next message for which `want(message)` is true
        (default: anything but a 100 Trying), or (None, None)."""
        want = want or (lambda m: status(m) != 100)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, None
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except (socket.timeout, ConnectionResetError):
                return None, None
            message = data.decode("latin-1")
            self.seen.append(message)
            if want(message):
                return message, addr

    def request(self, name, timeout=3.0):
        return self.recv(timeout, lambda m: method(m) == name)

    def final(self, timeout=3.0):
        return self.recv(timeout, lambda m: status(m) >= 200)


class Dialog:
    """One side of a dialog (RFC 3261 §12): builds its in-dialog requests and sends
    them to the first hop of its route set (loose routing, §16.12)."""

    def __init__(self, party, call_id, local_uri, local_tag, remote_uri, remote_tag, route, target, cseq):
        self.party, self.call_id = party, call_id
        self.local_uri, self.local_tag = local_uri, local_tag
        self.remote_uri, self.remote_tag = remote_uri, remote_tag
        self.route, self.target, self.cseq = list(route), target, cseq

    def build(self, name, cseq=None, extra=(), body=b""):
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        lines = [
            "%s %s SIP/2.0" % (name, self.target),
            "Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s;rport" % (self.party.ip, self.party.port, os.urandom(8).hex()),
            "Max-Forwards: 70",
            "From: <%s>;tag=%s" % (self.local_uri, self.local_tag),
            "To: <%s>;tag=%s" % (self.remote_uri, self.remote_tag),
            "Call-ID: " + self.call_id,
            "CSeq: %d %s" % (cseq, name),
        ]
        lines += ["Route: " + r for r in self.route]
        lines.append("Contact: <sip:%s:%d>" % (self.party.ip, self.party.port))
        lines += ["%s: %s" % h for h in extra]
        lines.append("Content-Length: %d" % len(body))
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def next_hop(self):
        return uri_addr(self.route[0] if self.route else self.target)

    def send(self, name, cseq=None, extra=()):
        data = self.build(name, cseq, extra)
        self.party.send(data, self.next_hop())
        return data


def place_call(pbx, carrier, edge, creds, called, extra=(), timeout=3.0):
    """A PBX's call through the edge to the carrier, both ends played here: INVITE,
    407, ACK, INVITE with credentials, the carrier's 200 (its Contact, the edge's
    Record-Route), the PBX's ACK. Returns (pbx dialog, carrier dialog, the INVITE as
    the carrier got it)."""
    call_id = "call-%s@%s" % (os.urandom(6).hex(), pbx.ip)
    ftag = os.urandom(4).hex()
    ruri = "sip:%s@%s" % (called, REALM)
    local_uri = "sip:%s@%s" % (creds[0], REALM)
    branch = "z9hG4bK" + os.urandom(8).hex()

    def invite(cseq, auth=()):
        lines = [
            "INVITE %s SIP/2.0" % ruri,
            "Via: SIP/2.0/UDP %s:%d;branch=%s-%d;rport" % (pbx.ip, pbx.port, branch, cseq),
            "Max-Forwards: 70",
            "From: <%s>;tag=%s" % (local_uri, ftag),
            "To: <%s>" % ruri,
            "Call-ID: " + call_id,
            "CSeq: %d INVITE" % cseq,
            "Contact: <sip:%s@%s:%d>" % (creds[0], pbx.ip, pbx.port),
        ]
        lines += ["%s: %s" % h for h in list(extra) + list(auth)]
        lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    ours = lambda m: (headers(m, "Call-ID", "i") or [None])[0] == call_id  # noqa: E731
    pbx.send(invite(1), edge)
    challenge, _ = pbx.recv(timeout, lambda m: ours(m) and status(m) >= 200)
    if status(challenge) != 407:
        raise AssertionError("expected 407, got %r" % challenge)
    ack = ("ACK %s SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=%s-1;rport\r\nMax-Forwards: 70\r\n"
           "From: <%s>;tag=%s\r\nTo: %s\r\nCall-ID: %s\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
           % (ruri, pbx.ip, pbx.port, branch, local_uri, ftag, headers(challenge, "To")[0], call_id))
    pbx.send(ack.encode("latin-1"), edge)
    auth = authorization(headers(challenge, "Proxy-Authenticate")[-1], "INVITE", ruri, creds[0], creds[1],
                         "Proxy-Authorization")
    pbx.send(invite(2, [auth]), edge)
    got, hop = carrier.recv(timeout, lambda m: ours(m) and method(m) == "INVITE")
    if got is None:
        raise AssertionError("the authenticated INVITE never reached the carrier; the PBX got:\n%s"
                             % "\n".join(m.split("\r\n", 1)[0] for m in pbx.seen[-6:]))
    carrier_tag = os.urandom(4).hex()
    carrier_contact = "<sip:%s@%s:%d>" % (called, carrier.ip, carrier.port)
    carrier.send(response(got, 200, "OK", to_tag=carrier_tag, contact=carrier_contact), hop)
    ok, _ = pbx.recv(timeout, lambda m: ours(m) and status(m) >= 200)
    if status(ok) != 200:
        raise AssertionError("expected 200 at the PBX, got %r" % ok)
    rr = headers(ok, "Record-Route")
    pbx_side = Dialog(pbx, call_id, local_uri, ftag, ruri, tag_of(headers(ok, "To")[0]),
                      list(reversed(rr)), re.sub(r"^<|>$", "", headers(ok, "Contact")[0]), 2)
    carrier_side = Dialog(carrier, call_id, ruri, carrier_tag, local_uri, ftag, headers(got, "Record-Route"),
                          re.sub(r"^<|>.*$", "", headers(got, "Contact")[0]), 0)
    pbx_side.send("ACK", cseq=2)
    if carrier.recv(timeout, lambda m: ours(m) and method(m) == "ACK")[0] is None:
        raise AssertionError("the ACK of the 200 never reached the carrier")
    return pbx_side, carrier_side, got


def authenticated_invite(party, edge, creds, called, call_id, ftag, timeout=3.0, extra=()):
    """An INVITE of `creds` from `party` to `edge` with this Call-ID and From tag (and
    the `extra` headers), sent again with credentials after the 407 (not waited for).
    The 407 is checked. Returns the bytes of the INVITE with credentials (to send again
    as a retransmission)."""
    ruri = "sip:%s@%s" % (called, REALM)
    more = list(extra)

    def invite(cseq, auth=()):
        data = request("INVITE", ruri, from_user=creds[0], to_user=called, call_id=call_id, cseq=cseq,
                       via_ip=party.ip, via_port=party.port,
                       extra=[("Contact", "<sip:%s@%s:%d>" % (creds[0], party.ip, party.port))] + more
                       + list(auth))
        return re.sub(rb"(\r\nFrom: [^\r]*;tag=)[0-9a-f]+", lambda m: m.group(1) + ftag.encode(), data, count=1)

    party.send(invite(1), edge)
    challenge, _ = party.recv(timeout, lambda m: (headers(m, "Call-ID", "i") or [None])[0] == call_id
                              and status(m) >= 200)
    if status(challenge) != 407:
        raise AssertionError("expected 407, got %r" % challenge)
    auth = authorization(headers(challenge, "Proxy-Authenticate")[-1], "INVITE", ruri, creds[0], creds[1],
                         "Proxy-Authorization")
    data = invite(2, [auth])
    party.send(data, edge)
    return data


def answered_dialogs(caller, callee, got, hop, ok_from_edge, call_id, ftag, local_uri, ruri, callee_tag):
    """(caller dialog, callee dialog) of a call the callee answered 200 with tag
    `callee_tag` (`got`, `hop`: the INVITE as it got it; `ok_from_edge`: the 200 as the
    caller got it), after the caller's ACK reached the callee."""
    caller_side = Dialog(caller, call_id, local_uri, ftag, ruri, callee_tag,
                         list(reversed(headers(ok_from_edge, "Record-Route"))),
                         re.sub(r"^<|>$", "", headers(ok_from_edge, "Contact")[0]), 2)
    callee_side = Dialog(callee, call_id, ruri, callee_tag, local_uri, ftag, headers(got, "Record-Route"),
                         re.sub(r"^<|>.*$", "", headers(got, "Contact")[0]), 0)
    caller_side.send("ACK", cseq=2)
    if callee.recv(3.0, lambda m: (headers(m, "Call-ID", "i") or [None])[0] == call_id and method(m) == "ACK")[0] is None:
        raise AssertionError("the ACK of the 200 never reached the callee")
    return caller_side, callee_side


def in_dialog_round(sender, receiver, name, timeout=3.0, extra=()):
    """`sender` sends `name` within its dialog; `receiver` must get it and answer 200,
    which must come back to `sender` (ACKed when it answers an INVITE). Returns the
    request as `receiver` got it."""
    ours = lambda m: (headers(m, "Call-ID", "i") or [None])[0] == sender.call_id  # noqa: E731
    sender.send(name, extra=extra)
    got, hop = receiver.party.recv(timeout, lambda m: ours(m) and method(m) == name)
    if got is None:
        raise AssertionError("%s from %s:%d never arrived" % (name, sender.party.ip, sender.party.port))
    receiver.party.send(response(got, 200, "OK", contact="<sip:%s:%d>" % (receiver.party.ip, receiver.party.port)), hop)
    ok, _ = sender.party.recv(timeout, lambda m: ours(m) and status(m) >= 200)
    if status(ok) != 200:
        raise AssertionError("%s: expected 200 back, got %r" % (name, ok))
    if name == "INVITE":
        sender.send("ACK", cseq=sender.cseq)
        if receiver.party.recv(timeout, lambda m: ours(m) and method(m) == "ACK")[0] is None:
            raise AssertionError("the ACK of the re-INVITE never arrived")
    return got


class FarEnd:
    """A listener on UDP and TCP (ip, port) standing for the carrier or another far
    end during an attack: it answers nothing and records every byte that arrives."""

    def __init__(self, ip="127.0.0.1", port=5090):
        self.got = []
        self.lock = threading.Lock()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.bind((ip, port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((ip, port))
        self.tcp.listen(16)
        self.closed = False
        for target in (self._udp, self._tcp):
            threading.Thread(target=target, daemon=True).start()

    def _udp(self):
        while not self.closed:
            try:
                data, _ = self.udp.recvfrom(65535)
            except OSError:
                return
            with self.lock:
                self.got.append(data.decode("latin-1"))

    def _tcp(self):
        while not self.closed:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn):
        with conn:
            while True:
                try:
                    data = conn.recv(65535)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.got.append(data.decode("latin-1"))

    def received(self, settle=0.5):
        time.sleep(settle)
        with self.lock:
            return list(self.got)

    def close(self):
        self.closed = True
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def place_inbound(core, pbx, edge, did, timeout=3.0):
    """The core's call for `did` through the edge's core socket to the registered PBX
    (`pbx` listening where it registered from), both ends played here: INVITE, the
    PBX's 200, the core's ACK. Returns (core dialog, PBX dialog, the INVITE as the PBX
    got it)."""
    call_id = "inbound-%s@%s" % (os.urandom(6).hex(), core.ip)
    ftag = os.urandom(4).hex()
    ruri = "sip:%s@%s" % (did, REALM)
    local_uri = "sip:+15550001111@carrier.example.net"
    invite = ("INVITE %s SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s;rport\r\nMax-Forwards: 70\r\n"
              "From: <%s>;tag=%s\r\nTo: <%s>\r\nCall-ID: %s\r\nCSeq: 1 INVITE\r\n"
              "Contact: <sip:core@%s:%d>\r\nContent-Length: 0\r\n\r\n"
              % (ruri, core.ip, core.port, os.urandom(8).hex(), local_uri, ftag, ruri, call_id, core.ip, core.port))
    ours = lambda m: (headers(m, "Call-ID", "i") or [None])[0] == call_id  # noqa: E731
    core.send(invite.encode("latin-1"), edge)
    got, hop = pbx.recv(timeout, lambda m: ours(m) and method(m) == "INVITE")
    if got is None:
        raise AssertionError("the core's INVITE never reached the PBX")
    pbx_tag = os.urandom(4).hex()
    pbx.send(response(got, 200, "OK", to_tag=pbx_tag, contact="<sip:hq1@%s:%d>" % (pbx.ip, pbx.port)), hop)
    ok, _ = core.recv(timeout, lambda m: ours(m) and status(m) >= 200)
    if status(ok) != 200:
        raise AssertionError("expected 200 at the core, got %r" % ok)
    core_side = Dialog(core, call_id, ruri, ftag, ruri, tag_of(headers(ok, "To")[0]),
                       list(reversed(headers(ok, "Record-Route"))),
                       re.sub(r"^<|>$", "", headers(ok, "Contact")[0]), 1)
    pbx_side = Dialog(pbx, call_id, ruri, pbx_tag, local_uri, ftag, headers(got, "Record-Route"),
                      re.sub(r"^<|>.*$", "", headers(got, "Contact")[0]), 0)
    core_side.local_uri = local_uri
    core_side.send("ACK", cseq=1)
    if pbx.recv(timeout, lambda m: ours(m) and method(m) == "ACK")[0] is None:
        raise AssertionError("the ACK of the 200 never reached the PBX")
    return core_side, pbx_side, got
