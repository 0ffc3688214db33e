//! Micro benchmark of `Log::append`: records/s and MB/s for each durability with 200-byte and
//! 2 KB payloads, 256 concurrent appenders (as many MQTT connections would be).
//!
//! Run: `cargo run --release -p sensorflow-log --example append_bench [DIR]`
//! (DIR defaults to a temporary directory; the figures depend on its filesystem and disk).

use std::time::{Duration, Instant};

use bytes::Bytes;
use sensorflow_log::{Durability, Log, LogConfig};

const APPENDERS: usize = 256;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = match std::env::args().nth(1) {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    println!("dir: {}  appenders: {APPENDERS}", base.path().display());
    println!(
        "{:<14} {:>8} {:>9} {:>8} {:>12} {:>9} {:>8} {:>10}",
        "durability", "payload", "records", "secs", "records/s", "MB/s", "fsyncs", "rec/batch"
    );
    let modes = [
        ("none", Durability::None, 400_000),
        ("batch(5ms)", Durability::DEFAULT_BATCH, 200_000),
        ("fsync", Durability::Fsync, 100_000),
    ];
    for (name, durability, records) in modes {
        for payload_len in [200usize, 2048] {
            let records = if payload_len > 1000 {
                records / 4
            } else {
                records
            };
            let dir = base.path().join(format!("{name}-{payload_len}"));
            let mut config = LogConfig::new(&dir);
            config.durability = durability;
            let (log, _) = Log::open(config)?;
            let payload = Bytes::from(vec![0x5Au8; payload_len]);
            let started = Instant::now();
            runtime.block_on(async {
                let tasks: Vec<_> = (0..APPENDERS)
                    .map(|t| {
                        let log = log.clone();
                        let payload = payload.clone();
                        let n = records / APPENDERS + usize::from(t < records % APPENDERS);
                        tokio::spawn(async move {
                            for _ in 0..n {
                                log.append(payload.clone()).await?;
                            }
                            Ok::<_, sensorflow_log::LogError>(())
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await??;
                }
                Ok::<_, Box<dyn std::error::Error>>(())
            })?;
            let secs = started
                .elapsed()
                .max(Duration::from_micros(1))
                .as_secs_f64();
            let stats = log.stats();
            log.close()?;
            println!(
                "{:<14} {:>8} {:>9} {:>8.2} {:>12.0} {:>9.1} {:>8} {:>10.1}",
                name,
                payload_len,
                records,
                secs,
                records as f64 / secs,
                (records * payload_len) as f64 / secs / 1e6,
                stats.fsyncs,
                stats.appended_records as f64 / stats.batches.max(1) as f64,
            );
            std::fs::remove_dir_all(&dir)?;
        }
    }
    Ok(())
}
