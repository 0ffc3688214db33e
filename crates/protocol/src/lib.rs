//! Wire formats of sensorflow: what devices send and what ingest stores in the log.
//!
//! This crate is pure code: no I/O, no threads, no clocks. Everything here decodes bytes that
//! came from outside, so no input makes it panic; errors are small `Copy` enums where they sit
//! on the hot path.
//!
//! # Layout
//!
//! - [`crc16`]: CRC-16/ARC, the checksum of binary packets.
//! - [`imu`]: the binary IMU packet type `0x1E` (`IMU_RAW_COMBO_V3`): constants, zero-copy
//!   [`PacketView`], [`encode_packet`], raw samples and their conversion to physical units.
//! - [`framing`]: [`FrameDecoder`], the per-sensor stream decoder that reassembles packets split
//!   across messages, skips garbage and resynchronises on the next verified header, emitting
//!   [`Frame::Bad`] events labelled with a [`BadReason`] for the counters.
//! - [`json`]: the JSON packet of `sensors/{sensor_id}/data` ([`JsonPacket`]).
//! - [`record`]: the [`IngestRecord`] ingest appends to the log and the pipeline reads back.
//!
//! Data flows `bytes -> FrameDecoder -> PacketView -> RawSample -> PhysSample` for binary
//! input and `bytes -> parse_json_packet -> PhysSample` for JSON; both travel through the log
//! inside an `IngestRecord`.

pub mod crc16;
pub mod framing;
pub mod imu;
pub mod json;
pub mod record;

pub use crc16::crc16_arc;
pub use framing::{BadReason, Frame, FrameDecoder};
pub use imu::{PacketError, PacketView, PhysSample, RawSample, encode_packet, try_encode_packet};
pub use json::{JsonPacket, JsonPacketError, encode_json_packet, parse_json_packet};
pub use record::{IngestRecord, IngestRecordRef, PayloadFormat, RecordError};
