//! `sensorflow simulate`: virtual IMU sensors publishing to an MQTT broker.
//!
//! Thin CLI glue over [`crate::sim`]: parses flags (each also read from `SENSORFLOW_SIM_*`),
//! runs the simulator until `--duration` or Ctrl-C, logs progress every 5 s and the totals
//! at the end (optionally as one JSON object on stdout with `--json`).

use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::sim::{MqttVersion, PayloadFormat, Qos, SimConfig, SimStats, Simulator};

/// Interval of the progress log line.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Flags of `sensorflow simulate`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SimulateArgs {
    /// Broker host.
    #[arg(long, env = "SENSORFLOW_SIM_HOST", default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Broker port.
    #[arg(long, env = "SENSORFLOW_SIM_PORT", default_value_t = 1883)]
    pub(crate) port: u16,
    /// Number of virtual sensors.
    #[arg(long, env = "SENSORFLOW_SIM_SENSORS", default_value_t = 20)]
    pub(crate) sensors: usize,
    /// Sample rate of each sensor, Hz.
    #[arg(long, env = "SENSORFLOW_SIM_RATE", default_value_t = 200)]
    pub(crate) rate: u32,
    /// Samples per packet.
    #[arg(long, env = "SENSORFLOW_SIM_SAMPLES_PER_PACKET", default_value_t = 64)]
    pub(crate) samples_per_packet: u16,
    /// MQTT QoS of the publishes: 0 or 1.
    #[arg(long, env = "SENSORFLOW_SIM_QOS", value_enum, default_value = "1")]
    pub(crate) qos: Qos,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, env = "SENSORFLOW_SIM_DURATION", value_name = "SECS", value_parser = parse_secs)]
    pub(crate) duration: Option<Duration>,
    /// Topic prefix of binary packets (`{prefix}/{sensor_id}`).
    #[arg(long, env = "SENSORFLOW_SIM_PREFIX", default_value = "stream")]
    pub(crate) prefix: String,
    /// Payload format; json publishes to `sensors/{sensor_id}/data`.
    #[arg(
        long,
        env = "SENSORFLOW_SIM_FORMAT",
        value_enum,
        default_value = "binary"
    )]
    pub(crate) format: PayloadFormat,
    /// Prefix of the sensor ids (`sim-0000`, `sim-0001`, ...).
    #[arg(long, env = "SENSORFLOW_SIM_SENSOR_PREFIX", default_value = "sim-")]
    pub(crate) sensor_prefix: String,
    /// Seed of the synthetic motion and sample indices (default: random, logged).
    #[arg(long, env = "SENSORFLOW_SIM_SEED")]
    pub(crate) seed: Option<u64>,
    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[arg(
        long,
        env = "SENSORFLOW_SIM_MQTT_VERSION",
        value_enum,
        default_value = "3"
    )]
    pub(crate) mqtt_version: MqttVersion,
    /// MQTT connections the sensors are spread over (default: min(sensors, 64)).
    #[arg(long, env = "SENSORFLOW_SIM_CONNECTIONS")]
    pub(crate) connections: Option<usize>,
    /// Unacknowledged QoS 1 publishes allowed per connection.
    #[arg(long, env = "SENSORFLOW_SIM_MAX_INFLIGHT", default_value_t = 1000)]
    pub(crate) max_inflight: u16,
    /// Print the final summary as one JSON object on stdout.
    #[arg(long, env = "SENSORFLOW_SIM_JSON")]
    pub(crate) json: bool,
}

impl SimulateArgs {
    /// The simulator configuration these flags describe, with `seed` filled in.
    pub(crate) fn to_config(&self, seed: u64) -> SimConfig {
        SimConfig {
            host: self.host.clone(),
            port: self.port,
            sensors: self.sensors,
            rate_hz: self.rate,
            samples_per_packet: self.samples_per_packet,
            qos: self.qos,
            duration: self.duration,
            topic_prefix: self.prefix.clone(),
            format: self.format,
            sensor_prefix: self.sensor_prefix.clone(),
            seed,
            mqtt_version: self.mqtt_version,
            connections: self.connections,
            max_inflight: self.max_inflight,
            ..SimConfig::default()
        }
    }
}

fn parse_secs(value: &str) -> Result<Duration, String> {
    let secs: f64 = value.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{e}"))
}

/// Runs the simulator until `--duration` elapses or Ctrl-C (a second Ctrl-C stops without
/// waiting for outstanding acknowledgements). Fails on invalid flags, or if connections
/// failed and not a single packet was sent (typically: no broker at `--host:--port`).
pub(crate) async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let config = args.to_config(seed);
    tracing::info!(
        sensors = config.sensors,
        connections = config.effective_connections(),
        rate_hz = config.rate_hz,
        samples_per_packet = config.samples_per_packet,
        qos = ?config.qos,
        format = ?config.format,
        seed,
        broker = %format!("{}:{}", config.host, config.port),
        "simulating sensors"
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let handle = Simulator::spawn(config, shutdown_rx).context("cannot start the simulator")?;
    let probe = handle.probe();
    let join = handle.join();
    tokio::pin!(join);

    let mut report = tokio::time::interval_at(
        tokio::time::Instant::now() + REPORT_INTERVAL,
        REPORT_INTERVAL,
    );
    let mut previous = probe.stats();
    let mut signals = ShutdownSignals::new().context("cannot listen for shutdown signals")?;
    let mut interrupted = false;
    let stats = loop {
        tokio::select! {
            stats = &mut join => break stats,
            _ = report.tick() => {
                let now = probe.stats();
                log_progress(&previous, &now);
                previous = now;
            }
            signal = signals.recv() => {
                signal.context("cannot listen for shutdown signals")?;
                if interrupted {
                    tracing::warn!("second interrupt: stopping without waiting for acknowledgements");
                    break probe.stats();
                }
                tracing::info!("interrupted: draining outstanding packets (interrupt again to stop now)");
                interrupted = true;
                // The receivers live in the connection tasks; if they are gone, so is the work.
                let _ = shutdown_tx.send(true);
            }
        }
    };

    if stats.packets_lost > 0 || stats.errors > 0 {
        tracing::warn!(%stats, "simulation finished with losses or errors");
    } else {
        tracing::info!(%stats, "simulation finished");
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&stats).context("cannot encode the summary")?
        );
    }
    if stats.packets_sent == 0 && stats.errors > 0 {
        anyhow::bail!(
            "no packet could be sent to {}:{} (is the broker running?)",
            args.host,
            args.port
        );
    }
    Ok(())
}

fn log_progress(previous: &SimStats, now: &SimStats) {
    let secs = (now.duration_s - previous.duration_s).max(f64::EPSILON);
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / secs;
    tracing::info!(
        stats = %now,
        packets_per_s = format!("{:.0}", rate(previous.packets_sent, now.packets_sent)),
        samples_per_s = format!("{:.0}", rate(previous.samples_sent, now.samples_sent)),
        acks_per_s = format!("{:.0}", rate(previous.packets_acked, now.packets_acked)),
        "simulator progress"
    );
}

/// Ctrl-C, and SIGTERM on Unix, listened to for the whole run so none is missed between
/// two waits.
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves at the next signal.
    async fn recv(&mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Ok(()),
                _ = self.terminate.recv() => Ok(()),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await
        }
    }
}
