#!/bin/sh
# /usr/bin/trunkguard of the Debian package (scripts/package): the command itself is
# /usr/lib/trunkguard/trunkguard; the policy module it judges with is the packaged
# one unless --module or TRUNKGUARD_MODULE names another (README.md).
TRUNKGUARD_MODULE="${TRUNKGUARD_MODULE:-/usr/lib/trunkguard/trunkguard.wasm}"
export TRUNKGUARD_MODULE
exec /usr/lib/trunkguard/trunkguard "$@"
