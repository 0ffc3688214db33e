//! `sensorflow replay --from <RFC3339> --lake DIR`: reprocesses the retained log into a new
//! lake, for instance after deploying a new model.
//!
//! The log is scanned read-only (see `sensorflow_log::scan`), so a platform may keep running
//! on the same data dir. Records received at or after `--from` go through a fresh pipeline with
//! the configured (or `--model`) model, in log order, and every output is written to the new
//! lake; at the end the open sessions and windows are closed. Processing time is the records'
//! receive time, not the wall clock, so a replay is deterministic and sessions close where they
//! did live, however fast it runs.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sensorflow_lake::{LakeConfig, LakeWriter};
use sensorflow_model::Model;
use sensorflow_pipeline::{Outputs, Pipeline, SessionEvent, SessionRecord};
use sensorflow_protocol::record::IngestRecordRef;

use super::PlatformArgs;
use crate::config::Config;
use crate::runtime::model_control::ModelLoader;

#[derive(Args, Debug)]
pub(crate) struct ReplayArgs {
    /// Reprocess records received at or after this time (RFC 3339, e.g. 2026-11-27T08:00:00Z).
    #[arg(long)]
    pub(crate) from: String,
    /// New lake to write: a folder that must not exist or be empty, or s3://bucket/prefix
    /// (an unused prefix; AWS_* variables as for `run`).
    #[arg(long)]
    pub(crate) lake: String,
    /// Configuration file (TOML), as for `run`.
    #[arg(long, env = "SENSORFLOW_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Data dir whose log is replayed [default: ./data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Model to run instead of the configured one: a path, an http(s):// URL or
    /// s3://bucket/key, its sidecar (extension .json) beside it.
    #[arg(long)]
    pub(crate) model: Option<String>,
}

/// Log records per pipeline step.
const BATCH: usize = 4096;

pub(crate) async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let from_us = chrono::DateTime::parse_from_rfc3339(&args.from)
        .with_context(|| format!("--from {:?} is not an RFC 3339 time", args.from))?
        .timestamp_micros();
    let platform = PlatformArgs {
        config: args.config.clone(),
        data_dir: args.data_dir.clone(),
        mqtt_listen: None,
        http_listen: None,
        model: args.model.clone(),
    };
    let mut config = platform.load_config()?;
    let lake =
        sensorflow_lake::LakeLocation::parse(&args.lake, config.data_dir.join("replay-staging"))
            .context("--lake")?;
    if let sensorflow_lake::LakeLocation::Dir(dir) = &lake
        && std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
    {
        bail!("{} is not empty: replay writes a new lake", args.lake);
    }
    // One pipeline, so one model instance.
    config.runtime.pipeline_threads = 1;
    let active = ModelLoader::new(&config)
        .load(config.model.path.as_deref(), None)
        .await
        .context("loading the model")?;
    let model = active
        .models
        .first()
        .cloned()
        .context("no model instance was loaded")?;
    eprintln!(
        "replaying with model {} ({})",
        active.version,
        active.location.as_deref().unwrap_or("bundled demo model")
    );
    tokio::task::spawn_blocking(move || replay(&args, &config, lake, model, from_us)).await?
}

fn replay(
    args: &ReplayArgs,
    config: &Config,
    lake: sensorflow_lake::LakeLocation,
    model: Arc<Model>,
    from_us: i64,
) -> anyhow::Result<()> {
    let mut pipeline =
        Pipeline::new(config.pipeline.clone(), model).context("building the pipeline")?;
    let mut lake = LakeWriter::open(LakeConfig {
        max_file_age: Duration::MAX,
        ..config.lake_config(lake)
    })
    .context("opening the new lake")?;
    let log_dir = config.data_dir.join("log");
    let scan = sensorflow_log::scan(&log_dir)
        .with_context(|| format!("reading the log in {}", log_dir.display()))?;

    let mut progress = Progress::new(scan.bytes_total());
    let started = Instant::now();
    let tick_us = i64::try_from(config.runtime.tick_ms).unwrap_or(100) * 1000;
    let (mut read, mut skipped, mut undecodable) = (0u64, 0u64, 0u64);
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = Outputs::default();
    let mut ended = Vec::new();
    let mut now_us = None;
    let mut next_tick_us = i64::MIN;
    let mut scan = scan;
    let mut exhausted = false;
    while !exhausted {
        batch.clear();
        for _ in 0..BATCH {
            let Some(record) = scan.next() else {
                exhausted = true;
                break;
            };
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
        progress.update(scan.bytes_read(), read);
    }
    progress.finish();
    pipeline.close_all(now_us.unwrap_or(0), &mut out);
    write(&mut lake, &mut out, &mut ended)?;
    let files = lake.flush().context("committing the new lake")?;
    let stats = pipeline.stats();
    eprintln!(
        "replayed {} of {read} log records ({skipped} before --from, {undecodable} undecodable) into {}: {} samples, {} files, {:.1} s",
        stats.records,
        args.lake,
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

/// Replay progress on stderr: a progress bar with records/s and the time left on a terminal,
/// a plain line every few seconds otherwise (logs, CI).
enum Progress {
    Bar(ProgressBar),
    Lines {
        total_bytes: u64,
        started: Instant,
        next: Instant,
    },
}

/// Between two progress lines when stderr is not a terminal.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(total_bytes: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_bytes);
            let style = ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {msg} elapsed {elapsed}, {eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                total_bytes,
                started: Instant::now(),
                next: Instant::now() + PROGRESS_LINE_EVERY,
            }
        }
    }

    fn update(&mut self, bytes: u64, records: u64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(bytes);
                let secs = bar.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!(
                    "{records} records, {:.0} records/s,",
                    records as f64 / secs
                ));
            }
            Progress::Lines {
                total_bytes,
                started,
                next,
            } => {
                let now = Instant::now();
                if now < *next {
                    return;
                }
                *next = now + PROGRESS_LINE_EVERY;
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                let done = bytes as f64 / (*total_bytes).max(1) as f64;
                let left = if done > 0.0 {
                    secs * (1.0 - done) / done
                } else {
                    f64::NAN
                };
                eprintln!(
                    "replay: {:.0}% of the log, {records} records, {:.0} records/s, about {left:.0} s left",
                    done.min(1.0) * 100.0,
                    records as f64 / secs
                );
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
