/*
 * trunkguard.so: the route set a response gives the caller.
 *
 * The Record-Route of an answer that makes a dialog tells the caller its route set
 * (RFC 3261 §12.1.2): taken in reverse, the entries below this edge's own are the
 * hops of the caller's side, which its INVITE came with, and this edge's bring its
 * in-dialog requests back here. The far end writes the answer: a PBX answering the
 * core's call with an entry of its choosing below the edge's would have the
 * carrier's in-dialog requests (ACK, BYE, re-INVITE) go first to a host it chose
 * inside the carrier; one without the edge's entries, straight to its Contact, past
 * the edge; one with an `maddr` on its copy of them, wherever that names. So the
 * caller is given the Record-Route of the INVITE exactly as this edge sent it on
 * that branch (tm's copy of what it sent: the edge's own entries and those the
 * INVITE came with), nothing of the far end's: its entries above the edge's go too
 * (the edge keeps them for that side's requests: tg_dialog.c), as they could open a
 * quote that one parser reads and another does not (Kamailio's rr-params take ' for
 * one) over the entries after them. docs/kamailio.md, "Responses".
 *
 *   trunkguard_reply_route_set()  in reply_route, after t_check_trans(): 1 (the
 *                                 answer as it came, or with that Record-Route),
 *                                 -1 (the cfg drops it: what was sent is not known)
 */
#include <string.h>

#include "../../core/dprint.h"
#include "../../core/data_lump.h"
#include "../../core/mem/mem.h"
#include "../../core/parser/parse_rr.h"
#include "../../core/parser/parse_to.h"
#include "../tm/tm_load.h"
#include "../tm/h_table.h"

#include "tg_mod.h"

/* The most Record-Route entries read from an answer or an INVITE as sent: an INVITE
 * that had more gets its answers dropped; an answer with more is written over. */
#define TG_RR_MAX 32

static tm_api_t tg_rr_tmb;
static int tg_rr_tm = 0; /* 1 bound, -1 tm not loaded */

typedef struct tg_rr_list
{
	str entry[TG_RR_MAX];
	int n;
} tg_rr_list;

static int tg_rr_bind(void)
{
	if(tg_rr_tm == 0)
		tg_rr_tm = find_export("load_tm", NO_SCRIPT, 0) != NULL && tm_load_api(&tg_rr_tmb) == 0
						   ? 1
						   : -1;
	return tg_rr_tm;
}

struct tm_binds *tg_reply_tm(void)
{
	return tg_rr_bind() > 0 ? &tg_rr_tmb : NULL;
}

/* The entries of one Record-Route header body appended to out: -1 when it does not
 * parse or out is full. The entries point into body. */
static int tg_rr_collect(str *body, tg_rr_list *out)
{
	rr_t *head = NULL, *r;
	int ret = 0;

	if(parse_rr_body(body->s, body->len, &head) < 0)
		return -1;
	for(r = head; r != NULL; r = r->next) {
		if(out->n >= TG_RR_MAX) {
			ret = -1;
			break;
		}
		out->entry[out->n].s = r->nameaddr.name.s;
		out->entry[out->n].len = r->len;
		out->n++;
	}
	free_rr(&head);
	return ret;
}

static int tg_rr_same(str *a, str *b)
{
	return a->len == b->len && memcmp(a->s, b->s, a->len) == 0;
}

/* "Record-Route: " the entries, ", " between them, CRLF; a line break inside one
 * (a quoted parameter over two lines) becomes SP. pkg memory, or NULL. */
static char *tg_rr_line(tg_rr_list *l, int *len)
{
	int i, k, n = 16;
	char *line, *p;

	for(i = 0; i < l->n; i++)
		n += l->entry[i].len + 2;
	line = pkg_malloc(n);
	if(line == NULL) {
		PKG_MEM_ERROR;
		return NULL;
	}
	p = line;
	memcpy(p, "Record-Route: ", 14);
	p += 14;
	for(i = 0; i < l->n; i++) {
		if(i > 0) {
			memcpy(p, ", ", 2);
			p += 2;
		}
		for(k = 0; k < l->entry[i].len; k++)
			*p++ = (l->entry[i].s[k] == '\r' || l->entry[i].s[k] == '\n') ? ' '
																		: l->entry[i].s[k];
	}
	memcpy(p, "\r\n", 2);
	p += 2;
	*len = (int)(p - line);
	return line;
}

/* The Record-Route entries of a request as tm sent it (its buffer, whose header
 * lines the edge has unfolded: trunkguard_apply()), appended to out: -1 when one
 * does not parse or out is full. */
static int tg_rr_sent(char *buf, int len, tg_rr_list *out)
{
	char *p = buf, *end = buf + len, *eol, *q;
	str body;

	/* Past the request line, line by line to the blank line. */
	eol = memchr(p, '\n', end - p);
	if(eol == NULL)
		return -1;
	for(p = eol + 1; p < end; p = eol + 1) {
		eol = memchr(p, '\n', end - p);
		if(eol == NULL || eol - p <= 1)
			break;
		if(eol - p < 13 || strncasecmp(p, "record-route", 12) != 0)
			continue;
		for(q = p + 12; q < eol && (*q == ' ' || *q == '\t'); q++)
			;
		if(q >= eol || *q != ':')
			continue;
		body.s = q + 1;
		body.len = (int)(eol - body.s);
		if(body.len > 0 && body.s[body.len - 1] == '\r')
			body.len--;
		if(tg_rr_collect(&body, out) < 0)
			return -1;
	}
	return 0;
}

static int tg_reply_route_set(sip_msg_t *msg)
{
	struct cell *t;
	hdr_field_t *hf;
	tg_rr_list got, want;
	struct lump *anchor;
	char *line;
	int code, branch, i, len, same, folded = 0;

	if(msg->first_line.type != SIP_REPLY)
		return 1;
	code = (int)msg->first_line.u.reply.statuscode;
	if(code <= 100 || code >= 300)
		return 1;
	if(parse_headers(msg, HDR_EOH_F, 0) < 0 || msg->cseq == NULL || msg->to == NULL) {
		LM_NOTICE("a response whose headers do not parse: not relayed\n");
		return -1;
	}
	/* Only an INVITE's answers make a dialog this edge routes (tg_dialog.c). */
	if(get_cseq(msg)->method_id != METHOD_INVITE)
		return 1;
	if(code < 200 && get_to(msg)->tag_value.len == 0)
		return 1; /* no dialog yet */
	if(tg_rr_bind() < 0)
		return 1;
	t = tg_rr_tmb.t_gett();
	if(t == NULL || t == T_UNDEFINED || t->uas.request == NULL)
		return 1;
	/* A re-INVITE's answer changes no route set (RFC 3261 §12.2.1.2). */
	if(t->uas.request->to == NULL || t->uas.request->to->parsed == NULL
			|| get_to(t->uas.request)->tag_value.len != 0)
		return 1;
	branch = tg_rr_tmb.t_gett_branch();
	memset(&got, 0, sizeof(got));
	memset(&want, 0, sizeof(want));
	if(branch < 0 || branch >= t->nr_of_outgoings || t->uac[branch].request.buffer == NULL
			|| tg_rr_sent(t->uac[branch].request.buffer, t->uac[branch].request.buffer_len,
					   &want)
					   < 0
			|| want.n == 0) {
		LM_NOTICE("a %d whose INVITE's Record-Route as sent is not known: not relayed\n", code);
		return -1;
	}
	/* Every header looked at for a fold, an unreadable one included: each is removed
	 * whole if the Record-Route is written. */
	for(hf = msg->record_route; hf != NULL; hf = next_sibling_hdr(hf)) {
		if(memchr(hf->body.s, '\n', hf->body.len) != NULL)
			folded = 1;
		if(got.n >= 0 && tg_rr_collect(&hf->body, &got) < 0)
			got.n = -1; /* unreadable: written over */
	}
	/* As it was sent: nothing to write (the common case). */
	same = got.n == want.n;
	for(i = 0; same && i < want.n; i++)
		same = tg_rr_same(&got.entry[i], &want.entry[i]);
	if(same)
		return 1;
	/* A folded header's unfolding (trunkguard_unfold) would overlap its removal. */
	if(folded) {
		LM_NOTICE("a %d whose folded Record-Route would need rewriting: not relayed\n", code);
		return -1;
	}
	LM_DBG("a %d whose Record-Route is not the INVITE's as sent: written as sent\n", code);
	line = tg_rr_line(&want, &len);
	if(line == NULL)
		return -1;
	for(hf = msg->record_route; hf != NULL; hf = next_sibling_hdr(hf))
		if(del_lump(msg, (int)(hf->name.s - msg->buf), hf->len, HDR_RECORDROUTE_T) == NULL) {
			pkg_free(line);
			return -1;
		}
	anchor = anchor_lump(msg, (int)(msg->unparsed - msg->buf), 0, 0);
	/* The lump owns line from here. */
	if(anchor == NULL || insert_new_lump_before(anchor, line, len, HDR_RECORDROUTE_T) == NULL) {
		pkg_free(line);
		return -1;
	}
	return 1;
}

int ki_trunkguard_reply_route_set(sip_msg_t *msg)
{
	return tg_answer_refused(msg, tg_reply_route_set(msg));
}
