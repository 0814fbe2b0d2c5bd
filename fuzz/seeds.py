#!/usr/bin/env python3
"""Writes the seed corpus of the `judge` fuzz target (fuzz/corpus/judge/): requests
that carry digest answers valid for the target's fixed nonce secret, clock and
sources, so that the fuzzer starts on the authenticated paths (registration, the
call lock, the access list, the replay set, un-REGISTER) instead of stopping at the
nonce check. The nonce format is src/digest.rs's: hex(issued || BLAKE2s-128(key =
secret; issued || source IP octets || realm)), keyed BLAKE2s as RFC 7693 and Python's
hashlib define it, issued being 8 bytes big endian: the milliseconds shifted left by
16, and a 16-bit counter.

  python3 fuzz/seeds.py     # rewrites fuzz/corpus/judge/
"""

import hashlib
import ipaddress
import os

# Must match fuzz/fuzz_targets/judge.rs.
SECRET = bytes([7] * 32)
NOW_MS = 1_000
REALM = "trunks.example.net"
HERE = os.path.dirname(os.path.abspath(__file__))


def nonce(ip, counter=0):
    # 48 bits of milliseconds, 16 bits of counter.
    issued = ((NOW_MS << 16) | counter).to_bytes(8, "big")
    mac = hashlib.blake2s(issued + ipaddress.ip_address(ip).packed + REALM.encode(), key=SECRET, digest_size=16)
    return (issued + mac.digest()).hex()


def h(alg, text):
    return (hashlib.md5 if alg == "MD5" else hashlib.sha256)(text.encode()).hexdigest()


def request(method, ruri, ip, user=None, password=None, alg="MD5", nc="00000001",
            extra="", to_tag="", counter=0):
    lines = [
        "%s %s SIP/2.0" % (method, ruri),
        "Via: SIP/2.0/UDP %s:5060;branch=z9hG4bK-seed" % ip,
        "Max-Forwards: 70",
        "From: <sip:%s@%s>;tag=f1" % (user or "pbx", REALM),
        "To: <%s>%s" % (ruri, to_tag),
        "Call-ID: seed-%s@pbx" % method.lower(),
        "CSeq: 1 %s" % method,
        "Contact: <sip:%s@%s:5060>" % (user or "pbx", ip),
    ]
    if extra:
        lines.append(extra)
    if user:
        n = nonce(ip, counter)
        ha1 = h(alg, "%s:%s:%s" % (user, REALM, password))
        ha2 = h(alg, "%s:%s" % (method, ruri))
        resp = h(alg, "%s:%s:%s:c0ffee:auth:%s" % (ha1, n, nc, ha2))
        header = "Authorization" if method == "REGISTER" else "Proxy-Authorization"
        lines.append(
            '%s: Digest username="%s", realm="%s", nonce="%s", uri="%s", response="%s", '
            'algorithm=%s, qop=auth, nc=%s, cnonce="c0ffee"' % (header, user, REALM, n, ruri, resp, alg, nc))
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# One nonce per source (fixed clock): each seed of a source counts nc up, as a PBX
# reusing a nonce does, so that none is a replay of another. The wrong password has a
# nonce of its own: a wrong answer on a nonce already used is not a guess to count
# (src/policy.rs, wrong_answer), and the seed is there to reach that count.
HQ = ("hq1", "correct horse battery staple")
BRANCH = ("branch1", "branch-secret")
SEEDS = {
    "register-hq": request("REGISTER", "sip:" + REALM, "203.0.113.7", *HQ, extra="Expires: 600"),
    "unregister-hq": request("REGISTER", "sip:" + REALM, "203.0.113.7", *HQ, nc="00000005", extra="Expires: 0"),
    "register-hq-sha256": request("REGISTER", "sip:" + REALM, "203.0.113.7", *HQ, alg="SHA-256", nc="00000003", extra="Expires: 600"),
    "invite-hq": request("INVITE", "sip:+15559876543@" + REALM, "203.0.113.7", *HQ, nc="00000002"),
    "invite-branch": request("INVITE", "sip:+15559876543@" + REALM, "192.0.2.10", *BRANCH, alg="SHA-256"),
    "invite-branch-nc2": request("INVITE", "sip:+15559876543@" + REALM, "192.0.2.10", *BRANCH, alg="SHA-256", nc="00000002"),
    "invite-wrong-password": request("INVITE", "sip:+15559876543@" + REALM, "203.0.113.7", "hq1", "guess", counter=1),
    "invite-core": request("INVITE", "sip:+15551230000@edge.example.net", "10.0.0.5"),
    "bye-in-dialog": request("BYE", "sip:+15559876543@198.51.100.20", "203.0.113.7", to_tag=";tag=t1"),
    "options": request("OPTIONS", "sip:" + REALM, "203.0.113.7"),
}


def main():
    out = os.path.join(HERE, "corpus", "judge")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name + ".sip"), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
