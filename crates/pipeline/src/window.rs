//! Stage 4: tumbling event-time windows per sensor, with a per-sensor watermark.
//!
//! The watermark of a sensor is its maximum event time minus the allowed lateness; a window
//! `[start, start + size)` is emitted once the watermark reaches its end. Because watermarks are
//! per sensor, an idle or disconnected sensor never holds back the others. A sample whose window
//! was already emitted is late: the caller counts it and writes it to the `late` table; it is
//! never silently dropped.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::WindowRecord;

/// Running statistics of one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct OpenWindow {
    start_us: i64,
    count: u64,
    accl: Moments,
    gyro: Moments,
}

/// Count-free running moments: sum, sum of squares, min and max.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Moments {
    sum: f64,
    sum_sq: f64,
    min: f64,
    max: f64,
}

impl Default for Moments {
    fn default() -> Self {
        Self {
            sum: 0.0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Moments {
    fn add(&mut self, x: f64) {
        self.sum += x;
        self.sum_sq += x * x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Mean and population standard deviation over `n` values.
    fn mean_std(&self, n: u64) -> (f64, f64) {
        let n = n as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        (mean, var.sqrt())
    }
}

/// Outcome of adding one sample to [`SensorWindows`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// The sample went into an open window.
    InWindow,
    /// The sample's window was already emitted; the value is the watermark at that moment.
    Late { watermark_us: i64 },
}

/// The open windows and watermark of one sensor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SensorWindows {
    /// Open windows ordered by start. Usually one or two: samples arrive nearly in order.
    open: VecDeque<OpenWindow>,
    /// Highest event time seen, µs; `None` before the first sample.
    max_event_us: Option<i64>,
    /// Every window ending at or before this has been emitted.
    emitted_until_us: i64,
}

impl SensorWindows {
    /// The current watermark: max event time minus `lateness_us` (`i64::MIN` before any sample).
    pub fn watermark(&self, lateness_us: i64) -> i64 {
        self.max_event_us
            .map_or(i64::MIN, |m| m.saturating_sub(lateness_us))
    }

    /// Adds one sample at event time `ts` with its two magnitudes.
    pub fn add(
        &mut self,
        ts: i64,
        accl_mag: f32,
        gyro_mag: f32,
        size_us: i64,
        lateness_us: i64,
    ) -> Added {
        let start = window_start(ts, size_us);
        if self.max_event_us.is_some() && start.saturating_add(size_us) <= self.emitted_until_us {
            return Added::Late {
                watermark_us: self.watermark(lateness_us),
            };
        }
        self.max_event_us = Some(self.max_event_us.map_or(ts, |m| m.max(ts)));
        let pos = self.open.iter().position(|w| w.start_us >= start);
        let window = match pos {
            Some(i) if self.open[i].start_us == start => &mut self.open[i],
            Some(i) => {
                self.open.insert(i, OpenWindow::new(start));
                &mut self.open[i]
            }
            None => {
                self.open.push_back(OpenWindow::new(start));
                let last = self.open.len() - 1;
                &mut self.open[last]
            }
        };
        window.count += 1;
        window.accl.add(f64::from(accl_mag));
        window.gyro.add(f64::from(gyro_mag));
        Added::InWindow
    }

    /// Emits every window whose end is at or before the watermark.
    pub fn emit_ready(
        &mut self,
        sensor_id: &Arc<str>,
        size_us: i64,
        lateness_us: i64,
        out: &mut Vec<WindowRecord>,
    ) {
        self.emit_until(self.watermark(lateness_us), sensor_id, size_us, out);
    }

    /// Emits every open window, as when the sensor goes idle.
    pub fn emit_all(&mut self, sensor_id: &Arc<str>, size_us: i64, out: &mut Vec<WindowRecord>) {
        self.emit_until(i64::MAX, sensor_id, size_us, out);
    }

    fn emit_until(
        &mut self,
        until_us: i64,
        sensor_id: &Arc<str>,
        size_us: i64,
        out: &mut Vec<WindowRecord>,
    ) {
        while let Some(w) = self.open.front() {
            if w.start_us.saturating_add(size_us) > until_us {
                break;
            }
            let Some(w) = self.open.pop_front() else {
                break;
            };
            let end = w.start_us.saturating_add(size_us);
            self.emitted_until_us = self.emitted_until_us.max(end);
            out.push(w.into_record(sensor_id.clone(), size_us));
        }
        if until_us != i64::MAX && until_us > self.emitted_until_us {
            // Windows that never got a sample are also closed: a sample for them is late.
            self.emitted_until_us = window_start(until_us, size_us);
        }
    }

    /// Number of windows still open.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

/// Start of the window of size `size_us` holding `ts`. Saturates instead of wrapping: event
/// times are checked for plausibility before they get here, but an operator must not be able to
/// overflow whatever it is fed.
fn window_start(ts: i64, size_us: i64) -> i64 {
    ts.saturating_sub(ts.rem_euclid(size_us))
}

impl OpenWindow {
    fn new(start_us: i64) -> Self {
        Self {
            start_us,
            count: 0,
            accl: Moments::default(),
            gyro: Moments::default(),
        }
    }

    fn into_record(self, sensor_id: Arc<str>, size_us: i64) -> WindowRecord {
        let (accl_mean, accl_std) = self.accl.mean_std(self.count);
        let (gyro_mean, gyro_std) = self.gyro.mean_std(self.count);
        WindowRecord {
            sensor_id,
            window_start_us: self.start_us,
            window_end_us: self.start_us.saturating_add(size_us),
            count: self.count,
            accl_mag_mean: accl_mean,
            accl_mag_std: accl_std,
            accl_mag_min: self.accl.min,
            accl_mag_max: self.accl.max,
            gyro_mag_mean: gyro_mean,
            gyro_mag_std: gyro_std,
            gyro_mag_min: self.gyro.min,
            gyro_mag_max: self.gyro.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000;
    const LATE: i64 = 2 * SEC;

    fn id() -> Arc<str> {
        Arc::from("s1")
    }

    #[test]
    fn window_is_emitted_only_when_watermark_passes_its_end() {
        let mut w = SensorWindows::default();
        let mut out = Vec::new();
        for i in 0..200 {
            w.add(i * 5_000, 1.0, 0.0, SEC, LATE);
        }
        w.emit_ready(&id(), SEC, LATE, &mut out);
        assert!(out.is_empty(), "watermark is 1 s - 2 s, nothing can close");
        w.add(3 * SEC, 1.0, 0.0, SEC, LATE);
        w.emit_ready(&id(), SEC, LATE, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].window_start_us, 0);
        assert_eq!(out[0].window_end_us, SEC);
        assert_eq!(out[0].count, 200);
    }

    #[test]
    fn statistics_are_mean_population_std_min_max() {
        let mut w = SensorWindows::default();
        let mut out = Vec::new();
        for (i, x) in [1.0f32, 2.0, 3.0, 4.0].into_iter().enumerate() {
            w.add(i as i64 * 1_000, x, 2.0 * x, SEC, LATE);
        }
        w.emit_all(&id(), SEC, &mut out);
        let r = &out[0];
        assert_eq!(r.count, 4);
        assert!((r.accl_mag_mean - 2.5).abs() < 1e-12);
        assert!((r.accl_mag_std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!((r.accl_mag_min, r.accl_mag_max), (1.0, 4.0));
        assert!((r.gyro_mag_mean - 5.0).abs() < 1e-12);
    }

    #[test]
    fn sample_for_an_emitted_window_is_late_and_not_counted() {
        let mut w = SensorWindows::default();
        let mut out = Vec::new();
        w.add(100, 1.0, 1.0, SEC, LATE);
        w.add(5 * SEC, 1.0, 1.0, SEC, LATE);
        w.emit_ready(&id(), SEC, LATE, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            w.add(200, 1.0, 1.0, SEC, LATE),
            Added::Late {
                watermark_us: 3 * SEC
            }
        );
        // A window that never had samples but lies below the watermark is closed too.
        assert_eq!(
            w.add(SEC + 1, 1.0, 1.0, SEC, LATE),
            Added::Late {
                watermark_us: 3 * SEC
            }
        );
        // Within allowed lateness is fine.
        assert_eq!(w.add(3 * SEC + 1, 1.0, 1.0, SEC, LATE), Added::InWindow);
    }

    #[test]
    fn extreme_event_times_saturate_instead_of_wrapping() {
        let mut w = SensorWindows::default();
        let mut out = Vec::new();
        assert_eq!(w.add(i64::MIN, 1.0, 1.0, SEC, LATE), Added::InWindow);
        assert_eq!(w.add(i64::MAX, 1.0, 1.0, SEC, LATE), Added::InWindow);
        w.emit_ready(&id(), SEC, LATE, &mut out);
        w.emit_all(&id(), SEC, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| r.window_start_us <= r.window_end_us));
    }

    #[test]
    fn out_of_order_samples_within_lateness_land_in_their_window() {
        let mut w = SensorWindows::default();
        let mut out = Vec::new();
        w.add(SEC + 10, 1.0, 0.0, SEC, LATE);
        w.add(10, 3.0, 0.0, SEC, LATE);
        w.emit_all(&id(), SEC, &mut out);
        assert_eq!(
            out.iter().map(|r| r.window_start_us).collect::<Vec<_>>(),
            vec![0, SEC]
        );
        assert_eq!(out[0].accl_mag_max, 3.0);
    }
}
