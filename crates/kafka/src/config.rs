//! [`KafkaConfig`]: the `[kafka]` section of `sensorflow.toml`, shared by every distributed role.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// The `[kafka]` section. Defaults live in the binary's `default.toml`; this struct only
/// describes and checks them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// Partitions of a topic this platform creates (existing topics are left as they are).
    pub partitions: i32,
    /// Replication factor of a topic this platform creates: 1 for a single broker, 3 in
    /// production.
    pub replication_factor: i32,
    /// Topic names.
    pub topics: TopicNames,
    /// The processor role's settings.
    #[serde(default)]
    pub processor: ProcessorSettings,
    /// librdkafka properties passed through as they are (`"security.protocol" = "SASL_SSL"`,
    /// `"sasl.mechanism" = "SCRAM-SHA-512"`, …); they override this crate's defaults. Secrets
    /// belong in `SENSORFLOW_KAFKA_CLIENT_<NAME>` variables (see [`KafkaConfig::apply_client_env`]),
    /// not in the file.
    #[serde(default)]
    pub client: BTreeMap<String, ClientValue>,
}

/// Names of the topics of DESIGN.md's distributed mode.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopicNames {
    /// Ingest records, key sensor_id (`imu-data-all`).
    pub ingest: String,
    /// Sample rows as JSON (`sensor-data-transformed`).
    pub transformed: String,
    /// Session aggregate rows as JSON (`sensor-data-aggregated`).
    pub aggregated: String,
    /// Session events as JSON (`new-session-topic`).
    pub sessions: String,
    /// Window rows as JSON (`sensor-windows`).
    pub windows: String,
    /// Gap rows as JSON (`sensor-gaps`).
    pub gaps: String,
    /// Late sample rows as JSON (`sensor-late`).
    pub late: String,
    /// The processors' state changelog, compacted, one partition per ingest partition
    /// (`sensorflow-processor-state`).
    #[serde(default = "default_changelog")]
    pub changelog: String,
}

fn default_changelog() -> String {
    "sensorflow-processor-state".into()
}

/// `[kafka.processor]`: the processor role's consumer group and transactions.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSettings {
    /// The consumer group on the ingest topic.
    pub group_id: String,
    /// One transaction (outputs, state checkpoints, lake files, offsets) per this many ms:
    /// what `read_committed` readers of the outputs wait at most, and how often lake files are
    /// committed per partition.
    pub commit_interval_ms: u64,
    /// A processor silent this long leaves the group and its partitions move (the broker's
    /// `group.min.session.timeout.ms`, 6000 by default, is the least it accepts).
    pub session_timeout_ms: u64,
    /// The broker aborts a dead processor's open transaction after this long; until then
    /// `read_committed` readers of the partitions it wrote wait.
    pub transaction_timeout_ms: u64,
    /// Stable id of this replica (e.g. a StatefulSet pod name) in its transactional id, so a
    /// restart fences and aborts its predecessor's transaction at once; empty: random per start.
    pub instance_id: String,
    /// The stall watchdog: a processor whose loop stays this long in one step (a poll, a
    /// commit, a restore) exits with status 70 so that its supervisor restarts it; its open
    /// transaction is aborted and its partitions resume from their checkpoints. 0 turns it off.
    pub stall_timeout_ms: u64,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            group_id: "sensorflow-processor".into(),
            commit_interval_ms: 1000,
            session_timeout_ms: 6000,
            transaction_timeout_ms: 10_000,
            instance_id: String::new(),
            // Kafka's own bound on a consumer stuck between polls (`max.poll.interval.ms`); a
            // restore may legitimately take two RESTORE_TIMEOUTs (240 s).
            stall_timeout_ms: 300_000,
        }
    }
}

/// A pass-through property value: TOML strings, integers, floats and booleans are all given to
/// librdkafka as their text (`linger.ms = 5` and `linger.ms = "5"` mean the same).
#[derive(Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClientValue {
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl fmt::Display for ClientValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientValue::String(s) => f.write_str(s),
            ClientValue::Integer(i) => write!(f, "{i}"),
            ClientValue::Float(x) => write!(f, "{x}"),
            ClientValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl fmt::Debug for ClientValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// Prefix of environment variables that set a pass-through property: the rest of the name in
/// upper case with `.` written as `_` (librdkafka's property names contain no `_`), e.g.
/// `SENSORFLOW_KAFKA_CLIENT_SASL_PASSWORD` sets `sasl.password`.
pub const CLIENT_ENV_PREFIX: &str = "SENSORFLOW_KAFKA_CLIENT_";

/// Why a `[kafka]` section is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A setting is out of range or empty.
    #[error("kafka.{key}: {problem}")]
    Invalid {
        /// The key, relative to `[kafka]`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl KafkaConfig {
    /// Every problem of the section at once (empty when valid).
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, problem: &str| {
            problems.push(ConfigError::Invalid {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            bad("brokers", "no broker given (host:port[,host:port…])");
        }
        for b in self
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            if !b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                bad("brokers", &format!("`{b}` is not host:port"));
            }
        }
        if self.partitions < 1 {
            bad("partitions", "must be at least 1");
        }
        if self.replication_factor < 1 {
            bad("replication_factor", "must be at least 1");
        }
        let t = &self.topics;
        for (key, name) in [
            ("topics.ingest", &t.ingest),
            ("topics.transformed", &t.transformed),
            ("topics.aggregated", &t.aggregated),
            ("topics.sessions", &t.sessions),
            ("topics.windows", &t.windows),
            ("topics.gaps", &t.gaps),
            ("topics.late", &t.late),
            ("topics.changelog", &t.changelog),
        ] {
            if !valid_topic_name(name) {
                bad(
                    key,
                    &format!("`{name}` is not a Kafka topic name (1-249 of [a-zA-Z0-9._-])"),
                );
            }
        }
        if self.client.contains_key("bootstrap.servers") {
            bad(
                "client",
                "set the brokers with kafka.brokers, not client.\"bootstrap.servers\"",
            );
        }
        problems
    }

    /// Adds `SENSORFLOW_KAFKA_CLIENT_<NAME>` variables of `env` to [`KafkaConfig::client`]
    /// (they win over the file): `SENSORFLOW_KAFKA_CLIENT_SASL_PASSWORD=…` sets
    /// `sasl.password`, so secrets stay out of the file.
    pub fn apply_client_env(&mut self, env: impl IntoIterator<Item = (String, String)>) {
        for (name, value) in env {
            if let Some(rest) = name.strip_prefix(CLIENT_ENV_PREFIX)
                && !rest.is_empty()
            {
                let key = rest.to_ascii_lowercase().replace('_', ".");
                self.client.insert(key, ClientValue::String(value));
            }
        }
    }

    /// The librdkafka properties of a client of this cluster: `bootstrap.servers`, then
    /// `defaults` (the role's own, e.g. the producer's idempotence), then the pass-through
    /// [`KafkaConfig::client`] properties, which win.
    pub fn client_properties(&self, defaults: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut props = BTreeMap::new();
        props.insert("bootstrap.servers".to_owned(), self.brokers.clone());
        for (k, v) in defaults {
            props.insert((*k).to_owned(), (*v).to_owned());
        }
        for (k, v) in &self.client {
            props.insert(k.clone(), v.to_string());
        }
        props
    }
}

/// Whether a property's value must not appear in logs (passwords, keys, tokens).
pub fn is_secret_property(name: &str) -> bool {
    ["password", "secret", "key", "token", "jaas"]
        .iter()
        .any(|s| name.contains(s))
        && !name.ends_with(".location")
}

fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    const SECTION: &str = r#"
        brokers = "127.0.0.1:9092,kafka-1:9092"
        partitions = 12
        replication_factor = 1
        [topics]
        ingest = "imu-data-all"
        transformed = "sensor-data-transformed"
        aggregated = "sensor-data-aggregated"
        sessions = "new-session-topic"
        windows = "sensor-windows"
        gaps = "sensor-gaps"
        late = "sensor-late"
        [client]
        "security.protocol" = "SASL_SSL"
        "linger.ms" = 20
        "enable.ssl.certificate.verification" = false
    "#;

    fn parse(text: &str) -> KafkaConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_section_with_pass_through_properties_parses_and_validates() {
        let c = parse(SECTION);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.topics.ingest, "imu-data-all");
        let props = c.client_properties(&[("linger.ms", "5"), ("acks", "all")]);
        assert_eq!(props["bootstrap.servers"], "127.0.0.1:9092,kafka-1:9092");
        assert_eq!(props["security.protocol"], "SASL_SSL");
        // Pass-through wins over a role's default; other defaults stay.
        assert_eq!(props["linger.ms"], "20");
        assert_eq!(props["acks"], "all");
        assert_eq!(props["enable.ssl.certificate.verification"], "false");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = SECTION.replace("partitions = 12", "partitions = 12\npartitons = 3");
        assert!(toml::from_str::<KafkaConfig>(&text).is_err());
    }

    #[test]
    fn validation_lists_every_problem() {
        let text = SECTION
            .replace("127.0.0.1:9092,kafka-1:9092", "kafka-1,")
            .replace("partitions = 12", "partitions = 0")
            .replace("replication_factor = 1", "replication_factor = 0")
            .replace("\"sensor-gaps\"", "\"sensor gaps\"");
        let problems: Vec<String> = parse(&text)
            .validate()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("`kafka-1` is not host:port"));
        assert!(problems.iter().any(|p| p.starts_with("kafka.partitions")));
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("kafka.replication_factor"))
        );
        assert!(problems.iter().any(|p| p.starts_with("kafka.topics.gaps")));
    }

    #[test]
    fn client_env_variables_become_dotted_properties_and_win() {
        let mut c = parse(SECTION);
        c.apply_client_env([
            (
                "SENSORFLOW_KAFKA_CLIENT_SASL_PASSWORD".to_owned(),
                "s3cret".to_owned(),
            ),
            (
                "SENSORFLOW_KAFKA_CLIENT_LINGER_MS".to_owned(),
                "1".to_owned(),
            ),
            (
                "SENSORFLOW_KAFKA_BROKERS".to_owned(),
                "ignored:1".to_owned(),
            ),
        ]);
        let props = c.client_properties(&[]);
        assert_eq!(props["sasl.password"], "s3cret");
        assert_eq!(props["linger.ms"], "1");
        assert_eq!(props["bootstrap.servers"], "127.0.0.1:9092,kafka-1:9092");
        assert!(is_secret_property("sasl.password"));
        assert!(is_secret_property("ssl.key.password"));
        assert!(!is_secret_property("ssl.key.location"));
        assert!(!is_secret_property("linger.ms"));
    }
}
