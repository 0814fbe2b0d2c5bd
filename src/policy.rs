//! The decisions of docs/policy.md as one pure function of (message, source, transport,
//! time, state) → verdict and alert events. Nothing here knows which host runs it.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use crate::acl::canonical_ip;
use crate::alert::{Alert, AlertKind, rfc3339};
use crate::binding::{self, Binding};
use crate::digest::{self, Algorithm, NonceSecret, NonceState};
use crate::index::{Index, Trunk};
use crate::lockout;
use crate::registration::{self, Request as Registration};
use crate::sip::{self, AuthHeader, Message, Method, ParseError, Transport};
use crate::store::{Store, StoreError};
use crate::verdict::{Action, Cause, Verdict};

/// One message as the host hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub message: &'a [u8],
    /// The transport's peer address: the only source the policy trusts.
    pub source: SocketAddr,
    pub transport: Transport,
    /// The proxy socket the message arrived on, when the host knows it: core trust
    /// needs a core-facing one (config `core_sockets`).
    pub local: Option<SocketAddr>,
    pub now_ms: u64,
}

/// A verdict plus the alert events it raised (before throttling; ids are assigned
/// by the engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub alerts: Vec<Alert>,
}

impl From<Verdict> for Decision {
    fn from(verdict: Verdict) -> Self {
        Decision {
            verdict,
            alerts: Vec::new(),
        }
    }
}

/// Judges one message.
pub fn decide(
    index: &Index,
    input: &Input<'_>,
    store: &mut dyn Store,
    secret: &NonceSecret,
    nonce_unique: u16,
) -> Result<Decision, StoreError> {
    let msg = match sip::parse(input.message, input.transport.framing()) {
        Ok(msg) => msg,
        Err(e) => return Ok(malformed(&e).into()),
    };
    // Responses belong to transactions the proxy already judged.
    let Some(method) = msg.method() else {
        return Ok(Verdict::allow_as(Cause::Response).into());
    };
    let source_ip = canonical_ip(input.source.ip());
    let req = Request {
        index,
        msg: &msg,
        method,
        input,
        source_ip,
        secret,
        nonce_unique,
    };
    let core = index.is_core(source_ip, input.local);
    // The dialog identifiers are checked before anything else: whether a request
    // is "in dialog" must read the same in the policy and in the proxy. A REGISTER
    // is never inside a dialog (RFC 3261 §10.2): with a To tag it is judged like
    // any other, credentials and all. Nor is a CANCEL, which names no dialog but a
    // transaction (§9.1: the proxy finds the INVITE by its Via, whatever its tags,
    // §9.2): with a To tag it goes where one without goes, to the proxy's check that
    // it comes from where that INVITE came from. As in-dialog, it passed on the
    // sender's own dialog and cancelled the INVITE its Via named, anyone's.
    let in_dialog = match msg.dialog_to_tag() {
        Err(e) => return Ok(malformed(&e).into()),
        Ok(Some(_)) => method != Method::Register && method != Method::Cancel,
        Ok(None) => false,
    };
    // A request that arrived with Max-Forwards 0 goes no further (RFC 3261 §16.3,
    // step 3), whichever side sent it and within a dialog too: the host ends its
    // view of a dialog on the BYE it routes (Kamailio's dialog module does while
    // routing it, before the cfg's own Max-Forwards check answered 483), so a BYE
    // it then did not relay left a call the edge no longer knew, up at both ends.
    // OPTIONS may be answered (§11) and an ACK is never answered. A value the policy
    // cannot read is refused too: Kamailio reads 65536 as 0 (an unsigned short) and
    // refuses a word, after the dialog module acted on the request all the same.
    if !matches!(method, Method::Ack | Method::Options) {
        match msg.max_forwards() {
            Ok(Some(0)) => {
                return Ok(Verdict::reject(483, "Too Many Hops", Cause::TooManyHops).into());
            }
            Err(e) => return Ok(malformed(&e).into()),
            Ok(_) => {}
        }
    }
    if in_dialog {
        return Ok(req.allow_in_dialog(core).into());
    }
    // Messages the policy lets through untouched get the structural parse above
    // (start line, header framing, Content-Length) but not the full header
    // validation: it is the most expensive step, it decides nothing for them, and
    // the proxy's own parser still sees them. Everything the policy judges is
    // validated first.
    if core && method != Method::Invite {
        return Ok(req.allow(Cause::Core).into());
    }
    if !core && passes_untouched(method) {
        return Ok(req.allow(Cause::PassThrough).into());
    }
    if let Err(e) = msg.validate() {
        return Ok(malformed(&e).into());
    }
    if core {
        return req.core_side(store);
    }
    req.access_side(store)
}

/// The 400 of a message that does not parse, or whose header `e` names is unusable.
pub(crate) fn malformed(e: &ParseError) -> Verdict {
    let reason = match e {
        ParseError::Incomplete => "Bad Request (incomplete message)".to_string(),
        other => format!("Bad Request ({other})"),
    };
    Verdict::reject(400, reason, Cause::Malformed)
}

/// Credentials proven: the trunk group, and the nonce they answered (spent whole if
/// the request is refused all the same).
struct Authenticated<'r, 'a> {
    trunk: &'r Trunk,
    nonce: std::borrow::Cow<'a, str>,
}

/// Why `authenticate` did not find a trunk group.
enum Refusal<'r> {
    /// Answer with this (a challenge, a 400).
    Answer(Verdict),
    /// Unknown user, wrong or unusable answer: the 403 every guess gets, counted
    /// against the source (and the trunk group, when the username named one).
    BadCredentials(Option<&'r Trunk>),
    Store(StoreError),
}

impl From<Verdict> for Refusal<'_> {
    fn from(v: Verdict) -> Self {
        Refusal::Answer(v)
    }
}

struct Request<'r, 'a> {
    index: &'r Index,
    msg: &'r Message<'a>,
    method: Method<'a>,
    input: &'r Input<'r>,
    source_ip: IpAddr,
    secret: &'r NonceSecret,
    /// Keeps apart the nonces of challenges issued in one millisecond.
    nonce_unique: u16,
}

/// What a PBX says of itself that the edge never passes on from the access side: its
/// credentials for this edge, the identity it asserts (P-Asserted-Identity,
/// P-Preferred-Identity, or the older Remote-Party-ID) and the number it would have a
/// carrier bill (P-Charge-Info).
const ASSERTED: [&str; 6] = [
    "Authorization",
    "Proxy-Authorization",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "Remote-Party-ID",
    "P-Charge-Info",
];

/// Methods that pass without credentials: keep-alives, and the two that RFC 3261
/// forbids challenging (ACK for a non-2xx is hop-by-hop; CANCEL cannot be challenged
/// and only ends a transaction that was itself judged).
fn passes_untouched(method: Method<'_>) -> bool {
    matches!(method, Method::Options | Method::Ack | Method::Cancel)
}

impl<'r, 'a> Request<'r, 'a> {
    /// An allow for `cause`. Whatever the sender wrote in the trunk-group header or
    /// the binding announcement's headers is removed from every relayed request, so
    /// the carrier can trust the one the edge writes on trunk calls, and the proxy
    /// behind an edge the announcements it makes (docs/envoy.md, "Inbound calls").
    fn allow(&self, cause: Cause) -> Verdict {
        let mut v = Verdict::allow_as(cause);
        // Sized for the longest list (a trunk call's: these, ASSERTED and Route), so
        // the callers' additions never grow it: every relayed request builds one, and
        // growing it took 8 % of an in-dialog BYE's instructions (docs/performance.md).
        v.strip = Vec::with_capacity(1 + self.index.binding_headers.len() + ASSERTED.len() + 1);
        v.strip
            .push(Cow::Owned(self.index.trunk_group_header.clone()));
        v.strip
            .extend(self.index.binding_headers.iter().cloned().map(Cow::Owned));
        v
    }

    /// The binding announcement for T's accepted (un-)REGISTER, as `insert` headers:
    /// what a proxy behind an edge that answers REGISTERs itself needs to route T's
    /// inbound calls as `core_side` would (docs/envoy.md, "Inbound calls"). Hosts
    /// that route inbound calls themselves ignore it (an accept is not relayed).
    /// Every value but the Contact comes from the configuration; the Contact, the
    /// PBX's own text, travels alone in its header.
    fn announce(
        &self,
        trunk: &Trunk,
        expires: u32,
        contact: Option<&str>,
    ) -> Vec<(String, String)> {
        let [binding, contact_header, failover_header] = &self.index.binding_headers;
        let inbound = &self.index.inbound;
        // `ID;expires=N;dids=A,B;no-answer-ms=N;failover-6xx=0|1`, written without
        // core::fmt: every REGISTER announces its binding (src/store.rs, keys).
        let mut digits = itoa::Buffer::new();
        let mut value = String::with_capacity(96 + trunk.id.len());
        value.push_str(&trunk.id);
        value.push_str(";expires=");
        value.push_str(digits.format(expires));
        value.push_str(";dids=");
        let mut first = true;
        for did in trunk
            .dids
            .iter()
            .filter_map(|d| crate::index::normalize_did(d))
        {
            if !first {
                value.push(',');
            }
            first = false;
            value.push_str(&did);
        }
        value.push_str(";no-answer-ms=");
        value.push_str(digits.format(inbound.no_answer_ms));
        value.push_str(";failover-6xx=");
        value.push(if inbound.failover_on_6xx { '1' } else { '0' });
        let mut out = vec![(binding.clone(), value)];
        if let Some(c) = contact {
            out.push((contact_header.clone(), c.to_string()));
        }
        if let Some(f) = &trunk.failover {
            out.push((failover_header.clone(), f.clone()));
        }
        out
    }

    /// A request within a dialog: unauthenticated, so from the access side whatever
    /// it says of who calls or who pays stops here, as on the dialog's INVITE
    /// ([`ASSERTED`]): a PBX inside its own call must not name another caller or
    /// payer to the carrier (an UPDATE or re-INVITE carrying P-Charge-Info). The
    /// core side's requests keep theirs (the carrier's, for the PBX).
    fn allow_in_dialog(&self, core: bool) -> Verdict {
        let mut v = self.allow(Cause::InDialog);
        if !core {
            v.strip.extend(ASSERTED.iter().copied().map(Cow::Borrowed));
        }
        v
    }

    /// An authenticated trunk group's request, as it leaves for the carrier: its
    /// Route set and what [`ASSERTED`] names stop here, and the edge names the trunk
    /// group and asserts the identity.
    fn allow_trunk(&self, trunk: &Trunk) -> Verdict {
        let mut v = self.allow(Cause::Trunk).with_trunk(&trunk.id);
        let (credentials, identity) = ASSERTED.split_at(2);
        v.strip
            .extend(credentials.iter().copied().map(Cow::Borrowed));
        v.strip.push(Cow::Borrowed("Route"));
        v.strip.extend(identity.iter().copied().map(Cow::Borrowed));
        if self.index.asserted_identity {
            // The number comes from the configuration, never the sender's text: the
            // From user only selects which of the trunk group's DIDs is asserted
            // (its parameters, such as cpc= or oli=, are not carried over).
            let caller = self
                .msg
                .from()
                .ok()
                .and_then(|f| f.uri.user)
                .and_then(|u| crate::index::normalize_did(u.split(';').next().unwrap_or(u)));
            let number = caller
                .and_then(|c| {
                    trunk
                        .dids
                        .iter()
                        .find(|d| d.strip_prefix('+').unwrap_or(d) == c)
                })
                .or_else(|| trunk.dids.first())
                .map(String::as_str);
            if let Some(number) = number {
                v.insert.push((
                    "P-Asserted-Identity".to_string(),
                    format!("<sip:{number}@{}>", self.index.realm),
                ));
            }
        }
        v.insert
            .push((self.index.trunk_group_header.clone(), trunk.id.clone()));
        v
    }

    fn core_side(&self, store: &mut dyn Store) -> Result<Decision, StoreError> {
        let user = self
            .msg
            .request_uri()
            .and_then(|u| u.user)
            .unwrap_or_default();
        let Some(trunk) = self.index.trunk_by_did(user) else {
            return Ok(Verdict::reject(404, "Not Found", Cause::UnknownDid).into());
        };
        if let Some(b) = binding::current(store, trunk, self.input.now_ms)? {
            let inbound = &self.index.inbound;
            let has_failover = trunk.failover.is_some();
            return Ok(Verdict {
                action: Action::Route,
                cause: Some(Cause::RegisteredContact),
                target: Some(b.contact.clone()),
                next_hop: Some(b.next_hop()),
                failover: trunk.failover.clone(),
                failover_after_ms: has_failover.then_some(u64::from(inbound.no_answer_ms)),
                failover_on_6xx: has_failover && inbound.failover_on_6xx,
                ..self.allow(Cause::RegisteredContact)
            }
            .with_trunk(&trunk.id)
            .into());
        }
        if let Some(failover) = &trunk.failover {
            return Ok(Verdict {
                action: Action::Route,
                cause: Some(Cause::Failover),
                target: Some(failover.clone()),
                ..self.allow(Cause::Failover)
            }
            .with_trunk(&trunk.id)
            .into());
        }
        Ok(
            Verdict::reject(480, "Temporarily Unavailable", Cause::TrunkUnavailable)
                .with_trunk(&trunk.id)
                .into(),
        )
    }

    fn access_side(&self, store: &mut dyn Store) -> Result<Decision, StoreError> {
        let lockout = self.index.lockout;
        let unit = lockout::source_unit(self.source_ip);
        let slots = self.secret.lockout_slot_key();
        if lockout.is_some() && lockout::banned(store, &unit, slots, self.input.now_ms)? {
            // Refused without a look at its credentials; on the wire, the same 403 as
            // a wrong password.
            return Ok(Verdict::reject(403, "Forbidden", Cause::SourceBanned).into());
        }
        // A REGISTER's shape is judged before its credentials, so that its 400 or
        // 423 answers a wrong password as it answers the right one.
        let registration = if self.method == Method::Register {
            match registration::request(self.msg, &self.index.registration) {
                Ok(r) => Some(r),
                Err(refused) => return Ok((*refused).into()),
            }
        } else {
            None
        };
        let Authenticated { trunk, nonce } = match self.authenticate(store) {
            Ok(authenticated) => authenticated,
            Err(Refusal::Answer(verdict)) => return Ok(verdict.into()),
            Err(Refusal::Store(e)) => return Err(e),
            Err(Refusal::BadCredentials(trunk)) => {
                let verdict = Verdict::reject(403, "Forbidden", Cause::BadCredentials);
                let mut alerts = Vec::new();
                if let Some(limits) = lockout {
                    let now = self.input.now_ms;
                    lockout::source_failed(store, &unit, slots, now, limits)?;
                    if let Some(t) = trunk
                        && lockout::trunk_failed(store, &t.id, &unit, now, limits)?
                        && t.alerts.blocked_calls
                    {
                        alerts.push(self.alert(
                            t,
                            AlertKind::PasswordGuessing,
                            Some(Cause::BadCredentials),
                            None,
                        ));
                    }
                }
                return Ok(Decision { verdict, alerts });
            }
        };
        let decision = match registration {
            Some(request) => match self.guarded_register(trunk, store)? {
                Some(refused) => refused,
                None => self.register(trunk, request, store)?,
            },
            None => self.call(trunk, store)?,
        };
        if decision.verdict.action != Action::Reject {
            return Ok(decision);
        }
        // Right credentials refused all the same (the access list, the registered
        // address): the nonce is spent whole, so that a higher nc on it, whose
        // right answer would otherwise be told apart from a wrong one, gets what a
        // wrong one gets. A store that refuses the write leaves the refusal as it
        // is: it is closed already, and its alert and refusal line still go.
        let _ = self.spend_nonce(store, &nonce);
        // Refused for where it came from, a right password counts like a wrong one:
        // a ban is visible from outside (403 to a bare request instead of a
        // challenge), and if only wrong answers counted, a guesser there could tell
        // from not being banned that one of its guesses was right.
        if let Some(limits) = self.index.lockout
            && self.counts_as_guess(trunk, decision.verdict.cause, store)?
        {
            lockout::source_failed(store, &unit, slots, self.input.now_ms, limits)?;
        }
        Ok(decision)
    }

    /// Whether right credentials refused with `cause` count against their source as
    /// a wrong answer would: from outside the access list; held for guessing (step
    /// 7); a REGISTER refused for where it came from (a query, an un-REGISTER:
    /// `registered_elsewhere`); and, while the trunk group is guarded, a call
    /// refused for not coming from its registered address or for its having none,
    /// from anywhere but the unit of its last registration (not for a trunk group
    /// with an access list, which is never held). Outside a guard a REGISTER that
    /// binds is taken from anywhere, and alerted, so counting refused calls would
    /// hide nothing and only ban a PBX that moved and calls before it registers
    /// again. Never the trunk group's own PBX: it is inside its list, and at its
    /// registration's unit.
    fn counts_as_guess(
        &self,
        trunk: &Trunk,
        cause: Option<Cause>,
        store: &mut dyn Store,
    ) -> Result<bool, StoreError> {
        if !trunk.acl.admits(self.source_ip)
            || cause == Some(Cause::HeldForGuessing)
            || (self.method == Method::Register && cause == Some(Cause::NotRegisteredAddress))
        {
            return Ok(true);
        }
        // A trunk group with an access list is never held (guarded_register): a PBX
        // moving inside its list is its own.
        if !trunk.acl.is_empty()
            || !matches!(
                cause,
                Some(Cause::NotRegisteredAddress | Cause::RegistrationRequired)
            )
            || !lockout::trunk_guarded(store, &trunk.id, self.input.now_ms)?
        {
            return Ok(false);
        }
        Ok(self.registered_elsewhere(trunk, store)?.is_some())
    }

    /// Where T's PBX is (its current binding's `ip:port`, else its last
    /// registration's IP), when the source is outside that address's unit (an IPv4
    /// address, an IPv6 /64: the lockout's unit, src/lockout.rs, so that a PBX
    /// moving inside its /64 is its own); `None` from inside it, and for a trunk
    /// group that never registered (its first registration is taken from anywhere).
    fn registered_elsewhere(
        &self,
        trunk: &Trunk,
        store: &mut dyn Store,
    ) -> Result<Option<String>, StoreError> {
        let (ip, shown) = match binding::current(store, trunk, self.input.now_ms)? {
            Some(b) => (b.ip(), b.source.to_string()),
            None => match binding::last_reg_ip(store, &trunk.id)? {
                Some(ip) => (ip, ip.to_string()),
                None => return Ok(None),
            },
        };
        let elsewhere = lockout::source_unit(ip) != lockout::source_unit(self.source_ip);
        Ok(elsewhere.then_some(shown))
    }

    /// A trunk group whose wrong answers, from more than one source, reached the
    /// lockout's threshold is guarded (src/lockout.rs): guessing spread over more
    /// sources than the per-source count can bound. While it is, a REGISTER with its
    /// right password is taken only from the unit of its last registration, so the
    /// guess that finds the password reads like every other (403, counted against
    /// its source) and moves no binding: its PBX keeps registering and calling from
    /// where it is, and one that moves waits for the attack to stop (docs/policy.md,
    /// "Password guessing"). Not for a trunk group with an access list (a right
    /// password from outside it is refused and counted already, and moves inside it
    /// are its own), nor for one that never registered (no address to hold it to:
    /// its first registration must be able to happen).
    fn guarded_register(
        &self,
        trunk: &Trunk,
        store: &mut dyn Store,
    ) -> Result<Option<Decision>, StoreError> {
        if self.index.lockout.is_none()
            || !trunk.acl.is_empty()
            || !lockout::trunk_guarded(store, &trunk.id, self.input.now_ms)?
        {
            return Ok(None);
        }
        Ok(self
            .registered_elsewhere(trunk, store)?
            .map(|registered| self.refused_registration(trunk, Cause::HeldForGuessing, registered)))
    }

    /// A REGISTER with T's right password refused for where it came from: the 403 of
    /// a wrong password, and (under T's `blocked_calls` switch) a
    /// `blocked_registration` alert naming `registered`, where T's PBX is.
    fn refused_registration(&self, trunk: &Trunk, cause: Cause, registered: String) -> Decision {
        let verdict = Verdict::reject(403, "Forbidden", cause).with_trunk(&trunk.id);
        let mut alerts = Vec::new();
        if trunk.alerts.blocked_calls {
            let mut a = self.alert(trunk, AlertKind::BlockedRegistration, Some(cause), None);
            a.registered = Some(registered);
            alerts.push(a);
        }
        Decision { verdict, alerts }
    }

    /// RFC 3261 §22: REGISTER is authenticated by the registrar (401), everything else
    /// by the proxy (407).
    fn challenge(&self, stale: bool) -> Verdict {
        self.challenge_for(if stale {
            Cause::StaleNonce
        } else {
            Cause::AuthRequired
        })
    }

    /// A challenge; every cause but `AuthRequired` marks the nonce stale, so the PBX
    /// retries on a fresh one without asking anyone for a password.
    fn challenge_for(&self, cause: Cause) -> Verdict {
        let stale = cause != Cause::AuthRequired;
        let nonce = digest::make_nonce(
            self.secret,
            self.input.now_ms,
            self.nonce_unique,
            self.source_ip,
            &self.index.realm,
        );
        let (code, reason, header) = if self.method == Method::Register {
            (401, "Unauthorized", "WWW-Authenticate")
        } else {
            (407, "Proxy Authentication Required", "Proxy-Authenticate")
        };
        let mut v = Verdict {
            action: Action::Challenge,
            code: Some(code),
            reason: Some(reason.into()),
            cause: Some(cause),
            ..Verdict::allow()
        };
        for value in
            digest::challenge_values(&self.index.realm, &nonce, stale, self.index.algorithms())
        {
            v = v.with_header(header, value);
        }
        v
    }

    /// Finds the trunk group whose credentials the request proves, or the verdict
    /// that answers it (challenge, 403, 400). The large error is the common case on
    /// this path, not an exceptional one, so it is not boxed.
    #[allow(clippy::result_large_err)]
    fn authenticate(&self, store: &mut dyn Store) -> Result<Authenticated<'r, 'a>, Refusal<'r>> {
        // PBXs answer a 407 with Proxy-Authorization and a 401 with Authorization,
        // and some send either: take the first credentials for our realm from both.
        let preferred = if self.method == Method::Register {
            [AuthHeader::Authorization, AuthHeader::ProxyAuthorization]
        } else {
            [AuthHeader::ProxyAuthorization, AuthHeader::Authorization]
        };
        let mut found = None;
        for kind in preferred {
            for creds in self.msg.credentials(kind) {
                let creds = creds.map_err(|e| Refusal::Answer(malformed(&e)))?;
                if creds.realm == self.index.realm {
                    found = Some(creds);
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        let Some(creds) = found else {
            return Err(self.challenge(false).into());
        };
        // RFC 7616 §3.4.6: the digest covers `uri`, so credentials computed for one
        // Request-URI must not carry a request to another (a captured answer
        // replayed towards a premium number). Judged before the password, so the
        // answer says nothing about it.
        let ruri = self.msg.request_uri().map_or("", |u| u.raw);
        if creds.uri != ruri {
            return Err(Verdict::reject(
                400,
                "Bad Request (digest uri does not match the Request-URI)",
                Cause::Malformed,
            )
            .into());
        }
        // The nonce first: only an answer on a nonce this edge sent to this address
        // proves that the source receives our packets. Anything before that could
        // come from a spoofed UDP source, and counting it as a failed guess would
        // let a spoofer get a PBX's own address banned.
        let nonce_state = digest::check_nonce(
            self.secret,
            &creds.nonce,
            self.input.now_ms,
            self.source_ip,
            &self.index.realm,
            self.index.nonce_ttl_ms,
        );
        if nonce_state == NonceState::Invalid {
            // Not a nonce we issued to this address (another IP, a restart with a
            // new secret, a forgery): ask again rather than judge the password.
            return Err(self.challenge(false).into());
        }
        // An expired nonce proves nothing about the source today: one captured
        // any time since the secret was made (a trace, a pcap) would let a spoofer
        // have the PBX's own address banned. Asked again (RFC 7616 §3.3, stale=true)
        // without a look at the password, so a right and a wrong answer read alike.
        if nonce_state == NonceState::Stale {
            return Err(self.challenge(true).into());
        }
        // Unknown user, unknown algorithm and wrong response all get this same answer,
        // so the 403 tells a scanner nothing about which usernames exist.
        let forbidden =
            |store: &mut dyn Store, trunk| self.wrong_answer(store, &creds.nonce, trunk);
        let Some(algorithm) = Algorithm::from_param(creds.algorithm) else {
            return Err(forbidden(store, None));
        };
        // RFC 2069 answers (no qop) carry no nc to tell a replay from a reuse.
        if creds.qop.is_none() && !self.index.allow_rfc2069 {
            return Err(forbidden(store, None));
        }
        // Without qop the response does not cover nc (RFC 2617 §3.2.2): whatever nc
        // such an answer carries, it counts as the first, so it is accepted once.
        let nc = if creds.qop.is_none() {
            Some(1)
        } else {
            crate::replay::nc_value(creds.nc)
        };
        let Some(nc) = nc else {
            return Err(forbidden(store, None));
        };
        let Some(trunk) = self.index.trunk_by_username(&creds.username) else {
            return Err(forbidden(store, None));
        };
        if !trunk.algorithms.contains(&algorithm) {
            return Err(forbidden(store, Some(trunk)));
        }
        let response = digest::Response {
            username: &creds.username,
            uri: &creds.uri,
            nonce: &creds.nonce,
            response: &creds.response,
            algorithm,
            qop: creds.qop,
            nc: creds.nc,
            cnonce: creds.cnonce.as_deref(),
        };
        if !digest::verify(&trunk.ha1, self.method.as_str(), &response) {
            return Err(forbidden(store, Some(trunk)));
        }
        // A correct answer is accepted once per (nonce, nc): a captured one replayed
        // (from the same IP's other port, a NAT neighbour, a spoofed UDP source) is
        // asked to authenticate afresh, which it cannot.
        let claim = crate::replay::claim(
            store,
            self.index.replay_slots,
            &creds.nonce,
            digest::nonce_issued_ms(&creds.nonce).unwrap_or(0),
            nc,
            self.input.now_ms,
            self.replay_ttl_ms(),
        )
        .map_err(Refusal::Store)?;
        if claim != crate::replay::Claim::Fresh {
            return Err(self.challenge_for(Cause::ReplayedNonce).into());
        }
        Ok(Authenticated {
            trunk,
            nonce: creds.nonce,
        })
    }

    /// How long the replay set keeps a record: past the nonce's life by the clock
    /// skew a nonce is allowed, and a minute more, so a worker whose clock runs late
    /// never finds a record gone that a worker running early has already dropped.
    fn replay_ttl_ms(&self) -> u64 {
        self.index
            .nonce_ttl_ms
            .saturating_add(digest::FUTURE_SKEW_MS + 60_000)
    }

    /// An answer on a live nonce that let nothing through spends the whole nonce
    /// (src/replay.rs, `spend`). Only its first such answer is a guess to count (the
    /// 403): every later one, and a wrong answer on a nonce the PBX already used,
    /// gets the `stale=true` challenge a replayed right answer gets. So a nonce
    /// captured off the wire earns a spoofer at most one counted failure against the
    /// PBX's address, and resending an answer refused by the access list tells a
    /// guesser nothing about whether its password was right.
    fn wrong_answer(
        &self,
        store: &mut dyn Store,
        nonce: &str,
        trunk: Option<&'r Trunk>,
    ) -> Refusal<'r> {
        match self.spend_nonce(store, nonce) {
            Ok(crate::replay::Claim::Fresh) => Refusal::BadCredentials(trunk),
            Ok(_) => self.challenge_for(Cause::ReplayedNonce).into(),
            Err(e) => Refusal::Store(e),
        }
    }

    fn spend_nonce(
        &self,
        store: &mut dyn Store,
        nonce: &str,
    ) -> Result<crate::replay::Claim, StoreError> {
        crate::replay::spend(
            store,
            self.index.replay_slots,
            nonce,
            digest::nonce_issued_ms(nonce).unwrap_or(0),
            self.input.now_ms,
            self.replay_ttl_ms(),
        )
    }

    fn register(
        &self,
        trunk: &Trunk,
        request: Registration<'_>,
        store: &mut dyn Store,
    ) -> Result<Decision, StoreError> {
        let now = self.input.now_ms;
        if !trunk.acl.admits(self.source_ip) {
            // Every refusal of a request with good credentials reads like a wrong
            // password on the wire: the cause is for logs and alerts, never a hint
            // to a guesser that the password was right.
            let verdict =
                Verdict::reject(403, "Forbidden", Cause::NotInAccessList).with_trunk(&trunk.id);
            let alerts = if trunk.alerts.blocked_calls {
                vec![self.alert(
                    trunk,
                    AlertKind::BlockedRegistration,
                    Some(Cause::NotInAccessList),
                    None,
                )]
            } else {
                Vec::new()
            };
            return Ok(Decision { verdict, alerts });
        }
        let (contact, expires) = match request {
            Registration::Bind { contact, expires } => (contact, expires),
            Registration::Query => return self.query(trunk, store),
            Registration::Remove => return self.unregister(trunk, store),
        };
        let b = Binding {
            source: self.input.source,
            transport: self.input.transport.as_str().to_string(),
            contact: contact.to_string(),
            expires_at_ms: now.saturating_add(u64::from(expires) * 1000),
            registered_at_ms: now,
            call_id: self.msg.call_id().unwrap_or_default().to_string(),
        };
        // Two writes, one decision: a new binding and, from a new IP, the last
        // registration IP that raises `reg_ip_change`. If the second fails, the first
        // is undone, so a store failure never moves the call lock without the alert
        // (the PBX's retry then does both).
        let previous = binding::last_reg_ip(store, &trunk.id)?;
        let binding_key = crate::store::keys::binding(&trunk.id);
        let before = store.get(&binding_key)?;
        binding::save(store, &trunk.id, &b)?;
        let mut alerts = Vec::new();
        if previous != Some(self.source_ip) {
            if let Err(e) = binding::set_last_reg_ip(store, &trunk.id, self.source_ip) {
                // Best effort: a store that refuses this too is down, and every
                // later message fails closed until it is back.
                let _ = match before {
                    Some(raw) => store.set(&binding_key, &raw),
                    None => store.delete(&binding_key),
                };
                return Err(e);
            }
            if let (Some(old), true) = (previous, trunk.alerts.reg_ip_change) {
                alerts.push(self.alert(trunk, AlertKind::RegIpChange, None, Some(old)));
            }
        }
        let header = [
            "<",
            b.contact.as_str(),
            ">;expires=",
            itoa::Buffer::new().format(expires),
        ]
        .concat();
        let mut d = accepted(trunk, Cause::Registered, Some(header));
        d.verdict.insert = self.announce(trunk, expires, Some(&b.contact));
        d.alerts = alerts;
        Ok(d)
    }

    /// A REGISTER that moves no binding here (a query, an un-REGISTER) from outside
    /// the unit of where T's PBX is (`registered_elsewhere`): its 200 would confirm
    /// the password silently, where a REGISTER that binds is alerted
    /// (`reg_ip_change`), and an un-REGISTER would take a registered trunk down
    /// (on a peer-to-peer trunk, lift "only the registered address may call").
    /// Refused and alerted instead, and counted as a guess (`counts_as_guess`).
    fn refused_elsewhere(
        &self,
        trunk: &Trunk,
        store: &mut dyn Store,
    ) -> Result<Option<Decision>, StoreError> {
        Ok(self.registered_elsewhere(trunk, store)?.map(|registered| {
            self.refused_registration(trunk, Cause::NotRegisteredAddress, registered)
        }))
    }

    /// A REGISTER without Contact asks for the current bindings (RFC 3261 §10.3
    /// step 6): listed only to the binding's own address, the one place its Contact
    /// is no news.
    fn query(&self, trunk: &Trunk, store: &mut dyn Store) -> Result<Decision, StoreError> {
        if let Some(refused) = self.refused_elsewhere(trunk, store)? {
            return Ok(refused);
        }
        let now = self.input.now_ms;
        let current = binding::current(store, trunk, now)?.filter(|b| b.ip() == self.source_ip);
        let header = current
            .as_ref()
            .map(|b| format!("<{}>;expires={}", b.contact, b.remaining_s(now)));
        Ok(accepted(trunk, Cause::Registered, header))
    }

    /// Removes T's binding (a trunk group has one, so whichever Contact the
    /// un-REGISTER names), for its own PBX only.
    fn unregister(&self, trunk: &Trunk, store: &mut dyn Store) -> Result<Decision, StoreError> {
        if let Some(refused) = self.refused_elsewhere(trunk, store)? {
            return Ok(refused);
        }
        binding::remove(store, &trunk.id)?;
        let mut d = accepted(trunk, Cause::Unregistered, None);
        d.verdict.insert = self.announce(trunk, 0, None);
        Ok(d)
    }

    fn call(&self, trunk: &Trunk, store: &mut dyn Store) -> Result<Decision, StoreError> {
        let current = binding::current(store, trunk, self.input.now_ms)?;
        let blocked = match &current {
            // "In all cases, when a trunk has a registration, only calls from that
            // registered address are allowed to pass."
            Some(b) if b.ip() != self.source_ip => Some(Cause::NotRegisteredAddress),
            None if trunk.require_registration => Some(Cause::RegistrationRequired),
            _ if !trunk.acl.admits(self.source_ip) => Some(Cause::NotInAccessList),
            _ => None,
        };
        let Some(cause) = blocked else {
            return Ok(self.allow_trunk(trunk).into());
        };
        // The same status line as a wrong password (see register).
        let verdict = Verdict::reject(403, "Forbidden", cause).with_trunk(&trunk.id);
        let mut alerts = Vec::new();
        if trunk.alerts.blocked_calls {
            let mut a = self.alert(trunk, AlertKind::BlockedCall, Some(cause), None);
            a.registered = current.map(|b| b.source.to_string());
            alerts.push(a);
        }
        Ok(Decision { verdict, alerts })
    }

    fn alert(
        &self,
        trunk: &Trunk,
        kind: AlertKind,
        cause: Option<Cause>,
        old_ip: Option<IpAddr>,
    ) -> Alert {
        let location = self.index.location_of(trunk);
        let now = self.input.now_ms;
        // Sender-written text: bounded, so alerts cannot fill the host's memory.
        let header = |name: Result<sip::NameAddr<'_>, ParseError>| {
            name.ok().map(|n| crate::alert::bounded_text(n.raw))
        };
        Alert {
            id: String::new(),
            kind,
            location: location.map(|l| l.id.clone()).unwrap_or_default(),
            trunk_group: trunk.id.clone(),
            recipients: location.map(|l| l.contacts.clone()).unwrap_or_default(),
            at_ms: now,
            time: rfc3339(now),
            cause,
            description: cause.map(|c| c.describe().to_string()),
            source: Some(self.input.source.to_string()),
            registered: None,
            acl: if cause == Some(Cause::NotInAccessList) {
                trunk.acl.entries().iter().map(|n| n.to_string()).collect()
            } else {
                Vec::new()
            },
            old_ip: old_ip.map(|ip| ip.to_string()),
            new_ip: old_ip.map(|_| self.source_ip.to_string()),
            method: Some(self.method.as_str().to_string()),
            call_id: self.msg.call_id().map(crate::alert::bounded_text),
            from: header(self.msg.from()),
            to: header(self.msg.to()),
            count: 1,
            summary: false,
            first_ms: None,
            last_ms: None,
        }
    }
}

fn accepted(trunk: &Trunk, cause: Cause, contact: Option<String>) -> Decision {
    let mut v = Verdict {
        action: Action::Accept,
        code: Some(200),
        reason: Some("OK".into()),
        cause: Some(cause),
        ..Verdict::allow()
    }
    .with_trunk(&trunk.id);
    if let Some(c) = contact {
        v = v.with_header("Contact", c);
    }
    v.into()
}
