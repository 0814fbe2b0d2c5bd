"""scripts/bench-kamailio with a tiny load: every edge (Kamailio's own auth and
registrar, the policy in Kamailio's script, the KEMI shim, the native module) comes
up beside the others on its own ports of 127.0.0.1 and carries sipp's registrations
and calls without a failure, over two rounds (the second moves every edge to other
ports). docs/performance.md publishes this command's ratios; a bench that no longer
runs, or whose cfgs no longer carry the load, would publish nothing or a figure of
failed transactions. The figures themselves are not checked: speed is measured
side by side, never asserted in a test.

Run by scripts/test-kamailio after the Kamailio suites, which install Kamailio, sipp,
the extension and trunkguard.so. Bounded: about ten seconds, three minutes at most.
"""

import os
import subprocess
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "scripts", "bench-kamailio")
EDGES = ("baseline", "native-policy", "shim", "module")


class BenchKamailio(unittest.TestCase):
    def test_every_edge_carries_registrations_and_calls_side_by_side(self):
        run = subprocess.run([BENCH, "--no-install", "--rounds", "2", "--registers", "20", "--calls", "5",
                              "--rate", "50"], capture_output=True, text=True, timeout=180)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        rows = {}
        for line in run.stdout.splitlines():
            cols = line.split()
            if cols and cols[0] in EDGES:
                rows[cols[0]] = cols
        self.assertEqual(set(rows), set(EDGES), run.stdout)
        for name, cols in rows.items():
            # The last column: failed registrations / failed calls over both rounds.
            self.assertEqual(cols[-1], "0/0", "%s: %s" % (name, run.stdout))
        # Each round's registrations and calls on every edge, read from sipp's own
        # counts (the bench's stderr, one line per edge and round).
        rounds = [line for line in run.stderr.splitlines() if line.startswith("round ")]
        self.assertEqual(len(rounds), 2 * len(EDGES), run.stderr)
        for line in rounds:
            self.assertIn('"register_ok": 20', line)
            self.assertIn('"call_ok": 5', line)


if __name__ == "__main__":
    unittest.main()
