//! Device authentication and publish authorisation (DESIGN.md, "Security").
//!
//! - [`PasswordFile`]: `username:PHC` lines (argon2id), written by `sensorflow passwd`.
//! - [`Acl`]: `username topic-pattern` lines granting topics beyond the user's own sensor id.
//! - [`AuthPolicy`]: what the listener accepts; part of [`crate::IngestConfig`].
//! - `Authenticator` (crate-private): the runtime side. Argon2 verification costs tens of
//!   milliseconds of CPU, so it never runs on the ntex I/O thread: it runs on the blocking pool
//!   of the application's tokio runtime (at most `verify_concurrency` at once), and successful
//!   verifications are cached for `cache_ttl` so reconnecting devices cost nothing. Failed
//!   CONNECTs are counted per source address; an address with `max_failed_connects` failures in
//!   `failure_window` is refused without verification until the window ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};

use crate::stats::{IngestStats, bump};

/// Errors reading or writing the password and ACL files.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A password could not be hashed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Checks a username: non-empty, at most 256 bytes, and usable as a `{sensor_id}` topic level
/// and a password file key (no `:`, `/`, `+`, `#`, whitespace or control characters).
pub fn validate_username(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        return Err("a username must not be empty");
    }
    if user.len() > 256 {
        return Err("a username must be at most 256 bytes");
    }
    if user
        .chars()
        .any(|c| matches!(c, ':' | '/' | '+' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(
            "a username must not contain ':', '/', '+', '#', whitespace or control characters",
        );
    }
    Ok(())
}

/// The MQTT users: `username:PHC-hash` per line (argon2id); `#` comments and blank lines are
/// ignored. Debug output shows the number of users, never a hash.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    /// In file order, so that rewriting the file keeps it.
    users: Vec<(String, String)>,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

/// The lines of a password or ACL file that hold an entry, trimmed, with their 1-based
/// numbers: blank lines and `#` comments are skipped.
fn entry_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

impl PasswordFile {
    /// Parses the file's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthFileError> {
        let mut users: Vec<(String, String)> = Vec::new();
        for (number, line) in entry_lines(text) {
            let syntax = |reason: String| AuthFileError::Syntax {
                path: path.to_owned(),
                line: number,
                reason,
            };
            let (user, phc) = line
                .split_once(':')
                .ok_or_else(|| syntax("expected username:PHC-hash".into()))?;
            validate_username(user).map_err(|r| syntax(r.into()))?;
            let parsed = PasswordHash::new(phc)
                .map_err(|e| syntax(format!("not a PHC password hash: {e}")))?;
            if parsed.algorithm != argon2::ARGON2ID_IDENT {
                return Err(syntax(format!(
                    "hash algorithm {} is not argon2id",
                    parsed.algorithm
                )));
            }
            if users.iter().any(|(u, _)| u == user) {
                return Err(syntax(format!("user {user:?} appears twice")));
            }
            users.push((user.to_owned(), phc.to_owned()));
        }
        Ok(Self { users })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The PHC hash of `user`, if known.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, h)| h.as_str())
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True without users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Adds `user` or replaces its hash. Returns true when the user was new.
    pub fn set(&mut self, user: &str, phc: String) -> bool {
        if let Some(entry) = self.users.iter_mut().find(|(u, _)| u == user) {
            entry.1 = phc;
            false
        } else {
            self.users.push((user.to_owned(), phc));
            true
        }
    }

    /// The file's text (one `username:PHC` line per user).
    pub fn to_text(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{h}\n"))
            .collect()
    }
}

/// Hashes `password` with argon2id (the `argon2` crate's default parameters) and `salt`
/// (at least 16 random bytes), as a PHC string.
pub fn hash_password(password: &[u8], salt: &[u8]) -> Result<String, AuthFileError> {
    let salt = SaltString::encode_b64(salt).map_err(|e| AuthFileError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthFileError::Hash(e.to_string()))
}

/// True when `password` matches the PHC hash (any argon2 variant and parameters it names).
pub fn verify_password(phc: &str, password: &[u8]) -> bool {
    PasswordHash::new(phc).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(password, &hash)
            .is_ok()
    })
}

/// Extra publish grants: `username topic-filter` per line (`+` one level, `#` the rest, as in
/// MQTT subscriptions); `#` comments and blank lines ignored. Without a grant a user may
/// publish only to topics whose `{sensor_id}` equals its username.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    grants: HashMap<String, Vec<String>>,
}

impl Acl {
    /// Parses the file's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthFileError> {
        let mut grants: HashMap<String, Vec<String>> = HashMap::new();
        for (number, line) in entry_lines(text) {
            let syntax = |reason: String| AuthFileError::Syntax {
                path: path.to_owned(),
                line: number,
                reason,
            };
            let mut parts = line.split_whitespace();
            let (Some(user), Some(filter), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(syntax("expected `username topic-filter`".into()));
            };
            validate_username(user).map_err(|r| syntax(r.into()))?;
            validate_filter(filter).map_err(|r| syntax(r.into()))?;
            grants
                .entry(user.to_owned())
                .or_default()
                .push(filter.to_owned());
        }
        Ok(Self { grants })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Whether `user` may publish to `topic`, whose sensor id is `sensor_id`.
    pub fn allows(&self, user: &str, topic: &str, sensor_id: &str) -> bool {
        sensor_id == user
            || self
                .grants
                .get(user)
                .is_some_and(|filters| filters.iter().any(|f| filter_matches(f, topic)))
    }
}

fn validate_filter(filter: &str) -> Result<(), &'static str> {
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

/// MQTT topic filter matching: `+` matches one level, a final `#` this level and all below
/// (including none: `a/#` matches `a`).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        match (f, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// What the MQTT listener accepts. `Default` accepts anonymous clients (what a loopback
/// listener without users does); the binary decides per DESIGN.md.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    /// Users that may authenticate with a password; `None`: no password file.
    pub users: Option<Arc<PasswordFile>>,
    /// Grants beyond a user's own sensor id.
    pub acl: Arc<Acl>,
    /// Whether clients without credentials are accepted (and not ACL-restricted).
    pub allow_anonymous: bool,
    /// Failed CONNECTs from one source address within `failure_window` after which it is
    /// refused without verification until the window ends. Default 20.
    pub max_failed_connects: u32,
    /// See `max_failed_connects`. Default 60 s.
    pub failure_window: Duration,
    /// How long a successful verification is remembered. Default 300 s.
    pub cache_ttl: Duration,
    /// Password verifications running at once. Default 2.
    pub verify_concurrency: usize,
    /// Whether a client certificate verified by the TLS listener's client CA authenticates
    /// its subject's common name as the username (DESIGN: `tls.client_ca_file`). Default false.
    pub client_certs: bool,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        Self {
            users: None,
            acl: Arc::default(),
            allow_anonymous: true,
            max_failed_connects: 20,
            failure_window: Duration::from_secs(60),
            cache_ttl: Duration::from_secs(300),
            verify_concurrency: 2,
            client_certs: false,
        }
    }
}

/// Reasons counted in `sensorflow_auth_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown user or wrong password (CONNACK 4 / 0x86).
    BadCredentials,
    /// No credentials and anonymous access not allowed (CONNACK 5 / 0x87).
    NotAuthorized,
    /// Refused because its source address failed too often (CONNACK 3 / 0x9F).
    RateLimited,
    /// A publish outside the user's ACL (PUBACK 0x87 / 3.1.1 connection closed).
    AclDenied,
}

impl AuthFailure {
    /// Every reason, in label order.
    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::BadCredentials,
        AuthFailure::NotAuthorized,
        AuthFailure::RateLimited,
        AuthFailure::AclDenied,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::NotAuthorized => "not_authorized",
            AuthFailure::RateLimited => "rate_limited",
            AuthFailure::AclDenied => "acl_denied",
        }
    }
}

/// Outcome of authenticating a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// Accepted without credentials: not ACL-restricted.
    Anonymous,
    /// Accepted as this user: may publish to its own sensor id and its ACL grants.
    User(Arc<str>),
}

/// Source addresses tracked for failed CONNECTs at most; beyond it, failures of new addresses
/// are counted but not tracked (the map cannot grow without bound under a spoofed flood).
const MAX_TRACKED_ADDRESSES: usize = 100_000;
/// Successful verifications remembered at most.
const MAX_CACHED: usize = 100_000;

/// The runtime side of [`AuthPolicy`], shared by every worker thread.
pub(crate) struct Authenticator {
    policy: AuthPolicy,
    blocking: tokio::runtime::Handle,
    permits: Arc<tokio::sync::Semaphore>,
    /// SHA-256 of (user, password, hash) of recent successful verifications → when verified.
    cache: parking_lot::Mutex<HashMap<[u8; 32], Instant>>,
    /// Source address → (window start, failures in it).
    failures: parking_lot::Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// A hash verified for unknown users, so that they take as long as known ones.
    dummy_hash: String,
    stats: Arc<IngestStats>,
    log_limit: LogLimit,
}

impl Authenticator {
    pub(crate) fn new(
        policy: AuthPolicy,
        blocking: tokio::runtime::Handle,
        stats: Arc<IngestStats>,
    ) -> Self {
        let dummy_hash = if policy.users.is_some() {
            hash_password(b"sensorflow-dummy-password", b"sensorflow-dummy").unwrap_or_default()
        } else {
            String::new()
        };
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(
                policy.verify_concurrency.max(1),
            )),
            policy,
            blocking,
            cache: parking_lot::Mutex::default(),
            failures: parking_lot::Mutex::default(),
            dummy_hash,
            stats,
            log_limit: LogLimit::default(),
        }
    }

    pub(crate) fn acl(&self) -> &Acl {
        &self.policy.acl
    }

    /// Decides a CONNECT. Counts and logs (rate-limited) every refusal.
    pub(crate) async fn authenticate(
        &self,
        peer: Option<IpAddr>,
        certificate_cn: Option<String>,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, AuthFailure> {
        if let Some(ip) = peer
            && self.is_limited(ip)
        {
            return Err(self.refused(peer, username, AuthFailure::RateLimited));
        }
        // The TLS layer verified the certificate against the client CA already.
        if self.policy.client_certs
            && let Some(cn) = certificate_cn
        {
            if validate_username(&cn).is_ok() {
                return Ok(Identity::User(Arc::from(cn)));
            }
            if let Some(ip) = peer {
                self.record_failure(ip);
            }
            return Err(self.refused(peer, Some(&cn), AuthFailure::BadCredentials));
        }
        let result = self.decide(username, password).await;
        if let Err(failure) = result {
            if let Some(ip) = peer {
                self.record_failure(ip);
            }
            return Err(self.refused(peer, username, failure));
        }
        result
    }

    async fn decide(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, AuthFailure> {
        let (Some(users), Some(user)) = (&self.policy.users, username) else {
            return if self.policy.allow_anonymous {
                Ok(Identity::Anonymous)
            } else {
                Err(AuthFailure::NotAuthorized)
            };
        };
        let password = password.unwrap_or_default();
        let known = users.hash_of(user);
        let phc = known.unwrap_or(&self.dummy_hash).to_owned();
        let key = cache_key(user, password, &phc);
        if known.is_some() && self.cached(&key) {
            return Ok(Identity::User(Arc::from(user)));
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return Err(AuthFailure::BadCredentials);
        };
        let secret = password.to_vec();
        let verify_phc = phc.clone();
        let verified = self
            .blocking
            .spawn_blocking(move || verify_password(&verify_phc, &secret))
            .await
            .unwrap_or(false);
        if verified && known.is_some() {
            let mut cache = self.cache.lock();
            if cache.len() >= MAX_CACHED {
                let ttl = self.policy.cache_ttl;
                cache.retain(|_, at| at.elapsed() < ttl);
            }
            if cache.len() < MAX_CACHED {
                cache.insert(key, Instant::now());
            }
            Ok(Identity::User(Arc::from(user)))
        } else {
            Err(AuthFailure::BadCredentials)
        }
    }

    fn cached(&self, key: &[u8; 32]) -> bool {
        let mut cache = self.cache.lock();
        match cache.get(key) {
            Some(at) if at.elapsed() < self.policy.cache_ttl => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn is_limited(&self, ip: IpAddr) -> bool {
        let mut failures = self.failures.lock();
        match failures.get(&ip) {
            Some((start, _)) if start.elapsed() >= self.policy.failure_window => {
                failures.remove(&ip);
                false
            }
            Some((_, n)) => *n >= self.policy.max_failed_connects,
            None => false,
        }
    }

    fn record_failure(&self, ip: IpAddr) {
        let window = self.policy.failure_window;
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_TRACKED_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, (start, _)| start.elapsed() < window);
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                return;
            }
        }
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    fn refused(
        &self,
        peer: Option<IpAddr>,
        username: Option<&str>,
        failure: AuthFailure,
    ) -> AuthFailure {
        self.stats.auth_failure(failure);
        bump(&self.stats.connections_refused);
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(
                peer = ?peer,
                user = username.unwrap_or(""),
                reason = failure.as_str(),
                suppressed,
                "mqtt connect refused"
            );
        }
        failure
    }

    /// Counts and logs (rate-limited) a publish refused by the ACL.
    pub(crate) fn publish_denied(&self, user: &str, topic: &str) {
        self.stats.auth_failure(AuthFailure::AclDenied);
        self.stats.acl_denied_for(user);
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(user, topic, suppressed, "mqtt publish refused by the ACL");
        }
    }
}

/// The subject common name of a DER certificate (the last CN if several), or `None` when the
/// certificate has none or is not well-formed DER. Only the structure is read: call it on a
/// certificate the TLS layer verified.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN_OID: [u8; 3] = [0x55, 0x04, 0x03];
    let (tag, cert, _) = der_tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = der_tlv(rest)?;
    if tag == 0xA0 {
        rest = after; // [0] version
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = der_tlv(rest)?.2;
    }
    let (tag, mut subject, _) = der_tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut cn = None;
    while !subject.is_empty() {
        let (tag, mut rdn, after) = der_tlv(subject)?;
        subject = after;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, attribute, after) = der_tlv(rdn)?;
            rdn = after;
            if tag != SEQUENCE {
                return None;
            }
            let (oid_tag, oid, value) = der_tlv(attribute)?;
            if oid_tag == 0x06 && oid == CN_OID {
                let (value_tag, value, _) = der_tlv(value)?;
                // UTF8String, PrintableString, IA5String, TeletexString (as Latin-1 is rare).
                if matches!(value_tag, 0x0C | 0x13 | 0x16 | 0x14) {
                    cn = Some(std::str::from_utf8(value).ok()?.to_owned());
                }
            }
        }
    }
    cn
}

/// One DER tag-length-value: (tag, contents, the bytes after it). Single-byte tags only (all
/// the X.509 fields read here), definite lengths up to 4 bytes.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

fn cache_key(user: &str, password: &[u8], phc: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [user.as_bytes(), password, phc.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// At most one log line per `LOG_INTERVAL` for refusals; the lines say how many were not logged.
#[derive(Debug, Default)]
struct LogLimit {
    /// Milliseconds since `epoch` of the last line (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl LogLimit {
    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now = u64::try_from(epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn password_file_round_trips_and_verifies() {
        let mut file = PasswordFile::default();
        let phc = hash_password(b"s3cret", b"0123456789abcdef").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(file.set("imu-1", phc.clone()));
        assert!(!file.set("imu-1", phc.clone()));
        let parsed = PasswordFile::parse(&file.to_text(), Path::new("p")).unwrap();
        assert_eq!(parsed, file);
        let stored = parsed.hash_of("imu-1").unwrap();
        assert!(verify_password(stored, b"s3cret"));
        assert!(!verify_password(stored, b"s3cret "));
        assert!(!verify_password("garbage", b"s3cret"));
        assert_eq!(parsed.hash_of("imu-2"), None);
        assert!(!format!("{parsed:?}").contains("argon2"));
    }

    #[test]
    fn password_file_refuses_bad_lines_with_their_number() {
        let phc = hash_password(b"x", b"0123456789abcdef").unwrap();
        for (text, line) in [
            ("# c\n\nnocolon\n".to_owned(), 3),
            (format!("a:{phc}\na:{phc}\n"), 2),
            (
                "a:$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g\n".to_owned(),
                1,
            ),
            (format!("a/b:{phc}\n"), 1),
            ("a:plaintext\n".to_owned(), 1),
        ] {
            match PasswordFile::parse(&text, Path::new("p")) {
                Err(AuthFileError::Syntax { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn usernames_must_be_valid_topic_levels() {
        assert!(validate_username("imu-7_a.b").is_ok());
        for bad in ["", "a:b", "a/b", "a+", "#", "a b", "a\n"] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filters_follow_mqtt_wildcard_rules() {
        assert!(filter_matches("stream/+", "stream/a"));
        assert!(!filter_matches("stream/+", "stream/a/b"));
        assert!(!filter_matches("stream/+", "stream"));
        assert!(filter_matches("sensors/#", "sensors/a/data"));
        assert!(filter_matches("sensors/#", "sensors"));
        assert!(filter_matches("#", "anything/at/all"));
        assert!(filter_matches("sensors/+/data", "sensors/x/data"));
        assert!(!filter_matches("sensors/+/data", "sensors/x/other"));
        assert!(filter_matches("stream/a", "stream/a"));
        assert!(!filter_matches("stream/a", "stream/ab"));
    }

    #[test]
    fn acl_grants_own_sensor_and_listed_filters_only() {
        let acl = Acl::parse(
            "# gateways\ngw1 stream/+\ngw1 sensors/line-4/data\n",
            Path::new("acl"),
        )
        .unwrap();
        assert!(acl.allows("imu-1", "stream/imu-1", "imu-1"));
        assert!(!acl.allows("imu-1", "stream/imu-2", "imu-2"));
        assert!(acl.allows("gw1", "stream/imu-2", "imu-2"));
        assert!(acl.allows("gw1", "sensors/line-4/data", "line-4"));
        assert!(!acl.allows("gw1", "sensors/line-5/data", "line-5"));
        for bad in ["gw1\n", "gw1 a b\n", "gw1 a/#/b\n", "gw1 a+\n", "g:w a\n"] {
            assert!(Acl::parse(bad, Path::new("acl")).is_err(), "{bad:?}");
        }
    }

    /// A certificate made with Python's `cryptography` (subject C=DE, O=Acme, CN=imu-7;
    /// issuer CN=test CA; a serial number of 9 bytes), as DER.
    const CERT_HEX: [&str; 8] = [
        "308201313081d9a003020102020900ab54a98ceb1f0ad2300a06082a8648ce3d04030230123110300e060355",
        "04030c0774657374204341301e170d3236303130313030303030305a170d3335313233303030303030305a30",
        "2c310b3009060355040613024445310d300b060355040a0c0441636d65310e300c06035504030c05696d752d",
        "373059301306072a8648ce3d020106082a8648ce3d030107034200041ed0283f1461eceb1363a6847fd48e3c",
        "edc825e4f633062c5dafff481c16bd7e6c48b775f4491c0c8b15cab4353eadf3f3df6c9e9d12034708507ade",
        "4e66f42a300a06082a8648ce3d040302034700304402206cae370b86d0c9f643a03b49863cf454c3e77e5077",
        "b047cb787ecf2e7360693c022017014f77dfdd230694c13247f9b6901c8ad27c62bf83e5fffb264eb6a1da4e",
        "b7",
    ];

    fn cert_der() -> Vec<u8> {
        let hex: String = CERT_HEX.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_subject_common_name_is_read_from_a_certificate() {
        let der = cert_der();
        assert_eq!(certificate_common_name(&der).as_deref(), Some("imu-7"));
        // Truncated anywhere: no name, no panic.
        for cut in 0..der.len() {
            assert_eq!(certificate_common_name(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(certificate_common_name(&[]), None);
        assert_eq!(
            certificate_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    fn authenticator(policy: AuthPolicy) -> Authenticator {
        Authenticator::new(
            policy,
            tokio::runtime::Handle::current(),
            Arc::new(IngestStats::default()),
        )
    }

    #[tokio::test]
    async fn verifies_users_and_refuses_anonymous_unless_allowed() {
        let mut users = PasswordFile::default();
        users.set("imu-1", hash_password(b"pw", b"0123456789abcdef").unwrap());
        let auth = authenticator(AuthPolicy {
            users: Some(Arc::new(users)),
            allow_anonymous: false,
            ..AuthPolicy::default()
        });
        let ip = Some(IpAddr::from([10, 0, 0, 1]));
        assert_eq!(
            auth.authenticate(ip, None, Some("imu-1"), Some(b"pw"))
                .await,
            Ok(Identity::User(Arc::from("imu-1")))
        );
        // Cached now; a wrong password still fails.
        assert_eq!(
            auth.authenticate(ip, None, Some("imu-1"), Some(b"pw"))
                .await,
            Ok(Identity::User(Arc::from("imu-1")))
        );
        assert_eq!(
            auth.authenticate(ip, None, Some("imu-1"), Some(b"px"))
                .await,
            Err(AuthFailure::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(ip, None, Some("nobody"), Some(b"pw"))
                .await,
            Err(AuthFailure::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(ip, None, None, None).await,
            Err(AuthFailure::NotAuthorized)
        );
        let snapshot = auth.stats.snapshot();
        assert_eq!(snapshot.auth_failures, [2, 1, 0, 0]);
    }

    #[tokio::test]
    async fn an_address_failing_too_often_is_refused_until_its_window_ends() {
        let auth = authenticator(AuthPolicy {
            allow_anonymous: false,
            max_failed_connects: 3,
            ..AuthPolicy::default()
        });
        let flood = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert_eq!(
                auth.authenticate(flood, None, None, None).await,
                Err(AuthFailure::NotAuthorized)
            );
        }
        assert_eq!(
            auth.authenticate(flood, None, None, None).await,
            Err(AuthFailure::RateLimited)
        );
        // Another address is not affected.
        assert_eq!(
            auth.authenticate(Some(IpAddr::from([10, 0, 0, 3])), None, None, None)
                .await,
            Err(AuthFailure::NotAuthorized)
        );
        assert_eq!(auth.stats.snapshot().auth_failures, [0, 4, 1, 0]);
    }
}
