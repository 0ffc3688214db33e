//! Deterministic synthetic IMU motion: the signal each virtual sensor produces.
//!
//! This is the generator the bundled demo model was trained on; its constants and formulas
//! mirror `scripts/train_demo_model.py` ("Synthetic motion") and the two must be kept in
//! step. A sensor alternates rest and motion segments (the first is either with equal
//! probability):
//!
//! - rest, U(3, 10) s: acc = (0, 0, 1) g + N(0, 0.01), gyro = N(0, 0.5) deg/s per axis;
//! - motion, U(5, 20) s at a speed v ~ U(0.8, 3.5) m/s, with t = seconds since the segment
//!   started, step frequency f = 1.4 + 0.5 v Hz and φ = 2π f t:
//!   acc = (0.30 v sin φ, 0.15 v sin φ/2, 1 + 0.25 v sin(φ + 0.5)) g + N(0, 0.02),
//!   gyro = (40 v sin(φ + 1), 25 v sin φ/2, 10 v sin φ) deg/s + N(0, 1).
//!
//! The signal is not ramped; the ground truth ([`MotionGenerator::speed`]) ramps linearly over
//! the first and last 0.5 s of a motion segment, exactly like the training targets. The
//! training script does not model the magnetometer or the temperature; here the field is
//! ~0.4 gauss rotating slowly about the vertical, and the temperature sits near 25 °C with a
//! slow drift, so dashboards show plausible values.
//!
//! Cost matters (thousands of sensors × 200 Hz on one core): the sines come from unit
//! rotors advanced by one complex multiplication per sample instead of `sin()` calls, the RNG
//! is [`SmallRng`], and Gaussian noise is an Irwin–Hall sum of four 16-bit uniforms drawn
//! from one `u64` (variance-exact, tails cut at ±3.46 σ, which noise of this kind never
//! misses). A generator is reproducible from its seed within one build of the binary;
//! `SmallRng` does not promise the same stream across `rand` versions or platforms.

use std::f64::consts::{PI, TAU};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use sensorflow_protocol::imu::PhysSample;

/// Rest segment length bounds, seconds.
const REST_SECS: (f64, f64) = (3.0, 10.0);
/// Motion segment length bounds, seconds.
const MOTION_SECS: (f64, f64) = (5.0, 20.0);
/// Segment speed bounds, m/s.
const SPEED_MPS: (f64, f64) = (0.8, 3.5);
/// Ground-truth ramp at both ends of a motion segment, seconds.
const RAMP_SECS: f64 = 0.5;
const REST_ACC_NOISE_G: f64 = 0.01;
const REST_GYRO_NOISE_DPS: f64 = 0.5;
const MOTION_ACC_NOISE_G: f64 = 0.02;
const MOTION_GYRO_NOISE_DPS: f64 = 1.0;

/// Horizontal and vertical components of the simulated geomagnetic field (gauss): an
/// inclination of about 60°, |B| ≈ 0.40 gauss. Vertical is negative because acc z points up.
const MAG_HORIZONTAL_GAUSS: f64 = 0.20;
const MAG_VERTICAL_GAUSS: f64 = -0.346;
const MAG_NOISE_GAUSS: f64 = 0.003;
/// Bounds of the per-sensor heading rotation rate, rad/s (either sense).
const HEADING_RATE_RAD_S: (f64, f64) = (0.01, 0.05);

/// Temperature in raw counts, LSM6-style: 256 counts per °C, 0 = 25 °C. Each sensor sits at
/// a fixed offset within ±1 °C and drifts by ±0.5 °C over a 10-minute period.
const TEMP_OFFSET_RAW: f64 = 256.0;
const TEMP_DRIFT_RAW: f64 = 128.0;
const TEMP_DRIFT_PERIOD_SECS: f64 = 600.0;

/// cos 0.5 and sin 0.5, cos 1 and sin 1: phase offsets of acc_z and gyro_x.
const COS_HALF: f64 = 0.877_582_561_890_372_7;
const SIN_HALF: f64 = 0.479_425_538_604_203;
const COS_ONE: f64 = 0.540_302_305_868_139_8;
const SIN_ONE: f64 = 0.841_470_984_807_896_5;

/// Seeded generator of one virtual sensor's IMU samples, one call per sample period.
///
/// Two generators built with the same seed and rate yield identical sample sequences.
#[derive(Debug, Clone)]
pub(crate) struct MotionGenerator {
    rng: SmallRng,
    rate_hz: f64,
    /// Ground-truth ramp length in samples.
    ramp_samples: f64,
    /// Kind of the current segment.
    in_motion: bool,
    /// Length of the current segment, samples.
    segment_len: u64,
    /// Index within the segment of the next sample to produce.
    position: u64,
    /// Speed of the current motion segment (m/s); 0 at rest.
    segment_speed: f64,
    /// Ground truth of the last sample produced.
    last_speed: f64,
    /// (cos, sin) of the half step phase θ = φ/2 = π f t, and its per-sample increment.
    half_phase: Rotor,
    half_phase_step: Rotor,
    heading: Rotor,
    heading_step: Rotor,
    temp_offset: f64,
    temp_drift: Rotor,
    temp_drift_step: Rotor,
}

impl MotionGenerator {
    /// Creates a generator for a sensor sampling at `rate_hz` (must be positive), seeded by
    /// `seed`. The first segment starts with the first sample.
    pub(crate) fn new(seed: u64, rate_hz: f64) -> Self {
        debug_assert!(rate_hz > 0.0, "sample rate must be positive");
        let mut rng = SmallRng::seed_from_u64(seed);
        let heading_rate =
            uniform(&mut rng, HEADING_RATE_RAD_S) * if rng.random::<bool>() { 1.0 } else { -1.0 };
        let heading = Rotor::from_angle(uniform(&mut rng, (0.0, TAU)));
        let temp_offset = uniform(&mut rng, (-TEMP_OFFSET_RAW, TEMP_OFFSET_RAW));
        let temp_drift = Rotor::from_angle(uniform(&mut rng, (0.0, TAU)));
        let in_motion = rng.random::<bool>();
        let mut generator = Self {
            rng,
            rate_hz,
            ramp_samples: RAMP_SECS * rate_hz,
            in_motion: false,
            segment_len: 0,
            position: 0,
            segment_speed: 0.0,
            last_speed: 0.0,
            half_phase: Rotor::IDENTITY,
            half_phase_step: Rotor::IDENTITY,
            heading,
            heading_step: Rotor::from_angle(heading_rate / rate_hz),
            temp_offset,
            temp_drift,
            temp_drift_step: Rotor::from_angle(TAU / (TEMP_DRIFT_PERIOD_SECS * rate_hz)),
        };
        generator.start_segment(in_motion);
        generator
    }

    /// Produces the next sample, in physical units (g, deg/s, gauss, raw temperature).
    pub(crate) fn next_sample(&mut self) -> PhysSample {
        if self.position >= self.segment_len {
            self.start_segment(!self.in_motion);
        }
        let (acc, gyro) = if self.in_motion {
            self.motion_signal()
        } else {
            self.last_speed = 0.0;
            let acc = [
                REST_ACC_NOISE_G * self.gauss(),
                REST_ACC_NOISE_G * self.gauss(),
                1.0 + REST_ACC_NOISE_G * self.gauss(),
            ];
            let gyro = [
                REST_GYRO_NOISE_DPS * self.gauss(),
                REST_GYRO_NOISE_DPS * self.gauss(),
                REST_GYRO_NOISE_DPS * self.gauss(),
            ];
            (acc, gyro)
        };
        self.position += 1;

        let mag = [
            MAG_HORIZONTAL_GAUSS * self.heading.cos + MAG_NOISE_GAUSS * self.gauss(),
            MAG_HORIZONTAL_GAUSS * self.heading.sin + MAG_NOISE_GAUSS * self.gauss(),
            MAG_VERTICAL_GAUSS + MAG_NOISE_GAUSS * self.gauss(),
        ];
        self.heading.advance(self.heading_step);
        // Bounded by ±(256 + 128) counts, well inside i16.
        let temp_raw = (self.temp_offset + TEMP_DRIFT_RAW * self.temp_drift.sin).round() as i16;
        self.temp_drift.advance(self.temp_drift_step);

        PhysSample {
            acc: acc.map(|v| v as f32),
            gyro: gyro.map(|v| v as f32),
            mag: mag.map(|v| v as f32),
            temp_raw,
        }
    }

    /// Whether the last sample produced lies in a motion segment (ground truth).
    #[allow(
        dead_code,
        reason = "ground truth for tests and load-test accuracy checks"
    )]
    pub(crate) fn is_moving(&self) -> bool {
        self.in_motion
    }

    /// Ground-truth velocity of the last sample produced, m/s: the segment speed, ramped
    /// linearly over the first and last 0.5 s of a motion segment; 0 at rest. This is the
    /// model's training target.
    #[allow(
        dead_code,
        reason = "ground truth for tests and load-test accuracy checks"
    )]
    pub(crate) fn speed(&self) -> f32 {
        self.last_speed as f32
    }

    fn start_segment(&mut self, in_motion: bool) {
        let bounds = if in_motion { MOTION_SECS } else { REST_SECS };
        // Drawn in seconds and rounded to whole samples, like the training script.
        self.segment_len = ((uniform(&mut self.rng, bounds) * self.rate_hz).round() as u64).max(1);
        self.position = 0;
        self.in_motion = in_motion;
        if in_motion {
            self.segment_speed = uniform(&mut self.rng, SPEED_MPS);
            let step_hz = 1.4 + 0.5 * self.segment_speed;
            self.half_phase = Rotor::IDENTITY;
            self.half_phase_step = Rotor::from_angle(PI * step_hz / self.rate_hz);
        } else {
            self.segment_speed = 0.0;
        }
    }

    fn motion_signal(&mut self) -> ([f64; 3], [f64; 3]) {
        let v = self.segment_speed;
        // θ = φ/2, so sin φ = 2 sin θ cos θ and cos φ = cos² θ − sin² θ.
        let Rotor {
            cos: cos_half,
            sin: sin_half,
        } = self.half_phase;
        let sin_phi = 2.0 * sin_half * cos_half;
        let cos_phi = cos_half * cos_half - sin_half * sin_half;
        self.half_phase.advance(self.half_phase_step);

        let acc = [
            0.30 * v * sin_phi + MOTION_ACC_NOISE_G * self.gauss(),
            0.15 * v * sin_half + MOTION_ACC_NOISE_G * self.gauss(),
            1.0 + 0.25 * v * (sin_phi * COS_HALF + cos_phi * SIN_HALF)
                + MOTION_ACC_NOISE_G * self.gauss(),
        ];
        let gyro = [
            40.0 * v * (sin_phi * COS_ONE + cos_phi * SIN_ONE)
                + MOTION_GYRO_NOISE_DPS * self.gauss(),
            25.0 * v * sin_half + MOTION_GYRO_NOISE_DPS * self.gauss(),
            10.0 * v * sin_phi + MOTION_GYRO_NOISE_DPS * self.gauss(),
        ];

        let k = self.position as f64;
        let last = (self.segment_len - 1) as f64;
        let ramp = (k / self.ramp_samples)
            .min((last - k) / self.ramp_samples)
            .clamp(0.0, 1.0);
        self.last_speed = v * ramp;
        (acc, gyro)
    }

    /// A standard normal variate, approximated by the Irwin–Hall sum of four uniforms.
    fn gauss(&mut self) -> f64 {
        // Each 16-bit lane is uniform on 0..=65535 (mean 32767.5, variance ≈ 65536²/12), so
        // the sum has mean 2 · 65535 and standard deviation ≈ 65536 / √3.
        const SCALE: f64 = 1.732_050_807_568_877_2 / 65_536.0;
        let x = self.rng.next_u64();
        let sum = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        (sum as f64 - 2.0 * 65_535.0) * SCALE
    }
}

fn uniform(rng: &mut SmallRng, (low, high): (f64, f64)) -> f64 {
    low + (high - low) * rng.random::<f64>()
}

/// A unit complex number (cos α, sin α), rotated in place by multiplication.
#[derive(Debug, Clone, Copy)]
struct Rotor {
    cos: f64,
    sin: f64,
}

impl Rotor {
    const IDENTITY: Self = Self { cos: 1.0, sin: 0.0 };

    fn from_angle(angle: f64) -> Self {
        let (sin, cos) = angle.sin_cos();
        Self { cos, sin }
    }

    /// Rotates by `step`, then pulls the magnitude back to 1 (one Newton step on 1/|z|), so
    /// rounding never accumulates into a growing or decaying amplitude over long runs.
    fn advance(&mut self, step: Rotor) {
        let cos = self.cos * step.cos - self.sin * step.sin;
        let sin = self.sin * step.cos + self.cos * step.sin;
        let correction = 1.5 - 0.5 * (cos * cos + sin * sin);
        self.cos = cos * correction;
        self.sin = sin * correction;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RATE: f64 = 200.0;

    fn accl_mag(s: &PhysSample) -> f64 {
        s.acc
            .iter()
            .map(|&a| f64::from(a).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    fn gyro_mag(s: &PhysSample) -> f64 {
        s.gyro
            .iter()
            .map(|&g| f64::from(g).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    fn mean(values: &[f64]) -> f64 {
        values.iter().sum::<f64>() / values.len() as f64
    }

    fn std_dev(values: &[f64]) -> f64 {
        let m = mean(values);
        (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
    }

    /// Samples of `seconds` of one generator, with the ground truth after each.
    fn run(seed: u64, seconds: f64) -> Vec<(PhysSample, bool, f32)> {
        let mut generator = MotionGenerator::new(seed, RATE);
        (0..(seconds * RATE) as usize)
            .map(|_| {
                let sample = generator.next_sample();
                (sample, generator.is_moving(), generator.speed())
            })
            .collect()
    }

    #[test]
    fn same_seed_yields_identical_samples_and_different_seeds_do_not() {
        let a = run(7, 30.0);
        let b = run(7, 30.0);
        let c = run(8, 30.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn rest_is_one_g_and_still_while_motion_shakes_at_the_segment_speed() {
        let samples: Vec<_> = (0..20).flat_map(|seed| run(seed, 120.0)).collect();
        let (moving, resting): (Vec<_>, Vec<_>) = samples.iter().partition(|(_, m, _)| *m);
        assert!(
            moving.len() > 10_000 && resting.len() > 10_000,
            "both kinds of segment occur"
        );

        let rest_acc: Vec<f64> = resting.iter().map(|(s, _, _)| accl_mag(s)).collect();
        let rest_gyro: Vec<f64> = resting.iter().map(|(s, _, _)| gyro_mag(s)).collect();
        assert!(
            (mean(&rest_acc) - 1.0).abs() < 0.002,
            "rest |acc| {}",
            mean(&rest_acc)
        );
        assert!(
            std_dev(&rest_acc) < 0.015,
            "rest |acc| std {}",
            std_dev(&rest_acc)
        );
        // |N(0, 0.5)³| has mean 0.5·√(8/π) ≈ 0.80 deg/s.
        assert!(
            (mean(&rest_gyro) - 0.80).abs() < 0.05,
            "rest |gyro| {}",
            mean(&rest_gyro)
        );
        assert!(resting.iter().all(|(_, _, speed)| *speed == 0.0));

        let move_acc: Vec<f64> = moving.iter().map(|(s, _, _)| accl_mag(s)).collect();
        let move_gyro: Vec<f64> = moving.iter().map(|(s, _, _)| gyro_mag(s)).collect();
        assert!(std_dev(&move_acc) > 10.0 * std_dev(&rest_acc));
        assert!(
            mean(&move_gyro) > 30.0,
            "motion |gyro| {} deg/s",
            mean(&move_gyro)
        );
        let top_speed = moving.iter().map(|(_, _, v)| *v).fold(0.0, f32::max);
        assert!((0.8..=3.5).contains(&top_speed), "speed {top_speed}");
    }

    #[test]
    fn segments_alternate_within_their_length_bounds_and_speed_ramps_at_both_ends() {
        let samples = run(3, 600.0);
        // Lengths of complete runs of equal `is_moving` (the first and last may be cut).
        let mut runs: Vec<(bool, usize, usize)> = Vec::new(); // (moving, start, len)
        for (i, (_, moving, _)) in samples.iter().enumerate() {
            match runs.last_mut() {
                Some((kind, _, len)) if kind == moving => *len += 1,
                _ => runs.push((*moving, i, 1)),
            }
        }
        assert!(runs.len() > 20, "{} segments in 10 minutes", runs.len());
        for &(moving, start, len) in &runs[1..runs.len() - 1] {
            let secs = len as f64 / RATE;
            let (low, high) = if moving { MOTION_SECS } else { REST_SECS };
            assert!(
                (low..=high).contains(&secs),
                "segment of {secs} s (moving: {moving})"
            );
            if moving {
                let speed = |k: usize| samples[start + k].2;
                assert_eq!(speed(0), 0.0, "ramp starts from rest");
                assert_eq!(speed(len - 1), 0.0, "ramp ends at rest");
                let plateau = speed(len / 2);
                assert!(
                    (speed(50) - plateau / 2.0).abs() < 1e-4,
                    "halfway up after 0.25 s"
                );
                assert_eq!(speed(100), plateau);
            }
        }
    }

    #[test]
    fn motion_signal_follows_the_training_formulas() {
        // Rotor recurrences against closed-form sines: a whole 20 s segment stays within
        // noise-free tolerance of φ = 2π f t.
        let mut generator = MotionGenerator::new(11, RATE);
        generator.start_segment(true);
        generator.segment_len = 4000;
        let v = generator.segment_speed;
        let f = 1.4 + 0.5 * v;
        for k in 0..4000 {
            let phi = TAU * f * k as f64 / RATE;
            let Rotor { cos, sin } = generator.half_phase;
            assert!(
                (sin - (phi / 2.0).sin()).abs() < 1e-9 && (cos - (phi / 2.0).cos()).abs() < 1e-9
            );
            let sample = generator.next_sample();
            let expected_gyro_x = 40.0 * v * (phi + 1.0).sin();
            // Noise is N(0, 1) deg/s, truncated at ±3.47.
            assert!(
                (f64::from(sample.gyro[0]) - expected_gyro_x).abs() < 3.5,
                "k = {k}"
            );
            let expected_acc_z = 1.0 + 0.25 * v * (phi + 0.5).sin();
            assert!(
                (f64::from(sample.acc[2]) - expected_acc_z).abs() < 0.07,
                "k = {k}"
            );
        }
    }

    #[test]
    fn noise_is_standard_normal_in_mean_and_variance() {
        let mut generator = MotionGenerator::new(5, RATE);
        let draws: Vec<f64> = (0..200_000).map(|_| generator.gauss()).collect();
        assert!(mean(&draws).abs() < 0.01);
        assert!((std_dev(&draws) - 1.0).abs() < 0.01);
    }

    #[test]
    fn magnetic_field_and_temperature_stay_plausible() {
        for (sample, _, _) in run(9, 60.0) {
            let b = sample
                .mag
                .iter()
                .map(|&m| f64::from(m).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((0.38..0.42).contains(&b), "|B| = {b}");
            assert!(
                (-384..=384).contains(&sample.temp_raw),
                "temp_raw {}",
                sample.temp_raw
            );
        }
    }
}
