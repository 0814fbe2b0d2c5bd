"""What host-shims/kamailio/run does in Python (run calls it with Debian's
/usr/bin/python3, the interpreter Kamailio's app_python3 embeds):

  run_helpers.py init-sqlite SCHEMA_DIR STATE_DIR TABLE...
      makes the store's SQLite files (TABLE: dialog -> dialogs.sqlite, htable ->
      trunkguard.sqlite) from Debian's schema files in SCHEMA_DIR, when missing
  run_helpers.py check MODULE CONFIG
      refuses a configuration or module the policy would refuse, with the named
      error (the extension from $TRUNKGUARD_PYTHONPATH), before Kamailio starts
  run_helpers.py redis-rows URL
      carries the items the KEMI shim kept in a Redis (the hash trunkguard:tg) over to
      the rows the native module reads and writes through db_redis
      (htable:entry::<key>), each item whose row is missing; prints how many
"""

import os
import sqlite3
import sys

FILES = {"dialog": "dialogs.sqlite", "htable": "trunkguard.sqlite"}


def init_sqlite(schema, state, tables):
    """A missing file is made in a temporary file renamed into place, so a start never
    finds half a schema; 0600 like every file of the state dir that holds secrets (the
    nonce secret is in the htable). WAL (a setting kept in the file): readers never
    wait for the writer, and a commit appends to the log instead of rewriting pages."""
    os.umask(0o077)
    for table in tables:
        path = os.path.join(state, FILES[table])
        if not os.path.exists(path):
            tmp = path + ".new"
            for leftover in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            db = sqlite3.connect(tmp)
            for name in ("standard", table):
                with open(os.path.join(schema, name + "-create.sql"), encoding="utf-8") as f:
                    db.executescript(f.read())
            db.execute("PRAGMA journal_mode=WAL")
            db.commit()
            db.close()
            os.rename(tmp, path)
        db = sqlite3.connect(path)
        if table == "htable":
            # The shim writes each item with one upsert by name (trunkguard_kemi.py,
            # SqliteState); Debian's table has no unique name of its own.
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS htable_key_name_idx ON htable (key_name)")
        db.execute("PRAGMA journal_mode=WAL")
        db.commit()
        db.close()
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name):
                os.chmod(name, 0o600)


def check(module, config):
    """Also compiles the module once, into the cache every Kamailio process maps."""
    sys.path.insert(0, os.environ["TRUNKGUARD_PYTHONPATH"])
    import trunkguard_kamailio as tg

    try:
        with open(config, "rb") as f:
            tg.check(module, f.read())
    except tg.ConfigRefused as e:
        sys.exit("run: configuration refused: %s: %s" % e.args)
    except tg.PolicyError as e:
        sys.exit("run: module refused: %s" % e)


# The shim's layout (trunkguard_kemi.py, RedisState.HASH) and the module's: db_redis's
# row of htable's schema keyed by key_name (host-shims/kamailio/module.cfg).
SHIM_HASH = "trunkguard:tg"
ROW_PREFIX = "htable:entry::"


# Made whole or left alone, in one step on the server: an item a module node wrote
# meanwhile is newer than the shim's and stays, and no node reads half a row.
ROW_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'key_name', ARGV[1], 'key_type', 0, 'value_type', 0,
           'key_value', ARGV[2], 'expires', 0)
return 1
"""


def redis_rows(url):
    import redis  # Debian's python3-redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        row_if_absent = client.register_script(ROW_IF_ABSENT)
        carried = 0
        for key, value in client.hgetall(SHIM_HASH).items():
            carried += row_if_absent(keys=[ROW_PREFIX.encode() + key], args=[key, value])
        print(carried)
    except redis.RedisError as e:  # its text names the host and port, never a password
        sys.exit("run: --store's Redis: %s" % e)
    finally:
        client.close()


def main(argv):
    if len(argv) >= 3 and argv[0] == "init-sqlite":
        init_sqlite(argv[1], argv[2], argv[3:])
    elif len(argv) == 3 and argv[0] == "check":
        check(argv[1], argv[2])
    elif len(argv) == 2 and argv[0] == "redis-rows":
        redis_rows(argv[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
