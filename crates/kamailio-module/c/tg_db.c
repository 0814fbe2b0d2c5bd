/*
 * trunkguard.so: the state table written through to a database, and the nonce secret
 * file.
 *
 * htable is shared memory: a restart (upgrade, crash, kill -9) forgets every binding,
 * last registration IP, the nonce secret and the alert windows. With
 * modparam("trunkguard", "db_url", ...) every write the policy makes goes to the
 * database before it counts as done, in htable's own schema (the `htable` table of
 * Debian's /usr/share/kamailio/<db>/htable-create.sql: key_name, key_type, value_type,
 * key_value, expires), so that htable's own db_url and `dbtable=` load it back at
 * start: the rows the KEMI shim's SqliteState writes (docs/kamailio.md, "Upgrade and
 * restart"), one per key, a string (key_type 0, value_type 0) that never expires.
 *
 * One write: the node's write lock; BEGIN; delete the key's row; insert the new one
 * (none for a delete); htable's own write; COMMIT. The database refusing any step
 * rolls back before the table is touched; htable refusing rolls back; a COMMIT that
 * fails puts the table's item back. So the store refuses (the policy fails closed:
 * 500 store_unavailable) and nothing is half-kept. The lock orders the file and the
 * table the same way when two processes write one key, and keeps Kamailio's own
 * processes from meeting as SQLite writers (db_sqlite sets no busy timeout: a second
 * writer would be refused at once).
 *
 * Delete and insert rather than an upsert: Debian's table has no unique key_name,
 * and db_sqlite implements neither insert_update nor replace; the transaction makes
 * the pair one change. BEGIN/COMMIT go as raw queries (db_sqlite has no
 * start_transaction); a driver without raw queries writes the pair unwrapped.
 *
 * Redis (a db_url redis://..., Kamailio's db_redis with the key "htable=entry:key_name",
 * host-shims/kamailio/kamailio.cfg): there the row is the hash htable:entry::<key_name>
 * and an insert is one HMSET of it, an upsert in one command. So a value is written
 * by the insert alone: db_redis has no transactions, and a delete first would leave
 * the key without its row if the insert then failed.
 *
 * DMQ: htable's API (htable_api_t set/rm, api.c ht_api_set_cell/ht_api_del_cell in
 * 5.6.3) replicates to the peers itself when the table has dmqreplicate=1, as the
 * cfg's sht_sets does, so nothing more is needed here. A peer applies a replicated
 * write to its table only: each node's database keeps the writes made on that node
 * (as the shim's), and a node that restarts gets the rest with htable's
 * dmq_init_sync.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "../../core/dprint.h"
#include "../../core/mem/mem.h"
#include "../../core/mem/shm_mem.h"
#include "../../core/sr_module.h"
#include "../../lib/srdb1/db.h"

#include "tg_mod.h"

str tg_db_url = STR_NULL;
str tg_db_table = str_init("htable");
char *tg_nonce_secret_file = NULL;

static str tg_col_name = str_init("key_name");
static str tg_col_ktype = str_init("key_type");
static str tg_col_vtype = str_init("value_type");
static str tg_col_value = str_init("key_value");
static str tg_col_expires = str_init("expires");

static db_func_t tg_dbf;
static int tg_db_upsert = 0; /* the driver's insert replaces the row (db_redis) */
/* db_url for the log: without the user and password a Redis URL may carry. */
static char tg_db_shown[256] = "";
static db1_con_t *tg_db_con = NULL;
static int tg_db_pid = 0; /* the process tg_db_con was opened in */
static gen_lock_t *tg_db_lock = NULL;
/* When the write lock was taken (CLOCK_MONOTONIC, ms; 0: free), shared: a waiter
 * gives up on a holder stuck longer than TG_DB_HOLD_MAX_MS. */
static volatile long long *tg_db_held_since = NULL;
#define TG_DB_HOLD_MAX_MS 2000

int tg_db_enabled(void)
{
	return tg_db_url.s != NULL && tg_db_url.len > 0;
}

/* scheme://[userinfo@]rest -> scheme://rest, for the log. */
static void tg_db_show(void)
{
	const char *s = tg_db_url.s, *end = tg_db_url.s + tg_db_url.len;
	const char *rest = memchr(s, ':', tg_db_url.len), *at = NULL, *p;

	if(rest == NULL || end - rest < 3 || memcmp(rest, "://", 3) != 0) {
		snprintf(tg_db_shown, sizeof(tg_db_shown), "%.*s", tg_db_url.len, s);
		return;
	}
	rest += 3;
	for(p = rest; p < end && *p != '/'; p++)
		if(*p == '@')
			at = p;
	snprintf(tg_db_shown, sizeof(tg_db_shown), "%.*s%.*s", (int)(rest - s), s,
			(int)(end - (at != NULL ? at + 1 : rest)), at != NULL ? at + 1 : rest);
}

/* mod_init: binds the driver and checks it can do what a write needs. */
int tg_db_init(void)
{
	if(!tg_db_enabled())
		return 0;
	tg_db_show();
	if(db_bind_mod(&tg_db_url, &tg_dbf) < 0) {
		LM_ERR("db_url %s: no database module for it (loadmodule \"db_sqlite.so\" "
			   "or \"db_redis.so\" before trunkguard)\n",
				tg_db_shown);
		return -1;
	}
	if(!DB_CAPABILITY(tg_dbf, DB_CAP_INSERT | DB_CAP_DELETE)) {
		LM_ERR("db_url %s: the database module cannot insert and delete\n",
				tg_db_shown);
		return -1;
	}
	tg_db_upsert = tg_db_url.len > 8 && strncasecmp(tg_db_url.s, "redis://", 8) == 0;
	tg_db_lock = lock_alloc();
	tg_db_held_since = shm_malloc(sizeof(*tg_db_held_since));
	if(tg_db_lock == NULL || lock_init(tg_db_lock) == NULL || tg_db_held_since == NULL) {
		LM_ERR("cannot make the store's write lock\n");
		return -1;
	}
	*tg_db_held_since = 0;
	return 0;
}

/* This process's connection, opened in the process that uses it: a database
 * connection must not cross a fork (child_init opens the workers'; the timer and RPC
 * processes open theirs at their first write). */
int tg_db_open(void)
{
	if(!tg_db_enabled())
		return 0;
	if(tg_db_con != NULL && tg_db_pid == getpid())
		return 0;
	tg_db_con = tg_dbf.init(&tg_db_url);
	if(tg_db_con == NULL) {
		LM_ERR("cannot connect to %s\n", tg_db_shown);
		return -1;
	}
	tg_db_pid = getpid();
	return 0;
}

void tg_db_close(void)
{
	if(tg_db_con != NULL && tg_db_pid == getpid())
		tg_dbf.close(tg_db_con);
	tg_db_con = NULL;
	tg_db_pid = 0;
}

static int tg_db_raw(const char *sql)
{
	str q;
	db1_res_t *res = NULL;
	int rc;

	if(tg_dbf.raw_query == NULL)
		return 0;
	q.s = (char *)sql;
	q.len = strlen(sql);
	/* A result to store: db_sqlite runs the statement only when it fetches. */
	rc = tg_dbf.raw_query(tg_db_con, &q, &res);
	if(res != NULL)
		tg_dbf.free_result(tg_db_con, res);
	return rc < 0 ? -1 : 0;
}

/* The key's row as `value` (NULL: no row), inside the open transaction. */
static int tg_db_put(str *key, str *value)
{
	db_key_t kd[1], ki[5];
	db_val_t vd[1], vi[5];

	if(tg_dbf.use_table(tg_db_con, &tg_db_table) < 0)
		return -1;
	kd[0] = &tg_col_name;
	memset(vd, 0, sizeof(vd));
	vd[0].type = DB1_STR;
	vd[0].val.str_val = *key;
	/* db_redis deletes a row only with a mapping besides its key (kamailio.cfg's
	 * keytype; redis_dbase.c, db_redis_perform_delete). */
	if(value == NULL || !tg_db_upsert) {
		if(tg_dbf.delete(tg_db_con, kd, 0, vd, 1) < 0)
			return -1;
	}
	if(value == NULL)
		return 0;
	ki[0] = &tg_col_name;
	ki[1] = &tg_col_ktype;
	ki[2] = &tg_col_vtype;
	ki[3] = &tg_col_value;
	ki[4] = &tg_col_expires;
	memset(vi, 0, sizeof(vi));
	vi[0].type = DB1_STR;
	vi[0].val.str_val = *key;
	vi[1].type = DB1_INT;
	vi[1].val.int_val = 0;
	vi[2].type = DB1_INT;
	vi[2].val.int_val = 0;
	vi[3].type = DB1_STR;
	vi[3].val.str_val = *value;
	vi[4].type = DB1_INT;
	vi[4].val.int_val = 0;
	return tg_dbf.insert(tg_db_con, ki, vi, 5) < 0 ? -1 : 0;
}

/* The key's row put back as the table has it (old NULL: no item, no row), for a
 * driver without transactions whose write the table then refused, or whose answer
 * was lost after it may have been applied: Redis and the table stay one. Best effort:
 * logged when it fails too. */
static void tg_db_restore(str *key, ht_cell_t *old)
{
	char num[24];
	str v;

	if(old == NULL) {
		v.s = NULL;
		v.len = 0;
	} else if(old->flags & AVP_VAL_STR) {
		v = old->value.s;
	} else {
		v.len = snprintf(num, sizeof(num), "%ld", (long)old->value.n);
		v.s = num;
	}
	if(tg_db_put(key, old == NULL ? NULL : &v) < 0)
		LM_ERR("store: %s keeps %.*s, which the table refused: put it right by hand "
			   "(or restart this node once the database answers)\n",
				tg_db_shown, key->len, key->s);
}

static long long tg_db_mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void tg_db_unlock(void)
{
	*tg_db_held_since = 0;
	lock_release(tg_db_lock);
}

/* The write lock, or -1 as soon as the store watch finds Redis silent
 * (tg_store_watch.c), or once its holder has held it longer than TG_DB_HOLD_MAX_MS:
 * a write waiting on a database that will never answer (db_redis has no read
 * timeout) while the watch's own connection is answered, as after Redis restarted
 * or moved behind the same address. Tried rather than waited for, so a waiting
 * worker can give up: yielding first, as the lock is held for one round trip. */
static int tg_db_lock_unless_down(void)
{
	int tries = 0;
	long long since;

	while(lock_try(tg_db_lock) != 0) {
		if(tg_store_is_down())
			return -1;
		if(++tries < 64) {
			sched_yield();
			continue;
		}
		since = *tg_db_held_since;
		if(since != 0 && tg_db_mono_ms() - since > TG_DB_HOLD_MAX_MS)
			return -1;
		usleep(200);
	}
	*tg_db_held_since = tg_db_mono_ms();
	if(tg_store_is_down()) {
		tg_db_unlock();
		return -1;
	}
	return 0;
}

/* One store write (value NULL: a delete): the database first, then `table_write`
 * (htable's own), one change or none. 0: done; -1: refused, nothing changed. */
int tg_db_write(str *key, str *value, int (*table_write)(str *key, str *value),
		int (*table_restore)(str *key, ht_cell_t *old))
{
	ht_cell_t *old = NULL;
	int in_tx = 0;

	if(!tg_db_enabled())
		return table_write(key, value);
	if(tg_db_lock_unless_down() < 0) {
		LM_ERR("store: %s does not answer (or a write to it hangs); %.*s refused\n",
				tg_db_shown, key->len, key->s);
		update_stat(tg_st_store_refused, 1);
		return -1;
	}
	if(tg_db_open() < 0)
		goto refused;
	in_tx = tg_dbf.raw_query != NULL;
	if(in_tx && tg_db_raw("BEGIN") < 0)
		goto refused;
	old = tg_htable_clone(key);
	if(tg_db_put(key, value) < 0)
		goto rollback;
	if(table_write(key, value) < 0) {
		LM_ERR("the htable refused %.*s\n", key->len, key->s);
		goto rollback;
	}
	if(in_tx && tg_db_raw("COMMIT") < 0) {
		/* The table's item as it was: the database did not keep the write. */
		table_restore(key, old);
		goto rollback;
	}
	if(old != NULL)
		pkg_free(old);
	tg_db_unlock();
	return 0;

rollback:
	if(in_tx)
		tg_db_raw("ROLLBACK");
	else
		tg_db_restore(key, old);
	if(old != NULL)
		pkg_free(old);
refused:
	tg_db_unlock();
	LM_ERR("store: cannot write %.*s to %s; refused\n", key->len, key->s,
			tg_db_shown);
	update_stat(tg_st_store_refused, 1);
	return -1;
}

/* --- the nonce secret file ------------------------------------------------------ */

/* The key the policy keeps its nonce secret at (src/store.rs keys::NONCE_SECRET): 64
 * hex digits, the 32 bytes nonces are signed with (RFC 7616 3.3 leaves the nonce's
 * form to the server). */
static str tg_nonce_key = str_init("tg/nonce_secret");

/* Without a file: the table's secret (loaded from the database), else a new one made
 * here, before the fork. Left to the workers, two of them could each make one at
 * their first message: the store keeps the last write (htable has no
 * compare-and-swap), and the worker whose secret lost would go on signing nonces
 * every other worker refuses. */
static int tg_nonce_secret_make(int (*store_set)(str *key, str *value))
{
	static const char digits[] = "0123456789abcdef";
	unsigned char raw[32];
	char cur[80], hex[65];
	size_t got = 0;
	ssize_t n;
	str v;
	int i, rc;

	if(tg_store_get_str(&tg_nonce_key, cur, sizeof(cur)) == 64)
		return 0;
	while(got < sizeof(raw)) {
		n = getrandom(raw + got, sizeof(raw) - got, 0);
		if(n < 0) {
			if(errno == EINTR)
				continue;
			LM_ERR("cannot make a nonce secret: getrandom: %s\n", strerror(errno));
			return -1;
		}
		got += (size_t)n;
	}
	for(i = 0; i < 32; i++) {
		hex[2 * i] = digits[raw[i] >> 4];
		hex[2 * i + 1] = digits[raw[i] & 0x0f];
	}
	hex[64] = '\0';
	memset(raw, 0, sizeof(raw));
	v.s = hex;
	v.len = 64;
	rc = store_set(&tg_nonce_key, &v);
	memset(hex, 0, sizeof(hex));
	/* The main process's connection goes before Kamailio forks. */
	tg_db_close();
	if(rc < 0) {
		LM_ERR("cannot store a new nonce secret\n");
		return -1;
	}
	LM_INFO("a new nonce secret in force (no nonce_secret_file, none in the table)\n");
	return 0;
}

/* Whether htable replicates its tables over DMQ (its modparam enable_dmq, set before
 * any mod_init). Then a node without a secret file makes one of its own whenever its
 * table has none (a first start, a store emptied), and htable's initial sync replaces
 * it seconds later with the peer's: every nonce the node issued in between is refused,
 * and its database keeps a secret no other node holds. */
static int tg_htable_replicates(void)
{
	modparam_t type;
	int *on;

	on = find_param_export(
			find_module_by_name("htable"), "enable_dmq", INT_PARAM, &type);
	return on != NULL && *on > 0;
}

/* mod_init, before the fork and before any policy reads it: the file's secret into
 * the table (and the database), so that every node given the same file verifies the
 * others' nonces: a challenge from one node is answered at another. The file must be
 * 64 hex digits that neither group nor others may read or write: whoever reads it can
 * mint nonces for any address, whoever replaces it hands the nodes theirs. Anything
 * else stops Kamailio (as the shim's _read_nonce_secret does). */
int tg_nonce_secret_init(int (*store_set)(str *key, str *value))
{
	struct stat st;
	char *text = NULL;
	size_t len = 0, i, n = 0;
	char hex[65];
	char cur[80];
	str v;
	int rc;

	if(tg_nonce_secret_file == NULL || *tg_nonce_secret_file == '\0') {
		if(tg_htable_replicates()) {
			LM_ERR("trunkguard: htable replicates over DMQ (enable_dmq) but there is no "
				   "nonce_secret_file: give every node the same one (docs/kamailio.md, "
				   "\"Replication across nodes (DMQ)\"); not starting\n");
			return -1;
		}
		return tg_nonce_secret_make(store_set);
	}
	if(stat(tg_nonce_secret_file, &st) != 0
			|| tg_read_file(tg_nonce_secret_file, &text, &len) < 0) {
		LM_ERR("cannot read the nonce secret file %s: %s\n", tg_nonce_secret_file,
				strerror(errno));
		return -1;
	}
	if(st.st_mode & 077) {
		LM_ERR("the nonce secret file %s is open to group or others (mode %04o): "
			   "chmod 600 it; not starting\n",
				tg_nonce_secret_file, (unsigned)(st.st_mode & 07777));
		pkg_free(text);
		return -1;
	}
	for(i = 0; i < len; i++) {
		if(isspace((unsigned char)text[i]))
			continue;
		if(!isxdigit((unsigned char)text[i]) || n >= 64) {
			n = 65;
			break;
		}
		hex[n++] = (char)tolower((unsigned char)text[i]);
	}
	pkg_free(text);
	if(n != 64) {
		LM_ERR("the nonce secret file %s must hold 64 hex digits (32 bytes, e.g. "
			   "`openssl rand -hex 32`); not starting\n",
				tg_nonce_secret_file);
		return -1;
	}
	hex[64] = '\0';
	/* Written only when the table (loaded from the database) holds another. */
	if(tg_store_get_str(&tg_nonce_key, cur, sizeof(cur)) == 64
			&& memcmp(cur, hex, 64) == 0)
		return 0;
	v.s = hex;
	v.len = 64;
	rc = store_set(&tg_nonce_key, &v);
	/* The main process's connection goes before Kamailio forks. */
	tg_db_close();
	if(rc < 0) {
		LM_ERR("cannot store the nonce secret of %s\n", tg_nonce_secret_file);
		return -1;
	}
	LM_INFO("nonce secret from %s in force\n", tg_nonce_secret_file);
	return 0;
}
