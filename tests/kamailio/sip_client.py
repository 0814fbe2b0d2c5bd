"""A small SIP client for the Kamailio end-to-end tests: sends one request from a
chosen loopback address over UDP or TCP and collects the answers, and answers a digest
challenge (MD5, qop=auth) the way a PBX does. sipp drives the call flows; this covers
what sipp cannot express (chosen expiry, binary bodies, garbage, exact status checks).
"""

import hashlib
import os
import re
import socket
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


def authorization(challenge, method, uri, user, password, header_name):
    """The Authorization/Proxy-Authorization header answering an MD5 challenge."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.split(" ", 1)[1]))
    ha1 = hashlib.md5(("%s:%s:%s" % (user, params["realm"], password)).encode()).hexdigest()
    ha2 = hashlib.md5(("%s:%s" % (method, uri)).encode()).hexdigest()
    cnonce, nc = os.urandom(4).hex(), "00000001"
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
