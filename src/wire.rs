//! The message ABI's wire types (docs/abi.md), defined once for both sides of it: the
//! guest front (`abi`, inside the `.wasm`) writes them and the hosts (the wasmtime
//! host in crates/host, and through it Kamailio's module and extension and
//! the CLI) read them, as proxy-wasm's `types.rs` serves both sides of its hostcalls.
//! The verdict itself is [`Verdict`]: its causes are part of the ABI version, so a
//! module with a cause its host does not know is refused (no verdict: fail closed).

use serde::{Deserialize, Serialize};

use crate::sip::Transport;

pub mod binary;
use crate::verdict::Verdict;

/// 3: `tg_judge` answers a binary verdict record ([`binary`]) instead of JSON.
/// (2: `tg_judge` takes the receiving socket too, core trust; docs/abi.md.)
pub const ABI_VERSION: u32 = 3;

/// The transport code `tg_judge` takes.
pub fn transport_code(t: Transport) -> u32 {
    match t {
        Transport::Udp => 0,
        Transport::Tcp => 1,
        Transport::Tls => 2,
        Transport::Ws => 3,
        Transport::Wss => 4,
        Transport::Sctp => 5,
    }
}

/// The transport of a `tg_judge` code; `None` for a code no version defines.
pub fn transport_of_code(code: u32) -> Option<Transport> {
    Transport::ALL
        .into_iter()
        .find(|t| transport_code(*t) == code)
}

/// What `tg_configure` answers: the generation in force, and for a refused
/// configuration where and why (the previous one stays in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configured {
    pub ok: bool,
    #[serde(default)]
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Configured {
    /// The host's reading: the generation, or the refusal.
    pub fn outcome(self) -> Result<u64, ConfigRefused> {
        if self.ok {
            Ok(self.generation)
        } else {
            Err(ConfigRefused {
                path: self.path.unwrap_or_default(),
                reason: self.reason.unwrap_or_default(),
            })
        }
    }
}

/// A refused configuration push, as hosts report it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigRefused {
    pub path: String,
    pub reason: String,
}

/// A judged message as a JSON line (`trunkguard replay`'s output, README): a
/// verdict, or why there is none (the message is then refused). `V` is `&Verdict`
/// where it is written, [`Verdict`] where it is read. `tg_judge` itself answers the
/// same in bytes ([`binary`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Judgement<V = Verdict> {
    // No `default` here: serde reads a missing Option as None without asking V.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<V>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `tg_tick` answers: how many alert windows closed, or an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ticked {
    #[serde(default)]
    pub summaries: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::{Action, Cause};

    #[test]
    fn transport_codes_round_trip_and_unknown_codes_are_none() {
        for t in Transport::ALL {
            assert_eq!(transport_of_code(transport_code(t)), Some(t));
        }
        assert_eq!(transport_of_code(6), None);
    }

    #[test]
    fn a_verdict_reads_back_as_the_guest_wrote_it() {
        let mut v = Verdict::reject(403, "Forbidden", Cause::NotRegisteredAddress)
            .with_header("Warning", "399 edge \"x\"");
        v.strip.push("Route".into());
        v.insert.push(("X-A".into(), "1".into()));
        v.failover_on_6xx = true;
        let written = serde_json::to_string(&Judgement {
            verdict: Some(&v),
            error: None,
        })
        .unwrap();
        let read: Judgement = serde_json::from_str(&written).unwrap();
        assert_eq!(read.verdict, Some(v));
        let bare: Judgement = serde_json::from_str(r#"{"verdict":{"action":"allow"}}"#).unwrap();
        assert_eq!(bare.verdict.map(|v| v.action), Some(Action::Allow));
    }

    #[test]
    fn a_cause_this_side_does_not_know_is_no_verdict() {
        let read = serde_json::from_str::<Judgement>(
            r#"{"verdict":{"action":"allow","cause":"from_the_future"}}"#,
        );
        assert!(read.is_err());
    }

    /// The TypeScript types of the wasm-bindgen front (crates/js/src/verdict.d.ts) name every
    /// action, cause and verdict field there is.
    #[test]
    fn the_typescript_verdict_matches_the_rust_one() {
        let ts = include_str!("../crates/js/src/verdict.d.ts");
        for a in Action::ALL {
            assert!(ts.contains(&format!("\"{}\"", a.as_str())), "action {a:?}");
        }
        for c in Cause::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
            assert!(ts.contains(&format!("| \"{}\"", c.as_str())), "cause {c:?}");
        }
        let union = ts.matches("\n  | \"").count();
        assert_eq!(
            union,
            Cause::ALL.len(),
            "a cause in the types that Rust lacks"
        );
        let mut full = Verdict::reject(500, "x", Cause::Failover).with_header("a", "b");
        full.trunk_group = Some("g".into());
        full.target = Some("t".into());
        full.next_hop = Some("n".into());
        full.failover = Some("f".into());
        full.failover_after_ms = Some(1);
        full.failover_on_6xx = true;
        full.strip.push("s".into());
        full.insert.push(("i".into(), "j".into()));
        let serde_json::Value::Object(fields) = serde_json::to_value(&full).unwrap() else {
            unreachable!("a verdict is an object")
        };
        for name in fields.keys() {
            assert!(
                ts.contains(&format!(" {name}?:")) || ts.contains(&format!(" {name}:")),
                "field {name} is missing from verdict.d.ts"
            );
        }
    }

    #[test]
    fn a_refusal_reads_as_path_and_reason() {
        let c: Configured =
            serde_json::from_str(r#"{"ok":false,"path":"realm","reason":"empty","generation":3}"#)
                .unwrap();
        assert_eq!(
            c.outcome(),
            Err(ConfigRefused {
                path: "realm".into(),
                reason: "empty".into()
            })
        );
    }
}
