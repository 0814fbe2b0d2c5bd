//! The seam between the delivery loop (`deliver`) and the ways an alert leaves the
//! relay: e-mail (`mail::MailChannel`) and webhooks (`forward::WebhookChannel`). A
//! new channel is one file implementing [`Channel`] and one line where `serve` lists
//! the channels (lib.rs).

use trunkguard::alert::Alert;

use crate::Failure;
use crate::mail::Rendered;

/// One way an alert leaves the relay.
pub trait Channel: Send {
    /// The name its state has in `/v1/health` and in the log (`smtp`, `webhook:NAME`).
    /// A channel that is down waits as a whole.
    fn name(&self) -> &str;

    /// Where this channel sends one event (as stored: the delivery loop asks this
    /// of every pending record, so without a full parse): each target's key in the
    /// event's record on disk (the same across restarts: `mail:ADDR`,
    /// `webhook:NAME`) and the target as `send` takes it.
    fn targets(&self, event: &serde_json::Value) -> Vec<(String, String)>;

    /// Delivers the event to one of its targets. `event` is the event as the host
    /// posted it, `rendered` its subject and text.
    fn send(
        &self,
        id: &str,
        target: &str,
        event: &serde_json::Value,
        alert: &Alert,
        rendered: &Rendered,
    ) -> Result<(), Failure>;

    /// One target, for the log ("mail to ADDR"); the channel's name by default.
    fn describe(&self, _target: &str) -> String {
        self.name().to_string()
    }
}
