//! Writes a small, deterministic lake to the directory given as the only argument and prints
//! the row counts per table and partition as JSON. Used by `tests/python/test_lake_readers.py`
//! to check the files with pyarrow and DuckDB.
//!
//! `cargo run -q -p sensorflow-lake --example write_sample_lake -- DIR`
//!
//! Contents: 3 sensors × 20 packets × 64 samples starting 3 s before 2024-03-10T00:00Z (600
//! samples per sensor fall on 2024-03-09), 1 s windows, one ended session per sensor, three
//! aggregates per sensor, one gap and two late samples. Data is flushed twice, so partitions
//! hold several files.

use std::collections::BTreeMap;
use std::sync::Arc;

use sensorflow_lake::{LakeConfig, LakeWriter, Table};
use sensorflow_records::{
    GapRecord, LateRecord, SampleChunk, SessionAggregate, SessionRecord, WindowRecord,
};

const MIDNIGHT_US: i64 = 1_710_028_800_000_000;
const START_US: i64 = MIDNIGHT_US - 3_000_000;
const SAMPLE_US: i64 = 5000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: write_sample_lake DIR")?;
    let mut lake = LakeWriter::open(LakeConfig::new(&dir))?;
    let sensors: Vec<Arc<str>> = (0..3).map(|i| Arc::from(format!("imu-{i}"))).collect();
    let session = |s: &Arc<str>| -> Arc<str> { format!("{s}_{START_US}").into() };

    for half in 0..2u32 {
        for s in &sensors {
            let mut chunks = Vec::new();
            for p in half * 10..(half + 1) * 10 {
                let mut c = SampleChunk::with_capacity(s.clone(), session(s), 64);
                c.model_version = "sample-lake-1".into();
                for i in 0..64u32 {
                    let idx = p * 64 + i;
                    let x = idx as f32 / 64.0;
                    c.sample_index.push(idx);
                    c.timestamp_us.push(START_US + i64::from(idx) * SAMPLE_US);
                    for col in [
                        &mut c.acc_x,
                        &mut c.acc_y,
                        &mut c.acc_z,
                        &mut c.gyro_x,
                        &mut c.gyro_y,
                        &mut c.gyro_z,
                        &mut c.mag_x,
                        &mut c.mag_y,
                        &mut c.mag_z,
                    ] {
                        col.push(x.sin());
                    }
                    c.temp_raw.push(-12);
                    c.accl_mag.push(1.0 + x.sin().abs());
                    c.gyro_mag.push(x.cos().abs());
                    c.velocity_pred.push(x / 10.0);
                    c.velocity_raw.push(x / 10.0);
                    c.movement_prob.push(0.75);
                    c.ingest_us
                        .push(START_US + i64::from(p) * 320_000 + 400_000);
                }
                chunks.push(c);
            }
            lake.write_samples(&chunks)?;
        }
        lake.flush()?;
    }

    let windows: Vec<WindowRecord> = sensors
        .iter()
        .flat_map(|s| {
            (0..6).map(move |w| WindowRecord {
                sensor_id: s.clone(),
                window_start_us: START_US + w * 1_000_000,
                window_end_us: START_US + (w + 1) * 1_000_000,
                count: 200,
                accl_mag_mean: 1.5,
                accl_mag_std: 0.25,
                accl_mag_min: 1.0,
                accl_mag_max: 2.0,
                gyro_mag_mean: 0.5,
                gyro_mag_std: 0.125,
                gyro_mag_min: 0.0,
                gyro_mag_max: 1.0,
            })
        })
        .collect();
    lake.write_windows(&windows)?;
    let sessions: Vec<SessionRecord> = sensors
        .iter()
        .map(|s| SessionRecord {
            session_id: session(s),
            sensor_id: s.clone(),
            start_us: START_US,
            end_us: Some(START_US + 1279 * SAMPLE_US),
            last_seen_us: START_US + 1279 * SAMPLE_US,
            sample_count: 1280,
        })
        .collect();
    lake.write_sessions(&sessions)?;
    let aggregates: Vec<SessionAggregate> = sensors
        .iter()
        .flat_map(|s| {
            [-1_000_000, 1_000_000, 3_000_000].map(|dt| SessionAggregate {
                session_id: session(s),
                sensor_id: s.clone(),
                emitted_at_us: MIDNIGHT_US + dt,
                max_velocity: 2.0,
                distance_m: 3.0,
                mean_velocity: 1.0,
                moving_time_s: 2.5,
                sample_count: 400,
                duration_s: 2.0,
            })
        })
        .collect();
    lake.write_aggregates(&aggregates)?;
    lake.write_gaps(&[GapRecord {
        sensor_id: sensors[0].clone(),
        from_index: 1280,
        to_index: 1300,
        missing: 20,
        detected_at_us: MIDNIGHT_US + 4_000_000,
    }])?;
    let late: Vec<LateRecord> = (0..2)
        .map(|i| LateRecord {
            sensor_id: sensors[1].clone(),
            sample_index: 10 + i,
            timestamp_us: START_US + i64::from(10 + i) * SAMPLE_US,
            watermark_us: MIDNIGHT_US,
            detected_at_us: MIDNIGHT_US + 2_000_000,
        })
        .collect();
    lake.write_late(&late)?;
    lake.flush()?;

    // Row counts per table and partition date, as a reader should see them.
    let mut counts: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let day = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.date_naive().to_string())
            .unwrap_or_default()
    };
    let mut add = |t: Table, us: i64| {
        *counts
            .entry(t.name())
            .or_default()
            .entry(day(us))
            .or_default() += 1
    };
    for _ in &sensors {
        for idx in 0..1280i64 {
            add(Table::Samples, START_US + idx * SAMPLE_US);
        }
    }
    windows
        .iter()
        .for_each(|w| add(Table::Windows, w.window_start_us));
    sessions
        .iter()
        .for_each(|s| add(Table::Sessions, s.start_us));
    aggregates
        .iter()
        .for_each(|a| add(Table::SessionAggregates, a.emitted_at_us));
    add(Table::Gaps, MIDNIGHT_US + 4_000_000);
    late.iter().for_each(|l| add(Table::Late, l.detected_at_us));
    println!("{}", serde_json::to_string(&counts)?);
    Ok(())
}
