//! Device simulator: virtual IMU sensors that publish over MQTT exactly like real devices.
//!
//! Used by `sensorflow simulate` (a separate process), by `sensorflow demo` (in-process,
//! against its own broker) and by `loadtest`.
//!
//! Layout
//! - [`motion`]: the deterministic synthetic motion each virtual sensor measures: the same
//!   generator the demo model was trained on.
//! - `publisher`: one task per MQTT connection. It paces its sensors on an absolute
//!   schedule, encodes their packets, publishes them and matches PUBACKs to packets.
//! - this module: the configuration ([`SimConfig`]), the spawn/handle API ([`Simulator`],
//!   [`SimHandle`]) and the counters every connection task adds to ([`SimStats`]).
//!
//! Sensors are spread over a few MQTT connections (default: one per sensor up to 64) so
//! thousands of sensors do not need thousands of sockets; to the platform each sensor is
//! still its own topic (`{prefix}/{sensor_id}`, or `sensors/{sensor_id}/data` for JSON).

pub(crate) mod motion;
mod publisher;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sensorflow_protocol::imu::MAX_SAMPLES_PER_PACKET;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub(crate) use motion::MotionGenerator;

/// Connections used when [`SimConfig::connections`] is `None`: one per sensor up to this.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Payload encoding of published packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PayloadFormat {
    /// Binary IMU packets (type 0x1E) on `{prefix}/{sensor_id}`.
    Binary,
    /// JSON packets in physical units on `sensors/{sensor_id}/data`.
    Json,
}

/// MQTT protocol version the simulated devices speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MqttVersion {
    /// MQTT 3.1.1.
    #[value(name = "3")]
    V3,
    /// MQTT 5.0.
    #[value(name = "5")]
    V5,
}

/// Quality of service of published packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Qos {
    /// Fire and forget: a packet counts as sent once written to the socket.
    #[value(name = "0")]
    AtMostOnce,
    /// Acknowledged: every packet is tracked until its PUBACK.
    #[value(name = "1")]
    AtLeastOnce,
}

/// A packet the broker acknowledged (QoS 1), reported through [`SimConfig::on_ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckedPacket {
    /// Sensor that published it.
    pub(crate) sensor_id: Arc<str>,
    /// Index of its first sample.
    pub(crate) base_sample_number: u32,
    /// Number of samples in it.
    pub(crate) samples: u16,
}

/// Everything a simulator run needs. [`Default`] gives the `sensorflow simulate` defaults.
#[derive(Debug, Clone)]
pub(crate) struct SimConfig {
    /// Broker host name or address.
    pub(crate) host: String,
    /// Broker port.
    pub(crate) port: u16,
    /// Number of virtual sensors.
    pub(crate) sensors: usize,
    /// Sample rate of every sensor, Hz.
    pub(crate) rate_hz: u32,
    /// Samples per published packet (1..=3276).
    pub(crate) samples_per_packet: u16,
    /// QoS of every publish.
    pub(crate) qos: Qos,
    /// Stop by itself after this long (packets scheduled later are not generated); `None`
    /// runs until the shutdown signal.
    pub(crate) duration: Option<Duration>,
    /// Topic prefix of binary packets: `{topic_prefix}/{sensor_id}`.
    pub(crate) topic_prefix: String,
    /// Payload encoding.
    pub(crate) format: PayloadFormat,
    /// Sensor ids are `{sensor_prefix}{index:04}`.
    pub(crate) sensor_prefix: String,
    /// Seed of every sensor's motion and of the first sample indices.
    pub(crate) seed: u64,
    /// MQTT protocol version.
    pub(crate) mqtt_version: MqttVersion,
    /// MQTT connections the sensors are spread over; `None` means
    /// min(sensors, [`DEFAULT_MAX_CONNECTIONS`]). Clamped to the number of sensors.
    pub(crate) connections: Option<usize>,
    /// Unacknowledged QoS 1 publishes allowed per connection.
    pub(crate) max_inflight: u16,
    /// On shutdown, how long to wait for queued packets to be sent and acknowledged before
    /// counting them as lost.
    pub(crate) drain_timeout: Duration,
    /// Receives every acknowledged packet (QoS 1), e.g. for a load test to check that each
    /// one reached the lake.
    pub(crate) on_ack: Option<mpsc::UnboundedSender<AckedPacket>>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 1883,
            sensors: 20,
            rate_hz: 200,
            samples_per_packet: 64,
            qos: Qos::AtLeastOnce,
            duration: None,
            topic_prefix: "stream".to_owned(),
            format: PayloadFormat::Binary,
            sensor_prefix: "sim-".to_owned(),
            seed: 0,
            mqtt_version: MqttVersion::V3,
            connections: None,
            max_inflight: 1000,
            drain_timeout: Duration::from_secs(10),
            on_ack: None,
        }
    }
}

/// The problems found in a [`SimConfig`], all of them at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid simulator configuration: {}", .problems.join("; "))]
pub(crate) struct SimConfigError {
    /// One sentence per problem.
    pub(crate) problems: Vec<String>,
}

impl SimConfig {
    /// Checks every field, reporting all problems together.
    pub(crate) fn validate(&self) -> Result<(), SimConfigError> {
        let mut problems = Vec::new();
        if self.host.is_empty() {
            problems.push("host must not be empty".to_owned());
        }
        if self.sensors == 0 {
            problems.push("sensors must be at least 1".to_owned());
        }
        if self.rate_hz == 0 || self.rate_hz > 1_000_000 {
            problems.push(format!(
                "rate must be in 1..=1000000 Hz, got {}",
                self.rate_hz
            ));
        }
        if !(1..=MAX_SAMPLES_PER_PACKET).contains(&self.samples_per_packet) {
            problems.push(format!(
                "samples per packet must be in 1..={MAX_SAMPLES_PER_PACKET}, got {}",
                self.samples_per_packet
            ));
        }
        if self.connections == Some(0) {
            problems.push("connections must be at least 1".to_owned());
        }
        if self.max_inflight == 0 {
            problems.push("max inflight must be at least 1".to_owned());
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) {
            problems.push(format!(
                "topic prefix must be non-empty without wildcards, got {:?}",
                self.topic_prefix
            ));
        }
        if self.sensor_prefix.contains(['/', '+', '#']) {
            problems.push(format!(
                "sensor prefix must not contain '/', '+' or '#', got {:?}",
                self.sensor_prefix
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SimConfigError { problems })
        }
    }

    /// Number of MQTT connections actually used.
    pub(crate) fn effective_connections(&self) -> usize {
        self.connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS)
            .clamp(1, self.sensors.max(1))
    }

    /// Id of sensor `index` (0-based): `{sensor_prefix}{index:04}`.
    pub(crate) fn sensor_id(&self, index: usize) -> String {
        format!("{}{index:04}", self.sensor_prefix)
    }

    /// Ids of all simulated sensors, in index order.
    #[allow(
        dead_code,
        reason = "API for loadtest, which checks every sensor's data"
    )]
    pub(crate) fn sensor_ids(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.sensors).map(|i| self.sensor_id(i))
    }

    /// Time between two packets of one sensor.
    pub(crate) fn packet_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.samples_per_packet)) / self.rate_hz.max(1)
    }
}

/// A snapshot of a run's counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct SimStats {
    /// Packets written to the broker connection.
    pub(crate) packets_sent: u64,
    /// Samples in those packets.
    pub(crate) samples_sent: u64,
    /// QoS 1 packets acknowledged by the broker (with a success reason code).
    pub(crate) packets_acked: u64,
    /// Samples in those packets.
    pub(crate) samples_acked: u64,
    /// Packets handed to the MQTT client but never acknowledged (QoS 1) or never written
    /// (QoS 0): dropped with a broken connection, or still pending when the drain timed out.
    pub(crate) packets_lost: u64,
    /// Connection failures, refused publishes and rejected PUBACKs.
    pub(crate) errors: u64,
    /// Packets generated more than one packet interval behind their schedule.
    pub(crate) lag_events: u64,
    /// Seconds since the simulator started (until it finished, once joined).
    pub(crate) duration_s: f64,
}

impl fmt::Display for SimStats {
    /// One log-friendly line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} acked={} lost={} errors={} lag_events={} samples_sent={} elapsed={:.1}s",
            self.packets_sent,
            self.packets_acked,
            self.packets_lost,
            self.errors,
            self.lag_events,
            self.samples_sent,
            self.duration_s
        )
    }
}

/// Counters shared by the connection tasks of one run.
#[derive(Debug, Default)]
struct Counters {
    packets_sent: AtomicU64,
    samples_sent: AtomicU64,
    packets_acked: AtomicU64,
    samples_acked: AtomicU64,
    packets_lost: AtomicU64,
    errors: AtomicU64,
    lag_events: AtomicU64,
    /// Set by the first connection that fails to connect, which alone logs it at warn level.
    connect_warned: AtomicBool,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        // Counters are independent tallies; no ordering with other memory is implied.
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self, elapsed: Duration) -> SimStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimStats {
            packets_sent: get(&self.packets_sent),
            samples_sent: get(&self.samples_sent),
            packets_acked: get(&self.packets_acked),
            samples_acked: get(&self.samples_acked),
            packets_lost: get(&self.packets_lost),
            errors: get(&self.errors),
            lag_events: get(&self.lag_events),
            duration_s: elapsed.as_secs_f64(),
        }
    }
}

/// Entry point: starts the virtual sensors of a [`SimConfig`].
#[derive(Debug)]
pub(crate) struct Simulator;

impl Simulator {
    /// Validates `config` and spawns one task per MQTT connection on the current tokio
    /// runtime (so it must be called inside one). The run ends after `config.duration`, or
    /// once `shutdown` turns `true` (or its sender is dropped); either way every connection
    /// then drains its queued packets (up to `config.drain_timeout`) and disconnects.
    /// Connection failures do not end the run: connections retry with a backoff and count
    /// errors.
    pub(crate) fn spawn(
        config: SimConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<SimHandle, SimConfigError> {
        config.validate()?;
        let traces = publisher::MotionTraces::generate(&config);
        let started = Instant::now();
        let counters = Arc::new(Counters::default());
        let plans = publisher::plan_connections(&config, &traces, started);
        let config = Arc::new(config);
        let tasks = plans
            .into_iter()
            .map(|plan| {
                let task = publisher::run_connection(
                    plan,
                    config.clone(),
                    counters.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(task)
            })
            .collect();
        Ok(SimHandle {
            probe: SimProbe { counters, started },
            tasks,
        })
    }
}

/// A cheap, cloneable reader of a running simulator's counters.
#[derive(Debug, Clone)]
pub(crate) struct SimProbe {
    counters: Arc<Counters>,
    started: Instant,
}

impl SimProbe {
    /// Counters now.
    pub(crate) fn stats(&self) -> SimStats {
        self.counters.snapshot(self.started.elapsed())
    }
}

/// A running simulator.
#[derive(Debug)]
pub(crate) struct SimHandle {
    probe: SimProbe,
    tasks: Vec<JoinHandle<()>>,
}

impl SimHandle {
    /// Counters now.
    #[allow(
        dead_code,
        reason = "API for demo/loadtest; `simulate` reads through a probe"
    )]
    pub(crate) fn stats(&self) -> SimStats {
        self.probe.stats()
    }

    /// A reader of the counters that outlives [`SimHandle::join`]'s consumption of the handle.
    pub(crate) fn probe(&self) -> SimProbe {
        self.probe.clone()
    }

    /// Waits until every connection has finished (see [`Simulator::spawn`] for when) and
    /// returns the final counters. A connection task that panicked counts as an error.
    pub(crate) async fn join(self) -> SimStats {
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "simulator connection task failed");
                Counters::add(&self.probe.counters.errors, 1);
            }
        }
        self.probe.stats()
    }
}
