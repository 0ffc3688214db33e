//! The ingest record: what ingest appends to the log for every accepted message and what the
//! pipeline reads back.
//!
//! ```text
//! offset  size  field
//! 0       1     version, = 1
//! 1       1     payload format (0 = binary IMU frames, 1 = JSON)
//! 2       8     ingest_us, i64 LE (platform receive time, µs since the Unix epoch)
//! 10      2     sensor_id length K, u16 LE
//! 12      K     sensor_id, UTF-8
//! 12+K    ..    payload, the rest of the record
//! ```
//!
//! The payload has no length field: a record is always stored as one log entry, whose length
//! the log keeps. The version byte comes first so a future layout can be recognised before
//! anything else is read.

use bytes::Bytes;

/// The only record layout this version writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// Size of the fixed part: version, format, ingest_us, sensor_id length.
pub const RECORD_HEADER_BYTES: usize = 12;
/// Longest sensor id a record can carry (its length is a u16).
pub const MAX_SENSOR_ID_BYTES: usize = u16::MAX as usize;

/// How the payload of a record is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadFormat {
    /// Binary IMU packets (see [`crate::imu`]), possibly several and possibly with garbage,
    /// exactly as received.
    Binary = 0,
    /// One JSON packet (see [`crate::json`]).
    Json = 1,
}

impl PayloadFormat {
    /// Lower-case name for logs and metrics: `"binary"` or `"json"`.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            PayloadFormat::Binary => "binary",
            PayloadFormat::Json => "json",
        }
    }
}

impl TryFrom<u8> for PayloadFormat {
    type Error = RecordError;

    fn try_from(b: u8) -> Result<Self, RecordError> {
        match b {
            0 => Ok(PayloadFormat::Binary),
            1 => Ok(PayloadFormat::Json),
            other => Err(RecordError::UnknownFormat(other)),
        }
    }
}

/// Why bytes are not a valid ingest record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header and sensor id need.
    #[error("truncated ingest record: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed (at least).
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// A layout version this build does not know.
    #[error("unsupported ingest record version {0} (expected 1)")]
    UnsupportedVersion(u8),
    /// A payload format byte that is neither 0 nor 1.
    #[error("unknown payload format {0}")]
    UnknownFormat(u8),
    /// The sensor id is not UTF-8; `valid_up_to` is the length of its valid prefix.
    #[error("sensor id is not valid UTF-8 (valid up to byte {valid_up_to})")]
    InvalidSensorId {
        /// Bytes of the sensor id that are valid UTF-8.
        valid_up_to: usize,
    },
    /// The sensor id is longer than [`MAX_SENSOR_ID_BYTES`] and cannot be encoded.
    #[error("sensor id of {len} bytes is longer than 65535")]
    SensorIdTooLong {
        /// Its length in bytes.
        len: usize,
    },
}

/// An owned ingest record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestRecord {
    /// The sensor the message came from (taken from the MQTT topic).
    pub sensor_id: String,
    /// How `payload` is encoded.
    pub format: PayloadFormat,
    /// When the platform received the message, µs since the Unix epoch.
    pub ingest_us: i64,
    /// The message payload as received.
    pub payload: Bytes,
}

/// A record borrowed from the bytes it was decoded from (zero-copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestRecordRef<'a> {
    /// The sensor the message came from.
    pub sensor_id: &'a str,
    /// How `payload` is encoded.
    pub format: PayloadFormat,
    /// When the platform received the message, µs since the Unix epoch.
    pub ingest_us: i64,
    /// The message payload as received.
    pub payload: &'a [u8],
}

impl IngestRecord {
    /// Size of the encoded record in bytes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        self.as_ref().encoded_len()
    }

    /// Appends the encoded record to `out`.
    ///
    /// # Panics
    ///
    /// If the sensor id is longer than [`MAX_SENSOR_ID_BYTES`] (an MQTT topic cannot carry one
    /// that long); [`try_encode`](Self::try_encode) returns an error instead.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.as_ref().encode(out);
    }

    /// Appends the encoded record to `out`, or returns [`RecordError::SensorIdTooLong`] and
    /// leaves `out` untouched.
    pub fn try_encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.as_ref().try_encode(out)
    }

    /// Borrows the record.
    // An inherent method rather than `AsRef`: it returns a borrowed view, not a `&T`.
    #[must_use]
    pub fn as_ref(&self) -> IngestRecordRef<'_> {
        IngestRecordRef {
            sensor_id: &self.sensor_id,
            format: self.format,
            ingest_us: self.ingest_us,
            payload: &self.payload,
        }
    }

    /// Decodes a record held in a [`Bytes`] buffer; the payload shares the buffer instead of
    /// being copied.
    pub fn decode_bytes(buf: &Bytes) -> Result<IngestRecord, RecordError> {
        let r = IngestRecordRef::decode(buf)?;
        Ok(IngestRecord {
            sensor_id: r.sensor_id.to_owned(),
            format: r.format,
            ingest_us: r.ingest_us,
            payload: buf.slice_ref(r.payload),
        })
    }
}

impl<'a> IngestRecordRef<'a> {
    /// Decodes one record; everything after the sensor id is the payload.
    pub fn decode(bytes: &'a [u8]) -> Result<IngestRecordRef<'a>, RecordError> {
        let Some(&version) = bytes.first() else {
            return Err(RecordError::Truncated {
                needed: RECORD_HEADER_BYTES,
                got: 0,
            });
        };
        if version != RECORD_VERSION {
            return Err(RecordError::UnsupportedVersion(version));
        }
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(RecordError::Truncated {
                needed: RECORD_HEADER_BYTES,
                got: bytes.len(),
            });
        }
        let format = PayloadFormat::try_from(bytes[1])?;
        let mut ingest = [0u8; 8];
        ingest.copy_from_slice(&bytes[2..10]);
        let ingest_us = i64::from_le_bytes(ingest);
        let id_end = RECORD_HEADER_BYTES + usize::from(u16::from_le_bytes([bytes[10], bytes[11]]));
        let Some(id) = bytes.get(RECORD_HEADER_BYTES..id_end) else {
            return Err(RecordError::Truncated {
                needed: id_end,
                got: bytes.len(),
            });
        };
        let sensor_id = std::str::from_utf8(id).map_err(|e| RecordError::InvalidSensorId {
            valid_up_to: e.valid_up_to(),
        })?;
        Ok(IngestRecordRef {
            sensor_id,
            format,
            ingest_us,
            payload: &bytes[id_end..],
        })
    }

    /// Copies the record into an owned [`IngestRecord`].
    #[must_use]
    pub fn to_owned(&self) -> IngestRecord {
        IngestRecord {
            sensor_id: self.sensor_id.to_owned(),
            format: self.format,
            ingest_us: self.ingest_us,
            payload: Bytes::copy_from_slice(self.payload),
        }
    }

    /// Size of the encoded record in bytes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.sensor_id.len() + self.payload.len()
    }

    /// Appends the encoded record to `out`.
    ///
    /// # Panics
    ///
    /// If the sensor id is longer than [`MAX_SENSOR_ID_BYTES`]; see [`try_encode`](Self::try_encode).
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.try_encode(out) {
            panic!("IngestRecord::encode: {e}");
        }
    }

    /// Appends the encoded record to `out`, or returns [`RecordError::SensorIdTooLong`] and
    /// leaves `out` untouched.
    pub fn try_encode(&self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let id_len =
            u16::try_from(self.sensor_id.len()).map_err(|_| RecordError::SensorIdTooLong {
                len: self.sensor_id.len(),
            })?;
        out.reserve(self.encoded_len());
        out.push(RECORD_VERSION);
        out.push(self.format as u8);
        out.extend_from_slice(&self.ingest_us.to_le_bytes());
        out.extend_from_slice(&id_len.to_le_bytes());
        out.extend_from_slice(self.sensor_id.as_bytes());
        out.extend_from_slice(self.payload);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report
mod tests {
    use super::*;

    #[rustfmt::skip]
    const KNOWN: [u8; 19] = [
        1,                                              // version
        1,                                              // format: JSON
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x81, // ingest_us 0x8102030405060708 as i64
        3, 0,                                           // sensor_id length
        b'i', b'm', b'u',                               // sensor_id
        b'{', b'x', b'}', b'\n',                        // payload
    ];

    fn known() -> IngestRecord {
        IngestRecord {
            sensor_id: "imu".into(),
            format: PayloadFormat::Json,
            ingest_us: i64::from_le_bytes([0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x81]),
            payload: Bytes::from_static(b"{x}\n"),
        }
    }

    #[test]
    fn hand_built_record_decodes_to_the_expected_fields() {
        let r = IngestRecordRef::decode(&KNOWN).unwrap();
        assert_eq!(r.sensor_id, "imu");
        assert_eq!(r.format, PayloadFormat::Json);
        assert_eq!(r.ingest_us, -0x7EFD_FCFB_FAF9_F8F8);
        assert_eq!(r.payload, b"{x}\n");
        assert_eq!(r.to_owned(), known());
    }

    #[test]
    fn encoder_reproduces_the_hand_built_record() {
        let mut out = vec![0xEE];
        known().encode(&mut out);
        assert_eq!(&out[1..], &KNOWN[..]);
        assert_eq!(known().encoded_len(), KNOWN.len());
    }

    #[test]
    fn decode_from_bytes_shares_the_buffer() {
        let buf = Bytes::copy_from_slice(&KNOWN);
        let r = IngestRecord::decode_bytes(&buf).unwrap();
        assert_eq!(r, known());
        assert_eq!(r.payload.as_ptr(), buf[15..].as_ptr());
    }

    #[test]
    fn empty_payload_and_empty_sensor_id_roundtrip() {
        let r = IngestRecord {
            sensor_id: String::new(),
            format: PayloadFormat::Binary,
            ingest_us: 0,
            payload: Bytes::new(),
        };
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out.len(), RECORD_HEADER_BYTES);
        assert_eq!(IngestRecordRef::decode(&out).unwrap().to_owned(), r);
    }

    #[test]
    fn decode_reports_each_kind_of_damage() {
        assert_eq!(
            IngestRecordRef::decode(&[]),
            Err(RecordError::Truncated { needed: 12, got: 0 })
        );
        assert_eq!(
            IngestRecordRef::decode(&[2; 20]),
            Err(RecordError::UnsupportedVersion(2))
        );
        assert_eq!(
            IngestRecordRef::decode(&KNOWN[..11]),
            Err(RecordError::Truncated {
                needed: 12,
                got: 11
            })
        );
        assert_eq!(
            IngestRecordRef::decode(&KNOWN[..14]),
            Err(RecordError::Truncated {
                needed: 15,
                got: 14
            })
        );
        let mut bad_format = KNOWN;
        bad_format[1] = 7;
        assert_eq!(
            IngestRecordRef::decode(&bad_format),
            Err(RecordError::UnknownFormat(7))
        );
        let mut bad_utf8 = KNOWN;
        bad_utf8[13] = 0xFF;
        assert_eq!(
            IngestRecordRef::decode(&bad_utf8),
            Err(RecordError::InvalidSensorId { valid_up_to: 1 })
        );
    }

    #[test]
    fn overlong_sensor_id_is_refused_without_writing() {
        let r = IngestRecord {
            sensor_id: "x".repeat(MAX_SENSOR_ID_BYTES + 1),
            ..known()
        };
        let mut out = Vec::new();
        assert_eq!(
            r.try_encode(&mut out),
            Err(RecordError::SensorIdTooLong { len: 65_536 })
        );
        assert!(out.is_empty());
    }
}
