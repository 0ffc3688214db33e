//! The on-disk format: segment header, record framing, and the scan that validates a segment.
//!
//! A segment file `{base_offset:020}.log` is a 24-byte header followed by records:
//!
//! ```text
//! header:  "SFLOG001" | base_offset u64 LE | crc32(bytes 0..16) u32 LE | reserved u32 (0)
//! record:  len u32 LE | crc u32 LE | payload (len bytes)
//! ```
//!
//! The record checksum is CRC-32 (ISO-HDLC, the zlib/Ethernet polynomial, as computed by
//! `crc32fast`, which is SIMD-accelerated) over the four `len` bytes followed by the payload.
//! Covering `len` means a damaged length field is caught by the checksum rather than sending
//! the scan off into the middle of the next record; it also makes an all-zero frame header
//! (e.g. a preallocated or zero-filled tail) invalid, since crc32 of `[0; 4]` is not zero.
//! CRC-32C would detect torn writes equally well but needs another dependency; the format
//! version in the magic allows switching later.
//!
//! Records carry no offset: a record's offset is the segment's base offset plus its index in
//! the segment, so the files never need rewriting to renumber anything.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use crate::error::CorruptReason;

/// Magic at the start of every segment; the trailing digits are the format version.
pub(crate) const MAGIC: &[u8; 8] = b"SFLOG001";
/// Bytes of the segment header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 24;
/// Bytes of a record's frame header (`len` + `crc`).
pub(crate) const FRAME_HEADER_LEN: usize = 8;

/// Encodes the header of a segment starting at `base_offset`.
pub(crate) fn encode_segment_header(base_offset: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&base_offset.to_le_bytes());
    let crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Validates a segment header against the base offset from the file name.
pub(crate) fn check_segment_header(
    h: &[u8; SEGMENT_HEADER_LEN],
    name_base: u64,
) -> Result<(), CorruptReason> {
    if &h[0..8] != MAGIC {
        return Err(CorruptReason::BadMagic);
    }
    let stored = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    if crc32fast::hash(&h[0..16]) != stored {
        return Err(CorruptReason::HeaderChecksum);
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&h[8..16]);
    let header = u64::from_le_bytes(base);
    if header != name_base {
        return Err(CorruptReason::BaseOffsetMismatch {
            header,
            name: name_base,
        });
    }
    Ok(())
}

/// Checksum of a record: CRC-32 over `len` (LE) then the payload.
pub(crate) fn record_crc(len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Bytes a record of `payload_len` occupies on disk.
pub(crate) fn frame_len(payload_len: usize) -> u64 {
    (FRAME_HEADER_LEN + payload_len) as u64
}

/// Appends the framed record to `out`. The caller has checked `payload.len()` fits in u32.
pub(crate) fn encode_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits a frame header into `(len, crc)`.
pub(crate) fn decode_frame_header(h: &[u8; FRAME_HEADER_LEN]) -> (u32, u32) {
    (
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    )
}

/// Outcome of scanning a segment's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Valid records from the start of the segment.
    pub(crate) records: u64,
    /// File length up to and including the last valid record.
    pub(crate) valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub(crate) stop: Option<CorruptReason>,
}

/// Reads every record after the header of `file` (of length `file_len`), verifying lengths
/// and checksums, and stops at the first invalid one.
pub(crate) fn scan_records(file: &File, file_len: u64) -> io::Result<Scan> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(SEGMENT_HEADER_LEN as u64))?;
    let mut pos = SEGMENT_HEADER_LEN as u64;
    let mut records = 0u64;
    let mut payload = Vec::new();
    loop {
        let remaining = file_len - pos;
        if remaining == 0 {
            return Ok(Scan {
                records,
                valid_len: pos,
                stop: None,
            });
        }
        let torn = |reason| Scan {
            records,
            valid_len: pos,
            stop: Some(reason),
        };
        if remaining < FRAME_HEADER_LEN as u64 {
            return Ok(torn(CorruptReason::TruncatedRecord));
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        r.read_exact(&mut h)?;
        let (len, crc) = decode_frame_header(&h);
        if u64::from(len) > remaining - FRAME_HEADER_LEN as u64 {
            return Ok(torn(CorruptReason::TruncatedRecord));
        }
        payload.resize(len as usize, 0);
        r.read_exact(&mut payload)?;
        if record_crc(len, &payload) != crc {
            return Ok(torn(CorruptReason::RecordChecksum));
        }
        pos += frame_len(len as usize);
        records += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;
    use std::io::Write;

    fn segment_with(frames: &[&[u8]], tail: &[u8]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut buf = encode_segment_header(7).to_vec();
        for p in frames {
            encode_frame(&mut buf, p);
        }
        buf.extend_from_slice(tail);
        f.write_all(&buf).unwrap();
        (f, buf.len() as u64)
    }

    #[test]
    fn segment_header_roundtrips_and_rejects_wrong_base_and_magic() {
        let h = encode_segment_header(42);
        assert_eq!(check_segment_header(&h, 42), Ok(()));
        assert_eq!(
            check_segment_header(&h, 41),
            Err(CorruptReason::BaseOffsetMismatch {
                header: 42,
                name: 41
            })
        );
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(check_segment_header(&bad, 42), Err(CorruptReason::BadMagic));
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(
            check_segment_header(&bad, 42),
            Err(CorruptReason::HeaderChecksum)
        );
    }

    #[test]
    fn all_zero_frame_header_is_not_a_valid_empty_record() {
        assert_ne!(record_crc(0, &[]), 0);
    }

    #[test]
    fn checksum_covers_the_length_field() {
        assert_ne!(record_crc(3, b"abc"), record_crc(4, b"abc"));
    }

    #[test]
    fn scan_counts_clean_records() {
        let (f, len) = segment_with(&[b"one", b"", b"three"], &[]);
        let scan = scan_records(f.as_file(), len).unwrap();
        assert_eq!(
            scan,
            Scan {
                records: 3,
                valid_len: len,
                stop: None
            }
        );
    }

    #[test]
    fn scan_stops_at_partial_frame_header() {
        let (f, len) = segment_with(&[b"one"], &[1, 2, 3]);
        let scan = scan_records(f.as_file(), len).unwrap();
        assert_eq!(scan.records, 1);
        assert_eq!(scan.valid_len, len - 3);
        assert_eq!(scan.stop, Some(CorruptReason::TruncatedRecord));
    }

    #[test]
    fn scan_stops_at_length_pointing_past_end_of_file() {
        let mut tail = Vec::new();
        encode_frame(&mut tail, b"a long payload that is cut");
        tail.truncate(tail.len() - 5);
        let (f, len) = segment_with(&[b"one"], &tail);
        let scan = scan_records(f.as_file(), len).unwrap();
        assert_eq!(scan.records, 1);
        assert_eq!(scan.valid_len, len - tail.len() as u64);
        assert_eq!(scan.stop, Some(CorruptReason::TruncatedRecord));
    }

    #[test]
    fn scan_stops_at_checksum_mismatch() {
        let mut tail = Vec::new();
        encode_frame(&mut tail, b"flipped");
        let last = tail.len() - 1;
        tail[last] ^= 0x40;
        let (f, len) = segment_with(&[b"one", b"two"], &tail);
        let scan = scan_records(f.as_file(), len).unwrap();
        assert_eq!(scan.records, 2);
        assert_eq!(scan.stop, Some(CorruptReason::RecordChecksum));
    }
}
