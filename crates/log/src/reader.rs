//! Tailing readers and consumer positions.
//!
//! A [`LogReader`] reads records straight from the segment files (the page cache makes this
//! cheap) and never past the published end, so it only ever sees records whose appends have
//! completed. It blocks on a condvar until new records are published.
//!
//! Bytes below the published end never change (rollbacks only cut what was never
//! published), but bytes beyond it may be rolled back and rewritten. A reader's buffered file
//! is therefore bounded at the published end it last saw, so read-ahead can never pick up
//! bytes of a record that is not yet (or never will be) complete.
//!
//! Backpressure needs "bytes not yet consumed", but consumers speak in offsets. Each tracked
//! reader therefore keeps *marks* — (offset, logical byte position) pairs, one per
//! `read_batch` — and a commit maps its offset to the newest mark at or below it. That is exact
//! when a consumer commits what it read batch by batch, and errs on the side of "less consumed"
//! otherwise. Marks are thinned when a consumer never commits, so memory stays bounded.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use crate::error::{CorruptReason, IoOp, LogError, Result};
use crate::format::{FRAME_HEADER_LEN, SEGMENT_HEADER_LEN, decode_frame_header, record_crc};
use crate::log::Shared;
use crate::segment;

/// Marks kept per consumer before thinning.
const MAX_MARKS: usize = 1024;
/// Read buffer per open segment.
const READ_BUFFER: usize = 256 << 10;
/// Allocation unit for payload buffers: records of a batch share allocations of this size.
const PAYLOAD_CHUNK: usize = 256 << 10;

/// The consumer position of one tracked reader, shared with its [`ConsumerHandle`]s.
pub(crate) struct ConsumerSlot {
    shared: Arc<Shared>,
    committed_logical: AtomicU64,
    marks: Mutex<Marks>,
}

struct Marks {
    committed_offset: u64,
    /// (offset, logical position of that offset), increasing.
    marks: VecDeque<(u64, u64)>,
}

impl ConsumerSlot {
    pub(crate) fn committed_logical(&self) -> u64 {
        self.committed_logical.load(Ordering::Acquire)
    }

    fn push_mark(&self, offset: u64, logical: u64) {
        let mut m = self.marks.lock();
        if m.marks.back().is_some_and(|&(o, _)| o >= offset) {
            return;
        }
        if m.marks.len() >= MAX_MARKS {
            // Keep every other mark: coarser but still never overstating consumption.
            let mut i = 0;
            m.marks.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
        m.marks.push_back((offset, logical));
    }

    fn commit(&self, offset: u64) {
        let logical = {
            let mut m = self.marks.lock();
            let Some(i) = m.marks.iter().rposition(|&(o, _)| o <= offset) else {
                return;
            };
            let (mark_offset, mark_logical) = m.marks[i];
            if mark_offset <= m.committed_offset {
                return;
            }
            m.committed_offset = mark_offset;
            m.marks.drain(..i);
            mark_logical
        };
        if logical > self.committed_logical.fetch_max(logical, Ordering::AcqRel) {
            self.shared.refresh_consumers();
        }
    }
}

impl Drop for ConsumerSlot {
    fn drop(&mut self) {
        // Without this consumer the slowest position may move up; waiting appends may proceed.
        self.shared.refresh_consumers();
    }
}

/// Reports how far a consumer got, from any thread (e.g. after a checkpoint committed the
/// records to the sinks). Cloned from a tracked [`LogReader`]; keeps the consumer registered
/// while alive.
#[derive(Clone)]
pub struct ConsumerHandle {
    slot: Arc<ConsumerSlot>,
}

impl std::fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("committed", &self.committed())
            .finish()
    }
}

impl ConsumerHandle {
    /// Declares every record below `offset` consumed, releasing backpressure for them.
    /// Monotonic: a lower offset than already committed is ignored. Consumption is counted up
    /// to the last `read_batch` end at or below `offset`, so committing beyond what the reader
    /// has returned releases nothing extra.
    pub fn commit(&self, offset: u64) {
        self.slot.commit(offset);
    }

    /// The offset below which consumption is counted: the highest commit, rounded down to
    /// the end of a `read_batch` (initially the reader's start offset).
    pub fn committed(&self) -> u64 {
        self.slot.marks.lock().committed_offset
    }
}

/// A segment file that reads as if it ended at `limit`: the published end as of the
/// reader's last look, so buffered read-ahead never sees unpublished bytes.
struct Bounded {
    file: File,
    pos: u64,
    limit: u64,
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = usize::try_from(self.limit.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = buf.len().min(max);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Bounded {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

/// The segment a reader has open.
struct Cursor {
    file: BufReader<Bounded>,
    path: PathBuf,
    base_offset: u64,
    logical_start: u64,
    /// File position of the record at `LogReader::position`.
    pos: u64,
    /// Base of the next segment, once one exists.
    next_base: Option<u64>,
}

/// Reads records in offset order, waiting for new ones. Obtained from
/// [`Log::reader`](crate::Log::reader) or [`Log::reader_untracked`](crate::Log::reader_untracked).
/// Keeps working after the log handle is dropped: it reads what was published, then returns
/// [`LogError::Closed`].
pub struct LogReader {
    shared: Arc<Shared>,
    position: u64,
    /// Logical byte position of the published end last observed.
    end_logical: u64,
    cursor: Option<Cursor>,
    consumer: Option<ConsumerHandle>,
    scratch: BytesMut,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("position", &self.position)
            .field("tracked", &self.consumer.is_some())
            .finish_non_exhaustive()
    }
}

impl LogReader {
    pub(crate) fn open(shared: Arc<Shared>, from: u64, tracked: bool) -> Result<LogReader> {
        let (end, end_logical) = {
            let st = shared.state.lock();
            (st.end_offset, st.end_logical)
        };
        let start = shared.start_offset();
        if from < start || from > end {
            return Err(LogError::OffsetOutOfRange {
                requested: from,
                start,
                end,
            });
        }
        let mut reader = LogReader {
            shared,
            position: from,
            end_logical,
            cursor: None,
            consumer: None,
            scratch: BytesMut::new(),
        };
        // At the end, the segment the next record lands in may not be final yet (a failed
        // write can roll a fresh segment back), so the file is opened on the first read.
        if from < end {
            reader.seek()?;
        }
        if tracked {
            let logical = reader.logical_position().unwrap_or(end_logical);
            let slot = Arc::new(ConsumerSlot {
                shared: Arc::clone(&reader.shared),
                committed_logical: AtomicU64::new(logical),
                marks: Mutex::new(Marks {
                    committed_offset: from,
                    marks: VecDeque::from([(from, logical)]),
                }),
            });
            reader
                .shared
                .state
                .lock()
                .consumers
                .push(Arc::downgrade(&slot));
            reader.shared.refresh_consumers();
            reader.consumer = Some(ConsumerHandle { slot });
        }
        Ok(reader)
    }

    /// Fills `out` with up to `max_records` `(offset, payload)` records starting at the
    /// reader's position, waiting up to `timeout` for at least one to be published.
    ///
    /// Returns `Ok(n)` with `n >= 1` records appended to `out`; `Ok(0)` on timeout (or when
    /// `max_records` is 0); `Err(LogError::Closed)` once the log is closed and every record
    /// has been read. A read error after some records were returned is reported by the next
    /// call (which retries the failing record): [`LogError::Corrupt`] for a record failing its
    /// checksum, [`LogError::OffsetOutOfRange`] if retention deleted the segment it needs.
    pub fn read_batch(
        &mut self,
        out: &mut Vec<(u64, Bytes)>,
        max_records: usize,
        timeout: Duration,
    ) -> Result<usize> {
        if max_records == 0 {
            return Ok(0);
        }
        let Some((end, end_logical)) = self.wait_for_records(timeout)? else {
            return Ok(0);
        };
        self.end_logical = end_logical;
        if let Some(c) = &mut self.cursor {
            c.file.get_mut().limit = end_logical.saturating_sub(c.logical_start);
            // Segments holding records below `end` are all listed by now.
            if c.next_base.is_none() {
                c.next_base = next_base(&self.shared, c.base_offset);
            }
        }
        let limit = end.min(self.position.saturating_add(max_records as u64));
        let mut n = 0;
        while self.position < limit {
            match self.read_one() {
                Ok(payload) => {
                    out.push((self.position, payload));
                    self.position += 1;
                    n += 1;
                }
                Err(e) => {
                    self.cursor = None;
                    if n == 0 {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        if let (Some(c), Some(logical)) = (&self.consumer, self.logical_position()) {
            c.slot.push_mark(self.position, logical);
        }
        Ok(n)
    }

    /// The offset of the next record this reader returns.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Declares everything below `offset` consumed (see [`ConsumerHandle::commit`]). A no-op
    /// for untracked readers.
    pub fn commit(&self, offset: u64) {
        if let Some(c) = &self.consumer {
            c.commit(offset);
        }
    }

    /// A handle to commit this reader's consumption from elsewhere; `None` for untracked
    /// readers.
    pub fn consumer(&self) -> Option<ConsumerHandle> {
        self.consumer.clone()
    }

    /// Waits until a record at the reader's position is published; returns the end offset
    /// and its logical position, or `None` on timeout.
    fn wait_for_records(&self, timeout: Duration) -> Result<Option<(u64, u64)>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.state.lock();
        loop {
            if st.end_offset > self.position {
                return Ok(Some((st.end_offset, st.end_logical)));
            }
            if st.writer_done {
                return Err(LogError::Closed);
            }
            match deadline {
                Some(d) => {
                    if self.shared.readers_cv.wait_until(&mut st, d).timed_out() {
                        return Ok((st.end_offset > self.position)
                            .then_some((st.end_offset, st.end_logical)));
                    }
                }
                None => self.shared.readers_cv.wait(&mut st),
            }
        }
    }

    fn logical_position(&self) -> Option<u64> {
        self.cursor.as_ref().map(|c| c.logical_start + c.pos)
    }

    /// Reads the record at `self.position`, which is below the published end.
    fn read_one(&mut self) -> Result<Bytes> {
        let moved_on = match &self.cursor {
            None => true,
            Some(c) => c.next_base.is_some_and(|b| self.position >= b),
        };
        if moved_on {
            self.seek()?;
        }
        let Some(c) = self.cursor.as_mut() else {
            return Err(LogError::Closed);
        };
        let read_err = |path: &PathBuf, e: std::io::Error| LogError::io(IoOp::Read, path, &e);
        let mut h = [0u8; FRAME_HEADER_LEN];
        c.file
            .read_exact(&mut h)
            .map_err(|e| read_err(&c.path, e))?;
        let (len, crc) = decode_frame_header(&h);
        let len_usize = len as usize;
        if self.scratch.capacity() < len_usize {
            self.scratch.reserve(len_usize.max(PAYLOAD_CHUNK));
        }
        self.scratch.resize(len_usize, 0);
        c.file
            .read_exact(&mut self.scratch)
            .map_err(|e| read_err(&c.path, e))?;
        if record_crc(len, &self.scratch) != crc {
            return Err(segment::corrupt(
                &c.path,
                c.pos,
                CorruptReason::RecordChecksum,
            ));
        }
        c.pos += (FRAME_HEADER_LEN + len_usize) as u64;
        Ok(self.scratch.split().freeze())
    }

    /// Opens the segment holding `self.position` and skips to that record.
    fn seek(&mut self) -> Result<()> {
        self.cursor = None;
        let (meta, next) = {
            let segs = self.shared.segments.read();
            let i = segs.partition_point(|s| s.base_offset <= self.position);
            match i.checked_sub(1).and_then(|i| segs.get(i)) {
                Some(meta) => (meta.clone(), segs.get(i).map(|s| s.base_offset)),
                None => return Err(self.out_of_range()),
            }
        };
        let mut file = match File::open(&meta.path) {
            Ok(f) => f,
            // Deleted by retention between the lookup and the open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(self.out_of_range()),
            Err(e) => return Err(LogError::io(IoOp::Read, &meta.path, &e)),
        };
        segment::read_header(&mut file, &meta.path, meta.base_offset)?;
        let bounded = Bounded {
            file,
            pos: SEGMENT_HEADER_LEN as u64,
            limit: self.end_logical.saturating_sub(meta.logical_start),
        };
        let mut file = BufReader::with_capacity(READ_BUFFER, bounded);
        let mut pos = SEGMENT_HEADER_LEN as u64;
        for _ in meta.base_offset..self.position {
            let mut h = [0u8; FRAME_HEADER_LEN];
            file.read_exact(&mut h)
                .map_err(|e| LogError::io(IoOp::Read, &meta.path, &e))?;
            let (len, _) = decode_frame_header(&h);
            file.seek_relative(i64::from(len))
                .map_err(|e| LogError::io(IoOp::Read, &meta.path, &e))?;
            pos += (FRAME_HEADER_LEN as u64) + u64::from(len);
        }
        self.cursor = Some(Cursor {
            file,
            path: meta.path,
            base_offset: meta.base_offset,
            logical_start: meta.logical_start,
            pos,
            next_base: next,
        });
        Ok(())
    }

    fn out_of_range(&self) -> LogError {
        LogError::OffsetOutOfRange {
            requested: self.position,
            start: self.shared.start_offset(),
            end: self.shared.state.lock().end_offset,
        }
    }
}

/// Base offset of the segment after the one at `base`, if it exists yet.
fn next_base(shared: &Shared, base: u64) -> Option<u64> {
    let segs = shared.segments.read();
    let i = segs.partition_point(|s| s.base_offset <= base);
    segs.get(i).map(|s| s.base_offset)
}
