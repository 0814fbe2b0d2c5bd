"""What the two-node DMQ tests share: DmqPair in test_kamailio.py (nodes started by
host-shims/kamailio/run --engine shim --dmq, whose kemi-shim.cfg sets the dmq modparams) and
NativeModuleDmq in test_module.py (nodes of the native module's own cfg, which its
Node writes). Both give the nodes one nonce secret file and wait until each node
sees its peer active before testing replication; how a node is configured and
started differs in substance, so that stays in each file."""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2e import wait_for  # noqa: E402


def write_secret(directory, name, text, mode):
    """`text` and a newline in the file `name` of `directory`, with exactly `mode`
    whatever the umask; returns its path."""
    path = os.path.join(directory, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)  # whatever the umask
    return path


def wait_peers_active(ctls, kamcmd="kamcmd"):
    """Returns once each node (`ctls`: a name for each node's ctl socket path) lists
    two nodes active in `kamcmd dmq.list_nodes`: itself and its peer."""
    # Kamailio 5.6's dmq marks a peer not active when the notification it sent while
    # the peer was still down times out (tm fr_timer, 5 s in both cfgs), even if the
    # peer has announced itself since; it is active again at the next ping (dmq
    # ping_interval, 10 s in both), and htable replicates to active peers only. So:
    # both peers seen active once that timeout is past.
    time.sleep(6.0)
    for name, ctl in ctls.items():
        wait_for("node %s to see its peer" % name, lambda: subprocess.run(
            [kamcmd, "-s", "unix:" + ctl, "dmq.list_nodes"], capture_output=True, text=True,
            timeout=10).stdout.count("status: active") >= 2, timeout=25)
