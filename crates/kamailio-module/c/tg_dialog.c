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
 *                              and the new dialog remembers both parties' hops; -2
 *                              when the INVITE belongs to a dialog that exists
 *                              already or goes back into this edge (the cfg answers
 *                              482), -1 when no dialog could be opened (500)
 *   trunkguard_dialog_route()  on an `in_dialog` allow: rr's loose_route(), then 1
 *                              with $du (and $fs) the *other* party's recorded hop
 *                              when the request is within a live dialog this edge
 *                              opened, its Route headers replaced by the route set
 *                              recorded for that party; -1 otherwise (the cfg
 *                              refuses it 404)
 *   tg_dialog_failed_over()    trunkguard_failover(): the failover is the callee now
 *
 * The dialog is the one the dialog module matched, and it must be matched twice
 * over: by the edge's own Record-Route cookie (the `did` Route parameter that
 * loose_route() took off, naming the dialog's hash entry and id) and by its Call-ID
 * and both tags. Either alone is not enough: the module falls back to Call-ID and
 * tags when the cookie is missing or wrong, and a cookie lifted from one call says
 * nothing about another call's identifiers. Its variables and state are read and
 * written through the module's own pseudo-variables ($dlg_var, $dlg), with the names
 * the KEMI shim uses (host-shims/kamailio/trunkguard_kemi.py).
 *
 * The Route entries after the edge's own are the sender's to write too, and a proxy
 * of the other party's side that routes loosely follows them (RFC 3261 §16.12): a
 * PBX within a live call could steer its in-dialog requests anywhere inside the
 * carrier. So whatever the sender wrote is removed, and the request leaves with the
 * route set the other party's side gave when the dialog was made (RFC 3261 §12.1.2,
 * §12.2.1.1), which no target refresh changes: the Record-Route entries the callee's
 * 2xx added beyond this edge's ($dlg(to_rs), the dialog module's), those the
 * caller's INVITE came with ($dlg(from_rs)), or, while the callee has answered only
 * provisionally, those the 1xx of the early dialog the request names added
 * (tg_early_rs, recorded here from the dialog module's early callback). Written, not
 * compared: a comparison would read the sender's entries one way, and the carrier's
 * parser perhaps another (quotes in rr-params, escapes), with the bytes relayed as
 * they came.
 */
#include <stdio.h>
#include <string.h>

#include "../../core/dprint.h"
#include "../../core/ip_addr.h"
#include "../../core/dset.h"
#include "../../core/lvalue.h"
#include "../../core/forward.h"
#include "../../core/ut.h"
#include "../../core/resolve.h"
#include "../../core/parser/parse_from.h"
#include "../../core/parser/parse_to.h"
#include "../../core/parser/parse_uri.h"
#include "../../core/data_lump.h"
#include "../../core/mem/mem.h"
#include "../../core/parser/parse_rr.h"
#include "../rr/api.h"
#include "../dialog/dlg_load.h"
#include "../tm/tm_load.h"
#include "../tm/h_table.h"

#include "tg_mod.h"

/* $dlg(state): 2 early, 3 confirmed without the ACK yet, 4 confirmed; 1 (no
 * answer yet) and 5 (ended) are not dialogs a request can be within
 * (modules/dialog/dlg_hash.h). */
#define TG_DLG_UNCONFIRMED 1
#define TG_DLG_EARLY 2
#define TG_DLG_CONFIRMED 4
#define TG_DLG_DELETED 5

/* The longest From tag and hop a dialog records: a longer one is refused when the
 * dialog would be opened, never cut (a cut one would match nothing later). */
#define TG_TAG_LEN 128
#define TG_HOP_LEN 512
/* The longest route set written (the early ones of a dialog together), and the most
 * entries of a 1xx's: a longer one is not recorded (the early dialog's requests are
 * refused). The dialog module's own $dlg(to_rs) is bounded by the pv buffer
 * (pv_buffer_size, 8192 by default), and reads as none beyond it. */
#define TG_RS_LEN 8192
#define TG_RS_MAX 32
/* The longest Request-URI of an in-dialog request (a remote target, which carriers'
 * topology hiding may make long); a longer one is refused. */
#define TG_RURI_LEN 4096
/* The most early dialogs (1xx To tags) a dialog keeps a route set for. */
#define TG_EARLY_MAX 4

/* tg_callee_sock after a failover whose branch has no socket of its own: a value,
 * not an unset variable (a deleted dialog variable is never deleted in the dialog
 * database, so the PBX's socket would come back after a restart). */
#define TG_NO_SOCKET "-"

static int tg_dlg_bound = 0;
static cmd_function tg_dlg_manage;
static rr_api_t tg_rrb;
static struct dlg_binds tg_dlgb;
static str tg_early_rs_key = str_init("tg_early_rs");
static str tg_callee_rs_key = str_init("tg_callee_rs");

static pv_spec_t *tg_pv_state;       /* $dlg(state) */
static pv_spec_t *tg_pv_h_entry;     /* $dlg(h_entry), $dlg(h_id): the cookie's two numbers */
static pv_spec_t *tg_pv_h_id;
static pv_spec_t *tg_pv_ftag;        /* the caller's From tag: the direction */
static pv_spec_t *tg_pv_caller;      /* the caller's hop, as a SIP URI */
static pv_spec_t *tg_pv_caller_sock; /* the socket the caller's INVITE came in on */
static pv_spec_t *tg_pv_callee;      /* the callee's hop: $du, else the R-URI */
static pv_spec_t *tg_pv_callee_sock; /* the socket toward the callee ($fs): unset, or "-" */
static pv_spec_t *tg_pv_customer;    /* the trunk group's party: "caller" or "callee" */
static pv_spec_t *tg_pv_bye;         /* set once the dialog's BYE was relayed */
static pv_spec_t *tg_pv_du, *tg_pv_fs;
static pv_spec_t *tg_pv_to_rs;     /* the callee's route set, from its 2xx */
static pv_spec_t *tg_pv_from_rs;   /* the caller's route set, from its INVITE */
static pv_spec_t *tg_pv_early_rs;  /* the callee's early route sets, by 1xx To tag */
static pv_spec_t *tg_pv_callee_rs; /* the callee's route set, from its 2xx ("-": none) */

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
	if(load_dlg_api(&tg_dlgb) < 0) {
		LM_ERR("cannot bind the dialog module's API\n");
		return -1;
	}
	if(!module_loaded("rr") || load_rr_api(&tg_rrb) < 0) {
		LM_ERR("trunkguard_dialog_route() needs the rr module: loadmodule \"rr.so\"\n");
		return -1;
	}
	if((tg_pv_state = tg_pv("$dlg(state)")) == NULL
			|| (tg_pv_h_entry = tg_pv("$dlg(h_entry)")) == NULL
			|| (tg_pv_h_id = tg_pv("$dlg(h_id)")) == NULL
			|| (tg_pv_ftag = tg_pv("$dlg_var(tg_ftag)")) == NULL
			|| (tg_pv_caller = tg_pv("$dlg_var(tg_caller)")) == NULL
			|| (tg_pv_caller_sock = tg_pv("$dlg_var(tg_caller_sock)")) == NULL
			|| (tg_pv_callee = tg_pv("$dlg_var(tg_callee)")) == NULL
			|| (tg_pv_callee_sock = tg_pv("$dlg_var(tg_callee_sock)")) == NULL
			|| (tg_pv_customer = tg_pv("$dlg_var(tg_customer)")) == NULL
			|| (tg_pv_bye = tg_pv("$dlg_var(tg_bye)")) == NULL
			|| (tg_pv_to_rs = tg_pv("$dlg(to_rs)")) == NULL
			|| (tg_pv_from_rs = tg_pv("$dlg(from_rs)")) == NULL
			|| (tg_pv_early_rs = tg_pv("$dlg_var(tg_early_rs)")) == NULL
			|| (tg_pv_callee_rs = tg_pv("$dlg_var(tg_callee_rs)")) == NULL
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

/* The number `sp` holds, or -1 when it holds none (no dialog). */
static long long tg_pv_int(sip_msg_t *msg, pv_spec_t *sp)
{
	pv_value_t v;
	long long n = -1;

	memset(&v, 0, sizeof(v));
	if(pv_get_spec_value(msg, sp, &v) != 0)
		return -1;
	if(!(v.flags & PV_VAL_NULL) && (v.flags & PV_TYPE_INT))
		n = (long long)(unsigned int)v.ri;
	pv_value_destroy(&v);
	return n;
}

/* $dlg(state) of the dialog this message belongs to, or 0 when it belongs to none. */
static int tg_dialog_state(sip_msg_t *msg)
{
	long long state = tg_pv_int(msg, tg_pv_state);
	return state > 0 && state <= TG_DLG_DELETED ? (int)state : 0;
}

/* Whether the `did` Route parameter loose_route() took off names the dialog the
 * dialog module matched: "<h_entry>.<h_id>", each in reversed hex
 * (modules/dialog/dlg_handlers.c, add_dlg_rr_param). */
static int tg_cookie_matches(sip_msg_t *msg)
{
	str name = str_init("did"), val;
	char *dot;
	unsigned int entry, id;
	int elen, ilen;

	if(tg_rrb.get_route_param(msg, &name, &val) != 0 || val.s == NULL)
		return 0;
	dot = memchr(val.s, '.', val.len);
	if(dot == NULL)
		return 0;
	elen = (int)(dot - val.s);
	ilen = val.len - elen - 1;
	if(elen < 1 || elen > 8 || ilen < 1 || ilen > 8 || reverse_hex2int(val.s, elen, &entry) < 0
			|| reverse_hex2int(dot + 1, ilen, &id) < 0)
		return 0;
	return tg_pv_int(msg, tg_pv_h_entry) == (long long)entry
		   && tg_pv_int(msg, tg_pv_h_id) == (long long)id;
}

/* Whether a hop is this edge itself: relayed there, a request would come round again. */
static int tg_is_self(str *hop)
{
	struct sip_uri puri;

	if(parse_uri(hop->s, hop->len, &puri) < 0)
		return 0; /* not a URI: tm refuses to relay to it */
	return check_self(&puri.host, GET_URI_PORT(&puri), puri.proto) == 1;
}

static int tg_is_method(sip_msg_t *msg, int method)
{
	return msg->first_line.type == SIP_REQUEST
		   && msg->first_line.u.request.method_value == method;
}

static int tg_same(const char *a, int alen, str *b)
{
	return alen > 0 && b->len == alen && memcmp(a, b->s, alen) == 0;
}

/* The route set a 1xx gives the caller's requests: the Record-Route entries the
 * callee's side added, above this edge's own, taken in reverse order (RFC 3261
 * §12.1.2), written into out as the dialog module writes its own (name-addrs,
 * comma-separated). Its length, or -1 when the 1xx has no entry of this edge (not
 * a reply to what it record-routed), too many, or too long. */
static int tg_callee_route_set(sip_msg_t *rpl, char *out, int size)
{
	str entries[TG_RS_MAX];
	struct sip_uri puri;
	hdr_field_t *hf;
	rr_t *rt;
	int n = 0, len = 0, i, j, mine = 0;

	for(hf = rpl->record_route; hf != NULL && !mine; hf = next_sibling_hdr(hf)) {
		if(parse_rr(hf) < 0)
			return -1;
		for(rt = (rr_t *)hf->parsed; rt != NULL; rt = rt->next) {
			if(parse_uri(rt->nameaddr.uri.s, rt->nameaddr.uri.len, &puri) < 0)
				return -1;
			if(check_self(&puri.host, GET_URI_PORT(&puri), puri.proto) == 1) {
				mine = 1;
				break;
			}
			if(n == TG_RS_MAX)
				return -1;
			entries[n].s = rt->nameaddr.name.s;
			entries[n].len = rt->len;
			n++;
		}
	}
	if(!mine)
		return -1;
	for(i = n - 1; i >= 0; i--) {
		if(len + entries[i].len + 1 >= size)
			return -1;
		if(len > 0)
			out[len++] = ',';
		/* A fold in an entry (a quoted parameter over two lines) stays on one line:
		 * the early list is one line per early dialog, and the Route written is one
		 * header line. */
		for(j = 0; j < entries[i].len; j++)
			out[len++] = (entries[i].s[j] == '\r' || entries[i].s[j] == '\n') ? ' ' : entries[i].s[j];
	}
	out[len] = '\0';
	return len;
}

/* The early route sets: one line "<To tag> <route set>" per early dialog, the most
 * TG_EARLY_MAX (a callee's side that sends 1xx with ever new tags would otherwise
 * grow the dialog without bound; the oldest goes first). The route set of `tag` in
 * `lines` (its length; 0: none, or not an early dialog of the list: -1). */
static int tg_early_find(char *lines, int len, str *tag, char **rs)
{
	char *p = lines, *end = lines + len, *eol;

	while(p < end) {
		eol = memchr(p, '\n', end - p);
		if(eol == NULL)
			eol = end;
		if(eol - p > tag->len && p[tag->len] == ' ' && memcmp(p, tag->s, tag->len) == 0) {
			*rs = p + tag->len + 1;
			return (int)(eol - *rs);
		}
		p = eol + 1;
	}
	return -1;
}

/* The dialog module's callbacks on the replies of the dialog's INVITE, before they
 * are relayed. The 2xx that confirms the dialog (DLGCB_CONFIRMED_NA): the callee's
 * route set, tg_callee_rs ("-": none), taken from the entries above the edge's own
 * as for a 1xx; the dialog module's $dlg(to_rs) counts entries from the bottom
 * instead (the caller's INVITE's and the edge's), and a callee's side that renders
 * the caller's entries again, split otherwise, would shift them into it. Each 1xx
 * (DLGCB_EARLY): the callee's route set for the caller's requests within that early
 * dialog (PRACK, UPDATE), by the 1xx's To tag. A reply whose route set cannot be
 * recorded leaves the early dialog out (its requests are refused), or the dialog
 * module's $dlg(to_rs) in force. */
static void tg_early_reply(struct dlg_cell *dlg, int type, struct dlg_cb_params *params)
{
	sip_msg_t *rpl = params->rpl;
	char rs[TG_RS_LEN], lines[TG_RS_LEN], *p, *end, *eol, *known;
	str tag, old = STR_NULL, val, others[TG_EARLY_MAX];
	int n, i, len = 0, count = 0;

	/* The reply may reach a process that never bound (with KEMI no fixup binds in
	 * the main process before the fork). */
	if(tg_dialog_bind() < 0)
		return;
	if(rpl == NULL || rpl == FAKED_REPLY || parse_headers(rpl, HDR_EOH_F, 0) < 0 || rpl->to == NULL)
		return;
	tag = get_to(rpl)->tag_value;
	if(tag.len <= 0 || tag.len >= TG_TAG_LEN || memchr(tag.s, ' ', tag.len) != NULL
			|| memchr(tag.s, '\n', tag.len) != NULL)
		return;
	n = tg_callee_route_set(rpl, rs, sizeof(rs));
	if(type == DLGCB_CONFIRMED_NA) {
		val.s = n > 0 ? rs : "-";
		val.len = n > 0 ? n : 1;
		if(n < 0)
			LM_WARN("a 2xx whose route set this edge cannot read: the dialog module's "
					"$dlg(to_rs) goes with the caller's requests\n");
		else if(tg_dlgb.set_dlg_var(dlg, &tg_callee_rs_key, &val) != 0)
			LM_ERR("cannot record a dialog's route set\n");
		return;
	}
	if(n < 0) {
		LM_WARN("a 1xx whose route set this edge cannot record: the caller's requests "
				"within its early dialog will be refused\n");
		return;
	}
	if(tg_dlgb.get_dlg_vardup(dlg, &tg_early_rs_key, &old) == 0 && old.s != NULL) {
		if(tg_early_find(old.s, old.len, &tag, &known) == n && memcmp(known, rs, n) == 0) {
			pkg_free(old.s); /* a retransmission, or another 1xx of the same early dialog */
			return;
		}
		/* The other early dialogs, the newest TG_EARLY_MAX - 1 (oldest first). */
		for(p = old.s, end = old.s + old.len; p < end; p = eol + 1) {
			eol = memchr(p, '\n', end - p);
			if(eol == NULL)
				eol = end;
			if(eol - p > tag.len && p[tag.len] == ' ' && memcmp(p, tag.s, tag.len) == 0)
				continue;
			if(count == TG_EARLY_MAX - 1) {
				memmove(others, others + 1, (TG_EARLY_MAX - 2) * sizeof(str));
				count--;
			}
			others[count].s = p;
			others[count].len = (int)(eol - p);
			count++;
		}
		for(i = 0; i < count && len + others[i].len + 1 < (int)sizeof(lines); i++) {
			memcpy(lines + len, others[i].s, others[i].len);
			len += others[i].len;
			lines[len++] = '\n';
		}
		pkg_free(old.s);
	}
	if(len + tag.len + 1 + n >= (int)sizeof(lines)) {
		LM_WARN("an early route set too long to record: the caller's requests within "
				"its early dialog will be refused\n");
		return;
	}
	memcpy(lines + len, tag.s, tag.len);
	len += tag.len;
	lines[len++] = ' ';
	memcpy(lines + len, rs, n);
	len += n;
	val.s = lines;
	val.len = len;
	if(tg_dlgb.set_dlg_var(dlg, &tg_early_rs_key, &val) != 0)
		LM_ERR("cannot record an early dialog's route set\n");
}

/* The route set recorded for the party the request goes to, into rs: the caller's
 * (its INVITE's Record-Route), or the callee's (its 2xx's, tg_callee_rs; while
 * early, the 1xx's of the early dialog the request's To tag names). Its length (0:
 * none), or -1 when there is none to be within (an early dialog no 1xx recorded). */
static int tg_route_set_of(sip_msg_t *msg, int to_callee, char *rs, int size)
{
	char *found;
	int n;

	if(!to_callee)
		n = tg_pv_copy(msg, tg_pv_from_rs, rs, size);
	else if(tg_dialog_state(msg) != TG_DLG_EARLY) {
		n = tg_pv_copy(msg, tg_pv_callee_rs, rs, size);
		if(n == 1 && rs[0] == '-')
			return 0;
		/* A dialog confirmed before this version recorded tg_callee_rs (one
		 * restored from the dialog database): the dialog module's. */
		if(n < 0)
			n = tg_pv_copy(msg, tg_pv_to_rs, rs, size);
	} else {
		n = tg_pv_copy(msg, tg_pv_early_rs, rs, size);
		n = n > 0 ? tg_early_find(rs, n, &get_to(msg)->tag_value, &found) : -1;
		if(n < 0)
			return -1;
		memmove(rs, found, n);
	}
	return n > 0 ? n : 0;
}

/* The request's Route headers replaced by the route set `rs` (`len` bytes, 0: none):
 * every Route header not already taken off is removed whole (a whole-header removal
 * covers the part of it loose_route() took off, which the core then skips: the
 * first removal of an overlap wins, core/msg_translator.c), and one Route header
 * with the recorded entries goes at the end of the header (a header's place among
 * the others has no meaning, RFC 3261 §7.3.1). */
static int tg_route_set_write(sip_msg_t *msg, const char *rs, int len)
{
	hdr_field_t *hf;
	struct lump *anchor;
	char *line;
	int start, i;

	if(parse_headers(msg, HDR_EOH_F, 0) < 0)
		return -1;
	for(hf = msg->route; hf != NULL; hf = next_sibling_hdr(hf)) {
		start = (int)(hf->name.s - msg->buf);
		if(tg_removed(msg, start, start + hf->len))
			continue;
		if(del_lump(msg, start, hf->len, HDR_ROUTE_T) == NULL)
			return -1;
	}
	if(len <= 0)
		return 0;
	line = pkg_malloc(len + 9);
	if(line == NULL) {
		PKG_MEM_ERROR;
		return -1;
	}
	memcpy(line, "Route: ", 7);
	/* A fold in a recorded entry (a quoted parameter over two lines) stays on one. */
	for(i = 0; i < len; i++)
		line[7 + i] = (rs[i] == '\r' || rs[i] == '\n') ? ' ' : rs[i];
	memcpy(line + 7 + len, "\r\n", 2);
	anchor = anchor_lump(msg, msg->unparsed - msg->buf, 0, 0);
	/* The lump owns line from here. */
	if(anchor == NULL || insert_new_lump_before(anchor, line, len + 9, HDR_ROUTE_T) == NULL) {
		pkg_free(line);
		return -1;
	}
	return 0;
}

int ki_trunkguard_dialog_open(sip_msg_t *msg)
{
	tg_verdict *v = tg_verdict_of(msg);
	char source[80], local[80], hop[TG_HOP_LEN], recorded[TG_TAG_LEN];
	const char *proto;
	struct dlg_cell *dlg;
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
	if(parse_headers(msg, HDR_TO_F, 0) < 0 || msg->to == NULL || parse_from_header(msg) < 0) {
		LM_ERR("cannot parse the From and To headers\n");
		return -1;
	}
	/* An INVITE with a To tag is within a dialog (dlg_manage would look it up, not
	 * open one); the policy never relays it as new. */
	if(get_to(msg)->tag_value.len != 0)
		return -1;
	ftag = get_from(msg)->tag_value;
	/* Where the INVITE goes: its next hop when the cfg set one, else its R-URI. */
	callee = msg->dst_uri.len > 0 ? msg->dst_uri : *GET_RURI(msg);
	if(ftag.len <= 0 || ftag.len >= TG_TAG_LEN || callee.len <= 0 || callee.len >= TG_HOP_LEN) {
		LM_ERR("a From tag or next hop this edge cannot record (empty or too long)\n");
		return -1;
	}
	if(tg_is_self(&callee)) {
		LM_ERR("the next hop %.*s is this edge: refused, not looped\n", callee.len, callee.s);
		return -2;
	}
	if(tg_dlg_manage(msg, NULL, NULL) < 0) {
		LM_ERR("the dialog module opened no dialog for this INVITE\n");
		return -1;
	}
	/* A new dialog starts unconfirmed, with no variables. A dialog in another state,
	 * or one that has them, exists already: dlg_manage() takes an INVITE with its
	 * Call-ID and From tag for a spiral and hands that dialog back. Whether a real
	 * spiral or someone else's ringing call reused, its parties stay as recorded
	 * (written over, the other party's requests would go to the newcomer). */
	if(tg_dialog_state(msg) != TG_DLG_UNCONFIRMED
			|| tg_pv_copy(msg, tg_pv_ftag, recorded, sizeof(recorded)) >= 0) {
		LM_ERR("INVITE with the Call-ID and From tag of a dialog this edge has already: "
			   "refused\n");
		update_stat(tg_st_dialog_reused, 1);
		return -2;
	}
	proto = tg_transport(msg->rcv.proto);
	tg_addr(source, sizeof(source), &msg->rcv.src_ip, msg->rcv.src_port);
	tg_addr(local, sizeof(local), &msg->rcv.dst_ip, msg->rcv.dst_port);
	if(tg_pv_set(msg, tg_pv_ftag, ftag.s, ftag.len) < 0)
		goto error;
	n = snprintf(hop, sizeof(hop), "sip:%s;transport=%s", source, proto);
	if(n <= 0 || n >= (int)sizeof(hop) || tg_pv_set(msg, tg_pv_caller, hop, n) < 0)
		goto error;
	/* The listener the INVITE came in on, as $fs names it (the KEMI shim's $Ras): a
	 * TCP connection this edge opened has a port of its own, which is no listener. */
	if(msg->rcv.bind_address != NULL && msg->rcv.bind_address->sock_str.len > 0)
		n = snprintf(hop, sizeof(hop), "%.*s", msg->rcv.bind_address->sock_str.len,
				msg->rcv.bind_address->sock_str.s);
	else
		n = snprintf(hop, sizeof(hop), "%s:%s", proto, local);
	if(n <= 0 || n >= (int)sizeof(hop) || tg_pv_set(msg, tg_pv_caller_sock, hop, n) < 0)
		goto error;
	if(tg_pv_set(msg, tg_pv_callee, callee.s, callee.len) < 0)
		goto error;
	/* The trunk group's side: the PBX that called (an allowed trunk's call), or the
	 * PBX or failover the core's call goes to (a route). */
	if(v->action == TG_ROUTE ? tg_pv_set(msg, tg_pv_customer, "callee", 6) < 0
							 : tg_pv_set(msg, tg_pv_customer, "caller", 6) < 0)
		goto error;
	if(msg->force_send_socket != NULL
			&& tg_pv_set(msg, tg_pv_callee_sock, msg->force_send_socket->sock_str.s,
					   msg->force_send_socket->sock_str.len)
					   < 0)
		goto error;
	/* The callee's route sets, from each of its 1xx and its 2xx (tg_early_reply). */
	dlg = tg_dlgb.get_dlg(msg);
	if(dlg == NULL)
		goto error;
	n = tg_dlgb.register_dlgcb(dlg, DLGCB_EARLY | DLGCB_CONFIRMED_NA, tg_early_reply, NULL, NULL);
	tg_dlgb.release_dlg(dlg);
	if(n != 0)
		goto error;
	return 1;
error:
	LM_ERR("cannot record the dialog's parties\n");
	return -1;
}

/* Whether the dialog is one a request can be within. An ended dialog (BYE, a
 * refused INVITE, a timeout) stays in the dialog module until its last transaction
 * is freed, in state 5; the module moves a BYE's own dialog there before the cfg sees
 * the BYE, so the first BYE is let through and marked (2: the caller marks it once
 * it goes), and nothing after it is. */
static int tg_dialog_lives(sip_msg_t *msg)
{
	char bye[8];
	int state = tg_dialog_state(msg);

	if(state >= TG_DLG_EARLY && state <= TG_DLG_CONFIRMED)
		return 1;
	if(state == TG_DLG_DELETED && tg_is_method(msg, METHOD_BYE)
			&& tg_pv_copy(msg, tg_pv_bye, bye, sizeof(bye)) < 0)
		return 2; /* the first BYE: marked once it goes */
	return 0;
}

/* How many lumps add something to the message (anchors with text before or after). */
static int tg_added(sip_msg_t *msg)
{
	struct lump *l;
	int n = 0;

	for(l = msg->add_rm; l != NULL; l = l->next)
		if(l->op == LUMP_ADD || l->before != NULL || l->after != NULL)
			n++;
	return n;
}

static int tg_no_dialog(sip_msg_t *msg);

/* An in-dialog request this edge will not route as written (strict routing; an early
 * dialog no 1xx gave): refused 404, in the refusal log. */
static int tg_route_set_refused(sip_msg_t *msg)
{
	tg_log_host_refusal(msg, 404, "route_set");
	return tg_no_dialog(msg);
}

static int tg_no_dialog(sip_msg_t *msg)
{
	if(!tg_is_method(msg, METHOD_ACK))
		update_stat(tg_st_in_dialog_refused, 1);
	return -1;
}

/* Whether the source address is the host of the recorded hop (a SIP URI): an
 * address as written, or a name as Kamailio's resolver (its DNS cache) gives it. */
static int tg_hop_is_source(sip_msg_t *msg, const char *hop, int len)
{
	struct sip_uri uri;
	ip_addr_t ip;
	struct hostent *he;
	char name[TG_HOP_LEN];
	int i;

	if(parse_uri((char *)hop, len, &uri) < 0 || uri.host.len <= 0 || uri.host.len >= (int)sizeof(name))
		return 0;
	if(str2ipxbuf(&uri.host, &ip) == 0)
		return ip_addr_cmp(&ip, &msg->rcv.src_ip);
	memcpy(name, uri.host.s, uri.host.len);
	name[uri.host.len] = '\0';
	he = resolvehost(name);
	for(i = 0; he != NULL && he->h_addr_list[i] != NULL; i++) {
		hostent2ip_addr(&ip, he, i);
		if(ip_addr_cmp(&ip, &msg->rcv.src_ip))
			return 1;
	}
	return 0;
}

/* Whether a listener's "proto:address:port" is the recorded one; with_port 0: the
 * same but for the port. */
static int tg_same_listener(str *a, const char *b, int blen, int with_port)
{
	int alen = a->len;

	if(!with_port) {
		while(alen > 0 && a->s[alen - 1] != ':')
			alen--;
		while(blen > 0 && b[blen - 1] != ':')
			blen--;
	}
	return alen > 0 && alen == blen && strncasecmp(a->s, b, alen) == 0;
}

/* Whether the request comes from the party its tags name, where that party is. The
 * tags and the cookie are in every message of the dialog: whoever saw one (on the
 * path, in a trace) or was once a party (the PBX a call failed over from, within
 * its early dialog) could write them. So the request must arrive on the socket that
 * faces its sender's side, and the trunk group's party (a PBX, a peer trunk, a
 * failover) must send from its recorded address, as must everyone when one socket
 * faces both sides or the side's socket is not known. The carrier is held to its
 * side only: its in-dialog requests may come from any of its proxies. A dialog
 * recorded before the trunk group's party was (tg_customer) keeps the side check
 * alone. docs/kamailio.md, "In-dialog requests"; the Node edge does the same. */
static int tg_party_sent(sip_msg_t *msg, int from_caller)
{
	char sock[TG_HOP_LEN], other[TG_HOP_LEN], hop[TG_HOP_LEN], who[8];
	struct socket_info *arrival = msg->rcv.bind_address;
	int slen, olen, hlen, clen, known, held;

	slen = tg_pv_copy(msg, from_caller ? tg_pv_caller_sock : tg_pv_callee_sock, sock, sizeof(sock));
	olen = tg_pv_copy(msg, from_caller ? tg_pv_callee_sock : tg_pv_caller_sock, other, sizeof(other));
	known = slen > 0 && strcmp(sock, TG_NO_SOCKET) != 0;
	/* The listener it arrived on, as $fs names one. A TCP or TLS connection this
	 * edge opened is credited to the first listener of its address whatever its port
	 * (core/tcp_main.c, find_si): over those, the address and transport alone. */
	if(known && (arrival == NULL || !tg_same_listener(&arrival->sock_str, sock, slen,
										   arrival->proto == PROTO_UDP)))
		return 0;
	clen = tg_pv_copy(msg, tg_pv_customer, who, sizeof(who));
	if(clen < 0)
		return 1;
	held = strcmp(who, from_caller ? "caller" : "callee") == 0 || !known
		   || (olen > 0 && strcasecmp(sock, other) == 0);
	if(!held)
		return 1;
	hlen = tg_pv_copy(msg, from_caller ? tg_pv_caller : tg_pv_callee, hop, sizeof(hop));
	return hlen > 0 && tg_hop_is_source(msg, hop, hlen);
}

/* Who sent an in-dialog request, by its tags: 1 the caller (its From tag), 0 the
 * callee (the caller's tag in To), -1 neither (no party's, or no dialog). */
static int tg_sender_is_caller(sip_msg_t *msg)
{
	char ftag[TG_TAG_LEN];
	int flen = tg_pv_copy(msg, tg_pv_ftag, ftag, sizeof(ftag));

	if(tg_same(ftag, flen, &get_from(msg)->tag_value))
		return 1;
	if(tg_same(ftag, flen, &get_to(msg)->tag_value))
		return 0;
	return -1;
}

/* A request not from the party its tags name, or not where that party is. */
static int tg_party_refused(sip_msg_t *msg)
{
	tg_log_host_refusal(msg, 404, "dialog_party");
	return tg_no_dialog(msg);
}

int ki_trunkguard_dialog_route(sip_msg_t *msg)
{
	tg_verdict *v = tg_verdict_of(msg);
	char hop[TG_HOP_LEN], sock[TG_HOP_LEN], rs[TG_RS_LEN], uri[TG_RURI_LEN];
	pv_spec_t *hop_pv, *sock_pv;
	str ruri;
	int hlen, slen, rslen, lives, adds, from_caller, checked;

	if(v == NULL || v->action != TG_ALLOW || !tg_str_is(&v->cause, "in_dialog"))
		return tg_no_dialog(msg);
	if(tg_dialog_bind() < 0)
		return tg_no_dialog(msg);
	/* Strict routing (RFC 3261 §16.4), which every proxy since RFC 3261 leaves for
	 * loose routing, is not followed: loose_route() would take the Request-URI from
	 * the sender's Route (the edge itself as Request-URI), or an entry after the
	 * edge's without `lr` for the Request-URI and add the sender's Request-URI as a
	 * Route of its own, which the route set written below would not replace. Seen
	 * as the Request-URI it changes or the lump it adds. */
	ruri = *GET_RURI(msg);
	if(ruri.len <= 0 || ruri.len >= (int)sizeof(uri) || parse_sip_msg_uri(msg) < 0
			|| check_self(&msg->parsed_uri.host, GET_URI_PORT(&msg->parsed_uri),
					   msg->parsed_uri.proto)
					   == 1)
		return tg_route_set_refused(msg);
	memcpy(uri, ruri.s, ruri.len);
	adds = tg_added(msg);
	if(parse_headers(msg, HDR_TO_F, 0) < 0 || msg->to == NULL || parse_from_header(msg) < 0)
		return tg_no_dialog(msg);
	/* Both tags alike would read as either direction. */
	if(tg_same(get_from(msg)->tag_value.s, get_from(msg)->tag_value.len, &get_to(msg)->tag_value))
		return tg_no_dialog(msg);
	/* Who sent it is settled before loose_route(), which has the dialog module act on
	 * the request (a BYE ends the dialog there, relayed or refused after): in the
	 * dialog its Call-ID and tags name, which $dlg_var reads by them until then. */
	checked = tg_sender_is_caller(msg);
	if(checked >= 0 && !tg_party_sent(msg, checked))
		return tg_party_refused(msg);
	/* This edge's Route entries off, and the dialog module (called back from rr)
	 * matches the request to its dialog by the cookie and moves the dialog's state
	 * (a BYE ends it). Without a Route there is no dialog of this edge. */
	if(tg_rrb.loose_route(msg) <= 0 || !tg_cookie_matches(msg))
		return tg_no_dialog(msg);
	if(GET_RURI(msg)->len != ruri.len || memcmp(GET_RURI(msg)->s, uri, ruri.len) != 0
			|| tg_added(msg) != adds)
		return tg_route_set_refused(msg);
	lives = tg_dialog_lives(msg);
	if(!lives)
		return tg_no_dialog(msg);
	/* The direction again, in the dialog the cookie named: to the other party. Its
	 * sender is checked here only when the look by the tags found no dialog above
	 * (the same tags give the same dialog: the party, a resolved name, once). */
	from_caller = tg_sender_is_caller(msg);
	if(from_caller < 0)
		return tg_no_dialog(msg);
	if(from_caller != checked && !tg_party_sent(msg, from_caller))
		return tg_party_refused(msg);
	hop_pv = from_caller ? tg_pv_callee : tg_pv_caller;
	sock_pv = from_caller ? tg_pv_callee_sock : tg_pv_caller_sock;
	hlen = tg_pv_copy(msg, hop_pv, hop, sizeof(hop));
	if(hlen <= 0)
		return tg_no_dialog(msg);
	rslen = tg_route_set_of(msg, hop_pv == tg_pv_callee, rs, sizeof(rs));
	if(rslen < 0)
		return tg_route_set_refused(msg);
	if(tg_route_set_write(msg, rs, rslen) < 0) {
		LM_ERR("cannot give an in-dialog request its route set\n");
		return tg_no_dialog(msg);
	}
	slen = tg_pv_copy(msg, sock_pv, sock, sizeof(sock));
	if(tg_pv_set(msg, tg_pv_du, hop, hlen) < 0) {
		LM_ERR("cannot set the in-dialog hop %s\n", hop);
		return tg_no_dialog(msg);
	}
	/* The socket of the party's side, so that the Record-Route it was told stays
	 * true; Kamailio's choice when it is gone (a listener removed since). */
	if(slen > 0 && strcmp(sock, TG_NO_SOCKET) != 0 && tg_pv_set(msg, tg_pv_fs, sock, slen) < 0)
		LM_WARN("cannot send from %s; Kamailio chooses the socket\n", sock);
	/* The ended dialog's first BYE, marked only once it goes: one refused above
	 * leaves the way for the party's own. */
	if(lives == 2 && tg_pv_set(msg, tg_pv_bye, "1", 1) != 0)
		return tg_no_dialog(msg);
	return 1;
}

/* The failover's branch, sent (tm's TMCB_REQUEST_OUT, in the failure route's
 * t_relay()): the listener it left from is the callee's from now on, as
 * trunkguard_dialog_open() records the INVITE's. The cfg chooses it after
 * trunkguard_failover() (route(PUBLIC_SIDE) sets $fs in the failover's own transport
 * and address family), and Kamailio takes another when the forced one does not fit
 * the destination (forward.c, get_send_socket2): so the listener tm used, not the one
 * asked for. The PBX's, which the failure route starts with, is another one when the
 * PBX is reached over TCP and the failover over UDP, or over IPv4 and IPv6: the
 * failover's in-dialog requests would arrive elsewhere and be refused, its BYE among
 * them. With no listener forced, none is recorded ("-"), as for the INVITE. The
 * failover's branches only (`param`: the first one's index; a DNS failover adds the
 * next); a CANCEL tm writes (TMCB_LOCAL_F) leaves from its branch's own. */
static void tg_failover_sent(struct cell *t, int type, struct tmcb_params *ps)
{
	str sock = str_init(TG_NO_SOCKET);

	if((ps->flags & TMCB_LOCAL_F) || ps->req == NULL || ps->param == NULL
			|| ps->branch < (unsigned short)(uintptr_t)*ps->param)
		return;
	if(!module_loaded("dialog") || tg_dialog_bind() < 0)
		return;
	if(ps->req->force_send_socket != NULL && ps->dst != NULL
			&& ps->dst->send_sock != NULL && ps->dst->send_sock->sock_str.len > 0)
		sock = ps->dst->send_sock->sock_str;
	if(tg_pv_set(ps->req, tg_pv_callee_sock, sock.s, sock.len) < 0)
		LM_ERR("cannot record the failover's listener: its in-dialog requests are held "
			   "to its address alone\n");
}

/* The failover answers for the PBX from here on: its in-dialog requests go to it.
 * The PBX's early dialogs end here, their route sets with them ("-": a line no To
 * tag names; a deleted dialog variable is not deleted in the dialog database):
 * otherwise the PBX that failed, naming its own early dialog's To tag, would reach
 * the failover with the Route entries its 1xx recorded. The dialog module sets this
 * failure route's dialog (tm's failure callback); a call opened without
 * trunkguard_dialog_open() has no tg_ftag and is left alone. The failover's listener
 * is recorded once its branch goes (tg_failover_sent); until then none ("-"). */
void tg_dialog_failed_over(sip_msg_t *msg, str *uri, struct cell *t)
{
	char recorded[TG_TAG_LEN];
	str sock = str_init(TG_NO_SOCKET);
	struct tm_binds *tmb;

	/* With KEMI no fixup binds: whichever process runs the failure route (tm's
	 * timer for a silent PBX) binds here. */
	if(!module_loaded("dialog") || tg_dialog_bind() < 0)
		return;
	if(tg_pv_copy(msg, tg_pv_ftag, recorded, sizeof(recorded)) < 0)
		return;
	/* The early dialogs end first, whatever fails after. */
	if(tg_pv_set(msg, tg_pv_early_rs, "-", 1) < 0)
		LM_ERR("cannot end the PBX's early dialogs after a failover\n");
	if(uri->len >= TG_HOP_LEN || tg_pv_set(msg, tg_pv_callee, uri->s, uri->len) < 0
			|| tg_pv_set(msg, tg_pv_callee_sock, sock.s, sock.len) < 0) {
		LM_ERR("cannot record the failover %.*s as the dialog's callee\n", uri->len, uri->s);
		return;
	}
	tmb = tg_reply_tm();
	if(tmb == NULL
			|| tmb->register_tmcb(msg, t, TMCB_REQUEST_OUT, tg_failover_sent,
					   (void *)(uintptr_t)t->nr_of_outgoings, NULL)
					   <= 0)
		LM_ERR("cannot watch the failover's branch: its listener is not recorded, its "
			   "in-dialog requests are held to its address alone\n");
}
