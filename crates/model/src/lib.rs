//! Stateful ONNX inference for sensorflow (pipeline stage 5, DESIGN.md "Model contract").
//!
//! A model is an ONNX file plus a JSON sidecar. The ONNX graph takes `sequence_features`
//! `[batch, T, F]` (and, when recurrent, `h_0`/`c_0` `[layers * directions, batch, hidden]`)
//! and yields `velocity_pred` and `movement_prob` `[batch, T]` (and `h_n`/`c_n`). The sidecar
//! names the feature columns, their standard scaler, the state shape and the movement
//! threshold. Inference runs in-process on an [`Engine`]: [tract](https://docs.rs/tract-onnx),
//! pure Rust and the default; ONNX Runtime loaded from a shared library at run time
//! (several times faster on the demo LSTM; Cargo feature `onnxruntime`, on by default); or the
//! native engine, a fused LSTM kernel for exactly the contract's stacked-LSTM graph (faster
//! again, pure Rust, refuses any other graph at load).
//!
//! The pipeline keeps one recurrent state per sensor and hands [`Model::run`] one
//! [`SequenceMut`] per sensor with new samples; the model batches sensors with the same number
//! of timesteps into one call (a batch-1 call costs about as much fixed overhead as hundreds of
//! timesteps), and writes each sensor's predictions and next state back in place.
//!
//! # Layout
//! - [`sidecar`]: the sidecar's serde types and validation, feature scaling.
//! - [`Engine`]: the choice of inference engine.
//! - `model`: loading and contract checks, the per-shape tract plan cache, batched
//!   [`Model::run`] and the gather/scatter of sequences shared by both engines.
//! - `onnxruntime`: the ONNX Runtime engine (process-wide library, one session per model).
//! - `native`: the native engine: recognising the LSTM graph, its weights re-laid out, and
//!   the fused, register-blocked kernel in AVX-512, AVX2 and portable variants.
//! - `batch`: pure planning of which sequences share a call and the padded batch buckets.
//! - `error`: [`ModelError`].
//!
//! # Invariants
//! - A model that loads has been checked against the contract and has executed once: names,
//!   element types and declared dimensions match the sidecar, and output shapes are right.
//! - Batching is invisible: [`Model::run`] gives each sequence the result it would get alone.
//! - All engines group sequences into calls the same way: by `T`, at most [`MAX_BATCH`] per
//!   call on tract and the native engine and [`ORT_MAX_BATCH`] on ONNX Runtime, state read
//!   from and written back to each [`SequenceMut`].
//! - A model on the native engine computes what tract computes on its graph (checked at load
//!   on random inputs), and each sequence's result is bit-identical whatever batch it is in.
//! - The crate spawns no threads and touches no files except in [`Model::load`]; ONNX Runtime
//!   with `intra_threads` other than 1 runs its own intra-op thread pool, and loading its
//!   library reads that file.

// The unit tests share `tests/common` with the integration tests, which name this crate
// `sensorflow_model`.
#[cfg(test)]
extern crate self as sensorflow_model;
#[cfg(test)]
#[path = "../tests/common/mod.rs"]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod test_common;

mod batch;
mod engine;
mod error;
mod model;
mod native;
#[cfg(feature = "onnxruntime")]
mod onnxruntime;
pub mod sidecar;

pub use batch::{MAX_BATCH, ORT_MAX_BATCH};
pub use engine::Engine;
pub use error::ModelError;
pub use model::{Model, SequenceMut};
pub use sidecar::{Scaler, Sidecar, StateSpec};
