//! Read-only scans of a log directory, without opening (and locking) the log: what
//! `sensorflow replay` uses to reprocess the retained log, also while a platform runs on it.
//!
//! A scan lists the segments once and reads each through, verifying every record's checksum.
//! Sealed segments are complete, so a bad record there is corruption and an error. The last
//! segment may be being written: the scan stops at its first incomplete or invalid record,
//! which is where the writer is (or a torn tail the next open truncates). A segment deleted by
//! retention after the listing is skipped if it was the first; any later one missing is an
//! error, since records would be silently skipped.
//!
//! Under `batch` durability a live log can hold records written but not yet synced; if their
//! sync then fails, the writer rolls them back. A scan may have returned such a record. That
//! needs a failing disk at the same moment and only affects analysis copies, so the scanner
//! does not coordinate with the writer.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{CorruptReason, IoOp, LogError, Result};
use crate::format::{self, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::segment;

/// Iterator over `(offset, payload)` of every record in a log directory, oldest first.
/// Created by [`scan`].
#[derive(Debug)]
pub struct Scan {
    segments: Vec<(u64, PathBuf)>,
    next_segment: usize,
    current: Option<Current>,
    done: bool,
    /// Record bytes (frames) in the segments as listed, and returned so far: progress.
    bytes_total: u64,
    bytes_read: u64,
}

#[derive(Debug)]
struct Current {
    reader: BufReader<File>,
    path: PathBuf,
    /// Bytes left in the file as of opening it.
    remaining: u64,
    position: u64,
    next_offset: u64,
    last: bool,
}

/// Starts a read-only scan of the log in `dir`. Takes no lock; see the module docs for what a
/// scan of a live log sees.
pub fn scan(dir: &Path) -> Result<Scan> {
    let segments: Vec<(u64, PathBuf)> = segment::list_segments(dir)?
        .into_iter()
        .map(|base| (base, segment::segment_path(dir, base)))
        .collect();
    let bytes_total = segments
        .iter()
        .filter_map(|(_, path)| std::fs::metadata(path).ok())
        .map(|m| m.len().saturating_sub(SEGMENT_HEADER_LEN as u64))
        .sum();
    Ok(Scan {
        segments,
        next_segment: 0,
        current: None,
        done: false,
        bytes_total,
        bytes_read: 0,
    })
}

impl Scan {
    /// Bytes of records in the log as listed when the scan began (a live log grows beyond it).
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    /// Bytes of the records returned so far, in the units of [`bytes_total`](Self::bytes_total).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Opens the next segment; `Ok(false)` when there is none.
    fn open_next(&mut self) -> Result<bool> {
        let Some((base, path)) = self.segments.get(self.next_segment).cloned() else {
            return Ok(false);
        };
        let first = self.next_segment == 0;
        self.next_segment += 1;
        let last = self.next_segment == self.segments.len();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            // Deleted by retention since the listing: only the oldest may go missing.
            Err(e) if e.kind() == io::ErrorKind::NotFound && first && !last => {
                return self.open_next();
            }
            Err(e) => return Err(LogError::io(IoOp::Open, &path, &e)),
        };
        let len = file
            .metadata()
            .map_err(|e| LogError::io(IoOp::Open, &path, &e))?
            .len();
        if len < SEGMENT_HEADER_LEN as u64 && last {
            // A segment being created: nothing in it yet.
            return Ok(false);
        }
        segment::read_header(&mut file, &path, base)?;
        self.current = Some(Current {
            reader: BufReader::with_capacity(1 << 20, file),
            path,
            remaining: len - SEGMENT_HEADER_LEN as u64,
            position: SEGMENT_HEADER_LEN as u64,
            next_offset: base,
            last,
        });
        Ok(true)
    }
}

impl Current {
    /// The next record, `Ok(None)` at the end of the segment (or, in the last segment, at the
    /// first incomplete record).
    fn next_record(&mut self) -> Result<Option<(u64, Bytes)>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let read_err = |path: &Path, e: io::Error| LogError::io(IoOp::Read, path, &e);
        let stop = |this: &Self, reason| {
            if this.last {
                Ok(None)
            } else {
                Err(segment::corrupt(&this.path, this.position, reason))
            }
        };
        if self.remaining < FRAME_HEADER_LEN as u64 {
            return stop(self, CorruptReason::TruncatedRecord);
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        self.reader
            .read_exact(&mut h)
            .map_err(|e| read_err(&self.path, e))?;
        let (len, crc) = format::decode_frame_header(&h);
        if u64::from(len) > self.remaining - FRAME_HEADER_LEN as u64 {
            return stop(self, CorruptReason::TruncatedRecord);
        }
        let mut payload = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut payload)
            .map_err(|e| read_err(&self.path, e))?;
        if format::record_crc(len, &payload) != crc {
            return stop(self, CorruptReason::RecordChecksum);
        }
        let frame = format::frame_len(len as usize);
        self.remaining -= frame;
        self.position += frame;
        let offset = self.next_offset;
        self.next_offset += 1;
        Ok(Some((offset, Bytes::from(payload))))
    }
}

impl Iterator for Scan {
    type Item = Result<(u64, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if self.current.is_none() {
                match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => {
                        self.done = true;
                        return None;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let current = self.current.as_mut()?;
            match current.next_record() {
                Ok(Some(record)) => {
                    self.bytes_read += format::frame_len(record.1.len());
                    return Some(Ok(record));
                }
                Ok(None) if current.last => {
                    self.done = true;
                    return None;
                }
                Ok(None) => self.current = None,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
