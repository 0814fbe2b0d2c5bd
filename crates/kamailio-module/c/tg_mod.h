/*
 * trunkguard.so: what the module's files share. One job per file:
 *   trunkguard_mod.c  module exports, parameters, init, the per-process policy,
 *                     the store (htable API) and applying publications
 *   tg_db.c           the store written through to a database; the nonce secret file
 *   tg_store_watch.c  a Redis store watched from its own process: writes refused
 *                     at once while it does not answer
 *   tg_functions.c    the cfg/KEMI functions and $tg(name)
 *   tg_dialog.c       in-dialog requests bound to the dialogs this edge created
 *   tg_reply_rr.c     the route set a response gives the caller
 *   tg_rpc.c          the RPC commands (kamcmd trunkguard.*)
 *   tg_timer.c        the timer process: alert windows, the alert spool, delivery
 *   tg_drill.c        store-write fault drills (tests and fire drills only)
 */
#ifndef TG_MOD_H
#define TG_MOD_H

#include <limits.h>
#include <stdint.h>

#include "../../core/sr_module.h"
#include "../../core/str.h"
#include "../../core/locking.h"
#include "../../core/counters.h"
#include "../../core/rpc.h"
#include "../../core/pvar.h"
#include "../../core/parser/msg_parser.h"
#include "../htable/ht_api.h"

#include "trunkguard.h"

#define TG_ERR_LEN 512

/* Module parameters (trunkguard_mod.c). */
extern char *tg_wasm_param;
extern char *tg_config_param;
extern str tg_htable_name;
extern char *tg_alert_url;
extern char *tg_alert_token_file;
extern char *tg_spool_dir;
extern int tg_refusal_log_rate;
extern char *tg_refusal_log_file;
extern int tg_timer_interval;

/* The publication in force, in shared memory: `trunkguard.publish` writes it, every
 * process applies it when `rev` moved (tg_sync). */
typedef struct tg_pub {
	gen_lock_t lock;
	int rev;
	int64_t generation; /* the last generation a process reported in force */
	int applied;        /* the revision that generation is of */
	char wasm[PATH_MAX];
	char config[PATH_MAX];
} tg_pub_t;
extern tg_pub_t *tg_pub;

/* This process's policy. */
typedef struct tg_proc {
	tg_policy *policy;
	int rev;                 /* the publication applied (0: none yet) */
	char wasm[PATH_MAX];     /* the .wasm in force here */
	tg_refusal_log *rlog;
	unsigned int alert_seq;
} tg_proc_t;
extern tg_proc_t tg_proc;

/* Statistics (stats.get_statistics trunkguard:). */
extern stat_var *tg_st_judged, *tg_st_allowed, *tg_st_routed, *tg_st_challenged,
		*tg_st_accepted, *tg_st_refused_auth, *tg_st_refused_address,
		*tg_st_refused_other, *tg_st_alerts_spooled, *tg_st_alerts_sent,
		*tg_st_alerts_rejected, *tg_st_policy_errors, *tg_st_store_refused,
		*tg_st_in_dialog_refused, *tg_st_dialog_reused, *tg_st_alerts_retried,
		*tg_st_alerts_dropped, *tg_st_config_refused, *tg_st_inbound_failover;
extern stat_export_t tg_stats[];
/* One statistic per verdict cause, cause_<name> (tg_cause_name's list, src/verdict.rs):
 * tg_cause_stats[i] counts tg_cause_names[i]; tg_cause_count of them. */
#define TG_CAUSES_MAX 64
extern stat_var *tg_cause_stats[TG_CAUSES_MAX];
extern const char *tg_cause_names[TG_CAUSES_MAX];
extern int tg_cause_count;
void tg_count_cause(const tg_str *cause);

/* trunkguard_mod.c */
int tg_sync(void);
tg_store tg_store_of(void);
int tg_store_get_str(str *key, char *out, int out_len);
uint64_t tg_now_ms(void);
int tg_read_file(const char *path, char **out, size_t *len);
int tg_htable_bind(void);
ht_cell_t *tg_htable_clone(str *key);
int tg_store_set_str(str *key, str *value);

/* tg_db.c */
extern str tg_db_url;
extern str tg_db_table;
extern char *tg_nonce_secret_file;
int tg_db_enabled(void);
/* tg_drill.c */
extern int tg_drills;
int tg_drill_init(void);
int tg_drill_refuses(str *key);

int tg_db_init(void);
int tg_db_open(void);
void tg_db_close(void);
int tg_db_write(str *key, str *value, int (*table_write)(str *key, str *value),
		int (*table_restore)(str *key, ht_cell_t *old));
int tg_nonce_secret_init(int (*store_set)(str *key, str *value));

/* tg_functions.c */
extern cmd_export_t tg_cmds[];
extern pv_export_t tg_pvs[];
int tg_kemi_register(void);
int tg_functions_init(void);
tg_verdict *tg_verdict_of(sip_msg_t *msg);
void tg_addr(char *out, size_t len, struct ip_addr *ip, unsigned short port);
const char *tg_transport(int proto);
int tg_str_is(const tg_str *s, const char *lit);
int tg_removed(sip_msg_t *msg, int start, int end);
int tg_log_host_refusal(sip_msg_t *msg, int code, const char *cause);

/* tg_dialog.c */
int tg_dialog_bind(void);
int tg_dialog_fixup(void **param, int param_no);
int ki_trunkguard_dialog_open(sip_msg_t *msg);
int ki_trunkguard_dialog_route(sip_msg_t *msg);
/* tg_reply_rr.c */
int ki_trunkguard_reply_route_set(sip_msg_t *msg);
/* tm's API, bound on first use; NULL without tm. */
struct tm_binds;
struct tm_binds *tg_reply_tm(void);
/* tg_reply_conn.c */
int ki_trunkguard_reply_connection(sip_msg_t *msg);
int tg_reply_conn_init(void);
/* `ret` of a function that refuses the answer `msg` in the core reply_route (< 0:
 * the cfg drops it): tm's reference on the transaction, taken when the answer was
 * looked up, is given back, as tm's own handling of the answer would have given it
 * back; a dropped answer otherwise keeps its transaction in memory for ever
 * (docs/kamailio.md, "Facts about Kamailio 5.6.3"). A cfg that relays the answer
 * all the same loses nothing: tm looks it up again. */
int tg_answer_refused(sip_msg_t *msg, int ret);
struct cell;
void tg_dialog_failed_over(sip_msg_t *msg, str *uri, struct cell *t);

/* tg_rpc.c */
extern rpc_export_t tg_rpc_cmds[];

/* tg_timer.c */
int tg_spool(const tg_str *alert);
int tg_spool_count(void);
/* The alert URL as logs and the RPC show it: scheme, host and port only (a webhook's
 * secret is often its path, its query or its userinfo). */
void tg_url_shown(const char *url, char *out, size_t size);
void tg_timer(unsigned int ticks, void *param);

/* tg_store_watch.c */
int tg_store_watch_init(void);
int tg_store_is_down(void);
void tg_store_watch(unsigned int ticks, void *param);
unsigned long tg_stat_store_down(void);

#endif
