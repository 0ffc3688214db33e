//! Inference throughput of the demo model through [`Model::run`], as the pipeline calls it:
//! `B` sensors with `T = 64` new samples each (one packet), state carried between calls. A
//! last case with `B = 1, T = 1` shows the fixed cost of one call.
//!
//! ```text
//! cargo run --release -p sensorflow-model --example bench_infer [-- SECONDS_PER_CASE]
//! ```

use std::error::Error;
use std::time::{Duration, Instant};

use sensorflow_model::{Model, SequenceMut};

fn main() -> Result<(), Box<dyn Error>> {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2.0);
    let model = Model::demo()?;
    let (f, s) = (model.n_features(), model.state_len());
    println!("demo model, single thread, {secs} s per case");
    println!(
        "{:>6} {:>4} {:>12} {:>16} {:>14}",
        "batch", "T", "calls/s", "timesteps/s", "us/call"
    );
    for (batch, steps) in [(1, 64), (64, 64), (256, 64), (1, 1)] {
        // A slow sine per sensor stands in for scaled features; values do not affect speed.
        let features: Vec<Vec<f32>> = (0..batch)
            .map(|b| {
                (0..steps * f)
                    .map(|i| ((i + b) as f32 * 0.01).sin())
                    .collect()
            })
            .collect();
        let mut h = vec![vec![0.0; s]; batch];
        let mut c = vec![vec![0.0; s]; batch];
        let mut velocity = vec![vec![0.0; steps]; batch];
        let mut movement = vec![vec![0.0; steps]; batch];
        let mut call = || {
            let mut seqs =
                SequenceMut::zip_all(&features, &mut h, &mut c, &mut velocity, &mut movement);
            model.run(&mut seqs)
        };
        call()?; // compiles the plan for this shape
        let (started, mut calls) = (Instant::now(), 0u64);
        while started.elapsed() < Duration::from_secs_f64(secs) {
            call()?;
            calls += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "{batch:>6} {steps:>4} {:>12.0} {:>16.0} {:>14.1}",
            calls as f64 / elapsed,
            (calls as usize * batch * steps) as f64 / elapsed,
            elapsed * 1e6 / calls as f64
        );
    }
    Ok(())
}
