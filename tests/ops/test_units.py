"""The systemd units of host-shims/systemd/ (docs/deployment.md).

- `systemd-analyze verify` on each unit, with /opt/trunkguard pointed at this
  checkout (verify looks for the commands): no warning at all, since verify exits 0
  on an unknown key or a bad value and only prints them;
- `systemd-analyze security --offline=yes --threshold=25`: exposure at most 2.5 of 10;
- the user, state and hardening settings docs/deployment.md promises;
- every option the units and the example .env files pass is one the command accepts
  (in its --help), so a renamed flag breaks this test and not a production start;
- the sysusers file, with `systemd-sysusers --dry-run` into a scratch root.

The systemd tools come with Debian's systemd package; a test that needs one is
skipped (and says so) where it is missing. These tests start no service.

    python3 -m unittest -v tests/ops/test_units.py
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS_DIR = os.path.join(ROOT, "host-shims", "systemd")
INSTALLED_AT = "/opt/trunkguard"
UNITS = {
    "trunkguard-kamailio.service": "kamailio.env",
    "trunkguard-envoy.service": "envoy.env",
    "trunkguard-alerts.service": "alerts.env",
}
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def parse_unit(path):
    """{section: [(key, value)]}, continuation lines joined, comments dropped."""
    sections, current, pending = {}, None, ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if stripped.endswith("\\"):
                pending = stripped[:-1].rstrip()
                continue
            m = re.fullmatch(r"\[([A-Za-z]+)\]", stripped)
            if m:
                current = sections.setdefault(m.group(1), [])
                continue
            key, sep, value = stripped.partition("=")
            if not sep or current is None:
                raise AssertionError("%s: not a key=value line: %r" % (path, raw))
            current.append((key.strip(), value.strip()))
    return sections


def parse_env(path):
    env = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return env


def expand(command, env):
    """An Exec line's words as systemd makes them: ${VAR} one word, $VAR split."""
    words = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$\{(\w+)\}", word)
        if m:
            words.append(env.get(m.group(1), ""))
            continue
        m = re.fullmatch(r"\$(\w+)", word)
        if m:
            words.extend(env.get(m.group(1), "").split())
            continue
        words.append(word)
    return words


def tool(name):
    return shutil.which(name)


class Units(unittest.TestCase):
    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="tg-ops-units-")
        self.addCleanup(shutil.rmtree, self.work, True)

    def localised(self):
        """Copies of the units that run this checkout instead of /opt/trunkguard."""
        paths = []
        for name in UNITS:
            with open(os.path.join(UNITS_DIR, name), encoding="utf-8") as f:
                text = f.read()
            path = os.path.join(self.work, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace(INSTALLED_AT + "/target/", TARGET + "/").replace(INSTALLED_AT, ROOT))
            paths.append(path)
        return paths

    def test_every_unit_file_is_shipped(self):
        shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(UNITS_DIR, "*.service")))
        self.assertEqual(shipped, sorted(UNITS))

    @unittest.skipUnless(tool("systemd-analyze"), "systemd-analyze is not installed (Debian: systemd)")
    def test_systemd_analyze_verify_is_silent(self):
        out = subprocess.run(["systemd-analyze", "verify", *self.localised()],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual((out.returncode, out.stdout + out.stderr), (0, ""))

    @unittest.skipUnless(tool("systemd-analyze"), "systemd-analyze is not installed (Debian: systemd)")
    def test_systemd_analyze_security_exposure_is_low(self):
        for path in self.localised():
            out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25",
                                  "--no-pager", path], capture_output=True, text=True, timeout=60)
            last = (out.stdout.strip().splitlines() or [""])[-1]
            self.assertEqual(out.returncode, 0, "%s: %s %s" % (os.path.basename(path), last, out.stderr))

    def test_each_unit_runs_as_trunkguard_with_its_state_and_hardening(self):
        required = {
            "User": "trunkguard", "Group": "trunkguard", "NoNewPrivileges": "yes",
            "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "PrivateDevices": "yes", "CapabilityBoundingSet": "", "UMask": "0077",
            "RestrictSUIDSGID": "yes", "StateDirectoryMode": "0700",
        }
        for name in UNITS:
            service = dict(parse_unit(os.path.join(UNITS_DIR, name))["Service"])
            for key, value in required.items():
                self.assertEqual(service.get(key), value, "%s: %s" % (name, key))
            state = service["StateDirectory"]
            self.assertRegex(state, r"^trunkguard/[a-z]+$", name)
            self.assertEqual(service["ReadWritePaths"], "/var/lib/" + state, name)
            self.assertIn("/var/lib/" + state, service["ExecStart"], name)
            self.assertTrue(service["EnvironmentFile"].startswith("/etc/trunkguard/"), name)

    def test_every_option_given_is_accepted_by_the_command(self):
        for name, env_name in UNITS.items():
            service = parse_unit(os.path.join(UNITS_DIR, name))["Service"]
            env = parse_env(os.path.join(UNITS_DIR, env_name))
            for key, command in service:
                if key not in ("ExecStart", "ExecReload"):
                    continue
                words = [w.replace(INSTALLED_AT + "/target/", TARGET + "/").replace(INSTALLED_AT, ROOT)
                         for w in expand(command, env)]
                self.assertTrue(all(words), "%s %s: an empty argument (unset variable?): %s" % (name, key, words))
                program = words[0]
                if os.path.basename(program) == "trunkguard":
                    if not os.path.exists(program):
                        self.skipTest("target/release/trunkguard is not built (scripts/build)")
                    subcommand = [w for w in words[1:3] if not w.startswith("-")]
                    help_argv = [program, *subcommand, "--help"]
                else:
                    self.assertTrue(os.access(program, os.X_OK), "%s %s: %s" % (name, key, program))
                    help_argv = [program, "--help"]
                out = subprocess.run(help_argv, capture_output=True, text=True, timeout=60)
                usage = out.stdout + out.stderr
                flags = [w.split("=", 1)[0] for w in words[1:] if w.startswith("--")]
                self.assertTrue(flags, words)
                for flag in flags:
                    self.assertRegex(usage, r"(?<![\w-])%s(?![\w-])" % re.escape(flag),
                                     "%s %s: %s does not take %s" % (name, key, os.path.basename(program), flag))
                if "publish-config" in words:
                    self.assertIn("publish-config", usage)

    def test_example_env_files_name_no_secret_inline(self):
        for env_name in set(UNITS.values()):
            with open(os.path.join(UNITS_DIR, env_name), encoding="utf-8") as f:
                text = f.read()
            self.assertNotRegex(text, r"--smtp-password(?!-file)", env_name)
            self.assertNotIn("TRUNKGUARD_RELAY_TOKEN", text)
            self.assertNotIn("TRUNKGUARD_SMTP_PASSWORD", text)

    @unittest.skipUnless(tool("systemd-sysusers"), "systemd-sysusers is not installed (Debian: systemd)")
    def test_sysusers_creates_the_trunkguard_user(self):
        root = os.path.join(self.work, "root")
        os.makedirs(os.path.join(root, "etc"))
        out = subprocess.run(["systemd-sysusers", "--root=" + root, "--dry-run",
                              os.path.join(UNITS_DIR, "trunkguard.sysusers")],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("Creating user 'trunkguard'", out.stdout + out.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
