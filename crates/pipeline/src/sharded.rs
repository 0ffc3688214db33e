//! [`ShardedPipeline`]: the pipeline partitioned by sensor over several threads.
//!
//! Every operator is keyed by sensor, so sensors can be processed independently: each shard is a
//! plain [`Pipeline`] that owns the sensors hashing to it (CRC-32 of the sensor id modulo the
//! shard count, the same idea as a Kafka partitioner). A step splits the records by shard and
//! runs the shards in parallel on scoped threads (the caller's thread takes shard 0), then
//! appends their outputs shard by shard. Nothing is shared between shards while they run, so
//! there is no lock on the hot path. Each shard gets its own [`Model`] handle: clones of one
//! `Arc` share a model (fine for tract, whose runs are concurrent), separate loads give each
//! shard its own session (needed for onnxruntime, which runs one call at a time per session).
//!
//! Because all shards finish a step before the next begins, the state between steps is
//! consistent at one log position: [`ShardedPipeline::snapshot`] merges the shards into one
//! ordinary [`PipelineSnapshot`], and [`ShardedPipeline::restore`] splits one by the current
//! shard count, so a checkpoint taken with any number of shards restores with any other.
//!
//! Outputs are per sensor exactly what one [`Pipeline`] produces; only the interleaving of
//! different sensors' outputs within a step differs (shard by shard instead of first-seen).

use std::sync::Arc;

use sensorflow_model::Model;
use sensorflow_protocol::IngestRecordRef;

use crate::{
    Outputs, Pipeline, PipelineConfig, PipelineError, PipelineSnapshot, PipelineStats,
    SNAPSHOT_VERSION, SensorView,
};

/// The shard a sensor belongs to among `shards`.
#[must_use]
pub fn shard_of(sensor_id: &str, shards: usize) -> usize {
    (crc32fast::hash(sensor_id.as_bytes()) as usize) % shards.max(1)
}

/// A [`Pipeline`] partitioned by sensor over `shards` threads (see the module docs).
pub struct ShardedPipeline {
    shards: Vec<Pipeline>,
    /// Per-shard output buffers, reused across steps.
    outs: Vec<Outputs>,
}

impl ShardedPipeline {
    /// One empty pipeline per model in `models` (at least one model is required).
    pub fn new(config: PipelineConfig, models: &[Arc<Model>]) -> Result<Self, PipelineError> {
        if models.is_empty() {
            return Err(PipelineError::Config(
                "a sharded pipeline needs at least one shard".into(),
            ));
        }
        let shards = models
            .iter()
            .map(|m| Pipeline::new(config.clone(), m.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_shards(shards))
    }

    /// Splits `snapshot` by sensor over one pipeline per model in `models`. Pipeline-wide
    /// counters go to shard 0, so [`stats`](Self::stats) continues from the snapshot's totals.
    pub fn restore(
        config: PipelineConfig,
        models: &[Arc<Model>],
        snapshot: PipelineSnapshot,
    ) -> Result<Self, PipelineError> {
        if models.is_empty() {
            return Err(PipelineError::Config(
                "a sharded pipeline needs at least one shard".into(),
            ));
        }
        let n = models.len();
        let mut parts: Vec<PipelineSnapshot> = (0..n)
            .map(|_| PipelineSnapshot {
                version: snapshot.version,
                stats: PipelineStats::default(),
                sensors: Vec::new(),
            })
            .collect();
        parts[0].stats = snapshot.stats;
        for sensor in snapshot.sensors {
            parts[shard_of(&sensor.sensor_id, n)].sensors.push(sensor);
        }
        let shards = parts
            .into_iter()
            .zip(models)
            .map(|(part, m)| Pipeline::restore(config.clone(), m.clone(), part))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_shards(shards))
    }

    /// Swaps every shard to its model in `models` (one per shard, as for [`new`](Self::new))
    /// between two steps; see [`Pipeline::set_model`]. Fails, changing nothing, when the
    /// count differs or the model reads a feature the pipeline does not compute.
    pub fn set_models(&mut self, models: &[Arc<Model>]) -> Result<(), PipelineError> {
        if models.len() != self.shards.len() {
            return Err(PipelineError::Config(format!(
                "{} models for {} shards",
                models.len(),
                self.shards.len()
            )));
        }
        // Checked on the first shard before any is changed: every model is the same version.
        if let (Some(first), Some(model)) = (self.shards.first_mut(), models.first()) {
            first.set_model(model.clone())?;
        }
        for (shard, model) in self.shards.iter_mut().zip(models).skip(1) {
            shard.set_model(model.clone())?;
        }
        Ok(())
    }

    fn from_shards(shards: Vec<Pipeline>) -> Self {
        let outs = shards.iter().map(|_| Outputs::default()).collect();
        Self { shards, outs }
    }

    /// Number of shards.
    #[must_use]
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Processes records in log order, the shards in parallel; appends everything produced to
    /// `out` (see [`Pipeline::process`]).
    pub fn process<'a>(
        &mut self,
        records: impl IntoIterator<Item = IngestRecordRef<'a>>,
        now_us: i64,
        out: &mut Outputs,
    ) {
        let n = self.shards.len();
        if n == 1 {
            self.shards[0].process(records, now_us, out);
            return;
        }
        let mut parts: Vec<Vec<IngestRecordRef<'a>>> = (0..n).map(|_| Vec::new()).collect();
        for record in records {
            parts[shard_of(record.sensor_id, n)].push(record);
        }
        std::thread::scope(|scope| {
            let mut jobs = self
                .shards
                .iter_mut()
                .zip(self.outs.iter_mut())
                .zip(parts)
                .filter(|(_, part)| !part.is_empty());
            let own = jobs.next();
            for ((shard, shard_out), part) in jobs {
                scope.spawn(move || shard.process(part, now_us, shard_out));
            }
            if let Some(((shard, shard_out), part)) = own {
                shard.process(part, now_us, shard_out);
            }
        });
        self.collect(out);
    }

    /// Processing-time duties of every shard (see [`Pipeline::on_tick`]).
    pub fn on_tick(&mut self, now_us: i64, out: &mut Outputs) {
        for shard in &mut self.shards {
            shard.on_tick(now_us, out);
        }
    }

    /// Ends every session and emits every window, in every shard (see [`Pipeline::close_all`]).
    pub fn close_all(&mut self, now_us: i64, out: &mut Outputs) {
        for shard in &mut self.shards {
            shard.close_all(now_us, out);
        }
    }

    /// Every sensor seen so far, shard by shard.
    pub fn sensors(&self) -> impl Iterator<Item = SensorView<'_>> {
        self.shards.iter().flat_map(Pipeline::sensors)
    }

    /// Counters summed over the shards.
    #[must_use]
    pub fn stats(&self) -> PipelineStats {
        let mut total = PipelineStats::default();
        for s in self.shards.iter().map(Pipeline::stats) {
            total.records += s.records;
            total.samples_out += s.samples_out;
            total.model_calls += s.model_calls;
            total.model_errors += s.model_errors;
            total.sensors_evicted += s.sensors_evicted;
            total.samples_quarantined += s.samples_quarantined;
        }
        total
    }

    /// Time spent in model calls, summed over the shards (see [`Pipeline::model_time`]).
    #[must_use]
    pub fn model_time(&self) -> std::time::Duration {
        self.shards.iter().map(Pipeline::model_time).sum()
    }

    /// One snapshot of all shards, as a single pipeline's (see the module docs).
    #[must_use]
    pub fn snapshot(&self) -> PipelineSnapshot {
        let mut merged = PipelineSnapshot {
            version: SNAPSHOT_VERSION,
            stats: self.stats(),
            sensors: Vec::new(),
        };
        for shard in &self.shards {
            merged.sensors.extend(shard.snapshot().sensors);
        }
        merged
    }

    /// Moves the shards' outputs into `out`, shard by shard.
    fn collect(&mut self, out: &mut Outputs) {
        for o in &mut self.outs {
            out.samples.append(&mut o.samples);
            out.windows.append(&mut o.windows);
            out.session_events.append(&mut o.session_events);
            out.aggregates.append(&mut o.aggregates);
            out.gaps.append(&mut o.gaps);
            out.late.append(&mut o.late);
            out.quarantine.append(&mut o.quarantine);
        }
    }
}
