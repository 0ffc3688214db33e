//! Per-sensor stream framing: turns the bytes of consecutive MQTT messages into verified
//! packets and counted "bad input" events, resynchronising after garbage.
//!
//! One [`FrameDecoder`] belongs to one sensor. A message may hold several packets, a packet may
//! be split across messages, and garbage may sit between packets. The caller
//! [`push`](FrameDecoder::push)es each message and drains [`next_frame`](FrameDecoder::next_frame)
//! until it returns `None`; on end of stream or idle timeout it drains
//! [`finish`](FrameDecoder::finish) the same way.
//!
//! # Resynchronisation
//!
//! The decoder looks at the byte under its cursor:
//!
//! - Not `0x7C`: garbage up to the next `0x7C`.
//! - `0x7C 0x1E` (a candidate IMU header): as soon as 4 bytes are there, `L` must be of the
//!   form `14 + 20·n` with `n <= max_samples_per_packet`; as soon as 18 bytes are there, the
//!   sample count must agree with `L`. A candidate failing either check is a false header: its
//!   `0x7C` is garbage and the scan goes on at the next byte. These early checks stop a stray
//!   `0x7C 0x1E` with a huge `L` from holding back the valid packets behind it.
//!   Once the whole frame is buffered, a good CRC yields [`Frame::Packet`]; a bad CRC yields
//!   `Bad { BadCrc, bytes: frame_len }` and the scan resumes *one* byte later, so a real packet
//!   hidden inside the damaged frame is still found.
//! - `0x7C` and another type: reported as `Bad { UnknownType, .. }` only if the whole frame
//!   that its length field describes is already buffered and its CRC verifies, i.e. it really
//!   is a frame of a type we do not know. Otherwise it is garbage. The decoder never waits for
//!   an unknown-type frame, because a random `0x7C` in garbage would then stall the stream
//!   behind a length it invented; the price is that an unknown-type frame split across
//!   messages is counted as garbage.
//!
//! # Accounting
//!
//! Every [`Frame::Bad`] carries the number of bytes it covers. A contiguous run of garbage is
//! reported once, when it ends: at the next plausible IMU header, before any other event, at
//! [`finish`](FrameDecoder::finish), or once it reaches `max_buffer_bytes` (so a sensor that sends
//! nothing but garbage is still reported). The bytes of a span already reported as `BadCrc`,
//! `UnknownType` or `Truncated` are not reported again as garbage; only a packet found inside
//! such a span is emitted (its bytes then count twice, which only happens on damaged input).
//!
//! # Bounds and cost
//!
//! Buffered bytes never exceed `max_buffer_bytes`: [`push`](FrameDecoder::push) discards the
//! oldest bytes instead and the next call reports `Bad { Overflow, bytes }`. The largest frame the
//! decoder accepts is therefore capped to fit the buffer. Consumed bytes are compacted away only
//! once they outnumber the unconsumed ones, so copying is amortised O(1) per byte. Scanning is
//! O(n) except for damaged frames: every plausible header whose CRC fails costs one CRC over its
//! claimed length, so adversarial input can cost O(n · max frame).

use std::fmt;
use std::mem;

use crate::crc16::crc16_arc;
use crate::imu::{
    self, CRC_BYTES, HEADER_BYTES, HEADER_ID, IMU_RAW_COMBO_V3, MAX_SAMPLES_PER_PACKET,
    MIN_FRAME_BYTES, PAYLOAD_FIXED_BYTES, PREFIX_BYTES, PacketError, PacketView, SAMPLE_BYTES,
};

/// Default bound of a decoder's buffer.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 64 * 1024;
/// Default largest sample count a decoder accepts in one packet.
pub const DEFAULT_MAX_SAMPLES_PER_PACKET: u16 = 1024;

/// Why input was rejected; the label of the per-sensor "bad input" counters.
///
/// The decoder emits `BadCrc`, `UnknownType`, `Garbage`, `Overflow` and `Truncated`; the other
/// reasons exist for the ingest layer (`InvalidJson`, `Oversize`, `UnknownTopic`), the pipeline
/// (`TimestampOutOfRange`, `StageFailed`) and for callers of [`PacketView::parse`] (`BadLength`,
/// via `From<PacketError>`). The decoder itself
/// counts a header with inconsistent lengths as garbage: it cannot tell one from a stray
/// `0x7C 0x1E` in noise.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum BadReason {
    /// A complete frame whose CRC does not match.
    BadCrc,
    /// A frame whose length field disagrees with its sample count.
    BadLength,
    /// A verified frame of a packet type this version does not decode.
    UnknownType,
    /// Bytes that are not part of any frame.
    Garbage,
    /// Bytes discarded because the per-sensor buffer bound was reached.
    Overflow,
    /// A JSON message that does not parse as a packet.
    InvalidJson,
    /// A message larger than the configured maximum.
    Oversize,
    /// A message on a topic that matches no configured pattern.
    UnknownTopic,
    /// A frame cut off by the end of the stream.
    Truncated,
    /// A packet whose event time lies outside the plausibility window around its receive time
    /// (a device with a broken clock); its samples go to the `quarantine` table.
    TimestampOutOfRange,
    /// A record that made a pipeline or sink stage fail; it goes to the `quarantine` table
    /// (dead letter) and the dataflow moves on.
    StageFailed,
}

impl BadReason {
    /// Every reason, in declaration order (for pre-registering metric label sets).
    pub const ALL: [BadReason; 11] = [
        BadReason::BadCrc,
        BadReason::BadLength,
        BadReason::UnknownType,
        BadReason::Garbage,
        BadReason::Overflow,
        BadReason::InvalidJson,
        BadReason::Oversize,
        BadReason::UnknownTopic,
        BadReason::Truncated,
        BadReason::TimestampOutOfRange,
        BadReason::StageFailed,
    ];

    /// The snake_case label used in metrics and JSON, e.g. `"bad_crc"`.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            BadReason::BadCrc => "bad_crc",
            BadReason::BadLength => "bad_length",
            BadReason::UnknownType => "unknown_type",
            BadReason::Garbage => "garbage",
            BadReason::Overflow => "overflow",
            BadReason::InvalidJson => "invalid_json",
            BadReason::Oversize => "oversize",
            BadReason::UnknownTopic => "unknown_topic",
            BadReason::Truncated => "truncated",
            BadReason::TimestampOutOfRange => "timestamp_out_of_range",
            BadReason::StageFailed => "stage_failed",
        }
    }
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<PacketError> for BadReason {
    /// Maps a [`PacketView::parse`] failure to the counter it belongs to.
    fn from(e: PacketError) -> Self {
        match e {
            PacketError::Truncated { .. } => BadReason::Truncated,
            PacketError::BadHeader => BadReason::Garbage,
            PacketError::UnknownType(_) => BadReason::UnknownType,
            PacketError::BadLength { .. } | PacketError::TooManySamples => BadReason::BadLength,
            PacketError::BadCrc { .. } => BadReason::BadCrc,
        }
    }
}

/// One decoder output: a verified packet, or a span of input that had to be rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A CRC-verified packet, borrowed from the decoder's buffer until the next call.
    Packet(PacketView<'a>),
    /// Rejected input; `bytes` is the size of the span (see the module docs on accounting).
    Bad {
        /// Why it was rejected.
        reason: BadReason,
        /// How many bytes the event covers.
        bytes: usize,
    },
}

/// What the bytes under the cursor are, as far as can be told without consuming anything.
enum Scan {
    /// Nothing is buffered.
    Empty,
    /// The first `n` bytes cannot start a frame.
    Garbage(usize),
    /// A lone `0x7C` at the end of the buffer: its type byte has not arrived yet.
    NeedType,
    /// A plausible IMU header whose frame is not complete yet.
    ImuIncomplete,
    /// A plausible IMU header whose whole frame (this many bytes) is buffered; CRC not checked.
    Imu(usize),
    /// A complete, CRC-verified frame of an unknown type, this many bytes long.
    UnknownType(usize),
}

/// Per-sensor decoder with resynchronisation; see the module docs for the rules.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    /// Bytes received; `buf[start..]` is not consumed yet.
    buf: Vec<u8>,
    /// Read cursor into `buf`.
    start: usize,
    /// Bound on `buf.len() - start`.
    max_buffer_bytes: usize,
    /// Largest sample count accepted in a header (already capped to fit the buffer).
    max_samples: u16,
    /// Garbage bytes consumed but not reported yet (the current run).
    garbage: usize,
    /// Bytes from the cursor on that belong to an already reported bad span; skipping them
    /// does not count as garbage. Always `<= buf.len() - start`.
    shadow: usize,
    /// Bytes discarded by `push` and not reported yet.
    overflowed: usize,
}

impl Default for FrameDecoder {
    /// A decoder with a 64 KiB buffer that accepts up to 1024 samples per packet.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BUFFER_BYTES, DEFAULT_MAX_SAMPLES_PER_PACKET)
    }
}

impl FrameDecoder {
    /// Creates a decoder that buffers at most `max_buffer_bytes` and accepts packets of at most
    /// `max_samples_per_packet` samples.
    ///
    /// The buffer holds at least one empty packet (20 bytes), and the sample limit is lowered so
    /// that the largest accepted frame fits in the buffer (a frame that cannot be buffered could
    /// never complete).
    #[must_use]
    pub fn new(max_buffer_bytes: usize, max_samples_per_packet: u16) -> Self {
        let max_buffer_bytes = max_buffer_bytes.max(MIN_FRAME_BYTES);
        let fits = (max_buffer_bytes - MIN_FRAME_BYTES) / SAMPLE_BYTES;
        let cap = u16::try_from(fits)
            .unwrap_or(u16::MAX)
            .min(MAX_SAMPLES_PER_PACKET);
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_buffer_bytes,
            max_samples: max_samples_per_packet.min(cap),
            garbage: 0,
            shadow: 0,
            overflowed: 0,
        }
    }

    /// Recreates a decoder from bytes saved with [`pending`](Self::pending) at a checkpoint.
    ///
    /// Only the buffered bytes are restored: a garbage run not yet reported when the checkpoint
    /// was taken is not counted, and the tail of a reported bad span may be counted again as
    /// garbage. Packets come out exactly as they would have from the original decoder.
    #[must_use]
    pub fn restore(pending: &[u8], max_buffer_bytes: usize, max_samples_per_packet: u16) -> Self {
        let mut decoder = Self::new(max_buffer_bytes, max_samples_per_packet);
        decoder.push(pending);
        decoder
    }

    /// The buffer bound in effect.
    #[must_use]
    pub fn max_buffer_bytes(&self) -> usize {
        self.max_buffer_bytes
    }

    /// The per-packet sample limit in effect (possibly lowered to fit the buffer, see [`new`](Self::new)).
    #[must_use]
    pub fn max_samples_per_packet(&self) -> u16 {
        self.max_samples
    }

    /// Appends the bytes of one message.
    ///
    /// If the unconsumed bytes would exceed the bound, the oldest are discarded (also from
    /// `bytes` itself if it alone is larger) and the next [`next_frame`](Self::next_frame)
    /// reports `Bad { Overflow, bytes }`. Drain `next_frame` after every push: then only a
    /// message larger than the bound, or a frame claiming more than the free space, overflows.
    pub fn push(&mut self, bytes: &[u8]) {
        let pending = self.buf.len() - self.start;
        let mut bytes = bytes;
        let total = pending.saturating_add(bytes.len());
        if total > self.max_buffer_bytes {
            let excess = total - self.max_buffer_bytes;
            let from_pending = excess.min(pending);
            self.start += from_pending;
            self.shadow = self.shadow.saturating_sub(from_pending);
            bytes = &bytes[excess - from_pending..];
            self.overflowed = self.overflowed.saturating_add(excess);
        }
        // Compact only when the consumed prefix is at least as long as what remains, so each
        // byte is moved at most once on average and the Vec stays within twice the bound.
        if self.start > 0 && self.start >= self.buf.len() - self.start {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next verified packet or bad-input event, or `None` when more bytes are needed.
    ///
    /// Never panics, whatever was pushed. A returned packet borrows the buffer, so it must be
    /// dropped (or copied) before the next call.
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        self.advance(false)
    }

    /// End of stream or idle flush: like [`next_frame`](Self::next_frame), but instead of waiting
    /// for more bytes it reports what is left, an incomplete IMU frame as
    /// `Bad { Truncated, bytes }` and anything else as `Bad { Garbage, bytes }`, still emitting
    /// any valid packet found inside.
    ///
    /// Call it until it returns `None`; the decoder is then empty and can be reused.
    pub fn finish(&mut self) -> Option<Frame<'_>> {
        self.advance(true)
    }

    /// Bytes buffered but not consumed yet: save them at a checkpoint and hand them to
    /// [`restore`](Self::restore).
    #[must_use]
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn advance(&mut self, at_end: bool) -> Option<Frame<'_>> {
        loop {
            if self.overflowed > 0 {
                // Garbage consumed before the overflow happened comes first, to keep events in order.
                if self.garbage > 0 {
                    return Some(self.take_garbage());
                }
                let bytes = mem::take(&mut self.overflowed);
                return Some(Frame::Bad {
                    reason: BadReason::Overflow,
                    bytes,
                });
            }
            if self.garbage >= self.max_buffer_bytes {
                return Some(self.take_garbage());
            }
            let in_shadow = self.shadow > 0;
            let pending_len = self.buf.len() - self.start;
            match scan(
                &self.buf[self.start..],
                self.max_samples,
                self.max_buffer_bytes,
                !in_shadow,
            ) {
                Scan::Empty => {
                    // The run may go on in the next message; only the end of the stream closes it.
                    return if at_end && self.garbage > 0 {
                        Some(self.take_garbage())
                    } else {
                        None
                    };
                }
                Scan::Garbage(n) => self.skip(n),
                Scan::NeedType if at_end => self.skip(1),
                Scan::NeedType => return None,
                Scan::ImuIncomplete => {
                    if self.garbage > 0 {
                        return Some(self.take_garbage());
                    }
                    if !at_end {
                        return None;
                    }
                    if in_shadow {
                        self.skip(1);
                    } else {
                        self.open_bad_span(pending_len);
                        return Some(Frame::Bad {
                            reason: BadReason::Truncated,
                            bytes: pending_len,
                        });
                    }
                }
                Scan::Imu(frame_len) => {
                    if self.garbage > 0 {
                        return Some(self.take_garbage());
                    }
                    let at = self.start;
                    match imu::verify(&self.buf[at..at + frame_len]) {
                        Ok(_) => {
                            self.start += frame_len;
                            self.shadow = self.shadow.saturating_sub(frame_len);
                            let view = PacketView::from_verified(&self.buf[at..at + frame_len]);
                            return Some(Frame::Packet(view));
                        }
                        // A damaged frame inside a reported one is part of the same damage.
                        Err(_) if in_shadow => self.skip(1),
                        Err(e) => {
                            self.open_bad_span(frame_len);
                            return Some(Frame::Bad {
                                reason: e.into(),
                                bytes: frame_len,
                            });
                        }
                    }
                }
                Scan::UnknownType(frame_len) => {
                    if self.garbage > 0 {
                        return Some(self.take_garbage());
                    }
                    self.open_bad_span(frame_len);
                    return Some(Frame::Bad {
                        reason: BadReason::UnknownType,
                        bytes: frame_len,
                    });
                }
            }
        }
    }

    /// Consumes `n` bytes that are not a frame: shadowed ones silently, the rest as garbage.
    fn skip(&mut self, n: usize) {
        self.start += n;
        let shadowed = n.min(self.shadow);
        self.shadow -= shadowed;
        self.garbage = self.garbage.saturating_add(n - shadowed);
    }

    /// A bad span of `len` bytes starting at the cursor has just been reported: step over its
    /// first byte only (a packet may hide inside) and keep the rest out of the garbage count.
    fn open_bad_span(&mut self, len: usize) {
        self.start += 1;
        self.shadow = self.shadow.max(len.saturating_sub(1));
    }

    fn take_garbage(&mut self) -> Frame<'static> {
        Frame::Bad {
            reason: BadReason::Garbage,
            bytes: mem::take(&mut self.garbage),
        }
    }
}

/// Classifies the bytes at the start of `pending` (see the module docs).
fn scan(pending: &[u8], max_samples: u16, max_frame: usize, look_for_unknown: bool) -> Scan {
    let Some(&first) = pending.first() else {
        return Scan::Empty;
    };
    if first != HEADER_ID {
        let run = pending
            .iter()
            .position(|&b| b == HEADER_ID)
            .unwrap_or(pending.len());
        return Scan::Garbage(run);
    }
    let Some(&ty) = pending.get(1) else {
        return Scan::NeedType;
    };
    if ty != IMU_RAW_COMBO_V3 {
        return match unknown_frame_len(pending, max_frame) {
            Some(len) if look_for_unknown => Scan::UnknownType(len),
            _ => Scan::Garbage(1),
        };
    }
    if pending.len() < HEADER_BYTES {
        return Scan::ImuIncomplete;
    }
    let declared = usize::from(imu::u16_le(pending, 2));
    let sample_bytes = declared.wrapping_sub(PAYLOAD_FIXED_BYTES);
    if declared < PAYLOAD_FIXED_BYTES
        || sample_bytes % SAMPLE_BYTES != 0
        || sample_bytes / SAMPLE_BYTES > usize::from(max_samples)
    {
        return Scan::Garbage(1);
    }
    if pending.len() < PREFIX_BYTES {
        return Scan::ImuIncomplete;
    }
    if usize::from(imu::u16_le(pending, 16)) != sample_bytes / SAMPLE_BYTES {
        return Scan::Garbage(1);
    }
    let frame_len = HEADER_BYTES + declared + CRC_BYTES;
    if pending.len() < frame_len {
        Scan::ImuIncomplete
    } else {
        Scan::Imu(frame_len)
    }
}

/// Length of the frame a non-IMU header at the start of `pending` describes, if that frame is
/// complete, fits the buffer bound, and its CRC verifies.
fn unknown_frame_len(pending: &[u8], max_frame: usize) -> Option<usize> {
    if pending.len() < HEADER_BYTES {
        return None;
    }
    let crc_at = HEADER_BYTES + usize::from(imu::u16_le(pending, 2));
    let frame_len = crc_at + CRC_BYTES;
    let complete = frame_len <= pending.len() && frame_len <= max_frame;
    (complete && crc16_arc(&pending[..crc_at]) == imu::u16_le(pending, crc_at)).then_some(frame_len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report
mod tests {
    use super::*;
    use crate::imu::{RawSample, encode_packet, frame_len_for_samples};

    /// What a test cares about in an event: packets by their first index, bad spans in full.
    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        P(u32),
        Bad(BadReason, usize),
    }

    fn ev(f: Frame<'_>) -> Ev {
        match f {
            Frame::Packet(p) => Ev::P(p.base_sample_number()),
            Frame::Bad { reason, bytes } => Ev::Bad(reason, bytes),
        }
    }

    fn drain(d: &mut FrameDecoder, out: &mut Vec<Ev>) {
        while let Some(f) = d.next_frame() {
            out.push(ev(f));
        }
    }

    fn finish(d: &mut FrameDecoder, out: &mut Vec<Ev>) {
        while let Some(f) = d.finish() {
            out.push(ev(f));
        }
    }

    /// Decodes `chunks` pushed one by one, then finishes the stream.
    fn decode(d: &mut FrameDecoder, chunks: &[&[u8]]) -> Vec<Ev> {
        let mut out = Vec::new();
        for c in chunks {
            d.push(c);
            drain(d, &mut out);
        }
        finish(d, &mut out);
        out
    }

    fn packet(base: u32, n: usize) -> Vec<u8> {
        let samples: Vec<RawSample> = (0..n)
            .map(|i| RawSample {
                acc: [i as i16, 1, 2],
                temp: 25,
                ..RawSample::default()
            })
            .collect();
        let mut out = Vec::new();
        encode_packet(base, u64::from(base) * 5_000, &samples, &mut out);
        out
    }

    #[test]
    fn packet_split_into_single_bytes_is_reassembled() {
        let mut stream = packet(1, 3);
        stream.extend(packet(4, 64));
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(
            decode(&mut FrameDecoder::default(), &chunks),
            [Ev::P(1), Ev::P(4)]
        );
    }

    #[test]
    fn several_packets_in_one_message_all_come_out() {
        let stream: Vec<u8> = (0..5).flat_map(|i| packet(i * 10, 2)).collect();
        let got = decode(&mut FrameDecoder::default(), &[&stream]);
        assert_eq!(got, [Ev::P(0), Ev::P(10), Ev::P(20), Ev::P(30), Ev::P(40)]);
    }

    #[test]
    fn garbage_run_is_reported_once_even_when_split_across_messages() {
        let a = packet(1, 1);
        let b = packet(2, 1);
        let chunks: [&[u8]; 5] = [b"hello world", &a, b"ab", b"c\x7c", &b];
        let got = decode(&mut FrameDecoder::default(), &chunks);
        assert_eq!(
            got,
            [
                Ev::Bad(BadReason::Garbage, 11),
                Ev::P(1),
                Ev::Bad(BadReason::Garbage, 4),
                Ev::P(2)
            ]
        );
    }

    #[test]
    fn trailing_garbage_is_reported_by_finish() {
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        d.push(&packet(1, 1));
        d.push(b"xyz\x7c");
        drain(&mut d, &mut out);
        assert_eq!(
            out,
            [Ev::P(1)],
            "the run may continue, so it is not reported yet"
        );
        assert_eq!(d.pending(), b"\x7c");
        finish(&mut d, &mut out);
        assert_eq!(out, [Ev::P(1), Ev::Bad(BadReason::Garbage, 4)]);
        assert!(d.pending().is_empty());
    }

    #[test]
    fn false_header_with_impossible_length_is_rejected_after_four_bytes() {
        // L = 0xFFFF is not 14 + 20n, so nothing waits for 64 KiB to arrive.
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        d.push(&[0x7C, 0x1E, 0xFF, 0xFF]);
        d.push(&packet(9, 1));
        drain(&mut d, &mut out);
        assert_eq!(out, [Ev::Bad(BadReason::Garbage, 4), Ev::P(9)]);
    }

    #[test]
    fn false_header_whose_count_disagrees_is_rejected_after_eighteen_bytes() {
        // L says 100 samples (a 2 KiB frame) but n says 5: rejected without waiting for 2 KiB.
        let mut fake = vec![0x7C, 0x1E];
        fake.extend((14u16 + 20 * 100).to_le_bytes());
        fake.extend([0u8; 12]);
        fake.extend(5u16.to_le_bytes());
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        d.push(&fake[..17]);
        drain(&mut d, &mut out);
        assert!(out.is_empty(), "17 bytes cannot be judged yet");
        d.push(&fake[17..]);
        d.push(&packet(3, 2));
        drain(&mut d, &mut out);
        assert_eq!(out, [Ev::Bad(BadReason::Garbage, 18), Ev::P(3)]);
    }

    #[test]
    fn header_claiming_more_samples_than_allowed_is_garbage() {
        let mut d = FrameDecoder::new(DEFAULT_MAX_BUFFER_BYTES, 2);
        let big = packet(1, 3);
        let got = decode(&mut d, &[&big, &packet(2, 2)]);
        assert_eq!(got, [Ev::Bad(BadReason::Garbage, big.len()), Ev::P(2)]);
    }

    #[test]
    fn corrupt_packet_between_good_ones_is_one_bad_crc_event() {
        let mut bad = packet(2, 4);
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        let stream = [packet(1, 4), bad.clone(), packet(3, 4)].concat();
        let got = decode(&mut FrameDecoder::default(), &[&stream]);
        assert_eq!(
            got,
            [Ev::P(1), Ev::Bad(BadReason::BadCrc, bad.len()), Ev::P(3)]
        );
    }

    #[test]
    fn packet_hidden_inside_a_damaged_frame_is_found() {
        // An outer frame claiming 3 samples whose sample area holds a complete 1-sample packet
        // (a device that restarted mid-packet looks like this), with a wrong outer CRC.
        let inner = packet(77, 1);
        let mut outer = vec![0x7C, 0x1E];
        outer.extend((14u16 + 60).to_le_bytes());
        outer.extend(5u32.to_le_bytes());
        outer.extend(0u64.to_le_bytes());
        outer.extend(3u16.to_le_bytes());
        outer.extend(&inner);
        outer.extend([0u8; 20]);
        let crc = crc16_arc(&outer) ^ 1;
        outer.extend(crc.to_le_bytes());
        assert_eq!(outer.len(), frame_len_for_samples(3));

        let got = decode(&mut FrameDecoder::default(), &[&outer, &packet(100, 1)]);
        assert_eq!(got, [Ev::Bad(BadReason::BadCrc, 80), Ev::P(77), Ev::P(100)]);
    }

    #[test]
    fn truncated_packet_is_reported_by_finish() {
        let mut d = FrameDecoder::default();
        let mut out = Vec::new();
        let next = packet(2, 4);
        d.push(&packet(1, 1));
        d.push(&next[..30]);
        drain(&mut d, &mut out);
        assert_eq!(out, [Ev::P(1)]);
        assert_eq!(d.pending(), &next[..30]);
        finish(&mut d, &mut out);
        assert_eq!(out, [Ev::P(1), Ev::Bad(BadReason::Truncated, 30)]);
        assert!(d.pending().is_empty());
        assert!(d.finish().is_none() && d.next_frame().is_none());
    }

    #[test]
    fn verified_frame_of_another_type_is_reported_as_unknown_type() {
        let mut other = vec![0x7C, 0x2A, 4, 0, 1, 2, 3, 4];
        let crc = crc16_arc(&other);
        other.extend(crc.to_le_bytes());
        let got = decode(&mut FrameDecoder::default(), &[&other, &packet(5, 1)]);
        assert_eq!(got, [Ev::Bad(BadReason::UnknownType, 10), Ev::P(5)]);
    }

    #[test]
    fn header_byte_followed_by_another_type_without_a_valid_frame_is_garbage() {
        let got = decode(
            &mut FrameDecoder::default(),
            &[&[0x7C, 0x2A, 0, 0, 9, 9, 9], &packet(5, 1)],
        );
        assert_eq!(got, [Ev::Bad(BadReason::Garbage, 7), Ev::P(5)]);
    }

    #[test]
    fn overflow_discards_the_oldest_bytes_and_is_reported_first() {
        let mut d = FrameDecoder::new(100, 4);
        let mut msg = vec![b'g'; 100];
        msg.extend(packet(8, 1)); // 40 bytes: 140 in total, 40 too many
        d.push(&msg);
        assert_eq!(d.pending().len(), 100);
        let mut out = Vec::new();
        drain(&mut d, &mut out);
        assert_eq!(
            out,
            [
                Ev::Bad(BadReason::Overflow, 40),
                Ev::Bad(BadReason::Garbage, 60),
                Ev::P(8)
            ]
        );
    }

    #[test]
    fn endless_garbage_is_reported_in_buffer_sized_runs() {
        let mut d = FrameDecoder::new(64, 2);
        let mut out = Vec::new();
        for _ in 0..4 {
            d.push(&[0u8; 40]);
            drain(&mut d, &mut out);
        }
        assert_eq!(
            out,
            [
                Ev::Bad(BadReason::Garbage, 80),
                Ev::Bad(BadReason::Garbage, 80)
            ]
        );
    }

    #[test]
    fn sample_limit_is_lowered_to_what_the_buffer_can_hold() {
        assert_eq!(FrameDecoder::new(100, 1024).max_samples_per_packet(), 4);
        assert_eq!(
            FrameDecoder::new(0, 1024).max_buffer_bytes(),
            MIN_FRAME_BYTES
        );
        assert_eq!(
            FrameDecoder::new(usize::MAX, u16::MAX).max_samples_per_packet(),
            MAX_SAMPLES_PER_PACKET
        );
        assert_eq!(FrameDecoder::default().max_samples_per_packet(), 1024);
    }

    #[test]
    fn restored_decoder_completes_a_packet_split_at_the_checkpoint() {
        let p = packet(42, 8);
        let mut d = FrameDecoder::default();
        d.push(&p[..50]);
        assert!(d.next_frame().is_none());
        let mut restored = FrameDecoder::restore(
            d.pending(),
            DEFAULT_MAX_BUFFER_BYTES,
            DEFAULT_MAX_SAMPLES_PER_PACKET,
        );
        let got = decode(&mut restored, &[&p[50..]]);
        assert_eq!(got, [Ev::P(42)]);
    }

    #[test]
    fn buffer_memory_stays_bounded_over_a_long_stream() {
        let stream: Vec<u8> = (0..2_000).flat_map(|i| packet(i, 64)).collect();
        let mut d = FrameDecoder::new(4096, 64);
        let mut seen = 0u32;
        // Odd chunk sizes, so packets straddle messages all the time.
        for chunk in stream.chunks(997) {
            d.push(chunk);
            while let Some(f) = d.next_frame() {
                assert!(matches!(f, Frame::Packet(p) if p.base_sample_number() == seen));
                seen += 1;
            }
            assert!(d.buf.len() <= 2 * 4096, "buffer grew to {}", d.buf.len());
        }
        assert_eq!(seen, 2_000);
    }

    #[test]
    fn bad_reason_labels_are_distinct_snake_case() {
        let labels: std::collections::BTreeSet<_> =
            BadReason::ALL.iter().map(BadReason::as_str).collect();
        assert_eq!(labels.len(), BadReason::ALL.len());
        assert!(
            labels
                .iter()
                .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        assert_eq!(BadReason::BadCrc.to_string(), "bad_crc");
        assert_eq!(
            BadReason::from(PacketError::BadCrc {
                expected: 1,
                actual: 2
            }),
            BadReason::BadCrc
        );
    }
}
