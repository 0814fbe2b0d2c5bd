#!/usr/bin/env python3
"""The bench's trunk configuration as an htable database for the native cfgs.

  benches/kamailio/trunks_db.py CONFIG.json OUT.sqlite

baseline.cfg and native-policy.cfg load the htable `trunks` from OUT.sqlite at start
(modparam htable db_url; Debian's db_sqlite schema, the one host-shims/kamailio/run
uses for its store), so they authenticate against the same HA1s as the trunkguard
edges without a database query per request. One item per fact, the key naming it:

  ha1/USER     the trunk group's HA1 (MD5 of user:realm:password)
  group/USER   its id (the X-Trunkguard-Trunk-Group the edge writes)
  regreq/USER  1 when calls need a registration from the same IP (require_registration)
  acl/USER     its access list, CIDRs comma separated (ipops is_in_subnet takes that)
  pai/USER     its first DID: the identity the edge asserts on its calls
  did/DID      the user whose registration receives calls to DID, with and without +
"""

import hashlib
import json
import os
import sqlite3
import sys

SCHEMA = "/usr/share/kamailio/db_sqlite"


def items(config):
    realm = config["realm"]
    out = []
    for location in config.get("locations", []):
        for group in location.get("trunk_groups", []):
            user = group["username"]
            ha1 = group.get("ha1")
            if not ha1 and "password" in group:
                ha1 = hashlib.md5(("%s:%s:%s" % (user, realm, group["password"])).encode()).hexdigest()
            if ha1:
                out.append(("ha1/" + user, ha1))
            out.append(("group/" + user, group["id"]))
            out.append(("regreq/" + user, 1 if group.get("require_registration", True) else 0))
            if group.get("acl"):
                out.append(("acl/" + user, ",".join(group["acl"])))
            dids = group.get("dids", [])
            if dids:
                out.append(("pai/" + user, dids[0]))
            for did in dids:
                bare = did.lstrip("+")
                out.append(("did/" + bare, user))
                out.append(("did/+" + bare, user))
    return out


def write(config, path):
    """Writes the htable database for `config` (a parsed trunk configuration)."""
    if os.path.exists(path):
        os.unlink(path)
    db = sqlite3.connect(path)
    for name in ("standard", "htable"):
        with open(os.path.join(SCHEMA, name + "-create.sql"), encoding="utf-8") as f:
            db.executescript(f.read())
    # value_type 0: a string, 1: an integer (htable's database format).
    db.executemany("INSERT INTO htable (key_name, key_type, value_type, key_value) VALUES (?, 0, ?, ?)",
                   [(k, 1 if isinstance(v, int) else 0, str(v)) for k, v in items(config)])
    db.commit()
    db.close()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        write(json.load(f), sys.argv[2])


if __name__ == "__main__":
    main()
