/*
 * trunkguard.so: the cfg and KEMI functions, and $tg(name).
 *
 *   trunkguard_judge()     judges the message: the action (enum tg_action), or -1
 *                          when there is no verdict (the cfg refuses: fail closed)
 *   trunkguard_reply()     sends the verdict's reply statelessly (sl)
 *   trunkguard_apply()     the verdict's strip and insert on what is relayed
 *   trunkguard_unfold()    a message (a response) made safe to relay onto a stream
 *   trunkguard_failover()  failure_route: the failover URI to $ru when the PBX's
 *                          answer sends the call there (docs/policy.md "Inbound calls")
 *   trunkguard_failed_over()  the failover's failure_route: the caller gets the PBX's
 *                          failure, not the failover's (a 503 as 500)
 *   trunkguard_dialog_open(), trunkguard_dialog_route(): tg_dialog.c
 *
 * The verdict is kept in this process for the message it was judged for; the
 * failover URI goes with the transaction in the xavp tg_failover (the failure route
 * runs later, in whichever process gets the reply or the timeout).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../../core/dprint.h"
#include "../../core/mem/mem.h"
#include "../../core/ut.h"
#include "../../core/ip_addr.h"
#include "../../core/data_lump.h"
#include "../../core/data_lump_rpl.h"
#include "../../core/dset.h"
#include "../../core/xavp.h"
#include "../../core/kemi.h"
#include "../../core/mod_fix.h"
#include "../../core/parser/parse_hname2.h"
#include "../sl/sl.h"
#include "../tm/tm_load.h"
#include "../tm/h_table.h"

#include "tg_mod.h"

static sl_api_t tg_slb;
static tm_api_t tg_tmb;
static int tg_tm_ok = 0;

static str tg_fo_xavp = str_init("tg_failover");
static str tg_fo_uri = str_init("uri");
static str tg_fo_on6xx = str_init("on_6xx");
/* The PBX's failure, kept with the transaction once the call went to the failover. */
static str tg_fd_xavp = str_init("tg_failed_over");
static str tg_fd_code = str_init("code");
static str tg_fd_reason = str_init("reason");

/* The verdict of the message being routed, valid for that message only. */
static struct {
	int valid;
	unsigned int msg_id;
	int msg_pid;
	tg_verdict v;
} tg_cur;

int tg_functions_init(void)
{
	if(sl_load_api(&tg_slb) != 0) {
		LM_ERR("the sl module must be loaded before trunkguard (replies)\n");
		return -1;
	}
	/* tm is needed by trunkguard_failover() only. */
	if(find_export("load_tm", NO_SCRIPT, 0) != NULL && tm_load_api(&tg_tmb) == 0)
		tg_tm_ok = 1;
	else
		LM_INFO("tm is not loaded: inbound failover (trunkguard_failover) is off\n");
	return 0;
}

tg_verdict *tg_verdict_of(sip_msg_t *msg)
{
	if(!tg_cur.valid || tg_cur.msg_id != msg->id || tg_cur.msg_pid != msg->pid)
		return NULL;
	return &tg_cur.v;
}

/* "ip:port", IPv6 in brackets, as the policy reads addresses. */
void tg_addr(char *out, size_t len, struct ip_addr *ip, unsigned short port)
{
	char *a = ip_addr2a(ip);
	if(ip->af == AF_INET6)
		snprintf(out, len, "[%s]:%u", a, (unsigned)port);
	else
		snprintf(out, len, "%s:%u", a, (unsigned)port);
}

const char *tg_transport(int proto)
{
	switch(proto) {
		case PROTO_UDP:
			return "udp";
		case PROTO_TCP:
			return "tcp";
		case PROTO_TLS:
			return "tls";
		case PROTO_WS:
			return "ws";
		case PROTO_WSS:
			return "wss";
		case PROTO_SCTP:
			return "sctp";
	}
	return "udp";
}

int tg_str_is(const tg_str *s, const char *lit)
{
	size_t n = strlen(lit);
	return s->len == n && memcmp(s->s, lit, n) == 0;
}

static void tg_count(const tg_verdict *v)
{
	tg_count_cause(&v->cause);
	switch(v->action) {
		case TG_ALLOW:
			update_stat(tg_st_allowed, 1);
			return;
		case TG_ROUTE:
			update_stat(tg_st_routed, 1);
			return;
		case TG_CHALLENGE:
			update_stat(tg_st_challenged, 1);
			return;
		case TG_ACCEPT:
			update_stat(tg_st_accepted, 1);
			return;
	}
	/* Refusals by the group of their cause (src/verdict.rs `Cause`). */
	if(tg_str_is(&v->cause, "bad_credentials") || tg_str_is(&v->cause, "auth_required")
			|| tg_str_is(&v->cause, "stale_nonce")
			|| tg_str_is(&v->cause, "replayed_nonce"))
		update_stat(tg_st_refused_auth, 1);
	else if(tg_str_is(&v->cause, "not_in_access_list")
			|| tg_str_is(&v->cause, "not_registered_address")
			|| tg_str_is(&v->cause, "registration_required")
			|| tg_str_is(&v->cause, "source_banned")
			|| tg_str_is(&v->cause, "held_for_guessing"))
		update_stat(tg_st_refused_address, 1);
	else
		update_stat(tg_st_refused_other, 1);
}

static tg_refusal_log *tg_rlog(void)
{
	if(tg_proc.rlog == NULL)
		tg_proc.rlog = tg_refusal_log_new((uint32_t)tg_refusal_log_rate);
	return tg_proc.rlog;
}

/* The refusal log's lines (docs/policy.md "The refusal log"), written as the KEMI
 * shim writes them: `trunkguard-refusal {json}` at NOTICE. 1: a refusal line was
 * among them. */
/* The lines to the refusal_log_file as well, one whole write each (O_APPEND): the file
 * fail2ban reads holds trunkguard's lines alone. Kamailio's own log also carries text
 * any sender chooses (a message the core parser refuses is logged as received, line
 * breaks and all), so a jail reading it could be made to ban anyone (docs/policy.md,
 * "fail2ban"). Opened for each batch, so that a rotated file is followed. */
static void tg_log_file(const tg_str *lines, size_t n)
{
	struct iovec iov[2];
	size_t i;
	int fd;

	if(tg_refusal_log_file == NULL || n == 0)
		return;
	fd = open(tg_refusal_log_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if(fd < 0) {
		LM_ERR("cannot open the refusal log %s: %s\n", tg_refusal_log_file, strerror(errno));
		return;
	}
	iov[1].iov_base = "\n";
	iov[1].iov_len = 1;
	for(i = 0; i < n; i++) {
		iov[0].iov_base = (void *)lines[i].s;
		iov[0].iov_len = lines[i].len;
		if(writev(fd, iov, 2) != (ssize_t)(lines[i].len + 1)) {
			LM_ERR("cannot write the refusal log %s: %s\n", tg_refusal_log_file, strerror(errno));
			break;
		}
	}
	close(fd);
}

static int tg_log_lines(const tg_str *lines, size_t n)
{
	size_t i;
	int refusal = 0;
	for(i = 0; i < n; i++) {
		LM_NOTICE("%.*s\n", (int)lines[i].len, lines[i].s);
		if(lines[i].len >= 19 && memcmp(lines[i].s, "trunkguard-refusal ", 19) == 0)
			refusal = 1;
	}
	tg_log_file(lines, n);
	return refusal;
}

/* A refusal the module makes itself (no verdict: `policy_error`; an in-dialog request
 * it will not route as written: `route_set`), in the refusal log with the policy's
 * own and under its rate: the sender chooses how many. 1: a refusal line was written
 * (or there is no log to rate it). */
int tg_log_host_refusal(sip_msg_t *msg, int code, const char *cause)
{
	const tg_str *lines = NULL;
	char source[80];
	size_t n;

	if(tg_rlog() == NULL)
		return 1;
	tg_addr(source, sizeof(source), &msg->rcv.src_ip, msg->rcv.src_port);
	n = tg_refusal_log_record_host(tg_rlog(), msg->buf, msg->len, source,
			tg_transport(msg->rcv.proto), tg_now_ms(), code, cause, &lines);
	return tg_log_lines(lines, n);
}

/* Text that stays on its line: no CR, LF or NUL. A line break in a header value or
 * the reason phrase would end it there and make the rest another header (RFC 3261
 * 7.3.1), text the policy never meant to send. */
static int tg_one_line(const tg_str *s)
{
	size_t i;
	for(i = 0; i < s->len; i++)
		if(s->s[i] == '\r' || s->s[i] == '\n' || s->s[i] == '\0')
			return 0;
	return 1;
}

/* A header of the verdict (a reply header or an insert): its name an RFC 3261
 * token, its value one line. The one check for both lists, made when the message is
 * judged (ki_trunkguard_judge fails closed), so neither trunkguard_reply() nor
 * trunkguard_apply() ever writes a header that is not one line. */
static int tg_header_ok(const tg_header *h)
{
	size_t i;
	if(h->name.len == 0)
		return 0;
	for(i = 0; i < h->name.len; i++) {
		unsigned char c = (unsigned char)h->name.s[i];
		if(!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
				   || strchr("!#$%&'*+-.^_`|~", c) != NULL)
				|| c == '\0')
			return 0;
	}
	return tg_one_line(&h->value);
}

static int tg_headers_ok(const tg_header *h, size_t n)
{
	size_t i;
	for(i = 0; i < n; i++)
		if(!tg_header_ok(&h[i]))
			return 0;
	return 1;
}

/* Keeps the failover with the transaction about to be created (tm keeps the xavps
 * with it and gives them back in the failure route), and makes tm's first-reply
 * timer the verdict's failover_after_ms: silence that long ends the PBX's branch,
 * while any provisional reply switches tm to fr_inv_timer (a ringing PBX is alive). */
static void tg_arm_failover(sip_msg_t *msg, const tg_verdict *v)
{
	sr_xval_t val;
	sr_xavp_t *root;
	unsigned int after;

	xavp_rm_by_name(&tg_fo_xavp, 1, NULL);
	memset(&val, 0, sizeof(val));
	val.type = SR_XTYPE_STR;
	val.v.s.s = (char *)v->failover.s;
	val.v.s.len = (int)v->failover.len;
	root = xavp_add_xavp_value(&tg_fo_xavp, &tg_fo_uri, &val, NULL);
	if(root == NULL) {
		LM_ERR("cannot keep the failover %.*s with the transaction\n",
				(int)v->failover.len, v->failover.s);
		return;
	}
	memset(&val, 0, sizeof(val));
	val.type = SR_XTYPE_INT;
	val.v.i = v->failover_on_6xx ? 1 : 0;
	xavp_add_value(&tg_fo_on6xx, &val, &root->val.v.xavp);
	after = v->failover_after_ms > 0 ? (unsigned int)v->failover_after_ms : 1;
	if(tg_tmb.set_fr(msg, 0, after) < 0)
		LM_ERR("cannot set the failover timer (%u ms)\n", after);
}

static int tg_fail_closed(sip_msg_t *msg, const char *source, const char *why)
{
	int said;

	update_stat(tg_st_policy_errors, 1);
	said = tg_log_host_refusal(msg, 503, "policy_error");
	/* Under the log's rate, so a broken module under a flood cannot fill the disk. */
	if(said && msg->first_line.type == SIP_REQUEST)
		LM_ERR("trunkguard: no verdict for %.*s from %s: %s\n",
				msg->first_line.u.request.method.len,
				msg->first_line.u.request.method.s, source, why);
	else if(said)
		LM_ERR("trunkguard: no verdict for a response from %s: %s\n", source, why);
	return -1;
}

static int ki_trunkguard_judge(sip_msg_t *msg)
{
	char source[80], local[80], err[TG_ERR_LEN];
	const char *transport;
	const tg_str *lines = NULL;
	uint64_t now;
	size_t i, n;
	tg_verdict *v = &tg_cur.v;

	tg_cur.valid = 0;
	update_stat(tg_st_judged, 1);
	tg_addr(source, sizeof(source), &msg->rcv.src_ip, msg->rcv.src_port);
	tg_addr(local, sizeof(local), &msg->rcv.dst_ip, msg->rcv.dst_port);
	transport = tg_transport(msg->rcv.proto);
	now = tg_now_ms();
	if(tg_sync() < 0)
		return tg_fail_closed(msg, source, "no policy loaded");
	err[0] = '\0';
	if(tg_policy_judge(tg_proc.policy, msg->buf, msg->len, source, local, transport,
			   now, v, err, sizeof(err))
			< 0)
		return tg_fail_closed(msg, source, err);
	if(v->action < TG_ALLOW || v->action > TG_ROUTE)
		return tg_fail_closed(msg, source, "unknown action");
	/* A reply or a relayed request with a broken header is never sent: no verdict,
	 * so the cfg answers 500 (its `default:` case), counted in policy_errors and
	 * logged once for the message (tg_fail_closed). */
	if(!tg_headers_ok(v->headers, v->headers_len) || !tg_one_line(&v->reason))
		return tg_fail_closed(msg, source,
				"the verdict's reply has a header or reason that is not one line");
	if(!tg_headers_ok(v->insert, v->insert_len))
		return tg_fail_closed(
				msg, source, "the verdict inserts a header that is not one line");
	tg_count(v);
	/* Every verdict goes to the refusal log, which keeps the ones it logs; a
	 * pending summary of a past second comes out with this process's next message. */
	if(tg_rlog() != NULL) {
		n = tg_refusal_log_record(tg_rlog(), msg->buf, msg->len, source, transport, now,
				v, &lines);
		tg_log_lines(lines, n);
		n = tg_refusal_log_flush(tg_rlog(), now, &lines);
		tg_log_lines(lines, n);
	}
	for(i = 0; i < v->alerts_len; i++)
		tg_spool(&v->alerts[i]);
	if(v->action == TG_ROUTE && v->failover.len > 0
			&& msg->first_line.type == SIP_REQUEST
			&& msg->first_line.u.request.method_value == METHOD_INVITE) {
		if(tg_tm_ok)
			tg_arm_failover(msg, v);
		else
			LM_WARN("inbound call with a failover, but tm is not loaded\n");
	}
	tg_cur.valid = 1;
	tg_cur.msg_id = msg->id;
	tg_cur.msg_pid = msg->pid;
	return v->action;
}

/* "Name: value\r\n" of one verdict header in a new pkg buffer (its length in
 * *len), or NULL when out of memory. */
static char *tg_header_line(const tg_header *h, size_t *len)
{
	char *s;

	*len = h->name.len + 2 + h->value.len + 2;
	s = pkg_malloc(*len);
	if(s == NULL) {
		PKG_MEM_ERROR;
		return NULL;
	}
	memcpy(s, h->name.s, h->name.len);
	memcpy(s + h->name.len, ": ", 2);
	memcpy(s + h->name.len + 2, h->value.s, h->value.len);
	memcpy(s + *len - 2, "\r\n", 2);
	return s;
}

static int ki_trunkguard_reply(sip_msg_t *msg)
{
	tg_verdict *v = tg_verdict_of(msg);
	char *hdr;
	size_t i, len;
	str reason;

	if(v == NULL || v->code == 0)
		return -1;
	if(!(v->code >= 300 && v->code <= 699)
			&& !(v->action == TG_ACCEPT && v->code >= 200 && v->code <= 299))
		return -1;
	/* An ACK is never answered (RFC 3261 17.2.3). */
	if(msg->first_line.type != SIP_REQUEST
			|| msg->first_line.u.request.method_value == METHOD_ACK)
		return -1;
	/* The headers and the reason were checked to be one line each when the message
	 * was judged (ki_trunkguard_judge fails closed otherwise). */
	for(i = 0; i < v->headers_len; i++) {
		hdr = tg_header_line(&v->headers[i], &len);
		if(hdr == NULL)
			return -1;
		/* add_lump_rpl copies it. */
		if(add_lump_rpl(msg, hdr, (int)len, LUMP_RPL_HDR) == 0) {
			pkg_free(hdr);
			LM_ERR("cannot add a reply header\n");
			return -1;
		}
		pkg_free(hdr);
	}
	reason.s = (char *)v->reason.s;
	reason.len = (int)v->reason.len;
	if(reason.len == 0) {
		reason.s = "Refused";
		reason.len = 7;
	}
	if(tg_slb.freply(msg, v->code, &reason) < 0) {
		LM_ERR("cannot send the reply %u\n", v->code);
		return -1;
	}
	return 1;
}

/* A strip name as Kamailio reads header names: `want` gets its type, so that a known
 * header is matched by type (its compact form too, as textops remove_hf does) and any
 * other by its name. Only a name read whole is known by its type: a name whose
 * first characters happen to be a compact form ("f.x") is not From. */
static int tg_hname(const tg_str *s, str *name, hdr_field_t *want)
{
	if(s->len == 0 || s->len > INT_MAX)
		return -1;
	name->s = (char *)s->s;
	name->len = (int)s->len;
	memset(want, 0, sizeof(*want));
	parse_hname2_str(name, want);
	if(want->name.len != name->len)
		want->type = HDR_OTHER_T;
	return 0;
}

static int tg_hf_is(const hdr_field_t *hf, const hdr_field_t *want, const str *name)
{
	if(want->type != HDR_OTHER_T && want->type != HDR_ERROR_T)
		return want->type == hf->type;
	return hf->name.len == name->len && strncasecmp(hf->name.s, name->s, name->len) == 0;
}

/* Removes every header called `s`. */
static int tg_strip(sip_msg_t *msg, const tg_str *s)
{
	str name;
	hdr_field_t want, *hf;

	if(tg_hname(s, &name, &want) < 0) {
		LM_ERR("a header to strip has no name\n");
		return -1;
	}
	for(hf = msg->headers; hf; hf = hf->next) {
		if(!tg_hf_is(hf, &want, &name))
			continue;
		if(del_lump(msg, hf->name.s - msg->buf, hf->len, 0) == 0) {
			LM_ERR("cannot remove %.*s\n", name.len, name.s);
			return -1;
		}
	}
	return 0;
}

/* The first fold in [p, end): a CRLF with SP or HT after it. A field's own CRLF
 * ends at `end`, so it is never one. */
static char *tg_fold(char *p, const char *end)
{
	for(; p + 2 < end; p++)
		if(p[0] == '\r' && p[1] == '\n' && (p[2] == ' ' || p[2] == '\t'))
			return p;
	return NULL;
}

/* Whether [start, end) lies inside a part of the message already removed (a stripped
 * header; the edge's own Route, which loose_route() took off an in-dialog request):
 * unfolding there would leave the SP alone where the removed part ended, at the head
 * of the next line, a fold of its own. */
int tg_removed(sip_msg_t *msg, int start, int end)
{
	struct lump *l;

	for(l = msg->add_rm; l; l = l->next)
		if(l->op == LUMP_DEL && l->u.offset <= start && l->u.offset + l->len >= end)
			return 1;
	return 0;
}

/* RFC 3261 §7.3.1 lets a header value go on over lines that start with SP or HT.
 * Relayed as it came, such a line would read as a header of its own to a parser that
 * does not unfold: a forged trunk-group header or identity before the edge's own.
 * Every fold still in the message (not in a header stripped or a Route taken off)
 * becomes one SP, the continuation line's leading white space with it, as hosts that
 * relay bytes write it (Message::edited, docs/policy.md). */
static int tg_unfold(sip_msg_t *msg)
{
	hdr_field_t *hf;
	struct lump *l;
	char *p, *q = NULL, *end, *sp;

	for(hf = msg->headers; hf; hf = hf->next) {
		end = hf->name.s + hf->len;
		for(p = tg_fold(hf->name.s, end); p != NULL; p = tg_fold(q, end)) {
			q = p + 2;
			while(q < end && (*q == ' ' || *q == '\t'))
				q++;
			if(tg_removed(msg, p - msg->buf, q - msg->buf))
				continue;
			l = del_lump(msg, p - msg->buf, q - p, 0);
			if(l == NULL) {
				LM_ERR("cannot unfold %.*s\n", hf->name.len, hf->name.s);
				return -1;
			}
			sp = pkg_malloc(1);
			if(sp == NULL) {
				PKG_MEM_ERROR;
				return -1;
			}
			*sp = ' ';
			/* The lump owns sp from here. */
			if(insert_new_lump_after(l, sp, 1, 0) == 0) {
				pkg_free(sp);
				LM_ERR("cannot unfold %.*s\n", hf->name.len, hf->name.s);
				return -1;
			}
		}
	}
	return 0;
}

/* Whether the message already carries `len` bytes `s` as an addition: the inserts of
 * a trunkguard_apply() before this one. A branch_route runs on a copy of the
 * request_route's lumps (modules/tm/t_fwd.c, prepare_new_uac), so an operator's cfg
 * that applies the verdict in both would send every insert twice otherwise. */
static int tg_inserted(sip_msg_t *msg, const char *s, size_t len)
{
	struct lump *l, *a;

	for(l = msg->add_rm; l; l = l->next)
		for(a = l->before; a; a = a->before)
			if(a->op == LUMP_ADD && a->len == (int)len && memcmp(a->u.value, s, len) == 0)
				return 1;
	return 0;
}

static int ki_trunkguard_apply(sip_msg_t *msg)
{
	tg_verdict *v = tg_verdict_of(msg);
	struct lump *anchor;
	size_t i, len;
	char *s;

	if(v == NULL)
		return -1;
	if(parse_headers(msg, HDR_EOH_F, 0) < 0) {
		LM_ERR("cannot parse the headers\n");
		return -1;
	}
	for(i = 0; i < v->strip_len; i++)
		if(tg_strip(msg, &v->strip[i]) < 0)
			return -1;
	if(tg_unfold(msg) < 0)
		return -1;
	/* The inserts were checked to be one header line each when the message was
	 * judged (ki_trunkguard_judge fails closed otherwise). */
	for(i = 0; i < v->insert_len; i++) {
		s = tg_header_line(&v->insert[i], &len);
		if(s == NULL)
			return -1;
		if(tg_inserted(msg, s, len)) {
			pkg_free(s);
			continue;
		}
		/* Before the body, after every header (textops append_hf). */
		anchor = anchor_lump(msg, msg->unparsed - msg->buf, 0, 0);
		if(anchor == NULL) {
			pkg_free(s);
			LM_ERR("cannot get an anchor for the insert\n");
			return -1;
		}
		/* The lump owns s from here. */
		if(insert_new_lump_before(anchor, s, (int)len, 0) == 0) {
			pkg_free(s);
			LM_ERR("cannot insert a header\n");
			return -1;
		}
	}
	return 1;
}

/* Whether the header block, up to its first CRLF CRLF, holds a CR or an LF that is
 * not one of a CRLF pair (or has no end). Kamailio's parser reads an LF alone before
 * SP or HT as a fold, which the unfolding below does not see, and ends the header
 * block at a line that starts with a CR alone, where a stream reader reads on: either
 * would reach the next hop as written. */
static int tg_bare_line_end(sip_msg_t *msg)
{
	char *p = msg->buf, *end = msg->buf + msg->len;

	for(; p < end; p++) {
		if(*p == '\n')
			return 1;
		if(*p != '\r')
			continue;
		if(p + 1 >= end || p[1] != '\n')
			return 1;
		if(p + 3 < end && p[2] == '\r' && p[3] == '\n')
			return 0;
		p++;
	}
	return 1;
}

/* What is relayed onto a stream must end where Kamailio read it to end. Kamailio's TCP
 * reader (core/tcp_read.c), at a carrier's proxy or anywhere further on, takes the
 * first line that reads as Content-Length, a continuation line or a `Content_Length`
 * field included: either would cut the message there, and what followed would be a
 * request of its own from this edge (docs/kamailio.md, "Responses"). Every fold
 * becomes one SP (as trunkguard_apply() does for requests); a Content_Length field
 * makes it -1, as does a CR or an LF alone in the header block: the cfg drops the
 * message. For responses, which the policy never judges, and any request a cfg
 * relays without trunkguard_apply(). */
static int tg_unfold_checked(sip_msg_t *msg)
{
	hdr_field_t *hf;

	if(parse_headers(msg, HDR_EOH_F, 0) < 0) {
		LM_ERR("cannot parse the headers\n");
		return -1;
	}
	if(tg_bare_line_end(msg)) {
		LM_NOTICE("a message with a CR or an LF alone in its header: not relayed\n");
		return -1;
	}
	/* tm takes this edge's own Via off a response, a fold in it with it: the SP the
	 * unfolding would put there would start the next line. Nobody folds it. */
	if(msg->first_line.type == SIP_REPLY && msg->h_via1 != NULL
			&& tg_fold(msg->h_via1->name.s, msg->h_via1->name.s + msg->h_via1->len) != NULL) {
		LM_NOTICE("a response whose top Via is folded: not relayed\n");
		return -1;
	}
	for(hf = msg->headers; hf; hf = hf->next) {
		if(hf->name.len == 14 && strncasecmp(hf->name.s, "content_length", 14) == 0) {
			LM_NOTICE("a message with a Content_Length field: not relayed\n");
			return -1;
		}
	}
	return tg_unfold(msg) < 0 ? -1 : 1;
}

static int ki_trunkguard_unfold(sip_msg_t *msg)
{
	return tg_answer_refused(msg, tg_unfold_checked(msg));
}

/* Whether a reply (tm's shm copy of it) carries a Retry-After header. */
static int tg_has_retry_after(sip_msg_t *rpl)
{
	char *p, *end;
	static const char name[] = "retry-after";

	if(rpl == NULL || rpl == FAKED_REPLY || rpl->buf == NULL)
		return 0;
	p = rpl->buf;
	end = rpl->buf + rpl->len;
	/* Line by line until the blank line that ends the headers. */
	while(p < end) {
		char *eol = memchr(p, '\n', end - p);
		char *q;
		if(eol == NULL)
			eol = end;
		if(eol - p <= 1)
			break;
		if(eol - p > (long)sizeof(name) - 1
				&& strncasecmp(p, name, sizeof(name) - 1) == 0) {
			q = p + sizeof(name) - 1;
			while(q < eol && (*q == ' ' || *q == '\t'))
				q++;
			if(q < eol && *q == ':')
				return 1;
		}
		p = eol + 1;
	}
	return 0;
}

static void tg_keep_pbx_failure(struct cell *t, int branch, int code, int timeout);

static int ki_trunkguard_failover(sip_msg_t *msg)
{
	sr_xavp_t *uri, *on6;
	struct cell *t;
	int branch, code, retry_after, on_6xx;
	str ruri;

	if(!tg_tm_ok || get_route_type() != FAILURE_ROUTE)
		return -1;
	uri = xavp_get_child_with_sval(&tg_fo_xavp, &tg_fo_uri);
	if(uri == NULL || uri->val.v.s.len <= 0)
		return -1;
	t = tg_tmb.t_gett();
	if(t == NULL || t == T_UNDEFINED)
		return -1;
	if(t->flags & T_CANCELED)
		return -1; /* the caller gave up: nothing goes on */
	branch = tg_tmb.t_get_picked_branch();
	if(branch < 0)
		return -1;
	if(msg->msg_flags & FL_TIMEOUT) {
		if(msg->msg_flags & FL_REPLIED)
			return -1; /* it rang until fr_inv_timer: nobody picked up */
		/* Silent for failover_after_ms: tm's own 408. */
		code = 408;
		retry_after = 0;
	} else {
		code = t->uac[branch].last_received;
		retry_after = tg_has_retry_after(t->uac[branch].reply);
	}
	on6 = xavp_get_child_with_ival(&tg_fo_xavp, &tg_fo_on6xx);
	on_6xx = on6 != NULL && on6->val.v.i != 0;
	if(!tg_fails_over((uint16_t)code, retry_after, on_6xx))
		return -1; /* busy, a decline, a 503 that says when to come back: final */
	ruri = uri->val.v.s;
	update_stat(tg_st_inbound_failover, 1);
	LM_INFO("inbound call: the PBX %s %d; relayed to the failover %.*s\n",
			(msg->msg_flags & FL_TIMEOUT) ? "is silent," : "answered", code,
			ruri.len, ruri.s);
	if(rewrite_uri(msg, &ruri) < 0) {
		LM_ERR("cannot set the failover URI %.*s\n", ruri.len, ruri.s);
		return -1;
	}
	reset_dst_uri(msg);
	tg_dialog_failed_over(msg, &ruri, t);
	/* One failover per call. */
	xavp_rm_by_name(&tg_fo_xavp, 1, NULL);
	tg_keep_pbx_failure(t, branch, code, (msg->msg_flags & FL_TIMEOUT) != 0);
	return 1;
}

/* The PBX's answer, for trunkguard_failed_over() should the failover fail too. */
static void tg_keep_pbx_failure(struct cell *t, int branch, int code, int timeout)
{
	sr_xval_t val;
	sr_xavp_t *root;
	struct sip_msg *reply = t->uac[branch].reply;

	xavp_rm_by_name(&tg_fd_xavp, 1, NULL);
	memset(&val, 0, sizeof(val));
	val.type = SR_XTYPE_INT;
	val.v.i = code;
	root = xavp_add_xavp_value(&tg_fd_xavp, &tg_fd_code, &val, NULL);
	if(root == NULL)
		return;
	memset(&val, 0, sizeof(val));
	val.type = SR_XTYPE_STR;
	if(!timeout && reply != NULL && reply != FAKED_REPLY
			&& reply->first_line.type == SIP_REPLY)
		val.v.s = reply->first_line.u.reply.reason;
	else
		val.v.s = (str)str_init("Request Timeout");
	xavp_add_value(&tg_fd_reason, &val, &root->val.v.xavp);
}

/* The failover's failure route: its failure stays unsaid, the caller gets the PBX's
 * (docs/policy.md "Inbound calls"); a 503 as 500, as tm relays one (RFC 3261 16.7
 * step 6). 1: replied; -1: nothing kept, or the caller cancelled (tm relays the best
 * answer it has). */
static int ki_trunkguard_failed_over(sip_msg_t *msg)
{
	sr_xavp_t *code, *reason;
	struct cell *t;
	char text[128];
	int c;

	if(!tg_tm_ok || get_route_type() != FAILURE_ROUTE)
		return -1;
	t = tg_tmb.t_gett();
	if(t == NULL || t == T_UNDEFINED || (t->flags & T_CANCELED))
		return -1;
	code = xavp_get_child_with_ival(&tg_fd_xavp, &tg_fd_code);
	reason = xavp_get_child_with_sval(&tg_fd_xavp, &tg_fd_reason);
	if(code == NULL)
		return -1;
	c = (int)code->val.v.i;
	if(c < 300 || c > 699)
		return -1;
	if(c == 503) {
		c = 500;
		snprintf(text, sizeof(text), "Server Internal Error");
	} else if(reason != NULL && reason->val.v.s.len > 0) {
		snprintf(text, sizeof(text), "%.*s", reason->val.v.s.len, reason->val.v.s.s);
	} else {
		snprintf(text, sizeof(text), "Failed");
	}
	return tg_tmb.t_reply(msg, (unsigned int)c, text) < 0 ? -1 : 1;
}

/* --- cfg wrappers -------------------------------------------------------------------- */

static int w_trunkguard_judge(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_judge(msg);
}

static int w_trunkguard_reply(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_reply(msg);
}

static int w_trunkguard_apply(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_apply(msg);
}

static int w_trunkguard_unfold(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_unfold(msg);
}

static int w_trunkguard_failover(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_failover(msg);
}

static int w_trunkguard_failed_over(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_failed_over(msg);
}

static int w_trunkguard_dialog_open(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_dialog_open(msg);
}

static int w_trunkguard_dialog_route(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_dialog_route(msg);
}

static int w_trunkguard_reply_route_set(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_reply_route_set(msg);
}

static int w_trunkguard_reply_connection(sip_msg_t *msg, char *p1, char *p2)
{
	return ki_trunkguard_reply_connection(msg);
}

cmd_export_t tg_cmds[] = {
	{"trunkguard_judge", (cmd_function)w_trunkguard_judge, 0, 0, 0, REQUEST_ROUTE},
	{"trunkguard_reply", (cmd_function)w_trunkguard_reply, 0, 0, 0, REQUEST_ROUTE},
	{"trunkguard_apply", (cmd_function)w_trunkguard_apply, 0, 0, 0,
			REQUEST_ROUTE | BRANCH_ROUTE},
	{"trunkguard_unfold", (cmd_function)w_trunkguard_unfold, 0, 0, 0,
			REQUEST_ROUTE | BRANCH_ROUTE | ONREPLY_ROUTE},
	{"trunkguard_reply_route_set", (cmd_function)w_trunkguard_reply_route_set, 0, 0, 0,
			ONREPLY_ROUTE},
	{"trunkguard_reply_connection", (cmd_function)w_trunkguard_reply_connection, 0, 0, 0,
			REQUEST_ROUTE | ONREPLY_ROUTE},
	{"trunkguard_failover", (cmd_function)w_trunkguard_failover, 0, 0, 0,
			FAILURE_ROUTE},
	{"trunkguard_failed_over", (cmd_function)w_trunkguard_failed_over, 0, 0, 0,
			FAILURE_ROUTE},
	{"trunkguard_dialog_open", (cmd_function)w_trunkguard_dialog_open, 0,
			tg_dialog_fixup, 0, REQUEST_ROUTE},
	{"trunkguard_dialog_route", (cmd_function)w_trunkguard_dialog_route, 0,
			tg_dialog_fixup, 0, REQUEST_ROUTE},
	{0, 0, 0, 0, 0, 0}
};

/* clang-format off */
static sr_kemi_t sr_kemi_trunkguard_exports[] = {
	{ str_init("trunkguard"), str_init("judge"),
		SR_KEMIP_INT, ki_trunkguard_judge,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("reply"),
		SR_KEMIP_INT, ki_trunkguard_reply,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("apply"),
		SR_KEMIP_INT, ki_trunkguard_apply,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("unfold"),
		SR_KEMIP_INT, ki_trunkguard_unfold,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("reply_route_set"),
		SR_KEMIP_INT, ki_trunkguard_reply_route_set,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("reply_connection"),
		SR_KEMIP_INT, ki_trunkguard_reply_connection,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("failover"),
		SR_KEMIP_INT, ki_trunkguard_failover,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("failed_over"),
		SR_KEMIP_INT, ki_trunkguard_failed_over,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("dialog_open"),
		SR_KEMIP_INT, ki_trunkguard_dialog_open,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},
	{ str_init("trunkguard"), str_init("dialog_route"),
		SR_KEMIP_INT, ki_trunkguard_dialog_route,
		{ SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE,
			SR_KEMIP_NONE, SR_KEMIP_NONE, SR_KEMIP_NONE }
	},

	{ {0, 0}, {0, 0}, 0, NULL, { 0, 0, 0, 0, 0, 0 } }
};
/* clang-format on */

int tg_kemi_register(void)
{
	sr_kemi_modules_add(sr_kemi_trunkguard_exports);
	return 0;
}

/* --- $tg(name) ------------------------------------------------------------------ */

enum {
	TG_PV_ACTION = 1,
	TG_PV_CODE,
	TG_PV_REASON,
	TG_PV_CAUSE,
	TG_PV_TRUNK_GROUP,
	TG_PV_TARGET,
	TG_PV_NEXT_HOP,
	TG_PV_FAILOVER,
	TG_PV_FAILOVER_AFTER_MS,
	TG_PV_FAILOVER_ON_6XX
};

static const struct {
	const char *name;
	int id;
} tg_pv_names[] = {
	{"action", TG_PV_ACTION},
	{"code", TG_PV_CODE},
	{"reason", TG_PV_REASON},
	{"cause", TG_PV_CAUSE},
	{"trunk_group", TG_PV_TRUNK_GROUP},
	{"target", TG_PV_TARGET},
	{"next_hop", TG_PV_NEXT_HOP},
	{"failover", TG_PV_FAILOVER},
	{"failover_after_ms", TG_PV_FAILOVER_AFTER_MS},
	{"failover_on_6xx", TG_PV_FAILOVER_ON_6XX},
	{NULL, 0}
};

static int pv_parse_tg_name(pv_spec_p sp, str *in)
{
	int i;
	if(sp == NULL || in == NULL || in->len <= 0)
		return -1;
	for(i = 0; tg_pv_names[i].name != NULL; i++) {
		if(strlen(tg_pv_names[i].name) == (size_t)in->len
				&& strncmp(tg_pv_names[i].name, in->s, in->len) == 0) {
			sp->pvp.pvn.type = PV_NAME_INTSTR;
			sp->pvp.pvn.u.isname.type = 0;
			sp->pvp.pvn.u.isname.name.n = tg_pv_names[i].id;
			return 0;
		}
	}
	LM_ERR("unknown $tg(%.*s)\n", in->len, in->s);
	return -1;
}

static int tg_pv_str(sip_msg_t *msg, pv_param_t *param, pv_value_t *res,
		const tg_str *s)
{
	str v;
	if(s->len == 0)
		return pv_get_null(msg, param, res);
	v.s = (char *)s->s;
	v.len = (int)s->len;
	return pv_get_strval(msg, param, res, &v);
}

static int pv_get_tg(sip_msg_t *msg, pv_param_t *param, pv_value_t *res)
{
	tg_verdict *v = tg_verdict_of(msg);

	if(v == NULL || param == NULL)
		return pv_get_null(msg, param, res);
	switch(param->pvn.u.isname.name.n) {
		case TG_PV_ACTION:
			return pv_get_sintval(msg, param, res, v->action);
		case TG_PV_CODE:
			return pv_get_sintval(msg, param, res, v->code);
		case TG_PV_REASON:
			return tg_pv_str(msg, param, res, &v->reason);
		case TG_PV_CAUSE:
			return tg_pv_str(msg, param, res, &v->cause);
		case TG_PV_TRUNK_GROUP:
			return tg_pv_str(msg, param, res, &v->trunk_group);
		case TG_PV_TARGET:
			return tg_pv_str(msg, param, res, &v->target);
		case TG_PV_NEXT_HOP:
			return tg_pv_str(msg, param, res, &v->next_hop);
		case TG_PV_FAILOVER:
			return tg_pv_str(msg, param, res, &v->failover);
		case TG_PV_FAILOVER_AFTER_MS:
			return pv_get_sintval(msg, param, res, (long)v->failover_after_ms);
		case TG_PV_FAILOVER_ON_6XX:
			return pv_get_sintval(msg, param, res, v->failover_on_6xx ? 1 : 0);
	}
	return pv_get_null(msg, param, res);
}

pv_export_t tg_pvs[] = {
	{{"tg", sizeof("tg") - 1}, PVT_OTHER, pv_get_tg, 0, pv_parse_tg_name, 0, 0, 0},
	{{0, 0}, 0, 0, 0, 0, 0, 0, 0}
};
