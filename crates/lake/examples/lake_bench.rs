//! Throughput of the lake writer on the samples table: 5M samples in 64-sample chunks from 1000
//! sensors (the shape of live traffic), written and flushed to a temporary directory.
//!
//! `cargo run --release -p sensorflow-lake --example lake_bench [-- SAMPLES [lz4|zstd|snappy|none]]`
//! Prints ns/sample including the final flush (fsync + rename of every file).
//!
//! With `LAKE_BENCH_URL=s3://bucket/prefix` (and the AWS variables) it writes there instead,
//! staging files in the temporary directory: the flush then includes the uploads.

use std::time::Instant;

use sensorflow_lake::{Compression, LakeConfig, LakeLocation, LakeWriter, Table};

#[path = "../benches/support/traffic.rs"]
mod traffic;
use traffic::{CHUNK, SENSORS};

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
    let location = match std::env::var("LAKE_BENCH_URL") {
        Ok(url) => LakeLocation::parse(&url, &dir)?,
        Err(_) => LakeLocation::Dir(dir.clone()),
    };
    let mut lake = LakeWriter::open(LakeConfig {
        compression,
        ..LakeConfig::new(location)
    })?;

    // One reusable chunk per sensor with plausible IMU values; each round advances its indices
    // and timestamps (cheap compared with the write, and done outside the timed section).
    let mut chunks = traffic::chunks();

    let rounds = total.div_ceil(SENSORS * CHUNK);
    let mut written = 0usize;
    let mut busy = std::time::Duration::ZERO;
    for round in 0..rounds {
        traffic::advance(&mut chunks, round as u64);
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
