//! Ingest alone, as a pure MQTT ingest peer for benchmarks: MQTT 3.1.1/5 → the durable log
//! (`batch` durability), PUBACK after the append, no pipeline behind it. Compare with Debian's
//! mosquitto under the same simulated devices (`scripts/bench_ingest.sh` runs both):
//!
//! ```text
//! cargo run --release -p sensorflow-ingest --example ingest_log_server -- 127.0.0.1:18884
//! sensorflow simulate --port 18884 --sensors 10000 --duration 10
//! ```
//!
//! The log lives in a temporary directory removed on exit; nothing reads it, so nothing holds
//! appends back. Runs until SIGINT or SIGTERM.

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use sensorflow_ingest::{IngestConfig, IngestServer, IngestSink, NoopObserver, SinkError};
use sensorflow_log::{Admission, Durability, Log, LogConfig, LogError};
use sensorflow_protocol::IngestRecord;

/// Appends each record to the log; the future resolves once it is durable. Admits on the
/// ingest thread when the log has room, as sensorflow's own sink does (which also keeps order
/// under backpressure; this benchmark sink just waits for room in the future).
struct LogAppend(Log);

impl IngestSink for LogAppend {
    fn append(&self, record: IngestRecord) -> BoxFuture<'static, Result<(), SinkError>> {
        let mut buf = Vec::with_capacity(record.encoded_len());
        if let Err(e) = record.try_encode(&mut buf) {
            return futures::future::ready(Err(SinkError::Rejected(e.to_string()))).boxed();
        }
        let unavailable = |e: LogError| SinkError::Unavailable(e.to_string());
        match self.0.try_admit(buf.into()) {
            Ok(Admission::Admitted(pending)) => {
                async move { pending.await.map(|_| ()).map_err(unavailable) }.boxed()
            }
            Ok(Admission::Full(payload)) => {
                let log = self.0.clone();
                async move { log.append(payload).await.map(|_| ()).map_err(unavailable) }.boxed()
            }
            Err(e) => futures::future::ready(Err(unavailable(e))).boxed(),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18884".into())
        .parse()?;
    let dir = tempfile::tempdir()?;
    let mut config = LogConfig::new(dir.path());
    config.durability = Durability::DEFAULT_BATCH;
    let (log, _) = Log::open(config)?;
    let server = IngestServer::start(
        IngestConfig {
            listen,
            ..IngestConfig::default()
        },
        Arc::new(LogAppend(log.clone())),
        Arc::new(NoopObserver),
    )
    .await?;
    println!("ingest listening on {}", server.local_addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    server.stop().await;
    let stats = log.stats();
    println!(
        "appended {} records, {} bytes, {} fsyncs",
        stats.appended_records, stats.appended_bytes, stats.fsyncs
    );
    log.close()?;
    Ok(())
}
