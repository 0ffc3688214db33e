//! Fault injection for the writer thread, so tests (of this crate and of its callers, e.g.
//! "ingest withholds the PUBACK when the append fails") can exercise write and sync failures.
//!
//! Making a directory read-only does not make writes fail when tests run as root, and a full
//! disk is awkward to arrange, so the writer consults an optional [`FaultInjector`] right
//! before each batch write and each `fdatasync`. It is installed with
//! [`Log::open_with_faults`](crate::Log::open_with_faults); a normally opened log has none and
//! pays one `Option` check per batch. [`FaultSwitch`] is a ready-made injector that tests flip
//! on and off.

use std::io;

use parking_lot::Mutex;

/// How an injected write failure behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFault {
    /// Bytes of the batch really written to the file before the error is returned, to
    /// simulate a write that fails part-way (as `ENOSPC` does), leaving a partial record.
    pub written: usize,
    /// The error kind returned (e.g. [`io::ErrorKind::StorageFull`]).
    pub kind: io::ErrorKind,
}

/// Decides, for each write batch and each sync, whether to fail it.
pub trait FaultInjector: Send + Sync + 'static {
    /// Called before writing a batch of `len` bytes to a segment. `Some` fails the write after
    /// writing the fault's `written` bytes (capped at `len`).
    fn on_write(&self, len: usize) -> Option<WriteFault>;
    /// Called before each `fdatasync` of a segment. `Some(kind)` fails it with that kind
    /// (without syncing).
    fn on_sync(&self) -> Option<io::ErrorKind>;
}

/// A [`FaultInjector`] controlled by switches: failures stay on until [`FaultSwitch::clear`].
#[derive(Debug, Default)]
pub struct FaultSwitch {
    write: Mutex<Option<WriteFault>>,
    sync: Mutex<Option<io::ErrorKind>>,
}

impl FaultSwitch {
    /// A switch with no failures enabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every following batch write fail with `kind` after writing `written` bytes.
    pub fn fail_writes(&self, kind: io::ErrorKind, written: usize) {
        *self.write.lock() = Some(WriteFault { written, kind });
    }

    /// Makes every following `fdatasync` fail with `kind`.
    pub fn fail_syncs(&self, kind: io::ErrorKind) {
        *self.sync.lock() = Some(kind);
    }

    /// Stops injecting failures.
    pub fn clear(&self) {
        *self.write.lock() = None;
        *self.sync.lock() = None;
    }
}

impl FaultInjector for FaultSwitch {
    fn on_write(&self, _len: usize) -> Option<WriteFault> {
        *self.write.lock()
    }

    fn on_sync(&self) -> Option<io::ErrorKind> {
        *self.sync.lock()
    }
}
