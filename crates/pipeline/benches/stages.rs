//! Cost of the pipeline stages per sample, on live traffic's shape: 1,000 sensors sending one
//! 64-sample packet each per step (64,000 samples), every step continuing where the last one
//! ended (sample indices and device time advance, sessions stay open, windows close about every
//! third step), fed to [`Pipeline`] as the log records it reads.
//!
//! Group `step` (elements = 64,000 samples per iteration):
//! - `demo_model`: [`Pipeline::process`] and [`Pipeline::on_tick`] with the bundled demo LSTM,
//!   everything from log record bytes to output chunks, windows and aggregates.
//! - `trivial_model`: the same with a stateless stand-in model that costs next to nothing (see
//!   [`trivial_model`]): record decode, framing, dedupe, transform, sessions, windows and the
//!   batching glue of inference, i.e. the pipeline without the LSTM.
//! - `redelivered`: a step whose packets were all processed before: record decode, framing and
//!   dedupe only (nothing reaches the later stages).
//! - `infer_demo_model`, `infer_trivial_model`: [`Model::run`] alone on the step's batch shape
//!   (1,000 sequences of 64), to subtract from the two `process` figures.
//!
//! Group `operator` (elements = 64 samples, one packet): the stage functions alone, on one
//! sensor's advancing stream: `dedupe_classify` ([`SequenceTracker::classify`]),
//! `window_add_emit` ([`SensorWindows::add`] per sample, then `emit_ready`), and
//! `session_accumulate` ([`Accumulator::add`] per prediction, the stage-6 running aggregate).
//! Transform (units, `accl_mag`, `gyro_mag`, columnar chunk) is inlined in the pipeline's packet
//! loop and has no entry point of its own; it is inside the `trivial_model` figure.
//!
//! Criterion's `thrpt` is samples/s; `time / elements` is ns/sample.
//!
//! ```text
//! cargo bench -p sensorflow-pipeline --bench stages
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
    measurement::WallTime,
};
use sensorflow_model::{Model, SequenceMut};
use sensorflow_pipeline::dedupe::{SequenceTracker, Verdict};
use sensorflow_pipeline::session::Accumulator;
use sensorflow_pipeline::window::SensorWindows;
use sensorflow_pipeline::{Outputs, Pipeline, PipelineConfig};
use sensorflow_protocol::imu::{RawSample, encode_packet};
use sensorflow_protocol::record::{IngestRecordRef, PayloadFormat};

const SENSORS: usize = 1000;
/// Samples per packet, as devices and the simulator send them.
const SAMPLES: usize = 64;
const STEP_SAMPLES: u64 = (SENSORS * SAMPLES) as u64;
const PERIOD_US: i64 = 5_000;
const T0_US: i64 = 1_710_028_800_000_000;
/// Receive latency between a packet's first sample and ingest (only stamps `ingest_us`).
const LATENCY_US: i64 = 40_000;

/// Encoded log records of consecutive steps of live traffic.
struct Traffic {
    ids: Vec<String>,
    /// Raw samples of a packet: varied, plausible values (the cost does not depend on them).
    raw: Vec<RawSample>,
    packet: Vec<u8>,
    records: Vec<Vec<u8>>,
    next_step: i64,
}

impl Traffic {
    fn new() -> Self {
        let raw = (0..SAMPLES as i16)
            .map(|i| RawSample {
                acc: [2048 + 9 * i, -512 - i, 1024 + 3 * i],
                gyro: [100 - i, 7 * i, -40],
                mag: [300 + i, -200, 150 - i],
                temp: 2400 + i % 7,
            })
            .collect();
        Traffic {
            ids: (0..SENSORS).map(|s| format!("imu-{s:04}")).collect(),
            raw,
            packet: Vec::new(),
            records: vec![Vec::new(); SENSORS],
            next_step: 0,
        }
    }

    /// Encodes the next step (one packet per sensor) into `self.records` and returns the
    /// processing time at which it is handled.
    fn advance(&mut self) -> i64 {
        let step = self.next_step;
        self.next_step += 1;
        let base = u32::try_from(step * SAMPLES as i64).unwrap_or(u32::MAX);
        let ts = T0_US + step * SAMPLES as i64 * PERIOD_US;
        for (id, record) in self.ids.iter().zip(&mut self.records) {
            self.packet.clear();
            encode_packet(base, ts as u64, &self.raw, &mut self.packet);
            record.clear();
            let r = IngestRecordRef {
                sensor_id: id,
                format: PayloadFormat::Binary,
                ingest_us: ts + LATENCY_US,
                payload: &self.packet,
            };
            r.encode(record);
        }
        ts + SAMPLES as i64 * PERIOD_US + LATENCY_US
    }

    /// The current step's records, decoded from their bytes as the pipeline thread does.
    fn records(&self) -> impl Iterator<Item = IngestRecordRef<'_>> {
        self.records
            .iter()
            .filter_map(|r| IngestRecordRef::decode(r).ok())
    }
}

/// A stateless stand-in for the demo LSTM that costs next to nothing: `velocity_pred` is the
/// sum and `movement_prob` the mean of each timestep's features (ONNX `ReduceSum` and
/// `ReduceMean` over the last axis). It meets the model contract, so [`Pipeline`] runs exactly
/// as with a real model and only the LSTM's arithmetic is missing from its figure.
fn trivial_model() -> Model {
    use prost::Message;
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
    use tract_onnx::pb::{
        AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
        TypeProto, ValueInfoProto, type_proto,
    };

    let symbol = |name: &str| Dimension {
        value: Some(dimension::Value::DimParam(name.into())),
        ..Default::default()
    };
    let tensor = |name: &str, dim: Vec<Dimension>| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Opset 11: reduction axes are an attribute (they became an input in later opsets).
    let reduce = |op: &str, output: &str| NodeProto {
        name: output.into(),
        op_type: op.into(),
        input: vec!["sequence_features".into()],
        output: vec![output.into()],
        attribute: vec![
            AttributeProto {
                name: "axes".into(),
                r#type: AttributeType::Ints as i32,
                ints: vec![2],
                ..Default::default()
            },
            AttributeProto {
                name: "keepdims".into(),
                r#type: AttributeType::Int as i32,
                i: 0,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let features = Dimension {
        value: Some(dimension::Value::DimValue(2)),
        ..Default::default()
    };
    let graph = GraphProto {
        name: "trivial".into(),
        node: vec![
            reduce("ReduceSum", "velocity_pred"),
            reduce("ReduceMean", "movement_prob"),
        ],
        input: vec![tensor(
            "sequence_features",
            vec![symbol("batch"), symbol("T"), features],
        )],
        output: vec![
            tensor("velocity_pred", vec![symbol("batch"), symbol("T")]),
            tensor("movement_prob", vec![symbol("batch"), symbol("T")]),
        ],
        ..Default::default()
    };
    let onnx = ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 11,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec();
    let sidecar = br#"{"feature_cols":["accl_mag","gyro_mag"],
        "scaler":{"mean":{"accl_mag":1.0,"gyro_mag":0.8},"std":{"accl_mag":0.3,"gyro_mag":0.76}}}"#;
    match Model::from_bytes(&onnx, sidecar) {
        Ok(m) => m,
        Err(e) => panic!("trivial model must load: {e}"),
    }
}

fn demo_model() -> Model {
    match Model::demo() {
        Ok(m) => m,
        Err(e) => panic!("demo model must load: {e}"),
    }
}

fn new_pipeline(model: Arc<Model>) -> Pipeline {
    match Pipeline::new(PipelineConfig::default(), model) {
        Ok(p) => p,
        Err(e) => panic!("default pipeline must build: {e}"),
    }
}

/// One step per iteration: the next step is encoded and the previous outputs dropped outside
/// the timed section; `process` and `on_tick` are timed.
fn bench_steps(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, model: Arc<Model>) {
    let mut pipeline = new_pipeline(model);
    let mut traffic = Traffic::new();
    let mut out = Outputs::default();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut busy = Duration::ZERO;
            for _ in 0..iters {
                let now_us = traffic.advance();
                out.clear();
                let before = pipeline.stats().samples_out;
                let start = Instant::now();
                pipeline.process(traffic.records(), now_us, &mut out);
                pipeline.on_tick(now_us, &mut out);
                busy += start.elapsed();
                // Guards the figure: every sample of the step went through every stage.
                assert_eq!(pipeline.stats().samples_out - before, STEP_SAMPLES);
            }
            busy
        })
    });
}

/// `Model::run` over 1,000 sequences of 64 timesteps, the batch `Pipeline` hands the model.
fn bench_infer(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, model: &Model) {
    let (f, s) = (model.n_features(), model.state_len());
    // A slow sine per sensor stands in for scaled features; values do not affect speed.
    let features: Vec<Vec<f32>> = (0..SENSORS)
        .map(|k| {
            (0..SAMPLES * f)
                .map(|i| ((i + k) as f32 * 0.01).sin())
                .collect()
        })
        .collect();
    let mut h = vec![vec![0.0; s]; SENSORS];
    let mut c = vec![vec![0.0; s]; SENSORS];
    let mut velocity = vec![vec![0.0; SAMPLES]; SENSORS];
    let mut movement = vec![vec![0.0; SAMPLES]; SENSORS];
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut seqs =
                SequenceMut::zip_all(&features, &mut h, &mut c, &mut velocity, &mut movement);
            if let Err(e) = model.run(&mut seqs) {
                panic!("model run failed: {e}");
            }
        })
    });
}

fn step(c: &mut Criterion) {
    let demo = Arc::new(demo_model());
    let trivial = Arc::new(trivial_model());

    let mut group = c.benchmark_group("step");
    // Flat sampling: an iteration with the demo model takes ~0.17 s, too long for criterion's
    // default linear ramp (210 iterations for 20 samples) to fit the measurement time.
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(STEP_SAMPLES));

    bench_steps(&mut group, "demo_model", demo.clone());
    bench_steps(&mut group, "trivial_model", trivial.clone());

    // Every packet of this step has been processed once already, so each replay is all
    // duplicates; outputs stay empty (checked), so nothing needs clearing between iterations.
    let mut pipeline = new_pipeline(trivial.clone());
    let mut traffic = Traffic::new();
    let mut out = Outputs::default();
    let now_us = traffic.advance();
    pipeline.process(traffic.records(), now_us, &mut out);
    out.clear();
    group.bench_function("redelivered", |b| {
        b.iter(|| {
            pipeline.process(traffic.records(), now_us, &mut out);
            assert!(out.is_empty());
        })
    });

    bench_infer(&mut group, "infer_demo_model", &demo);
    bench_infer(&mut group, "infer_trivial_model", &trivial);
    group.finish();
}

fn operator(c: &mut Criterion) {
    let mut group = c.benchmark_group("operator");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(SAMPLES as u64));

    let mut tracker = SequenceTracker::default();
    let mut packet: u32 = 0;
    group.bench_function("dedupe_classify", |b| {
        b.iter(|| {
            let base = packet.wrapping_mul(SAMPLES as u32);
            let ts = T0_US + i64::from(packet) * SAMPLES as i64 * PERIOD_US;
            packet = packet.wrapping_add(1);
            let verdict = tracker.classify(black_box(base), SAMPLES, ts, PERIOD_US);
            debug_assert!(matches!(verdict, Verdict::Accept { skip: 0, gap: None }));
            verdict
        })
    });

    let config = PipelineConfig::default();
    let secs_to_us = |secs: f64| (secs * 1e6).round() as i64;
    let (window_us, lateness_us) = (
        secs_to_us(config.window_secs),
        secs_to_us(config.allowed_lateness_secs),
    );
    let sensor: Arc<str> = Arc::from("imu-0042");
    let mut windows = SensorWindows::default();
    let mut emitted = Vec::new();
    let mut ts = T0_US;
    group.bench_function("window_add_emit", |b| {
        b.iter(|| {
            for i in 0..SAMPLES {
                let x = i as f32 * 0.01;
                windows.add(ts, 1.0 + x, 0.5 + x, window_us, lateness_us);
                ts += PERIOD_US;
            }
            windows.emit_ready(&sensor, window_us, lateness_us, &mut emitted);
            // Keeps the sink from growing across millions of iterations (a few records a call).
            emitted.clear();
        })
    });

    let predictions: Vec<(f32, f32)> = (0..SAMPLES)
        .map(|i| ((i as f32 * 0.1).sin(), (i % 3) as f32 * 0.4))
        .collect();
    let mut acc = Accumulator::default();
    let dt_s = 1.0 / config.sample_rate_hz;
    group.bench_function("session_accumulate", |b| {
        b.iter(|| {
            for &(v, p) in black_box(&predictions) {
                acc.add(v, p, 0.5, dt_s);
            }
        })
    });
    black_box(acc);
    group.finish();
}

criterion_group!(benches, step, operator);
criterion_main!(benches);
