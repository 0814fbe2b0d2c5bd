//! Forwarding events to webhooks (chat, ticketing).

use std::time::Duration;

use super::Failure;
use super::mail::Rendered;

#[derive(Clone)]
pub struct Forwarder {
    agent: ureq::Agent,
}

impl Forwarder {
    pub fn new(timeout: Duration) -> Forwarder {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // Statuses are classified below, not turned into errors.
            .http_status_as_error(false)
            // A POST that is redirected is a misconfigured URL; say so instead of
            // following it somewhere unexpected.
            .max_redirects(0)
            .user_agent(concat!(
                "trunkguard-alert-relay/",
                env!("CARGO_PKG_VERSION")
            ))
            .build();
        Forwarder {
            agent: config.into(),
        }
    }

    /// POSTs the event as posted by the host, plus `text` (subject and body of the
    /// e-mail) so chat systems that show a `text` field (Slack, Mattermost,
    /// Rocket.Chat incoming webhooks) have something to show.
    pub fn send(
        &self,
        url: &str,
        id: &str,
        event: &serde_json::Value,
        rendered: &Rendered,
    ) -> Result<(), Failure> {
        let body = payload(event, rendered);
        let answer = self
            .agent
            .post(url)
            .header("Content-Type", "application/json")
            // Receivers that deduplicate can use it; it is the event id.
            .header("Idempotency-Key", id)
            .send(body.as_bytes());
        match answer {
            Ok(response) => classify(response.status().as_u16()),
            Err(e) => Err(Failure::Down(e.to_string())),
        }
    }
}

pub fn payload(event: &serde_json::Value, rendered: &Rendered) -> String {
    let mut body = event.clone();
    if let Some(obj) = body.as_object_mut() {
        obj.insert(
            "text".into(),
            serde_json::Value::String(format!("{}\n\n{}", rendered.subject, rendered.body)),
        );
    }
    body.to_string()
}

fn classify(status: u16) -> Result<(), Failure> {
    match status {
        200..=299 => Ok(()),
        // Overloaded or down: the receiver as a whole, not this event.
        408 | 429 | 500..=599 => Err(Failure::Down(format!("HTTP {status}"))),
        _ => Err(Failure::Reject(format!("HTTP {status}"))),
    }
}

/// A webhook with the name it has in logs, target keys and `/v1/health` (the URL
/// often carries a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub name: String,
    pub url: String,
}

/// One webhook as a delivery channel: every event, as posted, plus its text.
pub struct WebhookChannel {
    name: String,
    hook: Webhook,
    forwarder: Forwarder,
}

impl WebhookChannel {
    pub fn new(hook: Webhook, forwarder: Forwarder) -> WebhookChannel {
        WebhookChannel {
            name: format!("webhook:{}", hook.name),
            hook,
            forwarder,
        }
    }
}

impl crate::channel::Channel for WebhookChannel {
    fn name(&self) -> &str {
        &self.name
    }

    fn targets(&self, _event: &serde_json::Value) -> Vec<(String, String)> {
        vec![(self.name.clone(), self.hook.url.clone())]
    }

    fn send(
        &self,
        id: &str,
        target: &str,
        event: &serde_json::Value,
        _alert: &trunkguard::alert::Alert,
        rendered: &Rendered,
    ) -> Result<(), Failure> {
        self.forwarder.send(target, id, event, rendered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (200, "ok"),
            (202, "ok"),
            (204, "ok"),
            (301, "reject"),
            (400, "reject"),
            (401, "reject"),
            (404, "reject"),
            (408, "down"),
            (429, "down"),
            (500, "down"),
            (503, "down"),
        ];
        for (status, want) in cases {
            let got = match classify(status) {
                Ok(()) => "ok",
                Err(Failure::Down(_)) => "down",
                Err(Failure::Retry(_)) => "retry",
                Err(Failure::Reject(_)) => "reject",
            };
            assert_eq!(got, want, "{status}");
        }
    }

    #[test]
    fn payload_is_the_event_plus_text() {
        let event = serde_json::json!({"id": "a", "trunk_group": "hq-pbx1"});
        let r = Rendered {
            subject: "S".into(),
            body: "B\n".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&payload(&event, &r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "a", "trunk_group": "hq-pbx1", "text": "S\n\nB\n"})
        );
    }
}
