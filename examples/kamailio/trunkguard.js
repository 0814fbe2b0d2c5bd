// trunkguard.so called from a KEMI script: Kamailio's app_jsdt (JavaScript, in
// Debian's kamailio package itself) runs this file as the routing logic instead of a
// native request_route. The same calls work from any KEMI language (KSR.trunkguard.*
// in Lua, Python, Ruby); docs/kamailio.md, "From a KEMI script", shows the cfg that
// loads it, and tests/kamailio/test_module.py (KemiJavaScript) runs this very file.
//
// It routes as the shortest native cfg of that page does: the policy judges every
// request, its reply goes out as the module wrote it, a trunk call goes to the carrier
// with the verdict's headers, and an in-dialog request only within a dialog this edge
// opened. The carrier is the cfg's define TG_CARRIER ("sip:IP:PORT").

// Read at the first request: KSR.* needs a message to run, even for a define. A
// define's value keeps the quotes it was written with (-A 'TG_CARRIER="sip:…"').
var carrier = null;

function carrierUri() {
	if (carrier === null) {
		carrier = String(KSR.kx.get_def("TG_CARRIER") || "").replace(/^"(.*)"$/, "$1");
	}
	return carrier;
}

function reply(code, reason) {
	// An ACK gets no answer (RFC 3261 §17.2.3).
	if (!KSR.is_ACK()) {
		KSR.sl.sl_send_reply(code, reason);
	}
}

// Max-Forwards is counted down on what is relayed only: the policy judges (and logs)
// a request before that, whatever its Max-Forwards says.
function relay() {
	if (KSR.maxfwd.process_maxfwd(70) < 0) {
		reply(483, "Too Many Hops");
		return;
	}
	if (KSR.tm.t_relay() < 0) {
		KSR.sl.send_reply(500, "Server Internal Error (relay)");
	}
}

function ksr_request_route() {
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
	// An allow is routed by its cause alone, never by what the request says.
	var cause = KSR.pv.get("$tg(cause)");
	if (cause == "trunk" && carrierUri() != "") {
		KSR.trunkguard.apply();
		KSR.setdsturi(carrierUri());
		// 0: a retransmission, which tm has answered.
		if (KSR.tm.t_check_trans() == 0) {
			return;
		}
		if (KSR.trunkguard.dialog_open() < 0) {
			reply(500, "Server Internal Error (no dialog)");
			return;
		}
		KSR.rr.record_route();
		relay();
		return;
	}
	if (cause == "in_dialog") {
		if (KSR.tm.t_check_trans() == 0) {
			return;
		}
		if (KSR.trunkguard.dialog_route() > 0) {
			relay();
			return;
		}
		reply(404, "Not Here");
		return;
	}
	if (cause == "pass_through") {
		// Keepalives are answered here; a CANCEL or ACK goes on only with the
		// transaction it belongs to (t_check_trans() > 0).
		if (KSR.is_OPTIONS()) {
			reply(200, "OK");
		} else if ((KSR.is_CANCEL() || KSR.is_ACK()) && KSR.tm.t_check_trans() > 0) {
			KSR.tm.t_relay();
		}
		return;
	}
	reply(403, "Forbidden (not routed here)");
}
