//! Configuration of an embedded log: where it lives, how durable an acknowledged append is,
//! and how much data may pile up in front of a slow consumer.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::LogError;
use crate::format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};

/// When an append counts as done (and may be acknowledged to an MQTT publisher).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Complete once the bytes are in the OS page cache (`write` returned). Survives a process
    /// crash, not a power loss or kernel panic.
    None,
    /// Group commit with a time bound: appends are written as they come and `fdatasync`ed
    /// together, at most once per `interval` while several appenders keep the writer busy
    /// (like Kafka's `linger.ms` or PostgreSQL's `commit_delay`: waiting a little lets one
    /// sync cover many appends, which saves far more CPU and I/O than it costs in latency).
    /// A lone append is synced at once: when the previous sync covered a single record
    /// (one appender waiting for each ack before sending the next) or none happened for
    /// `interval`, there is nothing to group with. Every append completes after the sync
    /// that covers it, so an acknowledged append survives power loss as with
    /// [`Durability::Fsync`]. An `interval` of zero behaves like [`Durability::Fsync`].
    Batch {
        /// Longest time a written append waits for its sync (default 5 ms).
        interval: Duration,
    },
    /// `fdatasync` after every write batch before completing its appends. Concurrent appends
    /// still share one sync (group commit).
    Fsync,
}

impl Durability {
    /// [`Durability::Batch`] with the default interval of 5 ms.
    pub const DEFAULT_BATCH: Durability = Durability::Batch {
        interval: Duration::from_millis(5),
    };
}

impl Default for Durability {
    /// [`Durability::Fsync`]: an acknowledged record survives power loss.
    fn default() -> Self {
        Durability::Fsync
    }
}

/// How much of the log to keep behind the position recovery needs (e.g. for replaying it
/// through a new model), in the manner of Kafka's `retention.ms` and `retention.bytes`. A
/// sealed segment below that position is deleted once it is older than `max_age` (judged by
/// its file's modification time, i.e. its last write) or once the segments after it alone
/// reach `max_bytes`. Zero for either deletes everything recovery does not need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep segments whose last write is younger than this.
    pub max_age: Duration,
    /// Keep at most about this many bytes of segments in total.
    pub max_bytes: u64,
}

impl Retention {
    /// Keeps nothing beyond what recovery needs.
    pub const NONE: Retention = Retention {
        max_age: Duration::ZERO,
        max_bytes: 0,
    };
}

/// Settings of one log directory. Build with [`LogConfig::new`] and override fields.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Directory holding the segment files (created if missing). One open [`Log`](crate::Log)
    /// per directory; a lock file enforces it.
    pub dir: PathBuf,
    /// A segment is rolled once the next record would take it past this size (default
    /// 64 MiB). A single record larger than this gets a segment of its own.
    pub segment_bytes: u64,
    /// When an append completes (default [`Durability::Fsync`]).
    pub durability: Durability,
    /// Bound on bytes appended (or admitted) but not yet committed by the slowest live
    /// consumer (default 256 MiB). Appends wait while it is exceeded. Only readers created with
    /// [`Log::reader`](crate::Log::reader) count; with no such reader there is no bound.
    pub max_unconsumed_bytes: u64,
    /// Bound on bytes admitted but not yet handed to the writer thread (default 32 MiB).
    /// Keeps a fast producer from queueing unbounded memory when the disk is slow.
    pub max_queued_bytes: u64,
    /// Largest accepted payload (default 16 MiB; at most `u32::MAX - 8`).
    pub max_record_bytes: usize,
    /// Fully verify every segment (not just the last) when opening (default `false`).
    /// Costs a read of the whole log; corruption is otherwise found when a reader reaches it.
    pub verify_on_open: bool,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, `Fsync` durability, 256 MiB unconsumed bound, 32 MiB queue
    /// bound, 16 MiB records, only the last segment verified on open.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            durability: Durability::default(),
            max_unconsumed_bytes: 256 << 20,
            max_queued_bytes: 32 << 20,
            max_record_bytes: 16 << 20,
            verify_on_open: false,
        }
    }

    /// Rejects settings that cannot work.
    pub(crate) fn validate(&self) -> Result<(), LogError> {
        if self.segment_bytes < (SEGMENT_HEADER_LEN + FRAME_HEADER_LEN) as u64 {
            return Err(LogError::InvalidConfig(
                "segment_bytes must hold a segment header and one record header",
            ));
        }
        if self.max_record_bytes > (u32::MAX as usize) - FRAME_HEADER_LEN {
            return Err(LogError::InvalidConfig(
                "max_record_bytes must be below u32::MAX - 8",
            ));
        }
        Ok(())
    }
}
