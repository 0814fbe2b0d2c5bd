"""Helpers the end-to-end suites share (tests/envoy, tests/kamailio, tests/packages):
waiting for a condition with a deadline instead of sleeping, so that every test is
bounded in time and fails with what it waited for; a UDP socket a thread listens on."""

import socket
import threading
import time


def wait_for(what, check, timeout=15.0, interval=0.1):
    """Calls `check` until it returns something true, and returns that; raises
    AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class UdpListener:
    """A UDP socket bound to `addr` and a thread that reads it: each datagram, decoded
    as latin-1 (every byte kept), goes to `received(text, sender)`, which keeps it in
    `got` as (arrival time, text); a subclass that answers overrides it. `reuse` sets
    SO_REUSEADDR before the bind. A context manager: close() stops the thread."""

    def __init__(self, addr, reuse=False):
        self.addr = addr
        self.got = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if reuse:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        # How often the thread looks at `running`: close() takes at most this long.
        self.sock.settimeout(0.1)
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while self.running:
            try:
                data, sender = self.sock.recvfrom(65536)
            except (socket.timeout, OSError):
                continue
            self.received(data.decode("latin-1"), sender)

    def received(self, text, sender):
        self.got.append((time.time(), text))

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
