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
 *   trunkguard_reply_connection()  in reply_route, after t_check_trans(): 1 (the
 *                                  transaction's answers held to its request's
 *                                  connection; a request over UDP, or Kamailio's
 *                                  own, left alone), -1 (no transaction known: the
 *                                  cfg drops the answer)
 */

#include "../../core/dprint.h"
#include "../../core/ip_addr.h"
#include "../../core/tcp_conn.h"
#include "../tm/tm_load.h"
#include "../tm/h_table.h"

#include "tg_mod.h"

int ki_trunkguard_reply_connection(sip_msg_t *msg)
{
	tm_api_t *tmb;
	struct cell *t;
	struct tcp_connection *c;
	struct receive_info *rcv;
	struct dest_info *dst;

	if(msg->first_line.type != SIP_REPLY)
		return 1;
	tmb = tg_reply_tm();
	t = tmb != NULL ? tmb->t_gett() : NULL;
	if(t == NULL || t == T_UNDEFINED) {
		LM_NOTICE("an answer of no known transaction: not relayed\n");
		return -1;
	}
	/* A request of Kamailio's own (a uac or dispatcher ping, a dialog keepalive):
	 * its answers end here, relayed to nobody. */
	if(t->uas.request == NULL)
		return 1;
	rcv = &t->uas.request->rcv;
	if(rcv->proto != PROTO_TCP && rcv->proto != PROTO_TLS && rcv->proto != PROTO_WS
			&& rcv->proto != PROTO_WSS)
		return 1;
	dst = &t->uas.response.dst;
	/* Idempotent, and tm's readers see the old port or none: a send racing this
	 * store goes by address as it did before. */
	if(su_getport(&dst->to) != 0 && dst->id == rcv->proto_reserved1 && dst->id != 0)
		su_setport(&dst->to, 0);
	c = tcpconn_get(rcv->proto_reserved1, 0, 0, 0, 0);
	if(c == NULL) {
		LM_NOTICE("a %d to a request whose connection is gone: not relayed\n",
				(int)msg->first_line.u.reply.statuscode);
		return 1;
	}
	tcpconn_put(c);
	return 1;
}
