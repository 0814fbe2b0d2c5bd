"""Installing trunkguard harms nothing already on the machine.

host-shims/kamailio/install (through scripts/apt-install) must never stop, disable,
restart or start a service: a production Kamailio may already run on the machine,
and Debian's kamailio package would start (or, upgraded, restart) its own service
from its maintainer scripts. docs/deployment.md, "Debian's own Kamailio service".

A stand-in "system" Kamailio (the real kamailio binary, a minimal cfg of its own on
a 127.0.0.1 port) runs throughout. install runs with recording fakes of systemctl,
service, invoke-rc.d, deb-systemd-invoke, deb-systemd-helper and update-rc.d first
on PATH, a dpkg that reports the packages missing and an apt-get that records its
arguments and then does what kamailio's postinst does: asks policy-rc.d whether
kamailio.service may start, and starts it through systemctl unless told 101.

install runs from a copy of the repository's install and apt-install scripts in a
scratch tree whose scripts/build and maturin are stubs (these tests judge packages and
services, not the build; a stub leaves target/ and the cargo lock alone).

    python3 -m unittest -v tests/ops/test_install.py
"""

import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL = os.path.join(ROOT, "host-shims", "kamailio", "install")
APT_INSTALL = os.path.join(ROOT, "scripts", "apt-install")
SERVICE_TOOLS = ["systemctl", "service", "invoke-rc.d", "deb-systemd-invoke",
                 "deb-systemd-helper", "update-rc.d"]


def write_exec(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).lstrip())
    os.chmod(path, 0o755)


def free_udp_port():
    for _ in range(100):
        port = random.randint(30000, 39999)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port on 127.0.0.1")


def options(port, timeout=1.0):
    """The status line of the answer to an OPTIONS sent to 127.0.0.1:port, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind(("127.0.0.1", 0))
        me = s.getsockname()[1]
        branch = "z9hG4bK-ops-%d" % random.randrange(1 << 30)
        msg = (
            "OPTIONS sip:127.0.0.1:%d SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=%s\r\n"
            "From: <sip:ops@127.0.0.1>;tag=ops1\r\n"
            "To: <sip:127.0.0.1:%d>\r\n"
            "Call-ID: %s@ops\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n" % (port, me, branch, port, branch)
        )
        s.sendto(msg.encode(), ("127.0.0.1", port))
        try:
            return s.recv(4096).decode(errors="replace").split("\r\n", 1)[0]
        except socket.timeout:
            return None


class StandInKamailio:
    """The real kamailio binary with a cfg of its own: what a production Kamailio
    started by someone else looks like to install."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "system-kamailio")
        os.makedirs(self.dir)
        self.port = free_udp_port()
        cfg = os.path.join(self.dir, "kamailio.cfg")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent("""\
                #!KAMAILIO
                debug=1
                log_stderror=yes
                children=1
                auto_aliases=no
                loadmodule "sl.so"
                loadmodule "pv.so"
                request_route {
                    if ($rm == "OPTIONS") { sl_send_reply("200", "System Kamailio"); exit; }
                    sl_send_reply("403", "Forbidden");
                }
                """))
        self.log = open(os.path.join(self.dir, "kamailio.log"), "wb")
        self.proc = subprocess.Popen(
            ["kamailio", "-f", cfg, "-DD", "-E", "-m", "16", "-M", "4", "-Y", self.dir,
             "-l", "udp:127.0.0.1:%d" % self.port],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True,  # its own group: stop() ends every child, only them
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("stand-in kamailio exited: %s" % self.tail())
            if options(self.port, 0.5) == "SIP/2.0 200 System Kamailio":
                return
        self.stop()
        raise RuntimeError("stand-in kamailio does not answer OPTIONS: %s" % self.tail())

    def tail(self):
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


class Fakes:
    """A bin directory of recording fakes and the logs they write."""

    def __init__(self, workdir, missing):
        self.bin = os.path.join(workdir, "bin")
        os.makedirs(self.bin)
        self.services_log = os.path.join(workdir, "services.log")
        self.apt_log = os.path.join(workdir, "apt.log")
        open(self.services_log, "w").close()
        open(self.apt_log, "w").close()
        self.policy = os.path.join(workdir, "policy-rc.d")
        for tool in SERVICE_TOOLS:
            write_exec(os.path.join(self.bin, tool), """\
                #!/bin/sh
                echo "$(basename "$0") $*" >> "%s"
                exit 0
                """ % self.services_log)
        # dpkg -s PKG: the packages named in `missing` are not installed.
        write_exec(os.path.join(self.bin, "dpkg"), """\
            #!/bin/sh
            [ "$1" = -s ] || exit 2
            case " %s " in *" $2 "*) echo "dpkg-query: package '$2' is not installed" >&2; exit 1 ;; esac
            echo "Status: install ok installed"
            """ % " ".join(missing))
        # apt-get: records, then plays kamailio's postinst ("configure" of a fresh
        # install starts the service through deb-systemd-invoke, which asks policy-rc.d).
        write_exec(os.path.join(self.bin, "apt-get"), """\
            #!/bin/sh
            log="%s"
            policy="${TRUNKGUARD_POLICY_RC_D:-/usr/sbin/policy-rc.d}"
            echo "apt-get $*" >> "$log"
            [ "$1" = install ] || exit 0
            if [ -e "$policy" ]; then echo "policy-rc.d present" >> "$log"; fi
            for arg in "$@"; do
              [ "$arg" = kamailio ] || continue
              rc=0
              if [ -x "$policy" ]; then "$policy" kamailio.service start; rc=$?; fi
              if [ "$rc" = 101 ]; then
                echo "postinst: start of kamailio.service refused by policy-rc.d" >> "$log"
              else
                systemctl start kamailio.service
              fi
            done
            exit 0
            """ % self.apt_log)

    def env(self, **extra):
        env = dict(os.environ)
        env["PATH"] = self.bin + os.pathsep + env["PATH"]
        env["TRUNKGUARD_POLICY_RC_D"] = self.policy
        env.update(extra)
        return env

    def service_calls(self):
        with open(self.services_log, encoding="utf-8") as f:
            return f.read().splitlines()

    def apt(self):
        with open(self.apt_log, encoding="utf-8") as f:
            return f.read().splitlines()


def scratch_tree(workdir):
    """A copy of the scripts install runs, with the build stubbed out."""
    tree = os.path.join(workdir, "repo")
    for rel in ("host-shims/kamailio/install", "scripts/apt-install"):
        dest = os.path.join(tree, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dest)
    write_exec(os.path.join(tree, "scripts", "build"), """\
        #!/bin/sh
        echo "build (stub)" >&2
        """)
    # The native module's build (crates/kamailio-module/build, after cargo builds its
    # static library): stubbed too, with a cargo that only says what it was asked.
    module_build = os.path.join(tree, "crates", "kamailio-module", "build")
    os.makedirs(os.path.dirname(module_build))
    write_exec(module_build, """\
        #!/bin/sh
        echo "module build (stub)" >&2
        """)
    os.makedirs(os.path.join(tree, "bin"))
    write_exec(os.path.join(tree, "bin", "cargo"), """\
        #!/bin/sh
        echo "cargo $* (stub)" >&2
        """)
    maturin = os.path.join(tree, "target", "py-build", "bin", "maturin")
    os.makedirs(os.path.dirname(maturin))
    # `maturin build ... --out DIR`: a wheel is a zip; this one holds a placeholder.
    write_exec(maturin, """\
        #!/usr/bin/python3
        import os, sys, zipfile
        out = sys.argv[sys.argv.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        with zipfile.ZipFile(os.path.join(out, "trunkguard_kamailio-0.0.0-stub.whl"), "w") as z:
            z.writestr("trunkguard_kamailio/__init__.py", "# stub\\n")
        """)
    return tree


class InstallLeavesServicesAlone(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="tg-ops-install-")
        cls.kamailio = StandInKamailio(cls.work)
        cls.pid = cls.kamailio.proc.pid

    @classmethod
    def tearDownClass(cls):
        cls.kamailio.stop()
        shutil.rmtree(cls.work, ignore_errors=True)

    def setUp(self):
        self.case = tempfile.mkdtemp(dir=self.work)

    def assertKamailioUntouched(self):
        self.assertIsNone(self.kamailio.proc.poll(), "the system Kamailio exited: " + self.kamailio.tail())
        self.assertEqual(self.kamailio.proc.pid, self.pid)
        self.assertEqual(options(self.kamailio.port, 2.0), "SIP/2.0 200 System Kamailio")

    def test_install_with_packages_missing_stops_disables_and_starts_nothing(self):
        fakes = Fakes(self.case, ["kamailio", "kamailio-python3-modules", "sip-tester"])
        tree = scratch_tree(self.case)
        target = os.path.join(tree, "target")
        env = fakes.env(CARGO_TARGET_DIR=target)
        env["PATH"] = os.path.join(tree, "bin") + os.pathsep + env["PATH"]
        out = subprocess.run(
            [os.path.join(tree, "host-shims", "kamailio", "install")],
            env=env, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip().splitlines()[-1], os.path.join(target, "kamailio-py"))
        self.assertTrue(os.path.exists(os.path.join(target, "kamailio-py", "trunkguard_kamailio", "__init__.py")))

        self.assertEqual(fakes.service_calls(), [], "install called the service manager")
        apt = fakes.apt()
        self.assertIn("apt-get update -qq", apt)
        installs = [line.split()[1:] for line in apt if line.startswith("apt-get install")]
        self.assertEqual(len(installs), 1, apt)
        self.assertEqual({w for w in installs[0] if not w.startswith("-")} - {"install"},
                         {"kamailio", "kamailio-python3-modules", "sip-tester"})
        # The policy existed during the apt-get run, refused the start, and is gone.
        self.assertIn("policy-rc.d present", apt)
        self.assertIn("postinst: start of kamailio.service refused by policy-rc.d", apt)
        self.assertFalse(os.path.exists(fakes.policy), "the policy-rc.d outlived the apt-get run")
        self.assertEqual([n for n in os.listdir(self.case) if n.startswith("policy-rc.d")], [])
        self.assertKamailioUntouched()

    def test_a_policy_rc_d_of_the_machine_is_left_as_it_is(self):
        fakes = Fakes(self.case, ["kamailio"])
        theirs = "#!/bin/sh\n# the administrator's own policy\nexit 101\n"
        with open(fakes.policy, "w", encoding="utf-8") as f:
            f.write(theirs)
        os.chmod(fakes.policy, 0o750)
        out = subprocess.run([APT_INSTALL, "kamailio"], env=fakes.env(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        with open(fakes.policy, encoding="utf-8") as f:
            self.assertEqual(f.read(), theirs)
        self.assertEqual(stat.S_IMODE(os.stat(fakes.policy).st_mode), 0o750)
        self.assertEqual(fakes.service_calls(), [])
        self.assertKamailioUntouched()

    def test_nothing_missing_runs_no_apt_get(self):
        fakes = Fakes(self.case, [])
        out = subprocess.run([APT_INSTALL, "kamailio", "sip-tester"], env=fakes.env(),
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(fakes.apt(), [])
        self.assertEqual(fakes.service_calls(), [])
        self.assertFalse(os.path.exists(fakes.policy))

    def test_no_script_changes_a_service(self):
        # What the scripts and shims run (those with a #! line): none may start,
        # stop, restart, reload, enable, disable or mask a service of the machine.
        # Exempt: a Debian package's maintainer scripts (host-shims/debian/*.postinst,
        # .prerm, .postrm), which manage the package's own trunkguard-* units, and any
        # line that names a trunkguard-* unit, which this project creates.
        import re

        tools = r"(?:systemctl|service|invoke-rc\.d|deb-systemd-invoke|deb-systemd-helper|update-rc\.d)"
        verbs = r"(?:start|stop|restart|try-restart|reload|force-reload|condrestart|enable|disable|mask|kill|remove|defaults)"
        shell = re.compile(r"(?:^|[;&|(`]|\bsudo|\bthen|\bdo|\belse)\s*" + tools + r"\b[^#\n;&|]*?\b" + verbs + r"\b")
        python = re.compile(r"""["']""" + tools + r"""["']\s*,\s*(?:["'][^"']*["']\s*,\s*)*["']""" + verbs + r"""["']""")
        offenders = []
        for top in ("scripts", "host-shims"):
            for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
                dirnames[:] = [d for d in dirnames if d not in ("node_modules", "target", "__pycache__")]
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    try:
                        with open(path, encoding="utf-8") as f:
                            text = f.read()
                    except (UnicodeDecodeError, OSError):
                        continue
                    if not text.startswith("#!") and not name.endswith((".py", ".sh")):
                        continue
                    if name.endswith((".preinst", ".postinst", ".prerm", ".postrm")):
                        continue
                    for n, line in enumerate(text.splitlines(), 1):
                        code = line.split("#", 1)[0] if not line.lstrip().startswith("#!") else ""
                        if "trunkguard-" in code:
                            continue
                        if shell.search(code) or python.search(code):
                            offenders.append("%s:%d: %s" % (os.path.relpath(path, ROOT), n, line.strip()))
        self.assertEqual(offenders, [], "scripts that change a service of the machine")


if __name__ == "__main__":
    unittest.main(verbosity=2)
