//! Input no device should send, and the pipeline's answer to it: absurd event times are
//! quarantined, confused sample indices cost only their own packets, state stays bounded, and
//! nothing arbitrary makes a stage panic.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report

mod common;

use std::collections::BTreeMap;

use common::{NOW, P, SEC, T0, binary, encoded, model, motion};
use proptest::prelude::*;
use sensorflow_pipeline::{
    Outputs, Pipeline, PipelineConfig, PipelineSnapshot, QuarantineReason, SessionEndReason,
    SessionEvent,
};
use sensorflow_protocol::framing::BadReason;
use sensorflow_protocol::record::{IngestRecord, PayloadFormat};

fn pipeline(config: PipelineConfig) -> Pipeline {
    Pipeline::new(config, model()).unwrap()
}

/// A packet of `n` samples from index `base`, the first at device time `timestamp_us`.
fn packet(base: u32, timestamp_us: u64, n: usize) -> Vec<u8> {
    encoded(base, timestamp_us, &motion(n, 1, 0.2))
}

fn rec(sensor: &str, payload: Vec<u8>, ingest_us: i64) -> IngestRecord {
    binary(sensor, payload, ingest_us)
}

fn json(sensor: &str, timestamp_us: u64, ingest_us: i64) -> IngestRecord {
    let body = format!(
        r#"{{"timestamp_us":{timestamp_us},"base_sample_number":0,"samples":[{{"acc":{{"x":0,"y":0,"z":1}},"gyro":{{"x":0,"y":0,"z":0}},"mag":{{"x":0,"y":0,"z":0}},"temp_raw":0}}]}}"#
    );
    IngestRecord {
        sensor_id: sensor.into(),
        format: PayloadFormat::Json,
        ingest_us,
        payload: body.into_bytes().into(),
    }
}

fn process(p: &mut Pipeline, records: &[IngestRecord], now: i64) -> Outputs {
    let mut out = Outputs::default();
    p.process(records.iter().map(IngestRecord::as_ref), now, &mut out);
    out
}

/// Sample indices emitted per sensor, in order.
fn indices(out: &Outputs) -> BTreeMap<String, Vec<u32>> {
    let mut m: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for c in &out.samples {
        m.entry(c.sensor_id.to_string())
            .or_default()
            .extend(&c.sample_index);
    }
    m
}

#[test]
fn timestamps_at_the_end_of_time_are_quarantined_and_the_sensor_goes_on() {
    let mut p = pipeline(PipelineConfig::default());
    let records = [
        json("x", u64::MAX, NOW),
        rec("x", packet(0, 9_000_000_000_000_000_000, 64), NOW),
        rec("x", packet(0, T0, 64), NOW),
    ];
    let out = process(&mut p, &records, NOW);
    assert_eq!(out.quarantine.len(), 65, "one row per quarantined sample");
    assert!(
        out.quarantine
            .iter()
            .all(|q| q.reason == QuarantineReason::TimestampOutOfRange && &*q.sensor_id == "x")
    );
    assert_eq!(
        out.quarantine[0].timestamp_us,
        Some(u64::MAX),
        "the raw device time is kept"
    );
    assert_eq!(
        out.quarantine[1].timestamp_us,
        Some(9_000_000_000_000_000_000)
    );
    assert_eq!(
        out.quarantine[2].timestamp_us,
        Some(9_000_000_000_000_000_000 + P)
    );
    assert_eq!(
        indices(&out)["x"],
        (0..64).collect::<Vec<_>>(),
        "the genuine packet is processed, not a duplicate"
    );
    assert!(
        out.samples
            .iter()
            .flat_map(|c| &c.timestamp_us)
            .all(|&t| t == T0 as i64 || (t - T0 as i64) % P as i64 == 0)
    );
    let c = p.sensors().next().unwrap().counters.clone();
    assert_eq!(c.bad.get(&BadReason::TimestampOutOfRange), Some(&2));
    assert_eq!(c.quarantined_samples, 65);
    assert_eq!(p.stats().samples_quarantined, 65);
    // Every output table's times are plausible, so the lake can name their dates.
    assert!(
        out.windows
            .iter()
            .all(|w| (w.window_start_us - NOW).abs() < 86_400 * SEC)
    );
}

#[test]
fn the_plausibility_window_is_configurable_and_inclusive_of_its_bounds() {
    let config = PipelineConfig {
        event_time_max_past_secs: 10.0,
        event_time_max_future_secs: 1.0,
        ..PipelineConfig::default()
    };
    let mut p = pipeline(config);
    let now = NOW;
    let records = [
        rec("a", packet(0, (now - 10 * SEC) as u64, 1), now),
        rec("b", packet(0, (now - 10 * SEC - 1) as u64, 1), now),
        // The last sample of a 64-sample packet decides the future bound.
        rec("c", packet(0, (now + SEC - 63 * P as i64) as u64, 64), now),
        rec("d", packet(0, (now + SEC - 62 * P as i64) as u64, 64), now),
    ];
    let out = process(&mut p, &records, now);
    let kept = indices(&out);
    assert!(kept.contains_key("a") && kept.contains_key("c"));
    assert!(!kept.contains_key("b") && !kept.contains_key("d"));
    assert_eq!(out.quarantine.len(), 1 + 64);
}

#[test]
fn a_device_that_jumps_100_times_and_returns_keeps_every_genuine_sample() {
    let mut p = pipeline(PipelineConfig::default());
    let mut records = Vec::new();
    let mut k: u64 = 0;
    let mut genuine = |n: u64, records: &mut Vec<IngestRecord>| {
        for _ in 0..n {
            records.push(rec(
                "dev",
                packet((k * 64) as u32, T0 + k * 64 * P, 64),
                NOW,
            ));
            k += 1;
        }
    };
    genuine(10, &mut records);
    // A burst of 100 forward jumps with an honest clock (the counter is confused, not the
    // clock), then more jumps interleaved with the genuine stream.
    let mut jump = 7_919u64;
    for i in 0..100u64 {
        jump = (jump * 104_729 + 12_345) % 4_000_000_000;
        let base = (1_000_000 + jump) as u32;
        records.push(rec("dev", packet(base, T0 + (10 * 64 + i) * P, 16), NOW));
    }
    genuine(10, &mut records);
    for i in 0..30u64 {
        let base = (2_000_000_000 + i * 1_000_000) as u32;
        records.push(rec("dev", packet(base, T0 + (20 * 64 + i) * P, 16), NOW));
        genuine(1, &mut records);
    }
    let out = process(&mut p, &records, NOW + 10 * SEC);
    let got = &indices(&out)["dev"];
    let genuine_got: Vec<u32> = got.iter().copied().filter(|&i| i < 1_000_000).collect();
    assert_eq!(
        genuine_got,
        (0..(50 * 64) as u32).collect::<Vec<_>>(),
        "every genuine sample once, in order"
    );
    assert_eq!(
        got.len() - genuine_got.len(),
        130 * 16,
        "the jumping packets' samples are kept too"
    );
    let c = p.sensors().next().unwrap().counters.clone();
    assert_eq!(c.duplicates, 0);
    assert_eq!(c.index_jumps, 130);
    assert_eq!(
        c.gaps, 0,
        "no jump opened a gap the genuine stream would have to fill"
    );
    assert_eq!(
        out.session_events
            .iter()
            .filter(|e| matches!(e, SessionEvent::Started { .. }))
            .count(),
        1
    );

    // Redeliveries of the recent jumping packets (the last MAX_JUMPS are remembered) and of
    // the genuine stream are recognised.
    let again = process(&mut p, &records[120..], NOW + 11 * SEC);
    assert!(again.samples.is_empty());
    assert_eq!(
        p.sensors().next().unwrap().counters.duplicates,
        30 * 16 + 30 * 64
    );
}

#[test]
fn a_stream_that_really_moves_after_a_jump_reports_the_gap_once_it_continues() {
    let mut p = pipeline(PipelineConfig::default());
    // The device lost its counter (not its clock) and carries on from 1,000,000.
    let records = [
        rec("d", packet(0, T0, 64), NOW),
        rec("d", packet(1_000_000, T0 + 64 * P, 64), NOW),
        rec("d", packet(1_000_064, T0 + 128 * P, 64), NOW),
    ];
    let out = process(&mut p, &records, NOW);
    assert_eq!(indices(&out)["d"].len(), 192);
    assert_eq!(out.gaps.len(), 1);
    assert_eq!(
        (out.gaps[0].from_index, out.gaps[0].to_index),
        (64, 1_000_000)
    );
    // Later packets continue from there; the one before the jump is a redelivery.
    let later = process(
        &mut p,
        &[
            rec("d", packet(1_000_128, T0 + 192 * P, 64), NOW),
            rec("d", packet(0, T0, 64), NOW),
        ],
        NOW,
    );
    assert_eq!(
        indices(&later)["d"],
        (1_000_128..1_000_192).collect::<Vec<_>>()
    );
}

#[test]
fn new_sensors_beyond_max_sensors_evict_the_least_recently_heard_from() {
    let config = PipelineConfig {
        max_sensors: 32,
        ..PipelineConfig::default()
    };
    let mut p = pipeline(config);
    let mut ended = Vec::new();
    for i in 0..200i64 {
        let out = process(
            &mut p,
            &[rec(&format!("s{i}"), packet(0, T0 + i as u64, 4), NOW + i)],
            NOW + i,
        );
        ended.extend(out.session_events.into_iter().filter_map(|e| match e {
            SessionEvent::Ended { session, reason } => {
                Some((session.sensor_id.to_string(), reason))
            }
            SessionEvent::Started { .. } => None,
        }));
        assert!(p.sensors().count() <= 32);
    }
    assert!(
        p.sensors().any(|s| &**s.sensor_id == "s199"),
        "the newest sensor is kept"
    );
    assert!(
        !p.sensors().any(|s| &**s.sensor_id == "s0"),
        "the oldest was evicted"
    );
    assert!(ended.iter().all(|(_, r)| *r == SessionEndReason::Evicted));
    assert_eq!(ended.len() as u64, p.stats().sensors_evicted);
    assert_eq!(p.stats().sensors_evicted, 200 - p.sensors().count() as u64);
    // The snapshot holds only what is kept.
    assert_eq!(p.snapshot().sensors.len(), p.sensors().count());
}

#[test]
fn idle_sensors_are_dropped_after_the_eviction_time_once_their_session_ended() {
    let config = PipelineConfig {
        session_gap_secs: 10.0,
        sensor_idle_evict_secs: 20.0,
        ..PipelineConfig::default()
    };
    let mut p = pipeline(config);
    process(
        &mut p,
        &[
            rec("quiet", packet(0, T0, 64), NOW),
            rec("busy", packet(0, T0, 64), NOW),
        ],
        NOW,
    );
    let mut out = Outputs::default();
    p.on_tick(NOW + 11 * SEC, &mut out);
    assert_eq!(p.sensors().count(), 2, "sessions ended on idle, state kept");
    process(
        &mut p,
        &[rec("busy", packet(64, T0 + 64 * P, 64), NOW + 19 * SEC)],
        NOW + 19 * SEC,
    );
    p.on_tick(NOW + 21 * SEC, &mut out);
    let left: Vec<String> = p.sensors().map(|s| s.sensor_id.to_string()).collect();
    assert_eq!(left, ["busy"]);
    assert_eq!(p.stats().sensors_evicted, 1);
    // A sensor that comes back starts afresh.
    let back = process(
        &mut p,
        &[rec("quiet", packet(64, T0 + 64 * P, 64), NOW + 30 * SEC)],
        NOW + 30 * SEC,
    );
    assert_eq!(indices(&back)["quiet"].len(), 64);
}

#[test]
fn the_eviction_settings_are_validated() {
    let c = PipelineConfig {
        sensor_idle_evict_secs: 60.0,
        max_sensors: 0,
        ..PipelineConfig::default()
    };
    let keys: Vec<_> = c.validate().into_iter().map(|e| e.key).collect();
    assert_eq!(keys, ["sensor_idle_evict_secs", "max_sensors"]);
}

/// One arbitrary record: binary or JSON, any index, any device time, any receive time.
fn arb_record() -> impl Strategy<Value = IngestRecord> {
    (
        0u8..4,
        any::<u32>(),
        any::<u64>(),
        0usize..80,
        prop_oneof![Just(NOW), any::<i64>()],
        any::<bool>(),
    )
        .prop_map(|(sensor, base, ts, n, ingest_us, binary)| {
            let ts = if ts % 3 == 0 {
                T0 + ts % (1_000 * SEC as u64)
            } else {
                ts
            };
            let sensor = format!("s{sensor}");
            if binary {
                rec(&sensor, packet(base, ts, n), ingest_us)
            } else {
                json(&sensor, ts, ingest_us)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the timestamps and sample indices, every stage runs without panicking, every
    /// decoded sample is accounted for (emitted, quarantined or a counted duplicate), and the
    /// state survives a snapshot round trip.
    #[test]
    fn arbitrary_timestamps_and_indices_never_fail_a_stage(
        records in proptest::collection::vec(arb_record(), 1..40),
        now in prop_oneof![Just(NOW), any::<i64>()],
    ) {
        let config = PipelineConfig { max_sensors: 3, ..PipelineConfig::default() };
        let mut p = pipeline(config.clone());
        let mut out = process(&mut p, &records, now);
        p.on_tick(now.saturating_add(3_600 * SEC), &mut out);
        let snapshot = PipelineSnapshot::decode(&p.snapshot().encode()).unwrap();
        let mut restored = Pipeline::restore(config, model(), snapshot).unwrap();
        let again = process(&mut restored, &records, now);
        restored.close_all(now, &mut out);
        let emitted: usize = out.samples.iter().chain(&again.samples).map(|c| c.len()).sum();
        prop_assert!(emitted <= records.len() * 2 * 80);
        for c in out.samples.iter().chain(&again.samples) {
            prop_assert!(c.timestamp_us.iter().all(|&t| t >= 0));
        }
    }
}
