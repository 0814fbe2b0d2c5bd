"""Every file the shims write that holds a password, an HA1 or a token is 0600.

A trunk configuration holds the trunk groups' passwords or HA1s; Envoy's bootstrap
holds the alert relay's token. Published through each shim into a scratch state
directory, under umask 022 (where a plain write gives 0644), without running a proxy:
kamailio (for `run`), kamcmd (for `tgctl`, an htable in a JSON file that answers a
publication as the timer process would) and envoy (for Envoy's `run`) are fakes.
docs/deployment.md, "Paths".

    python3 -m unittest -v tests/ops/test_secrets.py
"""

import fcntl
import glob
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KAMAILIO_RUN = os.path.join(ROOT, "host-shims", "kamailio", "run")
TGCTL = os.path.join(ROOT, "host-shims", "kamailio", "tgctl")
ENVOY_RUN = os.path.join(ROOT, "host-shims", "envoy", "run")
ENVOY_PUBLISH = os.path.join(ROOT, "host-shims", "envoy", "publish")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
ABI_WASM = os.path.join(TARGET, "wasm32-unknown-unknown", "wasm", "trunkguard_abi.wasm")
EXTENSION = os.path.join(TARGET, "kamailio-py")
KAMAILIO_TRUNKS = os.path.join(ROOT, "examples", "kamailio", "trunks.json")
ENVOY_TRUNKS = os.path.join(ROOT, "examples", "config.json")
NOBODY = 65534  # an owner other than root, for the run-as-root case


def write_exec(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).lstrip())
    os.chmod(path, 0o755)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def umask_022():
    os.umask(0o022)


def chown_tree(top, uid):
    for path in [top] + [os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files]:
        os.lchown(path, uid, uid)


class SecretFiles(unittest.TestCase):
    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="tg-ops-secrets-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.bin = os.path.join(self.work, "bin")
        os.makedirs(self.bin)
        self.record = os.path.join(self.work, "record.json")
        # kamailio: `-c` checks the cfg, without it Kamailio would run: records its
        # arguments and environment, exits 0.
        write_exec(os.path.join(self.bin, "kamailio"), """\
            #!/usr/bin/python3
            import json, os, sys
            with open(%r, "a") as f:
                f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
            """ % self.record)
        # kamcmd -s SOCKET htable.get|sets|dump TABLE [KEY [VALUE]]
        write_exec(os.path.join(self.bin, "kamcmd"), """\
            #!/usr/bin/python3
            import json, os, sys
            db = os.path.join(os.path.dirname(os.path.abspath(__file__)), "htable.json")
            try:
                tables = json.load(open(db))
            except OSError:
                tables = {}
            cmd, table, rest = sys.argv[3], sys.argv[4], sys.argv[5:]
            t = tables.setdefault(table, {})
            if cmd == "htable.get":
                if rest[0] not in t:
                    print("error: 500 - Key name doesn't exist in htable.")
                    sys.exit(0)
                print("{\\n\\tname: %s\\n\\tvalue: %s\\n\\tflags: 0\\n}" % (rest[0], t[rest[0]]))
            elif cmd == "htable.sets":
                t[rest[0]] = rest[1]
                if table == "tgctl" and rest[0] == "rev":
                    # what the timer process writes once it applied the publication
                    t["status"] = "%s|ok: config %s (fake kamcmd)" % (rest[1], t.get("config"))
                json.dump(tables, open(db, "w"))
            elif cmd == "htable.dump":
                for k, v in t.items():
                    print("name: %s\\nvalue: %s" % (k, v))
            """)
        write_exec(os.path.join(self.bin, "envoy"), """\
            #!/bin/sh
            exit 0
            """)
        self.env = dict(os.environ)
        self.env["PATH"] = self.bin + os.pathsep + self.env["PATH"]
        self.env["TRUNKGUARD_PYTHONPATH"] = EXTENSION
        if os.geteuid() == 0:
            # Run as root, tgctl and publish become the state directory's owner
            # (NOBODY in the tests below), who must reach it, and the fake kamcmd's
            # table beside it.
            os.chmod(self.work, 0o755)
            os.chmod(self.bin, 0o777)

    def config_copy(self, source, name):
        """A copy of an example configuration, mode 0644 as a user's file would be."""
        dest = os.path.join(self.work, name)
        shutil.copy(source, dest)
        os.chmod(dest, 0o644)
        return dest

    def run_tool(self, *argv, timeout=120):
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                             timeout=timeout, preexec_fn=umask_022)
        self.assertEqual(out.returncode, 0, "%s: %s%s" % (argv, out.stdout, out.stderr))
        return out

    def kamailio_run(self, state, *extra):
        # The shim's: these tests read what run hands the KEMI script.
        return self.run_tool(KAMAILIO_RUN, "--no-install", "--engine", "shim", "--state", state,
                             "--module", ABI_WASM, *extra)

    def test_kamailio_run_and_tgctl_write_configurations_0600(self):
        state = os.path.join(self.work, "kamailio")
        config = self.config_copy(KAMAILIO_TRUNKS, "trunks.json")
        self.kamailio_run(state, "--config", config,
                          "--listen", "127.0.0.1:5999/192.0.2.10", "--core-listen", "127.0.0.1:5998")
        copies = glob.glob(os.path.join(state, "published", "config-*.json"))
        self.assertEqual(len(copies), 1)
        self.assertEqual(mode(copies[0]), 0o600, copies[0])
        self.assertEqual(mode(glob.glob(os.path.join(state, "published", "trunkguard-*.wasm"))[0]), 0o644)

        # A copy an older run left world-readable is made 0600 by the next run.
        os.chmod(copies[0], 0o644)
        self.kamailio_run(state, "--config", config)
        self.assertEqual(mode(copies[0]), 0o600)

        # tgctl publish-config: a new copy (another content), then the same one again
        # after someone made it readable.
        with open(config, encoding="utf-8") as f:
            doc = json.load(f)
        doc["registration"]["max_expires"] = 1800
        second = os.path.join(self.work, "trunks-2.json")
        with open(second, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.chmod(second, 0o644)
        out = self.run_tool(TGCTL, "--state", state, "publish-config", second, "--wait", "5")
        self.assertIn("ok: config", out.stdout)
        published = set(glob.glob(os.path.join(state, "published", "config-*.json"))) - set(copies)
        self.assertEqual(len(published), 1)
        published = published.pop()
        self.assertEqual(mode(published), 0o600)
        os.chmod(published, 0o644)
        self.run_tool(TGCTL, "--state", state, "publish-config", second, "--wait", "5")
        self.assertEqual(mode(published), 0o600)

    def test_kamailio_run_writes_again_a_published_copy_that_lost_its_bytes(self):
        # The copies are named by their content's hash. Until 2026-12-02 run took an
        # existing name for the right bytes: a copy a crash had left empty made every
        # later start fail on it, the configuration in /etc being fine.
        state = os.path.join(self.work, "kamailio")
        config = self.config_copy(KAMAILIO_TRUNKS, "trunks.json")
        self.kamailio_run(state, "--config", config)
        (copy,) = glob.glob(os.path.join(state, "published", "config-*.json"))
        open(copy, "w").close()
        self.kamailio_run(state, "--config", config)
        with open(copy, "rb") as f, open(config, "rb") as g:
            self.assertEqual(f.read(), g.read())
        self.assertEqual(mode(copy), 0o600)

    def test_kamailio_run_passes_the_advertised_address_and_the_local_sockets(self):
        state = os.path.join(self.work, "kamailio")
        config = self.config_copy(KAMAILIO_TRUNKS, "trunks.json")
        self.kamailio_run(state, "--config", config,
                          "--listen", "127.0.0.1:5999/192.0.2.10",
                          "--listen", "[::1]:5999/[2001:db8::10]:5070",
                          "--core-listen", "127.0.0.1:5998")
        with open(self.record, encoding="utf-8") as f:
            calls = [json.loads(line) for line in f]
        started = [c for c in calls if "-c" not in c["argv"]]
        self.assertEqual(len(started), 1, calls)
        argv, env = started[0]["argv"], started[0]["env"]
        listens = [argv[i + 1] for i, a in enumerate(argv) if a == "-l"]
        self.assertEqual(listens, [
            "udp:127.0.0.1:5999/192.0.2.10:5999", "tcp:127.0.0.1:5999/192.0.2.10:5999",
            "udp:[::1]:5999/[2001:db8::10]:5070", "tcp:[::1]:5999/[2001:db8::10]:5070",
            "udp:127.0.0.1:5998", "tcp:127.0.0.1:5998",
        ])
        self.assertEqual(env["TRUNKGUARD_PUBLIC_SOCKETS"], "127.0.0.1:5999,[::1]:5999")
        self.assertEqual(env["TRUNKGUARD_CORE_SOCKETS"], "127.0.0.1:5998")
        bad = subprocess.run([KAMAILIO_RUN, "--no-install", "--engine", "shim", "--state", state, "--config", config,
                              "--listen", "127.0.0.1:5999/"],
                             env=self.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(bad.returncode, 2, bad.stderr)
        self.assertIn("advertised", bad.stderr)

    @unittest.skipUnless(os.geteuid() == 0, "needs root: chown")
    def test_run_as_root_tgctl_gives_the_copy_to_the_state_owner(self):
        state = os.path.join(self.work, "kamailio")
        config = self.config_copy(KAMAILIO_TRUNKS, "trunks.json")
        self.kamailio_run(state, "--config", config)
        chown_tree(state, NOBODY)  # as run leaves it when it runs as its own user
        with open(config, encoding="utf-8") as f:
            doc = json.load(f)
        doc["registration"]["max_expires"] = 1200
        other = os.path.join(self.work, "trunks-3.json")
        with open(other, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        before = set(glob.glob(os.path.join(state, "published", "config-*.json")))
        self.run_tool(TGCTL, "--state", state, "publish-config", other, "--wait", "5")
        (new,) = set(glob.glob(os.path.join(state, "published", "config-*.json"))) - before
        st = os.stat(new)
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (NOBODY, NOBODY, 0o600))

    def test_envoy_publish_writes_the_ecds_resource_0600(self):
        state = os.path.join(self.work, "envoy")
        config = self.config_copy(ENVOY_TRUNKS, "config.json")
        self.run_tool(ENVOY_PUBLISH, "--state", state, "--config", config, "--wasm", ABI_WASM)
        ecds = os.path.join(state, "ecds", "trunkguard.json")
        self.assertEqual(mode(ecds), 0o600)
        with open(ecds, encoding="utf-8") as f:
            self.assertIn('\\"ha1\\": ', f.read())  # what makes it a secret
        self.assertEqual(mode(glob.glob(os.path.join(state, "wasm", "trunkguard-*.wasm"))[0]), 0o644)
        os.chmod(ecds, 0o644)
        self.run_tool(ENVOY_PUBLISH, "--state", state, "--on-refusal", "close")
        self.assertEqual(mode(ecds), 0o600)
        self.assertEqual([n for n in os.listdir(os.path.join(state, "tmp"))], [])

    def test_envoy_publish_waits_for_the_one_in_progress(self):
        # A publication reads the resource in force and writes it back with what it
        # changes (a new .wasm keeps the configuration): two at once could lose one
        # while both said "published". One at a time, under STATE/publish.lock: here
        # a publication in progress holds it for a second and a half.
        state = os.path.join(self.work, "envoy")
        config = self.config_copy(ENVOY_TRUNKS, "config.json")
        self.run_tool(ENVOY_PUBLISH, "--state", state, "--config", config, "--wasm", ABI_WASM)
        ecds = os.path.join(state, "ecds", "trunkguard.json")
        with open(ecds, encoding="utf-8") as f:
            before = f.read()
        with open(os.path.join(state, "publish.lock"), "a", encoding="utf-8") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            waiting = subprocess.Popen([ENVOY_PUBLISH, "--state", state, "--on-refusal", "close"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                time.sleep(1.5)
                with open(ecds, encoding="utf-8") as f:
                    self.assertEqual(f.read(), before, "published while another publication was on")
            finally:
                fcntl.flock(held, fcntl.LOCK_UN)
        out, err = waiting.communicate(timeout=60)
        self.assertEqual(waiting.returncode, 0, out + err)
        self.assertIn("waiting for another publication to end", err)
        with open(ecds, encoding="utf-8") as f:
            self.assertRegex(f.read(), r'on_refusal\\*": \\*"close')

    @unittest.skipUnless(os.geteuid() == 0, "needs root: chown")
    def test_envoy_publish_as_root_gives_the_files_to_the_state_owner(self):
        state = os.path.join(self.work, "envoy")
        os.makedirs(state)
        os.chown(state, NOBODY, NOBODY)
        config = self.config_copy(ENVOY_TRUNKS, "config.json")
        self.run_tool(ENVOY_PUBLISH, "--state", state, "--config", config, "--wasm", ABI_WASM)
        for path in [os.path.join(state, "ecds", "trunkguard.json")] + glob.glob(os.path.join(state, "wasm", "*.wasm")):
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_gid), (NOBODY, NOBODY), path)

    @unittest.skipUnless(os.geteuid() == 0, "needs root: chown")
    def test_envoy_publish_as_root_follows_no_link_the_state_owner_planted(self):
        # The state directory's owner is the user Envoy runs as: it can replace
        # `tmp` with a link. Until 2026-12-02 publish, run as root, chowned what the
        # link named to that user (/etc, say) before anything could fail.
        state = os.path.join(self.work, "envoy")
        os.makedirs(state)
        os.chown(state, NOBODY, NOBODY)
        scratch = os.path.join(self.work, "roots")
        os.makedirs(scratch, mode=0o700)
        os.symlink(scratch, os.path.join(state, "tmp"))
        config = self.config_copy(ENVOY_TRUNKS, "config.json")
        out = subprocess.run([ENVOY_PUBLISH, "--state", state, "--config", config, "--wasm", ABI_WASM],
                             env=self.env, capture_output=True, text=True, timeout=120)
        # It got past the check and became the owner, who may not write there.
        self.assertNotEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("Permission denied", out.stderr)
        self.assertTrue(os.path.isdir(os.path.join(state, "wasm")), out.stderr)
        st = os.stat(scratch)
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), os.listdir(scratch)), (0, 0, 0o700, []))

    @unittest.skipUnless(os.geteuid() == 0, "needs root: chown")
    def test_tgctl_as_root_follows_no_link_the_state_owner_planted(self):
        # The state directory's owner is the user Kamailio runs as: it can plant a
        # link named like the copy of the module root will publish (its hash is
        # the module's). Until 2026-12-02 tgctl, run as root, took the link for that
        # copy and chmodded what it named 0644 (/etc/shadow, say).
        state = os.path.join(self.work, "kamailio")
        published = os.path.join(state, "published")
        os.makedirs(published)
        with open(os.path.join(state, "engine"), "w", encoding="utf-8") as f:
            f.write("module\n")
        chown_tree(state, NOBODY)
        secret = os.path.join(self.work, "shadow")
        with open(secret, "w", encoding="utf-8") as f:
            f.write("root:x:1:\n")
        os.chmod(secret, 0o600)
        with open(ABI_WASM, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        copy = os.path.join(published, "trunkguard-%s.wasm" % digest)
        os.symlink(secret, copy)
        # (The engine the state names, the module, whose RPC the fake kamcmd lacks.)
        out = subprocess.run([TGCTL, "--state", state, "publish-module", ABI_WASM, "--wait", "1"],
                             env=self.env, capture_output=True, text=True, timeout=60)
        st = os.stat(secret)
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (0, 0o600))
        # The copy was made (there is no Kamailio to take it): the module's bytes in
        # a file of the owner's, in the link's place.
        with open(ABI_WASM, "rb") as f, open(copy, "rb") as g:
            self.assertEqual(f.read(), g.read(), out.stdout + out.stderr)
        self.assertFalse(os.path.islink(copy))
        self.assertEqual(os.lstat(copy).st_uid, NOBODY)

    def test_envoy_run_writes_the_bootstrap_with_the_token_0600(self):
        state = os.path.join(self.work, "envoy")
        os.makedirs(state)
        token = os.path.join(self.work, "relay-token")
        with open(token, "w", encoding="utf-8") as f:
            f.write("ops-test-token-5f1c\n")
        os.chmod(token, 0o600)
        bootstrap = os.path.join(state, "envoy.yaml")
        with open(bootstrap, "w", encoding="utf-8") as f:
            f.write("# an older bootstrap, world-readable\n")
        os.chmod(bootstrap, 0o644)
        config = self.config_copy(ENVOY_TRUNKS, "config.json")
        self.run_tool(ENVOY_RUN, "--state", state, "--config", config, "--wasm", ABI_WASM,
                      "--envoy", os.path.join(self.bin, "envoy"), "--webhook-token-file", token,
                      "--listen", "127.0.0.1:5997", "--admin", "127.0.0.1:5996")
        self.assertEqual(mode(bootstrap), 0o600)
        with open(bootstrap, encoding="utf-8") as f:
            self.assertIn("ops-test-token-5f1c", f.read())
        self.assertEqual(mode(os.path.join(state, "ecds", "trunkguard.json")), 0o600)


if __name__ == "__main__":
    unittest.main(verbosity=2)
