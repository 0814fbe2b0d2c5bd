//! State a proxy keeps outside itself so that a restart loses nothing: Envoy's
//! shared data (bindings, last registration IPs, secrets, throttles) dies with the
//! process, so its alert singleton writes every change here and reads it all back
//! when Envoy starts (docs/envoy.md, "Upgrade and restart").
//!
//! One JSON file, replaced atomically (written beside, fsynced, renamed, the
//! directory fsynced) on every batch of changes: a crash leaves the old file or the
//! new one, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not a JSON object of strings: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub struct StateFile {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, String>>,
}

impl StateFile {
    /// Opens `path`, empty when it does not exist yet. A file that does not parse is
    /// an error: starting empty would silently drop every binding.
    pub fn open(path: &Path) -> Result<StateFile, StateError> {
        let entries = match std::fs::read(path) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| StateError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(StateFile {
            path: path.to_owned(),
            entries: Mutex::new(entries),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, as stored.
    pub fn snapshot(&self) -> BTreeMap<String, String> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Applies `changes` (`None`: delete) and writes the file before answering:
    /// once this returns `Ok`, the changes survive a crash. On an error nothing of
    /// them is kept in memory either, so memory and disk never disagree.
    pub fn apply(&self, changes: BTreeMap<String, Option<String>>) -> Result<(), StateError> {
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| self.io(std::io::Error::other("state lock poisoned")))?;
        let mut next = entries.clone();
        for (key, value) in changes {
            match value {
                Some(v) => next.insert(key, v),
                None => next.remove(&key),
            };
        }
        self.write(&next)?;
        *entries = next;
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn write(&self, entries: &BTreeMap<String, String>) -> Result<(), StateError> {
        let json = serde_json::to_vec(entries).map_err(|e| self.io(std::io::Error::other(e)))?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Secrets and bindings: for the relay's user only.
            options.mode(0o600);
        }
        let mut f = options.open(&tmp).map_err(|e| self.io(e))?;
        f.write_all(&json).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_a_reopen_and_deletes_remove() {
        let dir = std::env::temp_dir().join(format!("tg-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let s = StateFile::open(&path).unwrap();
        assert!(s.is_empty());
        s.apply(BTreeMap::from([
            ("tg/binding/a".into(), Some("{\"ip\":\"1\"}".into())),
            ("tg/nonce_secret".into(), Some("ab".into())),
        ]))
        .unwrap();
        s.apply(BTreeMap::from([("tg/binding/a".into(), None)]))
            .unwrap();
        let again = StateFile::open(&path).unwrap();
        assert_eq!(
            again.snapshot(),
            BTreeMap::from([("tg/nonce_secret".into(), "ab".into())])
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"not json").unwrap();
        assert!(matches!(
            StateFile::open(&path),
            Err(StateError::Corrupt { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
