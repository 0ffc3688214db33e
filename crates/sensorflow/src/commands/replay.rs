//! `sensorflow replay --from <RFC3339> --lake DIR`: reprocesses the retained log into a new
//! lake, for instance after deploying a new model.
//!
//! The log is scanned read-only (see `sensorflow_log::scan`), so a platform may keep running
//! on the same data dir. Records received at or after `--from` go through a fresh pipeline with
//! the configured (or `--model`) model, in log order, and every output is written to the new
//! lake; at the end the open sessions and windows are closed. Processing time is the records'
//! receive time, not the wall clock, so a replay is deterministic and sessions close where they
//! did live, however fast it runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use sensorflow_lake::{LakeConfig, LakeWriter};
use sensorflow_pipeline::{Outputs, Pipeline, SessionEvent, SessionRecord};
use sensorflow_protocol::record::IngestRecordRef;

use super::PlatformArgs;

#[derive(Args, Debug)]
pub(crate) struct ReplayArgs {
    /// Reprocess records received at or after this time (RFC 3339, e.g. 2026-11-27T08:00:00Z).
    #[arg(long)]
    pub(crate) from: String,
    /// New lake folder to write; must not exist or be empty.
    #[arg(long)]
    pub(crate) lake: PathBuf,
    /// Configuration file (TOML), as for `run`.
    #[arg(long, env = "SENSORFLOW_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Data dir whose log is replayed [default: ./data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// ONNX model to run instead of the configured one (sidecar FILE.json beside it).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
}

/// Log records per pipeline step.
const BATCH: usize = 4096;

pub(crate) async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || replay(args)).await?
}

fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let from_us = chrono::DateTime::parse_from_rfc3339(&args.from)
        .with_context(|| format!("--from {:?} is not an RFC 3339 time", args.from))?
        .timestamp_micros();
    let platform = PlatformArgs {
        config: args.config,
        data_dir: args.data_dir,
        mqtt_listen: None,
        http_listen: None,
        model: args.model,
    };
    let config = platform.load_config()?;
    if std::fs::read_dir(&args.lake).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "{} is not empty: replay writes a new lake",
            args.lake.display()
        );
    }
    let model = Arc::new(crate::runtime::load_model(&config)?);
    let mut pipeline =
        Pipeline::new(config.pipeline.clone(), model).context("building the pipeline")?;
    let mut lake = LakeWriter::open(LakeConfig {
        max_file_age: Duration::MAX,
        ..config.lake_config(args.lake.clone())
    })
    .context("opening the new lake")?;
    let log_dir = config.data_dir.join("log");
    let scan = sensorflow_log::scan(&log_dir)
        .with_context(|| format!("reading the log in {}", log_dir.display()))?;

    let started = Instant::now();
    let tick_us = i64::try_from(config.runtime.tick_ms).unwrap_or(100) * 1000;
    let (mut read, mut skipped, mut undecodable) = (0u64, 0u64, 0u64);
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Outputs::default();
    let mut ended = Vec::new();
    let mut now_us = None;
    let mut next_tick_us = i64::MIN;
    let mut scan = scan.peekable();
    while scan.peek().is_some() {
        batch.clear();
        for record in scan.by_ref().take(BATCH) {
            let (offset, bytes) = record.context("reading the log")?;
            read += 1;
            match IngestRecordRef::decode(&bytes) {
                Ok(r) if r.ingest_us >= from_us => batch.push(bytes),
                Ok(_) => skipped += 1,
                Err(e) => {
                    undecodable += 1;
                    tracing::warn!(offset, error = %e, "skipping undecodable log record");
                }
            }
        }
        // Decoded twice (cheap, zero-copy) so the batch can own its bytes.
        let records: Vec<IngestRecordRef<'_>> = batch
            .iter()
            .filter_map(|b| IngestRecordRef::decode(b).ok())
            .collect();
        let Some(last) = records.last() else { continue };
        let now = last.ingest_us;
        now_us = Some(now);
        pipeline.process(records.iter().copied(), now, &mut out);
        if now >= next_tick_us {
            pipeline.on_tick(now, &mut out);
            next_tick_us = now + tick_us;
        }
        write(&mut lake, &mut out, &mut ended)?;
    }
    pipeline.close_all(now_us.unwrap_or(0), &mut out);
    write(&mut lake, &mut out, &mut ended)?;
    let files = lake.flush().context("committing the new lake")?;
    let stats = pipeline.stats();
    eprintln!(
        "replayed {} of {read} log records ({skipped} before --from, {undecodable} undecodable) into {}: {} samples, {} files, {:.1} s",
        stats.records,
        args.lake.display(),
        stats.samples_out,
        files,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes one step's outputs to the lake and clears them.
fn write(
    lake: &mut LakeWriter,
    out: &mut Outputs,
    ended: &mut Vec<SessionRecord>,
) -> anyhow::Result<()> {
    ended.clear();
    ended.extend(out.session_events.iter().filter_map(|e| match e {
        SessionEvent::Ended { session, .. } => Some(session.clone()),
        SessionEvent::Started { .. } => None,
    }));
    lake.write_samples(&out.samples)?;
    lake.write_windows(&out.windows)?;
    lake.write_aggregates(&out.aggregates)?;
    lake.write_sessions(ended)?;
    lake.write_gaps(&out.gaps)?;
    lake.write_late(&out.late)?;
    lake.write_quarantine(&out.quarantine)?;
    out.clear();
    Ok(())
}
