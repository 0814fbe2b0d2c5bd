# trunkguard for Kamailio: the KEMI routing script (app_python3).
#
# Every request goes through the policy's verdict:
#   allow     -> routed by the verdict's `cause` and nothing else (in_dialog, core,
#                trunk, pass_through; anything else is refused 503), with its `strip`
#                and `insert` applied to what is relayed
#   challenge -> 401/407 with the module's WWW-/Proxy-Authenticate headers
#   reject    -> the module's code and reason (403 names the cause)
#   accept    -> REGISTER answered 200 with the binding's Contact and expiry
#   route     -> an inbound call from the core relayed to the registered PBX/failover
# When the module gives no verdict (trap, missing .wasm, store failure) the request is
# refused with 503 and the reason is logged: fail closed, never an open trunk.
#
# Settings come from the environment of the Kamailio process (host-shims/kamailio/run
# sets them; see docs/kamailio.md):
#   TRUNKGUARD_PYTHONPATH  where the trunkguard_kamailio extension is installed
#   TRUNKGUARD_STATE_DIR   holds the alert spool (spool/) and published configs
#   TRUNKGUARD_MODULE      the .wasm to start with
#   TRUNKGUARD_CONFIG      the trunk configuration to start with
#   TRUNKGUARD_CARRIER     SIP URI allowed calls from PBXs are relayed to
#   TRUNKGUARD_ALERT_URL   where alerts are POSTed (the relay's /v1/alerts or a webhook)
#   TRUNKGUARD_ALERT_TOKEN_FILE  bearer token for that URL (optional; read again when
#                          the file changes)
#   TRUNKGUARD_NONCE_SECRET_FILE  the nonce secret, 64 hex digits, in a file only
#                          Kamailio's user may read (optional; the same file on every
#                          DMQ node, so a challenge from one is answered at another)
#   TRUNKGUARD_DRILLS      1: store-write fault drills (tgctl `fail_write`; tests and
#                          fire drills only, docs/kamailio.md "Drills")
#   TRUNKGUARD_STORE       where every write to `tg` goes through before it counts as
#                          done, so a restart keeps it: sqlite:PATH (htable loads PATH at
#                          start, kemi-shim.cfg TG_STATE_DB), redis://HOST:PORT/DB (loaded
#                          by mod_init), memory or unset (nothing kept; docs/kamailio.md
#                          "Upgrade and restart")
#   TRUNKGUARD_DMQ         the DMQ listener (ip:port) when kemi-shim.cfg replicates the
#                          htables with DMQ; KDMQ is taken on that socket only
#   TRUNKGUARD_PUBLIC_SOCKETS / TRUNKGUARD_CORE_SOCKETS
#                          the access-facing and core-facing listeners (ip:port, comma
#                          separated): relayed requests leave by the side they go to
#
# Shared state lives in htables (kemi-shim.cfg): `tg` holds what the module stores
# (bindings, last registration IPs, nonce secret, alert throttles), `tgctl` the published
# config/module and their status, `tgstats` counters. Every UDP and TCP worker and the
# timer process see the same tables, and they outlive `app_python.reload`.

import fcntl
import http.client
import ipaddress
import os
import re
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request

import KSR

_ext = os.environ.get("TRUNKGUARD_PYTHONPATH")
if _ext and _ext not in sys.path:
    sys.path.insert(0, _ext)

import trunkguard_kamailio as tg  # noqa: E402

STATE_DIR = os.environ.get("TRUNKGUARD_STATE_DIR", "/var/lib/trunkguard/kamailio")
SPOOL_DIR = os.path.join(STATE_DIR, "spool")
CARRIER = os.environ.get("TRUNKGUARD_CARRIER", "")
ALERT_URL = os.environ.get("TRUNKGUARD_ALERT_URL", "")
ALERT_TOKEN_FILE = os.environ.get("TRUNKGUARD_ALERT_TOKEN_FILE", "")
# The DMQ listener ("ip:port"); empty: no DMQ, KDMQ is an unknown method like any other.
DMQ = os.environ.get("TRUNKGUARD_DMQ", "")
# A nonce secret file shared by the nodes (read by mod_init; required with DMQ;
# empty without: the node makes one).
NONCE_SECRET_FILE = os.environ.get("TRUNKGUARD_NONCE_SECRET_FILE", "")
# Fire drills (docs/kamailio.md, "Drills"), read once when the script loads: without
# TRUNKGUARD_DRILLS=1 the policy gets Kamailio's own htable functions and no drill
# code runs on any path.
DRILLS = os.environ.get("TRUNKGUARD_DRILLS", "") == "1"
# The durable copy of `tg` (docs/kamailio.md, "Upgrade and restart"; run --store).
STORE = os.environ.get("TRUNKGUARD_STORE", "") or "memory"


# A fold: CRLF and the white space that starts the continuation line (RFC 3261 §7.3.1).
_FOLD = re.compile(r"\r\n[ \t]")


def _sockets(name):
    return [s.strip() for s in os.environ.get(name, "").split(",") if s.strip()]


PUBLIC_SOCKETS = _sockets("TRUNKGUARD_PUBLIC_SOCKETS")
CORE_SOCKETS = _sockets("TRUNKGUARD_CORE_SOCKETS")

KV_TABLE = "tg"
CTL_TABLE = "tgctl"
STATS_TABLE = "tgstats"
# The connection each PBX registered over TCP or TLS on, by trunk group
# (_pbx_connection): a connection id is this node's own, so the table is neither
# replicated nor stored (kemi-shim.cfg).
CONN_TABLE = "tgconn"
# By the Via branch each INVITE left with (ksr_onsend_route): the transport and IP
# it went to ("to::" + branch) and, for a core's call to a PBX over TCP or TLS, the
# id of the PBX's connection it went over (the branch itself): an answer to that
# branch comes over that connection, else from that IP over that transport, or it
# is not the callee's (_answered_from_its_far_end).
BRANCH_TABLE = "tgbranch"


def _url_shown(url):
    """An alert URL as the logs and `tgctl status` show it: scheme, host and port
    only (a webhook's secret is often its path, its query or its userinfo), as the
    module's tg_url_shown."""
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url)
    if scheme is None:
        return "(an alert URL without a scheme)"
    rest = url[scheme.end():]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in rest[len(authority):]:
        # A password with an unencoded "/" would leave part of it for the host.
        return scheme.group(0) + "..."
    return scheme.group(0) + authority.rpartition("@")[2] + ("/..." if len(authority) < len(rest) else "")


ALERT_URL_SHOWN = _url_shown(ALERT_URL) if ALERT_URL else ""


def _error_shown(error):
    """An HTTP client's error, unless it may quote the URL (in whatever form)."""
    text = str(error)
    return "(its error names the URL)" if "://" in text or "@" in text else text


def _conid_here(conid):
    """A connection id as a dialog keeps it: with this Kamailio's start time ($Tb),
    as the dialog database keeps a call across a restart and ids count again from 1
    after it (a stranger could open connections until one had the kept number)."""
    return "%s:%s" % (KSR.pv.get("$Tb"), conid)


def _reply_connection_lives():
    """An answer to a request that came over a stream goes back over that connection
    or not at all (RFC 3261 §18.2.2): once it is gone, Kamailio would send the answer
    over whichever connection has the request's address now, behind a NAT anyone's.
    Python cannot reach tm's transaction, so such an answer is dropped before tm
    sees it (the module's trunkguard_reply_connection, tg_reply_conn.c, holds tm's
    answers to the connection instead); `$T_req($conid)` is null once the request's
    connection is gone."""
    if KSR.pv.get("$T_req($pr)") not in ("tcp", "tls", "ws", "wss"):
        return True
    if KSR.pv.get("$T_req($conid)") is not None:
        return True
    KSR.notice("trunkguard: a %s to a request whose connection is gone: not relayed\n" % KSR.pv.get("$rs"))
    return False


def _via_branch(via):
    """The branch parameter of the first Via value in `via`, or ""."""
    m = re.search(r";\s*branch\s*=\s*([^;,\s]+)", (via or "").split(",", 1)[0], re.I)
    return m.group(1) if m else ""


def _answered_from_its_far_end():
    """An answer to an INVITE comes from where the INVITE went, or it is not the
    callee's: tm matches an answer to a branch by its Via branch alone, from any
    address, and that branch is computed from the INVITE's own identifiers, which
    anyone who saw the INVITE holds. A core's call sent to a PBX over its connection
    is answered over that connection: tm also sends its own CANCEL of the call by
    address, branch and all, to whoever has the PBX's address once its connection is
    gone (docs/kamailio.md, "A PBX registered over TCP")."""
    if KSR.pv.get("$rm") != "INVITE":
        return True
    branch = _via_branch(KSR.pv.get("$(hdr(Via)[0])"))
    if not branch:
        return True
    kept = KSR.htable.sht_get(BRANCH_TABLE, branch)
    if isinstance(kept, int) and kept != 0:
        if kept == (KSR.pv.get("$conid") or 0):
            return True
        KSR.notice("trunkguard: a %s to a branch from another connection than the branch's: not relayed\n"
                   % KSR.pv.get("$rs"))
        return False
    went_to = KSR.htable.sht_get(BRANCH_TABLE, "to::" + branch)
    if not isinstance(went_to, str) or went_to == "%s:%s" % (KSR.pv.get("$pr"), KSR.pv.get("$si")):
        return True
    KSR.notice("trunkguard: a %s to a branch from another address than the branch's: not relayed\n"
               % KSR.pv.get("$rs"))
    return False


def _connection_of(msg, hop):
    """The id of the connection Kamailio would send to `hop` over (tcpops'
    tcp_get_conid, which KSR.tcpops lacks, called on the message itself:
    KSR.x.modf would hand it no message), 0 when none has its address; None when
    `hop` names neither TCP nor TLS."""
    m = re.match(r"(?i)sips?:(?:[^@;>]*@)?(\[[0-9a-f:.]+(?:%[0-9a-z]+)?\]|[^:;>$]+)(?::(\d+))?[^>]*?"
                 r";transport=(tcp|tls)(?:;|$)", hop)
    if m is None:
        return None
    port = m.group(2) or ("5061" if m.group(3).lower() == "tls" else "5060")
    KSR.pv.seti("$var(tg_conid_now)", 0)
    msg.call_function("tcp_get_conid", "%s:%s" % (m.group(1), port), "$var(tg_conid_now)")
    return KSR.pv.get("$var(tg_conid_now)") or 0

# How long the timer process keeps trying one delivery before moving to the next
# file: short, so one dead receiver cannot hold the spool for long.
DELIVERY_TIMEOUT_S = 2.0
# Backoff after a failed delivery, doubling up to the cap; the spool keeps the events.
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0


# How often a worker looks for a new publication (one htable read). A push is in
# force everywhere within this, and `publish` waits for the timer process's answer.
PUBLICATION_CHECK_S = 0.2


def _now_ms():
    return int(time.time() * 1000)


def _ip_port(ip_var, port_var):
    """`ip:port` from two pseudo-variables, IPv6 in brackets, as the policy reads it."""
    ip = KSR.pv.get(ip_var)
    port = KSR.pv.get(port_var)
    if ":" in ip:
        return "[%s]:%s" % (ip, port)
    return "%s:%s" % (ip, port)


def _source():
    return _ip_port("$si", "$sp")


def _local():
    """The socket the message arrived on, as the policy's `core_sockets` names it."""
    return _ip_port("$Ri", "$Rp")


def _hop_is_source(hop):
    """Whether the message's source address is the host of the recorded hop (a SIP
    URI): an address as written, or a name as the resolver gives it."""
    m = re.match(r"(?i)\s*<?sips?:([^>]*)", hop)
    if not m:
        return False
    hostport = m.group(1).rsplit("@", 1)[-1]
    m = re.match(r"\[([^\]]*)\]|([^:;?]+)", hostport)
    if not m:
        return False
    host = m.group(1) or m.group(2)
    try:
        source = ipaddress.ip_address(KSR.pv.get("$si"))
    except ValueError:
        return False
    try:
        return ipaddress.ip_address(host) == source
    except ValueError:
        pass
    try:
        return any(ipaddress.ip_address(a[4][0]) == source for a in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def _reads_otherwise(message):
    """Whether a stream reader could end `message` elsewhere than where it ends: a
    continuation line in its header block, a Content_Length field, or a CR or an LF
    that is not one of a CRLF pair (Kamailio's parser reads an LF alone before SP as a
    fold, and ends the header block at a line that starts with a CR alone)."""
    head, sep, _ = message.partition(b"\r\n\r\n")
    pairs_out = head.replace(b"\r\n", b"")
    if not sep or b"\r" in pairs_out or b"\n" in pairs_out:
        return True
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            return True
        if line.split(b":", 1)[0].rstrip(b" \t").lower() == b"content_length":
            return True
    return False


def _message_bytes():
    # $mb decodes as UTF-8 and raises on anything else; the hex form keeps every byte
    # (NULs included), so binary bodies and garbage reach the parser as received.
    try:
        return KSR.pv.get("$mb").encode("utf-8")
    except UnicodeDecodeError:
        return bytes.fromhex(KSR.pv.get("$(mb{s.encode.hexa})"))


def _published():
    """(config path, module path) published in tgctl, falling back to the
    environment before anything was published."""
    config = KSR.htable.sht_get(CTL_TABLE, "config") or os.environ.get("TRUNKGUARD_CONFIG", "")
    module = KSR.htable.sht_get(CTL_TABLE, "module") or os.environ.get("TRUNKGUARD_MODULE", "")
    return config, module


NONCE_SECRET_KEY = "tg/nonce_secret"  # the module's key (src/store.rs), 32 bytes hex

# Dialog variables (Kamailio `dialog` module) written when this edge relays a
# dialog-creating INVITE: who is on either side, and by which socket to reach them.
# An in-dialog request goes to the other party's recorded hop and nowhere else.
DLG_FTAG = "tg_ftag"  # the caller's From tag: tells the direction of a later request
DLG_CALLER, DLG_CALLER_SOCKET = "tg_caller", "tg_caller_sock"
DLG_CALLEE, DLG_CALLEE_SOCKET = "tg_callee", "tg_callee_sock"
# The trunk group's party, "caller" or "callee": held to its address (_party_sent).
DLG_CUSTOMER = "tg_customer"
# The PBX's hop over TCP or TLS and the connection its call began on
# (_pbx_connection_held), as kamailio.cfg's route[PBX_CONNECTION_HELD].
DLG_PBX_HOP, DLG_PBX_CONID = "tg_pbx_hop", "tg_pbx_conid"
# A socket variable the module sets after a failover whose branch had none.
NO_SOCKET = "-"
# A Record-Route entry as rr writes this edge's: a host and port, and only the
# parameters rr puts there (RFC 5658's r2, lr, the dialog module's did, rr's ftag,
# the transport), none after the >.
RR_ENTRY = re.compile(r"<sip:(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z.-]+)(:\d+)?"
                      r"(;(lr|lr=on|r2=on|ftag=[0-9A-Za-z._~+-]+|did=[0-9a-f]+\.[0-9a-f]+|transport=[A-Za-z]+))*>")
DLG_BYE = "tg_bye"  # set when the dialog's BYE was relayed: nothing after it is
# The callee's early route sets, one line "<To tag> <route set>" per early dialog (its
# 1xx's To tag), the most EARLY_MAX, oldest first: the dialog module records the
# callee's route set only from its 2xx (the module's name and format, tg_dialog.c).
DLG_EARLY_RS, EARLY_MAX = "tg_early_rs", 4
# The callee's route set from the 2xx that confirmed the dialog ("-": none), taken as
# the early ones are: $dlg(to_rs) counts entries from the bottom (tg_dialog.c).
DLG_CALLEE_RS = "tg_callee_rs"
# $dlg(state): 2 early, 3 confirmed (2xx not yet ACKed), 4 confirmed; 1 (no answer
# yet) and 5 (ended) are not dialogs a request can be within.
DLG_LIVE_STATES = (2, 3, 4, "2", "3", "4")

# The xavp that carries an inbound call's failover through its transaction (uri,
# on_6xx; after a failover, the PBX's code and reason): _arm_failover, _fail_over.
FAILOVER_XAVP = "tg_failover"

# Header names and values the policy asks to insert must be one header line each.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _ensure_secret(key, configured=None):
    """The secret at `key`: the configured one (TRUNKGUARD_NONCE_SECRET_FILE), written
    only when the table holds another; else the table's, made at random when absent.
    Written through to the store like the policy's writes: a restart keeps the secret,
    and the nonces issued before it."""
    value = KSR.htable.sht_get(KV_TABLE, key)
    sets = _writers(drills=False)[0]
    if configured:
        if value != configured:
            sets(KV_TABLE, key, configured)
        return configured
    if not value:
        sets(KV_TABLE, key, os.urandom(32).hex())
        value = KSR.htable.sht_get(KV_TABLE, key)
    return value


def _read_nonce_secret(path):
    """The nonce secret of TRUNKGUARD_NONCE_SECRET_FILE: 64 hex digits (32 bytes, the
    form the module keeps at tg/nonce_secret, src/store.rs), in a file that neither
    group nor others may read or write: whoever holds it can mint nonces for any
    address, and a replaced file would hand every node the attacker's. Raises (and
    Kamailio does not start) on anything else."""
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="ascii") as f:
            text = "".join(f.read().split())
    except (OSError, UnicodeDecodeError) as e:
        raise RuntimeError("trunkguard: cannot read the nonce secret file %s: %s" % (path, e)) from None
    if mode & 0o077:
        raise RuntimeError("trunkguard: the nonce secret file %s is open to group or others (mode %04o): "
                           "chmod 600 it; not starting" % (path, mode & 0o7777))
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise RuntimeError("trunkguard: the nonce secret file %s must hold 64 hex digits (32 bytes, "
                           "e.g. `openssl rand -hex 32`); not starting" % (path,))
    return text.lower()


# The tgctl item a drill counts down (kamcmd htable.seti tgctl fail_write N): the
# policy's N-th store write from then on, in any process, is refused.
DRILL_FAIL_WRITE = "fail_write"
# What KSR.htable.sht_dec answers when the item holds no integer.
_HT_NO_INT = -255


def _drilled(write):
    """`write` (Kamailio's sht_sets or sht_rm, as the policy calls them) refusing the
    write that brings tgctl `fail_write` from 1 to 0, as Kamailio refuses one (-1,
    nothing written). Only with TRUNKGUARD_DRILLS=1 (docs/kamailio.md, "Drills")."""

    def drilled(table, key, *value):
        left = KSR.htable.sht_get(CTL_TABLE, DRILL_FAIL_WRITE)
        if isinstance(left, int) and left > 0:
            # sht_dec is atomic across processes: of two writes racing for the last
            # count, one gets 0 and is refused, the other a negative count (undone).
            left = KSR.htable.sht_dec(CTL_TABLE, DRILL_FAIL_WRITE)
            if left == 0:
                KSR.warn("trunkguard: drill: refused the store write of %s (tgctl %s)\n" % (key, DRILL_FAIL_WRITE))
                return -1
            if _HT_NO_INT < left < 0:
                KSR.htable.sht_seti(CTL_TABLE, DRILL_FAIL_WRITE, 0)
        return write(table, key, *value)

    return drilled


# --- the durable copy of `tg` (docs/kamailio.md, "Upgrade and restart") -------------
# htable is shared memory: a restart (upgrade, crash, kill -9) would forget every
# binding, last registration IP, the nonce secret and the alert windows. Every write
# the policy makes is written through to a store first, and counts as done only when
# both have it: a store that fails refuses the write (-1, as Kamailio refuses one), so
# the policy answers 500 store_unavailable and nothing is half-kept. Reads stay in
# shared memory.


def _store_refused(store, key, e):
    KSR.err("trunkguard: store: cannot write %s to %s: %s; refused\n" % (key, store.describe(), e))
    _count("store.refused")
    return -1


def _put_back(table, key, old):
    """The table's item as it was before a write the store then failed to keep."""
    if old is None:
        KSR.htable.sht_rm(table, key)
    else:
        KSR.htable.sht_sets(table, key, old)


class SqliteState:
    """`tg` written through to SQLite (run --store sqlite, the default): the file
    htable loads at start (kemi-shim.cfg TG_STATE_DB; Debian's htable schema, which run
    gives a unique key_name). A write: BEGIN IMMEDIATE, one upsert (prepared once per
    process, sqlite3's statement cache), Kamailio's own write, COMMIT. The write lock
    held across both keeps the file and the table in one order when two processes
    write the same key; Kamailio refusing its write rolls the row back, a failed COMMIT
    puts the table's item back."""

    UPSERT = ("INSERT INTO htable (key_name, key_type, value_type, key_value, expires) VALUES (?, 0, 0, ?, 0) "
              "ON CONFLICT (key_name) DO UPDATE SET key_value = excluded.key_value")
    DELETE = "DELETE FROM htable WHERE key_name = ?"
    # How long a write waits for another process's (each holds the lock for tens of
    # microseconds); past it the write is refused.
    BUSY_S = 1.0

    def __init__(self, path):
        self.path = path
        self.db = None
        self.pid = None

    def describe(self):
        return "sqlite:" + self.path

    def start(self):
        """mod_init: the file is there with its unique key (run makes both), and how
        many items htable loaded from it. Nothing stays open across the fork."""
        db = sqlite3.connect("file:%s?mode=ro" % self.path, uri=True)
        try:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'htable_key_name_idx'").fetchone():
                raise RuntimeError("no unique index htable_key_name_idx (host-shims/kamailio/run makes it)")
            return db.execute("SELECT count(*) FROM htable").fetchone()[0]
        finally:
            db.close()

    def _conn(self):
        # Opened in the process that writes: an SQLite connection must not cross a fork.
        if self.db is None or self.pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=self.BUSY_S, isolation_level=None)
            # WAL (run sets it) with synchronous=NORMAL: a commit is in the log, handed
            # to the kernel, before it returns, so a killed Kamailio (even -9) loses
            # none; only the machine itself going down can lose the commits since the
            # last checkpoint. FULL would add an fsync to every write.
            db.execute("PRAGMA synchronous=NORMAL")
            self.db, self.pid = db, os.getpid()
        return self.db

    def write(self, table, key, value, kamailio_write):
        """`value` None: a delete."""
        try:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            return _store_refused(self, key, e)
        done = False
        try:
            if value is None:
                db.execute(self.DELETE, (key,))
            else:
                db.execute(self.UPSERT, (key, value))
            old = KSR.htable.sht_get(table, key)
            code = kamailio_write()
            if isinstance(code, int) and code < 0:
                return code  # rolled back below: neither has it
            try:
                db.execute("COMMIT")
            except sqlite3.Error:
                _put_back(table, key, old)
                raise
            done = True
            return code
        except sqlite3.Error as e:
            return _store_refused(self, key, e)
        finally:
            if not done and db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass


class RedisState:
    """`tg` written through to a Redis that several nodes share (run --store
    redis://HOST:PORT/DB, Debian's python3-redis): the hash `trunkguard:tg`, one field
    per item. Redis first, then Kamailio's own write; Kamailio refusing puts Redis
    back. A lock of this node (flock) around both keeps Redis and the table in one
    order when two processes write the same key; between nodes the last write wins,
    as with DMQ. mod_init loads the hash into the table."""

    HASH = "trunkguard:tg"
    # A SIP worker waits at most this for Redis; then the write is refused.
    TIMEOUT_S = 1.0

    def __init__(self, url):
        self.url = url
        self.client = None
        self.lock = None
        self.pid = None

    def describe(self):
        return re.sub(r"//[^@/]*@", "//", self.url)  # never a password in the log

    def _client(self):
        if self.client is None or self.pid != os.getpid():
            import redis  # Debian's python3-redis; only with this store

            self.client = redis.Redis.from_url(self.url, socket_timeout=self.TIMEOUT_S,
                                               socket_connect_timeout=self.TIMEOUT_S)
            self.lock = open(os.path.join(STATE_DIR, "store.lock"), "a")
            self.pid = os.getpid()
        return self.client

    def start(self):
        """mod_init, before Kamailio forks and before any message: every item of the
        hash into the table. htable's DMQ replication has no active peer yet, so this
        sends nothing; a node that starts with its peers up also gets their tables
        (dmq_init_sync). Raises (Kamailio does not start) when Redis cannot be read."""
        client = self._client()
        try:
            items = client.hgetall(self.HASH)
            for key, value in items.items():
                if KSR.htable.sht_sets(KV_TABLE, key.decode("utf-8"), value.decode("utf-8")) < 0:
                    raise RuntimeError("the table refused %s" % (key,))
            return len(items)
        finally:
            client.close()
            self.lock.close()
            self.client = self.lock = None

    def write(self, table, key, value, kamailio_write):
        try:
            client = self._client()
        except Exception as e:
            return _store_refused(self, key, e)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            try:
                if value is None:
                    client.hdel(self.HASH, key)
                else:
                    client.hset(self.HASH, key, value)
            except Exception as e:  # redis.RedisError, OSError
                return _store_refused(self, key, e)
            code = kamailio_write()
            if isinstance(code, int) and code < 0:
                old = KSR.htable.sht_get(table, key)
                try:
                    if old is None:
                        client.hdel(self.HASH, key)
                    else:
                        client.hset(self.HASH, key, old)
                except Exception as e:
                    KSR.err("trunkguard: store: %s keeps %s, which Kamailio refused: %s\n"
                            % (self.describe(), key, e))
            return code
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)


def _state_store(spec):
    if spec == "memory":
        return None
    if spec.startswith("sqlite:"):
        return SqliteState(spec[len("sqlite:"):])
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisState(spec)
    raise RuntimeError("trunkguard: TRUNKGUARD_STORE=%s: expected sqlite:PATH, redis://HOST:PORT/DB or memory; "
                       "not starting" % (spec,))


# The tgctl item mod_init sets once it has started the store (shared memory: gone with
# the process, so every start of Kamailio loads the store once).
STORE_STARTED = "store_started"

# Made when the script loads (in the main process; connections open after the fork).
try:
    STATE = _state_store(STORE)
except RuntimeError:
    STATE = None  # mod_init raises it: Kamailio does not start


def _writers(drills=DRILLS):
    """sht_sets and sht_rm as the policy calls them (table first): Kamailio's own, with
    the drill's fault in front when drills are on, written through to the store."""
    sets, rm = KSR.htable.sht_sets, KSR.htable.sht_rm
    if drills:
        sets, rm = _drilled(sets), _drilled(rm)
    if STATE is None:
        return sets, rm
    table_sets, table_rm = sets, rm

    def durable_sets(table, key, value):
        return STATE.write(table, key, value, lambda: table_sets(table, key, value))

    def durable_rm(table, key):
        return STATE.write(table, key, None, lambda: table_rm(table, key))

    return durable_sets, durable_rm


def _check_inserts(insert):
    # Checked before anything is set up for the request: a header the policy would
    # insert must be one well-formed line, or the request is refused (fail closed,
    # ksr_request_route's 503).
    for name, value in insert:
        if not _TOKEN.match(name) or "\r" in value or "\n" in value:
            raise RuntimeError("verdict inserts a header that is not one line: %r" % ((name, value),))


class Counters:
    """Counts kept in the process and written to `tgstats` at most once a second, as
    `<name>@<pid>` items that only this process writes (htable has no atomic add-by-n,
    and one htable write per message costs more than the counting). `tgctl` sums
    them. A name seen for the first time is written at once."""

    FLUSH_S = 1.0

    def __init__(self):
        self.totals = {}
        self.dirty = set()
        self.next_flush = 0.0
        self.suffix = "@%d" % os.getpid()

    def add(self, name):
        total = self.totals.get(name)
        if total is None:
            # After app_python.reload this process's item may hold earlier counts.
            total = KSR.htable.sht_get(STATS_TABLE, name + self.suffix) or 0
            self.totals[name] = total + 1
            KSR.htable.sht_seti(STATS_TABLE, name + self.suffix, total + 1)
            return
        self.totals[name] = total + 1
        self.dirty.add(name)

    def flush(self, now):
        if now < self.next_flush:
            return
        self.next_flush = now + self.FLUSH_S
        for name in self.dirty:
            KSR.htable.sht_seti(STATS_TABLE, name + self.suffix, self.totals[name])
        self.dirty.clear()


# Made on first use, in the process that counts: mod_init runs before Kamailio forks,
# and the items are named after the counting process's pid.
COUNTERS = None


def _count(name):
    global COUNTERS
    if COUNTERS is None:
        COUNTERS = Counters()
    COUNTERS.add(name)


def _flush_counts():
    if COUNTERS is not None:
        COUNTERS.flush(time.monotonic())


# The refusal log (docs/policy.md, "The refusal log"): the core decides which verdicts
# get a `trunkguard-refusal {json}` line, renders it and keeps the rate (at most
# TRUNKGUARD_REFUSAL_LOG_RATE lines a second per process, then a summary line counting
# the rest); the script only writes what it is given, at NOTICE. A worker's pending
# summary comes out before its next line, or with its next request of any kind (only
# a worker sees its own count).
REFUSAL_FLUSH_S = 1.0


def _name_addrs(value):
    """The entries of a Record-Route list, split as RFC 3261 reads it: at each comma
    outside a quoted string (with its escapes) and outside <...>. Kamailio's own
    parser also takes ' for a quote; this split serves only the callee's own
    Record-Route (ksr_onreply_early), whose entries go back towards it alone."""
    entries, start, quoted, angle, i = [], 0, False, False, 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not angle:
            entries.append(value[start:i].strip())
            start = i + 1
        i += 1
    entries.append(value[start:].strip())
    return [e for e in entries if e]


def _uri_of(entry):
    """The URI of a name-addr (between its < and >, past a quoted display name), or of
    an addr-spec (up to its header parameters)."""
    rest = entry
    if rest.startswith('"'):
        i = 1
        while i < len(rest) and rest[i] != '"':
            i += 2 if rest[i] == "\\" else 1
        rest = rest[i + 1:]
    if "<" in rest:
        return rest[rest.index("<") + 1:].split(">", 1)[0].strip()
    return rest.split(";", 1)[0].strip()


def _early_route_set(lines, tag):
    """The route set of the early dialog `tag` in DLG_EARLY_RS's `lines`, or None."""
    for line in (lines or "").split("\n"):
        name, sep, route_set = line.partition(" ")
        if sep and name == tag:
            return route_set
    return None


def _refusal_log_rate():
    try:
        return max(0, int(os.environ.get("TRUNKGUARD_REFUSAL_LOG_RATE", "20")))
    except ValueError:
        return 20


# The file the refusal lines go to as well (run: <state>/refusal.log), for fail2ban:
# trunkguard's lines alone. Kamailio's own log also carries text any sender chooses (a
# message its parser refuses is logged as received, line breaks and all), so a jail
# reading it could be made to ban anyone (docs/policy.md, "fail2ban").
REFUSAL_LOG_FILE = os.environ.get("TRUNKGUARD_REFUSAL_LOG_FILE", "")


def _emit(lines):
    """Each line to Kamailio's log and, one whole write each, to REFUSAL_LOG_FILE."""
    for line in lines:
        KSR.notice(line + "\n")
    if REFUSAL_LOG_FILE and lines:
        try:
            fd = os.open(REFUSAL_LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                for line in lines:
                    os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:
            KSR.err("trunkguard: cannot write the refusal log %s: %s\n" % (REFUSAL_LOG_FILE, e))


class Refusals:
    """The process's refusal log, made in the worker that uses it."""

    def __init__(self):
        self.log = tg.RefusalLog(_refusal_log_rate())
        self.next_flush = 0.0
        self.failed = False

    def record(self, message, source, transport, now_ms, action, code, cause, group):
        try:
            lines = self.log.record(message, source, transport, now_ms, action, code or 0, cause, group)
        except Exception as e:
            return self._failed(e)
        _emit(lines)

    def host(self, code, cause):
        """A refusal this script makes itself after the policy's allow, or when the
        policy gave no verdict: the same line and the same rate as the policy's, so
        a flood of forged in-dialog requests cannot fill the disk either."""
        try:
            lines = self.log.record_host(_message_bytes(), _source(), KSR.pv.get("$pr"), _now_ms(), code, cause)
        except Exception as e:
            self._failed(e)
            return False
        _emit(lines)
        return any(line.startswith("trunkguard-refusal ") for line in lines)

    def flush(self, now_ms):
        now = time.monotonic()
        if now < self.next_flush:
            return
        self.next_flush = now + REFUSAL_FLUSH_S
        try:
            line = self.log.flush(now_ms)
        except Exception as e:
            return self._failed(e)
        if line:
            _emit([line])

    def _failed(self, e):
        # The log must not decide a request's fate: said once per process, then silent.
        if not self.failed:
            self.failed = True
            KSR.err("trunkguard: refusal log: %s\n" % (e,))


REFUSALS = None


def _refusals():
    global REFUSALS
    if REFUSALS is None:
        REFUSALS = Refusals()
    return REFUSALS


class Shim:
    """One per Kamailio process. The policy (compiled module + instance) is created on
    first use after the fork: wasmtime must not compile in the main process."""

    def __init__(self):
        self.policy = None
        self.rev = None
        self.config_path = None
        self.module_path = None
        self.alert_seq = 0
        self.next_delivery = 0.0
        self.backoff = RETRY_MIN_S
        self.token = None
        self.token_seen = None  # (inode, size, mtime) of the token file last read
        self.next_check = 0.0

    # --- KEMI callbacks ---------------------------------------------------------

    def child_init(self, rank):
        # Load the policy now rather than on the first message (a compile takes about a
        # second). The lock makes one process compile and write the compiled-code cache
        # while the others wait, then map it in milliseconds.
        if rank <= 0:
            # Main, timers (the rtimer loads the policy on its first tick), RPC, TCP
            # main: they never judge a message.
            return 0
        try:
            with open(os.path.join(STATE_DIR, "compile.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                # Secrets every worker must share, created by the first one under the
                # lock: a worker that made its own would refuse the others' nonces.
                _ensure_secret(NONCE_SECRET_KEY, NONCE_SECRET)
                self._sync()
        except Exception as e:
            # Not fatal: the first message retries, and is refused 503 if it fails.
            KSR.err("trunkguard: cannot load the policy: %s\n" % (e,))
        return 0

    def ksr_request_route(self, msg):
        # The message, for the module functions KEMI lacks (_connection_of).
        self.msg = msg
        # Set only for the relay of a core's call to a PBX (_relay_new).
        self.branch_conid = 0
        try:
            return self._request_route()
        except BaseException as e:  # noqa: B036 - a Rust panic arrives as a BaseException
            try:
                return self._fail_closed(e)
            except BaseException:
                return -255

    def _request_route(self):
        if DMQ and _local() == DMQ:
            # The DMQ listener carries htable replication between nodes
            # (docs/kamailio.md), and nothing else: KDMQ from a node of the peer list.
            # A replicated write can rewrite any binding, so it is never taken on a
            # SIP listener, whatever its source claims to be.
            if KSR.pv.get("$rm") == "KDMQ" and KSR.dmq.is_from_node() > 0:
                KSR.dmq.handle_message()
            else:
                KSR.sl.sl_send_reply(403, "Forbidden")
            return -255
        if not KSR.is_ACK():
            # A retransmission is tm's to answer, before the policy sees it again (a
            # retransmitted authenticated INVITE would read as a replayed nonce and
            # count as a call of its own): being handled by another worker (the
            # Kamailio default cfg's pattern), or answered already (0: tm resent the
            # last reply).
            if KSR.tmx.t_precheck_trans() > 0:
                KSR.tm.t_check_trans()
                return -255
            if KSR.tm.t_check_trans() == 0:
                return -255
        # Any exception from here on (PolicyError: a trap, a broken .wasm, a store
        # failure; or a bug) is answered by ksr_request_route's fail-closed 503.
        self._sync()
        message, source, transport, now_ms = _message_bytes(), _source(), KSR.pv.get("$pr"), _now_ms()
        judged = self.policy.judge(message, source, _local(), transport, now_ms)
        action, code, reason, cause, group, target, next_hop, headers, strip, insert, alerts, failover = judged
        _count("cause." + (cause or action))
        _flush_counts()
        # Every verdict goes to the refusal log, which keeps the ones it logs (an ACK
        # the policy refuses is dropped, never answered, and logged all the same).
        refusals = _refusals()
        refusals.record(message, source, transport, now_ms, action, code, cause, group)
        refusals.flush(now_ms)
        if alerts:
            self._spool(alerts)
        if action == "allow":
            return self._route_allowed(cause, group, strip, insert)
        if action == "route":
            return self._route_inbound(target, next_hop, strip, insert, failover, group)
        # challenge, reject, accept: the module's answer, as it wrote it.
        if KSR.is_ACK():
            return -255
        if action == "accept" and KSR.is_REGISTER() and group:
            self._keep_pbx_connection(group)
        if not 300 <= code <= 699 and not (action == "accept" and 200 <= code <= 299):
            raise RuntimeError("verdict %s without a usable status code (%r)" % (action, code))
        for name, value in headers:
            KSR.hdr.append_to_reply("%s: %s\r\n" % (name, value))
        KSR.sl.sl_send_reply(code, reason)
        return -255

    def ksr_reply_route(self, msg):
        # A stranger's answer is dropped before tm looks it up: tm's lookup takes a
        # reference on the transaction that only tm's own handling of the answer
        # gives back, and KEMI has no call that gives it back, so every answer
        # dropped after it keeps its transaction in memory for ever (docs/kamailio.md,
        # "Facts about Kamailio 5.6.3"). A response that matches no transaction of
        # this proxy is dropped, not forwarded by its Via: no reflection towards the
        # carrier or a PBX.
        if not _answered_from_its_far_end() or KSR.tm.t_check_trans() < 0 or not _reply_connection_lives():
            KSR.set_drop()
            return -255
        # A response is its sender's text, which the policy does not judge. Relayed
        # onto a stream as it came, a folded line or a Content_Length field could end
        # it early at the next hop (Kamailio's TCP reader takes either for
        # Content-Length), and its body would be a request from this edge there. The
        # shim cannot unfold in place through KEMI (as for requests, _folded): dropped.
        if _reads_otherwise(_message_bytes()):
            KSR.notice("trunkguard: a response with a folded line, a Content_Length field or a bare "
                       "CR or LF in its header: not relayed\n")
            KSR.set_drop()
            return -255
        if not self._reply_route_set():
            KSR.set_drop()
            return -255
        return 1

    def _reply_route_set(self):
        """The Record-Route of an answer that makes a dialog tells the caller its route
        set (RFC 3261 §12.1.2): this edge's entries, then those the caller's INVITE
        came with. The far end writes the answer: a PBX answering the core's call
        with an entry of its own below the edge's would have the carrier's in-dialog
        requests go first to a host it chose inside the carrier; one without the
        edge's, straight to its Contact; an maddr on its copy of them, wherever that
        names. So the caller is given the edge's entries (the far end's copy: at most
        two, each as rr writes one, RR_ENTRY) and, after them, the INVITE's as this
        edge received it; the far end's own entries above the edge's go (the edge
        keeps them for that side: ksr_onreply_early), as they could open a quote one
        parser reads and another does not over the entries after them. False: not
        relayed (no entry of this edge, or one not as rr writes it). The module writes
        the INVITE's Record-Route as tm sent it instead, which KEMI does not reach
        (tg_reply_rr.c); docs/kamailio.md, "Responses"."""
        code = int(KSR.pv.get("$rs") or 0)
        if not 100 < code < 300 or KSR.pv.get("$rm") != "INVITE" or (code < 200 and not KSR.pv.get("$tt")):
            return True
        if KSR.pv.get("$T_req($tt)"):
            return True  # a re-INVITE's answer changes no route set (RFC 3261 §12.2.1.2)
        got = _name_addrs(KSR.pv.get("$(hdr(Record-Route)[*])") or "")
        first = next((i for i, e in enumerate(got) if KSR.is_myself(_uri_of(e)) > 0), None)
        if first is None:
            KSR.notice("trunkguard: a %d to an INVITE without this edge's Record-Route: not relayed\n" % code)
            return False
        ours = []
        for entry in got[first:]:
            if KSR.is_myself(_uri_of(entry)) <= 0:
                break
            ours.append(entry)
        # Not a parameter rr does not write (an maddr would send the caller's requests
        # where it names), nor more entries than its two.
        if len(ours) > 2 or not all(RR_ENTRY.fullmatch(e) for e in ours):
            KSR.notice("trunkguard: a %d whose copy of this edge's Record-Route is not as written: "
                       "not relayed\n" % code)
            return False
        theirs = _name_addrs(KSR.pv.get("$T_req($(hdr(Record-Route)[*]))") or "")
        if got == ours + theirs:
            return True
        if got[first + len(ours):] != theirs:
            KSR.notice("trunkguard: a %d with Record-Route entries below this edge's that its INVITE did not "
                       "bring: written as the INVITE came\n" % code)
        if KSR.hdr.remove("Record-Route") < 0 or KSR.hdr.append(
                "Record-Route: %s\r\n" % re.sub(r"[\r\n]", " ", ", ".join(ours + theirs))) < 0:
            return False
        return True

    def ksr_onreply_early(self, msg):
        """tm's reply route of a dialog-creating INVITE (the dialog module has made its
        dialog current): the callee's route set for the caller's requests, the
        Record-Route entries above this edge's own, taken in reverse order (RFC 3261
        §12.1.2): from the first 2xx, DLG_CALLEE_RS; from a 1xx with a To tag, for the
        requests within that early dialog (PRACK, UPDATE), in DLG_EARLY_RS by its To
        tag. One that cannot be recorded (no entry of this edge) leaves no early
        dialog to be within, or $dlg(to_rs) in force."""
        code, tag = KSR.pv.get("$rs"), KSR.pv.get("$tt")
        code = int(code or 0)
        if not tag or " " in tag or "\n" in tag or not 100 < code < 300:
            return 1
        if code >= 200 and KSR.pv.get("$dlg_var(%s)" % DLG_CALLEE_RS):
            return 1  # the dialog was confirmed by an earlier 2xx, whose route set stays
        theirs = []
        for entry in _name_addrs(KSR.pv.get("$(hdr(Record-Route)[*])") or ""):
            if KSR.is_myself(_uri_of(entry)) > 0:
                break
            theirs.append(entry)
        else:
            KSR.warn("trunkguard: a %d whose route set this edge cannot record: the caller's requests "
                     "within its dialog will be refused or go with $dlg(to_rs)\n" % code)
            return 1
        route_set = re.sub(r"[\r\n]", " ", ",".join(reversed(theirs)))
        if code >= 200:
            KSR.pv.sets("$dlg_var(%s)" % DLG_CALLEE_RS, route_set or "-")
            return 1
        recorded = KSR.pv.get("$dlg_var(%s)" % DLG_EARLY_RS) or ""
        lines = [line for line in recorded.split("\n") if line and line.partition(" ")[0] != tag]
        if _early_route_set(recorded, tag) != route_set:
            KSR.pv.sets("$dlg_var(%s)" % DLG_EARLY_RS,
                        "\n".join(lines[-(EARLY_MAX - 1):] + ["%s %s" % (tag, route_set)]))
        return 1

    def ksr_onsend_route(self, msg):
        # An INVITE leaving: the IP it goes to and, for the core's call leaving for
        # its PBX over the PBX's connection (_relay_new), that connection's id, by the
        # branch of the Via tm wrote (_answered_from_its_far_end).
        conid, self.branch_conid = getattr(self, "branch_conid", 0), 0
        if KSR.pv.get("$rm") == "INVITE":
            branch = _via_branch((KSR.pv.get("$(snd(buf){line.sw,Via: SIP/2.0/})") or "").partition(":")[2])
            if branch:
                KSR.htable.sht_sets(BRANCH_TABLE, "to::" + branch,
                                    "%s:%s" % (KSR.pv.get("$snd(sproto)"), KSR.pv.get("$snd(ip)")))
                if conid:
                    KSR.htable.sht_seti(BRANCH_TABLE, branch, conid)
        return 1

    # rtimer (kemi-shim.cfg): alert windows, alert delivery, applying publications.
    def ksr_trunkguard_timer(self, msg, evname=None):
        try:
            self._sync(force=True)
            summaries = self.policy.tick(_now_ms())
            if summaries:
                self._spool(summaries)
        except BaseException as e:  # noqa: B036 - a Rust panic arrives as a BaseException
            KSR.err("trunkguard: timer: %s\n" % (e,))
        try:
            self._say_alert_delivery()
            self._deliver()
            _flush_counts()
        except Exception as e:
            KSR.err("trunkguard: timer: alert delivery: %s\n" % (e,))
        return 1

    def _say_alert_delivery(self):
        # tgctl `alerts`, for `tgctl status`: where alerts go, or that they only pile
        # up in the spool. Written by the timer process, once.
        if getattr(self, "alerts_said", False):
            return
        text = ("delivered to %s" % ALERT_URL_SHOWN) if ALERT_URL else ("no alert URL: kept in %s, delivered to nobody" % SPOOL_DIR)
        if KSR.htable.sht_sets(CTL_TABLE, "alerts", text) >= 0:
            self.alerts_said = True

    # --- policy lifecycle ---------------------------------------------------------

    def _sync(self, force=False):
        """Creates the policy on first use and applies a new publication (config or
        .wasm) when tgctl's `rev` changed. Looks at most every PUBLICATION_CHECK_S."""
        now = time.monotonic()
        if self.policy is not None and not force and now < self.next_check:
            return
        self.next_check = now + PUBLICATION_CHECK_S
        rev = KSR.htable.sht_get(CTL_TABLE, "rev")
        if self.policy is not None and rev == self.rev:
            return
        config, module = _published()
        problems = []
        if self.policy is None:
            # Kamailio's own htable functions, called with the table name from Rust:
            # no Python frame of ours per read; writes go through the store (_writers).
            sets, rm = _writers()
            self.policy = tg.Policy(module, KSR.htable.sht_get, sets, rm, KV_TABLE)
            self.module_path = module
        elif module and module != self.module_path:
            try:
                self.policy.load_module(module)
                self.module_path = module
                KSR.info("trunkguard: module %s in force\n" % (module,))
            except tg.PolicyError as e:
                problems.append("module %s refused: %s" % (module, e))
        if config and config != self.config_path:
            try:
                with open(config, "rb") as f:
                    generation = self.policy.configure(f.read())
                self.config_path = config
                KSR.info("trunkguard: config %s in force (generation %d)\n" % (config, generation))
            except tg.ConfigRefused as e:
                path, reason = e.args
                problems.append("config %s refused: %s: %s" % (config, path, reason))
                _count("config.refused")
            except OSError as e:
                problems.append("config %s refused: cannot read it: %s" % (config, e))
                _count("config.refused")
        for problem in problems:
            KSR.err("trunkguard: %s (the previous one stays in force)\n" % (problem,))
        state = "config %s generation %d module %s" % (
            self.config_path, self.policy.generation, self.module_path)
        if problems:
            self._status(rev, "refused: %s; in force: %s" % ("; ".join(problems), state))
        else:
            self._status(rev, "ok: " + state)
        self.rev = rev

    def _status(self, rev, text):
        # Every process that applies a publication reports it; they apply the same
        # files with the same module and reach the same result. `publish` waits for
        # its rev here.
        KSR.htable.sht_sets(CTL_TABLE, "status", "%s|%s" % (rev or "", text))

    def _fail_closed(self, e):
        # A refusal line under the log's rate, and the reason with it: a broken module
        # under a flood must not fill the disk with this line either.
        try:
            said = _refusals().host(503, "policy_error")
        except Exception:  # the fail-closed path must not fail itself
            said = True
        if said:
            KSR.err("trunkguard: no verdict for %s from %s: %s\n" % (KSR.pv.get("$rm"), _source(), e))
        _count("cause.policy_error")
        if KSR.is_ACK():
            return -255
        KSR.sl.sl_send_reply(503, "Service Unavailable (policy error)")
        return -255

    # --- routing --------------------------------------------------------------------

    def _route_allowed(self, cause, group, strip, insert):
        """An allowed request goes where the verdict's `cause` says (docs/abi.md) and
        nowhere else; the host never works out on its own why the policy let it
        through. A cause this script does not know is refused: fail closed."""
        _check_inserts(insert)
        if KSR.is_REGISTER():
            # The policy answers every REGISTER it serves itself; an allowed one is a
            # core-side REGISTER, which this edge does not serve.
            return self._refuse(405, "Method Not Allowed")
        if cause == "in_dialog":
            return self._route_in_dialog(strip, insert)
        if cause == "pass_through":
            if KSR.is_OPTIONS():
                # Keepalives from anyone are answered here, never relayed.
                return self._refuse(200, "OK")
            if KSR.is_CANCEL() or KSR.is_ACK():
                # Only within a transaction this proxy relayed (the ACK of a non-2xx
                # answer, a CANCEL); anything else is dropped, never relayed.
                if KSR.tm.t_check_trans() > 0:
                    if not self._cancel_from_caller():
                        return self._refuse(481, "Call/Transaction Does Not Exist")
                    return self._relay(strip, insert, within_transaction=True)
                return -255
        elif cause == "core":
            if KSR.is_CANCEL():
                # Where its INVITE went, whatever its Request-URI: a carrier's
                # INVITE is often addressed to the edge itself (sip:DID@edge), and
                # its CANCEL copies that. Within no transaction: dropped.
                if KSR.tm.t_check_trans() > 0:
                    if not self._cancel_from_caller():
                        return self._refuse(481, "Call/Transaction Does Not Exist")
                    return self._relay(strip, insert, within_transaction=True)
                return -255
            # The core's own request (core_networks, on a core socket): routed by its
            # Request-URI, never back into this edge (_relay refuses that).
            if KSR.is_INVITE():
                # A call from the core is a `route` verdict; an INVITE allowed as
                # `core` would open a dialog nobody recorded.
                return self._unroutable(cause)
            KSR.rr.record_route()
            return self._relay(strip, insert)
        elif cause == "trunk" and group:
            # An authenticated trunk's request: to the carrier, whatever the
            # Request-URI says.
            if not CARRIER:
                KSR.err("trunkguard: TRUNKGUARD_CARRIER is not set; refusing %s\n" % (KSR.pv.get("$rm"),))
                return self._refuse(503, "Service Unavailable (no carrier configured)")
            KSR.pv.sets("$du", CARRIER)
            # The PBX calls: over TCP or TLS, its call's requests go back on this
            # connection.
            conid = (KSR.pv.get("$conid") or 0) if KSR.pv.get("$pr") in ("tcp", "tls") else 0
            return self._relay_new(CARRIER, strip, insert, customer="caller", pbx_conid=conid)
        return self._unroutable(cause)

    def _unroutable(self, cause):
        # `response` (never a request), an unknown cause, none at all: this script
        # cannot honour it, so nothing is relayed.
        KSR.err("trunkguard: %s from %s allowed with cause %r, which this host does not route; refused\n"
                % (KSR.pv.get("$rm"), _source(), cause))
        _count("allow.unroutable")
        return self._refuse(503, "Service Unavailable (unroutable verdict)")

    @staticmethod
    def _cancel_from_caller():
        """Whether a request that is not a CANCEL, or a CANCEL from the address its
        INVITE came from ($T_inv: the INVITE's transaction, tmx): a CANCEL is matched
        to its INVITE by identifiers anyone who saw the INVITE holds (RFC 3261 §9.2),
        and a stranger's would end the call at the callee."""
        if not KSR.is_CANCEL():
            return True
        invite_source = KSR.pv.get("$T_inv($si)")
        return invite_source is not None and invite_source == KSR.pv.get("$si")

    def _refuse(self, code, reason):
        if KSR.is_ACK():
            return -255  # an ACK is never answered (RFC 3261 §17.2.3)
        KSR.sl.sl_send_reply(code, reason)
        return -255

    def _route_in_dialog(self, strip, insert):
        """An in-dialog request passes the policy unauthenticated, so it is relayed
        only within a dialog this edge created (Kamailio's `dialog` module matched it:
        Call-ID, both tags and the edge's own Record-Route cookie, while the dialog
        lives), and only to the other party's hop recorded when the dialog was
        created, with the route set that party's side gave in place of the sender's
        Route entries (_write_route_set). A lifted Record-Route, forged tags, a dialog
        that ended, strict routing: 404."""
        # Strict routing (RFC 3261 §16.4), which every proxy since RFC 3261 leaves for
        # loose routing, is not followed: loose_route() would take the Request-URI
        # from the sender's Route (the edge as Request-URI), or take an entry after
        # the edge's without `lr` for the Request-URI and add the sender's Request-URI
        # as a Route of its own (seen in _write_route_set).
        ruri = KSR.pv.get("$ru")
        if KSR.is_myself_ruri() > 0:
            return self._refuse_route_set()
        # Who sent it is settled before loose_route(), which has the dialog module act
        # on the request (a BYE ends the dialog there, relayed or refused after): in
        # the dialog its Call-ID and tags name, which $dlg_var reads by them until then.
        if KSR.pv.get("$ft") == KSR.pv.get("$tt"):
            # Both tags alike would read as either direction: no party's.
            if KSR.is_ACK():
                return -255
            _refusals().host(404, "no_dialog")
            _count("in_dialog.refused")
            return self._refuse(404, "Not Here")
        checked = self._sender_is_caller()
        if checked is not None and not self._party_sent(checked):
            return self._refuse_party()
        # loose_route() strips this edge's Route entries, and the dialog module
        # (called back from it) matches the request to a dialog and applies it to
        # the dialog's state.
        routed = KSR.rr.loose_route() > 0
        if routed and KSR.pv.get("$ru") != ruri:
            return self._refuse_route_set()
        lives = routed and KSR.dialog.is_known_dlg() > 0 and self._cookie_matches() and self._dialog_lives()
        if lives:
            # The direction again, in the dialog the cookie named: to the other party.
            # Its sender is checked here only when the look by the tags found no
            # dialog above (the same tags give the same dialog: one resolution).
            from_caller = self._sender_is_caller()
            if from_caller is not None and from_caller != checked and not self._party_sent(from_caller):
                return self._refuse_party()
            if from_caller is None:
                hop = sock = None
            else:
                hop, sock = (DLG_CALLEE, DLG_CALLEE_SOCKET) if from_caller else (DLG_CALLER, DLG_CALLER_SOCKET)
            hop_uri = hop and KSR.pv.get("$dlg_var(%s)" % hop)
            route_set = self._route_set_of(hop == DLG_CALLEE) if hop_uri else None
            if hop_uri and route_set is None:
                return self._refuse_route_set()
            if hop_uri and not self._pbx_connection_held(hop_uri):
                return self._refuse(480, "Temporarily Unavailable")
            if hop_uri:
                if not self._write_route_set(route_set):
                    return self._refuse_route_set()
                if lives == "bye":
                    # The ended dialog's first BYE, marked once it goes.
                    KSR.pv.sets("$dlg_var(%s)" % DLG_BYE, "1")
                KSR.pv.sets("$du", hop_uri)
                self._send_socket(KSR.pv.get("$dlg_var(%s)" % sock) or "")
                return self._relay(strip, insert)
        if KSR.is_ACK():
            # The ACK of a non-2xx answer to a relayed INVITE goes hop by hop, within
            # its transaction; any other is dropped.
            if KSR.tm.t_check_trans() > 0:
                return self._relay(strip, insert, within_transaction=True)
            return -255
        if KSR.tm.t_check_trans() == 0:
            # A retransmission of a request this edge relayed (the BYE it let through
            # a moment ago): tm has answered it with the last reply, if any; it is
            # not refused, and nothing is relayed again.
            return -255
        _refusals().host(404, "no_dialog")
        _count("in_dialog.refused")
        return self._refuse(404, "Not Here")

    def _sender_is_caller(self):
        """Who sent an in-dialog request, by its tags: True the caller (its From tag),
        False the callee (the caller's tag in To), None neither (no party's, no
        dialog, or both tags alike, which would read as either direction)."""
        ftag = KSR.pv.get("$dlg_var(%s)" % DLG_FTAG)
        if not ftag or KSR.pv.get("$ft") == KSR.pv.get("$tt"):
            return None
        if KSR.pv.get("$ft") == ftag:
            return True
        if KSR.pv.get("$tt") == ftag:
            return False
        return None

    def _refuse_party(self):
        """A request not from the party its tags name, or not where that party is."""
        _refusals().host(404, "dialog_party")
        _count("in_dialog.refused")
        return self._refuse(404, "Not Here")

    def _party_sent(self, from_caller):
        """Whether the request comes from the party its tags name, where that party
        is. The tags and the cookie are in every message of the dialog: whoever saw
        one, or was once a party (the PBX a call failed over from, within its early
        dialog), could write them. So the request must arrive on the listener that
        faces its sender's side, and the trunk group's party (a PBX, a peer trunk, a
        failover) must send from its recorded address, as must everyone when one
        listener faces both sides or the side's is not known. The carrier is held to
        its side only: its in-dialog requests may come from any of its proxies. A
        dialog recorded before DLG_CUSTOMER was keeps the side check alone. The
        module does the same (tg_dialog.c, tg_party_sent); docs/kamailio.md."""
        mine, other = (DLG_CALLER_SOCKET, DLG_CALLEE_SOCKET) if from_caller else (DLG_CALLEE_SOCKET, DLG_CALLER_SOCKET)
        sock = KSR.pv.get("$dlg_var(%s)" % mine) or ""
        other = KSR.pv.get("$dlg_var(%s)" % other) or ""
        known = sock not in ("", NO_SOCKET)
        arrival, recorded = ("%s:%s" % (KSR.pv.get("$pr"), _local())).lower(), sock.lower()
        if KSR.pv.get("$pr") != "udp":
            # A TCP or TLS connection this edge opened is credited to the first listener
            # of its address whatever its port (Kamailio's find_si): address alone.
            arrival, recorded = arrival.rpartition(":")[0], recorded.rpartition(":")[0]
        if known and arrival != recorded:
            return False
        customer = KSR.pv.get("$dlg_var(%s)" % DLG_CUSTOMER)
        if not customer:
            return True
        if customer != ("caller" if from_caller else "callee") and known and sock.lower() != other.lower():
            return True
        return _hop_is_source(KSR.pv.get("$dlg_var(%s)" % (DLG_CALLER if from_caller else DLG_CALLEE)) or "")

    def _refuse_route_set(self):
        """An in-dialog request this edge will not route as written (strict routing;
        an early dialog no 1xx gave; a route set it could not write): 404."""
        _refusals().host(404, "route_set")
        _count("in_dialog.refused")
        return self._refuse(404, "Not Here")

    def _route_set_of(self, to_callee):
        """The route set recorded for the party the request goes to (RFC 3261 §12.1.2):
        the callee's from its 2xx (DLG_CALLEE_RS; $dlg(to_rs) for a dialog confirmed
        before it was recorded) or, while early, from the 1xx of the early dialog the
        request's To tag names (ksr_onreply_early); the caller's from its INVITE
        ($dlg(from_rs)). "" for none; None when the request is within no early dialog
        a 1xx recorded."""
        if not to_callee:
            return KSR.pv.get("$dlg(from_rs)") or ""
        if str(KSR.pv.get("$dlg(state)")) == "2":
            return _early_route_set(KSR.pv.get("$dlg_var(%s)" % DLG_EARLY_RS), KSR.pv.get("$tt"))
        recorded = KSR.pv.get("$dlg_var(%s)" % DLG_CALLEE_RS)
        if recorded:
            return "" if recorded == "-" else recorded
        return KSR.pv.get("$dlg(to_rs)") or ""

    def _write_route_set(self, route_set):
        """Every Route header off (a whole header covers the part loose_route() took
        off: the core skips an overlapping removal) and the recorded route set on:
        a PBX within its call writes its own Route entries after the edge's, which a
        loose router of the carrier's would follow (RFC 3261 §16.12). Written, not
        compared with what the sender wrote, which the carrier may parse otherwise
        (docs/kamailio.md, "The route set"). What loose_route() did is applied to the
        message first (textopsx), so that a Route it added for a strict router after
        the edge's entries, which no header removal reaches as a change not yet made,
        shows: loose_route() sets no next hop then, yet a Route is left. False: not
        relayed."""
        loose_hop = KSR.pv.get("$du")
        if KSR.textopsx.msg_apply_changes() < 0:
            return False
        if not loose_hop and int(KSR.pv.get("$hdrc(Route)") or 0) > 0:
            return False
        if KSR.hdr.remove("Route") < 0:
            return False
        if route_set and KSR.hdr.append("Route: %s\r\n" % re.sub(r"[\r\n]", " ", route_set)) < 0:
            return False
        return True

    def _cookie_matches(self):
        """Whether the Route entry of this edge that loose_route() took off carries
        the cookie of the very dialog matched: `did=<h_entry>.<h_id>`, each in reversed
        hex (the dialog module's add_dlg_rr_param). The dialog module falls back to
        Call-ID and tags when the cookie is missing or names another dialog; a request
        that only knows a call's identifiers is not within it (docs/kamailio.md). The
        first `did` parameter, its name as written, as the dialog module reads it
        (rr's get_route_param): a second one, or `DID`, never stands in for it."""
        entry, hid = KSR.pv.get("$dlg(h_entry)"), KSR.pv.get("$dlg(h_id)")
        try:
            cookie = "%s.%s" % (format(int(entry), "x")[::-1], format(int(hid), "x")[::-1])
        except (TypeError, ValueError):
            return False
        # The top Route, which loose_route() took off as this edge's: its URI
        # parameters (a user part may hold ';' too).
        route = KSR.pv.get("$route_uri") or ""
        if not route or KSR.is_myself(route) <= 0:
            return False
        for param in (KSR.pv.get("$(route_uri{uri.params})") or "").split(";"):
            name, _, value = param.partition("=")
            if name.strip() == "did":
                return value.strip() == cookie
        return False

    def _dialog_lives(self):
        """Whether the matched dialog is one a request can be within. An ended dialog
        (BYE, refused INVITE, timeout) lingers in the module until its last
        transaction is freed, in state 5; the module has already moved a BYE's own
        dialog there when the script sees the BYE, so the first BYE is let through
        and marked, and every later request is refused."""
        state = KSR.pv.get("$dlg(state)")
        if state in DLG_LIVE_STATES:
            return True
        if KSR.is_BYE() and state in (5, "5") and not KSR.pv.get("$dlg_var(%s)" % DLG_BYE):
            return "bye"  # marked once it goes
        return False

    def _route_inbound(self, target, next_hop, strip, insert, failover=None, group=None):
        _check_inserts(insert)
        if not target:
            return self._refuse(500, "Server Internal Error (route without target)")
        # A registration's call has the binding's address for its next hop; without
        # one the target is a failover or a configured hop, which registered on
        # nothing.
        conid = self._pbx_connection(next_hop, group) if next_hop else None
        if conid == 0:
            # As if the PBX were not registered: to the failover (with tm's ordinary
            # timers, and no failover of its own), or 480.
            if not failover:
                return self._refuse(480, "Temporarily Unavailable")
            KSR.pv.sets("$ru", failover[0])
            KSR.pv.unset("$du")
            return self._relay_new(failover[0], strip, insert, customer="callee")
        KSR.pv.sets("$ru", target)
        if next_hop:
            KSR.pv.sets("$du", next_hop)
        if failover and KSR.is_INVITE():
            self._arm_failover(*failover)
        return self._relay_new(next_hop or target, strip, insert, customer="callee", pbx_conid=conid or 0)

    # --- a PBX registered over TCP or TLS: its own connection (docs/kamailio.md) ------

    @staticmethod
    def _keep_pbx_connection(group):
        """The connection a PBX's registration came on, for its calls. Over UDP there
        is none, and what a registration over TCP kept is never asked for a UDP hop."""
        # A query (no Contact) binds nothing: from another connection it would move
        # the PBX's calls off the one its binding names.
        if KSR.pv.get("$pr") in ("tcp", "tls") and KSR.hdr.is_present("Contact") > 0:
            KSR.htable.sht_seti(CONN_TABLE, group, KSR.pv.get("$conid") or 0)

    def _pbx_connection(self, hop, group):
        """The connection a PBX registered over TCP or TLS on, while it is the one
        with the PBX's address; 0 once it is not; None for a hop over UDP. Kamailio
        sends to a TCP hop over whichever connection has that address now, the newest
        first, whatever listener it came in on: once the PBX's is gone (a NAT's idle
        timeout, a reboot), or while a stale one lingers, the next one from its
        address and port may be anyone's behind its NAT, who would get its calls and
        could answer them."""
        kept = KSR.htable.sht_get(CONN_TABLE, group or "")
        now = _connection_of(self.msg, hop)
        if now is None:
            return None
        if isinstance(kept, int) and kept > 0 and now == kept:
            return kept
        KSR.notice("trunkguard: the connection %s registered on to %s is gone; call-id=%s\n"
                   % (group, hop, KSR.pv.get("$ci")))
        return 0

    def _pbx_connection_held(self, hop):
        """Whether an in-dialog request for `hop` may go: any hop but the PBX's over
        TCP or TLS, and that one while the connection its call began on (its
        INVITE's, or the one it registered on for the core's call) is the one with
        its address."""
        if not hop or hop != KSR.pv.get("$dlg_var(%s)" % DLG_PBX_HOP):
            return True
        now = _connection_of(self.msg, hop)
        if now is None or (now > 0 and KSR.pv.get("$dlg_var(%s)" % DLG_PBX_CONID) == _conid_here(now)):
            return True
        KSR.notice("trunkguard: the connection of the call's PBX to %s is gone; %s call-id=%s\n"
                   % (hop, KSR.pv.get("$rm"), KSR.pv.get("$ci")))
        return False

    # --- inbound failover (docs/policy.md, "Inbound calls") -------------------------

    def _arm_failover(self, uri, after_ms, on_6xx):
        """A registered PBX that does not answer sends the call to the verdict's
        failover: tm's first-reply timer (fr_timer) is the verdict's
        failover_after_ms, so silence that long ends the branch with tm's own 408,
        while any provisional reply (100 Trying included) switches tm to fr_inv_timer:
        a ringing PBX is alive. The failover's URI stays with the transaction (tm keeps
        the xavps with it and gives them back in the failure route), never read back
        from the message."""
        KSR.pv.sets("$xavp(%s=>uri)" % FAILOVER_XAVP, uri)
        KSR.pv.seti("$xavp(%s[0]=>on_6xx)" % FAILOVER_XAVP, 1 if on_6xx else 0)
        KSR.tm.t_set_fr(0, max(1, int(after_ms)))
        KSR.tm.t_on_failure("ksr_failure_failover")

    def ksr_failure_failover(self, msg):
        """tm's failure route of an inbound call with a failover: the PBX's branch
        ended without a 2xx. Returning without a new branch leaves tm to relay the
        PBX's answer."""
        self.branch_conid = 0
        try:
            self._fail_over()
        except BaseException as e:  # noqa: B036 - a Rust panic arrives as a BaseException
            KSR.err("trunkguard: inbound failover: %s; the caller gets the PBX's answer\n" % (e,))
        return 1

    def _fail_over(self):
        uri = KSR.pv.get("$xavp(%s=>uri)" % FAILOVER_XAVP)
        if not uri or KSR.tm.t_is_canceled() > 0:
            return  # the caller gave up (CANCEL): nothing goes on
        code = int(KSR.pv.get("$T_reply_code") or 0)
        reason = KSR.pv.get("$T_reply_reason") or ""
        if KSR.tm.t_branch_timeout() > 0:
            if KSR.tm.t_branch_replied() > 0:
                # It rang until fr_inv_timer: nobody picked up, the callee's business.
                return
            # Silent for failover_after_ms: tm's own 408 (no response at all).
            code, reason, retry_after = 408, "Request Timeout", False
        else:
            retry_after = bool(KSR.pv.get("$T_rpl($hdr(Retry-After))"))
        on_6xx = bool(KSR.pv.get("$xavp(%s=>on_6xx)" % FAILOVER_XAVP))
        if not tg.fails_over(code, retry_after, on_6xx):
            return  # busy, a decline, a 503 that says when to come back: final
        if self._is_ours(uri):
            KSR.err("trunkguard: inbound failover %s is this edge; the caller gets %d\n" % (uri, code))
            return
        KSR.info("trunkguard: inbound call %s: the PBX %s; relayed to the failover %s\n"
                 % (KSR.pv.get("$ci"), "answered %d" % code if KSR.tm.t_branch_replied() > 0 else "is silent", uri))
        # The same request as the PBX got (its strip/insert and Record-Route stay in
        # the transaction's copy), to the failover's URI and nowhere else, from the
        # listener of its side as _relay_new chooses.
        KSR.pv.sets("$ru", uri)
        KSR.resetdsturi()
        self._send_socket(self._socket_for(self._side_of(uri), uri))
        # The dialog's callee is the failover now: its in-dialog requests go there.
        # The PBX's early dialogs end, their route sets with them ("-" names no To
        # tag): otherwise the PBX, naming its own early dialog, would reach the
        # failover with the Route entries its 1xx recorded.
        KSR.pv.sets("$dlg_var(%s)" % DLG_CALLEE, uri)
        KSR.pv.sets("$dlg_var(%s)" % DLG_CALLEE_SOCKET, KSR.pv.get("$fs") or "")
        KSR.pv.sets("$dlg_var(%s)" % DLG_EARLY_RS, "-")
        # What the caller gets should the failover fail too (docs/policy.md).
        KSR.pv.seti("$xavp(%s[0]=>code)" % FAILOVER_XAVP, code)
        KSR.pv.sets("$xavp(%s[0]=>reason)" % FAILOVER_XAVP, reason or "Failed")
        # The failover gets the ordinary timers, and one try only.
        KSR.tm.t_reset_fr()
        KSR.tm.t_on_failure("ksr_failure_failed_over")
        if KSR.tm.t_relay() < 0:
            KSR.err("trunkguard: inbound failover: cannot relay to %s; the caller gets %d\n" % (uri, code))
            return
        _count("inbound.failover")

    def ksr_failure_failed_over(self, msg):
        """The failover failed too: the caller gets the PBX's failure, as
        docs/policy.md says, not the failover's."""
        try:
            if KSR.tm.t_is_canceled() > 0:
                return 1
            code = int(KSR.pv.get("$xavp(%s=>code)" % FAILOVER_XAVP) or 0)
            reason = KSR.pv.get("$xavp(%s=>reason)" % FAILOVER_XAVP) or "Failed"
            if code == 503:
                # A proxy never passes on a 503 (RFC 3261 §16.7 step 6): its caller
                # would take this edge for the unavailable one. tm maps a relayed 503
                # the same way (remap_503_500).
                code, reason = 500, "Server Internal Error"
            if 300 <= code <= 699:
                KSR.tm.t_reply(code, reason)
        except BaseException as e:  # noqa: B036 - a Rust panic arrives as a BaseException
            KSR.err("trunkguard: inbound failover: %s; the caller gets the failover's answer\n" % (e,))
        return 1

    def _relay_new(self, hop, strip, insert, customer, pbx_conid=0):
        """A dialog-creating request to `hop` (the carrier, a PBX): record-routed,
        and for an INVITE a dialog is created whose variables remember both parties'
        hops, so that its in-dialog requests can be sent on (_route_in_dialog)."""
        side = self._side_of(hop)
        self._send_socket(self._socket_for(side, hop))
        if KSR.is_INVITE():
            if self._is_ours(hop):
                # Checked before the dialog exists: a refused request leaves none.
                return self._refuse(482, "Loop Detected")
            if KSR.tm.t_check_trans() == 0:
                # A retransmission of an INVITE already relayed: tm answered it again.
                return -255
            if KSR.dialog.dlg_manage() < 0:
                # No dialog, so its in-dialog requests could go nowhere (the dialog
                # module logs why: an INVITE without Contact, RFC 3261 8.1.1.8).
                KSR.err("trunkguard: no dialog for the INVITE from %s; refused\n" % (_source(),))
                return self._refuse(500, "Server Internal Error (no dialog)")
            if str(KSR.pv.get("$dlg(state)")) != "1" or KSR.pv.get("$dlg_var(%s)" % DLG_FTAG):
                # A new dialog starts unconfirmed, with no variables. Anything else
                # exists already: dlg_manage() takes an INVITE with a dialog's Call-ID
                # and From tag for a spiral and hands that dialog back. A real spiral
                # or another trunk reusing a ringing call's identifiers, its parties
                # stay as recorded (written over, the far end's requests would go to
                # the newcomer).
                KSR.err("trunkguard: INVITE from %s with the Call-ID and From tag of a dialog this edge "
                        "has already; refused\n" % (_source(),))
                _count("dialog.reused")
                return self._refuse(482, "Loop Detected")
            KSR.pv.sets("$dlg_var(%s)" % DLG_FTAG, KSR.pv.get("$ft") or "")
            KSR.pv.sets("$dlg_var(%s)" % DLG_CALLER, "sip:%s;transport=%s" % (_source(), KSR.pv.get("$pr")))
            KSR.pv.sets("$dlg_var(%s)" % DLG_CALLER_SOCKET, "%s:%s" % (KSR.pv.get("$pr"), _local()))
            KSR.pv.sets("$dlg_var(%s)" % DLG_CALLEE, hop)
            KSR.pv.sets("$dlg_var(%s)" % DLG_CALLEE_SOCKET, KSR.pv.get("$fs") or "")
            KSR.pv.sets("$dlg_var(%s)" % DLG_CUSTOMER, customer)
            if pbx_conid:
                pbx_hop = KSR.pv.get("$dlg_var(%s)" % (DLG_CALLER if customer == "caller" else DLG_CALLEE))
                KSR.pv.sets("$dlg_var(%s)" % DLG_PBX_HOP, pbx_hop or "")
                KSR.pv.sets("$dlg_var(%s)" % DLG_PBX_CONID, _conid_here(pbx_conid))
            KSR.tm.t_on_reply("ksr_onreply_early")
            # The core's call, to the PBX over its connection: ksr_onsend_route keeps
            # the connection by the branch it leaves with.
            if pbx_conid and customer == "callee":
                self.branch_conid = pbx_conid
        KSR.rr.record_route()
        return self._relay(strip, insert)

    def _side_of(self, hop):
        # The carrier is the core side; a PBX (a registration, a failover) the access
        # side.
        return "core" if hop == CARRIER else "public"

    def _socket_for(self, side, hop):
        """The listener to send from, so that the far end's in-dialog requests come
        back on the socket of its side (the Record-Route names it; rr's double
        Record-Route when the two sides differ)."""
        sockets = CORE_SOCKETS if side == "core" else PUBLIC_SOCKETS
        if not sockets:
            return ""
        m = re.search(r";transport=(\w+)", hop, re.I)
        proto = m.group(1).lower() if m else ("tls" if hop.lower().startswith("sips:") else "udp")
        return "%s:%s" % (proto, sockets[0])

    def _send_socket(self, sock):
        if sock:
            KSR.pv.sets("$fs", sock)

    def _is_ours(self, uri):
        return bool(uri) and KSR.is_myself(uri) > 0

    def _rewrite(self, strip, insert):
        """The verdict's edits to the relayed request: every instance of each
        `strip` name removed (KSR.hdr.remove matches a known header by its type, so
        the compact form too), each `insert` pair appended. False when an edit could
        not be made: nothing is relayed."""
        for name in strip:
            if KSR.hdr.remove(name) < 0:
                KSR.err("trunkguard: cannot remove %s\n" % name)
                return False
        for name, value in insert:
            KSR.hdr.append("%s: %s\r\n" % (name, value))
        return True

    @staticmethod
    def _folded():
        """Whether a header of the request goes on over a line that starts with SP or
        HT (RFC 3261 §7.3.1), or the header block cannot be read. Relayed as it came,
        such a line would read as a header of its own to a parser that does not
        unfold: a forged trunk-group header or identity before the edge's own. The
        module unfolds them in place (trunkguard_apply()); KEMI has no in-place edit
        of a byte range, and removing a header to write it again unfolded would move
        what Kamailio itself writes into it later (Content-Length, the Via's
        received), so the shim relays no folded request."""
        try:
            block = KSR.pv.get("$msg(hdrs)")
        except UnicodeDecodeError:
            return True
        return block is None or _FOLD.search(block) is not None

    def _relay(self, strip=(), insert=(), within_transaction=False):
        # Wherever it goes ($du, else the Request-URI), never back into this edge:
        # a request addressed to the edge itself would loop until Max-Forwards ran out.
        # (A CANCEL or hop-by-hop ACK follows its INVITE's transaction instead.)
        if not within_transaction and self._is_ours(KSR.pv.get("$du") or KSR.pv.get("$ru")):
            return self._refuse(482, "Loop Detected")
        # Kamailio leaves Max-Forwards alone unless told; the policy answers 483 when
        # it arrives at 0, this keeps a loop through the edge from going round forever.
        if KSR.maxfwd.process_maxfwd(70) < 0:
            return self._refuse(483, "Too Many Hops")
        if self._folded():
            return self._refuse(400, "Bad Request (folded header)")
        if not self._rewrite(strip, insert):
            return self._refuse(500, "Server Internal Error (policy edits)")
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()
        return -255

    # --- alerts -------------------------------------------------------------------

    def _spool(self, alerts):
        """Writes each alert to the spool directory (a local rename, never a network
        call in a SIP worker); the timer process delivers them."""
        for alert in alerts:
            self.alert_seq += 1
            name = "%d-%d-%d.json" % (_now_ms(), os.getpid(), self.alert_seq)
            tmp = os.path.join(SPOOL_DIR, "." + name)
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(alert)
                os.rename(tmp, os.path.join(SPOOL_DIR, name))
                _count("alerts.spooled")
            except OSError as e:
                _count("alerts.dropped")
                KSR.err("trunkguard: alert lost, cannot spool it: %s: %s\n" % (e, alert))

    def _deliver(self):
        if not ALERT_URL or time.monotonic() < self.next_delivery:
            return
        try:
            names = sorted(n for n in os.listdir(SPOOL_DIR) if n.endswith(".json") and not n.startswith("."))
        except OSError as e:
            KSR.err("trunkguard: cannot read alert spool %s: %s\n" % (SPOOL_DIR, e))
            return
        # Bounded per tick, so a slow receiver cannot hold the timer (which also
        # applies publications) for long.
        deadline = time.monotonic() + 2 * DELIVERY_TIMEOUT_S
        for name in names[:100]:
            if time.monotonic() > deadline:
                return
            path = os.path.join(SPOOL_DIR, name)
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError:
                continue
            outcome = self._post(body)
            if outcome == "refused":
                # The receiver will never take this one (malformed for it, bad token):
                # kept aside for the operator instead of retried forever.
                self._set_aside(name)
            elif outcome == "sent":
                try:
                    os.unlink(path)
                except OSError:
                    pass
                _count("alerts.sent")
                self.backoff = RETRY_MIN_S
            else:
                # Keep it (and everything after it) for the next attempt.
                _count("alerts.retried")
                self.next_delivery = time.monotonic() + self.backoff
                self.backoff = min(self.backoff * 2, RETRY_MAX_S)
                return

    def _post(self, body):
        """POSTs one event: "sent", "refused" (for good) or "retry"."""
        self._read_token()
        request = urllib.request.Request(ALERT_URL, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", "Bearer " + self.token)
        # What the answer means is the core's rule, the same in every host
        # (docs/alerts.md, "Posting from a host").
        try:
            with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT_S) as response:
                status, detail = response.status, ""
        except urllib.error.HTTPError as e:
            status, detail = e.code, str(e)
        except (OSError, ValueError, http.client.HTTPException) as e:
            status, detail = None, str(e)
        outcome = tg.alert_delivery(status)
        if outcome == "refused":
            KSR.err("trunkguard: alert refused by %s with %d, kept in %s/rejected\n" % (ALERT_URL_SHOWN, status, SPOOL_DIR))
        elif outcome == "retry":
            KSR.warn("trunkguard: alert delivery to %s failed: %s\n"
                     % (ALERT_URL_SHOWN, _error_shown(detail or status)))
        return outcome

    def _read_token(self):
        """(Re)reads the token file when it changed since the last read (inode, size,
        modification time: a rewrite in place or a new file renamed over it), so a
        corrected token is used from the next delivery on, with no restart."""
        if not ALERT_TOKEN_FILE:
            return
        try:
            st = os.stat(ALERT_TOKEN_FILE)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
            if seen == self.token_seen:
                return
            with open(ALERT_TOKEN_FILE, encoding="utf-8") as f:
                token = f.read().strip()
            if not token and self.token:
                # Caught between the truncation and the write of an edit in place:
                # the last token serves this delivery, the next one reads again.
                return
            self.token = token
            if self.token_seen is not None:
                KSR.info("trunkguard: alert token %s changed: read again\n" % (ALERT_TOKEN_FILE,))
            self.token_seen = seen
        except OSError as e:
            # The last token read (if any) stays in use; tried again next delivery.
            KSR.err("trunkguard: cannot read alert token %s: %s\n" % (ALERT_TOKEN_FILE, e))

    def _set_aside(self, name):
        try:
            os.makedirs(os.path.join(SPOOL_DIR, "rejected"), exist_ok=True)
            os.rename(os.path.join(SPOOL_DIR, name), os.path.join(SPOOL_DIR, "rejected", name))
            _count("alerts.rejected")
        except OSError as e:
            KSR.err("trunkguard: cannot set alert %s aside: %s\n" % (name, e))


# The configured nonce secret (TRUNKGUARD_NONCE_SECRET_FILE), read by mod_init in the
# main process; the workers write it to the table in child_init.
NONCE_SECRET = None


def mod_init():
    global NONCE_SECRET
    if NONCE_SECRET_FILE:
        # Raising here stops Kamailio before it forks: a node that would issue nonces
        # its peers refuse (or that trusts a secret others can read) does not start.
        NONCE_SECRET = _read_nonce_secret(NONCE_SECRET_FILE)
    elif DMQ:
        # A DMQ node making its own secret whenever its table has none would have it
        # replaced by the peer's initial sync seconds later, refusing the nonces it
        # issued in between (docs/kamailio.md, "Replication across nodes (DMQ)").
        raise RuntimeError("trunkguard: TRUNKGUARD_DMQ is set but TRUNKGUARD_NONCE_SECRET_FILE is not: "
                           "give every node the same nonce secret file; not starting")
    if DRILLS:
        KSR.warn("trunkguard: drills enabled (TRUNKGUARD_DRILLS=1): tgctl %s refuses store writes\n"
                 % (DRILL_FAIL_WRITE,))
    store = _state_store(STORE)  # an unknown TRUNKGUARD_STORE raises: not starting
    if store is None:
        KSR.info("trunkguard: state store: memory (a restart forgets every registration)\n")
    elif not KSR.htable.sht_get(CTL_TABLE, STORE_STARTED):
        # Once, when Kamailio starts: app_python.reload calls mod_init again in every
        # process, where loading Redis into the table would undo newer writes and, with
        # DMQ, replicate every item.
        try:
            items = store.start()
        except Exception as e:
            raise RuntimeError("trunkguard: cannot read the state store %s: %s; not starting"
                               % (store.describe(), e)) from None
        KSR.htable.sht_seti(CTL_TABLE, STORE_STARTED, 1)
        KSR.info("trunkguard: state store %s: %d items at start\n" % (store.describe(), items))
    if not ALERT_URL:
        # Alerts are still spooled (nothing is lost), but nobody hears of them until
        # an alert URL is set: said once here, and by `tgctl status`.
        KSR.warn("trunkguard: no alert URL (TRUNKGUARD_ALERT_URL, run --alert-url): alerts are kept in %s "
                 "and delivered to nobody\n" % (SPOOL_DIR,))
    return Shim()
