//! `sensorflow processor`: a member of the consumer group on the ingest topic, running the
//! pipeline for the partitions it owns and producing the output topics and the lake
//! exactly-once (`sensorflow_kafka::processor`). The HTTP listener serves `/health`, `/ready`
//! and `/metrics`.
//!
//! Start order: HTTP, then the topics (ingest, outputs, and the compacted state changelog with
//! as many partitions as the ingest topic), retried until the cluster answers, then the model,
//! then the group. Stop (SIGINT/SIGTERM): the open transaction commits and the processor leaves
//! the group, so its partitions move at once with their state.
//!
//! A watchdog thread exits the process with status [`STALLED_EXIT_CODE`] when the processor's
//! loop stays in one step longer than `kafka.processor.stall_timeout_ms` (see
//! `sensorflow_kafka::processor::Heartbeat`): a thread stuck inside librdkafka cannot be
//! interrupted, and a restart by the supervisor (Kubernetes, systemd) is what recovers it. The
//! open transaction is then aborted by the broker and the partitions resume from their
//! checkpoints, exactly as after a SIGKILL.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sensorflow_kafka::processor::CHANGELOG_TOPIC_CONFIGS;
use sensorflow_kafka::{ProcessorParams, ProcessorStats, TopicSpec};
use tokio::sync::watch;

use super::kafka_role::KafkaRoleArgs;
use super::shutdown_signal;
use crate::config::Config;
use crate::runtime::model_control::ModelLoader;

#[derive(Args, Debug)]
pub(crate) struct ProcessorArgs {
    #[command(flatten)]
    common: KafkaRoleArgs,
    /// Lake: a directory or s3://bucket/prefix (credentials, region and endpoint from the
    /// standard AWS_* variables) [default: lake.root, else DATA_DIR/lake]. Every processor of
    /// a group writes the same lake.
    #[arg(long, value_name = "URL")]
    lake: Option<String>,
    /// Directory for the model cache and the lake's staging files [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// ONNX model: a path, an http(s):// URL or s3://bucket/key [default: the bundled demo
    /// model].
    #[arg(long)]
    model: Option<String>,
}

impl ProcessorArgs {
    fn load_config(&self) -> anyhow::Result<Config> {
        self.common.load_config(|config| {
            if let Some(l) = &self.lake {
                config.lake.root = Some(PathBuf::from(l));
            }
            if let Some(d) = &self.data_dir {
                config.data_dir = d.clone();
            }
            if let Some(m) = &self.model {
                config.model.path = Some(m.clone());
            }
        })
    }
}

pub(crate) async fn run(args: ProcessorArgs) -> anyhow::Result<()> {
    let config = args.load_config()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let stats = Arc::new(ProcessorStats::default());

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", config.http.listen))?;
    tracing::info!("http listening on {}", listener.local_addr()?);
    let (http_stop, mut http_stop_rx) = watch::channel(false);
    let app = router(Arc::clone(&stats));
    let http_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop_rx.wait_for(|stop| *stop).await;
            })
            .await
    });

    tokio::select! {
        created = ensure_topics(&config) => created?,
        () = shutdown_signal() => {
            let _ = http_stop.send(true);
            return Ok(());
        }
    }

    let model = ModelLoader::new(&config)
        .load(config.model.path.as_deref(), None)
        .await
        .context("loading the model")?;
    let lake_location = config.lake_location()?;
    std::fs::create_dir_all(lake_location.local_root())
        .with_context(|| format!("creating {}", lake_location.local_root().display()))?;
    let params = ProcessorParams {
        kafka: config.kafka.clone(),
        pipeline: config.pipeline.clone(),
        models: model.models.clone(),
        lake: config.lake_config(lake_location),
        tick: Duration::from_millis(config.runtime.tick_ms),
        batch_records: config.runtime.batch_records,
    };
    tracing::info!(
        model_version = &*model.version,
        lake = %params.lake.root,
        group = %config.kafka.processor.group_id,
        "processor starting"
    );
    if config.kafka.processor.stall_timeout_ms > 0 {
        let timeout = Duration::from_millis(config.kafka.processor.stall_timeout_ms);
        let stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("processor-watchdog".into())
            .spawn(move || watchdog(&stats, timeout))
            .context("spawning the processor's watchdog")?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("processor".into())
            .spawn(move || sensorflow_kafka::processor::run(&params, &stats, &stop))
            .context("spawning the processor thread")?
    };
    shutdown_signal().await;
    tracing::info!("shutting down: committing and leaving the group");
    stop.store(true, Ordering::Release);
    tokio::task::spawn_blocking(move || worker.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the processor thread panicked"))?;
    let _ = http_stop.send(true);
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!("HTTP connections did not close within 5 s"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The exit status of a processor stopped by its watchdog (`EX_SOFTWARE`).
const STALLED_EXIT_CODE: i32 = 70;

/// Exits the process once the processor's loop has stayed in one step for `timeout`. Runs on a
/// thread of its own for the life of the process, through a clean stop too (a stop that hangs
/// in its last commit is a stall like any other); idle while the loop is not running (before
/// it starts, after it returned).
fn watchdog(stats: &ProcessorStats, timeout: Duration) {
    let period = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        std::thread::sleep(period);
        let Some((step, lasted)) = stats.heartbeat.current() else {
            continue;
        };
        if lasted >= timeout {
            tracing::error!(
                step,
                stalled_s = lasted.as_secs_f64(),
                "the processor is stuck: no progress while {step} for {:.1} s \
                 (kafka.processor.stall_timeout_ms); exiting with status {STALLED_EXIT_CODE} \
                 so that its supervisor restarts it",
                lasted.as_secs_f64()
            );
            std::process::exit(STALLED_EXIT_CODE);
        }
    }
}

/// Creates the ingest and output topics, then the changelog with as many partitions as the
/// ingest topic has (its partition `p` holds ingest partition `p`'s state); retried while the
/// cluster is unreachable.
async fn ensure_topics(config: &Config) -> anyhow::Result<()> {
    let k = &config.kafka;
    let t = &k.topics;
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let names = [
                &t.ingest,
                &t.transformed,
                &t.aggregated,
                &t.sessions,
                &t.windows,
                &t.gaps,
                &t.late,
            ];
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let mut created = sensorflow_kafka::ensure_topics(k, &names).await?;
            let partitions = ingest_partitions(config).await?;
            created.extend(
                sensorflow_kafka::ensure_topic_specs(
                    k,
                    &[TopicSpec {
                        name: &t.changelog,
                        partitions,
                        configs: CHANGELOG_TOPIC_CONFIGS,
                    }],
                )
                .await?,
            );
            Ok::<_, sensorflow_kafka::Error>(created)
        };
        match attempt.await {
            Ok(created) => {
                for topic in created {
                    tracing::info!(%topic, "kafka topic created");
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, brokers = %k.brokers, retry_in = ?backoff, "kafka not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("creating the kafka topics"),
        }
    }
}

/// The ingest topic's partition count, from the cluster's metadata.
async fn ingest_partitions(config: &Config) -> Result<i32, sensorflow_kafka::Error> {
    let k = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = ClientConfig::new();
        for (key, v) in k.client_properties(&[("group.id", "sensorflow-metadata")]) {
            client.set(key, v);
        }
        let consumer: BaseConsumer =
            client
                .create()
                .map_err(|source| sensorflow_kafka::Error::Client {
                    what: "metadata client",
                    source,
                })?;
        let md = consumer
            .fetch_metadata(Some(&k.topics.ingest), Duration::from_secs(10))
            .map_err(|source| sensorflow_kafka::Error::Request {
                what: "metadata",
                source,
            })?;
        let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
        i32::try_from(partitions)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(sensorflow_kafka::Error::Timeout {
                what: "waiting for the ingest topic's partitions",
            })
    })
    .await
    .unwrap_or(Err(sensorflow_kafka::Error::Processor(
        "the metadata task failed".into(),
    )))
}

fn ready(stats: &ProcessorStats) -> (bool, serde_json::Value) {
    let ready = stats.ready.load(Ordering::Acquire);
    let detail = stats.last_error.lock().clone().unwrap_or_else(|| {
        if ready {
            "member of the group, committing".into()
        } else {
            "joining the group".into()
        }
    });
    let (step, lasted) = stats.heartbeat.current().unzip();
    let body = serde_json::json!({
        "ready": ready,
        "components": {
            "processor": {
                "ok": ready,
                "detail": detail,
                "partitions": stats.partitions.load(Ordering::Relaxed),
                "step": step,
                "step_seconds": lasted.map(|d| d.as_secs_f64()),
            },
        },
    });
    (ready, body)
}

fn metrics(stats: &ProcessorStats) -> String {
    let mut out = String::new();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    for (name, kind, help, value) in [
        (
            "sensorflow_processor_records_total",
            "counter",
            "Ingest records processed (again after a rewind).",
            get(&stats.records),
        ),
        (
            "sensorflow_processor_samples_total",
            "counter",
            "Sample rows produced.",
            get(&stats.samples),
        ),
        (
            "sensorflow_processor_commits_total",
            "counter",
            "Kafka transactions committed.",
            get(&stats.commits),
        ),
        (
            "sensorflow_processor_aborts_total",
            "counter",
            "Kafka transactions aborted, each followed by a rewind to the last checkpoint.",
            get(&stats.aborts),
        ),
        (
            "sensorflow_processor_commit_seconds_total",
            "counter",
            "Time spent committing: lake files, state checkpoints, offsets and the transaction.",
            get(&stats.commit_micros) / 1e6,
        ),
        (
            "sensorflow_processor_lake_commit_seconds_total",
            "counter",
            "Of the commit time, committing lake files.",
            get(&stats.lake_commit_micros) / 1e6,
        ),
        (
            "sensorflow_processor_rewinds_total",
            "counter",
            "Rewinds of every owned partition to its last checkpoint (after an abort, a failed write or a failing step).",
            get(&stats.rewinds),
        ),
        (
            "sensorflow_processor_partitions",
            "gauge",
            "Ingest partitions owned.",
            get(&stats.partitions),
        ),
        (
            "sensorflow_processor_restores_total",
            "counter",
            "Partitions restored from the state changelog.",
            get(&stats.restores),
        ),
        (
            "sensorflow_processor_rebalances_total",
            "counter",
            "Consumer group rebalances.",
            get(&stats.rebalances),
        ),
        (
            "sensorflow_processor_corrupt_records_total",
            "counter",
            "Ingest records that did not decode.",
            get(&stats.corrupt_records),
        ),
        (
            "sensorflow_processor_dead_letters_total",
            "counter",
            "Records set aside into the quarantine table because they made a stage fail.",
            get(&stats.dead_letters),
        ),
        (
            "sensorflow_processor_restarts_total",
            "counter",
            "Restarts of the processor after a failure.",
            get(&stats.restarts),
        ),
        (
            "sensorflow_processor_lake_files_discarded_total",
            "counter",
            "Lake files deleted because their transaction never committed.",
            get(&stats.lake_files_discarded),
        ),
        (
            "sensorflow_processor_step_seconds",
            "gauge",
            "How long the processor's loop has been in its current step (the stall watchdog exits at kafka.processor.stall_timeout_ms).",
            stats
                .heartbeat
                .current()
                .map_or(0.0, |(_, lasted)| lasted.as_secs_f64()),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out
}

fn router(stats: Arc<ProcessorStats>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(|State(s): State<Arc<ProcessorStats>>| async move {
                let (ready, body) = ready(&s);
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, axum::Json(body)).into_response()
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<ProcessorStats>>| async move {
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(axum::body::Body::from(metrics(&s)))
                    .unwrap_or_default()
            }),
        )
        .with_state(stats)
}
