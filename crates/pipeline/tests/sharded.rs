//! The sharded pipeline against a single one: same outputs per sensor, and checkpoints that
//! move between shard counts.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report

mod common;

use std::collections::BTreeMap;

use common::{NOW, P, T0, binary, encoded, model, motion};
use sensorflow_pipeline::{
    Outputs, Pipeline, PipelineConfig, SessionEvent, ShardedPipeline, shard_of,
};
use sensorflow_protocol::record::IngestRecord;

const SENSORS: usize = 40;

/// `steps` steps, each with one 64-sample packet from every sensor.
fn steps(steps: u64) -> Vec<Vec<IngestRecord>> {
    (0..steps)
        .map(|k| {
            (0..SENSORS)
                .map(|s| {
                    let payload = encoded(
                        64 * k as u32,
                        T0 + k * 64 * P,
                        &motion(64, (s as u32) * 7 + k as u32, 0.0),
                    );
                    binary(&format!("sensor-{s:02}"), payload, NOW)
                })
                .collect()
        })
        .collect()
}

/// Per sensor: (sample index, velocity, movement probability) of every sample, and the number
/// of session events and windows.
type Digest = BTreeMap<String, (Vec<(u32, f32, f32)>, usize, usize)>;

fn digest(out: &Outputs) -> Digest {
    let mut d = Digest::new();
    for c in &out.samples {
        let e = d.entry(c.sensor_id.to_string()).or_default();
        e.0.extend(
            c.sample_index
                .iter()
                .zip(&c.velocity_pred)
                .zip(&c.movement_prob)
                .map(|((i, v), m)| (*i, *v, *m)),
        );
    }
    for ev in &out.session_events {
        let id = match ev {
            SessionEvent::Started { session } | SessionEvent::Ended { session, .. } => {
                session.sensor_id.to_string()
            }
        };
        d.entry(id).or_default().1 += 1;
    }
    for w in &out.windows {
        d.entry(w.sensor_id.to_string()).or_default().2 += 1;
    }
    d
}

fn assert_same(a: &Digest, b: &Digest) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (sensor, (sa, ea, wa)) in a {
        let (sb, eb, wb) = &b[sensor];
        assert_eq!((sa.len(), ea, wa), (sb.len(), eb, wb), "{sensor}");
        for (x, y) in sa.iter().zip(sb) {
            assert_eq!(x.0, y.0, "{sensor}");
            assert!(
                (x.1 - y.1).abs() <= 1e-5 && (x.2 - y.2).abs() <= 1e-5,
                "{sensor}: {x:?} vs {y:?}"
            );
        }
    }
}

fn single_run(all: &[Vec<IngestRecord>]) -> Digest {
    let mut p = Pipeline::new(PipelineConfig::default(), model()).unwrap();
    let mut out = Outputs::default();
    for step in all {
        p.process(step.iter().map(IngestRecord::as_ref), NOW, &mut out);
    }
    p.close_all(NOW, &mut out);
    digest(&out)
}

#[test]
fn sensors_spread_over_every_shard() {
    for n in [2, 3] {
        let mut used = vec![0; n];
        for s in 0..SENSORS {
            used[shard_of(&format!("sensor-{s:02}"), n)] += 1;
        }
        assert!(used.iter().all(|&k| k > 0), "{used:?}");
    }
}

#[test]
fn sharded_outputs_equal_a_single_pipelines_per_sensor() {
    let all = steps(4);
    let expected = single_run(&all);
    for shards in [2, 3] {
        let mut p =
            ShardedPipeline::new(PipelineConfig::default(), &vec![model(); shards]).unwrap();
        let mut out = Outputs::default();
        for step in &all {
            p.process(step.iter().map(IngestRecord::as_ref), NOW, &mut out);
        }
        p.close_all(NOW, &mut out);
        assert_same(&digest(&out), &expected);
        assert_eq!(p.stats().records, (4 * SENSORS) as u64);
        assert_eq!(p.sensors().count(), SENSORS);
    }
}

#[test]
fn a_checkpoint_restores_under_another_shard_count() {
    let all = steps(6);
    let expected = single_run(&all);
    for (before, after) in [(2, 1), (1, 3), (3, 2)] {
        let mut p =
            ShardedPipeline::new(PipelineConfig::default(), &vec![model(); before]).unwrap();
        let mut out = Outputs::default();
        for step in &all[..3] {
            p.process(step.iter().map(IngestRecord::as_ref), NOW, &mut out);
        }
        let bytes = p.snapshot().encode();
        drop(p);
        let snapshot = sensorflow_pipeline::PipelineSnapshot::decode(&bytes).unwrap();
        let mut p =
            ShardedPipeline::restore(PipelineConfig::default(), &vec![model(); after], snapshot)
                .unwrap();
        assert_eq!(p.stats().records, (3 * SENSORS) as u64);
        for step in &all[3..] {
            p.process(step.iter().map(IngestRecord::as_ref), NOW, &mut out);
        }
        p.close_all(NOW, &mut out);
        assert_same(&digest(&out), &expected);
    }
}
