//! The [`Log`] handle: opening and recovery, admission (backpressure) of appends, retention,
//! stats and shutdown. The shared state behind it lives here too.
//!
//! Synchronisation: one mutex ([`State`]) holds the append queue, the byte accounting that
//! backpressure decides on, and the published end. Three signals hang off it — a condvar the
//! writer thread waits on for work, a condvar readers wait on for new durable records, and a
//! `tokio::sync::Notify` that async appends wait on for room. Nothing is held across I/O:
//! the writer takes the whole queue in one critical section and writes without the lock.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::{Notify, oneshot};

use crate::config::{LogConfig, Retention};
use crate::error::{IoOp, LogError, Result};
use crate::fault::FaultInjector;
use crate::format::frame_len;
use crate::reader::{ConsumerSlot, LogReader};
use crate::segment::{self, SegmentMeta};
use crate::writer::Writer;

/// Name of the lock file that keeps two logs from writing one directory.
const LOCK_FILE: &str = "LOCK";

/// One queued append.
pub(crate) struct Request {
    pub(crate) payload: Bytes,
    pub(crate) done: oneshot::Sender<Result<u64>>,
}

/// An admitted append: resolves to the record's offset once it is durable, or to the error
/// that failed its batch. Dropping it does not withdraw the record.
#[must_use = "the append is durable only once this resolves"]
#[derive(Debug)]
pub struct Pending {
    done: oneshot::Receiver<Result<u64>>,
}

impl std::future::Future for Pending {
    type Output = Result<u64>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<u64>> {
        // A dropped sender means the writer thread died before completing the record.
        std::pin::Pin::new(&mut self.done)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(LogError::Closed)))
    }
}

/// What [`Log::try_admit`] did with a record.
#[derive(Debug)]
pub enum Admission {
    /// Queued for the writer, its place in the log fixed; resolves when durable.
    Admitted(Pending),
    /// No room under the log's backpressure bounds now; the payload, untouched.
    Full(Bytes),
}

/// Mutable state shared by appenders, the writer thread, readers and consumers.
pub(crate) struct State {
    /// Appends admitted but not yet taken by the writer.
    pub(crate) queue: Vec<Request>,
    /// Framed bytes in `queue`.
    pub(crate) queued_bytes: u64,
    /// Framed bytes admitted and not yet published or failed (queued + being written + waiting
    /// for a sync).
    pub(crate) in_flight_bytes: u64,
    /// Offset the next durable record will get; everything below it is readable.
    pub(crate) end_offset: u64,
    /// Logical byte position of `end_offset`.
    pub(crate) end_logical: u64,
    /// No more appends are admitted.
    pub(crate) closed: bool,
    /// The writer thread has exited; `end_offset` is final.
    pub(crate) writer_done: bool,
    /// Live tracked consumers.
    pub(crate) consumers: Vec<Weak<ConsumerSlot>>,
    /// Lowest committed logical position over live consumers; `None` without consumers.
    pub(crate) min_committed: Option<u64>,
    /// Message of the most recent write/sync failure, until a write succeeds again.
    pub(crate) last_error: Option<String>,
}

impl State {
    fn unconsumed_bytes(&self) -> u64 {
        self.min_committed
            .map_or(0, |c| self.end_logical.saturating_sub(c))
    }

    /// Whether an append of `frame` bytes may enter the queue now. A record is always
    /// admitted when nothing is outstanding, so one larger than a bound cannot wait forever.
    fn admits(&self, frame: u64, config: &LogConfig) -> bool {
        let queue_ok =
            self.queued_bytes == 0 || self.queued_bytes + frame <= config.max_queued_bytes;
        let outstanding = self.unconsumed_bytes() + self.in_flight_bytes;
        let consumers_ok = outstanding == 0 || outstanding + frame <= config.max_unconsumed_bytes;
        queue_ok && consumers_ok
    }
}

/// Monotonic counters, readable without the state lock.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) appended_records: AtomicU64,
    pub(crate) appended_bytes: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) write_errors: AtomicU64,
}

/// Everything the writer thread, readers and `Log` handles share.
pub(crate) struct Shared {
    pub(crate) config: LogConfig,
    pub(crate) state: Mutex<State>,
    /// Signalled when the queue gains work or the log closes.
    pub(crate) writer_cv: Condvar,
    /// Signalled when `end_offset` advances or the writer exits.
    pub(crate) readers_cv: Condvar,
    /// Notified when admission may have become possible (bytes written, published, failed,
    /// consumed) or the log closed.
    pub(crate) space: Notify,
    /// Segments in base-offset order; the last is the one being written.
    pub(crate) segments: RwLock<Vec<SegmentMeta>>,
    pub(crate) counters: Counters,
}

impl Shared {
    /// Recomputes the slowest consumer position after a commit or a consumer going away,
    /// and wakes appends waiting for room.
    pub(crate) fn refresh_consumers(&self) {
        let mut st = self.state.lock();
        // Upgraded handles are dropped only after the lock is released: dropping the last one
        // runs `ConsumerSlot::drop`, which takes this lock again.
        let live: Vec<Arc<ConsumerSlot>> = st.consumers.iter().filter_map(Weak::upgrade).collect();
        st.consumers.retain(|w| w.strong_count() > 0);
        st.min_committed = live.iter().map(|s| s.committed_logical()).min();
        drop(st);
        drop(live);
        self.space.notify_waiters();
    }

    /// Offset of the oldest stored record.
    pub(crate) fn start_offset(&self) -> u64 {
        self.segments.read().first().map_or(0, |s| s.base_offset)
    }
}

/// What [`Log::open`] found and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Bytes cut from the end of the last segment: a torn (partially written or
    /// checksum-failing) tail left by a crash. Such records were never acknowledged.
    pub truncated_bytes: u64,
    /// Offset the next append gets.
    pub next_offset: u64,
    /// Offset of the oldest stored record (0 unless retention deleted segments).
    pub start_offset: u64,
    /// Segment files in the log.
    pub segments: usize,
}

/// A point-in-time view of the log's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records appended durably since open.
    pub appended_records: u64,
    /// Payload bytes of those records.
    pub appended_bytes: u64,
    /// Write batches (group commits) since open.
    pub batches: u64,
    /// `fdatasync` calls since open.
    pub fsyncs: u64,
    /// Offset of the oldest stored record.
    pub start_offset: u64,
    /// Offset the next durable record gets.
    pub end_offset: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes between the slowest tracked consumer's commit and the end (0 without consumers).
    pub unconsumed_bytes: u64,
    /// Bytes admitted and not yet handed to the writer.
    pub queued_bytes: u64,
    /// Failed write batches (and failed syncs) since open.
    pub write_errors: u64,
    /// Message of the most recent write failure while it is the latest outcome: the next
    /// successful write clears it (`write_errors` keeps the count), so a health check built on
    /// it recovers once the disk does.
    pub last_error: Option<String>,
}

/// Handle to an open log. Cheap to clone; all clones share one writer thread. The log closes
/// (finishing queued appends) when [`Log::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Log {
    inner: Arc<LogInner>,
}

struct LogInner {
    shared: Arc<Shared>,
    /// The writer thread until `close` joins it.
    writer: Mutex<Option<JoinHandle<Result<()>>>>,
    /// Outcome of the first `close`, returned again by later calls.
    close_result: Mutex<Option<Result<()>>>,
    /// Held (locked) while the log is open.
    lock_file: Mutex<Option<File>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.inner.shared.config.dir)
            .field("end_offset", &self.end_offset())
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (creating if needed) the log in `config.dir`, recovering from a crash: the torn
    /// tail of the last segment is truncated and reported. Fails with [`LogError::Locked`] if
    /// another open log holds the directory, [`LogError::Corrupt`] if a sealed segment is
    /// damaged (or the directory holds a segment-named file of another format).
    pub fn open(config: LogConfig) -> Result<(Log, OpenReport)> {
        Self::open_inner(config, None)
    }

    /// Like [`Log::open`], with a [`FaultInjector`] consulted before every write and sync of
    /// the writer thread. For tests.
    pub fn open_with_faults(
        config: LogConfig,
        faults: Arc<dyn FaultInjector>,
    ) -> Result<(Log, OpenReport)> {
        Self::open_inner(config, Some(faults))
    }

    fn open_inner(
        config: LogConfig,
        faults: Option<Arc<dyn FaultInjector>>,
    ) -> Result<(Log, OpenReport)> {
        config.validate()?;
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| LogError::io(IoOp::Open, &dir, &e))?;
        let lock_file = lock_dir(&dir)?;
        let recovered = segment::recover(&config)?;

        let active = recovered
            .segments
            .last()
            .cloned()
            .ok_or(LogError::InvalidConfig("recovery produced no segment"))?;
        let end_logical = active.logical_start + recovered.active_len;
        let report = OpenReport {
            truncated_bytes: recovered.truncated_bytes,
            next_offset: recovered.next_offset,
            start_offset: recovered.segments[0].base_offset,
            segments: recovered.segments.len(),
        };
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State {
                queue: Vec::new(),
                queued_bytes: 0,
                in_flight_bytes: 0,
                end_offset: recovered.next_offset,
                end_logical,
                closed: false,
                writer_done: false,
                consumers: Vec::new(),
                min_committed: None,
                last_error: None,
            }),
            writer_cv: Condvar::new(),
            readers_cv: Condvar::new(),
            space: Notify::new(),
            segments: RwLock::new(recovered.segments),
            counters: Counters::default(),
        });

        let writer = Writer::new(
            Arc::clone(&shared),
            faults,
            &active,
            recovered.active_len,
            recovered.next_offset,
        )?;
        let handle = std::thread::Builder::new()
            .name("sensorflow-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| LogError::io(IoOp::Open, &dir, &e))?;
        tracing::info!(
            dir = %dir.display(),
            start_offset = report.start_offset,
            next_offset = report.next_offset,
            segments = report.segments,
            truncated_bytes = report.truncated_bytes,
            "log opened"
        );
        let log = Log {
            inner: Arc::new(LogInner {
                shared,
                writer: Mutex::new(Some(handle)),
                close_result: Mutex::new(None),
                lock_file: Mutex::new(Some(lock_file)),
            }),
        };
        Ok((log, report))
    }

    /// Appends one record and resolves with its offset once it is durable per the configured
    /// [`Durability`](crate::Durability) and visible to readers. Only then may the caller
    /// acknowledge it (e.g. send the MQTT PUBACK).
    ///
    /// Waits (asynchronously) while the unconsumed-bytes or queued-bytes bound is exceeded;
    /// this is how a slow consumer slows producers down without dropping anything.
    ///
    /// Errors: [`LogError::RecordTooLarge`]; [`LogError::Closed`]; [`LogError::Io`] if the
    /// write or sync of its batch failed — the record is then not in the log, and a retry may
    /// succeed once the condition (disk full, ...) clears.
    ///
    /// Dropping the future after it was admitted does not withdraw the record: it may still be
    /// appended (as with any at-least-once producer whose ack got lost).
    pub async fn append(&self, payload: Bytes) -> Result<u64> {
        self.admit(payload).await?.await
    }

    /// The first half of [`Log::append`]: waits (only under backpressure) until the record is
    /// admitted to the writer's queue, which fixes its place in the log, and returns a future
    /// that resolves when it is durable.
    ///
    /// Records admitted one after another by one task are appended in that order. Callers that
    /// must keep an order across many concurrent appends (MQTT ingest: a sensor's packets) admit
    /// from one task and await the completions elsewhere, so durability waits overlap.
    pub async fn admit(&self, mut payload: Bytes) -> Result<Pending> {
        let shared = &self.inner.shared;
        loop {
            // Register for wake-ups before checking, so a notify between the check and the
            // await is not lost.
            let mut room = pin!(shared.space.notified());
            room.as_mut().enable();
            match self.try_admit(payload)? {
                Admission::Admitted(pending) => return Ok(pending),
                Admission::Full(back) => payload = back,
            }
            room.await;
        }
    }

    /// [`Log::admit`] without waiting: admits the record if the log has room for it now, else
    /// hands the payload back ([`Admission::Full`]) so the caller can wait or queue it.
    ///
    /// Lets a caller that usually finds room (ingest, whenever the pipeline keeps up) admit on
    /// its own thread, with no hand-off to a task that could wait.
    pub fn try_admit(&self, payload: Bytes) -> Result<Admission> {
        let shared = &self.inner.shared;
        let max = shared.config.max_record_bytes;
        if payload.len() > max {
            return Err(LogError::RecordTooLarge {
                len: payload.len(),
                max,
            });
        }
        let frame = frame_len(payload.len());
        let mut st = shared.state.lock();
        if st.closed {
            return Err(LogError::Closed);
        }
        if !st.admits(frame, &shared.config) {
            return Ok(Admission::Full(payload));
        }
        let (tx, rx) = oneshot::channel();
        st.queue.push(Request { payload, done: tx });
        st.queued_bytes += frame;
        st.in_flight_bytes += frame;
        drop(st);
        shared.writer_cv.notify_one();
        Ok(Admission::Admitted(Pending { done: rx }))
    }

    /// The offset the next durable record gets; every record below it is durable and
    /// readable.
    pub fn end_offset(&self) -> u64 {
        self.inner.shared.state.lock().end_offset
    }

    /// Offset of the oldest stored record (records below it were deleted by
    /// [`Log::delete_before`]).
    pub fn start_offset(&self) -> u64 {
        self.inner.shared.start_offset()
    }

    /// A reader positioned at `from` that also registers as a consumer: until it (or a
    /// [`ConsumerHandle`](crate::ConsumerHandle) cloned from it) commits, records from `from`
    /// on count as unconsumed and hold appends back once `max_unconsumed_bytes` is reached.
    /// The registration ends when the reader and all its consumer handles are dropped.
    ///
    /// `from` must lie in `start_offset()..=end_offset()`, else
    /// [`LogError::OffsetOutOfRange`].
    pub fn reader(&self, from: u64) -> Result<LogReader> {
        LogReader::open(Arc::clone(&self.inner.shared), from, true)
    }

    /// A reader that does not take part in backpressure (for tools and observers that must
    /// never slow ingest down). Same positioning rules as [`Log::reader`].
    pub fn reader_untracked(&self, from: u64) -> Result<LogReader> {
        LogReader::open(Arc::clone(&self.inner.shared), from, false)
    }

    /// Applies `retention` to the segments whose records all lie below `keep_from` (the oldest
    /// position recovery may need): the oldest of them are removed while they are older than
    /// `retention.max_age` or the log without them still holds `retention.max_bytes`. Returns
    /// how many were removed. See [`Log::delete_before`] for what readers see.
    pub fn trim(&self, keep_from: u64, retention: &Retention) -> Result<usize> {
        let segs: Vec<SegmentMeta> = self.inner.shared.segments.read().clone();
        let now = std::time::SystemTime::now();
        // (base offset, bytes, age) per segment; a segment whose metadata cannot be read
        // counts as new and empty, so it is kept until it can be judged.
        let info: Vec<(u64, u64, Duration)> = segs
            .iter()
            .map(|s| {
                let meta = std::fs::metadata(&s.path).ok();
                let bytes = meta.as_ref().map_or(0, |m| m.len());
                let age = meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or(Duration::ZERO);
                (s.base_offset, bytes, age)
            })
            .collect();
        let mut total: u64 = info.iter().map(|i| i.1).sum();
        let mut cut = None;
        // Segment i is wholly below `keep_from` when its successor starts at or before it.
        for i in 0..info.len().saturating_sub(1) {
            let (_, bytes, age) = info[i];
            let below = info[i + 1].0 <= keep_from;
            let expired = age >= retention.max_age;
            let over = total.saturating_sub(bytes) >= retention.max_bytes;
            if !below || !(expired || over) {
                break;
            }
            total -= bytes;
            cut = Some(info[i + 1].0);
        }
        match cut {
            Some(offset) => self.delete_before(offset),
            None => Ok(0),
        }
    }

    /// Removes every segment whose records all lie below `offset` and returns how many were
    /// removed. The segment being written is never removed, nor one whose successor holds no
    /// durable record yet, so `offset` beyond the end is harmless. Readers already inside a
    /// removed segment finish it (the open file stays valid); a reader that needs a removed
    /// segment later gets [`LogError::OffsetOutOfRange`]. Callers (checkpoints) decide what is
    /// safe to drop; tracked consumer positions are not consulted.
    pub fn delete_before(&self, offset: u64) -> Result<usize> {
        let shared = &self.inner.shared;
        let end = shared.state.lock().end_offset;
        let offset = offset.min(end);
        let removed: Vec<SegmentMeta> = {
            let mut segs = shared.segments.write();
            let n = segs
                .windows(2)
                .take_while(|w| w[1].base_offset <= offset && w[1].base_offset < end)
                .count();
            segs.drain(..n).collect()
        };
        if removed.is_empty() {
            return Ok(0);
        }
        let mut first_err = None;
        for seg in &removed {
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Out of the in-memory list either way; the file is found again (as an
                    // old sealed segment) on the next open and removed by the next retention.
                    tracing::warn!(path = %seg.path.display(), error = %e, "failed to remove log segment");
                    first_err.get_or_insert(LogError::io(IoOp::Delete, &seg.path, &e));
                }
            }
        }
        if let Err(e) = segment::sync_dir(&shared.config.dir) {
            first_err.get_or_insert(LogError::io(IoOp::Delete, &shared.config.dir, &e));
        }
        tracing::debug!(
            segments = removed.len(),
            before = offset,
            "log segments deleted"
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(removed.len()),
        }
    }

    /// Stops accepting appends, finishes writing and syncing everything already queued,
    /// completes those appends, joins the writer thread and releases the directory lock.
    /// Appends still waiting for room fail with [`LogError::Closed`]. Idempotent: later calls
    /// return the first call's result. Blocks the calling thread until the writer finishes
    /// (normally one write and one sync).
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }

    /// Current counters.
    pub fn stats(&self) -> LogStats {
        let shared = &self.inner.shared;
        let c = &shared.counters;
        let (end_offset, unconsumed_bytes, queued_bytes, last_error) = {
            let st = shared.state.lock();
            (
                st.end_offset,
                st.unconsumed_bytes(),
                st.queued_bytes,
                st.last_error.clone(),
            )
        };
        let (start_offset, segments) = {
            let segs = shared.segments.read();
            (segs.first().map_or(0, |s| s.base_offset), segs.len())
        };
        LogStats {
            appended_records: c.appended_records.load(Ordering::Relaxed),
            appended_bytes: c.appended_bytes.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            start_offset,
            end_offset,
            segments,
            unconsumed_bytes,
            queued_bytes,
            write_errors: c.write_errors.load(Ordering::Relaxed),
            last_error,
        }
    }
}

impl LogInner {
    fn close(&self) -> Result<()> {
        // Holding this lock for the whole close serialises concurrent callers.
        let mut writer = self.writer.lock();
        if let Some(handle) = writer.take() {
            self.shared.state.lock().closed = true;
            self.shared.writer_cv.notify_all();
            self.shared.space.notify_waiters();
            let result = handle.join().unwrap_or_else(|_| {
                tracing::error!("log writer thread panicked");
                Err(LogError::Closed)
            });
            *self.close_result.lock() = Some(result);
            // Unlocks the directory (the lock is released when the file is closed).
            drop(self.lock_file.lock().take());
            tracing::info!(dir = %self.shared.config.dir.display(), "log closed");
        }
        self.close_result.lock().clone().unwrap_or(Ok(()))
    }
}

impl Drop for LogInner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "log close on drop failed");
        }
    }
}

/// Takes the exclusive lock on `{dir}/LOCK`.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LogError::io(IoOp::Open, &path, &e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LogError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(LogError::io(IoOp::Open, &path, &e)),
    }
}
