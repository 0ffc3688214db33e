//! The pipeline as a whole, with the bundled demo model and packets from the real encoder.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report

mod common;

use common::{NOW, P, T0, binary, encoded, model, motion};
use sensorflow_pipeline::{Outputs, Pipeline, PipelineConfig, SessionEndReason, SessionEvent};
use sensorflow_protocol::framing::BadReason;
use sensorflow_protocol::imu::RawSample;
use sensorflow_protocol::record::{IngestRecord, PayloadFormat};

fn pipeline() -> Pipeline {
    Pipeline::new(PipelineConfig::default(), model()).unwrap()
}

/// `n` samples with motion whose strength depends on `seed`.
fn samples(n: usize, seed: u32) -> Vec<RawSample> {
    motion(n, seed, 0.0)
}

/// A 64-sample packet with indices from `base`, starting `k` packet durations after `T0`.
fn packet(base: u32, k: u64, seed: u32) -> Vec<u8> {
    encoded(base, T0 + k * 64 * P, &samples(64, seed))
}

fn rec(sensor: &str, payload: Vec<u8>) -> IngestRecord {
    binary(sensor, payload, NOW)
}

fn run(p: &mut Pipeline, records: &[IngestRecord]) -> Outputs {
    let mut out = Outputs::default();
    p.process(records.iter().map(IngestRecord::as_ref), NOW, &mut out);
    out
}

fn sample_count(out: &Outputs, sensor: &str) -> usize {
    out.samples
        .iter()
        .filter(|c| &*c.sensor_id == sensor)
        .map(|c| c.len())
        .sum()
}

#[test]
fn split_packet_duplicate_and_garbage_yield_each_sample_once() {
    let mut p = pipeline();
    let p0 = packet(0, 0, 1);
    let p1 = packet(64, 1, 1);
    let mut garbage = b"\x01\x02\x7cjunk".to_vec();
    garbage.extend(packet(128, 2, 1));
    let out = run(
        &mut p,
        &[
            rec("a", p0[..10].to_vec()),
            rec("a", p0[10..].to_vec()),
            rec("a", p1.clone()),
            rec("a", p1),
            rec("a", garbage),
        ],
    );
    assert_eq!(sample_count(&out, "a"), 192);
    let indices: Vec<u32> = out
        .samples
        .iter()
        .flat_map(|c| c.sample_index.iter().copied())
        .collect();
    assert_eq!(indices, (0..192).collect::<Vec<_>>());
    let view = p.sensors().next().unwrap();
    assert_eq!(view.counters.duplicates, 64);
    assert!(
        view.counters
            .bad
            .get(&BadReason::Garbage)
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

#[test]
fn a_packet_that_arrives_after_a_later_one_is_kept_once() {
    let mut p = pipeline();
    let p1 = packet(64, 1, 3);
    let mut out = run(
        &mut p,
        &[rec("a", packet(0, 0, 3)), rec("a", packet(128, 2, 3))],
    );
    assert_eq!(
        (out.gaps.len(), out.gaps[0].from_index, out.gaps[0].to_index),
        (1, 64, 128)
    );
    // Packet 1 comes last (a backlog upload, a resend after a reconnect), then once more.
    for more in [
        run(&mut p, &[rec("a", p1.clone())]),
        run(&mut p, &[rec("a", p1)]),
    ] {
        out.samples.extend(more.samples);
        out.session_events.extend(more.session_events);
        out.gaps.extend(more.gaps);
    }
    let mut indices: Vec<u32> = out
        .samples
        .iter()
        .flat_map(|c| c.sample_index.iter().copied())
        .collect();
    assert_eq!(indices.len(), 192, "every sample once");
    indices.sort_unstable();
    assert_eq!(indices, (0..192).collect::<Vec<_>>());
    assert!(
        out.samples
            .iter()
            .all(|c| c.velocity_pred.iter().all(|v| v.is_finite())),
        "late samples are inferred too"
    );
    assert_eq!(
        out.gaps.len(),
        1,
        "the gap is reported once, when it was detected"
    );
    assert_eq!(out.session_events.len(), 1, "one session");
    let c = p.sensors().next().unwrap().counters.clone();
    assert_eq!(
        (c.reordered_samples, c.duplicates, c.missing_samples),
        (64, 64, 64)
    );
}

#[test]
fn corrupt_crc_is_counted_and_leaves_a_gap() {
    let mut p = pipeline();
    let mut bad = packet(64, 1, 2);
    bad[30] ^= 0x55;
    let out = run(
        &mut p,
        &[
            rec("a", packet(0, 0, 2)),
            rec("a", bad),
            rec("a", packet(128, 2, 2)),
        ],
    );
    assert_eq!(sample_count(&out, "a"), 128);
    assert_eq!(out.gaps.len(), 1);
    assert_eq!(
        (
            out.gaps[0].from_index,
            out.gaps[0].to_index,
            out.gaps[0].missing
        ),
        (64, 128, 64)
    );
    let c = p.sensors().next().unwrap().counters.clone();
    assert_eq!(c.bad.get(&BadReason::BadCrc), Some(&1));
}

#[test]
fn samples_are_transformed_to_physical_units_with_magnitudes() {
    let mut p = pipeline();
    let out = run(&mut p, &[rec("a", packet(0, 0, 1))]);
    let c = &out.samples[0];
    let raw = samples(64, 1);
    assert_eq!(c.len(), 64);
    for (i, r) in raw.iter().enumerate() {
        let phys = r.to_physical();
        assert_eq!(c.acc_x[i], phys.acc[0]);
        assert!(
            (c.gyro_x[i] - phys.gyro[0].to_radians()).abs() < 1e-6,
            "gyro must be rad/s"
        );
        let mag = (c.acc_x[i].powi(2) + c.acc_y[i].powi(2) + c.acc_z[i].powi(2)).sqrt();
        assert!((c.accl_mag[i] - mag).abs() < 1e-6);
        assert_eq!(c.timestamp_us[i], (T0 + i as u64 * P) as i64);
        assert!(c.velocity_pred[i].is_finite() && c.movement_prob[i].is_finite());
    }
}

#[test]
fn batched_inference_across_sensors_equals_one_sensor_at_a_time() {
    let records: Vec<IngestRecord> = (0..3u64)
        .flat_map(|k| {
            ["a", "b", "c"]
                .into_iter()
                .enumerate()
                .map(move |(s, id)| rec(id, packet(64 * k as u32, k, s as u32 + 1)))
        })
        .collect();
    let mut together = pipeline();
    let batched = run(&mut together, &records);
    for id in ["a", "b", "c"] {
        let mut alone = pipeline();
        let mut single = Outputs::default();
        for r in records.iter().filter(|r| r.sensor_id == id) {
            single
                .samples
                .extend(run(&mut alone, std::slice::from_ref(r)).samples);
        }
        let v1: Vec<f32> = batched
            .samples
            .iter()
            .filter(|c| &*c.sensor_id == id)
            .flat_map(|c| c.velocity_pred.clone())
            .collect();
        let v2: Vec<f32> = single
            .samples
            .iter()
            .flat_map(|c| c.velocity_pred.clone())
            .collect();
        assert_eq!(v1.len(), 192);
        let max_diff = v1
            .iter()
            .zip(&v2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_diff <= 1e-5,
            "sensor {id}: batched and per-sensor predictions differ by {max_diff}"
        );
    }
}

#[test]
fn session_gap_ends_the_session_with_an_aggregate_over_all_its_samples() {
    let mut p = pipeline();
    let gap_packets = 600_000_000 / (64 * P) + 10;
    let out = run(
        &mut p,
        &[
            rec("a", packet(0, 0, 1)),
            rec("a", packet(64, 1, 1)),
            rec("a", packet(128, gap_packets, 1)),
        ],
    );
    let events: Vec<_> = out.session_events.iter().collect();
    assert!(matches!(events[0], SessionEvent::Started { .. }));
    let SessionEvent::Ended { session, reason } = events[1] else {
        panic!("expected an end, got {events:?}")
    };
    assert_eq!(*reason, SessionEndReason::Gap);
    assert_eq!(session.sample_count, 128);
    assert_eq!(&*session.session_id, format!("a_{T0}"));
    assert!(matches!(events[2], SessionEvent::Started { .. }));
    let final_agg = out
        .aggregates
        .iter()
        .find(|a| a.session_id == session.session_id)
        .unwrap();
    assert_eq!(final_agg.sample_count, 128);
    // The aggregate's distance is Σ|v|·dt over exactly that session's moving samples.
    let expected: f64 = out
        .samples
        .iter()
        .filter(|c| c.session_id == session.session_id)
        .flat_map(|c| {
            c.velocity_pred
                .iter()
                .zip(&c.movement_prob)
                .map(|(v, pr)| {
                    if *pr >= 0.5 {
                        f64::from(v.abs()) * 0.005
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(
        (final_agg.distance_m - expected).abs() < 1e-9,
        "{} vs {expected}",
        final_agg.distance_m
    );
}

#[test]
fn new_session_starts_from_zero_model_state() {
    // The first packet of a second session must be predicted exactly as if it were the
    // sensor's very first packet.
    let mut fresh = pipeline();
    let first = run(&mut fresh, &[rec("a", packet(0, 0, 1))]);
    let mut p = pipeline();
    let far = 600_000_000 / (64 * P) + 10;
    let moved = encoded(64, T0 + far * 64 * P, &samples(64, 1));
    let out = run(&mut p, &[rec("a", packet(0, 0, 2)), rec("a", moved)]);
    let second = out
        .samples
        .iter()
        .find(|c| c.sample_index[0] == 64)
        .unwrap();
    assert_eq!(second.velocity_pred, first.samples[0].velocity_pred);
}

#[test]
fn device_restart_starts_a_new_session() {
    let mut p = pipeline();
    let later = encoded(0, T0 + 10 * 64 * P, &samples(64, 1));
    let out = run(&mut p, &[rec("a", packet(5000, 0, 1)), rec("a", later)]);
    assert_eq!(sample_count(&out, "a"), 128);
    assert!(out.session_events.iter().any(|e| matches!(
        e,
        SessionEvent::Ended {
            reason: SessionEndReason::DeviceRestart,
            ..
        }
    )));
    assert_eq!(p.sensors().next().unwrap().counters.restarts, 1);
}

#[test]
fn predictions_do_not_depend_on_how_records_are_grouped_into_steps() {
    let records: Vec<IngestRecord> = (0..4u64)
        .map(|k| rec("a", packet(64 * k as u32, k, 1)))
        .collect();
    let mut one_step = pipeline();
    let a: Vec<f32> = run(&mut one_step, &records)
        .samples
        .iter()
        .flat_map(|c| c.velocity_pred.clone())
        .collect();
    let mut many_steps = pipeline();
    let b: Vec<f32> = records
        .iter()
        .flat_map(|r| run(&mut many_steps, std::slice::from_ref(r)).samples)
        .flat_map(|c| c.velocity_pred)
        .collect();
    assert_eq!(a.len(), 256);
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-5, "{max_diff}");
}

#[test]
fn idle_sensor_session_is_closed_by_processing_time_and_windows_flushed() {
    let mut p = pipeline();
    let out = run(&mut p, &[rec("a", packet(0, 0, 1))]);
    assert!(
        out.windows.is_empty(),
        "watermark has not passed the first window yet"
    );
    let mut out = Outputs::default();
    p.on_tick(NOW + 1_000_000, &mut out);
    assert!(out.session_events.is_empty());
    p.on_tick(NOW + 600_000_000, &mut out);
    assert!(out.session_events.iter().any(|e| matches!(
        e,
        SessionEvent::Ended {
            reason: SessionEndReason::Idle,
            ..
        }
    )));
    assert_eq!(out.windows.iter().map(|w| w.count).sum::<u64>(), 64);
}

#[test]
fn aggregates_are_emitted_every_interval_while_active() {
    let mut p = pipeline();
    run(&mut p, &[rec("a", packet(0, 0, 1))]);
    let mut out = Outputs::default();
    p.on_tick(NOW + 1_000_000, &mut out);
    assert!(out.aggregates.is_empty());
    p.on_tick(NOW + 2_000_000, &mut out);
    assert_eq!(out.aggregates.len(), 1);
    assert_eq!(out.aggregates[0].sample_count, 64);
}

#[test]
fn invalid_json_is_counted_and_valid_json_processed() {
    let mut p = pipeline();
    let json = br#"{"timestamp_us":1700000000000000,"base_sample_number":7,"samples":[{"acc":{"x":0,"y":0,"z":1},"gyro":{"x":0,"y":0,"z":0},"mag":{"x":0.1,"y":0,"z":0},"temp_raw":1}]}"#;
    let mk = |payload: &[u8]| IngestRecord {
        sensor_id: "j".into(),
        format: PayloadFormat::Json,
        ingest_us: NOW,
        payload: payload.to_vec().into(),
    };
    let out = run(&mut p, &[mk(b"{nope"), mk(json)]);
    assert_eq!(sample_count(&out, "j"), 1);
    assert_eq!(out.samples[0].sample_index, vec![7]);
    assert_eq!(
        p.sensors()
            .next()
            .unwrap()
            .counters
            .bad
            .get(&BadReason::InvalidJson),
        Some(&1)
    );
}

#[test]
fn velocity_pred_is_the_raw_output_masked_below_the_movement_threshold() {
    let records: Vec<IngestRecord> = (0..8u32)
        .map(|k| rec("a", packet(k * 64, u64::from(k), 1 + k % 2)))
        .collect();
    // A threshold inside the probabilities the demo model gives this motion, so samples fall on
    // both sides of it whatever the model's calibration.
    let baseline = run(&mut pipeline(), &records);
    let mut probs: Vec<f32> = baseline
        .samples
        .iter()
        .flat_map(|c| c.movement_prob.clone())
        .collect();
    probs.sort_by(f32::total_cmp);
    let threshold = probs[probs.len() / 2];
    assert!(
        probs[0] < threshold,
        "the model's probabilities do not vary: {probs:?}"
    );

    let config = PipelineConfig {
        movement_threshold: Some(threshold),
        ..PipelineConfig::default()
    };
    let mut p = Pipeline::new(config, model()).unwrap();
    let mut out = run(&mut p, &records);
    let (mut below, mut above, mut distance) = (0, 0, 0.0_f64);
    for (c, base) in out.samples.iter().zip(&baseline.samples) {
        assert_eq!(
            c.velocity_raw, base.velocity_raw,
            "the raw output does not depend on the threshold"
        );
        for i in 0..c.len() {
            let (pred, raw, prob) = (c.velocity_pred[i], c.velocity_raw[i], c.movement_prob[i]);
            assert!(raw.is_finite() && prob.is_finite());
            if prob < threshold {
                below += 1;
                assert_eq!(
                    pred, 0.0,
                    "sample {i}: probability {prob} < {threshold} but velocity_pred {pred}"
                );
            } else {
                above += 1;
                assert_eq!(pred, raw, "sample {i}: probability {prob} >= {threshold}");
            }
            distance += f64::from(pred.abs()) * 0.005;
        }
    }
    assert!(
        below > 0 && above > 0,
        "{below} samples below the threshold, {above} above"
    );
    assert!(
        out.samples.iter().any(|c| c
            .velocity_raw
            .iter()
            .zip(&c.velocity_pred)
            .any(|(r, p)| r != p)),
        "masking changed nothing"
    );

    // Aggregates are over the masked velocity: the distance is Σ|velocity_pred|·dt.
    p.on_tick(NOW + 601_000_000, &mut out);
    let last = out.aggregates.last().unwrap();
    assert_eq!(last.sample_count, 512);
    assert!(
        (last.distance_m - distance).abs() < 1e-9,
        "{} vs {distance}",
        last.distance_m
    );
}
