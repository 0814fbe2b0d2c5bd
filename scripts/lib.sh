# Shell functions several scripts/ share. Sourced from the repository root, after the
# script's own `cd "$(dirname "$0")/.."`:  . scripts/lib.sh

# Adds rustup's wasm32-unknown-unknown target when it is missing; a toolchain without
# rustup (a distribution's) is used as it is.
ensure_wasm32_target() {
  if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
  fi
}

# aiosmtpd (and trustme, for STARTTLS) from PyPI in the venv target/py, made once and
# reused by later runs: the SMTP sink behind the alert relay in the alert, Envoy and
# Kamailio suites. Exports TRUNKGUARD_PYTHON, the interpreter the tests run it with.
use_smtp_venv() {
  local venv=target/py
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import aiosmtpd, trustme' >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'aiosmtpd>=1.4,<2' 'trustme>=1,<2'
  fi
  export TRUNKGUARD_PYTHON="$PWD/$venv/bin/python"
}
