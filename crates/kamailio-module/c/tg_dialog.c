/*
 * trunkguard.so: in-dialog requests bound to the dialogs this edge created.
 *
 * A request with a To tag passes the policy unauthenticated (`allow`, cause
 * `in_dialog`: docs/abi.md), so where it goes cannot be left to its Route header or
 * Request-URI, which whoever sends it writes: a Record-Route lifted from one call
 * would relay anything, to anywhere, through the edge. Instead:
 *
 *   trunkguard_dialog_open()   on a dialog-creating INVITE the verdict relays (an
 *                              `allow` for a trunk, a `route`), once $du/$ru/$fs
 *                              say where it goes: the dialog module's dlg_manage(),
 *                              and the dialog remembers both parties' hops
 *   trunkguard_dialog_route()  on an `in_dialog` allow: rr's loose_route(), then 1
 *                              with $du (and $fs) the *other* party's recorded hop
 *                              when the request is within a live dialog this edge
 *                              opened, -1 otherwise (the cfg refuses it 404)
 *   tg_dialog_failed_over()    trunkguard_failover(): the failover is the callee now
 *
 * The dialog is found by the dialog module (Call-ID, both tags and, through
 * loose_route(), the edge's own Record-Route cookie); its variables and state are
 * read and written through the module's own pseudo-variables ($dlg_var, $dlg), with
 * the names the KEMI shim uses (host-shims/kamailio/trunkguard_kemi.py).
 */
#include <stdio.h>
#include <string.h>

#include "../../core/dprint.h"
#include "../../core/ip_addr.h"
#include "../../core/dset.h"
#include "../../core/lvalue.h"
#include "../../core/parser/parse_from.h"
#include "../../core/parser/parse_to.h"
#include "../rr/api.h"

#include "tg_mod.h"

/* $dlg(state): 2 early, 3 confirmed without the ACK yet, 4 confirmed; 1 (no
 * answer yet) and 5 (ended) are not dialogs a request can be within
 * (modules/dialog/dlg_hash.h). */
#define TG_DLG_EARLY 2
#define TG_DLG_CONFIRMED 4
#define TG_DLG_DELETED 5

#define TG_HOP_LEN 512

static int tg_dlg_bound = 0;
static cmd_function tg_dlg_manage;
static rr_api_t tg_rrb;

static pv_spec_t *tg_pv_state;       /* $dlg(state) */
static pv_spec_t *tg_pv_ftag;        /* the caller's From tag: the direction */
static pv_spec_t *tg_pv_caller;      /* the caller's hop, as a SIP URI */
static pv_spec_t *tg_pv_caller_sock; /* the socket the caller's INVITE came in on */
static pv_spec_t *tg_pv_callee;      /* the callee's hop: $du, else the R-URI */
static pv_spec_t *tg_pv_callee_sock; /* the socket toward the callee ($fs), or "" */
static pv_spec_t *tg_pv_bye;         /* set once the dialog's BYE was relayed */
static pv_spec_t *tg_pv_du, *tg_pv_fs;

static pv_spec_t *tg_pv(const char *name)
{
	str s;
	pv_spec_t *sp;

	s.s = (char *)name;
	s.len = (int)strlen(name);
	sp = pv_cache_get(&s);
	if(sp == NULL)
		LM_ERR("cannot use %s\n", name);
	return sp;
}

/* The dialog module's dlg_manage() and pseudo-variables, rr's loose_route(); both
 * modules must be loaded (their pseudo-variables and exports exist from their
 * loadmodule on). */
int tg_dialog_bind(void)
{
	ksr_cmd_export_t *cmd;

	if(tg_dlg_bound)
		return 0;
	if(!module_loaded("dialog")) {
		LM_ERR("trunkguard_dialog_open() and trunkguard_dialog_route() need the "
			   "dialog module: loadmodule \"dialog.so\"\n");
		return -1;
	}
	cmd = find_export_record("dlg_manage", 0, 0);
	if(cmd == NULL || cmd->function == NULL) {
		LM_ERR("the dialog module exports no dlg_manage()\n");
		return -1;
	}
	tg_dlg_manage = cmd->function;
	if(!module_loaded("rr") || load_rr_api(&tg_rrb) < 0) {
		LM_ERR("trunkguard_dialog_route() needs the rr module: loadmodule \"rr.so\"\n");
		return -1;
	}
	if((tg_pv_state = tg_pv("$dlg(state)")) == NULL
			|| (tg_pv_ftag = tg_pv("$dlg_var(tg_ftag)")) == NULL
			|| (tg_pv_caller = tg_pv("$dlg_var(tg_caller)")) == NULL
			|| (tg_pv_caller_sock = tg_pv("$dlg_var(tg_caller_sock)")) == NULL
			|| (tg_pv_callee = tg_pv("$dlg_var(tg_callee)")) == NULL
			|| (tg_pv_callee_sock = tg_pv("$dlg_var(tg_callee_sock)")) == NULL
			|| (tg_pv_bye = tg_pv("$dlg_var(tg_bye)")) == NULL
			|| (tg_pv_du = tg_pv("$du")) == NULL || (tg_pv_fs = tg_pv("$fs")) == NULL)
		return -1;
	tg_dlg_bound = 1;
	return 0;
}

/* The functions' fixup (called for a function without parameters too): a cfg that
 * uses them without the dialog module does not start. */
int tg_dialog_fixup(void **param, int param_no)
{
	return tg_dialog_bind();
}

/* The string value of `sp` copied into out (NUL-terminated): its length, or -1
 * when it is unset, empty or too long. The copy is needed: the dialog module hands
 * its variables out in the one pv buffer the next read overwrites. */
static int tg_pv_copy(sip_msg_t *msg, pv_spec_t *sp, char *out, int len)
{
	pv_value_t v;
	int n = -1;

	memset(&v, 0, sizeof(v));
	if(pv_get_spec_value(msg, sp, &v) != 0)
		return -1;
	if(!(v.flags & PV_VAL_NULL) && (v.flags & PV_VAL_STR) && v.rs.len > 0
			&& v.rs.len < len) {
		memcpy(out, v.rs.s, v.rs.len);
		out[v.rs.len] = '\0';
		n = v.rs.len;
	}
	pv_value_destroy(&v);
	return n;
}

/* `sp` set to s (len bytes); len 0 unsets it. */
static int tg_pv_set(sip_msg_t *msg, pv_spec_t *sp, const char *s, int len)
{
	pv_value_t v;

	memset(&v, 0, sizeof(v));
	v.flags = len > 0 ? PV_VAL_STR : PV_VAL_NULL;
	v.rs.s = (char *)s;
	v.rs.len = len;
	return pv_set_spec_value(msg, sp, EQ_T, &v);
}

/* $dlg(state) of the dialog this message belongs to, or 0 when it belongs to none. */
static int tg_dialog_state(sip_msg_t *msg)
{
	pv_value_t v;
	int state = 0;

	memset(&v, 0, sizeof(v));
	if(pv_get_spec_value(msg, tg_pv_state, &v) != 0)
		return 0;
	if(!(v.flags & PV_VAL_NULL) && (v.flags & PV_TYPE_INT))
		state = (int)v.ri;
	pv_value_destroy(&v);
	return state;
}

static int tg_is_method(sip_msg_t *msg, int method)
{
	return msg->first_line.type == SIP_REQUEST
		   && msg->first_line.u.request.method_value == method;
}

int ki_trunkguard_dialog_open(sip_msg_t *msg)
{
	tg_verdict *v = tg_verdict_of(msg);
	char source[80], local[80], hop[TG_HOP_LEN];
	const char *proto;
	str ftag, callee;
	int n;

	if(v == NULL || msg->first_line.type != SIP_REQUEST)
		return -1;
	/* Only what the verdict relays as a new call or request. */
	if(!(v->action == TG_ROUTE || (v->action == TG_ALLOW && tg_str_is(&v->cause, "trunk"))))
		return -1;
	if(!tg_is_method(msg, METHOD_INVITE))
		return 1; /* a MESSAGE, an OPTIONS to the carrier: no dialog to open */
	if(tg_dialog_bind() < 0)
		return -1;
	if(parse_from_header(msg) < 0) {
		LM_ERR("cannot parse the From header\n");
		return -1;
	}
	if(tg_dlg_manage(msg, NULL, NULL) < 0 || tg_dialog_state(msg) == 0) {
		LM_ERR("the dialog module opened no dialog for this INVITE\n");
		return -1;
	}
	ftag = get_from(msg)->tag_value;
	proto = tg_transport(msg->rcv.proto);
	tg_addr(source, sizeof(source), &msg->rcv.src_ip, msg->rcv.src_port);
	tg_addr(local, sizeof(local), &msg->rcv.dst_ip, msg->rcv.dst_port);
	if(tg_pv_set(msg, tg_pv_ftag, ftag.s, ftag.len) < 0)
		goto error;
	n = snprintf(hop, sizeof(hop), "sip:%s;transport=%s", source, proto);
	if(n <= 0 || n >= (int)sizeof(hop) || tg_pv_set(msg, tg_pv_caller, hop, n) < 0)
		goto error;
	n = snprintf(hop, sizeof(hop), "%s:%s", proto, local);
	if(n <= 0 || n >= (int)sizeof(hop) || tg_pv_set(msg, tg_pv_caller_sock, hop, n) < 0)
		goto error;
	/* Where the INVITE goes: its next hop when the cfg set one, else its R-URI. */
	callee = msg->dst_uri.len > 0 ? msg->dst_uri : *GET_RURI(msg);
	if(callee.len <= 0 || tg_pv_set(msg, tg_pv_callee, callee.s, callee.len) < 0)
		goto error;
	if(msg->force_send_socket != NULL
			&& tg_pv_set(msg, tg_pv_callee_sock, msg->force_send_socket->sock_str.s,
					   msg->force_send_socket->sock_str.len)
					   < 0)
		goto error;
	return 1;
error:
	LM_ERR("cannot record the dialog's parties\n");
	return -1;
}

/* Whether the dialog is one a request can be within. An ended dialog (BYE, a
 * refused INVITE, a timeout) stays in the dialog module until its last transaction
 * is freed, in state 5; the module moves a BYE's own dialog there before the cfg sees
 * the BYE, so the first BYE is let through and marked, and nothing after it is. */
static int tg_dialog_lives(sip_msg_t *msg)
{
	char bye[8];
	int state = tg_dialog_state(msg);

	if(state >= TG_DLG_EARLY && state <= TG_DLG_CONFIRMED)
		return 1;
	if(state == TG_DLG_DELETED && tg_is_method(msg, METHOD_BYE)
			&& tg_pv_copy(msg, tg_pv_bye, bye, sizeof(bye)) < 0)
		return tg_pv_set(msg, tg_pv_bye, "1", 1) == 0;
	return 0;
}

static int tg_same(const char *a, int alen, str *b)
{
	return alen > 0 && b->len == alen && memcmp(a, b->s, alen) == 0;
}

static int tg_no_dialog(sip_msg_t *msg)
{
	if(!tg_is_method(msg, METHOD_ACK))
		update_stat(tg_st_in_dialog_refused, 1);
	return -1;
}

int ki_trunkguard_dialog_route(sip_msg_t *msg)
{
	tg_verdict *v = tg_verdict_of(msg);
	char ftag[128], hop[TG_HOP_LEN], sock[TG_HOP_LEN];
	pv_spec_t *hop_pv, *sock_pv;
	int flen, hlen, slen;

	if(v == NULL || v->action != TG_ALLOW || !tg_str_is(&v->cause, "in_dialog"))
		return tg_no_dialog(msg);
	if(tg_dialog_bind() < 0)
		return tg_no_dialog(msg);
	/* This edge's Route entries off, and the dialog module (called back from rr)
	 * matches the request to its dialog by the cookie and moves the dialog's state
	 * (a BYE ends it). Without a Route there is no dialog of this edge. */
	if(tg_rrb.loose_route(msg) <= 0 || !tg_dialog_lives(msg))
		return tg_no_dialog(msg);
	if(parse_headers(msg, HDR_TO_F, 0) < 0 || msg->to == NULL || parse_from_header(msg) < 0)
		return tg_no_dialog(msg);
	/* The direction: from the caller (its From tag) or from the callee (the caller's
	 * tag in To). A request whose tags are neither is no party's. */
	flen = tg_pv_copy(msg, tg_pv_ftag, ftag, sizeof(ftag));
	if(tg_same(ftag, flen, &get_from(msg)->tag_value)) {
		hop_pv = tg_pv_callee;
		sock_pv = tg_pv_callee_sock;
	} else if(tg_same(ftag, flen, &get_to(msg)->tag_value)) {
		hop_pv = tg_pv_caller;
		sock_pv = tg_pv_caller_sock;
	} else {
		return tg_no_dialog(msg);
	}
	hlen = tg_pv_copy(msg, hop_pv, hop, sizeof(hop));
	if(hlen <= 0)
		return tg_no_dialog(msg);
	slen = tg_pv_copy(msg, sock_pv, sock, sizeof(sock));
	if(tg_pv_set(msg, tg_pv_du, hop, hlen) < 0) {
		LM_ERR("cannot set the in-dialog hop %s\n", hop);
		return tg_no_dialog(msg);
	}
	/* The socket of the party's side, so that the Record-Route it was told stays
	 * true; Kamailio's choice when it is gone (a listener removed since). */
	if(slen > 0 && tg_pv_set(msg, tg_pv_fs, sock, slen) < 0)
		LM_WARN("cannot send from %s; Kamailio chooses the socket\n", sock);
	return 1;
}

/* The failover answers for the PBX from here on: its in-dialog requests go to it. */
void tg_dialog_failed_over(sip_msg_t *msg, str *uri)
{
	if(!tg_dlg_bound)
		return; /* no dialog functions in this cfg */
	if(tg_pv_set(msg, tg_pv_callee, uri->s, uri->len) < 0
			|| tg_pv_set(msg, tg_pv_callee_sock, "", 0) < 0)
		LM_ERR("cannot record the failover %.*s as the dialog's callee\n", uri->len, uri->s);
}
