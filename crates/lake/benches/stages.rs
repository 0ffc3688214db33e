//! Cost of the lake stage per sample: [`LakeWriter::write_samples`] of live traffic's chunks
//! (1,000 sensors, 64 samples each, the pipeline's output for one step) into a temporary
//! directory with the default settings (LZ4, 128 Ki-row row groups), followed by
//! [`LakeWriter::flush`], which encodes the rest, fsyncs and renames the file into view.
//!
//! - `write_flush/64k_per_file`: one step, then a flush: the cost when every step is published.
//! - `write_flush/1m_per_file`: 16 steps (1,024,000 samples), then a flush: files of about the
//!   size one sensorflow node commits per checkpoint at 5,000 sensors (5 s x 1 M samples/s is
//!   5 M; beyond about 1 M the per-file cost is already negligible).
//!
//! Elements = samples written per iteration, so criterion's `thrpt` is samples/s and
//! `time / elements` is ns/sample, encoding, compression and file commit included. Committed
//! files are deleted between iterations, outside the timed section.
//!
//! ```text
//! cargo bench -p sensorflow-lake --bench stages
//! ```

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use sensorflow_lake::{LakeConfig, LakeWriter, Table};

#[path = "support/traffic.rs"]
mod traffic;
use traffic::{CHUNK, SENSORS, advance, chunks};

/// Deletes the committed data files of the samples table, keeping the directories the writer
/// created.
fn remove_files(root: &Path) {
    let Ok(partitions) = fs::read_dir(root.join(Table::Samples.name())) else {
        return;
    };
    for partition in partitions.flatten() {
        let Ok(files) = fs::read_dir(partition.path()) else {
            continue;
        };
        for file in files.flatten() {
            if file.path().is_file() {
                let _ = fs::remove_file(file.path());
            }
        }
    }
}

/// One iteration writes `steps` steps and flushes; the lake and chunks live across iterations.
fn bench_write_flush(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, steps: u64) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temporary directory: {e}"),
    };
    let mut lake = match LakeWriter::open(LakeConfig::new(dir.path())) {
        Ok(l) => l,
        Err(e) => panic!("lake must open: {e}"),
    };
    let mut chunks = chunks();
    let mut step = 0;
    group.throughput(Throughput::Elements(steps * (SENSORS * CHUNK) as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut busy = Duration::ZERO;
            for _ in 0..iters {
                for _ in 0..steps {
                    advance(&mut chunks, step);
                    step += 1;
                    let start = Instant::now();
                    if let Err(e) = lake.write_samples(&chunks) {
                        panic!("write_samples: {e}");
                    }
                    busy += start.elapsed();
                }
                let start = Instant::now();
                let committed = lake.flush();
                busy += start.elapsed();
                // Guards the figure: every iteration really published one samples file.
                assert!(matches!(committed, Ok(1)), "flush committed {committed:?}");
                remove_files(dir.path());
            }
            busy
        })
    });
}

fn lake(c: &mut Criterion) {
    let mut group = c.benchmark_group("write_flush");
    // Flat sampling: an iteration of the 1 M case takes about 0.3 s, too long for criterion's
    // default linear ramp (210 iterations for 20 samples) to fit the measurement time.
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.sampling_mode(SamplingMode::Flat);
    bench_write_flush(&mut group, "64k_per_file", 1);
    // 20 iterations of ~0.3 s each.
    group.measurement_time(Duration::from_secs(7));
    bench_write_flush(&mut group, "1m_per_file", 16);
    group.finish();
}

criterion_group!(benches, lake);
criterion_main!(benches);
