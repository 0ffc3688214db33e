//! Throughput of the lake writer on the samples table: 5M samples in 64-sample chunks from 1000
//! sensors (the shape of live traffic), written and flushed to a temporary directory.
//!
//! `cargo run --release -p sensorflow-lake --example lake_bench [-- SAMPLES [lz4|zstd|snappy|none]]`
//! Prints ns/sample including the final flush (fsync + rename of every file).

use std::sync::Arc;
use std::time::Instant;

use sensorflow_lake::{Compression, LakeConfig, LakeWriter, Table};
use sensorflow_records::SampleChunk;

const SENSORS: usize = 1000;
const CHUNK: usize = 64;
const SAMPLE_US: i64 = 5000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let total: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5_000_000);
    let compression = match args.next().as_deref() {
        None | Some("lz4") => Compression::Lz4,
        Some("zstd") => Compression::Zstd { level: 1 },
        Some("snappy") => Compression::Snappy,
        Some("none") => Compression::Uncompressed,
        Some(other) => return Err(format!("unknown compression {other}").into()),
    };
    let dir = std::env::temp_dir().join(format!("sensorflow-lake-bench-{}", std::process::id()));
    let mut lake = LakeWriter::open(LakeConfig {
        compression,
        ..LakeConfig::new(&dir)
    })?;

    // One reusable chunk per sensor with plausible IMU values; each round advances its indices
    // and timestamps (cheap compared with the write, and done outside the timed section).
    let t0_us: i64 = 1_710_028_800_000_000 + 3_600_000_000;
    let mut chunks: Vec<SampleChunk> = (0..SENSORS)
        .map(|s| {
            let sensor: Arc<str> = format!("imu-{s:04}").into();
            let session: Arc<str> = format!("{sensor}_{t0_us}").into();
            let mut c = SampleChunk::with_capacity(sensor, session, CHUNK);
            for i in 0..CHUNK {
                let phase = (s * CHUNK + i) as f32 * 0.01;
                c.sample_index.push(i as u32);
                c.timestamp_us.push(t0_us + i as i64 * SAMPLE_US);
                for (col, k) in [
                    (&mut c.acc_x, 1.0),
                    (&mut c.acc_y, 1.3),
                    (&mut c.acc_z, 0.7),
                    (&mut c.gyro_x, 2.1),
                    (&mut c.gyro_y, 0.4),
                    (&mut c.gyro_z, 1.9),
                    (&mut c.mag_x, 0.2),
                    (&mut c.mag_y, 0.3),
                    (&mut c.mag_z, 0.5),
                    (&mut c.accl_mag, 1.1),
                    (&mut c.gyro_mag, 2.2),
                    (&mut c.velocity_pred, 0.9),
                    (&mut c.movement_prob, 0.05),
                ] {
                    col.push((phase * k).sin() * k);
                }
                c.temp_raw.push(2400 + (i % 7) as i16);
                c.ingest_us.push(t0_us + 40_000);
            }
            c
        })
        .collect();

    let rounds = total.div_ceil(SENSORS * CHUNK);
    let mut written = 0usize;
    let mut busy = std::time::Duration::ZERO;
    for round in 0..rounds {
        let shift = round as i64 * CHUNK as i64 * SAMPLE_US;
        for c in &mut chunks {
            for (i, (idx, ts)) in c
                .sample_index
                .iter_mut()
                .zip(&mut c.timestamp_us)
                .enumerate()
            {
                *idx = (round * CHUNK + i) as u32;
                *ts = t0_us + shift + i as i64 * SAMPLE_US;
            }
        }
        let start = Instant::now();
        lake.write_samples(&chunks)?;
        busy += start.elapsed();
        written += SENSORS * CHUNK;
    }
    let start = Instant::now();
    let files = lake.flush()?;
    busy += start.elapsed();

    let stats = lake.stats();
    let s = stats.table(Table::Samples);
    println!(
        "lake_bench: {written} samples, {:?}, {files} file(s) at flush, {} files total, {:.1} MiB ({:.1} B/sample)",
        compression,
        s.files_committed,
        s.bytes_committed as f64 / (1024.0 * 1024.0),
        s.bytes_committed as f64 / written as f64,
    );
    println!(
        "lake_bench: {:.1} ns/sample ({:.2} M samples/s, one thread)",
        busy.as_nanos() as f64 / written as f64,
        written as f64 / busy.as_secs_f64() / 1e6,
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
