"""Helpers the end-to-end suites share (tests/envoy, tests/kamailio, tests/packages):
waiting for a condition with a deadline instead of sleeping, so that every test is
bounded in time and fails with what it waited for."""

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
