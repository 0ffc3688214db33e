//! Checkpoints: a pipeline restored from a snapshot continues exactly as the original would have,
//! with the bundled demo model and packets from the real encoder.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report

mod common;

use common::{NOW, P, SEC, T0, binary, encoded, model, motion};
use proptest::prelude::*;
use sensorflow_pipeline::{
    Outputs, Pipeline, PipelineConfig, PipelineError, PipelineSnapshot, SNAPSHOT_VERSION,
    SessionEvent, SnapshotError,
};
use sensorflow_protocol::record::IngestRecord;

/// A 64-sample packet with indices from `base`, starting `k` packet durations after `T0`; every
/// sensor moves (no still seeds), the motion changing with `k`.
fn packet(base: u32, k: u64, seed: u32) -> Vec<u8> {
    encoded(
        base,
        T0 + k * 64 * P,
        &motion(64, seed.wrapping_add(k as u32), 0.25),
    )
}

fn rec(sensor: &str, payload: &[u8], ingest_us: i64) -> IngestRecord {
    binary(sensor, payload.to_vec(), ingest_us)
}

/// One call into the pipeline.
#[derive(Clone, Debug)]
enum Step {
    Process(Vec<IngestRecord>, i64),
    Tick(i64),
}

/// Plays `steps`, appending everything produced to `out`.
fn play(p: &mut Pipeline, steps: &[Step], out: &mut Outputs) {
    for step in steps {
        match step {
            Step::Process(records, now) => {
                p.process(records.iter().map(IngestRecord::as_ref), *now, out)
            }
            Step::Tick(now) => p.on_tick(*now, out),
        }
    }
}

/// What a run produced, and the pipeline's final state.
struct Run {
    out: Outputs,
    /// Produced by the steps after the cut (all of them for an uninterrupted run).
    after_cut: Outputs,
    /// The snapshot taken at the cut (uninterrupted runs take one too, without using it).
    at_cut: PipelineSnapshot,
    /// Encoded snapshot of the final state, before `close_all`.
    final_state: Vec<u8>,
}

/// Plays `steps[..cut]`, then `steps[cut..]` either in the same pipeline or in a new one restored
/// from an encoded snapshot, and finally closes everything at `close_us`.
fn run(config: &PipelineConfig, steps: &[Step], cut: usize, restore: bool, close_us: i64) -> Run {
    let mut p = Pipeline::new(config.clone(), model()).unwrap();
    let mut out = Outputs::default();
    play(&mut p, &steps[..cut], &mut out);
    let at_cut = p.snapshot();
    if restore {
        let bytes = at_cut.encode();
        let decoded = PipelineSnapshot::decode(&bytes).unwrap();
        p = Pipeline::restore(config.clone(), model(), decoded).unwrap();
    }
    let mut after_cut = Outputs::default();
    play(&mut p, &steps[cut..], &mut after_cut);
    let final_state = p.snapshot().encode();
    p.close_all(close_us, &mut after_cut);
    append(&mut out, after_cut.clone());
    Run {
        out,
        after_cut,
        at_cut,
        final_state,
    }
}

fn append(out: &mut Outputs, more: Outputs) {
    out.samples.extend(more.samples);
    out.windows.extend(more.windows);
    out.session_events.extend(more.session_events);
    out.aggregates.extend(more.aggregates);
    out.gaps.extend(more.gaps);
    out.late.extend(more.late);
}

fn velocities(out: &Outputs) -> Vec<u32> {
    out.samples
        .iter()
        .flat_map(|c| c.velocity_pred.iter().map(|v| v.to_bits()))
        .collect()
}

/// Asserts the interrupted and the uninterrupted run agree on everything.
fn assert_same(straight: &Run, restored: &Run) {
    // Bit-for-bit predictions first: the clearest message if inference diverged.
    assert_eq!(
        velocities(&straight.out),
        velocities(&restored.out),
        "velocity_pred differs"
    );
    assert_eq!(straight.out.samples, restored.out.samples);
    assert_eq!(straight.out.windows, restored.out.windows);
    assert_eq!(straight.out.session_events, restored.out.session_events);
    assert_eq!(straight.out.aggregates, restored.out.aggregates);
    assert_eq!(straight.out.gaps, restored.out.gaps);
    assert_eq!(straight.out.late, restored.out.late);
    assert_eq!(straight.out, restored.out);
    assert!(
        straight.final_state == restored.final_state,
        "final states differ"
    );
}

/// Three sensors; the cut falls with a packet of `a` half received, windows and sessions open,
/// and an aggregate due; after it, `a`'s earlier packet is redelivered and `c` skips packets.
fn scenario() -> (Vec<Step>, usize) {
    let split = packet(5 * 64, 5, 1);
    let mut before = Vec::new();
    for k in 0..5u64 {
        let now = NOW + k as i64 * 300_000;
        let recs = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(s, id)| rec(id, &packet(64 * k as u32, k, s as u32), now))
            .collect();
        before.push(Step::Process(recs, now));
    }
    before.push(Step::Process(
        vec![rec("a", &split[..700], NOW + 1_500_000)],
        NOW + 1_500_000,
    ));
    before.push(Step::Tick(NOW + 1_600_000));
    let cut = before.len();

    let mut steps = before;
    // Too early for an aggregate: the sessions started at NOW, the interval is 2 s.
    steps.push(Step::Tick(NOW + 1_700_000));
    let now = NOW + 1_800_000;
    steps.push(Step::Process(
        vec![
            rec("a", &split[700..], now),
            rec("a", &packet(64, 1, 1), now),
            rec("b", &packet(5 * 64, 5, 1), now),
        ],
        now,
    ));
    // Aggregates are due 2 s after the sessions started.
    steps.push(Step::Tick(NOW + 2_100_000));
    for k in 6..14u64 {
        let now = NOW + k as i64 * 300_000;
        let mut recs = vec![
            rec("a", &packet(64 * k as u32, k, 0), now),
            rec("b", &packet(64 * k as u32, k, 1), now),
        ];
        if k >= 9 {
            // `c` was silent for packets 5..9: a gap of 256 samples.
            recs.push(rec("c", &packet(64 * k as u32, k, 2), now));
        }
        steps.push(Step::Process(recs, now));
        steps.push(Step::Tick(now + 100_000));
    }
    (steps, cut)
}

#[test]
fn restored_pipeline_continues_exactly_like_the_original() {
    let config = PipelineConfig::default();
    let (steps, cut) = scenario();
    let close = NOW + 10 * SEC;
    let straight = run(&config, &steps, cut, false, close);
    let restored = run(&config, &steps, cut, true, close);
    assert_same(&straight, &restored);

    // The cut really carries every kind of state.
    let snap = &restored.at_cut;
    assert_eq!(
        snap.sensors
            .iter()
            .map(|s| &*s.sensor_id)
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    let a = &snap.sensors[0];
    assert_eq!(
        a.framing_pending.len(),
        700,
        "half a packet is buffered at the cut"
    );
    assert!(a.session.is_some() && a.windows.open_count() > 0);
    assert!(a.h.iter().any(|&x| x != 0.0), "model state is mid-sequence");
    let after = &restored.after_cut;
    assert!(
        after
            .samples
            .iter()
            .any(|c| &*c.sensor_id == "a" && c.sample_index[0] == 5 * 64),
        "split packet completed"
    );
    assert_eq!(
        after
            .session_events
            .iter()
            .filter(|e| matches!(e, SessionEvent::Started { .. }))
            .count(),
        0,
        "sessions carried over"
    );
    assert!(
        after
            .aggregates
            .iter()
            .any(|g| g.emitted_at_us == NOW + 2_100_000 && g.sample_count == 5 * 64),
        "tick aggregate after restore"
    );
    assert!(
        after
            .windows
            .iter()
            .any(|w| w.window_start_us < (T0 + 5 * 64 * P) as i64),
        "a window open at the cut is emitted after it"
    );
    assert_eq!(
        (
            after.gaps.len(),
            after.gaps[0].from_index,
            after.gaps[0].missing
        ),
        (1, 5 * 64, 4 * 64)
    );
    let final_state = PipelineSnapshot::decode(&restored.final_state).unwrap();
    assert_eq!(
        final_state.sensors[0].counters.duplicates, 64,
        "redelivered packet dropped after restore"
    );
    assert_eq!(
        final_state.stats.records,
        steps
            .iter()
            .map(|s| if let Step::Process(r, _) = s {
                r.len() as u64
            } else {
                0
            })
            .sum::<u64>()
    );
}

#[test]
fn snapshot_of_a_new_pipeline_restores_to_an_equivalent_one() {
    let config = PipelineConfig::default();
    let (steps, _) = scenario();
    let straight = run(&config, &steps, 0, false, NOW + 10 * SEC);
    let restored = run(&config, &steps, 0, true, NOW + 10 * SEC);
    assert!(restored.at_cut.sensors.is_empty());
    assert_same(&straight, &restored);
}

/// A pipeline that has seen one packet of sensor `a`.
fn snapshot_with_one_sensor() -> PipelineSnapshot {
    let mut p = Pipeline::new(PipelineConfig::default(), model()).unwrap();
    play(
        &mut p,
        &[Step::Process(vec![rec("a", &packet(0, 0, 1), NOW)], NOW)],
        &mut Outputs::default(),
    );
    p.snapshot()
}

#[test]
fn model_state_of_another_length_is_rejected() {
    let mut snap = snapshot_with_one_sensor();
    assert_eq!(snap.sensors[0].h.len(), model().state_len());
    snap.sensors[0].c.truncate(3);
    let err = Pipeline::restore(PipelineConfig::default(), model(), snap)
        .err()
        .unwrap();
    assert!(
        matches!(&err, PipelineError::ModelStateMismatch { sensor_id, expected: 64, found: 3 } if sensor_id == "a"),
        "{err:?}"
    );
}

#[test]
fn sensor_appearing_twice_is_rejected() {
    let mut snap = snapshot_with_one_sensor();
    snap.sensors.push(snap.sensors[0].clone());
    let err = Pipeline::restore(PipelineConfig::default(), model(), snap)
        .err()
        .unwrap();
    assert!(
        matches!(&err, PipelineError::DuplicateSensor(id) if id == "a"),
        "{err:?}"
    );
}

#[test]
fn a_version_1_checkpoint_restores_and_continues_like_the_original() {
    // Taken at this scenario's cut by the last version 1 build (1f2704c), before the dedupe
    // tracker kept open gaps: a checkpoint written before an upgrade.
    let bytes = include_bytes!("data/snapshot_v1.bin");
    let config = PipelineConfig::default();
    let (steps, cut) = scenario();
    let close = NOW + 10 * SEC;
    let straight = run(&config, &steps, cut, false, close);

    let migrated = PipelineSnapshot::decode(bytes).unwrap();
    assert_eq!(migrated.version, SNAPSHOT_VERSION);
    assert_eq!(
        migrated, straight.at_cut,
        "migrates to the state this version takes at the same cut"
    );
    let mut p = Pipeline::restore(config, model(), migrated).unwrap();
    let mut after = Outputs::default();
    play(&mut p, &steps[cut..], &mut after);
    assert!(
        p.snapshot().encode() == straight.final_state,
        "final states differ"
    );
    p.close_all(close, &mut after);
    assert_eq!(
        velocities(&after),
        velocities(&straight.after_cut),
        "velocity_pred differs"
    );
    assert_eq!(after, straight.after_cut);
}

#[test]
fn newer_format_version_is_rejected_by_decode_and_restore() {
    let mut snap = snapshot_with_one_sensor();
    assert_eq!(snap.version, SNAPSHOT_VERSION);
    snap.version = SNAPSHOT_VERSION + 1;
    let err = PipelineSnapshot::decode(&snap.encode()).unwrap_err();
    assert!(
        matches!(err, SnapshotError::UnsupportedVersion { found, supported: SNAPSHOT_VERSION } if found == SNAPSHOT_VERSION + 1),
        "{err:?}"
    );
    let err = Pipeline::restore(PipelineConfig::default(), model(), snap)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            PipelineError::SnapshotVersion {
                supported: SNAPSHOT_VERSION,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn garbage_truncated_and_padded_bytes_are_errors() {
    for garbage in [
        &b""[..],
        b"\xff\xff\xff\xff\xff\xff",
        b"hello, snapshot",
        &[1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f],
    ] {
        assert!(PipelineSnapshot::decode(garbage).is_err(), "{garbage:?}");
    }
    let bytes = snapshot_with_one_sensor().encode();
    for len in 0..bytes.len() {
        assert!(
            matches!(
                PipelineSnapshot::decode(&bytes[..len]),
                Err(SnapshotError::Malformed(_))
            ),
            "prefix of {len} bytes"
        );
    }
    let mut padded = bytes.clone();
    padded.push(0);
    assert!(matches!(
        PipelineSnapshot::decode(&padded),
        Err(SnapshotError::TrailingBytes(1))
    ));
    assert_eq!(PipelineSnapshot::decode(&bytes).unwrap().encode(), bytes);
}

#[test]
fn snapshot_size_for_a_thousand_sensors_mid_session() {
    let mut p = Pipeline::new(PipelineConfig::default(), model()).unwrap();
    let mut out = Outputs::default();
    let ids: Vec<String> = (0..1000).map(|i| format!("imu-{i:04}")).collect();
    for k in 0..3u64 {
        let now = NOW + k as i64 * 320_000;
        let recs = ids
            .iter()
            .enumerate()
            .map(|(i, id)| rec(id, &packet(64 * k as u32, k, i as u32), now))
            .collect();
        play(&mut p, &[Step::Process(recs, now)], &mut out);
    }
    let mid = NOW + SEC;
    // Every sensor has half of its next packet buffered: the worst case between packets.
    let recs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| rec(id, &packet(192, 3, i as u32)[..650], mid))
        .collect();
    play(&mut p, &[Step::Process(recs, mid)], &mut out);
    let snap = p.snapshot();
    assert!(
        snap.sensors
            .iter()
            .all(|s| s.session.is_some() && s.framing_pending.len() == 650)
    );
    let bytes = snap.encode();
    let without_framing = bytes.len() - 1000 * 650;
    println!(
        "snapshot of 1000 sensors mid-session: {} bytes ({} per sensor; {} per sensor without the 650 framing bytes)",
        bytes.len(),
        bytes.len() / 1000,
        without_framing / 1000
    );
    // h and c are 2 x 64 f32 = 512 bytes; the rest (ids, session, windows, counters) is small.
    assert!(
        without_framing / 1000 < 1024,
        "{} bytes per sensor",
        without_framing / 1000
    );
    let back = PipelineSnapshot::decode(&bytes).unwrap();
    assert_eq!(back.encode(), bytes);
}

/// What one generated operation does to the record stream.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// The sensor's next packet.
    Next,
    /// Skip 1..=4 packets, then send the next one (a gap; longer skips end the session).
    Skip(u8),
    /// Redeliver the sensor's previous packet.
    Dup,
    /// The next packet split at this byte, its halves in consecutive steps.
    Split(u16),
    /// The device restarts: indices start again at 0 while time moves on.
    Restart,
    /// End the step, then tick.
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Next),
        1 => (1u8..=4).prop_map(Op::Skip),
        1 => Just(Op::Dup),
        2 => (1u16..1299).prop_map(Op::Split),
        1 => Just(Op::Restart),
        2 => Just(Op::Tick),
    ]
}

/// Turns generated operations into steps: each `(sensor, op)` adds records to the current step,
/// which ends after `step_len` operations, at a tick, or in the middle of a split packet.
fn build_steps(sensors: usize, ops: &[(usize, Op)], step_len: usize) -> Vec<Step> {
    struct Sensor {
        base: u32,
        k: u64,
        last: Option<Vec<u8>>,
    }
    let mut state: Vec<Sensor> = (0..sensors)
        .map(|_| Sensor {
            base: 0,
            k: 0,
            last: None,
        })
        .collect();
    let mut steps = Vec::new();
    let mut current = Vec::new();
    let mut now = NOW;
    let end_step = |current: &mut Vec<IngestRecord>, now: &mut i64, steps: &mut Vec<Step>| {
        if !current.is_empty() {
            steps.push(Step::Process(std::mem::take(current), *now));
        }
        *now += 200_000;
    };
    for (n, &(s, op)) in ops.iter().enumerate() {
        let id = format!("s{s}");
        let st = &mut state[s % sensors];
        let next = |st: &mut Sensor| {
            let bytes = packet(st.base, st.k, s as u32);
            st.base += 64;
            st.k += 1;
            st.last = Some(bytes.clone());
            bytes
        };
        match op {
            Op::Next => current.push(rec(&id, &next(st), now)),
            Op::Skip(by) => {
                st.base += 64 * u32::from(by);
                st.k += u64::from(by);
                current.push(rec(&id, &next(st), now));
            }
            Op::Dup => {
                if let Some(last) = &st.last {
                    current.push(rec(&id, last, now));
                }
            }
            Op::Split(at) => {
                let bytes = next(st);
                let at = usize::from(at).min(bytes.len() - 1);
                current.push(rec(&id, &bytes[..at], now));
                end_step(&mut current, &mut now, &mut steps);
                current.push(rec(&id, &bytes[at..], now));
            }
            Op::Restart => {
                st.base = 0;
                st.k += 2;
                current.push(rec(&id, &next(st), now));
            }
            Op::Tick => {
                end_step(&mut current, &mut now, &mut steps);
                steps.push(Step::Tick(now));
            }
        }
        if (n + 1) % step_len == 0 {
            end_step(&mut current, &mut now, &mut steps);
        }
    }
    end_step(&mut current, &mut now, &mut steps);
    steps
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_and_restore_at_any_cut_changes_no_output(
        sensors in 2usize..=3,
        ops in prop::collection::vec((0usize..3, op()), 4..40),
        step_len in 1usize..6,
        cut_at in 0.0f64..=1.0,
    ) {
        // Short session gap, windows and aggregate interval, so sessions end, windows close
        // and aggregates are emitted within a few generated steps.
        let config = PipelineConfig {
            session_gap_secs: 1.0,
            window_secs: 0.5,
            allowed_lateness_secs: 0.25,
            aggregate_interval_secs: 0.5,
            ..PipelineConfig::default()
        };
        let ops: Vec<(usize, Op)> = ops.into_iter().map(|(s, op)| (s % sensors, op)).collect();
        let steps = build_steps(sensors, &ops, step_len);
        let cut = ((steps.len() as f64) * cut_at).round() as usize;
        let close = NOW + 3_600 * SEC;
        let straight = run(&config, &steps, cut, false, close);
        let restored = run(&config, &steps, cut, true, close);
        prop_assert_eq!(velocities(&straight.out), velocities(&restored.out));
        prop_assert_eq!(&straight.out, &restored.out);
        prop_assert!(straight.final_state == restored.final_state, "final states differ");
    }
}
