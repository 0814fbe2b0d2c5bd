/*
 * trunkguard.so: the RPC commands (kamcmd trunkguard.*).
 *
 *   trunkguard.publish config_path [wasm_path]  validated here first (tg_check, a
 *       private in-memory store); refused: an error with the reason, the last good
 *       one stays; accepted: the shared revision moves and every process applies it
 *       on its next message (or timer tick)
 *   trunkguard.status    revision, generation, paths, where alerts go, spool count
 *   trunkguard.binding group   the trunk group's registration (src/store.rs key
 *       tg/binding/<group>)
 *   trunkguard.counters  the module's statistics
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../core/dprint.h"
#include "../../core/mem/mem.h"

#include "tg_mod.h"

static const char *tg_rpc_publish_doc[2] = {
		"Publish a policy config (and optionally a new .wasm): validated first, "
		"refused ones leave the last good one in force",
		0};

static void tg_rpc_publish(rpc_t *rpc, void *ctx)
{
	char *config = NULL, *wasm = NULL;
	char config_abs[PATH_MAX], wasm_abs[PATH_MAX];
	char err[TG_ERR_LEN];
	char *json = NULL;
	size_t len = 0;
	int64_t gen;
	int rev, n;
	void *th;

	if(tg_pub == NULL) {
		rpc->fault(ctx, 500, "trunkguard is not initialised");
		return;
	}
	n = rpc->scan(ctx, "s*s", &config, &wasm);
	if(n < 1) {
		rpc->fault(ctx, 400, "usage: trunkguard.publish config_path [wasm_path]");
		return;
	}
	if(n < 2)
		wasm = NULL; /* left unset by scan: the .wasm in force stays */
	/* Absolute: every process opens them, whatever its working directory. */
	if(realpath(config, config_abs) == NULL) {
		rpc->fault(ctx, 400, "config %s refused: %s", config, strerror(errno));
		return;
	}
	if(wasm != NULL && *wasm != '\0') {
		if(realpath(wasm, wasm_abs) == NULL) {
			rpc->fault(ctx, 400, "module %s refused: %s", wasm, strerror(errno));
			return;
		}
	} else {
		lock_get(&tg_pub->lock);
		memcpy(wasm_abs, tg_pub->wasm, sizeof(wasm_abs));
		lock_release(&tg_pub->lock);
	}
	if(tg_read_file(config_abs, &json, &len) < 0) {
		rpc->fault(ctx, 400, "config %s refused: cannot read it: %s", config_abs,
				strerror(errno));
		return;
	}
	err[0] = '\0';
	gen = tg_check(wasm_abs, json, len, err, sizeof(err));
	pkg_free(json);
	if(gen <= 0)
		update_stat(tg_st_config_refused, 1);
	if(gen == 0) {
		LM_ERR("publication refused: config %s: %s (the previous one stays in "
			   "force)\n",
				config_abs, err);
		rpc->fault(ctx, 400, "config %s refused: %s", config_abs, err);
		return;
	}
	if(gen < 0) {
		LM_ERR("publication refused: module %s: %s (the previous one stays in "
			   "force)\n",
				wasm_abs, err);
		rpc->fault(ctx, 500, "module %s refused: %s", wasm_abs, err);
		return;
	}
	lock_get(&tg_pub->lock);
	strcpy(tg_pub->config, config_abs);
	strcpy(tg_pub->wasm, wasm_abs);
	rev = ++tg_pub->rev;
	lock_release(&tg_pub->lock);
	LM_INFO("published config %s with module %s (revision %d)\n", config_abs,
			wasm_abs, rev);
	if(rpc->add(ctx, "{", &th) < 0)
		return;
	rpc->struct_add(th, "dsss", "revision", rev, "config", config_abs, "wasm",
			wasm_abs, "status", "accepted: in force at each process's next message");
}

static const char *tg_rpc_status_doc[2] = {
		"The publication in force, where alerts go and the spool's size", 0};

static void tg_rpc_status(rpc_t *rpc, void *ctx)
{
	char wasm[PATH_MAX], config[PATH_MAX], alerts[PATH_MAX + 64];
	int rev, applied;
	long long gen;
	void *th;

	if(tg_pub == NULL) {
		rpc->fault(ctx, 500, "trunkguard is not initialised");
		return;
	}
	lock_get(&tg_pub->lock);
	rev = tg_pub->rev;
	applied = tg_pub->applied;
	gen = (long long)tg_pub->generation;
	memcpy(wasm, tg_pub->wasm, sizeof(wasm));
	memcpy(config, tg_pub->config, sizeof(config));
	lock_release(&tg_pub->lock);
	if(tg_alert_url != NULL)
		tg_url_shown(tg_alert_url, alerts, sizeof(alerts));
	else
		/* The shim's words (trunkguard_kemi.py), so tgctl says the same of either. */
		snprintf(alerts, sizeof(alerts),
				"no alert URL: kept in %s, delivered to nobody", tg_spool_dir);
	if(rpc->add(ctx, "{", &th) < 0)
		return;
	rpc->struct_add(th, "ddsssd", "revision", rev, "generation", gen > 0 ? (int)gen : 0,
			"wasm", wasm, "config", config, "alert_url", alerts, "spool",
			tg_spool_count());
	rpc->struct_add(th, "s", "spool_dir", tg_spool_dir);
	/* The last revision a process put in force: tgctl waits for its own. */
	rpc->struct_add(th, "d", "applied", applied);
}

static const char *tg_rpc_binding_doc[2] = {
		"A trunk group's registration as the policy keeps it", 0};

static void tg_rpc_binding(rpc_t *rpc, void *ctx)
{
	char *group = NULL;
	char keybuf[256], value[4096];
	str key;
	int n;
	void *th;

	if(rpc->scan(ctx, "s", &group) < 1) {
		rpc->fault(ctx, 400, "usage: trunkguard.binding group");
		return;
	}
	/* src/store.rs: keys::binding */
	n = snprintf(keybuf, sizeof(keybuf), "tg/binding/%s", group);
	if(n <= 0 || n >= (int)sizeof(keybuf)) {
		rpc->fault(ctx, 400, "group name too long");
		return;
	}
	key.s = keybuf;
	key.len = n;
	n = tg_store_get_str(&key, value, sizeof(value));
	if(n < 0) {
		rpc->fault(ctx, 500, "cannot read %s", keybuf);
		return;
	}
	if(n == 0) {
		rpc->fault(ctx, 404, "no binding for %s", group);
		return;
	}
	if(rpc->add(ctx, "{", &th) < 0)
		return;
	rpc->struct_add(th, "ss", "group", group, "binding", value);
}

static const char *tg_rpc_counters_doc[2] = {
		"The module's counters (also stats.get_statistics trunkguard:)", 0};

static void tg_rpc_counters(rpc_t *rpc, void *ctx)
{
	void *th;
	int i;

	if(rpc->add(ctx, "{", &th) < 0)
		return;
	/* A STAT_IS_FUNC entry holds its function, not a stat_var. */
	for(i = 0; tg_stats[i].name != NULL; i++)
		rpc->struct_add(th, "d", tg_stats[i].name,
				(tg_stats[i].flags & STAT_IS_FUNC)
						? (int)((stat_function)tg_stats[i].stat_pointer)()
						: (int)get_stat_val(*tg_stats[i].stat_pointer));
	for(i = 0; i < tg_cause_count; i++)
		rpc->struct_add(th, "d", get_stat_name(tg_cause_stats[i]),
				(int)get_stat_val(tg_cause_stats[i]));
}

rpc_export_t tg_rpc_cmds[] = {
	{"trunkguard.publish", tg_rpc_publish, tg_rpc_publish_doc, 0},
	{"trunkguard.status", tg_rpc_status, tg_rpc_status_doc, 0},
	{"trunkguard.binding", tg_rpc_binding, tg_rpc_binding_doc, 0},
	{"trunkguard.counters", tg_rpc_counters, tg_rpc_counters_doc, 0},
	{0, 0, 0, 0}
};
