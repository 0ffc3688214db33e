//! Protocol-independent heart of ingest: admission of connections, routing a PUBLISH to an
//! [`IngestRecord`], the durable append, and the per-connection drain used by graceful stop.
//!
//! The MQTT 3.1.1 and 5.0 glue in [`crate::mqtt`] only translates a [`Verdict`] into the
//! acknowledgement (or its absence) that each protocol version can express.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ntex_mqtt::{Payload, QoS};
use sensorflow_protocol::framing::BadReason;
use sensorflow_protocol::{IngestRecord, PayloadFormat};
use tokio::sync::{Notify, oneshot, watch};

use crate::auth::{Authenticator, Identity};
use crate::config::IngestConfig;
use crate::limits::{PerIp, PublishRate, SensorIdAdmission, SensorIds};
use crate::session::{Attached, Expiry, SessionRegistry};
use crate::sink::{IngestObserver, IngestSink, SinkError};
use crate::stats::{IngestStats, bump};

/// Outcome of one PUBLISH, before protocol-specific acknowledgement.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The sink stored the record.
    Stored,
    /// Topic matches neither pattern; payload discarded.
    UnknownTopic,
    /// Payload above `max_message_bytes`; discarded.
    Oversize,
    /// The sink did not store the record.
    SinkFailed(SinkError),
    /// A new sensor id beyond `max_sensor_ids`; payload discarded.
    SensorIdCap,
    /// The connection's user may not publish to this topic (ACL); payload discarded.
    NotAuthorized,
    /// Arrived after graceful stop began; not stored, must not be acknowledged.
    ShuttingDown,
    /// The payload stream broke (peer gone mid-message).
    PayloadBroken,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_connections` sessions are open.
    Busy,
    /// Graceful stop is in progress.
    ShuttingDown,
    /// `max_connections_per_ip` sessions of this source address are open.
    PerIp,
}

/// Why the server closes a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// A newer connection with the same client id took the session over.
    TakenOver,
    /// Graceful stop: the connection's in-flight appends have completed.
    ShuttingDown,
}

/// State shared by every worker thread and the [`crate::IngestServer`] handle.
pub(crate) struct Core {
    pub(crate) config: IngestConfig,
    sink: Arc<dyn IngestSink>,
    observer: Arc<dyn IngestObserver>,
    pub(crate) stats: Arc<IngestStats>,
    sessions: SessionRegistry,
    draining: AtomicBool,
    drain: watch::Sender<bool>,
    /// Notified whenever the number of open connections drops to zero.
    all_closed: Notify,
    next_serial: AtomicU64,
    pub(crate) auth: Authenticator,
    sensor_ids: SensorIds,
    per_ip: PerIp,
}

impl Core {
    pub(crate) fn new(
        config: IngestConfig,
        sink: Arc<dyn IngestSink>,
        observer: Arc<dyn IngestObserver>,
    ) -> Self {
        let stats = Arc::<IngestStats>::default();
        Self {
            sessions: SessionRegistry::new(
                config.max_persistent_sessions,
                config.session_expiry_max,
            ),
            per_ip: PerIp::default(),
            sensor_ids: SensorIds::new(config.max_sensor_ids, config.sensor_id_idle),
            auth: Authenticator::new(
                config.auth.clone(),
                tokio::runtime::Handle::current(),
                Arc::clone(&stats),
            ),
            config,
            sink,
            observer,
            stats,
            draining: AtomicBool::new(false),
            drain: watch::Sender::new(false),
            all_closed: Notify::new(),
            next_serial: AtomicU64::new(1),
        }
    }

    /// Starts graceful stop: no new connections or appends; each connection closes once its
    /// in-flight appends have been acknowledged.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stats.draining.store(true, Ordering::SeqCst);
        self.drain.send_replace(true);
    }

    /// Resolves once no connection is open.
    pub(crate) async fn all_connections_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stats.connections_current.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Reserves a connection slot, or says why not.
    fn admit(&self) -> Result<(), Refusal> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Refusal::ShuttingDown);
        }
        let open = self
            .stats
            .connections_current
            .fetch_add(1, Ordering::SeqCst);
        if open >= self.config.max_connections as u64 {
            self.release_slot();
            return Err(Refusal::Busy);
        }
        bump(&self.stats.connections_total);
        Ok(())
    }

    fn release_slot(&self) {
        if self
            .stats
            .connections_current
            .fetch_sub(1, Ordering::SeqCst)
            == 1
        {
            self.all_closed.notify_waiters();
        }
    }

    /// A fresh id for a client that connected without one.
    pub(crate) fn generated_client_id(&self) -> String {
        format!(
            "sensorflow-{:016x}",
            self.next_serial.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Admits a connection and attaches it to its session. The returned [`Conn`] holds the
    /// connection slot until dropped.
    pub(crate) fn open(
        self: &Arc<Self>,
        client_id: Arc<str>,
        peer: Option<std::net::IpAddr>,
        identity: Identity,
        clean: bool,
        expiry: Expiry,
    ) -> Result<(Conn, Attached, oneshot::Receiver<()>), Refusal> {
        if let Some(ip) = peer
            && !self.per_ip.acquire(ip, self.config.max_connections_per_ip)
        {
            bump(&self.stats.connections_refused);
            bump(&self.stats.connections_refused_per_ip);
            return Err(Refusal::PerIp);
        }
        if let Err(refusal) = self.admit() {
            bump(&self.stats.connections_refused);
            if let Some(ip) = peer {
                self.per_ip.release(ip);
            }
            return Err(refusal);
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let attached = self.sessions.attach(&client_id, serial, clean, expiry);
        if attached.evicted > 0 {
            self.stats
                .sessions_evicted
                .fetch_add(attached.evicted, Ordering::Relaxed);
        }
        let (closed_tx, closed_rx) = oneshot::channel();
        let conn = Conn {
            core: self.clone(),
            client_id,
            peer,
            user: match identity {
                Identity::Anonymous => None,
                Identity::User(user) => Some(user),
            },
            serial,
            inflight: Rc::new(Inflight::new(
                usize::from(self.config.receive_maximum),
                self.config.max_inflight_bytes,
            )),
            order: Rc::new(Order::default()),
            rate: PublishRate::new(self.config.max_publishes_per_sec),
            _closed: closed_tx,
        };
        Ok((conn, attached, closed_rx))
    }

    /// Maps a topic to its sensor id and payload format.
    fn route<'t>(&self, topic: &'t str) -> Option<(&'t str, PayloadFormat)> {
        if let Some(id) = self.config.binary_topic.match_topic(topic) {
            Some((id, PayloadFormat::Binary))
        } else {
            self.config
                .json_topic
                .match_topic(topic)
                .map(|id| (id, PayloadFormat::Json))
        }
    }

    /// Handles one PUBLISH up to the point where it can be acknowledged.
    pub(crate) async fn ingest(
        &self,
        conn: &Conn,
        topic: &str,
        qos: QoS,
        payload_size: usize,
        payload: Payload,
    ) -> Verdict {
        // First thing, before any await: handlers first run in arrival order.
        let ticket = conn.order.ticket();
        let ingest_us = now_us();
        let qos_index = match qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        };
        bump(&self.stats.received_qos[qos_index]);
        self.stats
            .received_bytes
            .fetch_add(payload_size as u64, Ordering::Relaxed);

        // Enter before checking `draining`: the drain waits for this counter, so a publish is
        // either counted before the drain looks or sees the flag (same thread, no gap).
        let _guard = conn.inflight.enter(payload_size);
        if self.draining.load(Ordering::SeqCst) {
            bump(&self.stats.dropped_on_shutdown);
            return Verdict::ShuttingDown;
        }
        if let Some(wait) = conn.rate.take(std::time::Instant::now()) {
            // Counted as in flight while it waits: a flood fills the window and stops reading.
            bump(&self.stats.publishes_throttled);
            tokio::time::sleep(wait).await;
        }

        let Some((sensor_id, format)) = self.route(topic) else {
            bump(&self.stats.unknown_topic);
            tracing::trace!(topic, "publish on unknown topic");
            self.observer
                .bad_input(None, BadReason::UnknownTopic, topic);
            return discard(payload).await;
        };
        if let Some(user) = &conn.user
            && !self.auth.acl().allows(user, topic, sensor_id)
        {
            self.auth.publish_denied(user, topic);
            return match discard(payload).await {
                Verdict::UnknownTopic => Verdict::NotAuthorized,
                other => other,
            };
        }
        match self.sensor_ids.admit(sensor_id) {
            SensorIdAdmission::Known => {}
            SensorIdAdmission::New { known } => {
                self.stats.sensor_ids.store(known as u64, Ordering::Relaxed);
            }
            SensorIdAdmission::Refused => {
                bump(&self.stats.sensor_ids_refused);
                tracing::trace!(sensor_id, "new sensor id beyond max_sensor_ids");
                return match discard(payload).await {
                    Verdict::UnknownTopic => Verdict::SensorIdCap,
                    other => other,
                };
            }
        }
        if payload_size > self.config.max_message_bytes {
            bump(&self.stats.oversize);
            let detail = format!(
                "{payload_size} bytes exceeds max_message_bytes {}",
                self.config.max_message_bytes
            );
            tracing::trace!(sensor_id, payload_size, "oversize publish");
            self.observer
                .bad_input(Some(sensor_id), BadReason::Oversize, &detail);
            return match discard(payload).await {
                Verdict::UnknownTopic => Verdict::Oversize,
                other => other,
            };
        }
        let Ok(data) = payload.read_all().await else {
            return Verdict::PayloadBroken;
        };
        let record = IngestRecord {
            sensor_id: sensor_id.to_owned(),
            format,
            ingest_us,
            payload: bytes::Bytes::from_owner(data),
        };
        // `append` fixes the record's place synchronously, so taking turns around the call
        // keeps the connection's records in arrival order.
        ticket.my_turn().await;
        let append = self.sink.append(record);
        drop(ticket);
        // Awaited in place, on this worker thread: the sink's completion wakes this connection
        // directly. (Spawning it on the application's runtime cost two more cross-thread
        // wake-ups per publish, a large share of ingest's CPU at thousands of publishes/s.)
        let result = append.await;
        match result {
            Ok(()) => {
                bump(&self.stats.stored);
                Verdict::Stored
            }
            Err(err) => {
                bump(&self.stats.rejected_by_sink);
                tracing::debug!(sensor_id, error = %err, "sink did not store record");
                Verdict::SinkFailed(err)
            }
        }
    }
}

/// Reads and drops a payload we will not store, so a streamed one does not stall the
/// connection. Returns `UnknownTopic` as the neutral "discarded" verdict.
async fn discard(payload: Payload) -> Verdict {
    loop {
        match payload.read().await {
            Ok(Some(_)) => {}
            Ok(None) => return Verdict::UnknownTopic,
            Err(_) => return Verdict::PayloadBroken,
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Per-connection state (the ntex-mqtt session state). Dropped when the connection ends,
/// which frees its slot and detaches its MQTT session.
pub(crate) struct Conn {
    pub(crate) core: Arc<Core>,
    client_id: Arc<str>,
    /// Source address, holding a slot of `max_connections_per_ip`.
    peer: Option<std::net::IpAddr>,
    /// The authenticated user; `None` for an anonymous client (not ACL-restricted).
    user: Option<Arc<str>>,
    serial: u64,
    pub(crate) inflight: Rc<Inflight>,
    order: Rc<Order>,
    rate: PublishRate,
    /// Dropping this tells the closer task the connection is gone.
    _closed: oneshot::Sender<()>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("client_id", &self.client_id)
            .field("user", &self.user)
            .field("serial", &self.serial)
            .finish()
    }
}

impl Conn {
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Counts a success acknowledgement.
    pub(crate) fn acked(&self) {
        bump(&self.core.stats.acked);
    }

    /// Counts a negative (MQTT 5 error reason code) acknowledgement.
    pub(crate) fn nacked(&self) {
        bump(&self.core.stats.nacked);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        tracing::debug!(client_id = %self.client_id, "mqtt connection closed");
        self.core.sessions.detach(&self.client_id, self.serial);
        self.core.release_slot();
        if let Some(ip) = self.peer {
            self.core.per_ip.release(ip);
        }
    }
}

/// Publishes of one connection between arrival and verdict, and their payload bytes.
/// Single-threaded: a connection lives on one ntex worker.
#[derive(Debug)]
pub(crate) struct Inflight {
    count: Cell<usize>,
    bytes: Cell<usize>,
    max_count: usize,
    max_bytes: usize,
    /// Notified (one permit) when the count drops to zero; awaited by the closer.
    idle: Notify,
    /// Notified (all waiters) whenever a publish completes; awaited by [`ReadGate`].
    slot: Notify,
}

impl Inflight {
    pub(crate) fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            count: Cell::new(0),
            bytes: Cell::new(0),
            max_count,
            max_bytes,
            idle: Notify::new(),
            slot: Notify::new(),
        }
    }

    fn enter(self: &Rc<Self>, bytes: usize) -> InflightGuard {
        self.count.set(self.count.get() + 1);
        self.bytes.set(self.bytes.get() + bytes);
        InflightGuard(self.clone(), bytes)
    }

    fn has_room(&self) -> bool {
        self.count.get() < self.max_count && self.bytes.get() <= self.max_bytes
    }

    /// Resolves when another publish may be read.
    pub(crate) async fn room(&self) {
        loop {
            let notified = self.slot.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves when no publish is in flight.
    async fn idle(&self) {
        // `notify_one` stores a permit, so a wake-up between the check and the await is
        // not lost; a stale permit only costs one more check.
        while self.count.get() > 0 {
            self.idle.notified().await;
        }
    }
}

/// Keeps a connection's appends in the order its publishes arrived.
///
/// ntex-mqtt dispatches a PUBLISH whose payload is not yet fully read as a stream, and handles
/// the publishes after it concurrently; one of those, fully buffered, can finish reading its
/// payload first. Appending in that order would put a device's packets out of order in the log,
/// and dedupe would then drop the overtaken packet as already processed: an acknowledged
/// sample lost. So each publish takes a ticket when its handler first runs (in arrival order,
/// before any await) and appends only when every earlier ticket is done. Single-threaded, like
/// the connection.
///
/// Waiting for a turn cannot deadlock with the read gate: the codec decodes nothing after a
/// streamed PUBLISH until that publish's payload is complete, so whoever waits for a ticket
/// waits only for a handler that is already able to finish reading.
#[derive(Debug, Default)]
pub(crate) struct Order {
    next: Cell<u64>,
    serving: Cell<u64>,
    /// Tickets dropped before their turn (publishes that ended without an append).
    done_early: RefCell<BTreeSet<u64>>,
    turn: Notify,
}

impl Order {
    fn ticket(self: &Rc<Self>) -> Ticket {
        let number = self.next.get();
        self.next.set(number + 1);
        Ticket {
            order: self.clone(),
            number,
        }
    }

    fn finish(&self, number: u64) {
        if number != self.serving.get() {
            self.done_early.borrow_mut().insert(number);
            return;
        }
        let mut next = number + 1;
        {
            let mut early = self.done_early.borrow_mut();
            while early.remove(&next) {
                next += 1;
            }
        }
        self.serving.set(next);
        self.turn.notify_waiters();
    }
}

/// A publish's place in its connection's [`Order`]; dropping it lets the next one go.
struct Ticket {
    order: Rc<Order>,
    number: u64,
}

impl Ticket {
    /// Resolves when every earlier ticket of the connection is done.
    async fn my_turn(&self) {
        loop {
            let notified = self.order.turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.order.serving.get() == self.number {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.order.finish(self.number);
    }
}

struct InflightGuard(Rc<Inflight>, usize);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let inflight = &self.0;
        let left = inflight.count.get() - 1;
        inflight.count.set(left);
        inflight.bytes.set(inflight.bytes.get() - self.1);
        inflight.slot.notify_waiters();
        if left == 0 {
            inflight.idle.notify_one();
        }
    }
}

/// ntex-mqtt middleware that stops the dispatcher from reading the next packet while the
/// connection has `receive_maximum` publishes (or `max_inflight_bytes`) in flight.
///
/// ntex-mqtt 9 has such a limit built in, but measured with a blocked sink it let every
/// buffered publish through (2000 of 2000 with a limit of 4), so MQTT 3.1.1 clients, which
/// are not told any limit, were never slowed down. This gate waits on our own counter. The
/// counter is raised when a publish handler first runs, which ntex does on the connection's
/// task right after the dispatcher yields, so a burst already sitting in the read buffer may
/// overshoot the limit by that buffer's content; the socket is not read further.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadGate;

impl<S, Sink> ntex_service::Middleware<S, ntex_mqtt::Session<Sink, Conn>> for ReadGate {
    type Service = ReadGateService<S>;

    fn create(&self, session: &ntex_mqtt::Session<Sink, Conn>, service: S) -> Self::Service {
        ReadGateService {
            service,
            inflight: Rc::clone(&session.inflight),
        }
    }
}

/// The service produced by [`ReadGate`].
pub(crate) struct ReadGateService<S> {
    service: S,
    inflight: Rc<Inflight>,
}

impl<S, St, Req> ntex_service::Service<St, Req> for ReadGateService<S>
where
    S: ntex_service::Service<St, Req>,
{
    type Res = S::Res;
    type Error = S::Error;

    async fn ready(&self, ctx: ntex_service::Ctx<'_, Self, St>) -> Result<(), Self::Error> {
        self.inflight.room().await;
        ctx.ready(&self.service).await
    }

    async fn call(
        &self,
        req: Req,
        ctx: ntex_service::Ctx<'_, Self, St>,
    ) -> Result<Self::Res, Self::Error> {
        ctx.call(&self.service, req).await
    }

    ntex_service::forward_shutdown!(St, service);
}

/// Runs beside each connection (on its worker) and closes it on session takeover, or on
/// graceful stop once its in-flight publishes have been answered. Ends with the connection.
pub(crate) async fn closer(
    core: Arc<Core>,
    inflight: Rc<Inflight>,
    kick: Arc<Notify>,
    mut closed: oneshot::Receiver<()>,
    close: impl FnOnce(CloseReason),
) {
    let mut drain = core.drain.subscribe();
    drop(core);
    let reason = tokio::select! {
        _ = &mut closed => return,
        () = kick.notified() => CloseReason::TakenOver,
        _ = drain.wait_for(|draining| *draining) => CloseReason::ShuttingDown,
    };
    if reason == CloseReason::ShuttingDown {
        tokio::select! {
            _ = &mut closed => return,
            () = inflight.idle() => {}
        }
    }
    close(reason);
}
