"""One table of per-message costs from two criterion outputs, native and wasm, with
the wasm/native ratio (scripts/bench; what docs/performance.md records).

  python3 scripts/lib/criterion_table.py NATIVE.txt WASM.txt
"""

import re
import sys

UNIT = {"ps": 1e-6, "ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}


def read(path):
    """{benchmark name: median µs} of one criterion run's output."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = {}
    for m in re.finditer(r"^(\S+)\s*\n?\s*time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", text, re.M):
        name, value, u = m.group(1), float(m.group(2)), m.group(3)
        found[name] = value * UNIT[u]
    return found


def main(native_path, wasm_path):
    native, wasm = read(native_path), read(wasm_path)
    print(f"{'benchmark':<44} {'native µs':>10} {'wasm µs':>10} {'wasm/native':>12}")
    for name, w in wasm.items():
        key = name.replace("wasm/", "native/", 1)
        n = native.get(key)
        ratio = f"{w / n:.2f}x" if n else "-"
        ns = f"{n:.3f}" if n else "-"
        print(f"{name.replace('wasm/', '', 1):<44} {ns:>10} {w:>10.3f} {ratio:>12}")
    for name, n in native.items():
        if name.replace("native/", "wasm/", 1) not in wasm:
            print(f"{name.replace('native/', '', 1):<44} {n:>10.3f} {'-':>10} {'-':>12}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
