#!/bin/sh
# /usr/sbin/tgctl of trunkguard-kamailio (scripts/package): host-shims/kamailio/tgctl
# for the Kamailio of trunkguard-kamailio.service, whose state directory and the
# packaged extension are the defaults. A --state given after them wins (the last one
# counts), and so does TRUNKGUARD_PYTHONPATH from the environment.
TRUNKGUARD_PYTHONPATH="${TRUNKGUARD_PYTHONPATH:-/usr/lib/trunkguard/python}"
export TRUNKGUARD_PYTHONPATH
exec /usr/lib/trunkguard/kamailio/tgctl --state /var/lib/trunkguard/kamailio "$@"
