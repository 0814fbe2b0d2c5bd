"""What host-shims/kamailio/run does in Python (run calls it with Debian's
/usr/bin/python3, the interpreter Kamailio's app_python3 embeds):

  run_helpers.py init-sqlite SCHEMA_DIR STATE_DIR TABLE...
      makes the store's SQLite files (TABLE: dialog -> dialogs.sqlite, htable ->
      trunkguard.sqlite) from Debian's schema files in SCHEMA_DIR, when missing
  run_helpers.py check MODULE CONFIG
      refuses a configuration or module the policy would refuse, with the named
      error (the extension from $TRUNKGUARD_PYTHONPATH), before Kamailio starts
  run_helpers.py redis-rows
      carries the items the KEMI shim kept in the Redis of $TRUNKGUARD_STATE_DB (the
      hash trunkguard:tg) over to the rows the native module reads and writes through
      db_redis (htable:entry::<key>), each item whose row is missing, and renames the
      hash aside (trunkguard:tg:carried:<time>); prints how many
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
# row of htable's schema keyed by key_name (host-shims/kamailio/kamailio.cfg).
SHIM_HASH = "trunkguard:tg"
ROW_PREFIX = "htable:entry::"


# One step on the server: every item of the shim's hash whose row is missing becomes
# a whole row (an item a module node wrote meanwhile is newer and stays, and no node
# reads half a row), then the hash is renamed aside, so that it is carried once: a
# row the module deletes later (an unregistered binding, a trunk group removed) is
# never brought back from it.
CARRY_ONCE = """
local items = redis.call('HGETALL', KEYS[1])
local carried = 0
for i = 1, #items, 2 do
  local row = ARGV[1] .. items[i]
  if redis.call('EXISTS', row) == 0 then
    redis.call('HSET', row, 'key_name', items[i], 'key_type', 0, 'value_type', 0,
               'key_value', items[i + 1], 'expires', 0)
    carried = carried + 1
  end
end
if #items > 0 then redis.call('RENAME', KEYS[1], KEYS[2]) end
return carried
"""


def redis_rows():
    import time

    import redis  # Debian's python3-redis

    # From the environment: the URL may hold a password (run exports it).
    client = redis.Redis.from_url(os.environ["TRUNKGUARD_STATE_DB"], socket_timeout=5, socket_connect_timeout=5)
    try:
        aside = "%s:carried:%d" % (SHIM_HASH, time.time())
        print(client.eval(CARRY_ONCE, 2, SHIM_HASH, aside, ROW_PREFIX))
    except redis.RedisError as e:  # its text names the host and port, never a password
        sys.exit("run: --store's Redis: %s" % e)
    finally:
        client.close()


def main(argv):
    if len(argv) >= 3 and argv[0] == "init-sqlite":
        init_sqlite(argv[1], argv[2], argv[3:])
    elif len(argv) == 3 and argv[0] == "check":
        check(argv[1], argv[2])
    elif argv == ["redis-rows"]:
        redis_rows()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
