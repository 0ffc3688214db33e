//! The records every part of sensorflow exchanges, in a crate of their own so that the lake, the
//! API and (later) the Kafka roles use them without compiling the pipeline's model, tract and
//! ONNX Runtime.
//!
//! # Layout
//!
//! - [`record`]: the output records of the pipeline (lake tables, live feeds, Kafka values) and
//!   [`Outputs`], one step's worth of them.
//! - [`sessions`]: the sessions store's read contract: [`SessionQuery`] in, [`SessionView`] out,
//!   [`StoreError`] on failure, behind the [`SessionsQuery`] trait the store implements and the
//!   API consumes.
//!
//! Dependencies point one way: `pipeline`, `lake` and `api` depend on this crate, never the
//! reverse, and it depends on nothing of the workspace.

pub mod record;
pub mod sessions;

pub use record::*;
pub use sessions::{SessionQuery, SessionView, SessionsQuery, StoreError};
