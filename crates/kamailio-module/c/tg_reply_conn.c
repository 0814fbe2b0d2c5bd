/*
 * trunkguard.so: a transaction's answers go back over its request's connection, or
 * not at all.
 *
 * An answer to a request that came over a stream goes back over that connection
 * (RFC 3261 §18.2.2). tm keeps where to send its answers (the transaction's
 * uas.response.dst): the request's address and the connection's id. Once the
 * connection is gone (a NAT's idle timeout, a PBX's reboot), Kamailio's tcp_send
 * takes whichever connection now has that address instead: behind a NAT, anyone's.
 * The carrier's 200 to a PBX's call would give a stranger a call the PBX's trunk
 * group pays for, with the carrier's SDP and the dialog's tags. With no port in that
 * destination, tcp_send looks the connection up by its id alone and, the id gone,
 * sends nothing ("id ... not found, dropping"): so the answer is relayed, or
 * retransmitted, or tm's own 408 sent, over the request's connection or nowhere,
 * while tm still takes every answer (it ACKs a failure and ends the transaction as
 * usual). docs/kamailio.md, "A PBX registered over TCP".
 *
 *
 * The other way, tm sends what it writes on a branch itself (the CANCEL when the
 * caller hangs up, the ACK of a failure) to the branch's address, and takes an
 * answer to the branch from any connection: once a PBX's connection is gone, a
 * stranger's from its port would get the CANCEL, with the branch, and could answer
 * the call in the PBX's place. So a branch sent over a connection that its far end
 * opened (a PBX's, as only they are behind a NAT; a connection this edge opened to a
 * server is opened again by address, as Kamailio does) keeps that connection's id
 * and loses its address, and an answer to it from another connection is refused.
 * And tm's branch (the Via branch this edge writes) is computed from the relayed
 * request's own identifiers: anyone who saw the request holds it, and tm takes an
 * answer that names it from any address. So an answer to any branch comes from the
 * address the branch went to, or it is refused.
 *
 * That check runs for every answer the edge receives, before reply_route and tm
 * see it (a pre-script callback of Kamailio's core): a cfg lifted without the
 * function below is not open to it.
 *
 *   trunkguard_reply_connection()  in request_route, after t_relay(): the
 *                                  transaction's answers held to the request's
 *                                  connection from the start, tm's own 408 to a
 *                                  silent callee included, and each branch to
 *                                  the connection it went over; 1, or -1 when the
 *                                  request has no transaction.
 *                                  In reply_route, after t_check_trans(): the
 *                                  answers held for a transaction relayed without
 *                                  it; 1 (a request over UDP, or Kamailio's own,
 *                                  left alone), -1 (no transaction known: the
 *                                  cfg drops the answer)
 */

#include "../../core/dprint.h"
#include "../../core/ip_addr.h"
#include "../../core/script_cb.h"
#include "../../core/tcp_conn.h"
#include "../tm/tm_load.h"
#include "../tm/h_table.h"

#include "tg_mod.h"

static int tg_stream(int proto)
{
	return proto == PROTO_TCP || proto == PROTO_TLS || proto == PROTO_WS
		   || proto == PROTO_WSS;
}

/* Holds t's answers to the connection `rcv` (its request's) names: 1 when the
 * request came over a stream, 0 over a datagram. */
static int tg_hold_answers(struct cell *t, struct receive_info *rcv)
{
	struct dest_info *dst;

	if(!tg_stream(rcv->proto))
		return 0;
	dst = &t->uas.response.dst;
	/* Idempotent, and tm's readers see the old port or none: a send racing this
	 * store goes by address as it did before. */
	if(su_getport(&dst->to) != 0 && dst->id == rcv->proto_reserved1 && dst->id != 0)
		su_setport(&dst->to, 0);
	return 1;
}

/* Holds each branch of t sent over a connection its far end opened to that
 * connection: the one with the branch's address now, which tcp_send took for it a
 * moment ago in t_relay(). */
static void tg_hold_branches(struct cell *t)
{
	int i, port;
	struct dest_info *dst;
	struct ip_addr ip;
	struct tcp_connection *c;

	for(i = 0; i < t->nr_of_outgoings; i++) {
		dst = &t->uac[i].request.dst;
		port = su_getport(&dst->to);
		if(!tg_stream(dst->proto) || dst->id != 0 || port == 0)
			continue;
		su2ip_addr(&ip, &dst->to);
		c = tcpconn_get(0, &ip, port, NULL, 0);
		if(c == NULL)
			continue;
		if(c->flags & F_CONN_PASSIVE) {
			dst->id = c->id;
			su_setport(&dst->to, 0);
		}
		tcpconn_put(c);
	}
}

/* 0 when the answer `msg` to t's branch came from the branch's far end: over the
 * connection a held branch keeps, else from the address the branch went to, over
 * its transport; -1 otherwise. The edge asks for symmetric answers (;rport in its
 * Via, RFC 3581 §4), so a far end answers from where it was reached. */
static int tg_branch_answered_from_its_far_end(
		tm_api_t *tmb, struct cell *t, sip_msg_t *msg)
{
	int branch;
	struct dest_info *dst;
	struct ip_addr to;

	branch = tmb->t_gett_branch();
	if(branch < 0 || branch >= t->nr_of_outgoings)
		return 0;
	dst = &t->uac[branch].request.dst;
	if(tg_stream(dst->proto) && dst->id != 0 && su_getport(&dst->to) == 0) {
		if(tg_stream(msg->rcv.proto) && msg->rcv.proto_reserved1 == dst->id)
			return 0;
		LM_NOTICE("a %d to a branch from another connection than the branch's: "
				  "not relayed\n",
				(int)msg->first_line.u.reply.statuscode);
		return -1;
	}
	su2ip_addr(&to, &dst->to);
	if(msg->rcv.proto == dst->proto && ip_addr_cmp(&to, &msg->rcv.src_ip))
		return 0;
	LM_NOTICE("a %d to a branch from another address than the branch's: not "
			  "relayed\n",
			(int)msg->first_line.u.reply.statuscode);
	return -1;
}

static int tg_reply_connection(sip_msg_t *msg)
{
	tm_api_t *tmb;
	struct cell *t;
	struct tcp_connection *c;
	struct receive_info *rcv;

	tmb = tg_reply_tm();
	t = tmb != NULL ? tmb->t_gett() : NULL;
	if(msg->first_line.type == SIP_REQUEST) {
		/* After t_relay(): the transaction is this request's. */
		if(t == NULL || t == T_UNDEFINED || t->uas.request == NULL)
			return -1;
		tg_hold_answers(t, &msg->rcv);
		tg_hold_branches(t);
		return 1;
	}
	if(msg->first_line.type != SIP_REPLY)
		return 1;
	if(t == NULL || t == T_UNDEFINED) {
		LM_NOTICE("an answer of no known transaction: not relayed\n");
		return -1;
	}
	/* An answer to a branch from elsewhere than the branch's far end never gets
	 * here: tg_answer_from_its_far_end dropped it before reply_route. */
	/* A request of Kamailio's own (a uac or dispatcher ping, a dialog keepalive):
	 * its answers end here, relayed to nobody. */
	if(t->uas.request == NULL)
		return 1;
	rcv = &t->uas.request->rcv;
	if(!tg_hold_answers(t, rcv))
		return 1;
	c = tcpconn_get(rcv->proto_reserved1, 0, 0, 0, 0);
	if(c == NULL) {
		LM_NOTICE("a %d to a request whose connection is gone: not relayed\n",
				(int)msg->first_line.u.reply.statuscode);
		return 1;
	}
	tcpconn_put(c);
	return 1;
}

int ki_trunkguard_reply_connection(sip_msg_t *msg)
{
	return tg_answer_refused(msg, tg_reply_connection(msg));
}

int tg_answer_refused(sip_msg_t *msg, int ret)
{
	tm_api_t *tmb;
	struct cell *t;

	if(ret >= 0 || msg->first_line.type != SIP_REPLY
			|| !is_route_type(CORE_ONREPLY_ROUTE))
		return ret;
	tmb = tg_reply_tm();
	if(tmb == NULL)
		return ret;
	t = tmb->t_gett();
	if(t != NULL && t != T_UNDEFINED)
		tmb->t_unref(msg);
	return ret;
}

/* Kamailio's core runs it for each answer it receives, before reply_route: 0 drops
 * the answer (receive_msg). The reference t_check took on the transaction is given
 * back either way, and T left undefined as it was: only tm's reply_received would
 * give it back, and it never runs for an answer the cfg drops, before its own
 * t_check_trans() (Kamailio's default cfg drops a response that fails sanity_check
 * first) as well as after. The cfg's t_check_trans() and tm look the answer up
 * afresh. An answer of no transaction is the cfg's (reply_route drops it,
 * docs/kamailio.md, "Responses"). */
static int tg_answer_from_its_far_end(
		sip_msg_t *msg, unsigned int flags, void *param)
{
	tm_api_t *tmb;
	struct cell *t;
	int branch = -1;
	int from_far_end;

	if(msg->first_line.type != SIP_REPLY)
		return 1;
	tmb = tg_reply_tm();
	if(tmb == NULL || tmb->t_check(msg, &branch) != 1)
		return 1;
	t = tmb->t_gett();
	if(t == NULL || t == T_UNDEFINED)
		return 1;
	from_far_end = tg_branch_answered_from_its_far_end(tmb, t, msg) == 0;
	tmb->t_unref(msg);
	return from_far_end ? 1 : 0;
}

int tg_reply_conn_init(void)
{
	/* Without tm there is no branch to answer. */
	if(tg_reply_tm() == NULL)
		return 0;
	if(register_script_cb(
			   tg_answer_from_its_far_end, PRE_SCRIPT_CB | ONREPLY_CB, 0)
			< 0) {
		LM_ERR("cannot register the answer check\n");
		return -1;
	}
	return 0;
}
