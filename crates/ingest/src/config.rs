//! Ingest configuration: listener, topic patterns and the limits that shape backpressure.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Errors found while validating an [`IngestConfig`] or parsing a [`TopicPattern`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A topic pattern is not of the form `literal/{sensor_id}/literal` (see [`TopicPattern`]).
    #[error("invalid topic pattern {pattern:?}: {reason}")]
    TopicPattern {
        /// The pattern as given.
        pattern: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A numeric or structural setting is out of range.
    #[error("invalid ingest setting `{field}`: {reason}")]
    Invalid {
        /// The `IngestConfig` field name.
        field: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
}

/// The placeholder segment that captures the sensor id.
const SENSOR_ID: &str = "{sensor_id}";

/// A topic template with exactly one `{sensor_id}` segment, e.g. `stream/{sensor_id}` or
/// `sensors/{sensor_id}/data`.
///
/// Every other segment is a literal; MQTT wildcards (`+`, `#`) and other `{...}` placeholders
/// are refused. A topic matches when all literal segments are equal and the sensor segment is
/// non-empty, so the sensor id never contains `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    source: String,
    /// Everything before `{sensor_id}`: empty or ending in `/`.
    prefix: String,
    /// Everything after `{sensor_id}`: empty or starting with `/`.
    suffix: String,
}

impl TopicPattern {
    /// Parses a pattern; fails unless it holds exactly one whole `{sensor_id}` segment and only
    /// non-empty literal segments besides it.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let fail = |reason| ConfigError::TopicPattern {
            pattern: s.to_owned(),
            reason,
        };
        let mut placeholder = None;
        for (i, segment) in s.split('/').enumerate() {
            if segment == SENSOR_ID {
                if placeholder.replace(i).is_some() {
                    return Err(fail("more than one {sensor_id} segment"));
                }
            } else if segment.is_empty() {
                return Err(fail("empty topic level"));
            } else if segment.contains(['+', '#']) {
                return Err(fail("wildcards are not allowed in a publish topic pattern"));
            } else if segment.contains(['{', '}']) {
                return Err(fail("only a whole {sensor_id} segment may use braces"));
            }
        }
        if placeholder.is_none() {
            return Err(fail("missing a {sensor_id} segment"));
        }
        let at = s
            .find(SENSOR_ID)
            .ok_or_else(|| fail("missing a {sensor_id} segment"))?;
        Ok(Self {
            source: s.to_owned(),
            prefix: s[..at].to_owned(),
            suffix: s[at + SENSOR_ID.len()..].to_owned(),
        })
    }

    /// Returns the sensor id if `topic` matches this pattern, borrowed from `topic`.
    pub fn match_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let id = topic
            .strip_prefix(&self.prefix)?
            .strip_suffix(&self.suffix)?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
    }

    /// The pattern as it was written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for TopicPattern {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Settings of the MQTT ingest listener. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Listen address; port 0 picks a free port (see [`crate::IngestServer::local_addr`]).
    /// Default `0.0.0.0:1883`.
    pub listen: SocketAddr,
    /// Topic carrying binary IMU packets. Default `stream/{sensor_id}`.
    pub binary_topic: TopicPattern,
    /// Topic carrying JSON packets. Default `sensors/{sensor_id}/data`.
    pub json_topic: TopicPattern,
    /// Largest payload stored; larger messages are read and discarded, counted as `oversize`.
    /// Default 256 KiB.
    pub max_message_bytes: usize,
    /// In-flight QoS 1/2 publishes per client. Advertised as MQTT 5 Receive Maximum, and the cap
    /// on concurrently processed packets for MQTT 3.1.1 (beyond it the connection is not read).
    /// Default 1024.
    pub receive_maximum: u16,
    /// Total bytes of publishes in flight per connection before the server stops reading it.
    /// Default 16 MiB.
    pub max_inflight_bytes: usize,
    /// Concurrent MQTT sessions; further CONNECTs are refused with "server unavailable"/
    /// "server busy". Default 100 000.
    pub max_connections: usize,
    /// ntex worker threads serving connections. Default 1.
    pub workers: usize,
    /// Time a client has to send CONNECT after the TCP connection opened. Default 10 s.
    pub connect_timeout: Duration,
    /// Upper bound on [`crate::IngestServer::stop`] waiting for in-flight appends. Default 30 s.
    pub shutdown_timeout: Duration,
    /// Longest client id accepted; longer ones are refused in CONNACK (3.1.1: 0x02 identifier
    /// rejected, 5.0: 0x85 client identifier not valid). Default 256.
    pub max_client_id_bytes: usize,
    /// Persistent sessions (clean session = false / session expiry > 0) kept at most; when a
    /// new one would exceed it, the session detached longest ago is forgotten. Default 100 000.
    pub max_persistent_sessions: usize,
    /// Longest time a persistent session is kept after its client went away, whatever the
    /// client asked for (MQTT 3.1.1 has no expiry at all). Default 7 days.
    pub session_expiry_max: Duration,
    /// Whether a client may connect with keep-alive 0 (no keep-alive) and stay connected
    /// while silent forever. Default false: such clients get `idle_timeout` instead.
    pub allow_keep_alive_zero: bool,
    /// Idle limit of a connection whose client asked for keep-alive 0 (when
    /// `allow_keep_alive_zero` is false): closed after this long without a packet. MQTT 5
    /// clients are told in CONNACK (Server Keep Alive). Default 300 s.
    pub idle_timeout: Duration,
    /// Concurrent MQTT sessions from one source address; further CONNECTs from it are refused
    /// (3.1.1: server unavailable, 5.0: 0x97 quota exceeded). Default 1000.
    pub max_connections_per_ip: usize,
    /// Distinct sensor ids accepted; a message for a new id beyond it is refused (MQTT 5:
    /// PUBACK 0x97) while known ids keep working. Default 100 000.
    pub max_sensor_ids: usize,
    /// A sensor id silent this long is forgotten when room is needed. Default 1 h.
    pub sensor_id_idle: Duration,
    /// Publishes per second per connection (one second of burst); beyond it publishes are
    /// delayed, which slows the client down. 0: unlimited. Default 1000.
    pub max_publishes_per_sec: u32,
    /// Who may connect and what users may publish. Default: anonymous clients accepted.
    pub auth: crate::auth::AuthPolicy,
    /// The MQTT-over-TLS listener, if any. Default none.
    pub tls: Option<MqttTls>,
}

/// A second listener speaking MQTT over TLS (rustls), served like the plain one.
#[derive(Clone)]
pub struct MqttTls {
    /// Listen address; port 0 picks a free port (see [`crate::IngestServer::tls_addr`]).
    pub listen: SocketAddr,
    /// The rustls configuration. With a client certificate verifier, a verified certificate's
    /// subject common name is the connection's username (see [`crate::auth`]). A certificate
    /// resolver that swaps its key pair reloads certificates without a restart.
    pub server_config: std::sync::Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTls")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Room above `max_message_bytes` for a PUBLISH's topic (at most 65 535 bytes), packet id and
/// MQTT 5 properties, so that a payload a little over the limit is still read, discarded and
/// counted `oversize` instead of closing the connection.
pub const PACKET_OVERHEAD_BYTES: usize = 64 * 1024 + 1024;

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 1883)),
            binary_topic: TopicPattern {
                source: "stream/{sensor_id}".into(),
                prefix: "stream/".into(),
                suffix: String::new(),
            },
            json_topic: TopicPattern {
                source: "sensors/{sensor_id}/data".into(),
                prefix: "sensors/".into(),
                suffix: "/data".into(),
            },
            max_message_bytes: 256 * 1024,
            receive_maximum: 1024,
            max_inflight_bytes: 16 * 1024 * 1024,
            max_connections: 100_000,
            workers: 1,
            connect_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_client_id_bytes: 256,
            max_persistent_sessions: 100_000,
            session_expiry_max: Duration::from_secs(7 * 24 * 3600),
            allow_keep_alive_zero: false,
            idle_timeout: Duration::from_secs(300),
            max_connections_per_ip: 1000,
            max_sensor_ids: 100_000,
            sensor_id_idle: Duration::from_secs(3600),
            max_publishes_per_sec: 1000,
            auth: crate::auth::AuthPolicy::default(),
            tls: None,
        }
    }
}

impl IngestConfig {
    /// Checks the settings; reports the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason| Err(ConfigError::Invalid { field, reason });
        if self
            .binary_topic
            .match_topic_pattern_overlaps(&self.json_topic)
        {
            return invalid("json_topic", "binary_topic and json_topic must differ");
        }
        if self.max_message_bytes == 0 {
            return invalid("max_message_bytes", "must be > 0");
        }
        if self.receive_maximum == 0 {
            return invalid("receive_maximum", "must be > 0");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be > 0");
        }
        if self.workers == 0 {
            return invalid("workers", "must be > 0");
        }
        if self.connect_timeout.as_secs() == 0 {
            return invalid("connect_timeout", "must be at least one second");
        }
        if self.connect_timeout.as_secs() > u64::from(u16::MAX) {
            return invalid("connect_timeout", "must be at most 65535 seconds");
        }
        if self.max_packet_bytes() > u32::MAX as usize >> 4 {
            // The MQTT remaining length field tops out at 256 MiB.
            return invalid("max_message_bytes", "must be below 256 MiB");
        }
        if self.max_client_id_bytes == 0 {
            return invalid("max_client_id_bytes", "must be > 0");
        }
        if self.max_connections_per_ip == 0 {
            return invalid("max_connections_per_ip", "must be > 0");
        }
        if self.max_sensor_ids == 0 {
            return invalid("max_sensor_ids", "must be > 0");
        }
        if self.max_persistent_sessions == 0 {
            return invalid("max_persistent_sessions", "must be > 0");
        }
        if self.idle_timeout.as_secs() == 0 || self.idle_timeout.as_secs() > u64::from(u16::MAX) {
            return invalid("idle_timeout", "must be between 1 and 65535 seconds");
        }
        Ok(())
    }

    /// Largest MQTT packet (remaining length) the codec accepts: `max_message_bytes` plus
    /// [`PACKET_OVERHEAD_BYTES`]. A packet declaring more closes the connection before any of
    /// its body is buffered; MQTT 5 clients are told in CONNACK (Maximum Packet Size).
    pub fn max_packet_bytes(&self) -> usize {
        self.max_message_bytes.saturating_add(PACKET_OVERHEAD_BYTES)
    }
}

impl TopicPattern {
    /// True when both patterns are the same template (a topic could then match both).
    fn match_topic_pattern_overlaps(&self, other: &TopicPattern) -> bool {
        self.prefix == other.prefix && self.suffix == other.suffix
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn extracts_sensor_id_from_both_default_patterns() {
        let cfg = IngestConfig::default();
        assert_eq!(cfg.binary_topic.match_topic("stream/imu-7"), Some("imu-7"));
        assert_eq!(
            cfg.json_topic.match_topic("sensors/imu-7/data"),
            Some("imu-7")
        );
        assert_eq!(
            TopicPattern::parse("stream/{sensor_id}").unwrap(),
            cfg.binary_topic
        );
        assert_eq!(
            TopicPattern::parse("sensors/{sensor_id}/data").unwrap(),
            cfg.json_topic
        );
    }

    #[test]
    fn rejects_topics_with_other_shapes() {
        let p = TopicPattern::parse("sensors/{sensor_id}/data").unwrap();
        for topic in [
            "sensors//data",
            "sensors/a/b/data",
            "sensors/a/data/x",
            "sensor/a/data",
            "x",
        ] {
            assert_eq!(p.match_topic(topic), None, "{topic}");
        }
        let p = TopicPattern::parse("stream/{sensor_id}").unwrap();
        assert_eq!(p.match_topic("stream/"), None);
        assert_eq!(p.match_topic("stream/a/b"), None);
    }

    #[test]
    fn pattern_may_start_with_the_placeholder() {
        let p = TopicPattern::parse("{sensor_id}/imu").unwrap();
        assert_eq!(p.match_topic("dev1/imu"), Some("dev1"));
        assert_eq!(p.match_topic("/imu"), None);
    }

    #[test]
    fn refuses_malformed_patterns() {
        for bad in [
            "stream",
            "stream/{sensor_id}/{sensor_id}",
            "stream/+/{sensor_id}",
            "stream/#",
            "stream/x{sensor_id}",
            "stream//{sensor_id}",
            "{other}/{sensor_id}",
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_config_is_valid_and_identical_topics_are_not() {
        let mut cfg = IngestConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        cfg.json_topic = cfg.binary_topic.clone();
        assert!(cfg.validate().is_err());
    }
}
