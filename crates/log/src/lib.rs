//! sensorflow-log: the embedded durable log between MQTT ingest and the pipeline.
//!
//! Ingest [`Log::append`]s every MQTT message as an opaque payload and acknowledges it (QoS 1
//! PUBACK) only when the append resolves, which happens once the record is durable per the
//! configured [`Durability`]. The pipeline tails the log with a [`LogReader`] and reports
//! progress with [`LogReader::commit`]; a consumer that falls `max_unconsumed_bytes` behind
//! makes appends wait, which slows publishers down instead of dropping data.
//!
//! # Layout
//!
//! - [`config`](LogConfig) — `LogConfig` and `Durability`.
//! - `format` — on-disk format: segment header, record framing (`len | crc32 | payload`), and
//!   the validating scan. The module docs are the format specification.
//! - `segment` — segment file naming and creation, and crash recovery on open.
//! - `writer` — the single writer thread: group commit, rolling, syncing, publishing, and
//!   rollback after I/O errors.
//! - `reader` — tailing readers and consumer positions (backpressure bookkeeping).
//! - `log` — the [`Log`] handle: open, admission control, retention, stats, close.
//! - [`fault`] — fault injection for tests of write/sync failures.
//!
//! # Invariants
//!
//! - A record is visible to readers, and its append completes, only after it is written and
//!   synced as the durability requires; readers never see a record whose append may fail.
//! - Offsets are dense: record `n` is the `n`-th record ever appended. A failed batch is
//!   truncated away and its offsets are reused; nothing half-written stays in a file.
//! - Sealed segments are synced before the next one is created, so only the last segment can
//!   have a torn tail; open truncates it and reports the bytes in [`OpenReport`].

mod config;
mod error;
pub mod fault;
mod format;
mod log;
mod reader;
mod segment;
mod snapshot;
mod writer;

pub use crate::config::{Durability, LogConfig, Retention};
pub use crate::error::{CorruptReason, IoOp, LogError, Result};
pub use crate::fault::{FaultInjector, FaultSwitch, WriteFault};
pub use crate::log::{Admission, Log, LogStats, OpenReport, Pending};
pub use crate::reader::{ConsumerHandle, LogReader};
pub use crate::snapshot::{Scan, scan};
