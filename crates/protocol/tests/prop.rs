//! Property tests of the codecs and the stream decoder, through the public API only.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sensorflow_protocol::framing::{DEFAULT_MAX_BUFFER_BYTES, DEFAULT_MAX_SAMPLES_PER_PACKET};
use sensorflow_protocol::imu::{ACC_G_PER_LSB, GYRO_DPS_PER_LSB, MAG_GAUSS_PER_LSB};
use sensorflow_protocol::{
    BadReason, Frame, FrameDecoder, IngestRecord, IngestRecordRef, JsonPacket, PacketView,
    PayloadFormat, PhysSample, RawSample, crc16_arc, encode_json_packet, encode_packet,
    parse_json_packet,
};

/// A packet as plain data, to compare what went in with what came out.
#[derive(Clone, Debug, PartialEq)]
struct Pkt {
    base: u32,
    ts: u64,
    samples: Vec<RawSample>,
}

impl Pkt {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_packet(self.base, self.ts, &self.samples, &mut out);
        out
    }

    fn of(view: &PacketView<'_>) -> Pkt {
        Pkt {
            base: view.base_sample_number(),
            ts: view.timestamp_us(),
            samples: view.samples().collect(),
        }
    }
}

/// A decoder event with the packet copied out of the decoder's buffer.
#[derive(Clone, Debug, PartialEq)]
enum Ev {
    P(Pkt),
    Bad(BadReason, usize),
}

fn raw_sample() -> impl Strategy<Value = RawSample> {
    (
        any::<[i16; 3]>(),
        any::<[i16; 3]>(),
        any::<[i16; 3]>(),
        any::<i16>(),
    )
        .prop_map(|(acc, gyro, mag, temp)| RawSample {
            acc,
            gyro,
            mag,
            temp,
        })
}

fn packet(max_samples: usize) -> impl Strategy<Value = Pkt> {
    (
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(raw_sample(), 0..=max_samples),
    )
        .prop_map(|(base, ts, samples)| Pkt { base, ts, samples })
}

/// Bytes rich in header and type bytes, so false headers are common.
fn noisy_bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![6 => any::<u8>(), 2 => Just(0x7C), 2 => Just(0x1E), 1 => Just(0x00)],
        0..=max_len,
    )
}

/// Chunk sizes used cyclically to cut a stream into messages.
fn chunking() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=97, 1..=16)
}

/// Pushes `stream` cut by `sizes` (cyclically), draining after every push, then finishes.
fn run(decoder: &mut FrameDecoder, stream: &[u8], sizes: &[usize]) -> Vec<Ev> {
    let mut events = Vec::new();
    let mut collect = |f: Frame<'_>| match f {
        Frame::Packet(p) => {
            // The decoder must only ever hand out frames that verify on their own.
            let bytes = p.as_bytes();
            let crc_at = bytes.len() - 2;
            assert_eq!(
                crc16_arc(&bytes[..crc_at]),
                u16::from_le_bytes([bytes[crc_at], bytes[crc_at + 1]])
            );
            assert_eq!(PacketView::parse(bytes), Ok(p));
            events.push(Ev::P(Pkt::of(&p)));
        }
        Frame::Bad { reason, bytes } => {
            assert!(bytes > 0, "empty bad event for {reason:?}");
            events.push(Ev::Bad(reason, bytes));
        }
    };
    let mut rest = stream;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        decoder.push(chunk);
        assert!(decoder.pending().len() <= decoder.max_buffer_bytes());
        while let Some(f) = decoder.next_frame() {
            collect(f);
        }
    }
    while let Some(f) = decoder.finish() {
        collect(f);
    }
    assert!(decoder.pending().is_empty(), "finish leaves nothing behind");
    events
}

fn packets(events: &[Ev]) -> Vec<Pkt> {
    events
        .iter()
        .filter_map(|e| {
            if let Ev::P(p) = e {
                Some(p.clone())
            } else {
                None
            }
        })
        .collect()
}

/// Failures are saved under `crates/protocol/proptest-regressions/` (tests run from the crate
/// directory) and committed, so a found counterexample is replayed on every run.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/prop.txt",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn encoded_packets_parse_back_to_the_same_fields(p in packet(80)) {
        let bytes = p.encode();
        let view = PacketView::parse(&bytes).unwrap();
        prop_assert_eq!(view.frame_len(), bytes.len());
        prop_assert_eq!(view.len(), p.samples.len());
        prop_assert_eq!(Pkt::of(&view), p);
    }

    #[test]
    fn arbitrary_bytes_in_arbitrary_chunks_never_panic_or_yield_unverified_packets(
        bytes in noisy_bytes(600),
        sizes in chunking(),
        small_buffer in any::<bool>(),
    ) {
        // A tiny buffer exercises the overflow path; the assertions live in `run`.
        let mut decoder = if small_buffer { FrameDecoder::new(48, 1) } else { FrameDecoder::default() };
        run(&mut decoder, &bytes, &sizes);
    }

    #[test]
    fn packets_found_do_not_depend_on_how_the_stream_is_chunked(
        bytes in noisy_bytes(600),
        embedded in prop::collection::vec(packet(4), 0..4),
        sizes in chunking(),
    ) {
        let mut stream = bytes;
        for (i, p) in embedded.iter().enumerate() {
            let at = (i * 97) % (stream.len() + 1);
            stream.splice(at..at, p.encode());
        }
        let whole = run(&mut FrameDecoder::default(), &stream, &[stream.len().max(1)]);
        let chunked = run(&mut FrameDecoder::default(), &stream, &sizes);
        prop_assert_eq!(packets(&whole), packets(&chunked));
    }

    #[test]
    fn valid_packets_between_garbage_come_out_exactly_and_in_order(
        lead in noisy_bytes(200),
        body in prop::collection::vec((packet(6), noisy_bytes(40)), 1..6),
        tail in noisy_bytes(200),
        sizes in chunking(),
    ) {
        let mut stream = lead;
        let mut expected = Vec::new();
        for (p, garbage) in &body {
            stream.extend(p.encode());
            stream.extend(garbage);
            expected.push(p.clone());
        }
        stream.extend(tail);
        let events = run(&mut FrameDecoder::default(), &stream, &sizes);
        prop_assert_eq!(packets(&events), expected);
    }

    #[test]
    fn corrupt_crc_between_two_good_packets_is_one_bad_crc_and_both_packets(
        a in packet(8),
        bad in packet(8),
        b in packet(8),
        flip in 1u16..,
        sizes in chunking(),
    ) {
        let mut broken = bad.encode();
        let crc_at = broken.len() - 2;
        let crc = u16::from_le_bytes([broken[crc_at], broken[crc_at + 1]]) ^ flip;
        broken[crc_at..].copy_from_slice(&crc.to_le_bytes());
        let stream = [a.encode(), broken.clone(), b.encode()].concat();
        let events = run(&mut FrameDecoder::default(), &stream, &sizes);
        prop_assert_eq!(events, vec![Ev::P(a), Ev::Bad(BadReason::BadCrc, broken.len()), Ev::P(b)]);
    }

    #[test]
    fn restoring_from_pending_at_any_point_loses_no_packet(
        body in prop::collection::vec(packet(6), 1..5),
        cut in any::<prop::sample::Index>(),
    ) {
        let stream: Vec<u8> = body.iter().flat_map(Pkt::encode).collect();
        let cut = cut.index(stream.len() + 1);
        let mut first = FrameDecoder::default();
        let mut events = run_partial(&mut first, &stream[..cut]);
        let mut restored = FrameDecoder::restore(first.pending(), DEFAULT_MAX_BUFFER_BYTES, DEFAULT_MAX_SAMPLES_PER_PACKET);
        events.extend(run(&mut restored, &stream[cut..], &[64]));
        prop_assert_eq!(packets(&events), body);
    }

    #[test]
    fn records_roundtrip(
        sensor_id in "\\PC{0,40}",
        json in any::<bool>(),
        ingest_us in any::<i64>(),
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let format = if json { PayloadFormat::Json } else { PayloadFormat::Binary };
        let record = IngestRecord { sensor_id, format, ingest_us, payload: Bytes::from(payload) };
        let mut out = vec![0xAB];
        record.encode(&mut out);
        prop_assert_eq!(out.len(), 1 + record.encoded_len());
        let decoded = IngestRecordRef::decode(&out[1..]).unwrap();
        prop_assert_eq!(decoded, record.as_ref());
        prop_assert_eq!(decoded.to_owned(), record.clone());
        prop_assert_eq!(IngestRecord::decode_bytes(&Bytes::copy_from_slice(&out[1..])).unwrap(), record);
    }

    #[test]
    fn record_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = IngestRecordRef::decode(&bytes);
    }

    #[test]
    fn json_packets_roundtrip_exactly(
        timestamp_us in any::<u64>(),
        base_sample_number in any::<u32>(),
        samples in prop::collection::vec(phys_sample(), 0..8),
    ) {
        let p = JsonPacket { timestamp_us, base_sample_number, samples };
        prop_assert_eq!(parse_json_packet(&encode_json_packet(&p)).unwrap(), p);
    }

    #[test]
    fn raw_to_physical_to_raw_is_lossless(s in raw_sample()) {
        prop_assert_eq!(RawSample::from_physical(&s.to_physical()), s);
    }

    #[test]
    fn physical_to_raw_to_physical_is_within_half_an_lsb(
        acc in prop::array::uniform3(-15.0f32..15.0),
        gyro in prop::array::uniform3(-4000.0f32..4000.0),
        mag in prop::array::uniform3(-19.0f32..19.0),
        temp_raw in any::<i16>(),
    ) {
        let p = PhysSample { acc, gyro, mag, temp_raw };
        let back = RawSample::from_physical(&p).to_physical();
        // Half an LSB of quantisation, plus a few f32 ulps of the value: a value sitting on a
        // rounding tie may land on either side once the scale factor itself is rounded.
        let close = |a: [f32; 3], b: [f32; 3], lsb: f32| {
            a.iter().zip(b).all(|(x, y)| (x - y).abs() <= lsb * 0.5 + x.abs() * 4.0 * f32::EPSILON)
        };
        prop_assert!(close(p.acc, back.acc, ACC_G_PER_LSB), "acc {:?} -> {:?}", p.acc, back.acc);
        prop_assert!(close(p.gyro, back.gyro, GYRO_DPS_PER_LSB), "gyro {:?} -> {:?}", p.gyro, back.gyro);
        prop_assert!(close(p.mag, back.mag, MAG_GAUSS_PER_LSB), "mag {:?} -> {:?}", p.mag, back.mag);
        prop_assert_eq!(back.temp_raw, temp_raw);
    }
}

/// Like [`run`] but without finishing: the stream continues elsewhere.
fn run_partial(decoder: &mut FrameDecoder, stream: &[u8]) -> Vec<Ev> {
    decoder.push(stream);
    let mut events = Vec::new();
    while let Some(f) = decoder.next_frame() {
        events.push(match f {
            Frame::Packet(p) => Ev::P(Pkt::of(&p)),
            Frame::Bad { reason, bytes } => Ev::Bad(reason, bytes),
        });
    }
    events
}

fn finite_f32() -> impl Strategy<Value = f32> {
    use prop::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO,
        raw_sample().prop_map(|s| s.to_physical().acc[0])
    ]
}

fn phys_sample() -> impl Strategy<Value = PhysSample> {
    (
        prop::array::uniform3(finite_f32()),
        prop::array::uniform3(finite_f32()),
        prop::array::uniform3(finite_f32()),
        any::<i16>(),
    )
        .prop_map(|(acc, gyro, mag, temp_raw)| PhysSample {
            acc,
            gyro,
            mag,
            temp_raw,
        })
}
