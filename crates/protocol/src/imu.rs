//! The binary IMU packet, type `0x1E` (`IMU_RAW_COMBO_V3`): layout, zero-copy parsing,
//! encoding and unit conversion.
//!
//! ```text
//! offset  size  field
//! 0       1     header id 0x7C
//! 1       1     data type 0x1E
//! 2       2     payload length L, u16 LE (always 14 + 20·n)
//! 4       4     base_sample_number, u32 LE      ┐
//! 8       8     timestamp_us, u64 LE            │ payload (L bytes)
//! 16      2     n, u16 LE                       │
//! 18      20·n  samples                         ┘
//! 4+L     2     CRC-16/ARC over [0, 4+L), u16 LE
//! ```
//!
//! A sample is 20 bytes with *mixed* endianness, as the devices send it: accelerometer and
//! gyroscope x, y, z are i16 big-endian, magnetometer x, y, z are i16 little-endian and the
//! temperature is i16 big-endian.
//!
//! [`PacketView`] checks a frame once (header, type, length consistency, CRC) and then reads
//! fields straight out of the borrowed bytes, so the ingest path never copies samples.

use std::fmt;

use crate::crc16::crc16_arc;

/// First byte of every packet.
pub const HEADER_ID: u8 = 0x7C;
/// Data type byte of the combined raw IMU packet, version 3.
pub const IMU_RAW_COMBO_V3: u8 = 0x1E;
/// Size of one encoded sample.
pub const SAMPLE_BYTES: usize = 20;
/// Accelerometer scale: raw LSB to g.
pub const ACC_G_PER_LSB: f32 = 0.488 / 1000.0;
/// Gyroscope scale: raw LSB to degrees per second.
pub const GYRO_DPS_PER_LSB: f32 = 140.0 / 1000.0;
/// Magnetometer scale: raw LSB to gauss.
pub const MAG_GAUSS_PER_LSB: f32 = 1.0 / 1711.0;
/// Spacing of consecutive samples at the default 200 Hz: sample `i` of a packet was taken at
/// `timestamp_us + i * DEFAULT_SAMPLE_INTERVAL_US` (the rate is configurable elsewhere).
pub const DEFAULT_SAMPLE_INTERVAL_US: u64 = 5_000;

/// Bytes before the payload: header id, type, payload length.
pub const HEADER_BYTES: usize = 4;
/// Bytes of the fixed part of the payload: base sample number, timestamp, sample count.
pub const PAYLOAD_FIXED_BYTES: usize = 14;
/// Bytes of the trailing CRC.
pub const CRC_BYTES: usize = 2;
/// Bytes from the start of a frame up to and including the sample count: once this many are
/// available, the length field can be checked against the sample count.
pub const PREFIX_BYTES: usize = HEADER_BYTES + PAYLOAD_FIXED_BYTES;
/// Size of a packet without samples, the smallest possible frame.
pub const MIN_FRAME_BYTES: usize = PREFIX_BYTES + CRC_BYTES;
/// Most samples a packet can carry: the payload length `14 + 20·n` must fit in a u16.
pub const MAX_SAMPLES_PER_PACKET: u16 =
    ((u16::MAX as usize - PAYLOAD_FIXED_BYTES) / SAMPLE_BYTES) as u16;

/// Size of a whole frame (header, payload and CRC) carrying `samples` samples.
#[must_use]
pub const fn frame_len_for_samples(samples: usize) -> usize {
    MIN_FRAME_BYTES + samples * SAMPLE_BYTES
}

/// One sample exactly as the device measured it (sensor LSBs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RawSample {
    /// Accelerometer x, y, z.
    pub acc: [i16; 3],
    /// Gyroscope x, y, z.
    pub gyro: [i16; 3],
    /// Magnetometer x, y, z.
    pub mag: [i16; 3],
    /// Temperature, raw (never converted).
    pub temp: i16,
}

/// Physical units: acc in g, gyro in deg/s, mag in gauss (what JSON packets carry too).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhysSample {
    /// Acceleration x, y, z in g.
    pub acc: [f32; 3],
    /// Angular rate x, y, z in degrees per second.
    pub gyro: [f32; 3],
    /// Magnetic field x, y, z in gauss.
    pub mag: [f32; 3],
    /// Temperature, raw sensor value.
    pub temp_raw: i16,
}

impl RawSample {
    /// Converts to physical units with the fixed sensor scales ([`ACC_G_PER_LSB`],
    /// [`GYRO_DPS_PER_LSB`], [`MAG_GAUSS_PER_LSB`]); the temperature stays raw.
    #[must_use]
    pub fn to_physical(&self) -> PhysSample {
        PhysSample {
            acc: self.acc.map(|v| f32::from(v) * ACC_G_PER_LSB),
            gyro: self.gyro.map(|v| f32::from(v) * GYRO_DPS_PER_LSB),
            mag: self.mag.map(|v| f32::from(v) * MAG_GAUSS_PER_LSB),
            temp_raw: self.temp,
        }
    }

    /// The inverse of [`to_physical`](Self::to_physical), for simulators and JSON-to-binary
    /// conversion: each value is divided by its scale, rounded to the nearest LSB (ties away
    /// from zero) and saturated to the i16 range; NaN becomes 0.
    ///
    /// `RawSample::from_physical(&raw.to_physical()) == raw` for every `raw`.
    #[must_use]
    pub fn from_physical(p: &PhysSample) -> RawSample {
        // `as` from f32 to i16 saturates and maps NaN to 0, which is exactly the contract.
        let quantise = |v: f32, scale: f32| (v / scale).round() as i16;
        RawSample {
            acc: p.acc.map(|v| quantise(v, ACC_G_PER_LSB)),
            gyro: p.gyro.map(|v| quantise(v, GYRO_DPS_PER_LSB)),
            mag: p.mag.map(|v| quantise(v, MAG_GAUSS_PER_LSB)),
            temp: p.temp_raw,
        }
    }

    /// Decodes one 20-byte sample in the wire layout (see the module docs).
    #[must_use]
    pub fn from_bytes(b: &[u8; SAMPLE_BYTES]) -> RawSample {
        let be = |i: usize| i16::from_be_bytes([b[i], b[i + 1]]);
        let le = |i: usize| i16::from_le_bytes([b[i], b[i + 1]]);
        RawSample {
            acc: [be(0), be(2), be(4)],
            gyro: [be(6), be(8), be(10)],
            mag: [le(12), le(14), le(16)],
            temp: be(18),
        }
    }

    /// Encodes the sample in the wire layout; the inverse of [`from_bytes`](Self::from_bytes).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; SAMPLE_BYTES] {
        // Spelled out field by field (the magnetometer is the only little-endian field) so it
        // compiles to a handful of byte swaps and stores: the simulator encodes every sample.
        let [ax, ay, az] = self.acc.map(i16::to_be_bytes);
        let [gx, gy, gz] = self.gyro.map(i16::to_be_bytes);
        let [mx, my, mz] = self.mag.map(i16::to_le_bytes);
        let [t0, t1] = self.temp.to_be_bytes();
        [
            ax[0], ax[1], ay[0], ay[1], az[0], az[1], gx[0], gx[1], gy[0], gy[1], gz[0], gz[1],
            mx[0], mx[1], my[0], my[1], mz[0], mz[1], t0, t1,
        ]
    }
}

/// Why a byte slice is not a valid `IMU_RAW_COMBO_V3` packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than the frame needs; `needed` is the smallest total length that could
    /// complete it given what has been seen so far.
    #[error("truncated packet: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes the frame needs (at least).
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The first byte is not [`HEADER_ID`].
    #[error("bad header: first byte is not 0x7c")]
    BadHeader,
    /// The data type byte is not [`IMU_RAW_COMBO_V3`].
    #[error("unknown packet type {0:#04x}")]
    UnknownType(u8),
    /// The payload length field disagrees with the sample count (`L != 14 + 20·n`).
    #[error(
        "bad length: payload length {declared} does not fit {samples} samples (expected 14 + 20*n)"
    )]
    BadLength {
        /// Payload length L from the header.
        declared: u16,
        /// Sample count n from the payload.
        samples: u16,
    },
    /// The CRC carried by the frame does not match its bytes.
    #[error("bad CRC: bytes hash to {expected:#06x} but the frame carries {actual:#06x}")]
    BadCrc {
        /// CRC-16/ARC computed over the received bytes `[0, 4+L)`.
        expected: u16,
        /// CRC found in the last two bytes of the frame.
        actual: u16,
    },
    /// More than [`MAX_SAMPLES_PER_PACKET`] samples were given to the encoder.
    #[error("too many samples for one packet (at most 3276)")]
    TooManySamples,
}

/// A CRC-verified packet borrowed from a buffer (zero-copy; samples decoded on access).
#[derive(Clone, Copy)]
pub struct PacketView<'a> {
    /// Exactly the frame: header, payload and CRC.
    frame: &'a [u8],
    /// The sample area of `frame`, already cut into 20-byte records.
    samples: &'a [[u8; SAMPLE_BYTES]],
}

impl<'a> PacketView<'a> {
    /// Parses and verifies the frame at the start of `frame`: header id, type, `L == 14 + 20·n`,
    /// completeness and CRC, in that order (the first failing check is the error).
    ///
    /// `frame` is normally exactly one frame; bytes after the frame's end are not part of the
    /// packet and are ignored, which lets callers walk a buffer of back-to-back frames with
    /// [`frame_len`](Self::frame_len). For streams with garbage or split packets use
    /// [`FrameDecoder`](crate::framing::FrameDecoder) instead.
    pub fn parse(frame: &'a [u8]) -> Result<PacketView<'a>, PacketError> {
        let frame_len = verify(frame)?;
        Ok(PacketView::from_verified(&frame[..frame_len]))
    }

    /// Wraps a slice that [`verify`] accepted and that is cut to exactly the frame.
    pub(crate) fn from_verified(frame: &'a [u8]) -> PacketView<'a> {
        let sample_area = frame
            .get(PREFIX_BYTES..frame.len().saturating_sub(CRC_BYTES))
            .unwrap_or_default();
        let (samples, rest) = sample_area.as_chunks::<SAMPLE_BYTES>();
        debug_assert!(rest.is_empty(), "verify() guarantees whole samples");
        PacketView { frame, samples }
    }

    /// Index of the first sample; sample `i` has index `base_sample_number + i` (wrapping is the
    /// device's business, not checked here).
    #[must_use]
    pub fn base_sample_number(&self) -> u32 {
        u32::from_le_bytes([self.frame[4], self.frame[5], self.frame[6], self.frame[7]])
    }

    /// Device time of the first sample, microseconds since the Unix epoch.
    #[must_use]
    pub fn timestamp_us(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.frame[8..16]);
        u64::from_le_bytes(b)
    }

    /// Number of samples `n`.
    #[must_use]
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True if the packet carries no samples (legal on the wire).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Decodes sample `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    #[must_use]
    pub fn sample(&self, i: usize) -> RawSample {
        RawSample::from_bytes(&self.samples[i])
    }

    /// Decodes the samples in order.
    pub fn samples(&self) -> Samples<'a> {
        Samples {
            inner: self.samples.iter(),
        }
    }

    /// Size of the whole frame in bytes: `4 + L + 2`.
    #[must_use]
    pub fn frame_len(&self) -> usize {
        self.frame.len()
    }

    /// The verified frame bytes (header to CRC inclusive), e.g. to store or forward the packet
    /// without re-encoding it.
    #[must_use]
    pub fn as_bytes(&self) -> &'a [u8] {
        self.frame
    }
}

impl fmt::Debug for PacketView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The raw bytes are unreadable in logs; show what they mean instead.
        f.debug_struct("PacketView")
            .field("base_sample_number", &self.base_sample_number())
            .field("timestamp_us", &self.timestamp_us())
            .field("samples", &self.len())
            .field("frame_len", &self.frame_len())
            .finish()
    }
}

/// Two views are equal when their frames are byte-for-byte equal.
impl PartialEq for PacketView<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.frame == other.frame
    }
}

impl Eq for PacketView<'_> {}

/// Iterator over the samples of a [`PacketView`], decoding each on demand.
#[derive(Clone, Debug)]
pub struct Samples<'a> {
    inner: std::slice::Iter<'a, [u8; SAMPLE_BYTES]>,
}

impl Iterator for Samples<'_> {
    type Item = RawSample;

    fn next(&mut self) -> Option<RawSample> {
        self.inner.next().map(RawSample::from_bytes)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }

    fn nth(&mut self, n: usize) -> Option<RawSample> {
        self.inner.nth(n).map(RawSample::from_bytes)
    }
}

impl DoubleEndedIterator for Samples<'_> {
    fn next_back(&mut self) -> Option<RawSample> {
        self.inner.next_back().map(RawSample::from_bytes)
    }
}

impl ExactSizeIterator for Samples<'_> {}

impl std::iter::FusedIterator for Samples<'_> {}

/// Appends one encoded packet to `out`.
///
/// # Panics
///
/// If `samples.len() > MAX_SAMPLES_PER_PACKET` (3276); use [`try_encode_packet`] when the
/// count is not known to be small.
pub fn encode_packet(
    base_sample_number: u32,
    timestamp_us: u64,
    samples: &[RawSample],
    out: &mut Vec<u8>,
) {
    if let Err(e) = try_encode_packet(base_sample_number, timestamp_us, samples, out) {
        panic!("encode_packet: {e}");
    }
}

/// Appends one encoded packet to `out`, or returns [`PacketError::TooManySamples`] (leaving
/// `out` untouched) if `samples` does not fit in one packet.
pub fn try_encode_packet(
    base_sample_number: u32,
    timestamp_us: u64,
    samples: &[RawSample],
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    let n = u16::try_from(samples.len())
        .ok()
        .filter(|&n| n <= MAX_SAMPLES_PER_PACKET)
        .ok_or(PacketError::TooManySamples)?;
    // Cannot overflow: n <= MAX_SAMPLES_PER_PACKET was chosen so that it fits.
    let payload_len = (PAYLOAD_FIXED_BYTES + samples.len() * SAMPLE_BYTES) as u16;
    let start = out.len();
    out.reserve(frame_len_for_samples(samples.len()));
    out.extend_from_slice(&[HEADER_ID, IMU_RAW_COMBO_V3]);
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&base_sample_number.to_le_bytes());
    out.extend_from_slice(&timestamp_us.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    let body = out.len();
    out.resize(body + samples.len() * SAMPLE_BYTES, 0);
    for (dst, s) in out[body..].chunks_exact_mut(SAMPLE_BYTES).zip(samples) {
        dst.copy_from_slice(&s.to_bytes());
    }
    let crc = crc16_arc(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Checks the frame at the start of `frame` (see [`PacketView::parse`]) and returns its length.
pub(crate) fn verify(frame: &[u8]) -> Result<usize, PacketError> {
    match frame.first() {
        None => {
            return Err(PacketError::Truncated {
                needed: MIN_FRAME_BYTES,
                got: 0,
            });
        }
        Some(&b) if b != HEADER_ID => return Err(PacketError::BadHeader),
        Some(_) => {}
    }
    if let Some(&ty) = frame.get(1)
        && ty != IMU_RAW_COMBO_V3
    {
        return Err(PacketError::UnknownType(ty));
    }
    if frame.len() < PREFIX_BYTES {
        // Once L is readable it tells the real size; until then the minimum frame is all we know.
        let needed = if frame.len() >= HEADER_BYTES {
            HEADER_BYTES + usize::from(u16_le(frame, 2)) + CRC_BYTES
        } else {
            MIN_FRAME_BYTES
        };
        return Err(PacketError::Truncated {
            needed: needed.max(MIN_FRAME_BYTES),
            got: frame.len(),
        });
    }
    let declared = u16_le(frame, 2);
    let samples = u16_le(frame, 16);
    if usize::from(declared) != PAYLOAD_FIXED_BYTES + usize::from(samples) * SAMPLE_BYTES {
        return Err(PacketError::BadLength { declared, samples });
    }
    let crc_at = HEADER_BYTES + usize::from(declared);
    let frame_len = crc_at + CRC_BYTES;
    if frame.len() < frame_len {
        return Err(PacketError::Truncated {
            needed: frame_len,
            got: frame.len(),
        });
    }
    let expected = crc16_arc(&frame[..crc_at]);
    let actual = u16_le(frame, crc_at);
    if expected != actual {
        return Err(PacketError::BadCrc { expected, actual });
    }
    Ok(frame_len)
}

/// Reads a little-endian u16 at `at`; callers have checked the bounds.
pub(crate) fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report
mod tests {
    use super::*;

    /// A two-sample packet written out byte by byte, so any endianness slip shows up.
    #[rustfmt::skip]
    const KNOWN: [u8; 60] = [
        0x7C, 0x1E, 0x36, 0x00,                         // header, type, L = 54 = 14 + 2*20
        0x04, 0x03, 0x02, 0x01,                         // base_sample_number 0x01020304
        0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, // timestamp_us 0x0011223344556677
        0x02, 0x00,                                     // n = 2
        // sample 0
        0x01, 0x02, 0xFF, 0xFE, 0x03, 0xE8,             // acc BE: 258, -2, 1000
        0x12, 0x34, 0x80, 0x00, 0x7F, 0xFF,             // gyro BE: 0x1234, i16::MIN, i16::MAX
        0x02, 0x01, 0xFE, 0xFF, 0xAF, 0x06,             // mag LE: 258, -2, 1711
        0x0A, 0x0B,                                     // temp BE: 2571
        // sample 1
        0x08, 0x01, 0x00, 0x00, 0x00, 0x00,             // acc BE: 2049, 0, 0
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,             // gyro
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00,             // mag LE: 2049, 0, 0
        0x00, 0x19,                                     // temp BE: 25
        0x7E, 0x28,                                     // CRC-16/ARC 0x287E, LE
    ];

    fn known_samples() -> [RawSample; 2] {
        [
            RawSample {
                acc: [258, -2, 1000],
                gyro: [0x1234, i16::MIN, i16::MAX],
                mag: [258, -2, 1711],
                temp: 2571,
            },
            RawSample {
                acc: [2049, 0, 0],
                gyro: [0; 3],
                mag: [2049, 0, 0],
                temp: 25,
            },
        ]
    }

    #[test]
    fn hand_built_packet_decodes_to_the_expected_fields() {
        let p = PacketView::parse(&KNOWN).unwrap();
        assert_eq!(p.base_sample_number(), 0x0102_0304);
        assert_eq!(p.timestamp_us(), 0x0011_2233_4455_6677);
        assert_eq!(p.len(), 2);
        assert!(!p.is_empty());
        assert_eq!(p.frame_len(), 60);
        assert_eq!(p.as_bytes(), &KNOWN[..]);
        assert_eq!(p.sample(0), known_samples()[0]);
        assert_eq!(p.sample(1), known_samples()[1]);
        assert_eq!(p.samples().collect::<Vec<_>>(), known_samples());
        assert_eq!(p.samples().len(), 2);
        assert_eq!(p.samples().next_back(), Some(known_samples()[1]));
    }

    #[test]
    fn encoder_reproduces_the_hand_built_packet_byte_for_byte() {
        let mut out = vec![0xAA]; // encode appends, never overwrites
        encode_packet(
            0x0102_0304,
            0x0011_2233_4455_6677,
            &known_samples(),
            &mut out,
        );
        assert_eq!(out[0], 0xAA);
        assert_eq!(&out[1..], &KNOWN[..]);
    }

    #[test]
    fn trailing_bytes_after_the_frame_are_not_part_of_the_packet() {
        let mut buf = KNOWN.to_vec();
        buf.extend_from_slice(&[0x7C, 0x1E, 0x00]);
        let p = PacketView::parse(&buf).unwrap();
        assert_eq!(p.frame_len(), KNOWN.len());
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn empty_packet_is_valid() {
        let mut out = Vec::new();
        encode_packet(7, 9, &[], &mut out);
        assert_eq!(out.len(), MIN_FRAME_BYTES);
        let p = PacketView::parse(&out).unwrap();
        assert!(p.is_empty());
        assert_eq!(p.samples().next(), None);
        assert_eq!((p.base_sample_number(), p.timestamp_us()), (7, 9));
    }

    #[test]
    fn parse_reports_each_kind_of_damage() {
        assert_eq!(
            PacketView::parse(&[]),
            Err(PacketError::Truncated { needed: 20, got: 0 })
        );
        assert_eq!(
            PacketView::parse(&[0x7D, 0x1E]),
            Err(PacketError::BadHeader)
        );
        assert_eq!(
            PacketView::parse(&[0x7C, 0x1F, 0, 0]),
            Err(PacketError::UnknownType(0x1F))
        );
        assert_eq!(
            PacketView::parse(&KNOWN[..10]),
            Err(PacketError::Truncated {
                needed: 60,
                got: 10
            })
        );
        assert_eq!(
            PacketView::parse(&KNOWN[..59]),
            Err(PacketError::Truncated {
                needed: 60,
                got: 59
            })
        );

        let mut bad_len = KNOWN;
        bad_len[16] = 3; // n = 3 but L still says 2 samples
        assert_eq!(
            PacketView::parse(&bad_len),
            Err(PacketError::BadLength {
                declared: 54,
                samples: 3
            })
        );

        let mut bad_crc = KNOWN;
        bad_crc[30] ^= 0x01;
        assert!(matches!(
            PacketView::parse(&bad_crc),
            Err(PacketError::BadCrc { actual: 0x287E, .. })
        ));

        let mut bad_crc_field = KNOWN;
        bad_crc_field[59] = 0x29;
        assert_eq!(
            PacketView::parse(&bad_crc_field),
            Err(PacketError::BadCrc {
                expected: 0x287E,
                actual: 0x297E
            })
        );
    }

    #[test]
    #[should_panic(expected = "index out of bounds")]
    fn sample_past_the_end_panics() {
        let _ = PacketView::parse(&KNOWN).unwrap().sample(2);
    }

    #[test]
    fn encoder_refuses_more_samples_than_a_u16_length_can_describe() {
        let max = vec![RawSample::default(); usize::from(MAX_SAMPLES_PER_PACKET)];
        let mut out = Vec::new();
        try_encode_packet(0, 0, &max, &mut out).unwrap();
        assert_eq!(u16_le(&out, 2), 14 + 20 * 3276);
        assert_eq!(PacketView::parse(&out).unwrap().len(), 3276);

        let too_many = vec![RawSample::default(); usize::from(MAX_SAMPLES_PER_PACKET) + 1];
        let mut out = Vec::new();
        assert_eq!(
            try_encode_packet(0, 0, &too_many, &mut out),
            Err(PacketError::TooManySamples)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn physical_units_use_the_sensor_scales() {
        let p = RawSample {
            acc: [1000, -1000, 0],
            gyro: [100, 0, -1],
            mag: [1711, -1711, 0],
            temp: -40,
        }
        .to_physical();
        assert!((p.acc[0] - 0.488).abs() < 1e-6 && (p.acc[1] + 0.488).abs() < 1e-6);
        assert!((p.gyro[0] - 14.0).abs() < 1e-5 && (p.gyro[2] + 0.14).abs() < 1e-6);
        assert!((p.mag[0] - 1.0).abs() < 1e-6 && (p.mag[1] + 1.0).abs() < 1e-6);
        assert_eq!(p.temp_raw, -40);
    }

    #[test]
    fn from_physical_rounds_saturates_and_maps_nan_to_zero() {
        let p = PhysSample {
            acc: [0.488 * 1.4 / 1000.0, 1.0e6, -1.0e6],
            gyro: [f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            mag: [2.6 / 1711.0, -2.6 / 1711.0, 0.0],
            temp_raw: 7,
        };
        let r = RawSample::from_physical(&p);
        assert_eq!(r.acc, [1, i16::MAX, i16::MIN]);
        assert_eq!(r.gyro, [0, i16::MAX, i16::MIN]);
        assert_eq!(r.mag, [3, -3, 0]);
        assert_eq!(r.temp, 7);
    }

    #[test]
    fn sample_bytes_roundtrip_keeps_mixed_endianness() {
        for s in known_samples() {
            assert_eq!(RawSample::from_bytes(&s.to_bytes()), s);
        }
        assert_eq!(known_samples()[0].to_bytes(), KNOWN[18..38]);
    }
}
