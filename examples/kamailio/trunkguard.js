// trunkguard.so called from a KEMI script: Kamailio's app_jsdt (JavaScript, in
// Debian's kamailio package itself) runs this file as the routing logic instead of a
// native request_route. The same calls work from any KEMI language (KSR.trunkguard.*
// in Lua, Python, Ruby); docs/kamailio.md, "From a KEMI script", shows the cfg that
// loads it, and tests/kamailio/test_module.py (KemiJavaScript) runs this very file.
//
// It routes as host-shims/kamailio/kamailio.cfg does for the access side, in the same
// order: a retransmission is tm's, a malformed request is dropped, the policy judges
// the rest, its reply goes out as the module wrote it, a trunk call goes to the
// carrier with the verdict's headers, an in-dialog request only within a dialog this
// edge opened, and a response that belongs to no transaction goes nowhere. The
// carrier is the cfg's define TG_CARRIER ("sip:IP:PORT"); without it, trunk calls
// are refused 503.
//
// In KEMI a function's 0 (t_check_trans() on a retransmission it has answered) does
// not end the script: every such call is followed by a return of our own.

// Read at the first request: KSR.* needs a message to run, even for a define. A
// define's value keeps the quotes it was written with (-A 'TG_CARRIER="sip:…"').
var carrier = null;

function carrierUri() {
	if (carrier === null) {
		carrier = String(KSR.kx.get_def("TG_CARRIER") || "").replace(/^"(.*)"$/, "$1");
	}
	return carrier;
}

// An ACK gets no answer (RFC 3261 §17.2.3).
function reply(code, reason) {
	if (!KSR.is_ACK()) {
		KSR.sl.sl_send_reply(code, reason);
	}
}

// Max-Forwards counted down on what is relayed, before anything is set up for it: the
// policy judged the request first (and logged it), whatever its Max-Forwards said.
function maxForwardsLeft() {
	if (KSR.maxfwd.process_maxfwd(70) > 0) {
		return true;
	}
	reply(483, "Too Many Hops");
	return false;
}

function toCarrier() {
	if (carrierUri() == "") {
		reply(503, "Service Unavailable (no carrier configured)");
		return;
	}
	if (!maxForwardsLeft()) {
		return;
	}
	// The verdict's edits, or nothing is relayed.
	if (KSR.trunkguard.apply() < 0) {
		reply(500, "Server Internal Error");
		return;
	}
	// The carrier, whatever the Request-URI says; never the R-URI if this fails.
	if (KSR.setdsturi(carrierUri()) < 0) {
		reply(500, "Server Internal Error");
		return;
	}
	if (KSR.tm.t_check_trans() == 0) {
		return;
	}
	var opened = KSR.trunkguard.dialog_open();
	if (opened == -2) {
		// A dialog this edge has already, or a hop that is this edge.
		reply(482, "Loop Detected");
		return;
	}
	if (opened < 0) {
		reply(500, "Server Internal Error");
		return;
	}
	KSR.rr.record_route();
	if (KSR.tm.t_relay() < 0) {
		KSR.sl.sl_reply_error();
		return;
	}
	// Its answers, tm's own 408 included, over the request's connection or nowhere.
	KSR.trunkguard.reply_connection();
}

function withinDialog() {
	if (KSR.tm.t_check_trans() == 0) {
		return;
	}
	// loose_route() within a dialog this edge opened, to the other party's hop.
	if (KSR.trunkguard.dialog_route() > 0) {
		if (!maxForwardsLeft()) {
			return;
		}
		if (KSR.trunkguard.apply() < 0) {
			reply(500, "Server Internal Error");
			return;
		}
		if (KSR.tm.t_relay() > 0) {
			KSR.trunkguard.reply_connection();
		}
		return;
	}
	reply(404, "Not Here");
}

function ksr_request_route() {
	// A retransmission is tm's to answer before the policy sees it again: a
	// retransmitted authenticated INVITE would read as a replayed nonce, and count
	// as a call of its own.
	if (!KSR.is_ACK()) {
		if (KSR.tmx.t_precheck_trans() > 0) {
			KSR.tm.t_check_trans();
			return;
		}
		if (KSR.tm.t_check_trans() == 0) {
			return;
		}
	}
	if (KSR.sanity.sanity_check(17895, 7) < 0) {
		return;
	}
	// The verdict's action (docs/kamailio.md, "Functions"): 1 allow, 2 challenge,
	// 3 reject, 4 accept, 5 route; below 0 there is no verdict, and it fails closed.
	var action = KSR.trunkguard.judge();
	if (action == 2 || action == 3 || action == 4) {
		KSR.trunkguard.reply();
		return;
	}
	if (action == 5) {
		// An inbound call for a PBX: this edge has no core side to take it from.
		reply(503, "Service Unavailable (no inbound route here)");
		return;
	}
	if (action != 1) {
		reply(503, "Service Unavailable (policy error)");
		return;
	}
	if (KSR.is_REGISTER()) {
		// The policy answers every REGISTER it serves.
		reply(405, "Method Not Allowed");
		return;
	}
	// An allow is routed by its cause alone, never by what the request says.
	var cause = KSR.pv.get("$tg(cause)");
	if (cause == "trunk") {
		toCarrier();
	} else if (cause == "in_dialog") {
		withinDialog();
	} else if (cause == "pass_through") {
		// Keepalives are answered here; ACK and CANCEL go on only within a
		// transaction this edge relayed, a CANCEL only from where its INVITE came
		// ($T_inv, tmx): it matches the INVITE by identifiers anyone who saw the
		// INVITE holds (RFC 3261 9.2).
		if ((KSR.is_CANCEL() || KSR.is_ACK()) && KSR.tm.t_check_trans() > 0) {
			if (KSR.is_CANCEL() && KSR.pv.get("$T_inv($si)") != KSR.pv.get("$si")) {
				reply(481, "Call/Transaction Does Not Exist");
			} else {
				KSR.tm.t_relay();
			}
		} else if (KSR.is_OPTIONS()) {
			reply(200, "OK");
		}
	} else {
		// A cause this script does not route: nothing is relayed.
		reply(503, "Service Unavailable (unroutable verdict)");
	}
}

// Without this, Kamailio forwards a response that matches no transaction by its
// second Via, wherever that points: anyone could have the edge send responses to the
// carrier or a PBX.
// And a response, its sender's text, leaves with no folded line and no Content_Length
// field, which would end it early at a next hop that reads a stream as Kamailio does.
// An answer to a request over TCP or TLS goes back over that request's connection or
// not at all: once it is gone, Kamailio would take any connection with its address.
function ksr_reply_route() {
	if (KSR.tm.t_check_trans() < 0 || KSR.trunkguard.reply_connection() < 0 || KSR.trunkguard.unfold() < 0
			|| KSR.trunkguard.reply_route_set() < 0) {
		KSR.x.drop();
	}
}
