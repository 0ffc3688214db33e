//! Lake files synced while they are written, from a background thread.
//!
//! A lake file used to reach the disk in one burst when it was committed: 100+ MB queued on
//! the disk at once, and on one disk every other sync waits behind it, the log's group commits
//! included, which every acknowledgement and live sample waits for (they took 50-350 ms behind
//! a lake commit). Syncing each file every few MiB as it grows, like RocksDB's
//! `bytes_per_sync`, keeps that queue short (next to a 40 MB/s writer syncing 4 MiB at a time,
//! a small `fdatasync` stayed under ~25 ms; BENCHMARKS.md).
//!
//! The syncs run on a thread of their own so that the writer never waits for the disk in the
//! middle of a file: it hands a duplicate of the file's descriptor over and carries on.
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)` would start the writeback without any thread, but
//! no safe wrapper offers it and the workspace forbids `unsafe`.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::mpsc;

use parking_lot::{Condvar, Mutex};

/// The thread that syncs files handed to it; it ends when every [`Syncer`] handle is gone.
#[derive(Clone, Debug)]
pub(crate) struct Syncer {
    jobs: mpsc::Sender<Job>,
}

struct Job {
    file: File,
    state: Arc<SyncState>,
}

/// What the sync thread reports back about one file.
#[derive(Default)]
struct SyncState {
    inner: Mutex<Progress>,
    done: Condvar,
}

#[derive(Default)]
struct Progress {
    in_flight: bool,
    syncs: u64,
    /// The first failed sync; a failed sync may have lost data of the file, so it must fail
    /// the file's commit (the kernel reports a writeback error once, to whichever sync comes
    /// first, which is this thread's).
    error: Option<io::Error>,
}

impl Syncer {
    /// Starts the sync thread.
    pub(crate) fn start() -> io::Result<Syncer> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("lake-sync".into())
            .spawn(move || {
                for job in rx {
                    let result = job.file.sync_data();
                    let mut p = job.state.inner.lock();
                    match result {
                        Ok(()) => p.syncs += 1,
                        Err(e) => {
                            p.error.get_or_insert(e);
                        }
                    }
                    p.in_flight = false;
                    drop(p);
                    job.state.done.notify_all();
                }
            })?;
        Ok(Syncer { jobs })
    }
}

/// A file whose data is synced in the background each time `sync_every` more bytes have been
/// written to it (0: never). At most one sync per file is in flight; writes made meanwhile are
/// covered by the next one.
pub(crate) struct SyncingFile {
    file: File,
    sync_every: u64,
    unsynced: u64,
    syncer: Syncer,
    state: Arc<SyncState>,
}

impl SyncingFile {
    pub(crate) fn new(file: File, sync_every: u64, syncer: Syncer) -> Self {
        Self {
            file,
            sync_every,
            unsynced: 0,
            syncer,
            state: Arc::default(),
        }
    }

    /// Waits for the sync in flight, if any, and returns the file with the number of
    /// background syncs it had, or the first error one of them met.
    pub(crate) fn finish(self) -> io::Result<(File, u64)> {
        let mut p = self.state.inner.lock();
        while p.in_flight {
            self.state.done.wait(&mut p);
        }
        match p.error.take() {
            Some(e) => Err(e),
            None => Ok((self.file, p.syncs)),
        }
    }

    /// Hands a duplicate of the descriptor to the sync thread unless a sync is in flight.
    fn request_sync(&mut self) -> io::Result<()> {
        {
            let mut p = self.state.inner.lock();
            if let Some(e) = p.error.take() {
                return Err(e);
            }
            if p.in_flight {
                return Ok(());
            }
            p.in_flight = true;
        }
        let sent = self.file.try_clone().and_then(|file| {
            let job = Job {
                file,
                state: Arc::clone(&self.state),
            };
            self.syncer
                .jobs
                .send(job)
                .map_err(|_| io::Error::other("the lake's sync thread is gone"))
        });
        match sent {
            Ok(()) => {
                self.unsynced = 0;
                Ok(())
            }
            Err(e) => {
                self.state.inner.lock().in_flight = false;
                Err(e)
            }
        }
    }
}

impl Write for SyncingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.sync_every > 0 && self.unsynced >= self.sync_every {
            self.request_sync()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests unwrap freely

    use super::*;

    #[test]
    fn a_sync_is_requested_per_step_and_finish_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        let mut f = SyncingFile::new(file, 1000, syncer);
        f.write_all(&[7; 999]).unwrap();
        assert!(
            !f.state.inner.lock().in_flight,
            "no sync before a full step"
        );
        f.write_all(&[7; 1]).unwrap();
        let (file, syncs) = f.finish().unwrap();
        assert_eq!(syncs, 1, "finish waits for the requested sync");
        assert_eq!(file.metadata().unwrap().len(), 1000);
    }

    #[test]
    fn no_sync_when_the_step_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        let mut f = SyncingFile::new(file, 0, Syncer::start().unwrap());
        f.write_all(&[1; 100_000]).unwrap();
        assert_eq!(f.finish().unwrap().1, 0);
    }
}
