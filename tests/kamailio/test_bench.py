"""scripts/bench-kamailio with a tiny load: every edge (Kamailio's own auth and
registrar, the policy in Kamailio's script, the KEMI shim, the native module) comes
up beside the others on its own ports of 127.0.0.1 and carries sipp's registrations
and calls without a failure, over two rounds (the second moves every edge to other
ports). docs/performance.md publishes this command's ratios; a bench that no longer
runs, or whose cfgs no longer carry the load, would publish nothing or a figure of
failed transactions. The figures themselves are not checked: speed is measured
side by side, never asserted in a test.

Run by scripts/test-kamailio after the Kamailio suites, which install Kamailio, sipp,
the extension and trunkguard.so. Bounded: about ten seconds, two and a half minutes at most.
"""

import json
import os
import signal
import subprocess
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "scripts", "bench-kamailio")
EDGES = ("baseline", "native-policy", "shim", "module")
REGISTERS, CALLS = 20, 5


def run_bench(args, deadline_s):
    """(exit code, stdout, stderr). At the deadline the bench gets a SIGTERM, which
    stops its edges (they run in sessions of their own, out of reach of a kill)."""
    proc = subprocess.Popen([BENCH] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        raise AssertionError("bench-kamailio ran past %d s:\n%s%s" % (deadline_s, out, err))
    return proc.returncode, out, err


class BenchKamailio(unittest.TestCase):
    def test_every_edge_carries_registrations_and_calls_side_by_side(self):
        # sipp gives up on a transaction after 10 s: a broken edge fails the run in
        # seconds, not after sipp's default two minutes a phase.
        code, out, err = run_bench(["--no-install", "--rounds", "2", "--registers", str(REGISTERS), "--calls",
                                    str(CALLS), "--rate", "50", "--sipp-timeout", "10"], 150)
        self.assertEqual(code, 0, out + err)
        rows = {}
        for line in out.splitlines():
            cols = line.split()
            if cols and cols[0] in EDGES:
                rows[cols[0]] = cols
        self.assertEqual(set(rows), set(EDGES), out)
        for name, cols in rows.items():
            # The last column: failed registrations / failed calls over both rounds.
            self.assertEqual(cols[-1], "0/0", "%s: %s" % (name, out))
        # Each edge's own figures of each round (the bench's stderr): sipp's counts of
        # what went through, and CPU time spent by that edge's Kamailio on it.
        rounds = [line.split(None, 3) for line in err.splitlines() if line.startswith("round ")]
        self.assertEqual(sorted((r[1], r[2]) for r in rounds),
                         sorted((str(n), e) for n in (1, 2) for e in EDGES), err)
        for _, n, edge, figures in rounds:
            m = json.loads(figures)
            self.assertEqual((m["register_ok"], m["call_ok"]), (REGISTERS, CALLS), "%s round %s" % (edge, n))
            self.assertGreater(m["register_cpu_us"], 0, "%s round %s" % (edge, n))
            self.assertGreater(m["call_cpu_us"], 0, "%s round %s" % (edge, n))


if __name__ == "__main__":
    unittest.main()
