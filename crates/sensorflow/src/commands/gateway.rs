//! `sensorflow gateway`: the MQTT ingest of embedded mode with Kafka in place of the log.
//!
//! Each accepted message becomes one record of the ingest topic (`kafka.topics.ingest`,
//! `imu-data-all`; key = sensor id, value = the ingest record), and a QoS 1 publish is
//! acknowledged only after Kafka acknowledged its record (`sensorflow_kafka::KafkaSink`). The
//! HTTP listener serves `/health`, `/ready` (Kafka reachable) and `/metrics`.
//!
//! Start order: HTTP first (so an orchestrator sees the process alive while Kafka is not yet
//! reachable), then the ingest topic is created if missing (retried until the cluster answers),
//! then the producer and the MQTT listener. Stop (SIGINT/SIGTERM): MQTT stops accepting and
//! waits for in-flight publishes to be acknowledged by Kafka, the producer flushes, HTTP stops.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use parking_lot::{Mutex, RwLock};
use rdkafka::producer::Producer as _;
use sensorflow_ingest::{IngestObserver, IngestServer, IngestStats};
use sensorflow_kafka::{KafkaSink, ProducerStats};
use sensorflow_protocol::BadReason;
use tokio::sync::watch;

use super::kafka_role::KafkaRoleArgs;
use super::shutdown_signal;
use crate::config::Config;
use crate::runtime::record_bad;

/// How often readiness asks the cluster for the ingest topic's metadata.
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long that request may take before Kafka counts as unreachable.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stop waits for queued records to be delivered after MQTT stopped.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub(crate) struct GatewayArgs {
    #[command(flatten)]
    common: KafkaRoleArgs,
    /// MQTT listener [default: 0.0.0.0:1883]; port 0 picks a free port.
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
}

impl GatewayArgs {
    fn load_config(&self) -> anyhow::Result<Config> {
        self.common.load_config(|config| {
            if let Some(a) = self.mqtt_listen {
                config.mqtt.listen = a;
            }
        })
    }
}

/// What the HTTP endpoints show; shared with ingest as its bad-input observer.
struct GatewayStatus {
    producer: OnceLock<Arc<ProducerStats>>,
    ingest: OnceLock<Arc<IngestStats>>,
    /// `Ok(detail)` when the last metadata request succeeded, `Err(reason)` otherwise.
    kafka: RwLock<Result<String, String>>,
    /// Bad input seen by ingest (unknown topics, oversize messages) by sensor ("" when
    /// unknown) and reason, bounded as in embedded mode (`status::record_bad`).
    bad: Mutex<HashMap<String, BTreeMap<BadReason, u64>>>,
    /// Bad input of sensors beyond the tracked ones.
    bad_untracked: AtomicU64,
}

impl IngestObserver for GatewayStatus {
    fn bad_input(&self, sensor_id: Option<&str>, reason: BadReason, detail: &str) {
        tracing::debug!(
            sensor_id,
            reason = reason.as_str(),
            detail,
            "bad input rejected by ingest"
        );
        if !record_bad(&mut self.bad.lock(), sensor_id.unwrap_or(""), reason) {
            self.bad_untracked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl GatewayStatus {
    fn ready(&self) -> (bool, serde_json::Value) {
        let kafka = self.kafka.read().clone();
        let fatal = self
            .producer
            .get()
            .is_some_and(|p| p.fatal.load(Ordering::Acquire));
        let mqtt = self.ingest.get().is_some();
        let kafka_ok = kafka.is_ok() && !fatal;
        let kafka_detail = match (&kafka, fatal) {
            (_, true) => "the producer hit a fatal error; restart the gateway".to_owned(),
            (Ok(d) | Err(d), false) => d.clone(),
        };
        let ready = kafka_ok && mqtt;
        let body = serde_json::json!({
            "ready": ready,
            "components": {
                "kafka": {"ok": kafka_ok, "detail": kafka_detail},
                "mqtt": {"ok": mqtt, "detail": if mqtt { "listening" } else { "not started" }},
            },
        });
        (ready, body)
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        if let Some(p) = self.producer.get() {
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            metric(
                "sensorflow_kafka_records_produced_total",
                "counter",
                "Records Kafka acknowledged.",
                get(&p.produced),
            );
            metric(
                "sensorflow_kafka_produce_errors_total",
                "counter",
                "Records Kafka did not acknowledge (delivery failed or refused).",
                get(&p.errors),
            );
            metric(
                "sensorflow_kafka_in_flight_records",
                "gauge",
                "Records handed to the producer and not yet acknowledged or failed.",
                get(&p.in_flight),
            );
            metric(
                "sensorflow_kafka_waiting_for_queue_records",
                "gauge",
                "Records waiting for room in the producer's queue.",
                get(&p.waiting_for_queue),
            );
            metric(
                "sensorflow_kafka_queue_full_total",
                "counter",
                "Times a record found the producer's queue full.",
                get(&p.queue_full),
            );
        }
        metric(
            "sensorflow_kafka_ready",
            "gauge",
            "1 when the last metadata request to Kafka succeeded.",
            u64::from(self.ready().0),
        );
        if let Some(i) = self.ingest.get().map(|s| s.snapshot()) {
            metric(
                "sensorflow_mqtt_connections",
                "gauge",
                "Open MQTT connections.",
                i.connections_current,
            );
            metric(
                "sensorflow_mqtt_connections_total",
                "counter",
                "MQTT connections accepted.",
                i.connections_total,
            );
            let _ = writeln!(
                out,
                "# HELP sensorflow_mqtt_publishes_total PUBLISH packets received by QoS.\n\
                 # TYPE sensorflow_mqtt_publishes_total counter"
            );
            for (qos, n) in i.received_by_qos.iter().enumerate() {
                let _ = writeln!(out, "sensorflow_mqtt_publishes_total{{qos=\"{qos}\"}} {n}");
            }
            let mut metric = |name: &str, help: &str, value: u64| {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            };
            metric(
                "sensorflow_mqtt_received_bytes_total",
                "Payload bytes received.",
                i.received_bytes,
            );
            metric(
                "sensorflow_mqtt_stored_total",
                "Messages acknowledged by Kafka.",
                i.stored,
            );
            metric(
                "sensorflow_mqtt_acked_total",
                "QoS 1/2 publishes acknowledged.",
                i.acked,
            );
            metric(
                "sensorflow_mqtt_nacked_total",
                "MQTT 5 publishes answered with an error code.",
                i.nacked,
            );
            metric(
                "sensorflow_mqtt_sink_rejected_total",
                "Publishes Kafka did not store.",
                i.rejected_by_sink,
            );
        }
        // The same families as embedded mode's /metrics.
        let bad = self.bad.lock();
        let _ = writeln!(
            out,
            "# HELP sensorflow_sensor_bad_input_total Bad input per sensor and reason.\n\
             # TYPE sensorflow_sensor_bad_input_total counter"
        );
        let mut sensors: Vec<_> = bad.iter().filter(|(id, _)| !id.is_empty()).collect();
        sensors.sort_by(|a, b| a.0.cmp(b.0));
        for (id, reasons) in sensors {
            let id = id
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            for (reason, n) in reasons {
                let _ = writeln!(
                    out,
                    "sensorflow_sensor_bad_input_total{{sensor_id=\"{id}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP sensorflow_ingest_rejected_total Messages rejected by ingest with no known sensor, by reason.\n\
             # TYPE sensorflow_ingest_rejected_total counter"
        );
        for (reason, n) in bad.get("").into_iter().flatten() {
            let _ = writeln!(
                out,
                "sensorflow_ingest_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP sensorflow_ingest_bad_input_untracked_total Bad input of sensors not tracked per sensor.\n\
             # TYPE sensorflow_ingest_bad_input_untracked_total counter\n\
             sensorflow_ingest_bad_input_untracked_total {}",
            self.bad_untracked.load(Ordering::Relaxed)
        );
        drop(bad);
        out
    }
}

fn router(status: Arc<GatewayStatus>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ready",
            get(|State(s): State<Arc<GatewayStatus>>| async move {
                let (ready, body) = s.ready();
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
            get(|State(s): State<Arc<GatewayStatus>>| async move {
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(axum::body::Body::from(s.metrics()))
                    .unwrap_or_default()
            }),
        )
        .with_state(status)
}

pub(crate) async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let config = args.load_config()?;
    // Security first, as in `run`: on a non-loopback MQTT address without a way for devices
    // to authenticate (and without auth.allow_anonymous) the gateway refuses to start. The
    // gateway has no TLS listener yet: TLS terminates at the load balancer in front of it.
    let mqtt_auth = crate::runtime::mqtt_policy(&config.auth, &[config.mqtt.listen], false)?;
    let status = Arc::new(GatewayStatus {
        producer: OnceLock::new(),
        ingest: OnceLock::new(),
        kafka: RwLock::new(Err("not connected yet".into())),
        bad: Mutex::new(HashMap::new()),
        bad_untracked: AtomicU64::new(0),
    });

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    tracing::info!("http listening on {http_addr}");
    let (http_stop, mut http_stop_rx) = watch::channel(false);
    let app = router(Arc::clone(&status));
    let http_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop_rx.wait_for(|stop| *stop).await;
            })
            .await
    });

    let topic = config.kafka.topics.ingest.clone();
    tokio::select! {
        created = ensure_topic(&config, &topic) => created?,
        () = shutdown_signal() => {
            let _ = http_stop.send(true);
            return Ok(());
        }
    }

    let sink = Arc::new(KafkaSink::start(&config.kafka).context("starting the kafka producer")?);
    let _ = status.producer.set(sink.stats());
    let probe = tokio::spawn(probe_readiness(
        sink.producer().clone(),
        topic.clone(),
        Arc::clone(&status),
    ));

    let ingest = IngestServer::start(
        sensorflow_ingest::IngestConfig {
            auth: mqtt_auth,
            ..config.ingest_config()?
        },
        Arc::clone(&sink) as Arc<dyn sensorflow_ingest::IngestSink>,
        Arc::clone(&status) as Arc<dyn IngestObserver>,
    )
    .await
    .context("starting MQTT ingest")?;
    let mqtt_addr = ingest.local_addr();
    let _ = status.ingest.set(ingest.stats_handle());
    tracing::info!(brokers = %config.kafka.brokers, %topic, "mqtt listening on {mqtt_addr}");

    // A fatal producer error (e.g. the idempotent producer fenced or out of sequence) leaves a
    // producer that can deliver nothing: stop with an error, so the supervisor starts a fresh
    // one, rather than refuse every publish while looking alive.
    let stats = sink.stats();
    let fatal = async move {
        while !stats.fatal.load(Ordering::Acquire) {
            tokio::time::sleep(READY_PROBE_INTERVAL).await;
        }
    };
    let failed = tokio::select! {
        () = shutdown_signal() => false,
        () = fatal => true,
    };
    tracing::info!("shutting down: stopping MQTT ingest");
    ingest.stop().await;
    let flush_sink = Arc::clone(&sink);
    match tokio::task::spawn_blocking(move || flush_sink.flush(FLUSH_TIMEOUT)).await? {
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "records still unacknowledged by kafka at stop"),
    }
    probe.abort();
    let _ = http_stop.send(true);
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!("HTTP connections did not close within 5 s"),
    }
    if failed {
        anyhow::bail!(
            "the kafka producer hit a fatal error (see the log above); restart the gateway"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Creates the ingest topic if missing, retrying while the cluster is unreachable.
async fn ensure_topic(config: &Config, topic: &str) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match sensorflow_kafka::ensure_topics(&config.kafka, &[topic]).await {
            Ok(created) => {
                for t in created {
                    tracing::info!(
                        topic = %t,
                        partitions = config.kafka.partitions,
                        replication_factor = config.kafka.replication_factor,
                        "kafka topic created"
                    );
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, brokers = %config.kafka.brokers, retry_in = ?backoff, "kafka not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("creating the kafka ingest topic"),
        }
    }
}

/// Asks the cluster for the ingest topic's metadata every second: readiness is whether the
/// last answer came back in time.
async fn probe_readiness(
    producer: rdkafka::producer::FutureProducer<sensorflow_kafka::producer::GatewayContext>,
    topic: String,
    status: Arc<GatewayStatus>,
) {
    let mut was_ok = None;
    loop {
        let (p, t) = (producer.clone(), topic.clone());
        let answer = tokio::task::spawn_blocking(move || {
            p.client().fetch_metadata(Some(&t), READY_PROBE_TIMEOUT)
        })
        .await;
        let state = match answer {
            Ok(Ok(md)) => {
                let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
                Ok(format!(
                    "{} broker(s), {partitions} partition(s) of {topic}",
                    md.brokers().len()
                ))
            }
            Ok(Err(e)) => Err(format!("metadata request failed: {e}")),
            Err(e) => Err(format!("metadata probe panicked: {e}")),
        };
        let ok = state.is_ok();
        if was_ok != Some(ok) {
            match &state {
                Ok(d) => tracing::info!(detail = %d, "kafka reachable"),
                Err(e) => tracing::warn!(error = %e, "kafka unreachable: not ready"),
            }
            was_ok = Some(ok);
        }
        *status.kafka.write() = state;
        tokio::time::sleep(READY_PROBE_INTERVAL).await;
    }
}
