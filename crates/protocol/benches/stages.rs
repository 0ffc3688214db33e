//! Cost of the decode stage per sample: what the pipeline does with every log record before any
//! operator sees a sample.
//!
//! The input is live traffic's shape: one MQTT message per sensor carrying one 64-sample
//! `IMU_RAW_COMBO_V3` packet (1,300 bytes), wrapped in the ingest record the log stores.
//! Every benchmark reports elements = samples, so criterion's `thrpt` is samples/s and
//! `time / 64` is ns/sample.
//!
//! - `record_decode`: [`IngestRecordRef::decode`] of the log record (header and sensor id only;
//!   the payload is borrowed, so this is a fixed cost per record, shown per sample).
//! - `crc16_frame`: CRC-16/ARC over the frame, the part of decoding that touches every byte.
//! - `packet_view_to_physical`: [`PacketView::parse`] (checks + CRC) and conversion of every
//!   sample to physical units, without the framing buffer.
//! - `frame_decoder_to_physical`: the pipeline's path, record decode, [`FrameDecoder`] push and
//!   `next_frame` (buffer copy, header checks, CRC), then every sample to physical units.
//! - `encode_packet`: the other direction, what a device (or the simulator) does per packet:
//!   [`encode_packet`] of 64 raw samples, CRC included.
//!
//! ```text
//! cargo bench -p sensorflow-protocol --bench stages
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sensorflow_protocol::imu::PhysSample;
use sensorflow_protocol::{
    Frame, FrameDecoder, IngestRecord, IngestRecordRef, PacketView, PayloadFormat, RawSample,
    crc16_arc, encode_packet,
};

/// Samples per packet, as devices and the simulator send them.
const SAMPLES: usize = 64;
const T0_US: u64 = 1_710_028_800_000_000;

/// One 64-sample packet with varying, plausible raw values (the cost does not depend on them).
fn packet() -> Vec<u8> {
    let samples: Vec<RawSample> = (0..SAMPLES as i16).map(raw_sample).collect();
    let mut out = Vec::new();
    encode_packet(1_000, T0_US, &samples, &mut out);
    out
}

fn raw_sample(i: i16) -> RawSample {
    RawSample {
        acc: [2048 + i, -512 - i, 1024 + 3 * i],
        gyro: [100 - i, 7 * i, -40],
        mag: [300 + i, -200, 150 - i],
        temp: 2400 + i % 7,
    }
}

/// The log record ingest stores for one message holding `payload`.
fn record(payload: &[u8]) -> Vec<u8> {
    let record = IngestRecord {
        sensor_id: "imu-0042".into(),
        format: PayloadFormat::Binary,
        ingest_us: 1_710_028_800_040_000,
        payload: bytes::Bytes::copy_from_slice(payload),
    };
    let mut out = Vec::new();
    record.encode(&mut out);
    out
}

fn decode(c: &mut Criterion) {
    let frame = packet();
    let log_record = record(&frame);

    let mut group = c.benchmark_group("decode");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(SAMPLES as u64));

    group.bench_function("record_decode", |b| {
        b.iter(|| IngestRecordRef::decode(black_box(&log_record)).map(|r| r.payload.len()))
    });

    group.bench_function("crc16_frame", |b| b.iter(|| crc16_arc(black_box(&frame))));

    let mut phys: Vec<PhysSample> = Vec::with_capacity(SAMPLES);
    group.bench_function("packet_view_to_physical", |b| {
        b.iter(|| {
            let Ok(p) = PacketView::parse(black_box(&frame)) else {
                panic!("benchmark packet must parse")
            };
            phys.clear();
            phys.extend(p.samples().map(|s| s.to_physical()));
            black_box(&phys);
        })
    });

    // One decoder reused across iterations, as the pipeline keeps one per sensor: each message
    // is drained completely, so the buffer is compacted and the steady state is measured.
    let mut decoder = FrameDecoder::default();
    group.bench_function("frame_decoder_to_physical", |b| {
        b.iter(|| {
            let Ok(r) = IngestRecordRef::decode(black_box(&log_record)) else {
                panic!("benchmark record must decode")
            };
            decoder.push(r.payload);
            let mut packets = 0;
            while let Some(frame) = decoder.next_frame() {
                let Frame::Packet(p) = frame else {
                    panic!("benchmark input is clean: {frame:?}")
                };
                phys.clear();
                phys.extend(p.samples().map(|s| s.to_physical()));
                black_box(&phys);
                packets += 1;
            }
            assert_eq!(packets, 1);
        })
    });
    let samples: Vec<RawSample> = (0..SAMPLES).map(|i| raw_sample(i as i16)).collect();
    let mut out = Vec::with_capacity(frame.len());
    group.bench_function("encode_packet", |b| {
        b.iter(|| {
            out.clear();
            encode_packet(1_000, T0_US, black_box(&samples), &mut out);
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
