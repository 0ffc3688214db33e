//! Stages 3 and 6: gap-based sessions per sensor and their periodic aggregates.
//!
//! A session groups a sensor's samples whose event times are no more than the session gap
//! apart. It ends when the next sample comes later than the gap (event time), when the sensor
//! stays silent for the gap (processing time, so idle sensors never leave sessions open), or
//! when the device restarts. Aggregates accumulate per sample; they depend only on the samples,
//! so replaying the same input gives the same final aggregate whatever the emission times.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::{SensorId, SessionAggregate, SessionId, SessionRecord};

/// An active session of one sensor and its running aggregates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveSession {
    pub id: SessionId,
    pub start_us: i64,
    /// Event time of the last sample, µs.
    pub last_event_us: i64,
    /// Processing time the sensor was last heard from, µs.
    pub last_seen_proc_us: i64,
    pub sample_count: u64,
    /// Processing time of the last aggregate emission, µs.
    pub last_emit_us: i64,
    pub agg: Accumulator,
}

/// Running session aggregates (DESIGN stage 6) over the masked `velocity_pred`: velocity counts
/// as 0 where the movement probability is below the threshold (samples below it are not moving
/// and add no distance, whether their velocity was masked already or not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    pub max_velocity: f64,
    /// Σ |v| · dt, metres.
    pub distance_m: f64,
    /// Samples whose movement probability reached the threshold.
    pub moving_samples: u64,
    pub samples: u64,
}

impl Accumulator {
    /// Adds one sample's prediction; `dt_s` is the sample period in seconds.
    pub fn add(&mut self, velocity: f32, movement_prob: f32, threshold: f32, dt_s: f64) {
        self.samples += 1;
        // NaN predictions (a failed model call) count as not moving.
        if movement_prob >= threshold {
            let v = f64::from(velocity).abs();
            self.moving_samples += 1;
            self.distance_m += v * dt_s;
            if v > self.max_velocity {
                self.max_velocity = v;
            }
        }
    }
}

impl ActiveSession {
    /// Starts a session at the first sample's event time.
    pub fn start(sensor_id: &str, first_event_us: i64, now_us: i64) -> Self {
        Self {
            id: Arc::from(format!("{sensor_id}_{first_event_us}")),
            start_us: first_event_us,
            last_event_us: first_event_us,
            last_seen_proc_us: now_us,
            sample_count: 0,
            last_emit_us: now_us,
            agg: Accumulator::default(),
        }
    }

    /// The session as a record; `end_us` is set when it is ending.
    pub fn record(&self, sensor_id: &SensorId, end_us: Option<i64>) -> SessionRecord {
        SessionRecord {
            session_id: self.id.clone(),
            sensor_id: sensor_id.clone(),
            start_us: self.start_us,
            end_us,
            last_seen_us: self.last_event_us,
            sample_count: self.sample_count,
        }
    }

    /// The current aggregate, stamped `emitted_at_us`.
    pub fn aggregate(
        &self,
        sensor_id: &SensorId,
        emitted_at_us: i64,
        dt_s: f64,
    ) -> SessionAggregate {
        let moving_time_s = self.agg.moving_samples as f64 * dt_s;
        SessionAggregate {
            session_id: self.id.clone(),
            sensor_id: sensor_id.clone(),
            emitted_at_us,
            max_velocity: self.agg.max_velocity,
            distance_m: self.agg.distance_m,
            mean_velocity: if moving_time_s > 0.0 {
                self.agg.distance_m / moving_time_s
            } else {
                0.0
            },
            moving_time_s,
            sample_count: self.sample_count,
            duration_s: self.last_event_us.saturating_sub(self.start_us) as f64 / 1e6 + dt_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_is_sensor_and_first_timestamp() {
        let s = ActiveSession::start("imu-7", 1_700_000_000_000_000, 5);
        assert_eq!(&*s.id, "imu-7_1700000000000000");
    }

    #[test]
    fn velocity_below_threshold_counts_as_zero() {
        let mut a = Accumulator::default();
        a.add(2.0, 0.9, 0.5, 0.005);
        a.add(9.0, 0.1, 0.5, 0.005);
        a.add(-1.0, 0.6, 0.5, 0.005);
        assert_eq!(a.samples, 3);
        assert_eq!(a.moving_samples, 2);
        assert!((a.distance_m - 0.015).abs() < 1e-12);
        assert_eq!(a.max_velocity, 2.0);
    }

    #[test]
    fn nan_probability_is_not_moving() {
        let mut a = Accumulator::default();
        a.add(f32::NAN, f32::NAN, 0.5, 0.005);
        assert_eq!(a.moving_samples, 0);
        assert_eq!(a.distance_m, 0.0);
    }

    #[test]
    fn aggregate_mean_velocity_is_distance_over_moving_time() {
        let id: SensorId = Arc::from("s");
        let mut s = ActiveSession::start("s", 0, 0);
        for _ in 0..200 {
            s.agg.add(1.5, 1.0, 0.5, 0.005);
        }
        s.sample_count = 200;
        s.last_event_us = 199 * 5_000;
        let a = s.aggregate(&id, 10, 0.005);
        assert!((a.mean_velocity - 1.5).abs() < 1e-9);
        assert!((a.moving_time_s - 1.0).abs() < 1e-9);
        assert!((a.duration_s - 1.0).abs() < 1e-9);
        assert_eq!(a.sample_count, 200);
    }
}
