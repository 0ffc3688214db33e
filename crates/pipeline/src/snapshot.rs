//! Checkpoints of the pipeline state: what a restart needs to continue exactly where the last
//! checkpoint left off (DESIGN.md, "Exactly-once effect").
//!
//! [`Pipeline::snapshot`] copies every sensor's state into a [`PipelineSnapshot`], a plain serde
//! value. [`Pipeline::restore`] builds a pipeline from it that continues exactly as the original
//! would have: fed the same records from the checkpointed log offsets on, it produces the same
//! outputs in the same order, predictions bit for bit. [`PipelineSnapshot::encode`] and
//! [`PipelineSnapshot::decode`] turn it into bytes and back; checksums and atomic files are the
//! caller's business.
//!
//! # What a snapshot holds
//!
//! Per sensor, in the pipeline's first-seen order: the framing buffer's unconsumed bytes (so a
//! packet split across the cut completes after restore), the dedupe/gap tracker, the active
//! session with its aggregate accumulator and processing-time clocks (last seen, last emission),
//! the open windows and watermark, the model's recurrent state and the counters. Pipeline-wide:
//! [`PipelineStats`].
//!
//! Not held: samples waiting for inference (there are none between steps, see
//! [`Pipeline::snapshot`]), caches (compiled model plans, scratch buffers), and the configuration
//! and model, which [`Pipeline::restore`] takes as arguments so a restart may change them. Of the
//! framing decoder only the buffered bytes are kept (see
//! [`FrameDecoder::restore`](sensorflow_protocol::framing::FrameDecoder::restore)): a garbage run
//! that was not reported yet at the cut is not counted after restore. Packets are unaffected.
//!
//! # Encoding
//!
//! [postcard](https://docs.rs/postcard) 1.x: serde's data model in a compact binary form with a
//! specified, stable wire format. Integers are varints (most counters and ids take a byte or
//! two), floats are raw little-endian bits (NaN and the infinities of an empty window's min/max
//! survive unchanged), sequences are length-prefixed. Malformed input is an error, never a panic,
//! and lengths read from the input are checked against what is there before anything is trusted.
//!
//! The format is not self-describing: it follows the field order of the types it holds, here
//! and in [`dedupe`](crate::dedupe), [`session`](crate::session), [`window`](crate::window) and
//! [`stats`](crate::stats). Changing any of them changes the format; bump [`SNAPSHOT_VERSION`]
//! when you do, and keep reading the previous version (mirror the types whose fields changed,
//! as [`v1`] does) so that checkpoints written before an upgrade still restore. The version is
//! the first field, so a reader checks it before parsing the rest.

use std::collections::HashMap;
use std::sync::Arc;

use sensorflow_model::Model;
use sensorflow_protocol::framing::FrameDecoder;
use serde::{Deserialize, Serialize};

use crate::dedupe::SequenceTracker;
use crate::session::ActiveSession;
use crate::window::SensorWindows;
use crate::{
    Pipeline, PipelineConfig, PipelineError, PipelineStats, SensorCounters, SensorId, SensorState,
};

/// The snapshot format this build writes. It reads this one and versions 1 and 2 (see [`v1`],
/// [`v2`]).
///
/// Version 2 added the dedupe tracker's open gaps and the `reordered_samples` counter; version
/// 3 the tracker's index jumps, the `index_jumps` and `quarantined_samples` counters and the
/// pipeline-wide `sensors_evicted` and `samples_quarantined`.
pub const SNAPSHOT_VERSION: u32 = 3;

/// The whole state of a [`Pipeline`] between two steps (see the module docs for what it holds).
///
/// Fields are public so a caller can inspect a checkpoint or split it by sensor (a sensor's state
/// moves with its Kafka partition); [`Pipeline::restore`] validates whatever it is given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineSnapshot {
    /// Format version, [`SNAPSHOT_VERSION`] when taken by this build. Must stay the first field:
    /// [`decode`](Self::decode) reads it before the rest.
    pub version: u32,
    /// Pipeline-wide counters.
    pub stats: PipelineStats,
    /// Every sensor's state, in the order the pipeline first saw them (a restored pipeline keeps
    /// that order, so it batches inference exactly as the original did).
    pub sensors: Vec<SensorSnapshot>,
}

/// The state of one sensor in a [`PipelineSnapshot`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensorSnapshot {
    /// The sensor the state belongs to.
    pub sensor_id: SensorId,
    /// Bytes of the framing buffer not consumed yet: typically the head of a packet whose tail
    /// arrives in the next message.
    pub framing_pending: Vec<u8>,
    /// Dedupe and gap position in the sample index space.
    pub sequence: SequenceTracker,
    /// The active session with its running aggregates, if any.
    pub session: Option<ActiveSession>,
    /// Open windows and watermark.
    pub windows: SensorWindows,
    /// Recurrent model hidden state, [`Model::state_len`] values.
    pub h: Vec<f32>,
    /// Recurrent model cell state, [`Model::state_len`] values.
    pub c: Vec<f32>,
    /// What was counted for the sensor so far.
    pub counters: SensorCounters,
}

/// Why bytes could not be decoded as a [`PipelineSnapshot`].
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes announce a format version this build does not read (typically written by a
    /// newer build).
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    /// The bytes are not a snapshot (truncated, corrupt, or not a snapshot at all).
    #[error("malformed snapshot: {0}")]
    Malformed(postcard::Error),
    /// A complete snapshot was followed by more bytes, which a well-formed file never has.
    #[error("malformed snapshot: {0} unexpected bytes after its end")]
    TrailingBytes(usize),
}

impl PipelineSnapshot {
    /// The snapshot as bytes (see "Encoding" in the module docs).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        // Serialising to a Vec only fails for sequences of unknown length or custom serializer
        // errors; every snapshotted type is a struct, an option, a number, a string, a Vec, a
        // VecDeque or a BTreeMap, all of known length.
        postcard::to_stdvec(self).expect("snapshot types serialise without error")
    }

    /// Parses bytes written by [`encode`](Self::encode), checking the format version first.
    ///
    /// Never panics, whatever the bytes. A successful decode does not prove the content is
    /// consistent: [`Pipeline::restore`] checks it against the model.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let (found, _) =
            postcard::take_from_bytes::<u32>(bytes).map_err(SnapshotError::Malformed)?;
        let (snapshot, rest) = match found {
            SNAPSHOT_VERSION => {
                postcard::take_from_bytes::<Self>(bytes).map_err(SnapshotError::Malformed)?
            }
            2 => {
                let (old, rest) = postcard::take_from_bytes::<v2::PipelineSnapshot>(bytes)
                    .map_err(SnapshotError::Malformed)?;
                (old.into(), rest)
            }
            1 => {
                let (old, rest) = postcard::take_from_bytes::<v1::PipelineSnapshot>(bytes)
                    .map_err(SnapshotError::Malformed)?;
                (v2::PipelineSnapshot::from(old).into(), rest)
            }
            _ => {
                return Err(SnapshotError::UnsupportedVersion {
                    found,
                    supported: SNAPSHOT_VERSION,
                });
            }
        };
        if !rest.is_empty() {
            return Err(SnapshotError::TrailingBytes(rest.len()));
        }
        Ok(snapshot)
    }
}

impl Pipeline {
    /// Copies the whole pipeline state into a snapshot.
    ///
    /// Take it between steps, together with the log offsets of the last processed record: a
    /// pipeline restored from it and fed the records after those offsets produces exactly the
    /// outputs this one would. Between steps no sample waits for inference, because
    /// [`process`](Self::process) and [`close_all`](Self::close_all) infer before returning and
    /// [`on_tick`](Self::on_tick) adds no samples; this is asserted, since a snapshot that left
    /// pending samples out would lose them silently.
    #[must_use]
    pub fn snapshot(&self) -> PipelineSnapshot {
        let sensors = self
            .sensors
            .iter()
            .map(|s| {
                assert!(
                    s.pending.is_none(),
                    "snapshot of sensor {:?} taken in the middle of a step",
                    s.id
                );
                SensorSnapshot {
                    sensor_id: s.id.clone(),
                    framing_pending: s.framing.pending().to_vec(),
                    sequence: s.seq.clone(),
                    session: s.session.clone(),
                    windows: s.windows.clone(),
                    h: s.h.clone(),
                    c: s.c.clone(),
                    counters: s.counters.clone(),
                }
            })
            .collect();
        PipelineSnapshot {
            version: SNAPSHOT_VERSION,
            stats: self.stats.clone(),
            sensors,
        }
    }

    /// Builds a pipeline that continues from `snapshot`, running with `config` and `model`.
    ///
    /// Fails like [`new`](Self::new) on a bad configuration or model, with
    /// [`PipelineError::SnapshotVersion`] on a format version this build does not read, with
    /// [`PipelineError::ModelStateMismatch`] when a sensor's recurrent state does not have the
    /// model's [`state_len`](Model::state_len) (the snapshot was taken with a model of another
    /// shape), and with [`PipelineError::DuplicateSensor`] when a sensor appears twice.
    ///
    /// The framing buffers are restored under `config`'s bounds; the other state is taken as it
    /// is, so a changed window size or session gap applies to what is open at the cut as well.
    pub fn restore(
        config: PipelineConfig,
        model: Arc<Model>,
        snapshot: PipelineSnapshot,
    ) -> Result<Pipeline, PipelineError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(PipelineError::SnapshotVersion {
                found: snapshot.version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let mut pipeline = Pipeline::new(config, model)?;
        let state_len = pipeline.model.state_len();
        let (max_buffer, max_samples) = (
            pipeline.config.max_framing_buffer_bytes,
            pipeline.config.max_samples_per_packet,
        );
        pipeline.sensors.reserve(snapshot.sensors.len());
        pipeline.index = HashMap::with_capacity(snapshot.sensors.len());
        for s in snapshot.sensors {
            if let Some(found) = [s.h.len(), s.c.len()]
                .into_iter()
                .find(|&len| len != state_len)
            {
                return Err(PipelineError::ModelStateMismatch {
                    sensor_id: s.sensor_id.to_string(),
                    expected: state_len,
                    found,
                });
            }
            if pipeline.index.contains_key(&s.sensor_id) {
                return Err(PipelineError::DuplicateSensor(s.sensor_id.to_string()));
            }
            pipeline.add_sensor(SensorState {
                id: s.sensor_id,
                framing: FrameDecoder::restore(&s.framing_pending, max_buffer, max_samples),
                seq: s.sequence,
                session: s.session,
                windows: s.windows,
                h: s.h,
                c: s.c,
                pending: None,
                counters: s.counters,
            });
        }
        pipeline.stats = snapshot.stats;
        Ok(pipeline)
    }
}

/// Version 2 of the format, read so that checkpoints taken before version 3 still restore.
///
/// Only the types whose fields changed are mirrored here; converting gives the state a version
/// 3 build would have had: no index jumps remembered and nothing counted for them.
pub mod v2 {
    use std::collections::{BTreeMap, VecDeque};

    use sensorflow_protocol::framing::BadReason;
    use serde::Deserialize;

    use crate::dedupe::SequenceTracker;
    use crate::session::ActiveSession;
    use crate::window::SensorWindows;
    use crate::{PipelineStats, SensorCounters, SensorId};

    /// [`super::PipelineSnapshot`] as version 2 wrote it.
    #[derive(Debug, Deserialize)]
    pub struct PipelineSnapshot {
        pub version: u32,
        pub stats: Stats,
        pub sensors: Vec<SensorSnapshot>,
    }

    /// [`PipelineStats`] of versions 1 and 2: no `sensors_evicted`.
    #[derive(Debug, Deserialize)]
    pub struct Stats {
        pub records: u64,
        pub samples_out: u64,
        pub model_calls: u64,
        pub model_errors: u64,
    }

    /// [`super::SensorSnapshot`] as version 2 wrote it.
    #[derive(Debug, Deserialize)]
    pub struct SensorSnapshot {
        pub sensor_id: SensorId,
        pub framing_pending: Vec<u8>,
        pub sequence: Tracker,
        pub session: Option<ActiveSession>,
        pub windows: SensorWindows,
        pub h: Vec<f32>,
        pub c: Vec<f32>,
        pub counters: Counters,
    }

    /// The dedupe tracker of version 2: no index jumps.
    #[derive(Debug, Deserialize)]
    pub struct Tracker {
        pub next_index: Option<u64>,
        pub last_timestamp_us: i64,
        pub open_gaps: VecDeque<(u64, u64)>,
    }

    /// The counters of version 2: no `index_jumps`, no `quarantined_samples`.
    #[derive(Debug, Deserialize)]
    pub struct Counters {
        pub messages: u64,
        pub packets_decoded: u64,
        pub samples_decoded: u64,
        pub duplicates: u64,
        pub gaps: u64,
        pub missing_samples: u64,
        pub late: u64,
        pub restarts: u64,
        pub sessions_started: u64,
        pub bad: BTreeMap<BadReason, u64>,
        pub first_seen_us: Option<i64>,
        pub last_seen_us: Option<i64>,
        pub reordered_samples: u64,
    }

    impl From<PipelineSnapshot> for super::PipelineSnapshot {
        fn from(old: PipelineSnapshot) -> Self {
            let sensors = old
                .sensors
                .into_iter()
                .map(super::SensorSnapshot::from)
                .collect();
            let s = old.stats;
            let stats = PipelineStats {
                records: s.records,
                samples_out: s.samples_out,
                model_calls: s.model_calls,
                model_errors: s.model_errors,
                sensors_evicted: 0,
                samples_quarantined: 0,
            };
            Self {
                version: super::SNAPSHOT_VERSION,
                stats,
                sensors,
            }
        }
    }

    impl From<SensorSnapshot> for super::SensorSnapshot {
        fn from(old: SensorSnapshot) -> Self {
            let c = old.counters;
            let t = old.sequence;
            Self {
                sensor_id: old.sensor_id,
                framing_pending: old.framing_pending,
                sequence: SequenceTracker::from_v2(t.next_index, t.last_timestamp_us, t.open_gaps),
                session: old.session,
                windows: old.windows,
                h: old.h,
                c: old.c,
                counters: SensorCounters {
                    messages: c.messages,
                    packets_decoded: c.packets_decoded,
                    samples_decoded: c.samples_decoded,
                    duplicates: c.duplicates,
                    gaps: c.gaps,
                    missing_samples: c.missing_samples,
                    late: c.late,
                    restarts: c.restarts,
                    sessions_started: c.sessions_started,
                    bad: c.bad,
                    first_seen_us: c.first_seen_us,
                    last_seen_us: c.last_seen_us,
                    reordered_samples: c.reordered_samples,
                    index_jumps: 0,
                    quarantined_samples: 0,
                },
            }
        }
    }
}

/// Version 1 of the format, read so that checkpoints taken before version 2 still restore.
///
/// Only the types whose fields changed are mirrored here; decoding one of these and converting
/// it gives the state a version 2 build would have had (which [`v2`] converts on): no open gaps
/// (version 1 dropped late packets as duplicates) and nothing counted as reordered.
pub mod v1 {
    use std::collections::{BTreeMap, VecDeque};

    use sensorflow_protocol::framing::BadReason;
    use serde::Deserialize;

    use crate::SensorId;
    use crate::session::ActiveSession;
    use crate::window::SensorWindows;

    /// [`super::PipelineSnapshot`] as version 1 wrote it.
    #[derive(Debug, Deserialize)]
    pub struct PipelineSnapshot {
        pub version: u32,
        pub stats: super::v2::Stats,
        pub sensors: Vec<SensorSnapshot>,
    }

    /// [`super::SensorSnapshot`] as version 1 wrote it.
    #[derive(Debug, Deserialize)]
    pub struct SensorSnapshot {
        pub sensor_id: SensorId,
        pub framing_pending: Vec<u8>,
        pub sequence: Tracker,
        pub session: Option<ActiveSession>,
        pub windows: SensorWindows,
        pub h: Vec<f32>,
        pub c: Vec<f32>,
        pub counters: Counters,
    }

    /// The dedupe tracker of version 1: no open gaps.
    #[derive(Debug, Deserialize)]
    pub struct Tracker {
        pub next_index: Option<u64>,
        pub last_timestamp_us: i64,
    }

    /// The counters of version 1: no `reordered_samples`.
    #[derive(Debug, Deserialize)]
    pub struct Counters {
        pub messages: u64,
        pub packets_decoded: u64,
        pub samples_decoded: u64,
        pub duplicates: u64,
        pub gaps: u64,
        pub missing_samples: u64,
        pub late: u64,
        pub restarts: u64,
        pub sessions_started: u64,
        pub bad: BTreeMap<BadReason, u64>,
        pub first_seen_us: Option<i64>,
        pub last_seen_us: Option<i64>,
    }

    impl From<PipelineSnapshot> for super::v2::PipelineSnapshot {
        fn from(old: PipelineSnapshot) -> Self {
            let sensors = old
                .sensors
                .into_iter()
                .map(super::v2::SensorSnapshot::from)
                .collect();
            Self {
                version: 2,
                stats: old.stats,
                sensors,
            }
        }
    }

    impl From<SensorSnapshot> for super::v2::SensorSnapshot {
        fn from(old: SensorSnapshot) -> Self {
            let c = old.counters;
            Self {
                sensor_id: old.sensor_id,
                framing_pending: old.framing_pending,
                sequence: super::v2::Tracker {
                    next_index: old.sequence.next_index,
                    last_timestamp_us: old.sequence.last_timestamp_us,
                    open_gaps: VecDeque::new(),
                },
                session: old.session,
                windows: old.windows,
                h: old.h,
                c: old.c,
                counters: super::v2::Counters {
                    messages: c.messages,
                    packets_decoded: c.packets_decoded,
                    samples_decoded: c.samples_decoded,
                    duplicates: c.duplicates,
                    gaps: c.gaps,
                    missing_samples: c.missing_samples,
                    late: c.late,
                    restarts: c.restarts,
                    sessions_started: c.sessions_started,
                    bad: c.bad,
                    first_seen_us: c.first_seen_us,
                    last_seen_us: c.last_seen_us,
                    reordered_samples: 0,
                },
            }
        }
    }
}
