/*
 * trunkguard.so: the trunkguard policy (the .wasm, docs/abi.md) as a native Kamailio
 * module. This file: exports, parameters, init, the per-process policy, the store
 * (Kamailio's htable through its API, written through to a database by tg_db.c) and
 * applying publications.
 *
 * The policy runs under wasmtime inside libtrunkguard_kamailio.a (trunkguard.h). One
 * tg_policy per process, created after the fork: wasmtime must not compile in the
 * main process before Kamailio forks its workers (trunkguard.h), so mod_init only
 * checks the parameters and nothing here calls the library before child_init.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "../../core/dprint.h"
#include "../../core/mem/mem.h"
#include "../../core/mem/shm_mem.h"
#include "../../core/kemi.h"
#include "../../core/timer_proc.h"
#include "../htable/ht_api.h"
#include "../htable/api.h"
#include "../tm/tm_load.h"

#include "tg_mod.h"

MODULE_VERSION

char *tg_wasm_param = NULL;
char *tg_config_param = NULL;
str tg_htable_name = str_init("tg");
char *tg_alert_url = NULL;
char *tg_alert_token_file = NULL;
char *tg_spool_dir = "/var/lib/trunkguard/kamailio/spool";
int tg_refusal_log_rate = 20;
char *tg_refusal_log_file = NULL;
int tg_timer_interval = 1;

tg_pub_t *tg_pub = NULL;
tg_proc_t tg_proc;

static htable_api_t tg_htb;
static int tg_htb_bound = 0;
static int tg_watching = 0; /* 1: a store watch process (a Redis store) */

stat_var *tg_st_judged, *tg_st_allowed, *tg_st_routed, *tg_st_challenged,
		*tg_st_accepted, *tg_st_refused_auth, *tg_st_refused_address,
		*tg_st_refused_other, *tg_st_alerts_spooled, *tg_st_alerts_sent,
		*tg_st_alerts_rejected, *tg_st_policy_errors, *tg_st_store_refused,
		*tg_st_in_dialog_refused, *tg_st_dialog_reused, *tg_st_alerts_retried,
		*tg_st_alerts_dropped, *tg_st_config_refused, *tg_st_inbound_failover;

/* Refusals are counted by the group of their cause (src/verdict.rs `Cause`):
 * credentials, the address a request came from, and the rest. */
stat_export_t tg_stats[] = {
	{"judged", 0, &tg_st_judged},
	{"allowed", 0, &tg_st_allowed},
	{"routed", 0, &tg_st_routed},
	{"challenged", 0, &tg_st_challenged},
	{"accepted", 0, &tg_st_accepted},
	{"refused_auth", 0, &tg_st_refused_auth},
	{"refused_address", 0, &tg_st_refused_address},
	{"refused_other", 0, &tg_st_refused_other},
	{"alerts_spooled", 0, &tg_st_alerts_spooled},
	{"alerts_sent", 0, &tg_st_alerts_sent},
	{"alerts_rejected", 0, &tg_st_alerts_rejected},
	{"policy_errors", 0, &tg_st_policy_errors},
	{"store_refused", 0, &tg_st_store_refused},
	{"in_dialog_refused", 0, &tg_st_in_dialog_refused},
	{"dialog_reused", 0, &tg_st_dialog_reused},
	{"alerts_retried", 0, &tg_st_alerts_retried},
	{"alerts_dropped", 0, &tg_st_alerts_dropped},
	{"config_refused", 0, &tg_st_config_refused},
	{"inbound_failover", 0, &tg_st_inbound_failover},
	/* 1 while the Redis store does not answer (tg_store_watch.c), else 0. */
	{"store_down", STAT_IS_FUNC | STAT_NO_RESET, (stat_var **)tg_stat_store_down},
	{0, 0, 0}
};

static param_export_t params[] = {
	{"wasm", PARAM_STRING, &tg_wasm_param},
	{"config", PARAM_STRING, &tg_config_param},
	{"htable", PARAM_STR, &tg_htable_name},
	{"alert_url", PARAM_STRING, &tg_alert_url},
	{"alert_token_file", PARAM_STRING, &tg_alert_token_file},
	{"spool_dir", PARAM_STRING, &tg_spool_dir},
	{"refusal_log_rate", PARAM_INT, &tg_refusal_log_rate},
	{"refusal_log_file", PARAM_STRING, &tg_refusal_log_file},
	{"timer_interval", PARAM_INT, &tg_timer_interval},
	{"db_url", PARAM_STR, &tg_db_url},
	{"db_table", PARAM_STR, &tg_db_table},
	{"nonce_secret_file", PARAM_STRING, &tg_nonce_secret_file},
	{"drills", PARAM_INT, &tg_drills},
	{0, 0, 0}
};

static int mod_init(void);
static int child_init(int rank);
static void mod_destroy(void);

struct module_exports exports = {
	"trunkguard",
	DEFAULT_DLFLAGS,
	tg_cmds,
	params,
	tg_rpc_cmds,
	tg_pvs,
	0,
	mod_init,
	child_init,
	mod_destroy
};

int mod_register(char *path, int *dlflags, void *p1, void *p2)
{
	return tg_kemi_register();
}

uint64_t tg_now_ms(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

static int tg_file_readable(const char *what, const char *path)
{
	if(path == NULL || *path == '\0') {
		LM_ERR("modparam(\"trunkguard\", \"%s\") is not set\n", what);
		return -1;
	}
	if(access(path, R_OK) != 0) {
		LM_ERR("modparam(\"trunkguard\", \"%s\"): cannot read %s: %s\n", what,
				path, strerror(errno));
		return -1;
	}
	return 0;
}

int tg_htable_bind(void)
{
	if(tg_htb_bound)
		return 0;
	if(htable_load_api(&tg_htb) < 0)
		return -1;
	tg_htb_bound = 1;
	return 0;
}

stat_var *tg_cause_stats[TG_CAUSES_MAX];
const char *tg_cause_names[TG_CAUSES_MAX];
int tg_cause_count = 0;

/* cause_<name> for every cause the policy has, before the fork (the counters live in
 * shared memory; counter_register copies the name). */
static int tg_register_cause_stats(void)
{
	const char *cause;
	char *name;
	size_t n;

	for(tg_cause_count = 0; tg_cause_count < TG_CAUSES_MAX; tg_cause_count++) {
		cause = tg_cause_name((uint32_t)tg_cause_count);
		if(cause == NULL)
			break;
		n = strlen(cause) + sizeof("cause_");
		name = pkg_malloc(n);
		if(name == NULL) {
			PKG_MEM_ERROR;
			return -1;
		}
		snprintf(name, n, "cause_%s", cause);
		if(register_stat(exports.name, name, &tg_cause_stats[tg_cause_count], 0) != 0) {
			pkg_free(name);
			return -1;
		}
		pkg_free(name);
		tg_cause_names[tg_cause_count] = cause;
	}
	return 0;
}

void tg_count_cause(const tg_str *cause)
{
	int i;

	for(i = 0; i < tg_cause_count; i++)
		if(tg_str_is(cause, tg_cause_names[i])) {
			update_stat(tg_cause_stats[i], 1);
			return;
		}
}

static int mod_init(void)
{
	struct stat st;

	/* Checks only: no policy before the fork (trunkguard.h). */
	if(tg_interface_version() != TG_INTERFACE_VERSION) {
		LM_ERR("libtrunkguard_kamailio speaks interface %u, this module %d: "
			   "rebuild both from one tree (crates/kamailio-module/build)\n",
				tg_interface_version(), TG_INTERFACE_VERSION);
		return -1;
	}
	if(tg_file_readable("wasm", tg_wasm_param) < 0
			|| tg_file_readable("config", tg_config_param) < 0)
		return -1;
	if(tg_timer_interval < 1)
		tg_timer_interval = 1;
	if(tg_refusal_log_rate < 0)
		tg_refusal_log_rate = 0;
	if(tg_refusal_log_file != NULL && *tg_refusal_log_file == '\0')
		tg_refusal_log_file = NULL;
	if(tg_alert_url != NULL && *tg_alert_url == '\0')
		tg_alert_url = NULL;
	if(tg_alert_token_file != NULL && *tg_alert_token_file == '\0')
		tg_alert_token_file = NULL;
	if(tg_htable_bind() < 0) {
		LM_ERR("the htable module must be loaded before trunkguard (its table "
			   "\"%.*s\" holds the policy's state)\n",
				tg_htable_name.len, tg_htable_name.s);
		return -1;
	}
	if(tg_functions_init() < 0 || tg_reply_conn_init() < 0)
		return -1;
	if(tg_db_init() < 0)
		return -1;
	if(tg_drill_init() < 0)
		return -1;
	if(stat(tg_spool_dir, &st) != 0) {
		if(mkdir(tg_spool_dir, 0700) != 0) {
			LM_ERR("cannot make the alert spool %s: %s\n", tg_spool_dir,
					strerror(errno));
			return -1;
		}
	} else if(!S_ISDIR(st.st_mode)) {
		LM_ERR("spool_dir %s is not a directory\n", tg_spool_dir);
		return -1;
	}
	if(register_module_stats(exports.name, tg_stats) != 0
			|| tg_register_cause_stats() < 0) {
		LM_ERR("cannot register the statistics\n");
		return -1;
	}

	tg_pub = shm_malloc(sizeof(*tg_pub));
	if(tg_pub == NULL) {
		SHM_MEM_ERROR;
		return -1;
	}
	memset(tg_pub, 0, sizeof(*tg_pub));
	if(lock_init(&tg_pub->lock) == NULL) {
		LM_ERR("cannot init the publication lock\n");
		shm_free(tg_pub);
		tg_pub = NULL;
		return -1;
	}
	tg_pub->rev = 1;
	/* Absolute, as trunkguard.publish keeps them: Kamailio may chdir (-w). */
	if(realpath(tg_wasm_param, tg_pub->wasm) == NULL
			|| realpath(tg_config_param, tg_pub->config) == NULL) {
		LM_ERR("cannot resolve the wasm or config path: %s\n", strerror(errno));
		return -1;
	}

	memset(&tg_proc, 0, sizeof(tg_proc));
	/* After htable's mod_init loaded the table from its database: the configured
	 * secret wins over the one kept there. */
	if(tg_nonce_secret_init(tg_store_set_str) < 0)
		return -1;
	tg_watching = tg_store_watch_init();
	if(tg_watching < 0)
		return -1;
	register_basic_timers(1 + tg_watching);
	if(tg_alert_url == NULL)
		LM_WARN("trunkguard: no alert URL (modparam alert_url): alerts are kept in %s "
				"and delivered to nobody\n",
				tg_spool_dir);
	return 0;
}

static int child_init(int rank)
{
	if(rank == PROC_MAIN) {
		/* Alert windows, the refusal log and alert delivery: one process. */
		if(fork_basic_timer(PROC_TIMER, "TRUNKGUARD TIMER", 1, tg_timer, NULL,
				   tg_timer_interval)
				< 0) {
			LM_ERR("cannot start the trunkguard timer process\n");
			return -1;
		}
		/* Its own process: the timer's alert deliveries may take seconds. */
		if(tg_watching
				&& fork_basic_timer(PROC_TIMER, "TRUNKGUARD STORE WATCH", 1,
						   tg_store_watch, NULL, 1)
						   < 0) {
			LM_ERR("cannot start the trunkguard store watch process\n");
			return -1;
		}
		return 0;
	}
	/* PROC_INIT, the timers, RPC, TCP main: they never judge a message. */
	if(rank <= 0)
		return 0;
	/* Each worker its own database connection, after the fork; a failure is not
	 * fatal: the first write retries, and is refused if it fails again. */
	tg_db_open();
	/* A SIP worker (UDP, TCP, SCTP): load the policy now rather than on the first
	 * message (a compile takes about a second); a failure is not fatal, the first
	 * message retries and fails closed. */
	if(tg_proc.rlog == NULL)
		tg_proc.rlog = tg_refusal_log_new((uint32_t)tg_refusal_log_rate);
	tg_sync();
	return 0;
}

static void mod_destroy(void)
{
	tg_db_close();
	if(tg_proc.policy != NULL) {
		tg_policy_free(tg_proc.policy);
		tg_proc.policy = NULL;
	}
	if(tg_proc.rlog != NULL) {
		tg_refusal_log_free(tg_proc.rlog);
		tg_proc.rlog = NULL;
	}
	if(tg_pub != NULL) {
		lock_destroy(&tg_pub->lock);
		shm_free(tg_pub);
		tg_pub = NULL;
	}
}

/* --- the store: the htable API ------------------------------------------------- */

static int tg_store_get(void *ctx, const char *key, size_t key_len, void *sink)
{
	str k;
	ht_cell_t *cell;
	char num[24];
	int n;

	k.s = (char *)key;
	k.len = (int)key_len;
	cell = tg_htb.get_clone(&tg_htable_name, &k);
	if(cell == NULL)
		return 0;
	if(cell->flags & AVP_VAL_STR) {
		tg_sink_put(sink, cell->value.s.s, (size_t)cell->value.s.len);
	} else {
		n = snprintf(num, sizeof(num), "%ld", (long)cell->value.n);
		tg_sink_put(sink, num, (size_t)n);
	}
	/* get_clone hands over one pkg block (ht_cell_pkg_copy). */
	pkg_free(cell);
	return 1;
}

/* htable's own writes (tg_db_write calls them inside its transaction). */
static int tg_table_write(str *key, str *value)
{
	int_str v;

	/* A drill refuses the table's write, as Kamailio refuses one: after the
	 * database's, which is then rolled back (or, for Redis, put back). */
	if(tg_drill_refuses(key))
		return -1;

	if(value == NULL) {
		/* rm answers -1 only when the table is missing; an absent key is deleted. */
		return tg_htb.rm(&tg_htable_name, key) == 0 ? 0 : -1;
	}
	v.s = *value;
	/* mode 1: as sht_sets does it (the table's own expiry applies). */
	return tg_htb.set(&tg_htable_name, key, AVP_VAL_STR, &v, 1) == 0 ? 0 : -1;
}

/* The item as it was before a write the database then did not keep. */
static int tg_table_restore(str *key, ht_cell_t *old)
{
	int_str v;

	if(old == NULL)
		return tg_htb.rm(&tg_htable_name, key) == 0 ? 0 : -1;
	if(old->flags & AVP_VAL_STR)
		v.s = old->value.s;
	else
		v.n = old->value.n;
	return tg_htb.set(&tg_htable_name, key, old->flags & AVP_VAL_STR, &v, 1) == 0
				   ? 0
				   : -1;
}

/* A pkg copy of the item (pkg_free it), NULL when absent. */
ht_cell_t *tg_htable_clone(str *key)
{
	if(tg_htable_bind() < 0)
		return NULL;
	return tg_htb.get_clone(&tg_htable_name, key);
}

int tg_store_set_str(str *key, str *value)
{
	return tg_db_write(key, value, tg_table_write, tg_table_restore);
}

static int tg_store_set(void *ctx, const char *key, size_t key_len,
		const char *value, size_t value_len)
{
	str k, v;

	k.s = (char *)key;
	k.len = (int)key_len;
	v.s = (char *)value;
	v.len = (int)value_len;
	return tg_store_set_str(&k, &v);
}

static int tg_store_del(void *ctx, const char *key, size_t key_len)
{
	str k;

	k.s = (char *)key;
	k.len = (int)key_len;
	return tg_db_write(&k, NULL, tg_table_write, tg_table_restore);
}

tg_store tg_store_of(void)
{
	tg_store s;
	s.ctx = NULL;
	s.get = tg_store_get;
	s.set = tg_store_set;
	s.del = tg_store_del;
	return s;
}

/* The item `key` of the state table as text in out (NUL-terminated): its length,
 * 0 when absent, -1 when it does not fit. */
int tg_store_get_str(str *key, char *out, int out_len)
{
	ht_cell_t *cell;
	int n;

	if(tg_htable_bind() < 0)
		return -1;
	cell = tg_htb.get_clone(&tg_htable_name, key);
	if(cell == NULL)
		return 0;
	if(cell->flags & AVP_VAL_STR) {
		n = cell->value.s.len;
		if(n >= out_len) {
			pkg_free(cell);
			return -1;
		}
		memcpy(out, cell->value.s.s, n);
		out[n] = '\0';
	} else {
		n = snprintf(out, out_len, "%ld", (long)cell->value.n);
	}
	pkg_free(cell);
	return n;
}

/* --- the policy of this process, and publications ------------------------------- */

/* Reads a whole file into a pkg block (NUL-terminated; *len without it). */
int tg_read_file(const char *path, char **out, size_t *len)
{
	int fd;
	struct stat st;
	char *buf;
	ssize_t n;
	size_t got = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if(fd < 0)
		return -1;
	if(fstat(fd, &st) != 0 || st.st_size < 0 || st.st_size > 64 * 1024 * 1024) {
		close(fd);
		errno = EFBIG;
		return -1;
	}
	buf = pkg_malloc((size_t)st.st_size + 1);
	if(buf == NULL) {
		close(fd);
		errno = ENOMEM;
		return -1;
	}
	while(got < (size_t)st.st_size) {
		n = read(fd, buf + got, (size_t)st.st_size - got);
		if(n < 0 && errno == EINTR)
			continue;
		if(n <= 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	buf[got] = '\0';
	*out = buf;
	*len = got;
	return 0;
}

/* Creates this process's policy on first use, and applies a new publication (its
 * .wasm, then its config) when the shared revision moved. 0: a policy is in force;
 * -1: none (the caller fails closed). A publication this process cannot apply keeps
 * the previous one. */
int tg_sync(void)
{
	int rev;
	char wasm[PATH_MAX], config[PATH_MAX];
	char err[TG_ERR_LEN];
	char *json = NULL;
	size_t json_len = 0;
	int64_t gen;
	int module_refused = 0;

	if(tg_pub == NULL)
		return -1;
	rev = tg_pub->rev; /* an int read: checked at every message without the lock */
	if(tg_proc.policy != NULL && rev == tg_proc.rev)
		return 0;
	lock_get(&tg_pub->lock);
	rev = tg_pub->rev;
	memcpy(wasm, tg_pub->wasm, sizeof(wasm));
	memcpy(config, tg_pub->config, sizeof(config));
	lock_release(&tg_pub->lock);

	err[0] = '\0';
	if(tg_proc.policy == NULL) {
		tg_proc.policy = tg_policy_new(wasm, tg_store_of(), err, sizeof(err));
		if(tg_proc.policy == NULL) {
			LM_ERR("cannot load the policy %s: %s\n", wasm, err);
			return -1;
		}
		strcpy(tg_proc.wasm, wasm);
		tg_proc.rev = 0;
	} else if(strcmp(wasm, tg_proc.wasm) != 0) {
		if(tg_policy_load_module(tg_proc.policy, wasm, err, sizeof(err)) == 0) {
			strcpy(tg_proc.wasm, wasm);
			LM_INFO("module %s in force\n", wasm);
		} else {
			LM_ERR("module %s refused: %s (the previous one stays in force)\n",
					wasm, err);
			update_stat(tg_st_config_refused, 1);
			module_refused = 1;
		}
	}
	if(tg_read_file(config, &json, &json_len) < 0) {
		LM_ERR("config %s refused: cannot read it: %s (the previous one stays in "
			   "force)\n",
				config, strerror(errno));
		tg_proc.rev = rev;
		return 0;
	}
	err[0] = '\0';
	gen = tg_policy_configure(
			tg_proc.policy, json, json_len, err, sizeof(err));
	pkg_free(json);
	if(gen > 0) {
		LM_INFO("config %s in force (generation %lld)\n", config,
				(long long)gen);
		lock_get(&tg_pub->lock);
		/* The publication is in force only with its module: tgctl waits for this. */
		if(tg_pub->rev == rev && !module_refused) {
			tg_pub->generation = gen;
			tg_pub->applied = rev;
		}
		lock_release(&tg_pub->lock);
	} else {
		LM_ERR("config %s refused: %s (the previous one stays in force)\n",
				config, err);
		update_stat(tg_st_config_refused, 1);
	}
	tg_proc.rev = rev;
	return 0;
}
