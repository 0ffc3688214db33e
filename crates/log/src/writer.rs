//! The writer thread: group commit, segment rolling, durability, and rollback after failures.
//!
//! One loop: take everything queued in one critical section, frame it into one buffer, write
//! it with one `write_all` per segment touched, then apply the durability policy and
//! *publish*: advance the end offset readers wait on and complete each append's oneshot.
//! Publishing only after the policy is satisfied is what lets ingest ack on completion and
//! lets the pipeline never see a record whose append could still fail.
//!
//! Two positions are tracked. `written` is the end of bytes fully written by successful
//! writes; `published` is the end readers see. They differ only under `Durability::Batch`,
//! between a write and the next sync. A failed write rolls the files back to `written` and
//! fails that batch; a failed sync rolls back to `published` and fails every record written
//! since (after a failed `fdatasync` the kernel may have dropped those dirty pages, so they
//! cannot be trusted). Rolling back truncates the partial bytes away, so no half record is
//! left behind and the next batch reuses the same offsets.
//!
//! Sealing a segment (rolling to a new one) always syncs it, in every durability mode, so
//! sealed segments are never torn and recovery only has to repair the last one.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::Durability;
use crate::error::{IoOp, LogError, Result};
use crate::fault::FaultInjector;
use crate::format::{SEGMENT_HEADER_LEN, encode_frame, frame_len};
use crate::log::{Request, Shared};
use crate::segment::{self, SegmentMeta};

/// How often an idle writer whose last write failed checks whether writing works again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Bytes the probe writes and syncs: more than a filesystem block, so a full disk fails it.
const PROBE_BYTES: usize = 64 * 1024;
/// The probe's scratch file in the log directory (not a segment name, so recovery ignores a
/// leftover one; the next probe overwrites it).
const PROBE_FILE: &str = "write-probe.tmp";

/// The segment being written.
struct Active {
    file: File,
    path: PathBuf,
    base_offset: u64,
    logical_start: u64,
    /// Bytes of the file known to be good (header + complete records written so far).
    len: u64,
}

/// A position in the log: end of a segment prefix and the offset that follows it.
#[derive(Debug, Clone, Copy)]
struct Pos {
    seg_base: u64,
    seg_logical_start: u64,
    len: u64,
    next_offset: u64,
}

impl Pos {
    fn logical(&self) -> u64 {
        self.seg_logical_start + self.len
    }
}

/// A record written but not yet published.
struct Pending {
    offset: u64,
    frame: u64,
    payload_len: u64,
    done: oneshot::Sender<Result<u64>>,
}

/// State owned by the writer thread.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    faults: Option<Arc<dyn FaultInjector>>,
    active: Active,
    written: Pos,
    published: Pos,
    /// Written, waiting for a sync (Batch durability) before being published.
    unsynced: Vec<Pending>,
    /// The active file has bytes not yet synced.
    dirty: bool,
    /// A rollback failed; retry it before writing anything else.
    needs_rollback: bool,
    last_sync: Instant,
    /// Records the last sync covered (Batch: more than one means appenders overlap, so
    /// waiting for more before the next sync pays).
    last_group: usize,
    /// Set while the last write failed: when to check, if no append comes first, whether
    /// writing works again (see [`Writer::probe`]).
    probe_at: Option<Instant>,
    buf: Vec<u8>,
}

/// Marks the writer as gone when the thread exits by any path (including a panic), so
/// appends and readers fail with `Closed` instead of waiting forever.
struct DoneGuard(Arc<Shared>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let orphans = {
            let mut st = self.0.state.lock();
            st.closed = true;
            st.writer_done = true;
            std::mem::take(&mut st.queue)
        };
        // Dropping the senders completes those appends with `Closed`.
        drop(orphans);
        self.0.readers_cv.notify_all();
        self.0.space.notify_waiters();
    }
}

impl Writer {
    /// Prepares the writer for the active segment `meta`, whose good length is `len`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        faults: Option<Arc<dyn FaultInjector>>,
        meta: &SegmentMeta,
        len: u64,
        next_offset: u64,
    ) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&meta.path)
            .map_err(|e| LogError::io(IoOp::Open, &meta.path, &e))?;
        file.seek(SeekFrom::Start(len))
            .map_err(|e| LogError::io(IoOp::Open, &meta.path, &e))?;
        let pos = Pos {
            seg_base: meta.base_offset,
            seg_logical_start: meta.logical_start,
            len,
            next_offset,
        };
        Ok(Writer {
            shared,
            faults,
            active: Active {
                file,
                path: meta.path.clone(),
                base_offset: meta.base_offset,
                logical_start: meta.logical_start,
                len,
            },
            written: pos,
            published: pos,
            unsynced: Vec::new(),
            dirty: false,
            needs_rollback: false,
            last_sync: Instant::now(),
            last_group: 0,
            probe_at: None,
            buf: Vec::with_capacity(1 << 20),
        })
    }

    /// Runs until the log is closed and everything queued is written and synced.
    pub(crate) fn run(mut self) -> Result<()> {
        let _done = DoneGuard(Arc::clone(&self.shared));
        loop {
            let (batch, closing) = self.next_batch();
            let idle = batch.is_empty();
            if !idle {
                self.write_batch(batch);
            }
            if !self.unsynced.is_empty() && self.sync_due(closing) {
                self.publish_unsynced();
            }
            if idle && self.probe_at.is_some_and(|at| Instant::now() >= at) {
                self.probe();
            }
            if closing && idle && self.unsynced.is_empty() {
                // `closed` admits nothing new, so an empty queue stays empty.
                return if self.dirty { self.sync() } else { Ok(()) };
            }
        }
    }

    fn batch_interval(&self) -> Option<Duration> {
        match self.shared.config.durability {
            Durability::Batch { interval } if !interval.is_zero() => Some(interval),
            _ => None,
        }
    }

    /// Waits for queued appends, the log closing, (with records awaiting a Batch sync) the
    /// sync deadline or (after a failure) the next probe; takes the whole queue.
    fn next_batch(&mut self) -> (Vec<Request>, bool) {
        let sync_at = match self.batch_interval() {
            Some(interval) if !self.unsynced.is_empty() => Some(self.last_sync + interval),
            _ => None,
        };
        let deadline = match (sync_at, self.probe_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let shared = Arc::clone(&self.shared);
        let mut st = shared.state.lock();
        while st.queue.is_empty() && !st.closed {
            match deadline {
                Some(d) => {
                    if shared.writer_cv.wait_until(&mut st, d).timed_out() {
                        break;
                    }
                }
                None => shared.writer_cv.wait(&mut st),
            }
        }
        let batch = std::mem::take(&mut st.queue);
        st.queued_bytes = 0;
        let closing = st.closed;
        drop(st);
        if !batch.is_empty() {
            self.shared.space.notify_waiters();
        }
        (batch, closing)
    }

    /// Whether the records written so far should be synced and published now. Under Batch,
    /// written records wait for more to group with until `interval` after the last sync,
    /// unless they are a lone append: the queue is empty and the last sync covered a single
    /// record, so no other appender is about to join (see [`Durability::Batch`]).
    fn sync_due(&self, closing: bool) -> bool {
        match self.batch_interval() {
            Some(interval) => {
                closing
                    || self.last_sync.elapsed() >= interval
                    || (self.last_group <= 1
                        && self.unsynced.len() <= 1
                        && self.shared.state.lock().queue.is_empty())
            }
            None => true,
        }
    }

    /// Writes a batch; on success its records join `unsynced`, on failure they fail.
    fn write_batch(&mut self, batch: Vec<Request>) {
        let result = self
            .finish_rollback()
            .and_then(|()| self.write_frames(&batch));
        self.shared.counters.batches.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(next_pos) => {
                let first = self.written.next_offset;
                self.unsynced
                    .extend(batch.into_iter().enumerate().map(|(i, r)| Pending {
                        offset: first + i as u64,
                        frame: frame_len(r.payload.len()),
                        payload_len: r.payload.len() as u64,
                        done: r.done,
                    }));
                self.written = next_pos;
                self.dirty = true;
            }
            Err(err) => {
                self.record_error(&err);
                if matches!(err, LogError::Io { op: IoOp::Sync, .. }) {
                    // Sealing the segment failed to sync: earlier unsynced records may be
                    // lost with it, so they fail too.
                    self.fail_unsynced(&err);
                } else {
                    self.roll_back_after_failure(self.written);
                }
                let frames = batch.iter().map(|r| frame_len(r.payload.len())).sum();
                self.release_in_flight(frames);
                for r in batch {
                    let _ = r.done.send(Err(err.clone()));
                }
            }
        }
    }

    /// Frames and writes `batch` after `written`, rolling segments as needed. Returns the new
    /// written position. On error the files may hold partial data past `written`.
    fn write_frames(&mut self, batch: &[Request]) -> Result<Pos> {
        let segment_bytes = self.shared.config.segment_bytes;
        let mut next_offset = self.written.next_offset;
        self.buf.clear();
        for req in batch {
            let frame = frame_len(req.payload.len());
            let seg_len = self.active.len + self.buf.len() as u64;
            if seg_len > SEGMENT_HEADER_LEN as u64 && seg_len + frame > segment_bytes {
                self.flush_buf()?;
                self.roll(next_offset)?;
            }
            encode_frame(&mut self.buf, &req.payload);
            next_offset += 1;
        }
        self.flush_buf()?;
        Ok(Pos {
            seg_base: self.active.base_offset,
            seg_logical_start: self.active.logical_start,
            len: self.active.len,
            next_offset,
        })
    }

    /// Writes the framing buffer to the active segment with one `write_all`.
    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let write = |file: &mut File, buf: &[u8], faults: Option<&Arc<dyn FaultInjector>>| {
            if let Some(fault) = faults.and_then(|f| f.on_write(buf.len())) {
                file.write_all(&buf[..fault.written.min(buf.len())])?;
                return Err(io::Error::from(fault.kind));
            }
            file.write_all(buf)
        };
        write(&mut self.active.file, &self.buf, self.faults.as_ref())
            .map_err(|e| LogError::io(IoOp::Write, &self.active.path, &e))?;
        self.active.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Seals the active segment (syncing it) and starts a new one at `base_offset`.
    fn roll(&mut self, base_offset: u64) -> Result<()> {
        self.sync()?;
        let dir = &self.shared.config.dir;
        let meta = SegmentMeta {
            base_offset,
            logical_start: self.active.logical_start + self.active.len,
            path: segment::segment_path(dir, base_offset),
        };
        // Listed before the file exists, so that if creating it fails half-way, the rollback
        // removes the partial file: a stray header-only segment found at the next open would
        // claim offsets the previous segment goes on to hold. Readers and retention never
        // touch a listed segment until it holds a published record.
        self.shared.segments.write().push(meta.clone());
        let file = segment::create_segment(dir, base_offset, true)
            .map_err(|e| LogError::io(IoOp::Roll, &meta.path, &e))?;
        self.active = Active {
            file,
            path: meta.path,
            base_offset,
            logical_start: meta.logical_start,
            len: SEGMENT_HEADER_LEN as u64,
        };
        tracing::debug!(base_offset, "log segment rolled");
        Ok(())
    }

    /// `fdatasync` of the active segment.
    fn sync(&mut self) -> Result<()> {
        let injected = self.faults.as_ref().and_then(|f| f.on_sync());
        let result = match injected {
            Some(kind) => Err(io::Error::from(kind)),
            None => self.active.file.sync_data(),
        };
        result.map_err(|e| LogError::io(IoOp::Sync, &self.active.path, &e))?;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.last_sync = Instant::now();
        self.dirty = false;
        Ok(())
    }

    /// Applies the durability policy to everything written, then publishes it.
    fn publish_unsynced(&mut self) {
        if self.shared.config.durability != Durability::None
            && let Err(err) = self.sync()
        {
            self.record_error(&err);
            self.fail_unsynced(&err);
            return;
        }
        self.published = self.written;
        self.last_group = self.unsynced.len();
        let records = self.unsynced.len() as u64;
        let frames: u64 = self.unsynced.iter().map(|p| p.frame).sum();
        let bytes: u64 = self.unsynced.iter().map(|p| p.payload_len).sum();
        {
            let mut st = self.shared.state.lock();
            st.end_offset = self.published.next_offset;
            st.end_logical = self.published.logical();
            st.in_flight_bytes = st.in_flight_bytes.saturating_sub(frames);
            // Writing works again (e.g. space was freed after a full disk).
            st.last_error = None;
        }
        self.probe_at = None;
        self.shared.readers_cv.notify_all();
        self.shared.space.notify_waiters();
        let c = &self.shared.counters;
        c.appended_records.fetch_add(records, Ordering::Relaxed);
        c.appended_bytes.fetch_add(bytes, Ordering::Relaxed);
        for p in self.unsynced.drain(..) {
            let _ = p.done.send(Ok(p.offset));
        }
    }

    /// After a failed sync: everything written since the last publish is untrustworthy.
    /// Rolls the files back to the published end and fails those appends.
    fn fail_unsynced(&mut self, err: &LogError) {
        let failed = std::mem::take(&mut self.unsynced);
        self.roll_back_after_failure(self.published);
        self.written = self.published;
        self.release_in_flight(failed.iter().map(|p| p.frame).sum());
        for p in failed {
            let _ = p.done.send(Err(err.clone()));
        }
    }

    fn release_in_flight(&self, frames: u64) {
        {
            let mut st = self.shared.state.lock();
            st.in_flight_bytes = st.in_flight_bytes.saturating_sub(frames);
        }
        self.shared.space.notify_waiters();
    }

    fn record_error(&mut self, err: &LogError) {
        self.shared
            .counters
            .write_errors
            .fetch_add(1, Ordering::Relaxed);
        self.shared.state.lock().last_error = Some(err.to_string());
        self.probe_at = Some(Instant::now() + PROBE_INTERVAL);
        tracing::warn!(error = %err, "log write failed; appends of the batch fail");
    }

    /// Run when the last write failed and no append has come for [`PROBE_INTERVAL`]: finishes
    /// a pending rollback, then writes, syncs and removes a scratch file in the log directory.
    /// If that works, `last_error` is cleared. Without it an idle log would report its error
    /// until the next append, and a platform taken out of its load balancer by the failing
    /// readiness probe might never get that append (a readiness deadlock). A failed probe is
    /// not a write error (no append failed); it keeps `last_error` current and retries later.
    fn probe(&mut self) {
        let result = self
            .finish_rollback()
            .and_then(|()| self.write_probe_file());
        match result {
            Ok(()) => {
                self.probe_at = None;
                self.shared.state.lock().last_error = None;
                tracing::info!("log writes work again");
            }
            Err(err) => {
                self.probe_at = Some(Instant::now() + PROBE_INTERVAL);
                self.shared.state.lock().last_error = Some(err.to_string());
                tracing::debug!(error = %err, "log write probe failed");
            }
        }
    }

    fn write_probe_file(&self) -> Result<()> {
        let path = self.shared.config.dir.join(PROBE_FILE);
        let faults = self.faults.as_ref();
        let write = || -> io::Result<()> {
            let mut file = File::create(&path)?;
            if let Some(fault) = faults.and_then(|f| f.on_write(PROBE_BYTES)) {
                return Err(io::Error::from(fault.kind));
            }
            file.write_all(&vec![0u8; PROBE_BYTES])?;
            match faults.and_then(|f| f.on_sync()) {
                Some(kind) => Err(io::Error::from(kind)),
                None => file.sync_data(),
            }
        };
        let result = write().map_err(|e| LogError::io(IoOp::Write, &path, &e));
        // Removed whether or not the write worked: a partial file would hold the space.
        match std::fs::remove_file(&path) {
            Ok(()) => result,
            Err(e) if e.kind() == io::ErrorKind::NotFound => result,
            Err(e) => result.and(Err(LogError::io(IoOp::Delete, &path, &e))),
        }
    }

    /// Retries a rollback that failed earlier (see [`Writer::roll_back_after_failure`]), which
    /// must succeed before anything else is written.
    fn finish_rollback(&mut self) -> Result<()> {
        if self.needs_rollback {
            self.rollback_to(self.written)
        } else {
            Ok(())
        }
    }

    /// Rolls back to `pos`, remembering to retry before the next write if that fails too.
    fn roll_back_after_failure(&mut self, pos: Pos) {
        if let Err(e) = self.rollback_to(pos) {
            tracing::warn!(error = %e, "log rollback failed; retrying before the next write");
            self.needs_rollback = true;
        }
    }

    /// Makes the files end exactly at `pos`: removes segments created after it, truncates its
    /// segment, and positions the writer there.
    fn rollback_to(&mut self, pos: Pos) -> Result<()> {
        self.needs_rollback = true;
        loop {
            // Pop from the list only once the file is gone, so a failed removal is retried.
            let last = {
                let segs = self.shared.segments.read();
                match segs.last() {
                    Some(s) if s.base_offset > pos.seg_base => s.path.clone(),
                    _ => break,
                }
            };
            match std::fs::remove_file(&last) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io(IoOp::Rollback, &last, &e)),
            }
            self.shared.segments.write().pop();
        }
        if self.active.base_offset != pos.seg_base {
            let path = segment::segment_path(&self.shared.config.dir, pos.seg_base);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| LogError::io(IoOp::Rollback, &path, &e))?;
            self.active = Active {
                file,
                path,
                base_offset: pos.seg_base,
                logical_start: pos.seg_logical_start,
                len: pos.len,
            };
        }
        let err = |e: io::Error| LogError::io(IoOp::Rollback, &self.active.path, &e);
        self.active.file.set_len(pos.len).map_err(err)?;
        self.active
            .file
            .seek(SeekFrom::Start(pos.len))
            .map_err(|e| LogError::io(IoOp::Rollback, &self.active.path, &e))?;
        self.active.len = pos.len;
        self.needs_rollback = false;
        Ok(())
    }
}
