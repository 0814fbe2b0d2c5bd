//! The on-disk queue: an event is on disk before the relay answers 202, and it leaves
//! `pending/` only once every delivery of it has succeeded or been refused for good.
//!
//! ```text
//! QUEUE/lock            held (flock) by the one relay using QUEUE; holds its pid
//! QUEUE/tmp/            half-written files; emptied at start
//! QUEUE/pending/ID.json accepted, not yet delivered everywhere
//! QUEUE/sent/ID.json    delivered everywhere; kept for --keep (duplicate detection)
//! QUEUE/failed/ID.json  some delivery was refused for good; kept until an operator
//!                       moves it back into pending/ (and restarts) or deletes it
//! ```
//!
//! Every file appears by `rename` from `tmp/` after an fsync, and the directory is
//! fsynced after, so a crash at any point leaves either the old or the new file.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("queue directory {0} is in use by another relay (see its lock file)")]
    Locked(PathBuf),
    #[error("the queue is full ({0} events pending)")]
    Full(usize),
    #[error("cannot encode the queue record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the queue lock is poisoned")]
    Poisoned,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One accepted event and how far its deliveries got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub received_ms: u64,
    /// The event exactly as the host posted it (webhooks get it verbatim).
    pub event: serde_json::Value,
    /// Targets (`mail:ADDRESS`, `webhook:URL`) delivered to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<String>,
    /// Targets that refused the event for good, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub given_up: Vec<GivenUp>,
    /// Targets that failed and wait for their next attempt.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retry: BTreeMap<String, Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GivenUp {
    pub target: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    pub attempts: u32,
    pub next_ms: u64,
    pub last_error: String,
}

impl Record {
    pub fn settled(&self, target: &str) -> bool {
        self.done.iter().any(|t| t == target) || self.given_up.iter().any(|g| g.target == target)
    }
}

/// Where a record goes after an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Pending,
    Sent,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    Duplicate,
}

/// What start-up found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub pending: usize,
    /// Unreadable files in pending/, moved to failed/ as `ID.json.corrupt`.
    pub corrupt: Vec<String>,
    /// Records found both in pending/ and in sent/ or failed/: a crash hit between
    /// the two steps of finishing; the finished copy wins.
    pub already_finished: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pending: usize,
    pub failed: usize,
}

struct State {
    /// In arrival order (`received_ms`, then id, at start; then as they come).
    records: BTreeMap<u64, Record>,
    by_id: HashMap<String, u64>,
    next_seq: u64,
    /// Bumped by every enqueue, so the delivery thread never sleeps through one.
    generation: u64,
    failed: usize,
}

pub struct Queue {
    dir: PathBuf,
    max_pending: usize,
    state: Mutex<State>,
    wake: Condvar,
    /// Held for the life of the queue: two relays on one directory would send twice.
    _lock: File,
}

const PENDING: &str = "pending";
const SENT: &str = "sent";
const FAILED: &str = "failed";
const TMP: &str = "tmp";

impl Queue {
    pub fn open(dir: &Path, max_pending: usize) -> Result<(Queue, Recovered), QueueError> {
        for sub in [PENDING, SENT, FAILED, TMP] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let lock_path = dir.join("lock");
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(QueueError::Locked(dir.into())),
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        lock.set_len(0).map_err(io(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;

        let tmp = dir.join(TMP);
        for entry in fs::read_dir(&tmp).map_err(io(&tmp))? {
            let path = entry.map_err(io(&tmp))?.path();
            fs::remove_file(&path).map_err(io(&path))?;
        }

        let mut recovered = Recovered::default();
        let mut loaded = Vec::new();
        let pending = dir.join(PENDING);
        for entry in fs::read_dir(&pending).map_err(io(&pending))? {
            let path = entry.map_err(io(&pending))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if [SENT, FAILED]
                .iter()
                .any(|d| dir.join(d).join(&name).exists())
            {
                fs::remove_file(&path).map_err(io(&path))?;
                recovered.already_finished += 1;
                continue;
            }
            let parsed = fs::read(&path)
                .ok()
                .and_then(|raw| serde_json::from_slice::<Record>(&raw).ok())
                .filter(|r| r.id == id);
            match parsed {
                Some(mut record) => {
                    // A refusal is final only for the run that saw it: a record an
                    // operator moved back from failed/ is tried again everywhere it
                    // was not delivered.
                    record.given_up.clear();
                    record.retry.clear();
                    loaded.push(record);
                }
                None => {
                    let to = dir.join(FAILED).join(format!("{name}.corrupt"));
                    fs::rename(&path, &to).map_err(io(&path))?;
                    recovered.corrupt.push(name);
                }
            }
        }
        loaded.sort_by(|a, b| (a.received_ms, &a.id).cmp(&(b.received_ms, &b.id)));
        recovered.pending = loaded.len();

        let failed_dir = dir.join(FAILED);
        let failed = fs::read_dir(&failed_dir)
            .map_err(io(&failed_dir))?
            .filter(|e| e.is_ok())
            .count();
        let mut state = State {
            records: BTreeMap::new(),
            by_id: HashMap::new(),
            next_seq: 0,
            generation: 0,
            failed,
        };
        for record in loaded {
            state.by_id.insert(record.id.clone(), state.next_seq);
            state.records.insert(state.next_seq, record);
            state.next_seq += 1;
        }
        Ok((
            Queue {
                dir: dir.to_path_buf(),
                max_pending,
                state: Mutex::new(state),
                wake: Condvar::new(),
                _lock: lock,
            },
            recovered,
        ))
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, QueueError> {
        self.state.lock().map_err(|_| QueueError::Poisoned)
    }

    /// Stores the event durably, unless its id is pending or was finished within the
    /// retention time. Returns only once the record is on disk.
    pub fn enqueue(
        &self,
        id: &str,
        event: serde_json::Value,
        now_ms: u64,
    ) -> Result<Enqueued, QueueError> {
        // The lock spans the check and the write, so two posts of one id racing each
        // other cannot both be queued.
        let mut state = self.lock()?;
        let name = file_name(id);
        if state.by_id.contains_key(id)
            || [SENT, FAILED]
                .iter()
                .any(|d| self.dir.join(d).join(&name).exists())
        {
            return Ok(Enqueued::Duplicate);
        }
        if state.records.len() >= self.max_pending {
            return Err(QueueError::Full(state.records.len()));
        }
        let record = Record {
            id: id.to_string(),
            received_ms: now_ms,
            event,
            done: Vec::new(),
            given_up: Vec::new(),
            retry: BTreeMap::new(),
            finished_ms: None,
        };
        self.write(PENDING, &record)?;
        let seq = state.next_seq;
        state.next_seq += 1;
        state.by_id.insert(record.id.clone(), seq);
        state.records.insert(seq, record);
        state.generation += 1;
        self.wake.notify_all();
        Ok(Enqueued::Queued)
    }

    /// Visits pending records in arrival order until `f` returns something.
    /// Also returns the generation seen, for [`Queue::wait`].
    pub fn find<T>(
        &self,
        mut f: impl FnMut(&Record) -> Option<T>,
    ) -> Result<(Option<T>, u64), QueueError> {
        let state = self.lock()?;
        let found = state.records.values().find_map(&mut f);
        Ok((found, state.generation))
    }

    /// Applies `f` to the pending record `id`, then stores it where its fate says.
    pub fn update(
        &self,
        id: &str,
        now_ms: u64,
        f: impl FnOnce(&mut Record) -> Fate,
    ) -> Result<Option<Fate>, QueueError> {
        let mut state = self.lock()?;
        let Some(&seq) = state.by_id.get(id) else {
            return Ok(None);
        };
        let Some(record) = state.records.get_mut(&seq) else {
            return Ok(None);
        };
        let mut next = record.clone();
        let fate = f(&mut next);
        match fate {
            Fate::Pending => self.write(PENDING, &next)?,
            Fate::Sent | Fate::Failed => {
                next.finished_ms = Some(now_ms);
                next.retry.clear();
                // The finished copy first: a crash between the two steps leaves both,
                // and start-up then trusts the finished one.
                self.write(if fate == Fate::Sent { SENT } else { FAILED }, &next)?;
                let path = self.dir.join(PENDING).join(file_name(id));
                fs::remove_file(&path).map_err(io(&path))?;
                sync_dir(&self.dir.join(PENDING))?;
            }
        }
        if fate == Fate::Pending {
            *record = next;
        } else {
            state.records.remove(&seq);
            state.by_id.remove(id);
            if fate == Fate::Failed {
                state.failed += 1;
            }
        }
        Ok(Some(fate))
    }

    /// Sleeps until `deadline`, or until an event arrives after generation `seen`.
    pub fn wait(&self, seen: u64, deadline: Instant) -> Result<(), QueueError> {
        let mut state = self.lock()?;
        while state.generation == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .wake
                .wait_timeout(state, left)
                .map_err(|_| QueueError::Poisoned)?
                .0;
        }
        Ok(())
    }

    pub fn counts(&self) -> Result<Counts, QueueError> {
        let state = self.lock()?;
        Ok(Counts {
            pending: state.records.len(),
            failed: state.failed,
        })
    }

    /// Deletes records in sent/ older than `keep`: past it, a re-post of their id is
    /// taken as new. failed/ is left to the operator.
    pub fn prune(&self, keep: Duration) -> Result<usize, QueueError> {
        let _state = self.lock()?;
        let dir = self.dir.join(SENT);
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if old {
                fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes `record` into `sub/` durably: tmp file, fsync, rename, fsync directory.
    fn write(&self, sub: &str, record: &Record) -> Result<(), QueueError> {
        let name = file_name(&record.id);
        let tmp = self.dir.join(TMP).join(&name);
        let bytes = serde_json::to_vec_pretty(record)?;
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        let dest_dir = self.dir.join(sub);
        fs::rename(&tmp, dest_dir.join(&name)).map_err(io(&tmp))?;
        sync_dir(&dest_dir)
    }
}

fn file_name(id: &str) -> String {
    // Ids are checked on input ([A-Za-z0-9_.-], no leading dot), so they are safe
    // file names as they are, and an operator finds an event by its id.
    format!("{id}.json")
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "trunkguard-queue-{name}-{}-{:?}",
                std::process::id(),
                Instant::now()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn event(id: &str) -> serde_json::Value {
        json!({"id": id, "recipients": ["noc@example.com"]})
    }

    fn files(dir: &Path, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_event_is_on_disk_when_enqueue_returns() {
        let tmp = TempDir::new("write");
        let (q, _) = Queue::open(&tmp.0, 10).unwrap();
        assert_eq!(q.enqueue("a-1", event("a-1"), 5).unwrap(), Enqueued::Queued);
        let raw = fs::read(tmp.0.join("pending/a-1.json")).unwrap();
        let record: Record = serde_json::from_slice(&raw).unwrap();
        assert_eq!(record.event, event("a-1"));
        assert_eq!(record.received_ms, 5);
        assert!(files(&tmp.0, "tmp").is_empty());
    }

    #[test]
    fn duplicates_are_recognised_while_pending_after_sending_and_after_failing() {
        let tmp = TempDir::new("dup");
        let (q, _) = Queue::open(&tmp.0, 10).unwrap();
        // (id, what its first delivery round ends in)
        let cases = [("p", Fate::Pending), ("s", Fate::Sent), ("f", Fate::Failed)];
        for (id, fate) in cases {
            assert_eq!(q.enqueue(id, event(id), 1).unwrap(), Enqueued::Queued);
            assert_eq!(q.update(id, 2, |_| fate).unwrap(), Some(fate));
            assert_eq!(
                q.enqueue(id, event(id), 3).unwrap(),
                Enqueued::Duplicate,
                "{id}"
            );
        }
        assert_eq!(files(&tmp.0, "pending"), ["p.json"]);
        assert_eq!(files(&tmp.0, "sent"), ["s.json"]);
        assert_eq!(files(&tmp.0, "failed"), ["f.json"]);
        assert_eq!(
            q.counts().unwrap(),
            Counts {
                pending: 1,
                failed: 1
            }
        );
        // Across a restart too.
        drop(q);
        let (q, _) = Queue::open(&tmp.0, 10).unwrap();
        for (id, _) in cases {
            assert_eq!(q.enqueue(id, event(id), 4).unwrap(), Enqueued::Duplicate);
        }
    }

    #[test]
    fn restart_recovers_pending_records_in_order_with_their_progress() {
        let tmp = TempDir::new("restart");
        let (q, _) = Queue::open(&tmp.0, 10).unwrap();
        for (id, at) in [("b", 20), ("a", 10), ("c", 30)] {
            q.enqueue(id, event(id), at).unwrap();
        }
        q.update("a", 40, |r| {
            r.done.push("mail:noc@example.com".into());
            r.given_up.push(GivenUp {
                target: "mail:x@example.com".into(),
                reason: "550".into(),
            });
            Fate::Pending
        })
        .unwrap();
        q.update("c", 40, |_| Fate::Sent).unwrap();
        drop(q);
        // Leftovers of a crash: a half-written file, and a record finished but not
        // yet removed from pending/.
        fs::write(tmp.0.join("tmp/d.json"), b"{\"id\":").unwrap();
        fs::copy(tmp.0.join("sent/c.json"), tmp.0.join("pending/c.json")).unwrap();
        fs::write(tmp.0.join("pending/e.json"), b"not json").unwrap();

        let (q, recovered) = Queue::open(&tmp.0, 10).unwrap();
        assert_eq!(
            recovered,
            Recovered {
                pending: 2,
                corrupt: vec!["e.json".into()],
                already_finished: 1
            }
        );
        let mut order = Vec::new();
        q.find(|r| {
            order.push((r.id.clone(), r.done.clone(), r.given_up.len()));
            None::<()>
        })
        .unwrap();
        assert_eq!(
            order,
            [
                ("a".to_string(), vec!["mail:noc@example.com".to_string()], 0),
                ("b".to_string(), vec![], 0)
            ]
        );
        assert!(files(&tmp.0, "tmp").is_empty());
        assert_eq!(files(&tmp.0, "failed"), ["e.json.corrupt"]);
    }

    #[test]
    fn a_second_relay_cannot_open_the_same_queue() {
        let tmp = TempDir::new("lock");
        let (_q, _) = Queue::open(&tmp.0, 10).unwrap();
        assert!(matches!(
            Queue::open(&tmp.0, 10),
            Err(QueueError::Locked(_))
        ));
    }

    #[test]
    fn a_full_queue_refuses_new_events_but_still_spots_duplicates() {
        let tmp = TempDir::new("full");
        let (q, _) = Queue::open(&tmp.0, 2).unwrap();
        q.enqueue("a", event("a"), 1).unwrap();
        q.enqueue("b", event("b"), 1).unwrap();
        assert!(matches!(
            q.enqueue("c", event("c"), 1),
            Err(QueueError::Full(2))
        ));
        assert_eq!(q.enqueue("a", event("a"), 1).unwrap(), Enqueued::Duplicate);
    }

    #[test]
    fn wait_returns_early_when_an_event_arrives() {
        let tmp = TempDir::new("wait");
        let (q, _) = Queue::open(&tmp.0, 10).unwrap();
        let q = std::sync::Arc::new(q);
        let (_, seen) = q.find(|_| None::<()>).unwrap();
        let q2 = q.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q2.enqueue("a", event("a"), 1).unwrap();
        });
        let start = Instant::now();
        q.wait(seen, start + Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
