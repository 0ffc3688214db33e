//! Arbitrary log records through every pipeline stage (decode, dedupe, sessions, transform,
//! windows, inference, aggregates), timers and a checkpoint round trip: no input may make a
//! stage panic, and a restored pipeline must emit exactly the rows the original emits.
//!
//! The input is read as a list of records. Each starts with a mode byte: raw bytes as a binary
//! or JSON payload (the decoder's problem), or a well-formed packet whose fields (sensor, sample
//! index, device time, receive time, sample count) come from the input, so the fuzzer reaches
//! the stages behind the decoder with absurd numbers.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sensorflow_model::Model;
use sensorflow_pipeline::{Outputs, Pipeline, PipelineConfig, PipelineSnapshot};
use sensorflow_protocol::imu::{RawSample, encode_packet};
use sensorflow_protocol::record::{IngestRecord, PayloadFormat};

const NOW: i64 = 1_700_000_000_000_000;

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(Model::demo().expect("the bundled model loads"))).clone()
}

/// Reads fixed-size little-endian fields off the front of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        (self.0.len() >= n).then(|| {
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            head
        })
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
}

fn record(input: &mut Input<'_>) -> Option<IngestRecord> {
    let mode = input.u8()?;
    let sensor = format!("s{}", input.u8()? % 4);
    // Mostly "now", sometimes anything: the receive time is the platform's clock, but a replay
    // or a corrupt log must not break a stage either.
    let ingest_us = match input.u8()? % 4 {
        0 => input.u64()? as i64,
        _ => NOW + i64::from(input.u8()?) * 1_000_000,
    };
    let (format, payload) = match mode % 3 {
        0 | 1 => {
            let len = usize::from(input.u8()?);
            let bytes = input.bytes(len.min(input.0.len()))?.to_vec();
            (if mode % 3 == 0 { PayloadFormat::Binary } else { PayloadFormat::Json }, bytes)
        }
        _ => {
            let base = input.u32()?;
            let ts = match input.u8()? % 3 {
                0 => input.u64()?,
                _ => (NOW as u64).wrapping_add(input.u32()? as u64 * 1_000),
            };
            let n = usize::from(input.u8()? % 80);
            let samples: Vec<RawSample> = (0..n)
                .map(|i| RawSample { acc: [i as i16, -(i as i16), 2048], gyro: [7, i as i16, -3], mag: [1, 2, 3], temp: i as i16 })
                .collect();
            let mut bytes = Vec::new();
            encode_packet(base, ts, &samples, &mut bytes);
            (PayloadFormat::Binary, bytes)
        }
    };
    Some(IngestRecord { sensor_id: sensor.into(), format, ingest_us, payload: payload.into() })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut records = Vec::new();
    while let Some(r) = record(&mut input) {
        records.push(r);
    }
    let config = PipelineConfig { max_sensors: 3, ..PipelineConfig::default() };
    let Ok(mut p) = Pipeline::new(config.clone(), model()) else { return };
    let mut out = Outputs::default();
    let (first, second) = records.split_at(records.len() / 2);
    p.process(first.iter().map(IngestRecord::as_ref), NOW, &mut out);
    p.on_tick(NOW + 700_000_000, &mut out);

    let bytes = p.snapshot().encode();
    let snapshot = PipelineSnapshot::decode(&bytes).expect("a snapshot decodes");
    let mut restored = Pipeline::restore(config, model(), snapshot).expect("a snapshot restores");
    let (mut a, mut b) = (Outputs::default(), Outputs::default());
    p.process(second.iter().map(IngestRecord::as_ref), NOW, &mut a);
    restored.process(second.iter().map(IngestRecord::as_ref), NOW, &mut b);
    p.close_all(NOW, &mut a);
    restored.close_all(NOW, &mut b);
    // What the restored pipeline emits must be what the original emits. (Counters may differ:
    // a garbage run the decoder had not reported at the cut is not counted after a restore,
    // see `snapshot.rs`; and NaN predictions of absurd JSON readings never compare equal, so
    // the rows are compared by identity, not by value.)
    assert_eq!(rows(&a), rows(&b), "a restored pipeline emitted other rows");
    assert_eq!(a.session_events.len(), b.session_events.len());
    assert_eq!(a.gaps, b.gaps);
    assert_eq!(a.quarantine.len(), b.quarantine.len());
});

/// (sensor, session, sample index, event time) of every emitted sample, in order.
fn rows(out: &Outputs) -> Vec<(String, String, u32, i64)> {
    out.samples
        .iter()
        .flat_map(|c| {
            c.sample_index
                .iter()
                .zip(&c.timestamp_us)
                .map(|(&i, &t)| (c.sensor_id.to_string(), c.session_id.to_string(), i, t))
        })
        .collect()
}
