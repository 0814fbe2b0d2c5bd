"""The Debian packages, installed: scripts/package builds them, `dpkg -i` installs
them (apt-get install -f for their Depends), and the services start from their
installed units as the unit says.

There is no systemd as PID 1 on the test machine (`ps -p 1`), so the installed unit
files are read ([Service] User, Group, Environment, EnvironmentFile, WorkingDirectory,
UMask, StateDirectory, ExecStartPre, ExecStart, ExecReload) and their commands run as
systemd would run them: `runuser -u trunkguard -g trunkguard --` with only the unit's
environment, its umask and working directory, in a session of their own whose
process group stands for the unit's cgroup. A setting the emulation does not know
stops the test (a new unit line is never silently skipped); the sandboxing lines
(ProtectSystem=, ...) are the ones knowingly not applied. Where systemd is PID 1,
systemctl starts and stops the units instead.

The smoke, loopback only:
  127.0.0.1:8475   the alert relay (trunkguard-alerts.service, its --listen set in
                   /etc/trunkguard/alerts.env)
  127.0.0.1:5460   Kamailio's public listener, 127.0.0.1:5480 its core listener
                   (trunkguard-kamailio.service, /etc/trunkguard/kamailio.env)
  127.0.0.1:5490   the carrier, a sipp UAS
  127.0.0.1        the PBX of hq-pbx1 (sipp: registers with digest, calls)
  127.0.0.2        the same credentials from elsewhere: 403

The trunk configuration the PBX's credentials are in is published with the installed
tgctl (the unit's ExecReload) after Kamailio started with another one. Only the
processes this test started are stopped; afterwards the packages are purged and the
user trunkguard removed (when the test made it), and the machine is compared with
what it was before. Debian's own kamailio service is neither started (a policy-rc.d
answers 101 during the installation, unless the machine has one of its own) nor
stopped.

Run by scripts/test after the Kamailio stage (which installs Kamailio, its Python
module and sipp, and builds target/kamailio-py); needs root.
"""

import hashlib
import json
import os
import pwd
import grp
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import sys
import time
import unittest
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from e2e import wait_for  # noqa: E402
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
PACKAGE_SCRIPT = os.path.join(ROOT, "scripts", "package")
DEB_DIR = os.path.join(TARGET, "deb")
SCENARIOS = os.path.join(ROOT, "tests", "sipp")

PACKAGES = ["trunkguard", "trunkguard-kamailio", "trunkguard-envoy"]
UNIT_DIR = "/lib/systemd/system"
USER = "trunkguard"
ETC = "/etc/trunkguard"
VAR = "/var/lib/trunkguard"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
POLICY_MARKER = "written by tests/packages/test_packages.py for one dpkg run"

RELAY = ("127.0.0.1", 8475)
EDGE = "127.0.0.1:5460"
CORE_SOCKET = "127.0.0.1:5480"
CARRIER_PORT = 5490
PBX, INTRUDER = "127.0.0.1", "127.0.0.2"
PBX_PORT = 5482
REALM = "trunks.example.net"
HQ = ("hq1", "pkg-s3cret")
CALLED = "+15559876543"

# systemd's own environment for a service with User= (systemd.exec(5), "Environment
# Variables in Spawned Processes"); PATH as systemd sets it for system services.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def ha1(user, password):
    return hashlib.md5(("%s:%s:%s" % (user, REALM, password)).encode()).hexdigest()


def trunk_config(password):
    return {
        "realm": REALM,
        "core_networks": ["127.0.0.9/32"],
        "core_sockets": [CORE_SOCKET],
        "registration": {"min_expires": 60, "max_expires": 3600},
        "locations": [{
            "id": "hq", "contacts": ["noc@example.com"],
            "trunk_groups": [{"id": "hq-pbx1", "username": HQ[0], "ha1": ha1(HQ[0], password),
                              "require_registration": True, "dids": ["+15551230000"]}],
        }],
    }


def run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def dpkg_status(pkg):
    out = run(["dpkg-query", "-W", "-f", "${Status}", pkg])
    return out.stdout.strip() if out.returncode == 0 else "not-installed"


def write_secret(path, text):
    """A file of /etc/trunkguard as an administrator writes one: 0600, owner trunkguard."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chown(tmp, pwd.getpwnam(USER).pw_uid, grp.getgrnam(USER).gr_gid)
    os.rename(tmp, path)


def processes_in_group(pgid):
    """(pid, comm, uid) of every process in the process group."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, encoding="latin-1") as f:
                text = f.read()
            comm = text[text.index("(") + 1:text.rindex(")")]
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:
                continue
            with open("/proc/%s/status" % name, encoding="latin-1") as f:
                uid = int(re.search(r"(?m)^Uid:\s+(\d+)", f.read()).group(1))
            found.append((int(name), comm, uid))
        except (OSError, ValueError, AttributeError):
            continue
    return found


def kamailio_pids():
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/comm" % name, encoding="latin-1") as f:
                    if f.read().strip() == "kamailio":
                        pids.add(int(name))
            except OSError:
                pass
    return pids


def kamailio_modules():
    """Kamailio's module directory, as the installed package has it (its tm.so)."""
    found = [os.path.dirname(p) for p in run(["dpkg", "-L", "kamailio"]).stdout.split() if p.endswith("/tm.so")]
    return found[0] if len(found) == 1 else None


def machine_snapshot():
    """What installing and purging must leave as it was."""
    snap = {}
    if kamailio_modules():
        native = os.path.join(kamailio_modules(), "trunkguard.so")
        snap[native] = os.path.lexists(native)
    for path in (ETC, VAR, "/usr/lib/trunkguard", "/usr/share/doc/trunkguard", "/usr/sbin/tgctl",
                 "/usr/bin/trunkguard", POLICY_RC_D):
        snap[path] = os.path.lexists(path)
    for unit in ("trunkguard-alerts.service", "trunkguard-kamailio.service", "trunkguard-envoy.service"):
        snap[UNIT_DIR + "/" + unit] = os.path.lexists(os.path.join(UNIT_DIR, unit))
    for top in ("/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled",
                "/var/lib/systemd/deb-systemd-helper-masked"):
        names = []
        for dirpath, dirnames, filenames in os.walk(top):
            names += [os.path.join(dirpath, n) for n in dirnames + filenames if "trunkguard" in n]
        snap[top] = sorted(names)
    for name, lookup in (("user", pwd.getpwnam), ("group", grp.getgrnam)):
        try:
            lookup(USER)
            snap[name] = True
        except KeyError:
            snap[name] = False
    for pkg in PACKAGES:
        snap["dpkg:" + pkg] = dpkg_status(pkg)
    return snap


# --- the unit files, read as systemd reads them -------------------------------------

class Unit:
    """The [Service] section of an installed unit file (systemd.syntax(7),
    systemd.service(5), systemd.exec(5)), as far as this test runs it."""

    APPLIED = {"Type", "User", "Group", "Environment", "EnvironmentFile", "WorkingDirectory", "UMask",
               "StateDirectory", "StateDirectoryMode", "ExecStartPre", "ExecStart", "ExecReload"}
    # Not applied: restarts and timeouts (nothing here restarts), and the sandbox,
    # which only takes rights away (the service runs with more of them here than
    # under systemd: a write outside ReadWritePaths= would pass here).
    NOT_APPLIED = {"Restart", "RestartSec", "TimeoutStopSec", "TimeoutStartSec", "ReadWritePaths",
                   "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem",
                   "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                   "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
                   "ProtectHostname", "ProtectProc", "RestrictNamespaces", "RestrictRealtime",
                   "RestrictSUIDSGID", "LockPersonality", "RemoveIPC", "RestrictAddressFamilies",
                   "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
                   "MemoryDenyWriteExecute", "LimitNOFILE", "KillMode", "KillSignal"}

    def __init__(self, name):
        self.name = name
        self.path = os.path.join(UNIT_DIR, name)
        self.sections = {}
        section = None
        pending = ""
        with open(self.path, encoding="utf-8") as f:
            for raw in f:
                line = raw.rstrip("\n")
                if not pending and line.lstrip().startswith(("#", ";")):
                    continue
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line = (pending + line).strip()
                pending = ""
                if not line:
                    continue
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1]
                    self.sections.setdefault(section, [])
                    continue
                key, _, value = line.partition("=")
                self.sections[section].append((key.strip(), value.strip()))
        self.service = self.sections.get("Service", [])
        unknown = sorted({k for k, _ in self.service} - self.APPLIED - self.NOT_APPLIED)
        if unknown:
            raise AssertionError("%s: [Service] %s: not emulated by this test (teach Unit, or use systemd)"
                                 % (name, ", ".join(unknown)))
        if self.one("Type", "simple") not in ("simple", "exec"):
            raise AssertionError("%s: Type=%s is not emulated" % (name, self.one("Type")))

    def all(self, key):
        return [v for k, v in self.service if k == key]

    def one(self, key, default=None):
        values = self.all(key)
        return values[-1] if values else default

    def environment(self):
        """systemd's variables for the service, then Environment=, then EnvironmentFile=."""
        user = pwd.getpwnam(self.one("User", "root"))
        env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "HOME": user.pw_dir, "USER": user.pw_name,
               "LOGNAME": user.pw_name, "SHELL": user.pw_shell}
        for value in self.all("Environment"):
            for assignment in shlex.split(value):
                k, _, v = assignment.partition("=")
                env[k] = v
        for value in self.all("EnvironmentFile"):
            optional = value.startswith("-")
            path = value.lstrip("-")
            if not os.path.exists(path):
                if optional:
                    continue
                raise AssertionError("%s: EnvironmentFile %s is missing" % (self.name, path))
            env.update(read_environment_file(path))
        return env

    def command(self, key):
        """ExecStart=-style lines as argument lists: prefix, then words after expansion
        ($NAME alone: split at whitespace; ${NAME}: one word)."""
        env = self.environment()
        commands = []
        for value in self.all(key):
            prefix = re.match(r"[-@:+!]*", value).group(0)
            if set(prefix) - {"-"}:
                raise AssertionError("%s: %s prefix %r is not emulated" % (self.name, key, prefix))
            if "%" in value.replace("%%", ""):
                raise AssertionError("%s: %s specifiers are not emulated: %s" % (self.name, key, value))
            words = []
            for word in shlex.split(value[len(prefix):].replace("%%", "%")):
                whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
                if whole:
                    words += env.get(whole.group(1), "").split()
                else:
                    words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
            commands.append((prefix, words))
        return commands


def read_environment_file(path):
    """KEY=VALUE lines, # and ; comments, quotes removed (systemd.exec(5), EnvironmentFile=)."""
    env = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            k, _, v = line.partition("=")
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
                v = v[1:-1]
            env[k.strip()] = v
    return env


class Emulated:
    """Runs a unit's commands as systemd would, without systemd."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.running = {}

    def _argv(self, unit, words):
        env = unit.environment()
        user, group = unit.one("User", "root"), unit.one("Group", unit.one("User", "root"))
        umask = unit.one("UMask", "0022")
        wd = unit.one("WorkingDirectory", "/")
        return ["runuser", "-u", user, "-g", group, "--", "env", "-i"] \
            + ["%s=%s" % kv for kv in sorted(env.items())] \
            + ["/bin/sh", "-c", 'umask "$1" && cd "$2" && shift 2 && exec "$@"', unit.name, umask, wd] + words

    def _state_directories(self, unit):
        user, group = unit.one("User", "root"), unit.one("Group", unit.one("User", "root"))
        mode = int(unit.one("StateDirectoryMode", "0755"), 8)
        for value in unit.all("StateDirectory"):
            for rel in value.split():
                path = os.path.join("/var/lib", rel)
                os.makedirs(path, exist_ok=True)
                os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
                os.chmod(path, mode)

    def start(self, name):
        unit = Unit(name)
        self._state_directories(unit)
        for prefix, words in unit.command("ExecStartPre"):
            out = run(self._argv(unit, words), timeout=60)
            if out.returncode != 0 and "-" not in prefix:
                raise AssertionError("%s ExecStartPre %s: %s%s" % (name, words, out.stdout, out.stderr))
        starts = unit.command("ExecStart")
        if len(starts) != 1:
            raise AssertionError("%s: one ExecStart= expected, got %d" % (name, len(starts)))
        log = open(os.path.join(self.workdir, name + ".log"), "wb")
        proc = subprocess.Popen(self._argv(unit, starts[0][1]), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.running[name] = proc
        return starts[0][1]

    def reload(self, name):
        unit = Unit(name)
        outs = [run(self._argv(unit, words), timeout=60) for _, words in unit.command("ExecReload")]
        return outs[-1]

    def alive(self, name):
        proc = self.running.get(name)
        return proc is not None and proc.poll() is None

    def pgid(self, name):
        return self.running[name].pid

    def stop(self, name):
        """SIGTERM to the unit's process group (its cgroup here), SIGKILL after 15 s."""
        proc = self.running.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and processes_in_group(proc.pid):
                proc.poll()
                time.sleep(0.1)
            if not processes_in_group(proc.pid):
                break
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def log(self, name):
        path = os.path.join(self.workdir, name + ".log")
        with open(path, encoding="latin-1") as f:
            return f.read()


class Systemd:
    """systemctl, where systemd is PID 1."""

    def __init__(self, workdir):
        self.started = []

    def start(self, name):
        out = run(["systemctl", "start", name], timeout=120)
        if out.returncode != 0:
            raise AssertionError("systemctl start %s: %s%s" % (name, out.stdout, out.stderr))
        self.started.append(name)
        return []

    def reload(self, name):
        return run(["systemctl", "reload", name], timeout=60)

    def alive(self, name):
        return run(["systemctl", "is-active", "--quiet", name]).returncode == 0

    def pgid(self, name):
        return None

    def stop(self, name):
        if name in self.started:
            run(["systemctl", "stop", name], timeout=60)
            self.started.remove(name)

    def log(self, name):
        return run(["journalctl", "-u", name, "--no-pager", "-n", "200"]).stdout


def systemd_is_pid_1():
    with open("/proc/1/comm", encoding="latin-1") as f:
        return f.read().strip() == "systemd" and os.path.isdir("/run/systemd/system")


# --- sipp ---------------------------------------------------------------------------

class Sipp:
    """One sipp run of a scenario of tests/sipp, with its message trace."""

    def __init__(self, workdir, name, scenario, args):
        self.name = name
        self.messages = os.path.join(workdir, name + ".messages.log")
        self.errors = os.path.join(workdir, name + ".errors.log")
        cmd = ["sipp", "-sf", os.path.join(SCENARIOS, scenario), "-m", "1", "-nostdin", "-bind_local",
               "-timeout", "30s", "-timeout_error", "-trace_msg", "-message_file", self.messages,
               "-trace_err", "-error_file", self.errors] + args
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.screen = ""

    def wait(self, timeout=40):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.screen = out.decode("latin-1")[-3000:]
        return self.proc.returncode

    def end(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def log(self):
        try:
            with open(self.messages, encoding="latin-1") as f:
                return f.read()
        except OSError:
            return ""

    def explain(self):
        try:
            with open(self.errors, encoding="latin-1") as f:
                errors = f.read()[-3000:]
        except OSError:
            errors = ""
        return "sipp %s exited %s\n--- errors:\n%s\n--- screen:\n%s" % (
            self.name, self.proc.returncode, errors, self.screen)


# --- the tests, in order ------------------------------------------------------------

class InstalledPackages(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise RuntimeError("installs Debian packages: run as root")
        installed = [p for p in PACKAGES if dpkg_status(p) != "not-installed"]
        if installed:
            raise RuntimeError("%s already installed (%s): this test installs and purges them, remove them first"
                               % (", ".join(installed), ", ".join(dpkg_status(p) for p in installed)))
        cls.workdir = tempfile.mkdtemp(prefix="tg-packages-")
        cls.before = machine_snapshot()
        cls.sipps = []
        cls.services = Systemd(cls.workdir) if systemd_is_pid_1() else Emulated(cls.workdir)
        cls.addClassCleanup(cls.leave_machine_as_found)

        out = run([PACKAGE_SCRIPT], timeout=600)
        if out.returncode != 0:
            raise RuntimeError("scripts/package failed:\n%s%s" % (out.stdout, out.stderr))
        cls.debs = [line for line in out.stdout.split() if line.endswith(".deb")]
        if len(cls.debs) != len(PACKAGES):
            raise RuntimeError("scripts/package made %s" % (cls.debs,))

        cls.kamailio_before_install = kamailio_pids()
        cls.install_log = cls.install(cls.debs)

    @classmethod
    def install(cls, debs):
        """dpkg -i, then apt-get install -f for what they depend on, with no service
        started (policy-rc.d 101, invoke-rc.d(8)) unless the machine has its own."""
        ours = False
        if not os.path.lexists(POLICY_RC_D):
            with open(POLICY_RC_D, "x", encoding="utf-8") as f:
                f.write("#!/bin/sh\n# %s: no service starts.\nexit 101\n" % POLICY_MARKER)
            os.chmod(POLICY_RC_D, 0o755)
            ours = True
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            out = run(["dpkg", "-i"] + debs, timeout=300, env=env)
            log = out.stdout + out.stderr
            if out.returncode != 0:
                fix = run(["apt-get", "install", "-f", "-y", "-q", "--no-install-recommends"], timeout=600, env=env)
                log += fix.stdout + fix.stderr
        finally:
            if ours:
                with open(POLICY_RC_D, encoding="utf-8") as f:
                    if POLICY_MARKER in f.read():
                        os.unlink(POLICY_RC_D)
        for pkg in PACKAGES:
            if dpkg_status(pkg) != "install ok installed":
                raise RuntimeError("%s: %s after dpkg -i:\n%s" % (pkg, dpkg_status(pkg), log))
        return log

    @classmethod
    def stop_everything(cls):
        for sipp in cls.sipps:
            sipp.end()
        for name in ("trunkguard-kamailio.service", "trunkguard-alerts.service"):
            cls.services.stop(name)

    @classmethod
    def purge(cls):
        cls.stop_everything()
        for name in ("trunks.json",):
            path = os.path.join(ETC, name)
            if os.path.exists(path):
                os.unlink(path)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        present = [p for p in reversed(PACKAGES) if dpkg_status(p) != "not-installed"]
        out = run(["dpkg", "--purge"] + present, timeout=300, env=env) if present else None
        if not cls.before["user"]:
            try:
                pwd.getpwnam(USER)
                run(["deluser", "--system", "--quiet", USER])
            except KeyError:
                pass
        if not cls.before["group"]:
            try:
                grp.getgrnam(USER)
                run(["delgroup", "--system", "--quiet", "--only-if-empty", USER])
            except KeyError:
                pass
        return out

    @classmethod
    def leave_machine_as_found(cls):
        cls.purge()
        if os.environ.get("KEEP_PACKAGES_TEST_DIR") != "1":
            shutil.rmtree(cls.workdir, ignore_errors=True)

    def tearDown(self):
        for sipp in self.sipps:
            sipp.end()
        self.sipps.clear()

    # --- helpers --------------------------------------------------------------------

    def sipp(self, name, scenario, args):
        s = Sipp(self.workdir, name, scenario, args)
        self.sipps.append(s)
        return s

    def uac(self, name, scenario, ip, creds):
        # The digest uri is the Request-URI (RFC 3261 §22.4); sipp's default is the
        # remote address.
        return self.sipp(name, scenario, ["-i", ip, "-s", CALLED, "-key", "user", creds[0], "-au", creds[0],
                                          "-ap", creds[1], "-auth_uri", "%s@%s" % (CALLED, REALM), EDGE])

    def assert_passed(self, *runs):
        for r in runs:
            code = r.wait()
            self.assertEqual(code, 0, r.explain() + "\n--- kamailio:\n"
                             + self.services.log("trunkguard-kamailio.service")[-4000:])

    def tgctl(self, *args):
        return run(["/usr/sbin/tgctl", *args], timeout=30, cwd="/")

    def relay(self, method, path, body=None, token=None):
        req = urllib.request.Request("http://%s:%d%s" % (RELAY + (path,)), data=body, method=method)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def assert_mode(self, path, mode, owner, group):
        st = os.stat(path)
        self.assertEqual(("%04o" % stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
                          grp.getgrgid(st.st_gid).gr_name), ("%04o" % mode, owner, group), path)

    def assert_runs_as_trunkguard(self, name, comm):
        pgid = self.services.pgid(name)
        if pgid is None:  # systemd: its own User= handling
            return
        procs = [p for p in processes_in_group(pgid) if p[1] == comm]
        self.assertTrue(procs, "no %s process in %s's group: %s" % (comm, name, processes_in_group(pgid)))
        uid = pwd.getpwnam(USER).pw_uid
        self.assertEqual({p[2] for p in procs}, {uid}, procs)

    def pending_alerts(self):
        pending = os.path.join(VAR, "alerts", "pending")
        events = []
        for name in sorted(os.listdir(pending)) if os.path.isdir(pending) else []:
            with open(os.path.join(pending, name), encoding="utf-8") as f:
                events.append((name, json.load(f)))
        return events

    # --- 1. the packages ------------------------------------------------------------

    def test_01_packages_are_well_formed_and_verify(self):
        with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
            version = re.search(r'(?m)^version = "([^"]+)"', f.read()).group(1) + "-1"
        for deb in self.debs:
            fields = {}
            for field in ("Package", "Version", "Architecture", "Maintainer", "Description", "Depends"):
                fields[field] = run(["dpkg-deb", "--field", deb, field]).stdout.strip()
            self.assertEqual(fields["Version"], version, deb)
            self.assertEqual(fields["Architecture"], "amd64", deb)
            self.assertRegex(fields["Maintainer"], r".+ <[^>]+@[^>]+>", deb)
            self.assertGreater(len(fields["Description"].splitlines()), 2, deb)
            members = run(["dpkg-deb", "--info", deb]).stdout
            self.assertRegex(members, r"\bmd5sums\b", deb)
            self.assertRegex(members, r"\bconffiles\b", deb)
        depends = run(["dpkg-query", "-W", "-f", "${Depends}", "trunkguard-kamailio"]).stdout
        for dep in ("trunkguard (= %s)" % version, "kamailio ", "kamailio-python3-modules", "python3"):
            self.assertIn(dep, depends)
        # The package the Depends name is the one that has app_python3 (kemi-shim.cfg).
        self.assertIn("kamailio-python3-modules:", run(["dpkg", "-S", "*/app_python3.so"]).stdout)
        conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}\n"] + PACKAGES).stdout
        for path in ("alerts.env", "kamailio.env", "envoy.env"):
            self.assertIn(os.path.join(ETC, path), conffiles)
        # Every file as its md5sums say (conffiles: as dpkg recorded them).
        verify = run(["dpkg", "--verify"] + PACKAGES)
        self.assertEqual((verify.returncode, verify.stdout), (0, ""), verify.stderr)

    @unittest.skipUnless(shutil.which("lintian"), "lintian is not installed (Debian: lintian)")
    def test_01b_lintian_finds_no_error_or_warning(self):
        out = run(["lintian", "--tag-display-limit", "0"] + self.debs, timeout=300)
        tags = [line for line in out.stdout.splitlines() if re.match(r"[EW]: ", line)]
        self.assertEqual(tags, [], out.stdout + out.stderr)

    # The native module trunkguard.so (crates/kamailio-module) is built from the source
    # of the installed kamailio; Kamailio refuses a module built for another version.

    def test_01c_the_native_module_is_in_kamailios_module_directory(self):
        modules = kamailio_modules()
        self.assertTrue(modules, "no tm.so in dpkg -L kamailio")
        path = os.path.join(modules, "trunkguard.so")
        self.assert_mode(path, 0o644, "root", "root")
        self.assertEqual(run(["dpkg", "-S", path]).stdout.strip(), "trunkguard-kamailio: " + path)

    def test_01d_trunkguard_kamailio_depends_on_the_kamailio_it_was_built_for(self):
        built_for = run(["dpkg-query", "-W", "-f", "${Version}", "kamailio"]).stdout.strip()
        self.assertTrue(built_for)
        depends = run(["dpkg-query", "-W", "-f", "${Depends}", "trunkguard-kamailio"]).stdout
        kamailio = [d.strip() for d in depends.split(",") if re.match(r"\s*kamailio\b(?![-\w])", d)]
        self.assertEqual(kamailio, ["kamailio (= %s)" % built_for], depends)

    def test_01e_kamailio_loads_the_installed_native_module_by_its_name(self):
        # As crates/kamailio-module/build checks the built module, with the name alone:
        # Kamailio finds it in its own module directory (its default mpath).
        cfg = os.path.join(self.workdir, "native-check.cfg")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write('#!KAMAILIO\nlisten=udp:127.0.0.1:5060\nloadmodule "trunkguard.so"\n'
                    'request_route { drop; }\n')
        out = run(["kamailio", "-f", cfg, "-c"], timeout=30)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_01f_the_installed_native_cfg_loads_the_installed_module_and_policy(self):
        # host-shims/kamailio/kamailio.cfg as installed, with its defaults (trunkguard.so
        # by name) and the installed policy and example trunks: Kamailio parses it and
        # fixes up the module's functions (the dialog functions bind to dialog.so).
        out = run(["kamailio", "-c", "-f", "/usr/lib/trunkguard/kamailio/kamailio.cfg",
                   "-l", "udp:127.0.0.1:5060", "-A", 'TG_WASM="/usr/lib/trunkguard/trunkguard.wasm"',
                   "-A", 'TG_CONFIG="/usr/share/doc/trunkguard/examples/kamailio-trunks.json"',
                   "-A", 'TG_CARRIER="sip:127.0.0.1:5090"'], timeout=30)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_02_user_directories_and_modes(self):
        user = pwd.getpwnam(USER)
        self.assertLess(user.pw_uid, 1000, "a system user")
        self.assertEqual(user.pw_dir, VAR)
        self.assertIn(user.pw_shell, ("/usr/sbin/nologin", "/bin/false"))
        self.assertEqual(grp.getgrgid(user.pw_gid).gr_name, USER)
        self.assert_mode(ETC, 0o750, "root", USER)
        self.assert_mode(os.path.join(ETC, "relay-token"), 0o600, USER, USER)
        with open(os.path.join(ETC, "relay-token"), encoding="utf-8") as f:
            self.assertGreaterEqual(len(f.readline().strip()), 40)
        self.assert_mode(VAR, 0o750, USER, USER)
        for path in ("alerts.env", "kamailio.env", "envoy.env"):
            self.assert_mode(os.path.join(ETC, path), 0o644, "root", "root")
        for path, mode in (("/usr/bin/trunkguard", 0o755), ("/usr/lib/trunkguard/trunkguard", 0o755),
                           ("/usr/lib/trunkguard/trunkguard.wasm", 0o644),
                           ("/usr/lib/trunkguard/envoy/trunkguard.wasm", 0o644),
                           ("/usr/lib/trunkguard/kamailio/run", 0o755), ("/usr/lib/trunkguard/kamailio/tgctl", 0o755),
                           ("/usr/lib/trunkguard/kamailio/kemi-shim.cfg", 0o644),
                           ("/usr/lib/trunkguard/kamailio/kamailio.cfg", 0o644),
                           ("/usr/lib/trunkguard/kamailio/trunkguard.js", 0o644),
                           ("/usr/lib/trunkguard/kamailio/trunkguard_kemi.py", 0o644),
                           ("/usr/lib/trunkguard/python/trunkguard_kamailio/__init__.py", 0o644),
                           ("/usr/sbin/tgctl", 0o755), ("/usr/lib/trunkguard/envoy/run", 0o755),
                           ("/usr/lib/trunkguard/envoy/publish", 0o755)):
            self.assert_mode(path, mode, "root", "root")
        for unit in ("trunkguard-alerts.service", "trunkguard-kamailio.service", "trunkguard-envoy.service"):
            path = os.path.join(UNIT_DIR, unit)
            self.assert_mode(path, 0o644, "root", "root")
            u = Unit(unit)
            with open(path, encoding="utf-8") as f:
                self.assertNotIn("/opt/trunkguard", f.read())
            self.assertEqual((u.one("User"), u.one("Group")), (USER, USER), unit)
            # Every packaged program a unit runs is installed; Envoy is the one that
            # comes from elsewhere (not a Debian package).
            for key in ("ExecStart", "ExecReload"):
                for _, words in u.command(key):
                    for word in words:
                        if word.startswith(("/usr/", "/lib/")) and word != "/usr/bin/envoy":
                            self.assertTrue(os.path.exists(word), "%s %s: %s" % (unit, key, word))

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed (Debian: systemd)")
    def test_02b_systemd_analyze_verify_the_installed_units(self):
        # Silent, or it names a problem (it exits 0 on an unknown key). Envoy's unit
        # may only miss Envoy, which is not a Debian package.
        for unit in ("trunkguard-alerts.service", "trunkguard-kamailio.service", "trunkguard-envoy.service"):
            out = run(["systemd-analyze", "verify", os.path.join(UNIT_DIR, unit)])
            text = "\n".join(line for line in (out.stdout + out.stderr).splitlines()
                             if not (unit == "trunkguard-envoy.service" and "/usr/bin/envoy" in line))
            if unit == "trunkguard-envoy.service" and not os.path.exists("/usr/bin/envoy"):
                self.assertEqual(text, "", unit)
            else:
                self.assertEqual((out.returncode, text), (0, ""), unit)

    def test_03_the_installed_command_finds_the_installed_module(self):
        env = {k: v for k, v in os.environ.items() if k != "TRUNKGUARD_MODULE"}
        ok = run(["/usr/bin/trunkguard", "check", "/usr/share/doc/trunkguard/examples/config.json"], cwd="/", env=env)
        self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
        bad = os.path.join(self.workdir, "bad.json")
        config = trunk_config("x")
        config["locations"][0]["trunk_groups"][0]["acl"] = ["127.0.0.300/32"]
        with open(bad, "w", encoding="utf-8") as f:
            json.dump(config, f)
        refused = run(["/usr/bin/trunkguard", "check", bad], cwd="/", env=env)
        self.assertEqual(refused.returncode, 1, refused.stdout + refused.stderr)
        self.assertIn("locations[0].trunk_groups[0].acl[0]", refused.stdout + refused.stderr)

    def test_04_installing_started_no_kamailio(self):
        # Debian's kamailio.service is not started by the installation (policy-rc.d),
        # and trunkguard-kamailio's postinst starts nothing without systemd.
        self.assertFalse(kamailio_pids() - self.kamailio_before_install - self.started_kamailio_pids())
        self.assertIn("write /etc/trunkguard/trunks.json", self.install_log)

    @classmethod
    def started_kamailio_pids(cls):
        if "trunkguard-kamailio.service" in getattr(cls.services, "running", {}):
            return {p[0] for p in processes_in_group(cls.services.pgid("trunkguard-kamailio.service"))}
        return set()

    # --- 2. the services from their units -------------------------------------------

    def test_05_relay_starts_from_its_unit_and_answers_on_its_port(self):
        with open(os.path.join(ETC, "alerts.env"), "w", encoding="utf-8") as f:
            f.write("TRUNKGUARD_ALERTS_FROM=trunkguard test <alerts@example.net>\n"
                    "TRUNKGUARD_ALERTS_ARGS=--listen %s:%d --smtp-host 127.0.0.1 --smtp-port 9 "
                    "--smtp-tls none --retry-min 30s\n" % RELAY)
        argv = self.services.start("trunkguard-alerts.service")
        if argv:
            self.assertEqual(argv[:3], ["/usr/bin/trunkguard", "alerts", "serve"])
            self.assertIn("trunkguard test <alerts@example.net>", argv, "${TRUNKGUARD_ALERTS_FROM} is one word")

        def health():
            if not self.services.alive("trunkguard-alerts.service"):
                self.fail("the relay exited:\n" + self.services.log("trunkguard-alerts.service"))
            try:
                return self.relay("GET", "/v1/health")
            except OSError:
                return None
        status, body = wait_for("the relay on %s:%d" % RELAY, health, timeout=20)
        self.assertEqual(status, 200, body)
        self.assertIn("pending", body)
        self.assert_runs_as_trunkguard("trunkguard-alerts.service", "trunkguard")
        self.assert_mode(os.path.join(VAR, "alerts"), 0o700, USER, USER)

        with open(os.path.join(ETC, "relay-token"), encoding="utf-8") as f:
            token = f.readline().strip()
        event = {"id": "pkg-test-1", "kind": "blocked_call", "location": "hq", "trunk_group": "hq-pbx1",
                 "recipients": ["noc@example.com"], "at_ms": 1700000000123, "time": "2023-11-14T22:13:20.123Z",
                 "cause": "not_registered_address", "description": "test", "source": "198.51.100.9:5060",
                 "registered": "203.0.113.7:5060", "method": "INVITE", "call_id": "pkg-test",
                 "from": "<sip:hq1@trunks.example.net>;tag=1", "to": "<sip:+1555@trunks.example.net>", "count": 1}
        body = json.dumps(event).encode()
        self.assertEqual(self.relay("POST", "/v1/alerts", body, token="wrong")[0], 401)
        status, answer = self.relay("POST", "/v1/alerts", body, token=token)
        self.assertEqual((status, answer.get("status")), (202, "queued"), answer)
        # On disk as the unit's user, with the unit's UMask (0077).
        name, record = wait_for("the queued event", lambda: [e for e in self.pending_alerts()
                                                               if e[1]["id"] == "pkg-test-1"])[0]
        self.assert_mode(os.path.join(VAR, "alerts", "pending", name), 0o600, USER, USER)

    def test_06_kamailio_starts_from_its_unit_and_takes_a_config_published_with_tgctl(self):
        self.assertTrue(self.services.alive("trunkguard-alerts.service"), "test_05 runs the relay")
        # Kamailio starts with a configuration in which the PBX's password is another
        # one; the PBX's comes with the unit's ExecReload (the installed tgctl).
        write_secret(os.path.join(ETC, "trunks.json"), json.dumps(trunk_config("not-yet"), indent=2))
        with open(os.path.join(ETC, "kamailio.env"), "w", encoding="utf-8") as f:
            f.write("TRUNKGUARD_KAMAILIO_ARGS=--listen %s --core-listen %s --carrier sip:127.0.0.1:%d "
                    "--alert-url http://%s:%d/v1/alerts --alert-token-file %s/relay-token --workers 2\n"
                    % (EDGE, CORE_SOCKET, CARRIER_PORT, RELAY[0], RELAY[1], ETC))
        argv = self.services.start("trunkguard-kamailio.service")
        if argv:
            self.assertEqual(argv[0], "/usr/lib/trunkguard/kamailio/run")

        def status():
            if not self.services.alive("trunkguard-kamailio.service"):
                self.fail("Kamailio exited:\n" + self.services.log("trunkguard-kamailio.service")[-4000:])
            out = self.tgctl("status", "--short")
            return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
        first = wait_for("the policy in force", status, timeout=90)
        self.assertTrue(first.startswith("ok: config /var/lib/trunkguard/kamailio/published/"), first)
        self.assertIn("module /var/lib/trunkguard/kamailio/published/trunkguard-", first)
        self.assert_runs_as_trunkguard("trunkguard-kamailio.service", "kamailio")
        # The unit's engine is the native module: every Kamailio process has the
        # packaged trunkguard.so mapped, none Python.
        pgid = self.services.pgid("trunkguard-kamailio.service")
        if pgid is not None:
            kamailios = [p[0] for p in processes_in_group(pgid) if p[1] == "kamailio"]
        else:  # systemd runs the unit: its processes are its cgroup's
            cgroup = run(["systemctl", "show", "-p", "ControlGroup", "--value", "trunkguard-kamailio.service"],
                         timeout=30).stdout.strip()
            with open("/sys/fs/cgroup%s/cgroup.procs" % cgroup, encoding="utf-8") as f:
                pids = [int(p) for p in f.read().split()]
            kamailios = [p for p in pids if open("/proc/%d/comm" % p, encoding="utf-8").read().strip() == "kamailio"]
        self.assertTrue(kamailios, "no Kamailio process of the unit found")
        for pid in kamailios:
            with open("/proc/%d/maps" % pid, encoding="latin-1") as f:
                maps = f.read()
            self.assertIn("/kamailio/modules/trunkguard.so", maps, pid)
            self.assertNotIn("libpython", maps, pid)

        write_secret(os.path.join(ETC, "trunks.json"), json.dumps(trunk_config(HQ[1]), indent=2))
        reload = self.services.reload("trunkguard-kamailio.service")
        self.assertEqual(reload.returncode, 0, reload.stdout + reload.stderr)
        if isinstance(self.services, Emulated):
            self.assertRegex(reload.stdout, r"^ok: config /var/lib/trunkguard/kamailio/published/config-")
        self.assertNotEqual(status(), first)
        # Published copies hold HA1s: 0600, the service's user's.
        published = os.path.join(VAR, "kamailio", "published")
        for name in os.listdir(published):
            if name.startswith("config-") and name.endswith(".json"):
                self.assert_mode(os.path.join(published, name), 0o600, USER, USER)

    def test_07_pbx_registers_with_digest_and_its_call_reaches_the_carrier(self):
        register = self.sipp("register", "register.xml", ["-i", PBX, "-p", str(PBX_PORT), "-s", HQ[0],
                                                          "-au", HQ[0], "-ap", HQ[1], "-auth_uri", REALM, EDGE])
        self.assert_passed(register)
        self.assertRegex(register.log(), r"SIP/2\.0 401 Unauthorized[\s\S]*SIP/2\.0 200 OK")
        binding = json.loads(self.tgctl("binding", "hq-pbx1").stdout)
        self.assertEqual(binding["binding"]["source"], "%s:%d" % (PBX, PBX_PORT))

        carrier = self.sipp("carrier", "uas.xml", ["-i", "127.0.0.1", "-p", str(CARRIER_PORT)])
        time.sleep(0.3)
        call = self.uac("call", "call.xml", PBX, HQ)
        self.assert_passed(call, carrier)
        self.assertIn("SIP/2.0 407 Proxy Authentication Required", call.log())
        got = carrier.log()
        self.assertRegex(got, r"INVITE sip:\+15559876543@trunks\.example\.net SIP/2\.0")
        self.assertRegex(got, r"X-Trunkguard-Trunk-Group: hq-pbx1")
        self.assertRegex(got, r"(?m)^BYE ")

    def test_08_same_credentials_from_another_address_are_refused_403_and_alerted(self):
        intruder = self.uac("stolen", "call-refused.xml", INTRUDER, HQ)
        self.assert_passed(intruder)
        self.assertRegex(intruder.log(), r"SIP/2\.0 403 Forbidden")
        # The unit runs the native module (run --engine module): its statistic
        # cause_not_registered_address, by the shim's name in tgctl.
        stats = self.tgctl("stats").stdout
        self.assertRegex(stats, r"(?m)^cause\.not_registered_address\s+[1-9]")
        # Kamailio (as trunkguard, with the packaged token) posted the alert to the
        # packaged relay, which queued it.
        _, event = wait_for("the blocked_call alert in the relay's queue", lambda: [
            e for e in self.pending_alerts()
            if e[1]["event"].get("cause") == "not_registered_address"
            and e[1]["event"].get("source", "").startswith(INTRUDER + ":")], timeout=20)[0]
        self.assertEqual(event["event"]["trunk_group"], "hq-pbx1")

    # --- 3. gone again ---------------------------------------------------------------

    def test_09_purge_leaves_the_machine_as_found(self):
        kamailio = self.started_kamailio_pids()
        out = self.purge()
        self.assertIsNotNone(out)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertFalse(kamailio & kamailio_pids(), "the service's Kamailio is stopped")
        after = machine_snapshot()
        self.assertEqual(after, self.before)


if __name__ == "__main__":
    unittest.main(verbosity=2)
