//! Builders shared by the pipeline's integration tests: the bundled demo model, deterministic
//! device motion, packets from the real encoder and ingest records. Each test file keeps its own
//! short `packet`/`rec` wrappers, which say how that file's scenarios pick seeds and times.

// Each test file uses a part of this module.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, OnceLock};

use sensorflow_model::Model;
use sensorflow_protocol::imu::{PhysSample, RawSample, encode_packet};
use sensorflow_protocol::record::{IngestRecord, PayloadFormat};

/// Sample period at 200 Hz, µs.
pub const P: u64 = 5_000;
/// Event time of the first sample of the scenarios, µs since the epoch.
pub const T0: u64 = 1_700_000_000_000_000;
/// Processing time of the scenarios, 100 s after `T0`.
pub const NOW: i64 = 1_700_000_100_000_000;
pub const SEC: i64 = 1_000_000;

/// The demo model, loaded once per test binary.
pub fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(Model::demo().expect("demo model loads")))
        .clone()
}

/// `n` samples of a periodic motion whose amplitude is `(seed % 3) * 0.5 + rest` (so `rest = 0`
/// makes every third seed stand still), continuing the phase of earlier seeds.
pub fn motion(n: usize, seed: u32, rest: f32) -> Vec<RawSample> {
    (0..n)
        .map(|i| {
            let t = (seed as f32 * 1000.0 + i as f32) * 0.005;
            let a = (seed % 3) as f32 * 0.5 + rest;
            RawSample::from_physical(&PhysSample {
                acc: [
                    0.3 * a * (12.0 * t).sin(),
                    0.1 * a * (6.0 * t).sin(),
                    1.0 + 0.25 * a * (12.0 * t + 0.5).sin(),
                ],
                gyro: [
                    40.0 * a * (12.0 * t + 1.0).sin(),
                    25.0 * a * (6.0 * t).sin(),
                    10.0 * a * (12.0 * t).sin(),
                ],
                mag: [0.2, -0.1, 0.3],
                temp_raw: 2500,
            })
        })
        .collect()
}

/// One binary device packet of `samples`, indices from `base`, first sample at `timestamp_us`.
pub fn encoded(base: u32, timestamp_us: u64, samples: &[RawSample]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_packet(base, timestamp_us, samples, &mut out);
    out
}

/// A binary ingest record of `sensor` received at `ingest_us`.
pub fn binary(sensor: &str, payload: Vec<u8>, ingest_us: i64) -> IngestRecord {
    IngestRecord {
        sensor_id: sensor.into(),
        format: PayloadFormat::Binary,
        ingest_us,
        payload: payload.into(),
    }
}
