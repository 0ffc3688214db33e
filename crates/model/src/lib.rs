//! Stateful ONNX inference for sensorflow (pipeline stage 5, DESIGN.md "Model contract").
//!
//! A model is an ONNX file plus a JSON sidecar. The ONNX graph takes `sequence_features`
//! `[batch, T, F]` (and, when recurrent, `h_0`/`c_0` `[layers * directions, batch, hidden]`)
//! and yields `velocity_pred` and `movement_prob` `[batch, T]` (and `h_n`/`c_n`). The sidecar
//! names the feature columns, their standard scaler, the state shape and the movement
//! threshold. Inference runs in-process on [tract](https://docs.rs/tract-onnx), pure Rust.
//!
//! The pipeline keeps one recurrent state per sensor and hands [`Model::run`] one
//! [`SequenceMut`] per sensor with new samples; the model batches sensors with the same number
//! of timesteps into one call (a batch-1 call costs about as much fixed overhead as hundreds of
//! timesteps), and writes each sensor's predictions and next state back in place.
//!
//! # Layout
//! - [`sidecar`]: the sidecar's serde types and validation, feature scaling.
//! - `model`: loading and contract checks, the per-shape plan cache, batched [`Model::run`].
//! - `batch`: pure planning of which sequences share a call and the padded batch buckets.
//! - `error`: [`ModelError`].
//!
//! # Invariants
//! - A model that loads has been checked against the contract and has executed once: names,
//!   element types and declared dimensions match the sidecar, and output shapes are right.
//! - Batching is invisible: [`Model::run`] gives each sequence the result it would get alone.
//! - The crate spawns no threads and touches no files except in [`Model::load`].

mod batch;
mod error;
mod model;
pub mod sidecar;

pub use batch::MAX_BATCH;
pub use error::ModelError;
pub use model::{Model, SequenceMut};
pub use sidecar::{Scaler, Sidecar, StateSpec};
