//! [`IngestServer`]: runs ntex-mqtt on its own threads and controls it from tokio.
//!
//! # Threading
//!
//! ntex services are `!Send` (`Rc` everywhere) and expect an ntex `System`, so ntex-mqtt
//! cannot simply be polled from tasks of the application's multi-thread tokio runtime.
//! Two integrations were possible: (a) accept on tokio and drive each connection inside a
//! hand-made ntex system per thread, or (b) run ntex's own server. We use (b): one thread
//! (`sensorflow-mqtt`) runs an ntex `System` (tokio flavour, a current-thread runtime) that owns
//! the accept loop, and `workers` ntex worker threads serve the connections. It is the
//! configuration ntex-mqtt is built and tested for, and it keeps per-connection work off the
//! application's runtime. We bind the `std::net::TcpListener` ourselves (port 0 works and
//! [`IngestServer::local_addr`] is known before any client connects) and hand it to ntex.
//!
//! The bridge back to tokio is narrow: a sink append's future is awaited on the ntex worker
//! (whose System runs a tokio current-thread runtime, so tokio channels and timers work in
//! it), and the control handle (`ntex_server::net::Server`) is `Send`, with futures that can be
//! awaited from tokio.
//!
//! # Graceful stop
//!
//! [`IngestServer::stop`]: (1) pause the accept loop; (2) mark the core as draining: new
//! CONNECTs are refused and PUBLISHes arriving from now on are not appended (QoS 1/2 ones
//! are never acknowledged, so clients re-send them after reconnecting); (3) each connection's
//! closer task waits until that connection's in-flight appends have completed, so their
//! PUBACKs are written, then closes it (MQTT 5: DISCONNECT 0x8B server shutting down);
//! (4) once no connection is open, or after `shutdown_timeout`, stop the ntex server (its
//! ungraceful stop: the graceful one would only wait again for connections, and could hang)
//! and join its thread.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use ntex_mqtt::{MqttServer, MqttServiceConfig, QoS, v3, v5};
use ntex_service::cfg::SharedCfg;
use ntex_util::time::Seconds;

use crate::config::{ConfigError, IngestConfig};
use crate::core::{Conn, Core, ReadGate};
use crate::mqtt;
use crate::sink::{IngestObserver, IngestSink};
use crate::stats::{IngestStats, IngestStatsSnapshot};

/// Listen backlog of the MQTT socket.
const BACKLOG: i32 = 1024;

/// Why [`IngestServer::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen for mqtt on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// `start` was called outside a tokio runtime.
    #[error("IngestServer::start must be called from within a tokio runtime")]
    NoRuntime,
    /// The ntex server thread could not be started.
    #[error("cannot start the mqtt server: {0}")]
    Startup(io::Error),
}

type NtexServer = ntex_server::net::Server;

/// Handle of a running MQTT ingest listener. Dropping it without [`IngestServer::stop`] stops
/// the server abruptly (connections are closed without waiting for in-flight appends).
#[derive(Debug)]
pub struct IngestServer {
    core: Arc<Core>,
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    server: Option<NtexServer>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl IngestServer {
    /// Validates `config`, binds the listener and starts serving MQTT 3.1.1 and 5.0 clients.
    /// Returns once the listener accepts connections. Must be called within a tokio runtime,
    /// which then runs the sink's appends.
    pub async fn start(
        config: IngestConfig,
        sink: Arc<dyn IngestSink>,
        observer: Arc<dyn IngestObserver>,
    ) -> Result<IngestServer, IngestError> {
        config.validate()?;
        tokio::runtime::Handle::try_current().map_err(|_| IngestError::NoRuntime)?;
        let addr = config.listen;
        let listener = ntex_server::net::create_tcp_listener(addr, BACKLOG)
            .map_err(|source| IngestError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| IngestError::Bind { addr, source })?;
        let tls_listener = match &config.tls {
            Some(tls) => {
                let addr = tls.listen;
                let listener = ntex_server::net::create_tcp_listener(addr, BACKLOG)
                    .map_err(|source| IngestError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| IngestError::Bind { addr, source })?;
                Some((listener, bound))
            }
            None => None,
        };
        let tls_addr = tls_listener.as_ref().map(|(_, a)| *a);
        let core = Arc::new(Core::new(config, sink, observer));

        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread_core = Arc::clone(&core);
        let thread = std::thread::Builder::new()
            .name("sensorflow-mqtt".into())
            .spawn(move || {
                run_system(
                    thread_core,
                    listener,
                    tls_listener.map(|(l, _)| l),
                    ready_tx,
                )
            })
            .map_err(IngestError::Startup)?;
        let server = match ready_rx.await {
            Ok(Ok(server)) => server,
            Ok(Err(err)) => return Err(IngestError::Startup(err)),
            Err(_) => {
                return Err(IngestError::Startup(io::Error::other(
                    "mqtt server thread exited",
                )));
            }
        };
        tracing::debug!(%local_addr, workers = core.config.workers, "mqtt ingest started");
        Ok(IngestServer {
            core,
            local_addr,
            tls_addr,
            server: Some(server),
            thread: Some(thread),
        })
    }

    /// The address actually bound (the chosen port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the MQTT-over-TLS listener bound, if configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Current counters.
    pub fn stats(&self) -> IngestStatsSnapshot {
        self.core.stats.snapshot()
    }

    /// The live counters, for a metrics endpoint that outlives borrows of this handle
    /// (they stay readable after [`IngestServer::stop`]).
    pub fn stats_handle(&self) -> Arc<IngestStats> {
        Arc::clone(&self.core.stats)
    }

    /// Stops gracefully: stops accepting, lets in-flight appends finish so their PUBACKs go
    /// out, then closes every connection (bounded by `shutdown_timeout`). Publishes arriving
    /// during the stop are not stored and not acknowledged (counted as `dropped_on_shutdown`).
    pub async fn stop(mut self) {
        let Some(server) = self.server.take() else {
            return;
        };
        server.pause().await;
        self.core.begin_drain();
        let timeout = self.core.config.shutdown_timeout;
        if tokio::time::timeout(timeout, self.core.all_connections_closed())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "mqtt connections still open after shutdown_timeout; closing them"
            );
        }
        // Not ntex's graceful stop: the drain above already did what it is for (no connection
        // is open, or shutdown_timeout passed), and under load it sometimes never returned:
        // about one stop in 50-130 hung > 10 s in the manager's wait for the workers' stop
        // replies after every worker had logged that it stopped (ntex-server 4.1, seen in
        // CI and reproduced by looping the stop tests next to two busy `yes` processes;
        // 0 hangs in 400 such runs with `false`). Ungraceful stop tells the workers to shut
        // their (now idle) services down without waiting for their replies.
        server.stop(false).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::debug!(local_addr = %self.local_addr, "mqtt ingest stopped");
    }
}

impl Drop for IngestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // The command is sent now; the returned completion future is not needed.
            drop(server.stop(false));
        }
    }
}

/// Body of the `sensorflow-mqtt` thread: an ntex system running the server until stopped.
fn run_system(
    core: Arc<Core>,
    listener: std::net::TcpListener,
    tls_listener: Option<std::net::TcpListener>,
    ready: tokio::sync::oneshot::Sender<io::Result<NtexServer>>,
) {
    ntex_rt::System::build()
        .name("sensorflow-mqtt")
        .disable_signals()
        .build(ntex_net::DefaultRuntime)
        .block_on(async move {
            match build_server(core, listener, tls_listener) {
                Ok(server) => {
                    let _ = ready.send(Ok(server.clone()));
                    let _ = server.await;
                }
                Err(err) => {
                    let _ = ready.send(Err(err));
                }
            }
        });
}

/// The MQTT 3.1.1 + 5.0 service of one connection, for both listeners.
macro_rules! mqtt_service {
    ($core:expr) => {{
        let core3 = Arc::clone(&$core);
        let core5 = Arc::clone(&$core);
        MqttServer::new()
            .v3(
                v3::MqttServer::new(async |session: &v3::Session<Conn>, publish| {
                    mqtt::publish_v3(session, publish).await
                })
                .protocol(mqtt::protocol_v3)
                .control(mqtt::control_v3)
                .middleware(ReadGate)
                .build(async move |connect| mqtt::connect_v3(Arc::clone(&core3), connect).await),
            )
            .v5(
                v5::MqttServer::new(async |session: &v5::Session<Conn>, publish| {
                    mqtt::publish_v5(session, publish).await
                })
                .protocol(mqtt::protocol_v5)
                .control(mqtt::control_v5)
                .middleware(ReadGate)
                .build(async move |connect| mqtt::connect_v5(Arc::clone(&core5), connect).await),
            )
    }};
}

fn build_server(
    core: Arc<Core>,
    listener: std::net::TcpListener,
    tls_listener: Option<std::net::TcpListener>,
) -> io::Result<NtexServer> {
    let config = &core.config;
    let connect_timeout =
        Seconds(u16::try_from(config.connect_timeout.as_secs()).unwrap_or(u16::MAX));
    let mqtt_config = MqttServiceConfig::new()
        .set_max_qos(QoS::ExactlyOnce)
        .set_max_receive(config.receive_maximum)
        .set_max_receive_size(config.max_inflight_bytes)
        .set_connect_timeout(connect_timeout)
        .set_handshake_timeout(connect_timeout)
        // A silent client: the protocol version is read before CONNECT (default 5 s).
        .protocol_version_timeout(connect_timeout)
        // Checked against each packet's fixed header before its body is buffered: without it
        // a CONNECT or SUBSCRIBE declaring 256 MiB is buffered whole (validated to fit u32).
        .set_max_size(u32::try_from(config.max_packet_bytes()).unwrap_or(u32::MAX));
    let shared_cfg: SharedCfg = SharedCfg::new("sensorflow-mqtt").add(mqtt_config).into();
    let workers = config.workers;
    let tls = config.tls.as_ref().map(|t| Arc::clone(&t.server_config));

    let mut builder = ntex_server::net::build()
        .name("sensorflow-mqtt")
        .workers(workers)
        .disable_signals()
        .listen("mqtt", listener, shared_cfg.clone(), {
            let core = Arc::clone(&core);
            async move |_| {
                let core_err = Arc::clone(&core);
                let server = mqtt_service!(core);
                // A CONNECT that is too large fails the handshake, before any session exists
                // for the control service to see it: counted here.
                ntex_service::service(server).map_err(move |err| {
                    if let ntex_mqtt::MqttError::Connect(ntex_mqtt::MqttConnectError::Protocol(
                        proto,
                    )) = &err
                    {
                        mqtt::count_protocol_error(&core_err, proto);
                    }
                    err
                })
            }
        })?;
    if let (Some(listener), Some(tls)) = (tls_listener, tls) {
        builder = builder.listen("mqtts", listener, shared_cfg, async move |_| {
            let server = mqtt_service!(core);
            // A failed handshake ends that connection only; it is not an MQTT error.
            ntex_service::service(ntex_tls::rustls::TlsAcceptor::new(Arc::clone(&tls)))
                .map_err(|err| {
                    tracing::debug!(error = %err, "mqtts handshake failed");
                    ntex_mqtt::MqttError::Connect(ntex_mqtt::MqttConnectError::Disconnected(Some(
                        err,
                    )))
                })
                .and_then(server)
        })?;
    }
    let server = builder.run();
    Ok(server)
}
