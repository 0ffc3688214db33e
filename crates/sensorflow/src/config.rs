//! `sensorflow.toml`: the settings of every role, layered defaults → file → env → flags.
//!
//! The defaults live in one embedded file, `default.toml` (printed by `sensorflow config`), so
//! the documentation of every key and its default value cannot drift apart. Layers are merged as
//! TOML values before deserialising once into [`Config`], whose structs deny unknown keys: a typo
//! in a file or an environment variable is an error, not a silently ignored setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use sensorflow_pipeline::PipelineConfig;
use serde::Deserialize;

/// The documented defaults, embedded in the binary.
pub(crate) const DEFAULT_TOML: &str = include_str!("../default.toml");

/// Keys without a default (commented out in default.toml): absent means `None`.
const OPTIONAL_KEYS: [(&str, &str); 10] = [
    ("tls", "cert_file"),
    ("tls", "key_file"),
    ("tls", "client_ca_file"),
    ("auth", "password_file"),
    ("auth", "acl_file"),
    ("auth", "api_tokens_file"),
    ("pipeline", "movement_threshold"),
    ("model", "path"),
    ("model", "onnxruntime_library"),
    ("lake", "root"),
];

/// Prefix of environment overrides: `SENSORFLOW_<SECTION>_<KEY>`.
const ENV_PREFIX: &str = "SENSORFLOW_";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) data_dir: PathBuf,
    pub(crate) mqtt: MqttConfig,
    pub(crate) http: HttpConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) tls: TlsSettings,
    pub(crate) log: LogSettings,
    pub(crate) pipeline: PipelineConfig,
    pub(crate) runtime: RuntimeConfig,
    pub(crate) checkpoint: CheckpointConfig,
    pub(crate) model: ModelConfig,
    pub(crate) lake: LakeSettings,
    pub(crate) demo: DemoConfig,
    /// Distributed mode (`gateway`, `processor`, `api`).
    pub(crate) kafka: sensorflow_kafka::KafkaConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqttConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) binary_topic: String,
    pub(crate) json_topic: String,
    pub(crate) max_message_bytes: usize,
    pub(crate) receive_maximum: u16,
    pub(crate) max_connections: usize,
    pub(crate) connect_timeout_secs: u64,
    pub(crate) max_client_id_bytes: usize,
    pub(crate) max_persistent_sessions: usize,
    pub(crate) session_expiry_max_secs: u64,
    pub(crate) allow_keep_alive_zero: bool,
    pub(crate) idle_timeout_secs: u64,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_sensor_ids: usize,
    pub(crate) sensor_id_idle_secs: u64,
    pub(crate) max_publishes_per_sec: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) ws_buffer_messages: usize,
    pub(crate) header_read_timeout_secs: u64,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_request_head_bytes: usize,
}

/// `[auth]`: MQTT users, ACL, anonymous access, API tokens, CORS (see default.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthConfig {
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) acl_file: Option<PathBuf>,
    pub(crate) allow_anonymous: bool,
    pub(crate) max_failed_connects: u32,
    pub(crate) failed_connect_window_secs: u64,
    pub(crate) verify_cache_secs: u64,
    pub(crate) api_tokens_file: Option<PathBuf>,
    pub(crate) cors_origins: Vec<String>,
    pub(crate) max_websockets_per_token: usize,
}

/// `[tls]`: certificates for the MQTT TLS listener and HTTPS (see default.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSettings {
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) mqtt_listen: SocketAddr,
    pub(crate) client_ca_file: Option<PathBuf>,
}

/// How appends are made durable before a QoS 1 publish is acknowledged.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DurabilityMode {
    Fsync,
    Batch,
    None,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSettings {
    pub(crate) durability: DurabilityMode,
    pub(crate) batch_interval_ms: u64,
    pub(crate) segment_bytes: u64,
    pub(crate) max_unconsumed_bytes: u64,
    pub(crate) retention_secs: u64,
    pub(crate) retention_bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuntimeConfig {
    pub(crate) batch_records: usize,
    pub(crate) pipeline_threads: usize,
    pub(crate) tick_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckpointConfig {
    pub(crate) interval_secs: f64,
    pub(crate) keep: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelConfig {
    /// Where the ONNX model is (its sidecar beside it); `None`: the bundled demo model.
    pub(crate) path: Option<String>,
    pub(crate) engine: EngineChoice,
    /// ONNX Runtime shared library; `None`: the `ORT_DYLIB_PATH` environment variable.
    pub(crate) onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime threads inside one model call (each pipeline shard has its own session).
    pub(crate) intra_threads: usize,
    pub(crate) fetch_timeout_secs: u64,
    pub(crate) max_bytes: u64,
}

impl ModelConfig {
    pub(crate) fn fetch_limits(&self) -> crate::model_source::FetchLimits {
        crate::model_source::FetchLimits {
            timeout: std::time::Duration::from_secs(self.fetch_timeout_secs.max(1)),
            max_bytes: self.max_bytes,
        }
    }
}

/// `model.engine`: which inference engine runs the model.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EngineChoice {
    /// Native for the contract's LSTM graphs, else ONNX Runtime when its library is found,
    /// else tract.
    Auto,
    Native,
    Onnxruntime,
    Tract,
}

/// `lake.compression`: the Parquet codec of the lake's files.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LakeCompression {
    Lz4,
    /// Level 1.
    Zstd,
    Snappy,
}

impl From<LakeCompression> for sensorflow_lake::Compression {
    fn from(c: LakeCompression) -> Self {
        match c {
            LakeCompression::Lz4 => sensorflow_lake::Compression::Lz4,
            LakeCompression::Zstd => sensorflow_lake::Compression::Zstd { level: 1 },
            LakeCompression::Snappy => sensorflow_lake::Compression::Snappy,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LakeSettings {
    /// `None`: `{data_dir}/lake`.
    pub(crate) root: Option<PathBuf>,
    pub(crate) target_file_bytes: u64,
    pub(crate) max_file_age_secs: u64,
    pub(crate) row_group_rows: usize,
    pub(crate) compression: LakeCompression,
    pub(crate) sync_every_bytes: u64,
    pub(crate) max_open_partitions: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DemoConfig {
    pub(crate) sensors: usize,
    pub(crate) rate_hz: f64,
}

impl Config {
    /// Loads defaults, then `file` if given, then `SENSORFLOW_*` variables from `env`.
    pub(crate) fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut value: toml::Table =
            toml::from_str(DEFAULT_TOML).context("embedded default.toml is invalid")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let layer: toml::Table = toml::from_str(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?;
            merge(&mut value, layer);
        }
        apply_env(&mut value, env)?;
        let config: Config = toml::Value::Table(value)
            .try_into()
            .context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// Reports every invalid setting at once.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        let mut problems: Vec<String> = self
            .pipeline
            .validate()
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        for (key, pattern) in [
            ("mqtt.binary_topic", &self.mqtt.binary_topic),
            ("mqtt.json_topic", &self.mqtt.json_topic),
        ] {
            if pattern.matches("{sensor_id}").count() != 1 {
                problems.push(format!(
                    "{key}: must contain {{sensor_id}} exactly once, got {pattern:?}"
                ));
            }
        }
        for (key, value, min, max) in [
            (
                "mqtt.connect_timeout_secs",
                self.mqtt.connect_timeout_secs,
                1,
                65_535,
            ),
            (
                "mqtt.max_client_id_bytes",
                self.mqtt.max_client_id_bytes as u64,
                1,
                65_535,
            ),
            (
                "mqtt.max_persistent_sessions",
                self.mqtt.max_persistent_sessions as u64,
                1,
                u64::MAX,
            ),
            (
                "mqtt.session_expiry_max_secs",
                self.mqtt.session_expiry_max_secs,
                0,
                u64::MAX,
            ),
            (
                "mqtt.idle_timeout_secs",
                self.mqtt.idle_timeout_secs,
                1,
                65_535,
            ),
            (
                "http.max_request_head_bytes",
                self.http.max_request_head_bytes as u64,
                8192,
                16 << 20,
            ),
            (
                "mqtt.max_connections_per_ip",
                self.mqtt.max_connections_per_ip as u64,
                1,
                u64::MAX,
            ),
            (
                "mqtt.max_sensor_ids",
                self.mqtt.max_sensor_ids as u64,
                1,
                u64::MAX,
            ),
            (
                "http.header_read_timeout_secs",
                self.http.header_read_timeout_secs,
                1,
                3600,
            ),
            (
                "http.max_connections_per_ip",
                self.http.max_connections_per_ip as u64,
                1,
                u64::MAX,
            ),
            (
                "http.max_connections",
                self.http.max_connections as u64,
                1,
                u64::MAX,
            ),
        ] {
            if !(min..=max).contains(&value) {
                problems.push(format!(
                    "{key}: must be between {min} and {max}, got {value}"
                ));
            }
        }
        if self.runtime.batch_records == 0 {
            problems.push("runtime.batch_records: must be at least 1".into());
        }
        if !(self.checkpoint.interval_secs.is_finite() && self.checkpoint.interval_secs > 0.0) {
            problems.push(format!(
                "checkpoint.interval_secs: must be positive, got {}",
                self.checkpoint.interval_secs
            ));
        }
        if self.checkpoint.keep == 0 {
            problems.push("checkpoint.keep: must be at least 1".into());
        }
        if self.runtime.pipeline_threads == 0 || self.runtime.pipeline_threads > 64 {
            problems.push("runtime.pipeline_threads: must be 1 to 64".into());
        }
        if self.runtime.tick_ms == 0 {
            problems.push("runtime.tick_ms: must be at least 1".into());
        }
        if self.lake.max_open_partitions == 0 {
            problems.push("lake.max_open_partitions: must be at least 1".into());
        }
        if self.demo.rate_hz <= 0.0 {
            problems.push("demo.rate_hz: must be positive".into());
        }
        problems.extend(self.kafka.validate().iter().map(|e| e.to_string()));
        if !problems.is_empty() {
            bail!("invalid configuration:\n  {}", problems.join("\n  "));
        }
        Ok(())
    }

    /// Ingest's settings from `[mqtt]` (the MQTT listener of `run` and `gateway`).
    pub(crate) fn ingest_config(&self) -> anyhow::Result<sensorflow_ingest::IngestConfig> {
        let mqtt = &self.mqtt;
        Ok(sensorflow_ingest::IngestConfig {
            listen: mqtt.listen,
            binary_topic: sensorflow_ingest::TopicPattern::parse(&mqtt.binary_topic)?,
            json_topic: sensorflow_ingest::TopicPattern::parse(&mqtt.json_topic)?,
            max_message_bytes: mqtt.max_message_bytes,
            receive_maximum: mqtt.receive_maximum,
            max_connections: mqtt.max_connections,
            connect_timeout: Duration::from_secs(mqtt.connect_timeout_secs),
            max_client_id_bytes: mqtt.max_client_id_bytes,
            max_persistent_sessions: mqtt.max_persistent_sessions,
            session_expiry_max: Duration::from_secs(mqtt.session_expiry_max_secs),
            allow_keep_alive_zero: mqtt.allow_keep_alive_zero,
            idle_timeout: Duration::from_secs(mqtt.idle_timeout_secs),
            max_connections_per_ip: mqtt.max_connections_per_ip,
            max_sensor_ids: mqtt.max_sensor_ids,
            sensor_id_idle: Duration::from_secs(mqtt.sensor_id_idle_secs),
            max_publishes_per_sec: mqtt.max_publishes_per_sec,
            ..sensorflow_ingest::IngestConfig::default()
        })
    }

    /// The lake writer's settings from `[lake]`, for a lake at `root` (a directory or a
    /// [`sensorflow_lake::LakeLocation`]).
    pub(crate) fn lake_config(
        &self,
        root: impl Into<sensorflow_lake::LakeLocation>,
    ) -> sensorflow_lake::LakeConfig {
        sensorflow_lake::LakeConfig {
            target_file_bytes: self.lake.target_file_bytes,
            max_file_age: std::time::Duration::from_secs(self.lake.max_file_age_secs),
            row_group_rows: self.lake.row_group_rows,
            sync_every_bytes: self.lake.sync_every_bytes,
            max_open_partitions: self.lake.max_open_partitions,
            compression: self.lake.compression.into(),
            ..sensorflow_lake::LakeConfig::new(root)
        }
    }

    /// Where the lake lives: `lake.root` (a directory, or `s3://bucket/prefix` configured by
    /// the standard AWS variables) or `{data_dir}/lake`. An object-store lake encodes its files
    /// in `{data_dir}/lake-staging` before uploading them.
    pub(crate) fn lake_location(&self) -> anyhow::Result<sensorflow_lake::LakeLocation> {
        let root = self.lake_root();
        match root.to_str() {
            Some(url) if url.contains("://") => {
                sensorflow_lake::LakeLocation::parse(url, self.data_dir.join("lake-staging"))
                    .context("lake.root")
            }
            _ => Ok(sensorflow_lake::LakeLocation::Dir(root)),
        }
    }

    /// Root of the lake as configured: a directory or a URL.
    pub(crate) fn lake_root(&self) -> PathBuf {
        self.lake
            .root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("lake"))
    }
}

/// Overlays `layer` on `base`, table by table.
fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `SENSORFLOW_<SECTION>_<KEY>` overrides. The name is matched against the keys that
/// exist (sections and keys contain underscores, so the split is found by lookup, not guessed).
/// A value is parsed as a TOML literal when it is one (numbers, booleans) and taken as a string
/// otherwise. Unknown `SENSORFLOW_*` names that look like settings are errors.
fn apply_env(
    value: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    let mut paths = Vec::new();
    collect_paths(value, &mut Vec::new(), &mut paths);
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some(path) = paths
            .iter()
            .find(|p| p.join("_").eq_ignore_ascii_case(rest))
        else {
            // Other SENSORFLOW_ variables (the simulator's, RUST_LOG-like ones) are not ours.
            continue;
        };
        let parsed = parse_env_value(&raw);
        set_path(value, path, parsed).with_context(|| format!("applying {name}"))?;
    }
    Ok(())
}

fn collect_paths(table: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (key, value) in table {
        prefix.push(key.clone());
        match value {
            toml::Value::Table(t) => collect_paths(t, prefix, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
    // Keys documented but commented out in default.toml (optional ones) can be set from the
    // environment too.
    for (section, key) in OPTIONAL_KEYS {
        if prefix.as_slice() == [section] {
            out.push(vec![section.into(), key.into()]);
        }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> anyhow::Result<()> {
    let (last, parents) = path.split_last().context("empty key path")?;
    let mut current = table;
    for key in parents {
        current = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("{key} is not a section"))?;
    }
    // Keep strings strings: "0.0.0.0:1883" and "batch" must not be mangled, and a numeric-looking
    // value for a string key (a topic "1") is still a string.
    let value = match (current.get(last), value) {
        (Some(toml::Value::String(_)), v) if !v.is_str() => toml::Value::String(v.to_string()),
        (_, v) => v,
    };
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_load_and_validate() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.mqtt.listen.port(), 1883);
        assert_eq!(c.http.listen.port(), 8000);
        assert_eq!(c.log.durability, DurabilityMode::Batch);
        assert_eq!(c.lake_root(), PathBuf::from("./data/lake"));
    }

    #[test]
    fn env_overrides_keys_with_underscores_in_section_and_key() {
        let c = Config::load(
            None,
            env(&[
                ("SENSORFLOW_MQTT_LISTEN", "127.0.0.1:1999"),
                ("SENSORFLOW_PIPELINE_SESSION_GAP_SECS", "30"),
                ("SENSORFLOW_LOG_DURABILITY", "fsync"),
                ("SENSORFLOW_DATA_DIR", "/tmp/x"),
                ("SENSORFLOW_PIPELINE_MOVEMENT_THRESHOLD", "0.7"),
                ("SENSORFLOW_SIM_SENSORS", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.mqtt.listen.port(), 1999);
        assert_eq!(c.pipeline.session_gap_secs, 30.0);
        assert_eq!(c.log.durability, DurabilityMode::Fsync);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.pipeline.movement_threshold, Some(0.7));
    }

    #[test]
    fn kafka_section_has_the_design_defaults_and_takes_file_and_env_layers() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.kafka.topics.ingest, "imu-data-all");
        assert_eq!(c.kafka.topics.sessions, "new-session-topic");
        assert_eq!((c.kafka.partitions, c.kafka.replication_factor), (12, 1));
        assert!(c.kafka.client.is_empty());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[kafka]\nbrokers = \"k1:9092,k2:9092\"\n[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\"linger.ms\" = 20\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("SENSORFLOW_KAFKA_TOPICS_INGEST", "raw-imu"),
                ("SENSORFLOW_KAFKA_REPLICATION_FACTOR", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.kafka.topics.ingest, "raw-imu");
        assert_eq!(c.kafka.replication_factor, 3);
        let props = c.kafka.client_properties(&[]);
        assert_eq!(props["security.protocol"], "SASL_SSL");
        assert_eq!(props["linger.ms"], "20");

        let err = format!(
            "{:#}",
            Config::load(None, env(&[("SENSORFLOW_KAFKA_PARTITIONS", "0")])).unwrap_err()
        );
        assert!(err.contains("kafka.partitions"), "{err}");
    }

    #[test]
    fn file_layer_with_unknown_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "[mqtt]\nlisten = \"127.0.0.1:1\"\nlisenn = 3\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&path), env(&[])).unwrap_err());
        assert!(err.contains("lisenn"), "{err}");
    }

    #[test]
    fn validation_lists_every_problem() {
        let err = format!(
            "{:#}",
            Config::load(
                None,
                env(&[
                    ("SENSORFLOW_MQTT_BINARY_TOPIC", "stream/x"),
                    ("SENSORFLOW_LAKE_MAX_OPEN_PARTITIONS", "0"),
                    ("SENSORFLOW_PIPELINE_WINDOW_SECS", "0")
                ]),
            )
            .unwrap_err()
        );
        assert!(err.contains("mqtt.binary_topic"), "{err}");
        assert!(err.contains("lake.max_open_partitions"), "{err}");
        assert!(err.contains("pipeline.window_secs"), "{err}");
    }

    #[test]
    fn an_unknown_enum_value_names_the_allowed_ones() {
        let err = format!(
            "{:#}",
            Config::load(None, env(&[("SENSORFLOW_LAKE_COMPRESSION", "brotli")])).unwrap_err()
        );
        assert!(
            err.contains("brotli") && err.contains("lz4") && err.contains("zstd"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            Config::load(None, env(&[("SENSORFLOW_MODEL_ENGINE", "cuda")])).unwrap_err()
        );
        assert!(err.contains("cuda") && err.contains("native"), "{err}");
    }

    #[test]
    fn optional_paths_are_absent_by_default_and_settable_from_the_environment() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(
            (c.model.path.as_deref(), c.lake.root.as_deref()),
            (None, None)
        );
        assert_eq!(c.lake_root(), c.data_dir.join("lake"));
        let c = Config::load(
            None,
            env(&[
                ("SENSORFLOW_MODEL_PATH", "https://example.test/m.onnx"),
                ("SENSORFLOW_LAKE_ROOT", "/srv/lake"),
            ]),
        )
        .unwrap();
        assert_eq!(c.model.path.as_deref(), Some("https://example.test/m.onnx"));
        assert_eq!(c.lake_root(), PathBuf::from("/srv/lake"));
        assert_eq!(
            (c.model.engine, c.lake.compression),
            (EngineChoice::Auto, LakeCompression::Lz4)
        );
    }

    #[test]
    fn the_lake_root_may_be_an_s3_url_staged_under_the_data_dir() {
        use sensorflow_lake::LakeLocation;
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(
            c.lake_location().unwrap(),
            LakeLocation::Dir(c.data_dir.join("lake"))
        );
        let c = Config::load(
            None,
            env(&[("SENSORFLOW_LAKE_ROOT", "s3://sensor-lake/prod")]),
        )
        .unwrap();
        match c.lake_location().unwrap() {
            LakeLocation::Objects(o) => {
                assert_eq!(o.url(), "s3://sensor-lake/prod");
                assert_eq!(o.prefix().as_ref(), "prod");
                assert_eq!(o.staging_dir(), c.data_dir.join("lake-staging"));
            }
            other => panic!("{other:?}"),
        }
        let c = Config::load(None, env(&[("SENSORFLOW_LAKE_ROOT", "gs://b/p")])).unwrap();
        assert!(c.lake_location().is_err());
    }
}
