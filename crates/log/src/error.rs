//! Error types of the log.
//!
//! Every error is `Clone` because one failed group-commit batch fans the same error out to
//! every append in that batch. I/O errors therefore carry the [`io::ErrorKind`] (what a caller
//! branches on: `StorageFull`, `PermissionDenied`, ...) plus a rendered message for humans,
//! instead of the non-clonable [`io::Error`] itself.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Result alias used throughout the crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// Everything that can go wrong in the log.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// An operating-system I/O call failed. For appends this means the record is **not**
    /// durable and was not acknowledged; the log rolled its files back to the last good
    /// position and later appends retry normally once the condition clears.
    #[error("log i/o error during {op}: {kind}: {detail}")]
    Io {
        /// Which operation failed.
        op: IoOp,
        /// The kind of the underlying [`io::Error`].
        kind: io::ErrorKind,
        /// Human-readable message including the path involved, if any.
        detail: Arc<str>,
    },
    /// The log was closed: no new appends are accepted, and a reader that has read every
    /// record gets this instead of waiting forever.
    #[error("log is closed")]
    Closed,
    /// An append was larger than [`LogConfig::max_record_bytes`](crate::LogConfig::max_record_bytes).
    #[error("record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// Payload length of the rejected record.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A reader was asked for an offset that is not in the log (deleted by retention, or
    /// beyond the end).
    #[error("offset {requested} is outside the log (available {start}..{end})")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// First offset still stored.
        start: u64,
        /// Next offset to be written (`end_offset`).
        end: u64,
    },
    /// On-disk data failed validation somewhere other than the torn tail of the last segment
    /// (which open repairs). This needs an operator: data that was acknowledged is damaged.
    #[error("corrupt log segment {}: {reason} at byte {position}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte position in the file where validation failed.
        position: u64,
        /// What was wrong.
        reason: CorruptReason,
    },
    /// Another `Log` (in this or another process) holds the directory lock.
    #[error("log directory {} is locked by another open log", path.display())]
    Locked {
        /// The log directory.
        path: PathBuf,
    },
    /// The configuration is unusable.
    #[error("invalid log configuration: {0}")]
    InvalidConfig(&'static str),
}

impl LogError {
    /// Builds an [`LogError::Io`] from an [`io::Error`], naming the path involved.
    pub(crate) fn io(op: IoOp, path: &std::path::Path, err: &io::Error) -> Self {
        LogError::Io {
            op,
            kind: err.kind(),
            detail: format!("{}: {err}", path.display()).into(),
        }
    }
}

/// The operation an [`LogError::Io`] happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoOp {
    /// Opening or scanning the directory and segments at startup.
    Open,
    /// Writing records.
    Write,
    /// `fdatasync` of a segment or the directory.
    Sync,
    /// Creating a new segment.
    Roll,
    /// Truncating a failed write back to the last good position.
    Rollback,
    /// Reading records.
    Read,
    /// Removing segments.
    Delete,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::Open => "open",
            IoOp::Write => "write",
            IoOp::Sync => "sync",
            IoOp::Roll => "segment roll",
            IoOp::Rollback => "rollback",
            IoOp::Read => "read",
            IoOp::Delete => "delete",
        })
    }
}

/// Why a segment failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptReason {
    /// The file does not start with the `SFLOG001` magic: not a segment of this format.
    #[error("bad magic (not a sensorflow log segment)")]
    BadMagic,
    /// The segment header's own checksum does not match.
    #[error("segment header checksum mismatch")]
    HeaderChecksum,
    /// The header's base offset differs from the one in the file name.
    #[error("header base offset {header} differs from file name base offset {name}")]
    BaseOffsetMismatch {
        /// Base offset stored in the header.
        header: u64,
        /// Base offset encoded in the file name.
        name: u64,
    },
    /// A record's checksum does not match its bytes.
    #[error("record checksum mismatch")]
    RecordChecksum,
    /// The file ends inside a record, or a record length points past the end of the file.
    #[error("truncated record")]
    TruncatedRecord,
    /// A sealed segment holds a different number of records than the next segment's base
    /// offset implies.
    #[error("segment holds {found} records but the next segment implies {expected}")]
    RecordCount {
        /// Records implied by the base offsets.
        expected: u64,
        /// Records found.
        found: u64,
    },
}
