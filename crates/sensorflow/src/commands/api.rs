//! `sensorflow api`: the REST API, WebSocket feeds and dashboard of embedded mode, fed from the
//! output topics of distributed mode instead of an in-process pipeline.
//!
//! Three consumers (`read_committed`, partitions assigned, no group joined, nothing committed):
//! `new-session-topic` and `sensor-data-aggregated` are read from the beginning into the sessions
//! table (every replica holds every session, so all answer the same `/sessions`, after restarts
//! too), and followed; samples, windows, gaps and late rows are read from their end on and feed
//! the live hub and the sensor table. Records read while catching up are history: they fill the
//! tables but do not reach WebSocket clients.
//!
//! Start order: HTTP first (`/health` answers, `/ready` is 503), then the output topics are
//! created if missing (retried while the cluster is unreachable), then the consumers; `/ready`
//! turns 200 once the sessions and aggregates topics were read up to the end offsets they had at
//! start, so a load balancer routes only to replicas that answer completely. Stop
//! (SIGINT/SIGTERM): the consumers stop, WebSockets close, HTTP drains.
//!
//! The api role runs no model: `GET`/`POST /model` answer 503.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sensorflow_api::{ApiState, Hub, HubConfig};
use sensorflow_kafka::KafkaConfig;
use sensorflow_kafka::api_feed::{FeedEvent, FeedReader, FeedStats, OutputTopic};
use tokio::sync::watch;

use super::kafka_role::KafkaRoleArgs;
use super::shutdown_signal;
use crate::runtime;

mod status;

use status::ApiStatus;

/// How often the sensor table's rates are refreshed.
const RATE_REFRESH: Duration = Duration::from_millis(500);
/// Longest wait between two attempts to reach the cluster.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// What `GET`/`POST /model` answer in this role.
const NO_MODEL: &str = "the api role runs no model, and model swaps in distributed mode are not \
                        implemented yet: swap the processors' model.path and restart them";

#[derive(Args, Debug)]
pub(crate) struct ApiArgs {
    #[command(flatten)]
    common: KafkaRoleArgs,
}

pub(crate) async fn run(args: ApiArgs) -> anyhow::Result<()> {
    let config = args.common.load_config(|_| ())?;
    // Security first, as in `run`: tokens and certificates that do not load stop the start.
    let tls = runtime::Tls::load(&config.tls)?.map(Arc::new);
    let tokens = runtime::api_tokens(&config.auth)?;

    let feed = Arc::new(FeedStats::default());
    let status = Arc::new(ApiStatus::new(
        config.kafka.topics.clone(),
        config.pipeline.max_sensors,
        Arc::clone(&feed),
    ));
    let hub = Hub::new(HubConfig {
        topic_capacity: config.http.ws_buffer_messages,
        ..HubConfig::default()
    });

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let https = if tls.is_some() { " (https)" } else { "" };
    tracing::info!("http listening on {http_addr}{https}");
    if let Some(tls) = &tls {
        tls.reload_on_sighup();
    }
    let state = ApiState::new(
        hub.clone(),
        Arc::clone(&status) as Arc<dyn sensorflow_api::StatusSource>,
        runtime::api_config(&config, http_addr, tokens, tls.as_deref()),
    )
    .without_model(NO_MODEL);
    let (http_stop, mut http_stop_rx) = watch::channel(false);
    let http_task = tokio::spawn(sensorflow_api::serve(listener, state, async move {
        let _ = http_stop_rx.wait_for(|stop| *stop).await;
    }));

    let refresh_status = Arc::clone(&status);
    let refresh = tokio::spawn(async move {
        let mut tick = tokio::time::interval(RATE_REFRESH);
        loop {
            tick.tick().await;
            refresh_status.refresh(Instant::now());
        }
    });
    let mut consume = tokio::spawn(consume(config.kafka.clone(), status, hub, feed));
    let failed = tokio::select! {
        () = shutdown_signal() => None,
        ended = &mut consume => Some(ended),
    };
    tracing::info!("shutting down: stopping the consumers");
    consume.abort();
    refresh.abort();
    let _ = http_stop.send(true);
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!("HTTP connections did not close within 5 s"),
    }
    if let Some(ended) = failed {
        ended?.context("reading the output topics")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Creates the output topics if missing, opens the three readers and applies what they read,
/// until the task is aborted. Returns only on an error no retry can fix (a refused
/// configuration).
async fn consume(
    kafka: KafkaConfig,
    status: Arc<ApiStatus>,
    hub: Hub,
    feed: Arc<FeedStats>,
) -> anyhow::Result<()> {
    let names: Vec<&str> = OutputTopic::ALL
        .iter()
        .map(|t| t.name(&kafka.topics))
        .collect();
    retry(&status, "creating the output topics", || async {
        sensorflow_kafka::ensure_topics(&kafka, &names).await
    })
    .await?;
    let kafka = Arc::new(kafka);
    let open = |topics: &'static [OutputTopic], from_beginning: bool| {
        let (kafka, feed) = (Arc::clone(&kafka), Arc::clone(&feed));
        move || {
            open_reader(
                Arc::clone(&kafka),
                topics,
                from_beginning,
                Arc::clone(&feed),
            )
        }
    };
    const SESSIONS: &[OutputTopic] = &[OutputTopic::Sessions];
    const AGGREGATES: &[OutputTopic] = &[OutputTopic::Aggregates];
    const LIVE: &[OutputTopic] = &[
        OutputTopic::Samples,
        OutputTopic::Windows,
        OutputTopic::Gaps,
        OutputTopic::Late,
    ];
    let sessions = retry(
        &status,
        "opening the sessions consumer",
        open(SESSIONS, true),
    )
    .await?;
    let aggregates = retry(
        &status,
        "opening the aggregates consumer",
        open(AGGREGATES, true),
    )
    .await?;
    let live = retry(&status, "opening the live consumer", open(LIVE, false)).await?;
    status.set_kafka(Ok(format!(
        "consuming {} topics (read_committed) from {}",
        OutputTopic::ALL.len(),
        kafka.brokers
    )));
    tracing::info!(brokers = %kafka.brokers, "consuming the output topics");
    tokio::join!(
        follow(sessions, Some(OutputTopic::Sessions), &status, &hub),
        follow(aggregates, Some(OutputTopic::Aggregates), &status, &hub),
        follow(live, None, &status, &hub),
    );
    Ok(())
}

/// Opens a reader of `topics` (one topic when `from_beginning`) on the blocking pool: it asks
/// the cluster for metadata and watermarks.
async fn open_reader(
    kafka: Arc<KafkaConfig>,
    topics: &'static [OutputTopic],
    from_beginning: bool,
    feed: Arc<FeedStats>,
) -> sensorflow_kafka::Result<FeedReader> {
    let opened = tokio::task::spawn_blocking(move || match (from_beginning, topics) {
        (true, [topic]) => FeedReader::from_beginning(&kafka, *topic, feed),
        _ => FeedReader::live(&kafka, topics, feed),
    })
    .await;
    match opened {
        Ok(reader) => reader,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(sensorflow_kafka::Error::Client {
            what: "consumer",
            source: rdkafka::error::KafkaError::Canceled,
        }),
    }
}

/// Applies what `reader` reads, forever; a from-beginning reader (`catching_up` names its
/// topic) reports its progress until it caught up.
async fn follow(
    mut reader: FeedReader,
    catching_up: Option<OutputTopic>,
    status: &ApiStatus,
    hub: &Hub,
) {
    if let Some(topic) = catching_up {
        status.catch_up(topic, reader.progress(), false);
    }
    let mut catching_up = catching_up;
    loop {
        match reader.next().await {
            FeedEvent::Record { record, live } => {
                status.apply(hub, record, live);
                if let Some(topic) = catching_up {
                    status.catch_up(topic, reader.progress(), false);
                }
            }
            FeedEvent::CaughtUp => {
                if let Some(topic) = catching_up.take() {
                    let progress = reader.progress();
                    tracing::info!(
                        topic = topic.key(),
                        partitions = progress.1,
                        "caught up with the end offsets at start"
                    );
                    status.catch_up(topic, progress, true);
                }
            }
        }
    }
}

/// Runs `attempt` until it succeeds or fails for good, backing off while the cluster is
/// unreachable; readiness shows why it waits.
async fn retry<T, F, Fut>(status: &ApiStatus, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sensorflow_kafka::Result<T>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "{what}: kafka not reachable yet");
                status.set_kafka(Err(format!("{what}: {e}")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e).context(what.to_owned()),
        }
    }
}
