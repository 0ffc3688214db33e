//! Synthetic live traffic for the lake's timings, shared by `benches/stages.rs` and
//! `examples/lake_bench.rs` (each includes this file with `#[path]`): one chunk per sensor, the
//! pipeline's output for one step, with plausible IMU values.

use std::sync::Arc;

use sensorflow_records::SampleChunk;

pub(crate) const SENSORS: usize = 1000;
/// Samples per chunk: one device packet.
pub(crate) const CHUNK: usize = 64;
pub(crate) const SAMPLE_US: i64 = 5000;
/// 2024-03-10 01:00 UTC: far enough from midnight that no run crosses into the next partition.
pub(crate) const T0_US: i64 = 1_710_028_800_000_000 + 3_600_000_000;

/// Amplitude of each f32 column, in [`SampleChunk::F32_COLUMNS`] order.
const AMPLITUDES: [f32; 14] = [
    1.0, 1.3, 0.7, 2.1, 0.4, 1.9, 0.2, 0.3, 0.5, 1.1, 2.2, 0.9, 0.8, 0.05,
];

/// One chunk per sensor; [`advance`] moves them to a later step.
pub(crate) fn chunks() -> Vec<SampleChunk> {
    (0..SENSORS)
        .map(|s| {
            let sensor: Arc<str> = format!("imu-{s:04}").into();
            let session: Arc<str> = format!("{sensor}_{T0_US}").into();
            let mut c = SampleChunk::with_capacity(sensor, session, CHUNK);
            for i in 0..CHUNK {
                let phase = (s * CHUNK + i) as f32 * 0.01;
                c.sample_index.push(i as u32);
                c.timestamp_us.push(T0_US + i as i64 * SAMPLE_US);
                for (col, k) in c.f32_columns_mut().into_iter().zip(AMPLITUDES) {
                    col.push((phase * k).sin() * k);
                }
                c.temp_raw.push(2400 + (i % 7) as i16);
                c.ingest_us.push(T0_US + 40_000);
            }
            c
        })
        .collect()
}

/// Rewrites every chunk's indices and timestamps as step `step` of its sensor's stream
/// (values repeat, which is fine for timing: the compressor sees them far apart).
pub(crate) fn advance(chunks: &mut [SampleChunk], step: u64) {
    for c in chunks {
        for (i, (idx, ts)) in c
            .sample_index
            .iter_mut()
            .zip(&mut c.timestamp_us)
            .enumerate()
        {
            let n = step as usize * CHUNK + i;
            *idx = n as u32;
            *ts = T0_US + n as i64 * SAMPLE_US;
        }
    }
}
