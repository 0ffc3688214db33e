//! Cost of the inference stage per sample (= per timestep): the demo LSTM through
//! [`Model::run`], as the pipeline calls it, with `B` sensors of `T = 64` new samples each (one
//! packet per sensor) and the recurrent state carried from call to call.
//!
//! - `per_sensor/b1_t64`: one sensor per call, what inference costs without batching.
//! - `batched/b64_t64`, `batched/b256_t64`: 64 and 256 sensors in one call (256 is
//!   [`MAX_BATCH`](sensorflow_model::MAX_BATCH), the largest single tract call).
//! - `native/b{1,16,64,256}_t64`: the same calls on the native fused LSTM engine
//!   ([`Engine::Native`](sensorflow_model::Engine::Native)).
//!
//! The first three run on tract, the default engine.
//! Elements = `B * T` timesteps, so criterion's `thrpt` is samples/s and `time / (B * 64)` is
//! ns/sample. Each shape's plan is compiled before measuring (the pipeline compiles it once).
//!
//! ```text
//! cargo bench -p sensorflow-model --bench stages
//! ```

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sensorflow_model::{Engine, Model, SequenceMut};

/// Timesteps per sensor and call: one 64-sample packet.
const STEPS: usize = 64;

/// Buffers of `batch` sensors' sequences, reused by every call.
struct Batch {
    features: Vec<Vec<f32>>,
    h: Vec<Vec<f32>>,
    c: Vec<Vec<f32>>,
    velocity: Vec<Vec<f32>>,
    movement: Vec<Vec<f32>>,
}

impl Batch {
    fn new(model: &Model, batch: usize) -> Self {
        let (f, s) = (model.n_features(), model.state_len());
        // A slow sine per sensor stands in for scaled features; values do not affect speed.
        let features = (0..batch)
            .map(|b| {
                (0..STEPS * f)
                    .map(|i| ((i + b) as f32 * 0.01).sin())
                    .collect()
            })
            .collect();
        Batch {
            features,
            h: vec![vec![0.0; s]; batch],
            c: vec![vec![0.0; s]; batch],
            velocity: vec![vec![0.0; STEPS]; batch],
            movement: vec![vec![0.0; STEPS]; batch],
        }
    }

    /// One [`Model::run`] over every sensor; the states written back feed the next call.
    fn run(&mut self, model: &Model) {
        let mut seqs = SequenceMut::zip_all(
            &self.features,
            &mut self.h,
            &mut self.c,
            &mut self.velocity,
            &mut self.movement,
        );
        if let Err(e) = model.run(&mut seqs) {
            panic!("demo model run failed: {e}");
        }
    }
}

fn inference(c: &mut Criterion) {
    let model = match Model::demo() {
        Ok(m) => m,
        Err(e) => panic!("demo model must load: {e}"),
    };
    let mut group = c.benchmark_group("inference");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for (name, batch) in [("per_sensor", 1), ("batched", 64), ("batched", 256)] {
        let mut buffers = Batch::new(&model, batch);
        buffers.run(&model); // compiles and caches the plan for this shape
        group.throughput(Throughput::Elements((batch * STEPS) as u64));
        group.bench_function(BenchmarkId::new(name, format!("b{batch}_t{STEPS}")), |b| {
            b.iter(|| buffers.run(&model))
        });
    }
    let native = match Model::demo_with(&Engine::Native) {
        Ok(m) => m,
        Err(e) => panic!("demo model must load on the native engine: {e}"),
    };
    for batch in [1, 16, 64, 256] {
        let mut buffers = Batch::new(&native, batch);
        group.throughput(Throughput::Elements((batch * STEPS) as u64));
        group.bench_function(
            BenchmarkId::new("native", format!("b{batch}_t{STEPS}")),
            |b| b.iter(|| buffers.run(&native)),
        );
    }
    group.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
