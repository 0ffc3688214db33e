//! Pipeline settings (the `[pipeline]` section of `sensorflow.toml`).

use serde::{Deserialize, Serialize};

/// Settings of the pipeline operators. Times are in the unit their suffix names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Device sample rate; sample `i` of a packet is at `timestamp_us + i * 1e6 / rate`.
    pub sample_rate_hz: f64,
    /// A sensor's session ends after this much silence (event time, and processing time for
    /// sensors that go quiet).
    pub session_gap_secs: f64,
    /// Size of the tumbling window features.
    pub window_secs: f64,
    /// How far behind a sensor's newest sample its watermark trails.
    pub allowed_lateness_secs: f64,
    /// Processing-time interval between session aggregate emissions.
    pub aggregate_interval_secs: f64,
    /// Movement threshold for aggregates; `None` takes the model sidecar's.
    pub movement_threshold: Option<f32>,
    /// Bound of each sensor's framing buffer (bytes of incomplete packets kept between messages).
    pub max_framing_buffer_bytes: usize,
    /// Largest accepted sample count of one binary packet.
    pub max_samples_per_packet: u16,
    /// Samples whose event time is more than this before the time the platform received them
    /// are not processed as live data: they go to the `quarantine` table, counted as
    /// `timestamp_out_of_range`. A device with a broken clock must not reach a stage that
    /// cannot handle its dates (lake partitions, windows, sessions). Default 7 days.
    pub event_time_max_past_secs: f64,
    /// Likewise for event times more than this after the receive time. Default 1 day.
    pub event_time_max_future_secs: f64,
    /// Most sensors whose state the pipeline keeps. When a new sensor arrives at the bound, the
    /// least recently heard from are evicted (their sessions end with reason `evicted`), so
    /// memory stays bounded whatever ids clients invent. Default 100 000.
    pub max_sensors: usize,
    /// A sensor not heard from for this long (processing time) has its state dropped (framing
    /// buffer, dedupe position, windows, model state); its session ended after the session gap
    /// already. Must be at least `session_gap_secs`. Default 1 hour.
    pub sensor_idle_evict_secs: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            sample_rate_hz: 200.0,
            session_gap_secs: 600.0,
            window_secs: 1.0,
            allowed_lateness_secs: 2.0,
            aggregate_interval_secs: 2.0,
            movement_threshold: None,
            max_framing_buffer_bytes: 64 * 1024,
            max_samples_per_packet: 1024,
            event_time_max_past_secs: 7.0 * 86_400.0,
            event_time_max_future_secs: 86_400.0,
            max_sensors: 100_000,
            sensor_idle_evict_secs: 3_600.0,
        }
    }
}

/// Problems found by [`PipelineConfig::validate`].
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("pipeline.{key}: {message}")]
pub struct ConfigError {
    pub key: &'static str,
    pub message: String,
}

impl PipelineConfig {
    /// Reports every invalid setting at once.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut positive = |key: &'static str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                errors.push(ConfigError {
                    key,
                    message: format!("must be a positive number, got {v}"),
                });
            }
        };
        positive("sample_rate_hz", self.sample_rate_hz);
        positive("session_gap_secs", self.session_gap_secs);
        positive("window_secs", self.window_secs);
        positive("aggregate_interval_secs", self.aggregate_interval_secs);
        positive("event_time_max_past_secs", self.event_time_max_past_secs);
        positive(
            "event_time_max_future_secs",
            self.event_time_max_future_secs,
        );
        positive("sensor_idle_evict_secs", self.sensor_idle_evict_secs);
        if !(self.allowed_lateness_secs.is_finite() && self.allowed_lateness_secs >= 0.0) {
            errors.push(ConfigError {
                key: "allowed_lateness_secs",
                message: format!("must be zero or more, got {}", self.allowed_lateness_secs),
            });
        }
        if let Some(t) = self.movement_threshold
            && !(0.0..=1.0).contains(&t)
        {
            errors.push(ConfigError {
                key: "movement_threshold",
                message: format!("must be within 0..=1, got {t}"),
            });
        }
        if self.sensor_idle_evict_secs < self.session_gap_secs {
            errors.push(ConfigError {
                key: "sensor_idle_evict_secs",
                message: format!(
                    "must be at least session_gap_secs ({}), got {}: a sensor's session ends before its state is dropped",
                    self.session_gap_secs, self.sensor_idle_evict_secs
                ),
            });
        }
        if self.max_sensors == 0 {
            errors.push(ConfigError {
                key: "max_sensors",
                message: "must be at least 1".into(),
            });
        }
        if self.max_samples_per_packet == 0 {
            errors.push(ConfigError {
                key: "max_samples_per_packet",
                message: "must be at least 1".into(),
            });
        }
        errors
    }

    pub(crate) fn period_us(&self) -> i64 {
        (1e6 / self.sample_rate_hz).round() as i64
    }

    /// Seconds to µs; `as` saturates, so absurd settings cannot wrap.
    pub(crate) fn secs_to_us(secs: f64) -> i64 {
        (secs * 1e6).round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(PipelineConfig::default().validate().is_empty());
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = PipelineConfig {
            sample_rate_hz: 0.0,
            window_secs: -1.0,
            movement_threshold: Some(2.0),
            ..PipelineConfig::default()
        };
        let keys: Vec<_> = c.validate().into_iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            vec!["sample_rate_hz", "window_secs", "movement_threshold"]
        );
    }
}
