//! Checking a posted alert event (the `Alert` of `src/alert.rs`, docs/alerts.md).

use trunkguard::alert::Alert;

/// Longest accepted event id: the module's are ~30 characters.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("not an alert event: {0}")]
    Schema(String),
    #[error(
        "id {0:?} is not usable: 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 _ . -, not starting with '.'"
    )]
    BadId(String),
}

/// A posted event that passed the checks.
#[derive(Debug, Clone)]
pub struct Event {
    pub alert: Alert,
    /// The event as posted: unknown fields from a newer module are kept, so webhooks
    /// see them.
    pub raw: serde_json::Value,
}

pub fn parse(body: &[u8]) -> Result<Event, EventError> {
    let raw: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
    if !raw.is_object() {
        return Err(EventError::Schema("expected a JSON object".into()));
    }
    let alert = alert_of(&raw)?;
    if !id_is_usable(&alert.id) {
        return Err(EventError::BadId(alert.id));
    }
    Ok(Event { alert, raw })
}

pub fn alert_of(raw: &serde_json::Value) -> Result<Alert, EventError> {
    // serde_path_to_error names the offending field (`recipients[1]: invalid type…`),
    // which is what a host developer needs in the 400.
    serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        EventError::Schema(if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        })
    })
}

/// The id becomes a file name and part of the Message-ID, hence the narrow alphabet.
pub fn id_is_usable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Recipients of an event as stored, without a full parse (the delivery loop scans
/// every pending record).
pub fn recipients(raw: &serde_json::Value) -> Vec<String> {
    raw.get("recipients")
        .and_then(|r| r.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"18bcf5a1b7b-0a1b2c3d4e5f","kind":"blocked_call","location":"hq",
        "trunk_group":"hq-pbx1","recipients":["noc@example.com"],"at_ms":1700000000123,
        "time":"2023-11-14T22:13:20.123Z","count":1}"#;

    #[test]
    fn checks_table() {
        let with = |from: &str, to: &str| GOOD.replacen(from, to, 1);
        // (body, the error's words, or None when accepted)
        let cases: Vec<(String, Option<&str>)> = vec![
            (GOOD.into(), None),
            (
                with(r#""count":1"#, r#""count":1,"future_field":true"#),
                None,
            ),
            ("{".into(), Some("body is not JSON: EOF while parsing")),
            ("[1]".into(), Some("expected a JSON object")),
            (
                with(r#""id":"18bcf5a1b7b-0a1b2c3d4e5f","#, ""),
                Some("missing field `id`"),
            ),
            (
                with("blocked_call", "lunch_break"),
                Some("kind: unknown variant `lunch_break`"),
            ),
            (
                with(r#"["noc@example.com"]"#, r#"["noc@example.com", 7]"#),
                Some("recipients[1]: invalid type: integer `7`, expected a string"),
            ),
            (
                with("18bcf5a1b7b-0a1b2c3d4e5f", "../../etc/passwd"),
                Some("is not usable"),
            ),
            (with("18bcf5a1b7b-0a1b2c3d4e5f", ""), Some("is not usable")),
            (
                with("18bcf5a1b7b-0a1b2c3d4e5f", ".hidden"),
                Some("is not usable"),
            ),
            (
                with("18bcf5a1b7b-0a1b2c3d4e5f", &"x".repeat(129)),
                Some("is not usable"),
            ),
        ];
        for (body, want) in cases {
            match (parse(body.as_bytes()), want) {
                (Ok(e), None) => assert_eq!(e.alert.trunk_group, "hq-pbx1"),
                (Err(e), Some(words)) => {
                    assert!(e.to_string().contains(words), "{e} lacks {words:?}")
                }
                (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_are_kept_for_webhooks() {
        let e = parse(
            GOOD.replacen("\"count\":1", "\"count\":1,\"x\":2", 1)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(e.raw["x"], 2);
        assert_eq!(recipients(&e.raw), ["noc@example.com"]);
    }
}
