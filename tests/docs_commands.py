#!/usr/bin/env python3
"""Runs the shell blocks the documentation marks runnable, and checks the others.

The marker: a fenced block whose info string is `sh runnable` (rendered as `sh`):

    ```sh runnable
    target/release/trunkguard check examples/config.json
    ```

Such a block must work as written, from the repository root of a built checkout
(scripts/build), with nothing else running and no network but loopback. The blocks
of one file run in order, each with `bash -e -o pipefail`, in one scratch directory
that looks like the checkout (examples/, tests/, scripts/, host-shims/, docs/ and
target/release, target/wasm32-unknown-unknown are links to the real ones; target/
itself is scratch, for what the blocks write), so a later block may use what an
earlier one started in the background (the alert relay, then curl). As root, each
file's blocks get a network namespace of their own (unshare), so the fixed ports
the docs use cannot meet anything else running; every process they start is killed
at the end (their own session). A block that exits non-zero, or runs over 60 s,
fails. Mark a block runnable only if it is quick and needs no proxy running.

Every other `sh`/`bash` block is checked with `bash -n`, and each path it names
under scripts/, host-shims/, tests/, examples/ or docs/ must exist.

    python3 tests/docs_commands.py [FILE.md...]

Prints one line per check and, last, `docs-commands: N passed, M failed`
(scripts/check-test-counts reads it; the suite is `docs-commands` in
tests/suites.txt, run by scripts/test-alerts).
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BLOCK_TIMEOUT_S = 60
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
REPO_PATH = re.compile(r"(?<![\w./$-])((?:scripts|host-shims|tests|examples|docs)/[\w./*?-]*[\w*-])")
LINKED = ("examples", "tests", "scripts", "host-shims", "docs")


def documents():
    files = [os.path.join(ROOT, "README.md")]
    files += sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    files += sorted(glob.glob(os.path.join(ROOT, "host-shims", "*", "README.md")))
    return files


def blocks(path):
    """[(line, info words, text)] of every fenced block."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in FENCE.finditer(text):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1).split(), m.group(2)))
    return out


def scratch_checkout(workdir):
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), os.path.join(workdir, name))
    os.makedirs(os.path.join(workdir, "target"))
    for name in ("release", "wasm32-unknown-unknown"):
        os.symlink(os.path.join(TARGET, name), os.path.join(workdir, "target", name))


def can_unshare():
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


def kill_session(sid, sig):
    """Signals every process whose session is `sid` (field 6 of /proc/PID/stat)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            try:
                os.kill(int(entry), sig)
            except ProcessLookupError:
                pass


def run_file(doc, runnable, isolate):
    """Runs one file's runnable blocks in order; [(label, ok, detail)]."""
    rel = os.path.relpath(doc, ROOT)
    work = tempfile.mkdtemp(prefix="tg-docs-")
    results = []
    try:
        scratch_checkout(work)
        driver = ["set -u"]
        if isolate:
            driver.append("ip link set lo up")
        for i, (line, _, text) in enumerate(runnable):
            script = os.path.join(work, ".block-%d.sh" % i)
            with open(script, "w", encoding="utf-8") as f:
                f.write(text)
            # Each block: its own bash, output to a file (a background process it
            # leaves keeps no pipe of ours open), its status to another.
            driver.append(
                "timeout %d bash -e -o pipefail %s >%s 2>&1 </dev/null; echo $? >%s"
                % (BLOCK_TIMEOUT_S, script, script + ".out", script + ".rc"))
            driver.append('[ "$(cat %s)" = 0 ] || exit 0' % (script + ".rc"))
        argv = ["bash", "-c", "\n".join(driver)]
        if isolate:
            argv = ["unshare", "--net", "--"] + argv
        env = dict(os.environ)
        env["PATH"] = os.path.join(TARGET, "release") + os.pathsep + env["PATH"]
        proc = subprocess.Popen(argv, cwd=work, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=BLOCK_TIMEOUT_S * len(runnable) + 30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            # Whatever the blocks started in the background (the relay) ends here:
            # every process of the session, whatever its group (timeout makes one).
            for sig in (signal.SIGTERM, signal.SIGKILL):
                kill_session(proc.pid, sig)
                time.sleep(0.2)
            proc.wait()
        for i, (line, _, _) in enumerate(runnable):
            label = "%s:%d runnable" % (rel, line)
            script = os.path.join(work, ".block-%d.sh" % i)
            try:
                with open(script + ".rc", encoding="utf-8") as f:
                    rc = f.read().strip()
            except OSError:
                results.append((label, False, "not run (an earlier block failed)"))
                continue
            with open(script + ".out", encoding="utf-8", errors="replace") as f:
                output = f.read()
            if rc == "0":
                results.append((label, True, ""))
            else:
                why = "timed out after %d s" % BLOCK_TIMEOUT_S if rc == "124" else "exit %s" % rc
                results.append((label, False, "%s\n%s" % (why, output[-3000:])))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def check_file(doc):
    """bash -n on every sh/bash block, and the repository paths they name."""
    rel = os.path.relpath(doc, ROOT)
    syntax, missing = [], []
    for line, info, text in blocks(doc):
        if not info or info[0] not in ("sh", "bash", "shell"):
            continue
        out = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            syntax.append("%s:%d: %s" % (rel, line, out.stderr.strip()))
        for m in REPO_PATH.finditer(text):
            path = m.group(1).rstrip(".")
            if not glob.glob(os.path.join(ROOT, path)):  # a path, or a pattern that matches
                missing.append("%s:%d: %s" % (rel, line, path))
    return [
        ("%s bash -n" % rel, not syntax, "\n".join(syntax)),
        ("%s paths exist" % rel, not missing, "\n".join(missing)),
    ]


def main():
    docs = [os.path.abspath(a) for a in sys.argv[1:]] or documents()
    needed = [os.path.join(TARGET, "release", "trunkguard"),
              os.path.join(TARGET, "wasm32-unknown-unknown", "wasm", "trunkguard_abi.wasm")]
    absent = [p for p in needed if not os.path.exists(p)]
    if absent:
        print("docs-commands: missing %s: run scripts/build first" % ", ".join(absent))
        print("docs-commands: 0 passed, 1 failed")
        return 1
    isolate = can_unshare()
    print("runnable blocks %s" % ("each file in a network namespace of its own" if isolate
                                   else "on this machine's loopback (not root, or no unshare)"))
    results = []
    runnable_count = 0
    for doc in docs:
        results += check_file(doc)
        runnable = [b for b in blocks(doc) if b[1][:2] == ["sh", "runnable"]]
        runnable_count += len(runnable)
        if runnable:
            results += run_file(doc, runnable, isolate)
    if not sys.argv[1:] and runnable_count == 0:
        results.append(("runnable blocks found", False, "no ```sh runnable block in the docs"))
    passed = sum(1 for _, ok, _ in results if ok)
    for label, ok, detail in results:
        print("%s %s" % ("ok  " if ok else "FAIL", label))
        if not ok and detail:
            print("     " + detail.replace("\n", "\n     "))
    print("docs-commands: %d passed, %d failed" % (passed, len(results) - passed))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
