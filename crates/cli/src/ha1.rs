//! `trunkguard ha1`: the HA1 values of a password, to put in a configuration instead
//! of the password (docs/configuration.md).

use std::process::ExitCode;

pub fn run(username: &str, realm: &str, algorithm: Option<&str>) -> Result<ExitCode, String> {
    use std::io::IsTerminal;
    use trunkguard::digest::{Algorithm, ha1};
    let algorithms = match algorithm {
        None => vec![Algorithm::Md5, Algorithm::Sha256],
        Some(name) => vec![
            Algorithm::from_param(Some(name))
                .ok_or_else(|| format!("unknown algorithm {name:?} (MD5 or SHA-256)"))?,
        ],
    };
    // The challenge quotes both (RFC 7616 §3.3): the configuration refuses these too.
    for (what, value) in [("username", username), ("realm", realm)] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(format!(
                "{what} must be non-empty, without quotes, backslashes or control characters"
            ));
        }
    }
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("password for {username}@{realm}: "))
            .map_err(|e| format!("cannot read the password: {e}"))?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        return Err("empty password".into());
    }
    let mut out = serde_json::Map::new();
    for a in algorithms {
        let field = match a {
            Algorithm::Md5 => "ha1",
            Algorithm::Sha256 => "ha1_sha256",
        };
        out.insert(field.into(), ha1(a, username, realm, &password).into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(ExitCode::SUCCESS)
}
