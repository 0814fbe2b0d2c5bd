/*
 * trunkguard.h: the C interface of libtrunkguard_kamailio.a, the Rust library the
 * Kamailio module trunkguard.so links. It runs the policy .wasm under wasmtime
 * (docs/abi.md); the module answers the store through Kamailio's htable API.
 *
 * Threading: one tg_policy per Kamailio process, created after the fork
 * (child_init): wasmtime must not compile before Kamailio forks its workers.
 * Nothing here is thread-safe across processes except through the store.
 *
 * Strings: every tg_str points into memory owned by the library, valid until the
 * next call on the same tg_policy; they are NOT NUL-terminated.
 */
#ifndef TRUNKGUARD_H
#define TRUNKGUARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this interface (the structures and functions below). The module
 * refuses a library that answers another one from tg_interface_version(), so a
 * header and a library from different builds never meet. */
#define TG_INTERFACE_VERSION 2

uint32_t tg_interface_version(void);

typedef struct tg_policy tg_policy;

typedef struct tg_str {
	const char *s;
	size_t len;
} tg_str;

typedef struct tg_header {
	tg_str name;
	tg_str value;
} tg_header;

/* A found value is handed over with tg_sink_put(sink, ptr, len) (copied at once). */
void tg_sink_put(void *sink, const char *value, size_t len);

/* The policy's store, answered by the module (an htable: every worker sees the same
 * bindings; DMQ replication and write-through as the module does them). */
typedef struct tg_store {
	void *ctx;
	/* 1: found (after tg_sink_put), 0: absent, -1: the store failed. */
	int (*get)(void *ctx, const char *key, size_t key_len, void *sink);
	/* 0: stored, -1: refused (the policy fails closed; nothing counts as done). */
	int (*set)(void *ctx, const char *key, size_t key_len, const char *value,
			size_t value_len);
	/* 0: deleted or absent, -1: refused. */
	int (*del)(void *ctx, const char *key, size_t key_len);
} tg_store;

enum tg_action {
	TG_ALLOW = 1,     /* relay it (cause says why) */
	TG_CHALLENGE = 2, /* send the reply (401/407 with headers) */
	TG_REJECT = 3,    /* send the reply */
	TG_ACCEPT = 4,    /* answered by the policy (200 to REGISTER): send the reply */
	TG_ROUTE = 5      /* inbound call: relay to target via next_hop, failover after */
};

typedef struct tg_verdict {
	int action; /* enum tg_action */
	uint16_t code; /* 0 when the verdict has none */
	tg_str reason, cause, trunk_group, target, next_hop; /* len 0 when absent */
	const tg_header *headers; size_t headers_len; /* reply headers */
	const tg_str *strip; size_t strip_len;        /* header names to remove */
	const tg_header *insert; size_t insert_len;   /* headers to add when relaying */
	const tg_str *alerts; size_t alerts_len;      /* alert events (JSON) to spool */
	tg_str failover;              /* len 0: none */
	uint64_t failover_after_ms;   /* no response within this: fail over */
	int failover_on_6xx;
} tg_verdict;

/* Compiles (through the .cwasm cache beside it) and instantiates the module.
 * NULL on failure, with a message in err. */
tg_policy *tg_policy_new(const char *wasm_path, tg_store store, char *err,
		size_t err_len);
void tg_policy_free(tg_policy *p);

/* Pushes a configuration (JSON). >0: the generation now in force; 0: refused, the
 * previous one stays ("path: reason" in err); -1: no answer (trap, err says). */
int64_t tg_policy_configure(tg_policy *p, const char *json, size_t len, char *err,
		size_t err_len);

/* Swaps in another .wasm; the last good config is re-pushed. 0 ok, -1 kept the old. */
int tg_policy_load_module(tg_policy *p, const char *wasm_path, char *err,
		size_t err_len);

/* Judges one message. source/local: "ip:port" ("[v6]:port"); local "" when unknown.
 * transport: udp, tcp, tls, ws, wss, sctp. 0: *out filled; -1: no verdict (trap,
 * store failure, bad input: err says): the caller refuses the message (fail closed). */
int tg_policy_judge(tg_policy *p, const char *msg, size_t msg_len, const char *source,
		const char *local, const char *transport, uint64_t now_ms, tg_verdict *out,
		char *err, size_t err_len);

/* Closes expired alert windows: *alerts and *n are the summary alerts (JSON) to spool.
 * 0 ok, -1 err. */
int tg_policy_tick(tg_policy *p, uint64_t now_ms, const tg_str **alerts, size_t *n,
		char *err, size_t err_len);

/* Validates a publication with a private in-memory store: >0 generation, 0 config
 * refused, -1 module unusable (err says which). */
int64_t tg_check(const char *wasm_path, const char *json, size_t len, char *err,
		size_t err_len);

/* The refusal log (docs/policy.md "The refusal log"): one per process. */
typedef struct tg_refusal_log tg_refusal_log;
tg_refusal_log *tg_refusal_log_new(uint32_t per_second);
void tg_refusal_log_free(tg_refusal_log *l);
/* Lines to write for the verdict just judged (0, 1 or 2: a pending summary first).
 * Valid until the next call on l. */
size_t tg_refusal_log_record(tg_refusal_log *l, const char *msg, size_t msg_len,
		const char *source, const char *transport, uint64_t now_ms,
		const tg_verdict *v, const tg_str **lines);
/* For a refusal the module makes itself (no_dialog, loop, policy_error). */
size_t tg_refusal_log_record_host(tg_refusal_log *l, const char *msg, size_t msg_len,
		const char *source, const char *transport, uint64_t now_ms, uint16_t code,
		const char *cause, const tg_str **lines);
/* The summary of a past second, once (0 or 1 line). */
size_t tg_refusal_log_flush(tg_refusal_log *l, uint64_t now_ms, const tg_str **lines);

/* The name of cause `index` (src/verdict.rs Cause::ALL order), static and
 * NUL-terminated; NULL past the last. */
const char *tg_cause_name(uint32_t index);

/* Whether a final response from a registered PBX sends the call to the failover. */
int tg_fails_over(uint16_t code, int retry_after, int on_6xx);

/* POSTs one alert event (JSON) to the relay (`trunkguard alerts serve`,
 * docs/alerts.md) with the bearer token ("" for none). Returns the HTTP status
 * (2xx taken; 401/403 the token is wrong: count and log, do not retry blindly), or
 * -1 when the relay could not be reached (retry later). */
int tg_post_alert(const char *url, const char *token, const char *event, size_t len,
		uint32_t timeout_ms, char *err, size_t err_len);

/* The delivery rule for the relay's answer to tg_post_alert (pass -1 for none):
 * 1 sent (unlink it), 0 retry later (same body), -1 refused (move it aside, log it,
 * count it; never retry blindly, never drop). The core's rule, as in every host. */
int tg_alert_delivery(int status);

#ifdef __cplusplus
}
#endif
#endif
