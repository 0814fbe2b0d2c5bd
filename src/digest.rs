//! HTTP Digest for SIP (RFC 3261 §22, RFC 7616, RFC 8760): MD5 and SHA-256, qop=auth.
//!
//! Nonces are stateless: `hex(issued ‖ BLAKE2s-128(key = secret; issued ‖ source IP
//! ‖ realm))` (keyed BLAKE2s, RFC 7693 §2.5), `issued` being 8 bytes: the time in
//! milliseconds (48 bits) and a 16-bit counter that keeps two nonces of one
//! millisecond apart. Any worker (or any node sharing the secret through the host
//! store) can verify a nonce another one issued, without a nonce table to replicate,
//! and a nonce captured on the wire is useless from another IP address.

use std::net::IpAddr;

use blake2::Blake2sVarCore;
use blake2::digest::block_api::{Block, Buffer, UpdateCore, VariableOutputCore};
use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Digest algorithms offered and accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Absent means MD5 (RFC 2617 §3.2.1); `-sess` variants are not offered.
    pub fn from_param(param: Option<&str>) -> Option<Algorithm> {
        match param {
            None => Some(Algorithm::Md5),
            Some(a) if a.eq_ignore_ascii_case("MD5") => Some(Algorithm::Md5),
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Some(Algorithm::Sha256),
            Some(_) => None,
        }
    }

    fn hash_hex(self, parts: &[&[u8]]) -> String {
        match self {
            Algorithm::Md5 => {
                let mut h = Md5::new();
                for p in parts {
                    h.update(p);
                }
                hex(&h.finalize())
            }
            Algorithm::Sha256 => {
                let mut h = Sha256::new();
                for p in parts {
                    h.update(p);
                }
                hex(&h.finalize())
            }
        }
    }
}

/// HA1 = H(username ":" realm ":" password) in lowercase hex (RFC 7616 §3.4.2): what
/// a configuration holds instead of the password (`trunkguard ha1`).
pub fn ha1(algorithm: Algorithm, username: &str, realm: &str, password: &str) -> String {
    algorithm.hash_hex(&[
        username.as_bytes(),
        b":",
        realm.as_bytes(),
        b":",
        password.as_bytes(),
    ])
}

/// The HA1 values a trunk group can be verified with (lowercase hex).
#[derive(Clone, PartialEq, Eq)]
pub struct Ha1Set {
    md5: Option<String>,
    sha256: Option<String>,
}

impl std::fmt::Debug for Ha1Set {
    // HA1 is password-equivalent: never let it reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ha1Set")
            .field("md5", &self.md5.as_ref().map(|_| "<redacted>"))
            .field("sha256", &self.sha256.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Ha1Set {
    /// Builds the set from the configuration fields. The error is (path suffix,
    /// reason), the suffix being appended to the trunk group's JSON path.
    pub fn from_config(
        username: &str,
        realm: &str,
        password: Option<&str>,
        ha1: Option<&str>,
        ha1_sha256: Option<&str>,
    ) -> Result<Ha1Set, (String, String)> {
        match (password, ha1, ha1_sha256) {
            (None, None, None) => Err((
                String::new(),
                "needs one of password, ha1 or ha1_sha256".into(),
            )),
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err((
                ".password".into(),
                "give either password or pre-hashed ha1/ha1_sha256, not both".into(),
            )),
            (Some(pw), None, None) => Ok(Ha1Set {
                md5: Some(self::ha1(Algorithm::Md5, username, realm, pw)),
                sha256: Some(self::ha1(Algorithm::Sha256, username, realm, pw)),
            }),
            (None, md5, sha) => Ok(Ha1Set {
                md5: md5.map(|h| checked_hex(h, 32, ".ha1")).transpose()?,
                sha256: sha.map(|h| checked_hex(h, 64, ".ha1_sha256")).transpose()?,
            }),
        }
    }

    /// Algorithms this trunk group can answer, strongest first (RFC 8760 §2.4:
    /// challenges are listed in order of preference).
    pub fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        [
            self.sha256.as_ref().map(|_| Algorithm::Sha256),
            self.md5.as_ref().map(|_| Algorithm::Md5),
        ]
        .into_iter()
        .flatten()
    }

    fn get(&self, alg: Algorithm) -> Option<&str> {
        match alg {
            Algorithm::Md5 => self.md5.as_deref(),
            Algorithm::Sha256 => self.sha256.as_deref(),
        }
    }
}

fn checked_hex(text: &str, len: usize, field: &str) -> Result<String, (String, String)> {
    if text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err((
            field.to_string(),
            format!("must be {len} hexadecimal digits"),
        ))
    }
}

/// Lower-case hex of `bytes`, as digest responses and the fronts' keys write it.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

pub(crate) fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// Server secret that keys nonces; shared by every worker through the host store.
///
/// Kept with the MAC already keyed, the secret changing only when the store loses
/// it: keyed BLAKE2s compresses the key block first, so what is left per nonce is one
/// compression for any realm of up to 40 bytes (the 64-byte block holds the 8 bytes
/// of `issued`, an IPv6 address's 16 and the realm).
#[derive(Clone)]
pub struct NonceSecret {
    /// BLAKE2s with 16-byte output and a 32-byte key, the padded key block already
    /// compressed (RFC 7693 §2.5; the message is never empty, so that block is never
    /// the last).
    keyed: Blake2sVarCore,
    /// The MAC of nonces issued before 2026-12-01 (HMAC-SHA-256, truncated to 16
    /// bytes), recognised so that a PBX holding one across an upgrade is asked for a
    /// fresh nonce (stale) rather than challenged as if its answer were forged.
    /// `None` only if HMAC refused the key, which it never does for 32 bytes.
    legacy: Option<Hmac<Sha256>>,
    /// The key of the lockout's slots (src/lockout.rs), derived once per secret.
    lockout_slots: crate::lockout::SlotKey,
}

/// What the lockout's slot key is the MAC of. Read as a nonce's input, its first 8
/// bytes would be a time thousands of years ahead, so no nonce is ever the MAC of it.
const LOCKOUT_SLOTS_LABEL: &[u8] = b"trunkguard:lockout-slots";

impl NonceSecret {
    pub fn new(bytes: &[u8; 32]) -> NonceSecret {
        let mut keyed = Blake2sVarCore::new_with_params(&[], &[], bytes.len(), NONCE_MAC_LEN);
        let mut block = Block::<Blake2sVarCore>::default();
        for (b, k) in block.iter_mut().zip(bytes) {
            *b = *k;
        }
        keyed.update_blocks(std::slice::from_ref(&block));
        let mac = keyed_mac(&keyed, &[LOCKOUT_SLOTS_LABEL]);
        let half = |range: std::ops::Range<usize>| {
            let mut word = [0u8; 8];
            word.copy_from_slice(mac.get(range).unwrap_or(&[0; 8]));
            u64::from_le_bytes(word)
        };
        NonceSecret {
            keyed,
            legacy: <Hmac<Sha256> as KeyInit>::new_from_slice(bytes).ok(),
            lockout_slots: crate::lockout::SlotKey([half(0..8), half(8..16)]),
        }
    }

    pub fn lockout_slot_key(&self) -> crate::lockout::SlotKey {
        self.lockout_slots
    }
}

impl std::fmt::Debug for NonceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceSecret(..)")
    }
}

/// How a nonce presented in credentials fares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceState {
    Fresh,
    /// Ours, but older than the TTL or signed with the MAC of before keyed BLAKE2s
    /// ([`NonceSecret`]): a correct response earns `stale=true`.
    Stale,
    /// Not issued by us for this source (forged, from another IP, garbled, future).
    Invalid,
}

const NONCE_MAC_LEN: usize = 16;

fn nonce_mac(secret: &NonceSecret, issued: [u8; 8], source: IpAddr, realm: &str) -> [u8; 16] {
    match crate::acl::canonical_ip(source) {
        IpAddr::V4(v4) => keyed_mac(&secret.keyed, &[&issued, &v4.octets(), realm.as_bytes()]),
        IpAddr::V6(v6) => keyed_mac(&secret.keyed, &[&issued, &v6.octets(), realm.as_bytes()]),
    }
}

/// Keyed BLAKE2s-128 of the concatenation of `parts`, from the compressed key block.
fn keyed_mac(keyed: &Blake2sVarCore, parts: &[&[u8]]) -> [u8; 16] {
    let mut core = keyed.clone();
    let mut buffer = Buffer::<Blake2sVarCore>::default();
    for part in parts {
        buffer.digest_blocks(part, |blocks| core.update_blocks(blocks));
    }
    let mut full = blake2::digest::Output::<Blake2sVarCore>::default();
    core.finalize_variable_core(&mut buffer, &mut full);
    let mut out = [0u8; NONCE_MAC_LEN];
    for (o, t) in out.iter_mut().zip(full.iter()) {
        *o = *t;
    }
    out
}

/// The MAC of a nonce issued before keyed BLAKE2s (see [`NonceSecret::legacy`]).
fn legacy_nonce_mac(
    secret: &NonceSecret,
    issued: [u8; 8],
    source: IpAddr,
    realm: &str,
) -> [u8; 16] {
    let mut out = [0u8; NONCE_MAC_LEN];
    if let Some(mut mac) = secret.legacy.clone() {
        mac.update(&issued);
        match crate::acl::canonical_ip(source) {
            IpAddr::V4(v4) => mac.update(&v4.octets()),
            IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        mac.update(realm.as_bytes());
        let tag = mac.finalize().into_bytes();
        for (o, t) in out.iter_mut().zip(tag.iter()) {
            *o = *t;
        }
    }
    out
}

/// Issues a nonce for `source` at `now_ms`. Its first 8 bytes are the time in
/// milliseconds (48 bits) and `unique` (16 bits, a counter the engine seeds at
/// random): two challenges to one address in the same millisecond must not share a
/// nonce, or the replay set (src/replay.rs) would take the second answer for a
/// replay of the first.
pub fn make_nonce(
    secret: &NonceSecret,
    now_ms: u64,
    unique: u16,
    source: IpAddr,
    realm: &str,
) -> String {
    let issued = ((now_ms << 16) | u64::from(unique)).to_be_bytes();
    let mac = nonce_mac(secret, issued, source, realm);
    let mut raw = [0u8; 8 + NONCE_MAC_LEN];
    raw[..8].copy_from_slice(&issued);
    raw[8..].copy_from_slice(&mac);
    hex(&raw)
}

/// When a nonce of ours was issued (its first 8 bytes); check it first.
pub fn nonce_issued_ms(nonce: &str) -> Option<u64> {
    let raw = unhex::<{ 8 + NONCE_MAC_LEN }>(nonce)?;
    let mut issued = [0u8; 8];
    issued.copy_from_slice(raw.get(..8)?);
    Some(u64::from_be_bytes(issued) >> 16)
}

/// Clock skew tolerated between workers (a nonce "from the future").
pub const FUTURE_SKEW_MS: u64 = 5_000;

pub fn check_nonce(
    secret: &NonceSecret,
    nonce: &str,
    now_ms: u64,
    source: IpAddr,
    realm: &str,
    ttl_ms: u64,
) -> NonceState {
    // Only the spelling the edge sent: hex reads either case, so every other
    // spelling of a used nonce would be a new one to the replay set, each worth a
    // counted guess to whoever sniffed it (docs/policy.md, "A nonce is worth one
    // guess"). A UA echoes a nonce as it came (RFC 7616 §3.4).
    if nonce.bytes().any(|b| b.is_ascii_uppercase()) {
        return NonceState::Invalid;
    }
    let Some(raw) = unhex::<{ 8 + NONCE_MAC_LEN }>(nonce) else {
        return NonceState::Invalid;
    };
    let mut issued = [0u8; 8];
    issued.copy_from_slice(&raw[..8]);
    let expected = nonce_mac(secret, issued, source, realm);
    // Only what fails the current MAC pays for the legacy one too: a forged nonce
    // costs one BLAKE2s compression more than before this MAC, and the challenge it
    // earns two SHA-256 compressions less.
    let legacy = !bool::from(expected.ct_eq(&raw[8..]));
    if legacy {
        let expected = legacy_nonce_mac(secret, issued, source, realm);
        if !bool::from(expected.ct_eq(&raw[8..])) {
            return NonceState::Invalid;
        }
    }
    let issued_ms = u64::from_be_bytes(issued) >> 16;
    if issued_ms > now_ms.saturating_add(FUTURE_SKEW_MS) {
        NonceState::Invalid
    } else if legacy || now_ms.saturating_sub(issued_ms) > ttl_ms {
        NonceState::Stale
    } else {
        NonceState::Fresh
    }
}

/// One challenge header value per algorithm the trunk groups can use.
pub fn challenge_values(
    realm: &str,
    nonce: &str,
    stale: bool,
    algorithms: &[Algorithm],
) -> Vec<String> {
    // Concatenated rather than format!: every first request of every PBX is
    // challenged, and format! was about a ninth of a challenge's native instructions
    // (docs/performance.md, "The policy, per message").
    algorithms
        .iter()
        .map(|alg| {
            let mut value = String::with_capacity(realm.len() + nonce.len() + 80);
            for part in [
                "Digest realm=\"",
                realm,
                "\", nonce=\"",
                nonce,
                "\", algorithm=",
                alg.name(),
                ", qop=\"auth\"",
                if stale { ", stale=true" } else { "" },
            ] {
                value.push_str(part);
            }
            value
        })
        .collect()
}

/// What the policy needs from a parsed Authorization header.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub username: &'a str,
    pub uri: &'a str,
    pub nonce: &'a str,
    pub response: &'a str,
    pub algorithm: Algorithm,
    pub qop: Option<&'a str>,
    pub nc: Option<&'a str>,
    pub cnonce: Option<&'a str>,
}

/// Whether `resp` proves knowledge of the trunk group's password, in constant time.
/// `false` too when the trunk group has no HA1 for the algorithm or qop is unusable.
pub fn verify(ha1s: &Ha1Set, method: &str, resp: &Response<'_>) -> bool {
    let Some(ha1) = ha1s.get(resp.algorithm) else {
        return false;
    };
    let alg = resp.algorithm;
    let ha2 = alg.hash_hex(&[method.as_bytes(), b":", resp.uri.as_bytes()]);
    let expected = match resp.qop {
        Some(qop) if qop.eq_ignore_ascii_case("auth") => {
            let (Some(nc), Some(cnonce)) = (resp.nc, resp.cnonce) else {
                return false;
            };
            alg.hash_hex(&[
                ha1.as_bytes(),
                b":",
                resp.nonce.as_bytes(),
                b":",
                nc.as_bytes(),
                b":",
                cnonce.as_bytes(),
                b":",
                qop.as_bytes(),
                b":",
                ha2.as_bytes(),
            ])
        }
        // RFC 2069 compatibility, which RFC 3261 §22.4 requires servers to keep.
        None => alg.hash_hex(&[
            ha1.as_bytes(),
            b":",
            resp.nonce.as_bytes(),
            b":",
            ha2.as_bytes(),
        ]),
        Some(_) => return false,
    };
    let given = resp.response.to_ascii_lowercase();
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// HA1 and HA2 as a client computes them (RFC 7616 §3.4.2, §3.4.3).
fn client_ha1_ha2(
    alg: Algorithm,
    (username, realm, password): (&str, &str, &str),
    method: &str,
    uri: &str,
) -> (String, String) {
    let ha1 = alg.hash_hex(&[
        username.as_bytes(),
        b":",
        realm.as_bytes(),
        b":",
        password.as_bytes(),
    ]);
    let ha2 = alg.hash_hex(&[method.as_bytes(), b":", uri.as_bytes()]);
    (ha1, ha2)
}

/// An RFC 2069 answer (no qop), as old PBXs compute it: for tests.
pub fn client_response_rfc2069(
    alg: Algorithm,
    username: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
) -> String {
    let (ha1, ha2) = client_ha1_ha2(alg, (username, realm, password), method, uri);
    alg.hash_hex(&[ha1.as_bytes(), b":", nonce.as_bytes(), b":", ha2.as_bytes()])
}

/// Computes a client's response, as a PBX would: used by tests, the replay tool's
/// examples and anything that has to answer a challenge.
#[allow(clippy::too_many_arguments)]
pub fn client_response(
    alg: Algorithm,
    username: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    nc: &str,
    cnonce: &str,
) -> String {
    let (ha1, ha2) = client_ha1_ha2(alg, (username, realm, password), method, uri);
    alg.hash_hex(&[
        ha1.as_bytes(),
        b":",
        nonce.as_bytes(),
        b":",
        nc.as_bytes(),
        b":",
        cnonce.as_bytes(),
        b":auth:",
        ha2.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> NonceSecret {
        NonceSecret::new(&[7u8; 32])
    }
    const REALM: &str = "trunks.example.net";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rfc_2617_md5_example_verifies() {
        // RFC 2617 §3.5 (Mufasa), adapted: the same arithmetic with method GET.
        let ha1 = Ha1Set::from_config(
            "Mufasa",
            "testrealm@host.com",
            Some("Circle Of Life"),
            None,
            None,
        )
        .unwrap();
        let resp = Response {
            username: "Mufasa",
            uri: "/dir/index.html",
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            response: "6629fae49393a05397450978507c4ef1",
            algorithm: Algorithm::Md5,
            qop: Some("auth"),
            nc: Some("00000001"),
            cnonce: Some("0a4f113b"),
        };
        assert!(verify(&ha1, "GET", &resp));
        assert!(!verify(&ha1, "POST", &resp));
    }

    #[test]
    fn rfc_7616_sha256_example_verifies() {
        // RFC 7616 §3.9.1.
        let ha1 = Ha1Set::from_config(
            "Mufasa",
            "http-auth@example.org",
            Some("Circle of Life"),
            None,
            None,
        )
        .unwrap();
        let resp = Response {
            username: "Mufasa",
            uri: "/dir/index.html",
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            response: "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            algorithm: Algorithm::Sha256,
            qop: Some("auth"),
            nc: Some("00000001"),
            cnonce: Some("f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"),
        };
        assert!(verify(&ha1, "GET", &resp));
    }

    #[test]
    fn client_and_server_agree_for_both_algorithms() {
        let ha1 = Ha1Set::from_config("hq1", REALM, Some("pw"), None, None).unwrap();
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let nonce = make_nonce(&secret(), 1000, 0, ip("203.0.113.7"), REALM);
            let r = client_response(
                alg, "hq1", REALM, "pw", "INVITE", "sip:x@y", &nonce, "00000001", "abc",
            );
            let resp = Response {
                username: "hq1",
                uri: "sip:x@y",
                nonce: &nonce,
                response: &r.to_ascii_uppercase(),
                algorithm: alg,
                qop: Some("auth"),
                nc: Some("00000001"),
                cnonce: Some("abc"),
            };
            assert!(verify(&ha1, "INVITE", &resp), "{alg:?}");
            let wrong = client_response(
                alg, "hq1", REALM, "pw2", "INVITE", "sip:x@y", &nonce, "00000001", "abc",
            );
            assert!(
                !verify(
                    &ha1,
                    "INVITE",
                    &Response {
                        response: &wrong,
                        ..resp
                    }
                ),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn prehashed_ha1_only_answers_its_algorithm() {
        let md5_only = Ha1Set::from_config("u", REALM, None, Some(&"A".repeat(32)), None).unwrap();
        assert_eq!(
            md5_only.algorithms().collect::<Vec<_>>(),
            vec![Algorithm::Md5]
        );
        let both = Ha1Set::from_config("u", REALM, Some("p"), None, None).unwrap();
        assert_eq!(
            both.algorithms().collect::<Vec<_>>(),
            vec![Algorithm::Sha256, Algorithm::Md5]
        );
    }

    #[test]
    fn nonce_lifecycle() {
        let src = ip("203.0.113.7");
        let nonce = make_nonce(&secret(), 10_000, 7, src, REALM);
        let other = NonceSecret::new(&[8u8; 32]);
        let cases: &[(&str, u64, IpAddr, &NonceSecret, NonceState)] = &[
            ("fresh at issue", 10_000, src, &secret(), NonceState::Fresh),
            ("fresh at ttl", 310_000, src, &secret(), NonceState::Fresh),
            (
                "stale after ttl",
                310_001,
                src,
                &secret(),
                NonceState::Stale,
            ),
            (
                "other source ip",
                10_000,
                ip("203.0.113.8"),
                &secret(),
                NonceState::Invalid,
            ),
            (
                "mapped v4 is the same source",
                10_000,
                ip("::ffff:203.0.113.7"),
                &secret(),
                NonceState::Fresh,
            ),
            ("other secret", 10_000, src, &other, NonceState::Invalid),
            ("from the future", 0, src, &secret(), NonceState::Invalid),
        ];
        for (what, now, source, secret, want) in cases {
            assert_eq!(
                check_nonce(secret, &nonce, *now, *source, REALM, 300_000),
                *want,
                "{what}"
            );
        }
        // The nonce in another spelling: the same bytes to hex, another nonce to the
        // replay set, so never taken.
        let shouted = nonce.to_ascii_uppercase();
        assert_ne!(shouted, nonce, "a nonce without a letter a-f");
        for garbage in ["", "zz", &nonce[..46], &format!("{nonce}00"), &shouted] {
            assert_eq!(
                check_nonce(&secret(), garbage, 10_000, src, REALM, 300_000),
                NonceState::Invalid
            );
        }
    }

    #[test]
    fn the_nonce_mac_is_keyed_blake2s_128_for_every_realm_length_and_address_family() {
        use blake2::digest::Mac as _;
        let key = [7u8; 32];
        let issued = 0x0123_4567_89ab_cdefu64.to_be_bytes();
        for source in [ip("203.0.113.7"), ip("2001:db8::7")] {
            let octets = match source {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            // Across one, two and three blocks, and each block boundary.
            for len in 0..=150 {
                let realm = "r".repeat(len);
                let mut reference =
                    <blake2::Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(
                        &key,
                    )
                    .unwrap();
                reference.update(&issued);
                reference.update(&octets);
                reference.update(realm.as_bytes());
                let want = reference.finalize().into_bytes();
                assert_eq!(
                    nonce_mac(&secret(), issued, source, &realm)[..],
                    want[..],
                    "{source} realm of {len}"
                );
            }
        }
    }

    #[test]
    fn a_nonce_of_the_hmac_form_issued_before_blake2s_is_stale_never_fresh() {
        // A PBX that holds a nonce across the upgrade gets stale=true (a new nonce,
        // no password prompt) for a right answer; a forged one stays invalid.
        let src = ip("203.0.113.7");
        let issued = ((10_000u64 << 16) | 7).to_be_bytes();
        let mut raw = [0u8; 24];
        raw[..8].copy_from_slice(&issued);
        raw[8..].copy_from_slice(&legacy_nonce_mac(&secret(), issued, src, REALM));
        let legacy = hex(&raw);
        assert_ne!(legacy, make_nonce(&secret(), 10_000, 7, src, REALM));
        let cases: &[(&str, &str, u64, IpAddr, NonceState)] = &[
            ("within its ttl", &legacy, 10_000, src, NonceState::Stale),
            ("after its ttl", &legacy, 310_001, src, NonceState::Stale),
            (
                "from another address",
                &legacy,
                10_000,
                ip("203.0.113.8"),
                NonceState::Invalid,
            ),
            ("from the future", &legacy, 0, src, NonceState::Invalid),
        ];
        for (what, nonce, now, source, want) in cases {
            assert_eq!(
                check_nonce(&secret(), nonce, *now, *source, REALM, 300_000),
                *want,
                "{what}"
            );
        }
        let mut forged = raw;
        forged[23] ^= 1;
        assert_eq!(
            check_nonce(&secret(), &hex(&forged), 10_000, src, REALM, 300_000),
            NonceState::Invalid
        );
    }

    #[test]
    fn challenge_values_keep_the_order_they_are_given_and_mark_stale() {
        // The order itself is the configuration's (digest.algorithms, src/index.rs),
        // pinned by the scenario table's `algorithms` expectations.
        let values = challenge_values(REALM, "abc", true, &[Algorithm::Sha256, Algorithm::Md5]);
        assert_eq!(values.len(), 2);
        assert!(values[0].contains("algorithm=SHA-256") && values[0].ends_with("stale=true"));
        assert!(values[1].contains("algorithm=MD5"));
        assert!(values[1].contains("qop=\"auth\""));
        // RFC 7616 3.3's challenge, to the byte.
        assert_eq!(
            values[1],
            format!(
                "Digest realm=\"{REALM}\", nonce=\"abc\", algorithm=MD5, qop=\"auth\", stale=true"
            )
        );
        assert_eq!(
            challenge_values(REALM, "abc", false, &[Algorithm::Md5]),
            [format!(
                "Digest realm=\"{REALM}\", nonce=\"abc\", algorithm=MD5, qop=\"auth\""
            )]
        );
    }

    #[test]
    fn debug_output_redacts_ha1() {
        let ha1 = Ha1Set::from_config("u", REALM, Some("p"), None, None).unwrap();
        assert!(!format!("{ha1:?}").contains(&ha1.md5.clone().unwrap()));
    }
}
