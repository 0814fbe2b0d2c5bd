//! `tg_judge`'s answer as bytes (docs/abi.md, "The verdict record"): written by the
//! guest front and read by the wasmtime host, one definition for both. A verdict is
//! on the path of every SIP message, and its JSON form cost both sides a serialiser
//! and a parser per message (docs/performance.md, "Kamailio"); the other results
//! (`tg_configure`, `tg_tick`) are rare and stay JSON.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! kind u8                1: a verdict follows; 2: no verdict, the rest is the
//!                        module's UTF-8 reason (the host refuses the message)
//! action u8              Action::ALL index
//! cause u8               Cause::ALL index, 255: none
//! flags u8               bit 0 code present, bit 1 failover_after_ms present,
//!                        bit 2 failover_on_6xx; other bits 0
//! code u16
//! failover_after_ms u64
//! reason, trunk_group, target, next_hop, failover:
//!                        each a text (u32 length, 0xffff_ffff: absent; UTF-8)
//! headers                u32 count, then count × (name text, value text)
//! strip                  u32 count, then count × text
//! insert                 u32 count, then count × (name text, value text)
//! ```
//!
//! Every byte is accounted for: a record with bytes left over, a bit or code this
//! side does not know, a non-zero `code` or `failover_after_ms` without its flag, or
//! text that is not UTF-8 is no verdict (fail closed), as a cause unknown to the host
//! is under the ABI version (`wire`). So no record reads two ways.

use std::borrow::Cow;

use crate::verdict::{Action, Cause, Verdict};

const KIND_VERDICT: u8 = 1;
const KIND_ERROR: u8 = 2;
const NO_CAUSE: u8 = u8::MAX;
const ABSENT: u32 = u32::MAX;
const HAS_CODE: u8 = 1;
const HAS_FAILOVER_AFTER: u8 = 1 << 1;
const FAILOVER_ON_6XX: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = HAS_CODE | HAS_FAILOVER_AFTER | FAILOVER_ON_6XX;
/// What the writer puts for an action or cause missing from its `ALL` table (a
/// variant added to the enum and not to the table): a number the reader refuses, so
/// the omission fails closed instead of reading as `allow` or `malformed`.
const UNLISTED: u8 = NO_CAUSE - 1;
/// The longest no-verdict reason a host takes; the rest is cut (it goes to logs).
const MAX_REASON: usize = 1024;

/// Why a record is no verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The module answered no verdict, and said why.
    #[error("{0}")]
    NoVerdict(String),
    /// The bytes are not a record of this ABI version.
    #[error("malformed verdict record: {0}")]
    Malformed(&'static str),
}

/// Writes `verdict` into `out` (cleared first).
pub fn write_verdict(out: &mut Vec<u8>, verdict: &Verdict) {
    out.clear();
    let mut flags = 0;
    if verdict.code.is_some() {
        flags |= HAS_CODE;
    }
    if verdict.failover_after_ms.is_some() {
        flags |= HAS_FAILOVER_AFTER;
    }
    if verdict.failover_on_6xx {
        flags |= FAILOVER_ON_6XX;
    }
    out.extend_from_slice(&[
        KIND_VERDICT,
        action_index(verdict.action),
        verdict.cause.map_or(NO_CAUSE, cause_index),
        flags,
    ]);
    out.extend_from_slice(&verdict.code.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&verdict.failover_after_ms.unwrap_or(0).to_le_bytes());
    for text in [
        &verdict.reason,
        &verdict.trunk_group,
        &verdict.target,
        &verdict.next_hop,
        &verdict.failover,
    ] {
        match text {
            Some(t) => put_text(out, t),
            None => out.extend_from_slice(&ABSENT.to_le_bytes()),
        }
    }
    put_pairs(out, &verdict.headers);
    put_count(out, verdict.strip.len());
    for name in &verdict.strip {
        put_text(out, name);
    }
    put_pairs(out, &verdict.insert);
}

/// Writes "no verdict, because `reason`" into `out` (cleared first).
pub fn write_no_verdict(out: &mut Vec<u8>, reason: &str) {
    out.clear();
    out.push(KIND_ERROR);
    out.extend_from_slice(reason.as_bytes());
}

/// Reads a record [`write_verdict`] or [`write_no_verdict`] wrote.
pub fn read(bytes: &[u8]) -> Result<Verdict, ReadError> {
    let (&kind, rest) = bytes.split_first().ok_or(ReadError::Malformed("empty"))?;
    match kind {
        KIND_VERDICT => {
            let mut r = Reader(rest);
            let verdict = r.verdict()?;
            if r.0.is_empty() {
                Ok(verdict)
            } else {
                Err(ReadError::Malformed("bytes after the verdict"))
            }
        }
        KIND_ERROR => {
            let reason =
                std::str::from_utf8(rest).map_err(|_| ReadError::Malformed("text is not UTF-8"))?;
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            Err(ReadError::NoVerdict(reason[..end].to_owned()))
        }
        _ => Err(ReadError::Malformed("unknown kind")),
    }
}

fn action_index(action: Action) -> u8 {
    index_in(&Action::ALL, action)
}

fn cause_index(cause: Cause) -> u8 {
    index_in(&Cause::ALL, cause)
}

/// Position in a table of fewer than 254 entries (the tables above; the tests pin
/// their lengths), so the cast is exact; [`UNLISTED`] for an item not in it.
fn index_in<T: PartialEq + Copy>(all: &[T], item: T) -> u8 {
    all.iter()
        .position(|a| *a == item)
        .map_or(UNLISTED, |i| i as u8)
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(ABSENT - 1).to_le_bytes());
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_count(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
    put_count(out, pairs.len());
    for (name, value) in pairs {
        put_text(out, name);
        put_text(out, value);
    }
}

struct Reader<'a>(&'a [u8]);

/// Items reserved ahead in a list being read.
const RESERVE: usize = 8;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if n > self.0.len() {
            return Err(ReadError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn text(&mut self) -> Result<Option<String>, ReadError> {
        match self.u32()? {
            ABSENT => Ok(None),
            n => self.present_text(n).map(Some),
        }
    }

    fn present_text(&mut self, n: u32) -> Result<String, ReadError> {
        let bytes = self.take(n as usize)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ReadError::Malformed("text is not UTF-8"))
    }

    fn required_text(&mut self) -> Result<String, ReadError> {
        self.text()?
            .ok_or(ReadError::Malformed("absent text in a list"))
    }

    /// A list's count, bounded by the bytes left (each item takes at least
    /// `item_bytes`: its texts' lengths), so a forged count is refused at once.
    fn count(&mut self, item_bytes: usize) -> Result<usize, ReadError> {
        let n = self.u32()? as usize;
        if n > self.0.len() / item_bytes {
            return Err(ReadError::Malformed("list longer than the record"));
        }
        Ok(n)
    }

    fn pairs(&mut self) -> Result<Vec<(String, String)>, ReadError> {
        let n = self.count(8)?;
        // Reserved up to a few items only: the items themselves prove the rest.
        let mut out = Vec::with_capacity(n.min(RESERVE));
        for _ in 0..n {
            out.push((self.required_text()?, self.required_text()?));
        }
        Ok(out)
    }

    fn verdict(&mut self) -> Result<Verdict, ReadError> {
        let [action, cause, flags] = self.array()?;
        let action = *Action::ALL
            .get(usize::from(action))
            .ok_or(ReadError::Malformed("unknown action"))?;
        let cause = match cause {
            NO_CAUSE => None,
            c => Some(
                *Cause::ALL
                    .get(usize::from(c))
                    .ok_or(ReadError::Malformed("unknown cause"))?,
            ),
        };
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ReadError::Malformed("unknown flags"));
        }
        let code = u16::from_le_bytes(self.array()?);
        let failover_after_ms = u64::from_le_bytes(self.array()?);
        if (flags & HAS_CODE == 0 && code != 0)
            || (flags & HAS_FAILOVER_AFTER == 0 && failover_after_ms != 0)
        {
            return Err(ReadError::Malformed("a value without its flag"));
        }
        let reason = self.text()?;
        let trunk_group = self.text()?;
        let target = self.text()?;
        let next_hop = self.text()?;
        let failover = self.text()?;
        let headers = self.pairs()?;
        let n = self.count(4)?;
        let mut strip = Vec::with_capacity(n.min(RESERVE));
        for _ in 0..n {
            strip.push(Cow::Owned(self.required_text()?));
        }
        let insert = self.pairs()?;
        Ok(Verdict {
            action,
            code: (flags & HAS_CODE != 0).then_some(code),
            reason,
            cause,
            trunk_group,
            target,
            next_hop,
            headers,
            failover,
            failover_after_ms: (flags & HAS_FAILOVER_AFTER != 0).then_some(failover_after_ms),
            failover_on_6xx: flags & FAILOVER_ON_6XX != 0,
            strip,
            insert,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Verdict {
        let mut v = Verdict::reject(403, "Forbidden \u{e9}", Cause::NotRegisteredAddress)
            .with_header("Warning", "399 edge \"x\"")
            .with_header("Retry-After", "");
        v.trunk_group = Some("hq-pbx1".into());
        v.target = Some("sip:a@b".into());
        v.next_hop = Some(String::new());
        v.failover = Some("sip:f@g".into());
        v.failover_after_ms = Some(u64::MAX);
        v.failover_on_6xx = true;
        v.strip.push("Route".into());
        v.strip.push("P-Asserted-Identity".into());
        v.insert.push(("X-A".into(), "1".into()));
        v
    }

    fn samples() -> Vec<Verdict> {
        let mut all = vec![Verdict::allow(), full()];
        for a in Action::ALL {
            all.push(Verdict {
                action: a,
                ..Verdict::allow()
            });
        }
        for c in Cause::ALL {
            all.push(Verdict::allow_as(c));
        }
        all.push(Verdict {
            code: Some(0),
            failover_after_ms: Some(0),
            ..Verdict::allow()
        });
        all
    }

    fn written(v: &Verdict) -> Vec<u8> {
        let mut out = vec![0xAA; 3];
        write_verdict(&mut out, v);
        out
    }

    #[test]
    fn a_verdict_reads_back_as_the_guest_wrote_it() {
        for v in samples() {
            assert_eq!(read(&written(&v)), Ok(v));
        }
    }

    #[test]
    fn no_verdict_reads_back_as_the_modules_reason() {
        let mut out = vec![1, 2, 3];
        write_no_verdict(&mut out, "bad source address \"x\"");
        assert_eq!(
            read(&out),
            Err(ReadError::NoVerdict("bad source address \"x\"".into()))
        );
        write_no_verdict(&mut out, &"\u{e9}".repeat(MAX_REASON));
        let Err(ReadError::NoVerdict(cut)) = read(&out) else {
            panic!("no verdict")
        };
        assert_eq!(cut, "\u{e9}".repeat(MAX_REASON / 2));
        out.push(0xFF);
        assert_eq!(read(&out), Err(ReadError::Malformed("text is not UTF-8")));
    }

    #[test]
    fn the_tables_fit_a_byte_and_keep_their_numbers() {
        // A number is part of the ABI version: appending keeps every old one.
        assert!(Action::ALL.len() < usize::from(NO_CAUSE));
        assert!(Cause::ALL.len() < usize::from(NO_CAUSE));
        assert_eq!(action_index(Action::Allow), 0);
        assert_eq!(action_index(Action::Route), 4);
        assert_eq!(cause_index(Cause::Malformed), 0);
        assert_eq!(cause_index(Cause::Response), 23);
    }

    /// The bytes docs/abi.md shows for an allow of cause `response` (also what
    /// tests/kamailio/trap_module.py writes by hand).
    #[test]
    fn an_allow_record_is_laid_out_as_docs_abi_md_shows() {
        let mut want = vec![1, 0, 23, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            want.extend_from_slice(&[0xFF; 4]);
        }
        want.extend_from_slice(&[0; 12]);
        assert_eq!(written(&Verdict::allow_as(Cause::Response)), want);
    }

    /// docs/abi.md's cause table is the record's: every number names the cause it
    /// reads as, and no row is missing or extra.
    #[test]
    fn the_documented_cause_numbers_are_the_ones_read() {
        let doc = include_str!("../../docs/abi.md");
        let rows: Vec<(usize, &str)> = doc
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix("| ")?.split(" | ");
                let n = cells.next()?.parse().ok()?;
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                Some((n, name))
            })
            .collect();
        let want: Vec<(usize, &str)> = Cause::ALL
            .iter()
            .map(|c| (usize::from(cause_index(*c)), c.as_str()))
            .collect();
        assert_eq!(rows, want);
        assert!(doc.contains("0 allow, 1 challenge, 2 reject, 3 accept, 4 route"));
        for (i, a) in Action::ALL.iter().enumerate() {
            assert_eq!(usize::from(action_index(*a)), i, "{}", a.as_str());
        }
    }

    #[test]
    fn every_truncation_and_every_trailing_byte_is_no_verdict() {
        let bytes = written(&full());
        for end in 0..bytes.len() {
            assert!(
                matches!(read(&bytes[..end]), Err(ReadError::Malformed(_))),
                "prefix of {end} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            read(&longer),
            Err(ReadError::Malformed("bytes after the verdict"))
        );
    }

    #[test]
    fn unknown_kinds_actions_causes_and_flags_are_no_verdict() {
        let base = written(&Verdict::allow_as(Cause::Trunk));
        for (at, value, why) in [
            (0, 0, "unknown kind"),
            (0, 3, "unknown kind"),
            (1, 5, "unknown action"),
            (2, Cause::ALL.len() as u8, "unknown cause"),
            (2, 254, "unknown cause"),
            (3, 1 << 3, "unknown flags"),
            (4, 1, "a value without its flag"),
            (13, 1, "a value without its flag"),
            (1, UNLISTED, "unknown action"),
            (2, UNLISTED, "unknown cause"),
        ] {
            let mut b = base.clone();
            b[at] = value;
            assert_eq!(
                read(&b),
                Err(ReadError::Malformed(why)),
                "byte {at} = {value}"
            );
        }
    }

    #[test]
    fn text_that_is_not_utf8_and_forged_counts_are_no_verdict() {
        let mut v = Verdict::allow();
        v.reason = Some("ab".into());
        let mut b = written(&v);
        // kind, action, cause, flags, code, failover_after_ms, then the reason.
        let reason_at = 4 + 2 + 8 + 4;
        b[reason_at] = 0xFF;
        assert_eq!(read(&b), Err(ReadError::Malformed("text is not UTF-8")));
        let mut forged = written(&Verdict::allow());
        let headers_at = forged.len() - 12;
        forged[headers_at..headers_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            read(&forged),
            Err(ReadError::Malformed("list longer than the record"))
        );
    }

    /// Every single-byte change of a full record reads as some verdict or as an
    /// error, never a panic (the host reads what a possibly broken module wrote).
    #[test]
    fn any_byte_changed_never_panics() {
        let bytes = written(&full());
        for at in 0..bytes.len() {
            for value in [0u8, 1, 0x7F, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[at] = value;
                let _ = read(&b);
            }
        }
    }
}
