//! Test fixtures: a gated fake sink, a recording observer, and MQTT 3.1.1 / 5 clients whose
//! events arrive on channels so tests can wait for them with timeouts.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use sensorflow_ingest::{IngestConfig, IngestObserver, IngestServer, IngestSink, SinkError};
use sensorflow_protocol::IngestRecord;
use sensorflow_protocol::framing::BadReason;
use tokio::sync::{Semaphore, mpsc, watch};

/// Generous bound for things that must happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// Bounded wait for things that must NOT happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// A sink that records appends; optionally holds each append until the gate gives a permit,
/// and optionally fails them.
pub struct FakeSink {
    records: Mutex<Vec<IngestRecord>>,
    calls: Mutex<Vec<IngestRecord>>,
    started: watch::Sender<usize>,
    stored: watch::Sender<usize>,
    gate: Option<Arc<Semaphore>>,
    fail: Mutex<Option<SinkError>>,
}

impl FakeSink {
    pub fn open() -> Arc<Self> {
        Arc::new(Self::new(None))
    }

    /// A sink whose appends wait for [`FakeSink::release`].
    pub fn gated() -> Arc<Self> {
        Arc::new(Self::new(Some(Arc::new(Semaphore::new(0)))))
    }

    fn new(gate: Option<Arc<Semaphore>>) -> Self {
        Self {
            records: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            started: watch::Sender::new(0),
            stored: watch::Sender::new(0),
            gate,
            fail: Mutex::new(None),
        }
    }

    pub fn fail_with(&self, err: SinkError) {
        *self.fail.lock() = Some(err);
    }

    /// Lets `n` pending or future appends complete.
    pub fn release(&self, n: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(n);
        }
    }

    /// Records whose append completed successfully, in completion order.
    pub fn records(&self) -> Vec<IngestRecord> {
        self.records.lock().clone()
    }

    /// Every record passed to `append`, in call order.
    pub fn calls(&self) -> Vec<IngestRecord> {
        self.calls.lock().clone()
    }

    pub fn started(&self) -> usize {
        *self.started.borrow()
    }

    pub async fn wait_started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|v| *v >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} appends never started (got {})", self.started()))
            .unwrap();
    }

    pub async fn wait_stored(&self, n: usize) {
        let mut rx = self.stored.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|v| *v >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} records never stored"))
            .unwrap();
    }

    /// Asserts that fewer than `n` appends start within [`QUIET`].
    pub async fn assert_started_below(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let reached = tokio::time::timeout(QUIET, rx.wait_for(|v| *v >= n)).await;
        assert!(
            reached.is_err(),
            "{} appends started, expected fewer than {n}",
            self.started()
        );
    }

    /// Asserts that the number of started appends stays at `n` for [`QUIET`].
    pub async fn assert_started_stays(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let moved = tokio::time::timeout(QUIET, rx.wait_for(|v| *v != n)).await;
        assert!(
            moved.is_err(),
            "expected {n} started appends, got {}",
            self.started()
        );
    }
}

/// The [`IngestSink`] handed to the server; shares state with the test's `FakeSink`.
struct SinkHandle(Arc<FakeSink>);

impl IngestSink for SinkHandle {
    fn append(&self, record: IngestRecord) -> BoxFuture<'static, Result<(), SinkError>> {
        let this = Arc::clone(&self.0);
        this.calls.lock().push(record.clone());
        this.started.send_modify(|n| *n += 1);
        Box::pin(async move {
            if let Some(gate) = &this.gate {
                gate.acquire().await.unwrap().forget();
            }
            if let Some(err) = this.fail.lock().clone() {
                return Err(err);
            }
            this.records.lock().push(record);
            this.stored.send_modify(|n| *n += 1);
            Ok(())
        })
    }
}

/// Records every bad-input report.
#[derive(Default)]
pub struct RecordingObserver {
    pub reports: Mutex<Vec<(Option<String>, BadReason, String)>>,
}

struct ObserverHandle(Arc<RecordingObserver>);

impl IngestObserver for ObserverHandle {
    fn bad_input(&self, sensor_id: Option<&str>, reason: BadReason, detail: &str) {
        self.0
            .reports
            .lock()
            .push((sensor_id.map(str::to_owned), reason, detail.to_owned()));
    }
}

pub fn local_config() -> IngestConfig {
    IngestConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..IngestConfig::default()
    }
}

pub async fn start(
    config: IngestConfig,
    sink: &Arc<FakeSink>,
) -> (IngestServer, Arc<RecordingObserver>) {
    let observer = Arc::new(RecordingObserver::default());
    let server = IngestServer::start(
        config,
        Arc::new(SinkHandle(Arc::clone(sink))),
        Arc::new(ObserverHandle(Arc::clone(&observer))),
    )
    .await
    .expect("server starts");
    (server, observer)
}

/// Waits for the first item on `rx` that `pick` maps to `Some`.
pub async fn next_matching<E: std::fmt::Debug, T>(
    rx: &mut mpsc::UnboundedReceiver<E>,
    what: &str,
    mut pick: impl FnMut(&E) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = rx.recv().await {
            if let Some(found) = pick(&event) {
                return Some(found);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(found)) => found,
        Ok(None) => panic!("event stream ended before {what}"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Asserts no item matching `pick` arrives on `rx` within [`QUIET`].
pub async fn assert_none_within_quiet<E: std::fmt::Debug>(
    rx: &mut mpsc::UnboundedReceiver<E>,
    what: &str,
    mut pick: impl FnMut(&E) -> bool,
) {
    let seen = tokio::time::timeout(QUIET, async {
        while let Some(event) = rx.recv().await {
            if pick(&event) {
                return Some(event);
            }
        }
        None
    })
    .await;
    if let Ok(Some(event)) = seen {
        panic!("unexpected {what}: {event:?}");
    }
}

pub mod v3 {
    use super::*;
    use rumqttc::{AsyncClient, Event, MqttOptions};

    /// An event from the v3 event loop, or the error that ended it.
    pub type Ev = Result<Event, String>;

    pub fn options(id: &str, addr: SocketAddr) -> MqttOptions {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        opts.set_inflight(200);
        opts
    }

    /// Connects and returns the client and a channel of its events (ends at the first error).
    pub fn connect(opts: MqttOptions) -> (AsyncClient, mpsc::UnboundedReceiver<Ev>) {
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err.to_string()));
                        return;
                    }
                }
            }
        });
        (client, rx)
    }
}

pub mod v5 {
    use super::*;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    /// An event from the v5 event loop, or the error that ended it.
    pub type Ev = Result<Event, String>;

    pub fn options(id: &str, addr: SocketAddr) -> MqttOptions {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(Some(1024 * 1024));
        opts
    }

    /// Connects and returns the client and a channel of its events (ends at the first error).
    pub fn connect(opts: MqttOptions) -> (AsyncClient, mpsc::UnboundedReceiver<Ev>) {
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err.to_string()));
                        return;
                    }
                }
            }
        });
        (client, rx)
    }
}

/// A byte-level MQTT 5 client for tests that must see exactly what the server wrote, in
/// order (rumqttc drops events that arrive in the same read as a DISCONNECT).
pub mod raw5 {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                return;
            }
        }
    }

    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        remaining_length(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    pub fn string(s: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// Connects with clean start and returns the stream after reading CONNACK.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut body = Vec::new();
        string("MQTT", &mut body);
        body.extend_from_slice(&[5, 0x02, 0, 60, 0]); // v5, clean start, keep-alive 60, no props
        string(client_id, &mut body);
        stream.write_all(&packet(0x10, &body)).await.unwrap();
        let (kind, _) = read_packet(&mut stream).await.expect("CONNACK");
        assert_eq!(kind >> 4, 2, "expected CONNACK");
        stream
    }

    pub async fn publish_qos1(stream: &mut TcpStream, topic: &str, packet_id: u16, payload: &[u8]) {
        stream
            .write_all(&encode_publish_qos1(topic, packet_id, payload))
            .await
            .unwrap();
    }

    /// The bytes of a QoS 1 PUBLISH without properties.
    pub fn encode_publish_qos1(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        string(topic, &mut body);
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.push(0); // no properties
        body.extend_from_slice(payload);
        packet(0x32, &body)
    }

    /// Next packet as (first byte, body), or `None` at EOF. Panics after [`WAIT`].
    pub async fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(WAIT, async {
            let mut first = [0u8; 1];
            if stream.read_exact(&mut first).await.is_err() {
                return None;
            }
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let mut b = [0u8; 1];
                stream.read_exact(&mut b).await.ok()?;
                len |= usize::from(b[0] & 0x7f) << shift;
                shift += 7;
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body).await.ok()?;
            Some((first[0], body))
        })
        .await
        .expect("timed out reading a packet")
    }
}
