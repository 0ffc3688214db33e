//! One MQTT connection's worth of virtual sensors: pacing, encoding, publishing, acks.
//!
//! Each connection task owns its sensors, one rumqttc client and its event loop, and runs a
//! single `select!` loop. Keeping generation and event-loop polling in one task is what makes
//! PUBACKs attributable to packets: rumqttc reports `Outgoing::Publish(pkid)` for requests in
//! the order they were queued, so the front of our `queued` list is always the packet that
//! just got its packet id, and a PUBACK for that id acknowledges it. It also makes losses
//! exact: when a live connection breaks, rumqttc drops every queued and in-flight publish
//! (clean session), and since nothing was queued concurrently, exactly our `queued` and
//! `in_flight` packets are lost.
//!
//! The event-loop future is never cancelled mid-flight (a cancelled `poll()` can lose a
//! publish it had already dequeued): it is pinned across loop iterations and replaced only
//! after it completes.
//!
//! Pacing: a connection with m sensors ticks every packet interval / m on an absolute
//! schedule, one sensor per tick, round robin, so a sensor publishes once per packet interval
//! and a connection's traffic is spread evenly. Behind schedule, ticks burst to catch up; a
//! packet generated more than one interval late is a lag event. When the broker withholds
//! acks, the in-flight window and then our bounded queue fill up and generation pauses (the
//! device "buffers"); timestamps stay on schedule, so the data are unaffected.
//!
//! Motion is replayed, not synthesised per packet. At start-up the simulator generates
//! [`TRACE_SECS`] of motion for each of up to [`MAX_TRACES`] seeds, quantised to the wire's raw
//! units; each sensor loops one of those traces from its own phase (sensors sharing a trace
//! start [`TRACE_SECS`] / sharers apart, at least a second at 5,000 sensors), while its
//! sample indices, timestamps and CRCs are its own. Synthesising every sample (noise draws,
//! rotors, quantisation) cost a quarter of the load generator's CPU at 4,500 sensors, CPU
//! that a load test on the platform's own machine takes from the platform. With up to
//! `MAX_TRACES` sensors, a run shorter than `TRACE_SECS` sends exactly the samples the
//! per-sensor generators would (quantised as before); a sensor's motion jumps once per loop.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use sensorflow_protocol::imu::{PhysSample, RawSample, encode_packet};
use sensorflow_protocol::json::{JsonPacket, encode_json_packet};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::{AckedPacket, Counters, MotionGenerator, MqttVersion, PayloadFormat, Qos, SimConfig};

/// Seconds of motion in one replayed trace.
const TRACE_SECS: usize = 30;
/// Distinct motion traces at most; beyond this many sensors, sensors share traces.
const MAX_TRACES: usize = 256;
/// Samples in all traces together at most (20 bytes each); only very high rates shorten
/// the traces below `TRACE_SECS`.
const MAX_TRACE_SAMPLES: usize = 1 << 21;

/// Distinguishes simulators started by one process, so their client ids never collide.
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// Largest MQTT packet either side may send (JSON packets of many samples are big).
const MAX_MQTT_PACKET_BYTES: usize = 1 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Packets per sensor a connection may queue beyond the in-flight window before it pauses
/// generation: about 1.3 s of data at the default rate and packet size.
const QUEUED_PACKETS_PER_SENSOR: usize = 4;

/// What one connection task is given to run.
#[derive(Debug)]
pub(super) struct ConnectionPlan {
    index: usize,
    client_id: String,
    source: PacketSource,
    /// Instant of the first tick; later ticks follow every `tick`.
    first_tick: Instant,
    tick: Duration,
    /// Ticks scheduled after this are not generated.
    end: Option<Instant>,
}

/// Splits the sensors of `config` into contiguous, balanced groups, one per connection, and
/// fixes their schedule relative to `started`.
///
/// A packet published at instant T carries the samples measured during the interval before
/// it, so its `timestamp_us` (its first sample) is the wall clock of T minus one interval.
/// The first packets go out one interval after the start, staggered across the interval.
pub(super) fn plan_connections(
    config: &SimConfig,
    traces: &MotionTraces,
    started: std::time::Instant,
) -> Vec<ConnectionPlan> {
    let started_wall_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let started = Instant::from_std(started);
    let instance = INSTANCE.fetch_add(1, Ordering::Relaxed);
    let interval = config.packet_interval();
    let connections = config.effective_connections();
    let end = config.duration.map(|d| started + d);

    (0..connections)
        .map(|c| {
            let first_sensor = c * config.sensors / connections;
            let last_sensor = (c + 1) * config.sensors / connections;
            let m = u32::try_from(last_sensor - first_sensor)
                .unwrap_or(u32::MAX)
                .max(1);
            let tick = interval / m;
            // Offset connections by a fraction of a tick so they do not all fire together.
            let stagger = tick.mul_f64(c as f64 / connections as f64);
            let first_tick = started + interval + stagger;
            let sensors = (first_sensor..last_sensor)
                .zip(0u32..)
                .map(|(index, slot)| {
                    let first_publish = first_tick + tick * slot;
                    let first_timestamp_us = started_wall_us
                        + duration_micros((first_publish - started).saturating_sub(interval));
                    VirtualSensor::new(config, index, first_timestamp_us, traces)
                })
                .collect();
            ConnectionPlan {
                index: c,
                client_id: format!("sensorflow-sim-{}-{instance}-{c}", std::process::id()),
                source: PacketSource::new(config, sensors),
                first_tick,
                tick,
                end,
            }
        })
        .collect()
}

/// Runs one connection until its sensors are done: see the module docs.
pub(super) async fn run_connection(
    plan: ConnectionPlan,
    config: Arc<SimConfig>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
) {
    let capacity = (QUEUED_PACKETS_PER_SENSOR * plan.source.sensors.len()).max(16);
    let (client, mut link) = connect(&plan.client_id, &config, capacity);
    let mut ticks = tokio::time::interval_at(plan.first_tick, plan.tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut conn = Connection {
        index: plan.index,
        source: plan.source,
        end: plan.end,
        interval: config.packet_interval(),
        config,
        counters,
        client,
        capacity,
        queued: VecDeque::with_capacity(capacity),
        in_flight: HashMap::new(),
        connected: false,
        failures: 0,
        backoff: None,
        phase: Phase::Running,
        drain_deadline: Instant::now(),
    };
    if *shutdown.borrow_and_update() {
        conn.begin_drain();
    }
    // Both timers live across the loop: a `sleep_until` built inside `select!` would register
    // and drop a timer on every tick and event (tens of thousands a second at 5,000 sensors).
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let end_timer = tokio::time::sleep_until(conn.end.unwrap_or(far));
    let drain_timer = tokio::time::sleep_until(far);
    tokio::pin!(end_timer, drain_timer);

    while conn.phase != Phase::Done {
        let backoff = conn.backoff.take();
        let poll = async {
            if let Some(backoff) = backoff {
                tokio::time::sleep(backoff).await;
            }
            link.next().await
        };
        tokio::pin!(poll);
        let event = loop {
            if matches!(conn.phase, Phase::Draining | Phase::Closing)
                && drain_timer.deadline() != conn.drain_deadline
            {
                drain_timer.as_mut().reset(conn.drain_deadline);
            }
            tokio::select! {
                biased;
                event = &mut poll => break Some(event),
                changed = shutdown.changed(), if conn.phase == Phase::Running => {
                    // A dropped sender also means stop.
                    if changed.is_err() || *shutdown.borrow() {
                        conn.begin_drain();
                    }
                }
                () = &mut drain_timer,
                    if matches!(conn.phase, Phase::Draining | Phase::Closing) => conn.give_up(),
                scheduled = ticks.tick(), if conn.can_generate() => conn.on_tick(scheduled),
                // Ticks up to the end come first (above); this fires when generation is
                // paused by backpressure and no tick would notice the end.
                () = &mut end_timer,
                    if conn.phase == Phase::Running && conn.end.is_some() => conn.begin_drain(),
            }
            if conn.phase == Phase::Done {
                break None;
            }
        };
        if let Some(event) = event {
            conn.on_event(event);
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Generating and publishing on schedule.
    Running,
    /// Stopped generating; waiting for queued packets to be sent (and acked, QoS 1).
    Draining,
    /// DISCONNECT requested; waiting for it to go out.
    Closing,
    Done,
}

/// Identity of a published packet, kept until it is sent (and acked, QoS 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PacketMeta {
    /// Index into the connection's sensors.
    sensor: usize,
    base_sample_number: u32,
    samples: u16,
}

struct Connection {
    index: usize,
    config: Arc<SimConfig>,
    counters: Arc<Counters>,
    source: PacketSource,
    client: Client,
    end: Option<Instant>,
    interval: Duration,
    /// Most packets `queued` may hold; beyond it generation pauses.
    capacity: usize,
    /// Handed to the client, not yet written, in order.
    queued: VecDeque<PacketMeta>,
    /// Written with QoS 1, awaiting PUBACK, by packet id.
    in_flight: HashMap<u16, PacketMeta>,
    connected: bool,
    /// Consecutive connection failures.
    failures: u32,
    /// Wait before the next connection attempt.
    backoff: Option<Duration>,
    phase: Phase,
    drain_deadline: Instant,
}

impl Connection {
    fn can_generate(&self) -> bool {
        self.phase == Phase::Running && self.queued.len() < self.capacity
    }

    /// Generates and publishes the packet of the next sensor in turn, due at `scheduled`.
    fn on_tick(&mut self, scheduled: Instant) {
        if self.end.is_some_and(|end| scheduled > end) {
            self.begin_drain();
            return;
        }
        if scheduled.elapsed() > self.interval {
            Counters::add(&self.counters.lag_events, 1);
        }
        let packet = self.source.next_packet();
        let topic = self.source.sensors[packet.meta.sensor].topic.clone();
        match self
            .client
            .try_publish(topic, self.config.qos, packet.payload)
        {
            Ok(()) => self.queued.push_back(packet.meta),
            Err(error) => {
                tracing::warn!(connection = self.index, %error, "simulator could not queue a publish");
                Counters::add(&self.counters.errors, 1);
                Counters::add(&self.counters.packets_lost, 1);
            }
        }
    }

    fn on_event(&mut self, event: Result<LinkEvent, String>) {
        match event {
            Ok(LinkEvent::Connected) => {
                if self.failures > 0 {
                    tracing::info!(
                        connection = self.index,
                        "simulator connection re-established"
                    );
                }
                tracing::debug!(connection = self.index, "simulator connected");
                self.connected = true;
                self.failures = 0;
            }
            Ok(LinkEvent::Sent { pkid }) => {
                let Some(meta) = self.queued.pop_front() else {
                    tracing::debug!(
                        connection = self.index,
                        pkid,
                        "publish sent that was not queued"
                    );
                    return;
                };
                Counters::add(&self.counters.packets_sent, 1);
                Counters::add(&self.counters.samples_sent, u64::from(meta.samples));
                if self.config.qos == Qos::AtLeastOnce {
                    self.in_flight.insert(pkid, meta);
                }
            }
            Ok(LinkEvent::Acked { pkid, accepted }) => {
                let Some(meta) = self.in_flight.remove(&pkid) else {
                    tracing::debug!(
                        connection = self.index,
                        pkid,
                        "PUBACK for no packet in flight"
                    );
                    return;
                };
                if accepted {
                    Counters::add(&self.counters.packets_acked, 1);
                    Counters::add(&self.counters.samples_acked, u64::from(meta.samples));
                    if let Some(on_ack) = &self.config.on_ack {
                        // A dropped receiver just means nobody is listening any more.
                        let _ = on_ack.send(AckedPacket {
                            sensor_id: self.source.sensors[meta.sensor].id.clone(),
                            base_sample_number: meta.base_sample_number,
                            samples: meta.samples,
                        });
                    }
                } else {
                    Counters::add(&self.counters.errors, 1);
                    Counters::add(&self.counters.packets_lost, 1);
                }
            }
            Ok(LinkEvent::Disconnected) => {
                if self.phase == Phase::Closing {
                    self.phase = Phase::Done;
                }
            }
            Ok(LinkEvent::Other) => {}
            Err(error) => self.on_connection_error(&error),
        }
        self.finish_drain_if_idle();
    }

    fn on_connection_error(&mut self, error: &str) {
        Counters::add(&self.counters.errors, 1);
        if self.connected {
            // rumqttc dropped everything queued or in flight (clean session).
            let lost = self.queued.len() + self.in_flight.len();
            self.queued.clear();
            self.in_flight.clear();
            Counters::add(&self.counters.packets_lost, lost as u64);
            tracing::warn!(
                connection = self.index,
                error,
                lost,
                "simulator connection lost"
            );
        } else if self.failures == 0 && !self.counters.connect_warned.swap(true, Ordering::Relaxed)
        {
            // Once per run: with many connections to a dead broker, one line says it all.
            tracing::warn!(
                connection = self.index,
                error,
                "simulator cannot connect; retrying"
            );
        } else {
            tracing::debug!(
                connection = self.index,
                error,
                "simulator connection attempt failed"
            );
        }
        self.connected = false;
        self.failures = self.failures.saturating_add(1);
        self.backoff = Some(
            MIN_BACKOFF
                .saturating_mul(1 << self.failures.min(5))
                .min(MAX_BACKOFF),
        );
        if self.phase != Phase::Running {
            self.give_up();
        }
    }

    /// Stops generating; queued packets still go out.
    fn begin_drain(&mut self) {
        self.phase = Phase::Draining;
        self.drain_deadline = Instant::now() + self.config.drain_timeout;
        self.finish_drain_if_idle();
    }

    /// Once draining and nothing is outstanding, disconnects cleanly.
    fn finish_drain_if_idle(&mut self) {
        if self.phase != Phase::Draining {
            return;
        }
        if !self.connected {
            // No broker to drain to; waiting would only delay shutdown.
            self.give_up();
            return;
        }
        let awaiting_acks = self.config.qos == Qos::AtLeastOnce && !self.in_flight.is_empty();
        if self.queued.is_empty() && !awaiting_acks {
            self.phase = match self.client.try_disconnect() {
                Ok(()) => Phase::Closing,
                Err(_) => Phase::Done,
            };
        }
    }

    /// Ends the connection, counting what never made it as lost.
    fn give_up(&mut self) {
        let lost = self.queued.len() + self.in_flight.len();
        if lost > 0 {
            tracing::debug!(
                connection = self.index,
                lost,
                "simulator stopped with packets unacknowledged"
            );
            Counters::add(&self.counters.packets_lost, lost as u64);
        }
        self.queued.clear();
        self.in_flight.clear();
        self.phase = Phase::Done;
    }
}

/// The motion the virtual sensors replay: see the module docs.
#[derive(Debug)]
pub(super) struct MotionTraces {
    traces: Vec<Arc<[RawSample]>>,
    /// Sensors that share each trace (the most any trace has).
    sharers: usize,
}

impl MotionTraces {
    /// Synthesises the traces (tens of ms for hundreds of sensors): before the run's clock
    /// starts, so the first packets are not already late.
    pub(super) fn generate(config: &SimConfig) -> Self {
        let count = config.sensors.clamp(1, MAX_TRACES);
        let len = (TRACE_SECS * config.rate_hz.max(1) as usize).min(MAX_TRACE_SAMPLES / count);
        let traces = (0..count as u64)
            .map(|k| {
                let mut motion =
                    MotionGenerator::new(mix(config.seed, 2 * k), f64::from(config.rate_hz));
                (0..len)
                    .map(|_| RawSample::from_physical(&motion.next_sample()))
                    .collect()
            })
            .collect();
        Self {
            traces,
            sharers: config.sensors.div_ceil(count).max(1),
        }
    }

    /// The trace of sensor `index` and the phase it starts at.
    fn for_sensor(&self, index: usize) -> (Arc<[RawSample]>, usize) {
        let trace = &self.traces[index % self.traces.len()];
        let sharer = index / self.traces.len() % self.sharers;
        (trace.clone(), sharer * trace.len() / self.sharers)
    }
}

/// One virtual device.
#[derive(Debug)]
struct VirtualSensor {
    id: Arc<str>,
    topic: String,
    /// The motion it replays (never empty) and the position of its next sample in it.
    trace: Arc<[RawSample]>,
    cursor: usize,
    /// Sample index of its first sample.
    base_sample_number: u32,
    /// Packets generated so far.
    packets: u64,
    /// Timestamp of its first sample, µs since the Unix epoch.
    first_timestamp_us: u64,
}

impl VirtualSensor {
    fn new(
        config: &SimConfig,
        index: usize,
        first_timestamp_us: u64,
        traces: &MotionTraces,
    ) -> Self {
        let id = config.sensor_id(index);
        let topic = match config.format {
            PayloadFormat::Binary => format!("{}/{id}", config.topic_prefix),
            PayloadFormat::Json => format!("sensors/{id}/data"),
        };
        let (trace, cursor) = traces.for_sensor(index);
        let index = index as u64;
        Self {
            trace,
            cursor,
            // Below 2^30, so the index does not wrap for years at any sane rate.
            base_sample_number: (mix(config.seed, 2 * index + 1) >> 34) as u32,
            id: id.into(),
            topic,
            packets: 0,
            first_timestamp_us,
        }
    }

    /// Appends its next `n` samples to `out`, looping over its trace.
    fn replay(&mut self, n: usize, out: &mut Vec<RawSample>) {
        let mut left = n;
        while left > 0 {
            let take = left.min(self.trace.len() - self.cursor);
            out.extend_from_slice(&self.trace[self.cursor..self.cursor + take]);
            self.cursor = (self.cursor + take) % self.trace.len();
            left -= take;
        }
    }
}

/// SplitMix64 of `seed` and `stream`: independent-looking seeds for each sensor.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// An encoded packet ready to publish.
#[derive(Debug)]
struct Packet {
    payload: Vec<u8>,
    meta: PacketMeta,
}

/// A connection's sensors and the buffers reused to encode their packets.
#[derive(Debug)]
struct PacketSource {
    sensors: Vec<VirtualSensor>,
    format: PayloadFormat,
    rate_hz: u64,
    samples_per_packet: u16,
    /// Whose turn is next.
    next: usize,
    physical: Vec<PhysSample>,
    raw: Vec<RawSample>,
}

impl PacketSource {
    fn new(config: &SimConfig, sensors: Vec<VirtualSensor>) -> Self {
        let n = usize::from(config.samples_per_packet);
        Self {
            sensors,
            format: config.format,
            rate_hz: u64::from(config.rate_hz),
            samples_per_packet: config.samples_per_packet,
            next: 0,
            physical: Vec::with_capacity(n),
            raw: Vec::with_capacity(n),
        }
    }

    /// The next packet of the sensor whose turn it is; indices and timestamps continue
    /// exactly where that sensor's previous packet ended.
    fn next_packet(&mut self) -> Packet {
        let index = self.next;
        self.next = (self.next + 1) % self.sensors.len();
        let n = u64::from(self.samples_per_packet);
        let sensor = &mut self.sensors[index];
        let first_sample = sensor.packets * n;
        // Sample indices are u32 on the wire and wrap like a device counter would.
        let base_sample_number = sensor.base_sample_number.wrapping_add(first_sample as u32);
        let timestamp_us = sensor.first_timestamp_us + first_sample * 1_000_000 / self.rate_hz;
        sensor.packets += 1;

        self.raw.clear();
        sensor.replay(usize::from(self.samples_per_packet), &mut self.raw);
        let payload = match self.format {
            PayloadFormat::Binary => {
                let mut payload = Vec::with_capacity(20 + 20 * self.raw.len());
                encode_packet(base_sample_number, timestamp_us, &self.raw, &mut payload);
                payload
            }
            PayloadFormat::Json => {
                self.physical.clear();
                self.physical
                    .extend(self.raw.iter().map(RawSample::to_physical));
                let packet = JsonPacket {
                    timestamp_us,
                    base_sample_number,
                    samples: std::mem::take(&mut self.physical),
                };
                let payload = encode_json_packet(&packet);
                self.physical = packet.samples;
                payload
            }
        };
        Packet {
            payload,
            meta: PacketMeta {
                sensor: index,
                base_sample_number,
                samples: self.samples_per_packet,
            },
        }
    }
}

/// The two rumqttc client flavours behind one interface.
enum Client {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop matching [`Client`] (boxed: the two differ a lot in size).
enum Link {
    V3(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The event-loop events a connection acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkEvent {
    Connected,
    /// The oldest queued publish was written with this packet id (0 for QoS 0).
    Sent {
        pkid: u16,
    },
    /// PUBACK; `accepted` is false for an MQTT 5 failure reason code.
    Acked {
        pkid: u16,
        accepted: bool,
    },
    /// Our DISCONNECT was written.
    Disconnected,
    Other,
}

fn connect(client_id: &str, config: &SimConfig, capacity: usize) -> (Client, Link) {
    match config.mqtt_version {
        MqttVersion::V3 => {
            let mut options =
                rumqttc::MqttOptions::new(client_id, config.host.as_str(), config.port);
            options
                .set_keep_alive(KEEP_ALIVE)
                .set_clean_session(true)
                .set_inflight(config.max_inflight)
                .set_max_packet_size(MAX_MQTT_PACKET_BYTES, MAX_MQTT_PACKET_BYTES);
            let (client, link) = rumqttc::AsyncClient::new(options, capacity);
            (Client::V3(client), Link::V3(Box::new(link)))
        }
        MqttVersion::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(client_id, config.host.as_str(), config.port);
            options
                .set_keep_alive(KEEP_ALIVE)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(config.max_inflight)
                .set_max_packet_size(Some(MAX_MQTT_PACKET_BYTES as u32));
            let (client, link) = rumqttc::v5::AsyncClient::new(options, capacity);
            (Client::V5(client), Link::V5(Box::new(link)))
        }
    }
}

impl Client {
    /// Queues a publish without waiting; fails only if the request queue is full or closed.
    fn try_publish(&self, topic: String, qos: Qos, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V3(client) => {
                let qos = match qos {
                    Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
                    Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
                };
                client
                    .try_publish(topic, qos, false, payload)
                    .map_err(|e| e.to_string())
            }
            Client::V5(client) => {
                let qos = match qos {
                    Qos::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    Qos::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                };
                client
                    .try_publish(topic, qos, false, payload)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Queues a DISCONNECT behind every queued publish.
    fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V3(client) => client.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(client) => client.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl Link {
    /// Drives the connection (connecting first if needed) until the next event of interest.
    async fn next(&mut self) -> Result<LinkEvent, String> {
        use rumqttc::Outgoing;
        match self {
            Link::V3(link) => {
                use rumqttc::{Event, Packet};
                Ok(match link.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
                    Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
                        pkid: ack.pkid,
                        accepted: true,
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent { pkid },
                    Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Disconnected,
                    _ => LinkEvent::Other,
                })
            }
            Link::V5(link) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                Ok(match link.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
                    Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
                        pkid: ack.pkid,
                        accepted: matches!(
                            ack.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ),
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent { pkid },
                    Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Disconnected,
                    _ => LinkEvent::Other,
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The publisher against a fake MQTT 3.1.1 broker (accepts everything, acks per policy),
    //! and its packets decoded with the protocol crate.

    use std::collections::BTreeMap;

    use bytes::{Bytes, BytesMut};
    use rumqttc::{ConnAck, ConnectReturnCode, Packet as Mqtt, PubAck};
    use sensorflow_protocol::imu::PacketView;
    use sensorflow_protocol::json::parse_json_packet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::sim::{SimStats, Simulator};

    /// How the fake broker answers QoS 1 publishes.
    #[derive(Debug, Clone, Copy)]
    enum AckPolicy {
        All,
        Never,
        /// The first connection acks this many publishes, then closes on the next one;
        /// later connections ack everything.
        DropFirstConnectionAfter(usize),
    }

    /// A publish as the broker saw it.
    #[derive(Debug)]
    struct Received {
        topic: String,
        payload: Bytes,
        acked: bool,
    }

    /// Starts the broker on a free port; every publish it reads is sent to the receiver.
    async fn fake_broker(policy: AckPolicy) -> (u16, mpsc::UnboundedReceiver<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for connection in 0usize.. {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let ack_limit = match policy {
                    AckPolicy::All => None,
                    AckPolicy::Never => Some(0),
                    AckPolicy::DropFirstConnectionAfter(n) if connection == 0 => Some(n),
                    AckPolicy::DropFirstConnectionAfter(_) => None,
                };
                let close_when_over_limit =
                    matches!(policy, AckPolicy::DropFirstConnectionAfter(_));
                tokio::spawn(serve(socket, ack_limit, close_when_over_limit, tx.clone()));
            }
        });
        (port, rx)
    }

    async fn serve(
        mut socket: tokio::net::TcpStream,
        ack_limit: Option<usize>,
        close_when_over_limit: bool,
        tx: mpsc::UnboundedSender<Received>,
    ) {
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut publishes = 0;
        loop {
            while let Ok(packet) = Mqtt::read(&mut input, 1 << 20) {
                let reply = match packet {
                    Mqtt::Connect(_) => Some(Mqtt::ConnAck(ConnAck::new(
                        ConnectReturnCode::Success,
                        false,
                    ))),
                    Mqtt::PingReq => Some(Mqtt::PingResp),
                    Mqtt::Disconnect => return,
                    Mqtt::Publish(publish) => {
                        publishes += 1;
                        let acked = ack_limit.is_none_or(|limit| publishes <= limit);
                        let topic = publish.topic;
                        let _ = tx.send(Received {
                            topic,
                            payload: publish.payload,
                            acked,
                        });
                        if !acked && close_when_over_limit {
                            // The PUBACKs already decided go out before the connection drops:
                            // `acked` must mean the client was sent the ack.
                            let _ = socket.write_all(&output).await;
                            return;
                        }
                        (acked && publish.pkid != 0)
                            .then(|| Mqtt::PubAck(PubAck::new(publish.pkid)))
                    }
                    _ => None,
                };
                if let Some(reply) = reply {
                    reply.write(&mut output, 1 << 20).unwrap();
                }
            }
            if !output.is_empty() {
                if socket.write_all(&output).await.is_err() {
                    return;
                }
                output.clear();
            }
            match socket.read_buf(&mut input).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// 1000 Hz × 10 samples: a packet every 10 ms per sensor keeps the tests short.
    fn config(port: u16) -> SimConfig {
        SimConfig {
            port,
            sensors: 4,
            connections: Some(2),
            rate_hz: 1000,
            samples_per_packet: 10,
            duration: Some(Duration::from_millis(400)),
            drain_timeout: Duration::from_secs(5),
            seed: 1,
            ..SimConfig::default()
        }
    }

    async fn run(config: SimConfig) -> SimStats {
        let (_shutdown, shutdown_rx) = watch::channel(false);
        let handle = Simulator::spawn(config, shutdown_rx).unwrap();
        tokio::time::timeout(Duration::from_secs(20), handle.join())
            .await
            .unwrap()
    }

    fn drain<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// (sensor id, base sample number) of a binary publish.
    fn identify(received: &Received) -> (String, u32) {
        let sensor = received.topic.strip_prefix("stream/").unwrap().to_owned();
        (
            sensor,
            PacketView::parse(&received.payload)
                .unwrap()
                .base_sample_number(),
        )
    }

    #[test]
    fn packets_decode_with_consecutive_indices_and_sample_period_spacing() {
        let config = SimConfig {
            sensors: 3,
            rate_hz: 200,
            samples_per_packet: 64,
            ..config(0)
        };
        let traces = MotionTraces::generate(&config);
        let sensors = (0..3)
            .map(|i| VirtualSensor::new(&config, i, 1_000_000 + i as u64, &traces))
            .collect();
        let mut source = PacketSource::new(&config, sensors);
        let mut previous: Vec<Option<(u32, u64)>> = vec![None; 3];
        for k in 0..30 {
            let packet = source.next_packet();
            assert_eq!(packet.meta.sensor, k % 3, "sensors take turns");
            let view = PacketView::parse(&packet.payload).unwrap();
            assert_eq!(view.frame_len(), packet.payload.len());
            assert_eq!(view.len(), 64);
            assert_eq!(view.base_sample_number(), packet.meta.base_sample_number);
            if let Some((base, timestamp)) = previous[k % 3] {
                assert_eq!(view.base_sample_number(), base.wrapping_add(64));
                assert_eq!(
                    view.timestamp_us(),
                    timestamp + 64 * 5_000,
                    "5 ms per sample"
                );
            } else {
                assert_eq!(view.timestamp_us(), 1_000_000 + (k % 3) as u64);
            }
            previous[k % 3] = Some((view.base_sample_number(), view.timestamp_us()));
        }
        let bases: Vec<u32> = source
            .sensors
            .iter()
            .map(|s| s.base_sample_number)
            .collect();
        assert!(
            bases[0] != bases[1] && bases[1] != bases[2],
            "each sensor starts elsewhere"
        );
    }

    #[test]
    fn json_packets_parse_back_to_the_generated_samples() {
        let config = SimConfig {
            format: PayloadFormat::Json,
            ..config(0)
        };
        let sensors = vec![VirtualSensor::new(
            &config,
            7,
            5_000,
            &MotionTraces::generate(&config),
        )];
        // Of four traces, sensor 7 replays trace 3 (seed stream 6) from its start, quantised
        // to raw units.
        let mut expected = MotionGenerator::new(mix(config.seed, 6), 1000.0);
        let mut source = PacketSource::new(&config, sensors);
        assert_eq!(source.sensors[0].topic, "sensors/sim-0007/data");
        for k in 0..3u64 {
            let packet = parse_json_packet(&source.next_packet().payload).unwrap();
            assert_eq!(packet.timestamp_us, 5_000 + k * 10 * 1_000);
            let samples: Vec<PhysSample> = (0..10)
                .map(|_| RawSample::from_physical(&expected.next_sample()).to_physical())
                .collect();
            assert_eq!(packet.samples, samples);
        }
    }

    #[test]
    fn sensors_sharing_a_trace_replay_it_from_their_own_phase_and_loop() {
        let config = SimConfig {
            sensors: 2 * MAX_TRACES,
            rate_hz: 10,
            ..config(0)
        };
        let traces = MotionTraces::generate(&config);
        let len = TRACE_SECS * 10;
        let mut first = VirtualSensor::new(&config, 5, 0, &traces);
        let mut second = VirtualSensor::new(&config, 5 + MAX_TRACES, 0, &traces);
        assert!(
            Arc::ptr_eq(&first.trace, &second.trace),
            "sensors k and k + {MAX_TRACES} share a trace"
        );
        assert!(!Arc::ptr_eq(
            &first.trace,
            &VirtualSensor::new(&config, 6, 0, &traces).trace
        ));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        first.replay(len + 7, &mut a);
        second.replay(len / 2, &mut b);
        assert_eq!(a.len(), len + 7);
        assert_eq!(
            b[..],
            a[len / 2..len],
            "the second sharer starts half a trace later"
        );
        assert_ne!(
            a[..len / 2],
            a[len / 2..len],
            "the trace is not a repetition"
        );
        assert_eq!(a[len..], a[..7], "replay loops back to the start");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_packet_arrives_once_in_order_and_every_ack_is_reported() {
        let (port, mut broker) = fake_broker(AckPolicy::All).await;
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let stats = run(SimConfig {
            on_ack: Some(ack_tx),
            ..config(port)
        })
        .await;
        let received = drain(&mut broker);

        assert_eq!(stats.packets_sent, received.len() as u64);
        assert_eq!(stats.packets_acked, stats.packets_sent);
        assert_eq!(stats.samples_acked, 10 * stats.packets_acked);
        assert_eq!((stats.packets_lost, stats.errors), (0, 0));

        let mut per_sensor: BTreeMap<String, Vec<(u32, u64)>> = BTreeMap::new();
        for r in &received {
            let view = PacketView::parse(&r.payload).unwrap();
            let (sensor, _) = identify(r);
            per_sensor
                .entry(sensor)
                .or_default()
                .push((view.base_sample_number(), view.timestamp_us()));
        }
        assert_eq!(
            per_sensor.keys().cloned().collect::<Vec<_>>(),
            ["sim-0000", "sim-0001", "sim-0002", "sim-0003"]
        );
        for (sensor, packets) in &per_sensor {
            // 400 ms of 10 ms packets, the first one interval after the start.
            assert!(
                (38..=40).contains(&packets.len()),
                "{sensor}: {} packets",
                packets.len()
            );
            for pair in packets.windows(2) {
                assert_eq!(
                    pair[1].0,
                    pair[0].0.wrapping_add(10),
                    "{sensor}: consecutive indices"
                );
                assert_eq!(pair[1].1, pair[0].1 + 10_000, "{sensor}: 1 ms per sample");
            }
        }

        let mut reported: Vec<(String, u32)> = drain(&mut acks)
            .into_iter()
            .map(|a| {
                assert_eq!(a.samples, 10);
                (a.sensor_id.to_string(), a.base_sample_number)
            })
            .collect();
        let mut expected: Vec<(String, u32)> = received.iter().map(identify).collect();
        reported.sort();
        expected.sort();
        assert_eq!(reported, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn withheld_acks_pause_generation_and_leftovers_count_as_lost() {
        let (port, mut broker) = fake_broker(AckPolicy::Never).await;
        let stats = run(SimConfig {
            sensors: 1,
            connections: None,
            max_inflight: 3,
            drain_timeout: Duration::from_millis(200),
            ..config(port)
        })
        .await;
        // Three in flight, then the queue (16 packets) fills and generation pauses.
        assert_eq!(stats.packets_sent, 3);
        assert_eq!(drain(&mut broker).len(), 3);
        assert_eq!(stats.packets_acked, 0);
        assert_eq!(stats.packets_lost, 3 + 16);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_connection_loses_only_unacked_packets_and_reconnects() {
        let (port, mut broker) = fake_broker(AckPolicy::DropFirstConnectionAfter(5)).await;
        let (ack_tx, mut acks) = mpsc::unbounded_channel();
        let stats = run(SimConfig {
            sensors: 2,
            connections: Some(1),
            duration: Some(Duration::from_millis(1500)),
            on_ack: Some(ack_tx),
            ..config(port)
        })
        .await;
        let received = drain(&mut broker);

        assert!(stats.errors >= 1 && stats.packets_lost >= 1, "{stats}");
        let mut acked_by_broker: Vec<_> =
            received.iter().filter(|r| r.acked).map(identify).collect();
        assert!(
            acked_by_broker.len() > 5,
            "publishing resumed after reconnecting"
        );
        let mut reported: Vec<_> = drain(&mut acks)
            .into_iter()
            .map(|a| (a.sensor_id.to_string(), a.base_sample_number))
            .collect();
        acked_by_broker.sort();
        reported.sort();
        assert_eq!(
            reported, acked_by_broker,
            "acks are attributed to the right packets"
        );
        assert_eq!(stats.packets_acked, reported.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_broker_ends_the_run_on_time_with_errors() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let started = std::time::Instant::now();
        let stats = run(SimConfig {
            sensors: 1,
            connections: None,
            duration: Some(Duration::from_millis(300)),
            ..config(port)
        })
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(stats.packets_sent, 0);
        assert!(stats.errors >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_signal_drains_and_disconnects_before_join_returns() {
        let (port, mut broker) = fake_broker(AckPolicy::All).await;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let handle = Simulator::spawn(
            SimConfig {
                duration: None,
                ..config(port)
            },
            shutdown_rx,
        )
        .unwrap();
        // Wait for real traffic, then stop.
        let first = broker.recv().await.unwrap();
        assert!(first.topic.starts_with("stream/sim-000"));
        shutdown.send(true).unwrap();
        let stats = tokio::time::timeout(Duration::from_secs(10), handle.join())
            .await
            .unwrap();
        assert_eq!(stats.packets_acked, stats.packets_sent);
        assert_eq!(stats.packets_lost, 0);
        assert_eq!(1 + drain(&mut broker).len() as u64, stats.packets_sent);
    }

    #[test]
    fn invalid_configurations_report_every_problem() {
        let config = SimConfig {
            sensors: 0,
            rate_hz: 0,
            samples_per_packet: 4000,
            topic_prefix: "a/#".to_owned(),
            ..SimConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.problems.len(), 4, "{error}");
        assert!(SimConfig::default().validate().is_ok());
    }

    #[test]
    fn sensors_are_spread_evenly_over_connections() {
        let config = SimConfig {
            sensors: 10,
            connections: Some(3),
            ..SimConfig::default()
        };
        let plans = plan_connections(
            &config,
            &MotionTraces::generate(&config),
            std::time::Instant::now(),
        );
        let sizes: Vec<usize> = plans.iter().map(|p| p.source.sensors.len()).collect();
        assert_eq!(sizes, [3, 3, 4]);
        let ids: Vec<&str> = plans
            .iter()
            .flat_map(|p| p.source.sensors.iter().map(|s| &*s.id))
            .collect();
        assert_eq!(ids, config.sensor_ids().collect::<Vec<_>>());
        assert_eq!(
            SimConfig {
                sensors: 1000,
                ..SimConfig::default()
            }
            .effective_connections(),
            64
        );
        assert_eq!(
            SimConfig {
                sensors: 5,
                ..SimConfig::default()
            }
            .effective_connections(),
            5
        );
    }
}
