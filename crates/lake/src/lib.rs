//! Sinks that persist the pipeline's outputs.
//!
//! # Layout
//!
//! - [`lake`]: the Parquet lake writer. Date-partitioned tables under one root, files that appear
//!   atomically, rolled by size and age, plus compaction of small files.
//! - [`schema`]: the lake's tables, their Arrow schemas and the columnar buffers that turn
//!   pipeline records into record batches.
//! - [`read`]: reading the lake back (delivery counts for load tests).
//! - [`sessions_store`]: the SQLite sessions store (WAL) written by the sink and read by the API
//!   through `sensorflow_records::SessionsQuery`.
//!
//! # Invariants
//!
//! - A lake reader (DuckDB, pyarrow, Spark) never sees a partial file: data files are written
//!   under a hidden `.tmp` name and renamed only once complete and fsynced, or, for a lake on
//!   S3, staged locally and uploaded whole in one PUT (or one multipart upload).
//! - Nothing here spawns threads: the owner calls `write_*`, `roll_due` and `flush` from its sink
//!   loop, which gives natural backpressure.
//! - Column names are those of DESIGN.md "Record schemas", identical to the JSON field names.

pub mod lake;
pub mod read;
pub mod schema;
pub mod sessions_store;
mod sync;

pub use lake::{
    CompactionReport, Compression, LakeConfig, LakeError, LakeLocation, LakeStats, LakeWriter,
    ObjectLake, TableStats, epoch_writer_id, partition_dates, partition_dir,
    partition_epoch_writer_id, remove_files_after_epoch,
};
pub use read::{SampleCounts, count_samples_by_sensor};
pub use schema::Table;
pub use sessions_store::{SessionsReader, SessionsStore};
