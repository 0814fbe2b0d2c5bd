//! Alert delivery from the module's timer process to the relay (`trunkguard alerts
//! serve`, docs/alerts.md): one POST, its status classified by the C side.

use std::time::Duration;

/// What one POST came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Posted {
    /// The relay answered with this status.
    Status(u16),
    /// The relay could not be reached (retry later).
    Unreachable(String),
}

pub fn post_alert(url: &str, token: &str, event: &[u8], timeout: Duration) -> Posted {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        // Statuses are the caller's to classify, not errors.
        .http_status_as_error(false)
        // A POST that is redirected is a misconfigured URL: say so, never follow it.
        .max_redirects(0)
        .user_agent(concat!("trunkguard-kamailio/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent: ureq::Agent = config.into();
    let mut request = agent.post(url).header("Content-Type", "application/json");
    if !token.is_empty() {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    match request.send(event) {
        Ok(response) => Posted::Status(response.status().as_u16()),
        Err(e) => Posted::Unreachable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_relay_is_reported_not_a_status() {
        // Port 9 on loopback: nothing listens (discard service is not run here).
        let out = post_alert(
            "http://127.0.0.1:9/v1/alerts",
            "",
            b"{}",
            Duration::from_millis(500),
        );
        assert!(matches!(out, Posted::Unreachable(_)), "{out:?}");
    }
}
