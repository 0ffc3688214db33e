//! The live hub: fan-out of pipeline outputs to WebSocket clients.
//!
//! Each topic (`raw/{sensor_id}`, `windows/{sensor_id}`, `aggregate/{sensor_id}`,
//! `session/{session_id}`) is a `tokio::sync::broadcast` channel, created when its first
//! subscriber arrives and removed when its last one leaves, kept in a map split into shards so
//! publishers of different sensors rarely meet on a lock.
//!
//! Invariant: a slow client never slows the pipeline. Publishing takes a shard's read lock, looks
//! the topic up and returns at once when nobody listens (no allocation, no serialisation);
//! otherwise it does one non-blocking `broadcast::send`. A broadcast channel never waits for its
//! receivers: a receiver that falls more than the channel capacity behind loses the oldest
//! messages and learns how many on its next `recv` (`RecvError::Lagged`), which the WebSocket
//! side counts as dropped.
//!
//! Raw chunks travel as [`RawFrame`]s, which serialise their JSON once per downsampling factor,
//! however many clients watch the sensor.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use parking_lot::{Mutex, RwLock};
use sensorflow_records::{SampleChunk, SessionAggregate, SessionEvent, SessionId, WindowRecord};
use serde::Serialize;
use tokio::sync::broadcast;

pub use tokio::sync::broadcast::error::RecvError;

/// Number of shards of each topic map. A power of two well above the core count.
const SHARDS: usize = 16;
/// Downsampling factors (`every` = 1..=RAW_JSON_CACHE) whose JSON a [`RawFrame`] caches.
const RAW_JSON_CACHE: usize = 8;

/// Configuration of the [`Hub`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// Messages a topic buffers per subscriber before the slowest one starts losing the oldest.
    pub topic_capacity: usize,
    /// Messages the all-sessions feed buffers (it carries every session's events and aggregates).
    pub sessions_feed_capacity: usize,
    /// Latest aggregates of ended sessions kept for `GET /sessions` (active ones are always kept).
    pub ended_aggregates_kept: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            topic_capacity: 256,
            sessions_feed_capacity: 1024,
            ended_aggregates_kept: 4096,
        }
    }
}

/// A message of a session feed (`/ws/session/{session_id}` and `/ws/sessions`), serialised with a
/// `type` tag: `{"type":"session_event","event":"started","session":{..}}` or
/// `{"type":"aggregate","session_id":..,"distance_m":..,..}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionMessage {
    /// A session started or ended.
    SessionEvent(Arc<SessionEvent>),
    /// A periodic aggregate of an active session.
    Aggregate(Arc<SessionAggregate>),
}

/// Most sample rows in one `/ws/raw` message (about 110 kB of JSON). A chunk is normally one
/// device packet (64 rows), but while the pipeline catches up on a backlog, e.g. after a
/// restart, it holds everything one sensor had in a log batch: thousands of rows, megabytes
/// that clients with a message size limit (1 MiB in Python's `websockets`) would refuse.
pub const RAW_ROWS_PER_MESSAGE: usize = 256;

/// Rows of a chunk of processed samples on their way to `/ws/raw` clients (at most
/// [`RAW_ROWS_PER_MESSAGE`]), with their JSON serialised at most once per downsampling factor.
#[derive(Debug)]
pub struct RawFrame {
    chunk: Arc<SampleChunk>,
    rows: Range<usize>,
    json: [OnceLock<Option<Utf8Bytes>>; RAW_JSON_CACHE],
}

impl RawFrame {
    /// Wraps all of `chunk`.
    pub fn new(chunk: Arc<SampleChunk>) -> Self {
        let rows = 0..chunk.len();
        Self::rows(chunk, rows)
    }

    fn rows(chunk: Arc<SampleChunk>, rows: Range<usize>) -> Self {
        Self {
            chunk,
            rows,
            json: Default::default(),
        }
    }

    /// The chunk the rows belong to.
    pub fn chunk(&self) -> &Arc<SampleChunk> {
        &self.chunk
    }

    /// The `/ws/raw` message for a client that keeps every `every`-th sample: a JSON array of
    /// sample rows, keeping the samples whose `sample_index` is a multiple of `every` (so
    /// downsampling is stable across chunk boundaries and identical for every client). `None`
    /// when no sample of the chunk is kept. `every = 0` is treated as 1.
    pub fn json(&self, every: u32) -> Option<Utf8Bytes> {
        let every = every.max(1);
        match self.json.get(every as usize - 1) {
            Some(cell) => cell
                .get_or_init(|| encode_rows(&self.chunk, self.rows.clone(), every))
                .clone(),
            None => encode_rows(&self.chunk, self.rows.clone(), every),
        }
    }
}

/// Serialises the kept rows among `rows` of `chunk` as a JSON array.
fn encode_rows(chunk: &SampleChunk, rows: Range<usize>, every: u32) -> Option<Utf8Bytes> {
    let mut out = Vec::with_capacity(64 + rows.len() * 420 / every as usize);
    out.push(b'[');
    let mut kept = 0usize;
    let indexes = chunk.sample_index.get(rows.clone()).unwrap_or_default();
    for (i, index) in rows.zip(indexes) {
        if index % every != 0 {
            continue;
        }
        if kept > 0 {
            out.push(b',');
        }
        // Serialising plain numbers and strings into a Vec cannot fail; skip the row if it does.
        if serde_json::to_writer(&mut out, &chunk.row(i)).is_err() {
            continue;
        }
        kept += 1;
    }
    if kept == 0 {
        return None;
    }
    out.push(b']');
    String::from_utf8(out).ok().map(Utf8Bytes::from)
}

/// The live hub. Cheap to clone (all clones share the topics); publish from the pipeline,
/// subscribe from WebSocket handlers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    raw: Arc<Topics<Arc<RawFrame>>>,
    windows: Arc<Topics<Arc<WindowRecord>>>,
    aggregate: Arc<Topics<Arc<SessionAggregate>>>,
    session: Arc<Topics<SessionMessage>>,
    sessions_feed: broadcast::Sender<SessionMessage>,
    latest: Mutex<LatestAggregates>,
    published: AtomicU64,
}

impl Hub {
    /// An empty hub.
    pub fn new(config: HubConfig) -> Hub {
        let capacity = config.topic_capacity.max(1);
        let (sessions_feed, _) = broadcast::channel(config.sessions_feed_capacity.max(1));
        Hub {
            inner: Arc::new(HubInner {
                raw: Arc::new(Topics::new(capacity)),
                windows: Arc::new(Topics::new(capacity)),
                aggregate: Arc::new(Topics::new(capacity)),
                session: Arc::new(Topics::new(capacity)),
                sessions_feed,
                latest: Mutex::new(LatestAggregates::new(config.ended_aggregates_kept)),
                published: AtomicU64::new(0),
            }),
        }
    }

    /// Publishes a chunk of processed samples to `raw/{sensor_id}`, as one message per
    /// [`RAW_ROWS_PER_MESSAGE`] rows. Never blocks; does nothing but a map lookup when nobody
    /// watches the sensor.
    pub fn publish_samples(&self, chunk: Arc<SampleChunk>) {
        let key = chunk.sensor_id.clone();
        let len = chunk.len();
        for start in (0..len).step_by(RAW_ROWS_PER_MESSAGE) {
            let rows = start..len.min(start + RAW_ROWS_PER_MESSAGE);
            if !self
                .inner
                .raw
                .publish(&key, || Arc::new(RawFrame::rows(chunk.clone(), rows)))
            {
                return;
            }
            self.inner.published.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes a window to `windows/{sensor_id}`. Never blocks.
    pub fn publish_window(&self, w: Arc<WindowRecord>) {
        let key = w.sensor_id.clone();
        if self.inner.windows.publish(&key, || w) {
            self.inner.published.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes a session aggregate to `aggregate/{sensor_id}`, `session/{session_id}` and the
    /// all-sessions feed, and remembers it as the session's latest (for `GET /sessions`).
    /// Never blocks. Aggregates are rare (one per active session every few seconds), so keeping
    /// the latest costs one map insert whether or not anybody listens.
    pub fn publish_aggregate(&self, a: Arc<SessionAggregate>) {
        self.inner.latest.lock().update(&a);
        let mut n = 0;
        n += u64::from(self.inner.aggregate.publish(&a.sensor_id, || a.clone()));
        n += u64::from(
            self.inner
                .session
                .publish(&a.session_id, || SessionMessage::Aggregate(a.clone())),
        );
        if self.inner.sessions_feed.receiver_count() > 0
            && self
                .inner
                .sessions_feed
                .send(SessionMessage::Aggregate(a))
                .is_ok()
        {
            n += 1;
        }
        self.inner.published.fetch_add(n, Ordering::Relaxed);
    }

    /// Publishes a session event to `session/{session_id}` and the all-sessions feed. Never
    /// blocks. An ended session's latest aggregate is kept a while (bounded) for `GET /sessions`.
    pub fn publish_session_event(&self, e: Arc<SessionEvent>) {
        if let SessionEvent::Ended { session, .. } = &*e {
            self.inner.latest.lock().ended(&session.session_id);
        }
        let mut n = 0;
        let key = e.session().session_id.clone();
        n += u64::from(
            self.inner
                .session
                .publish(&key, || SessionMessage::SessionEvent(e.clone())),
        );
        if self.inner.sessions_feed.receiver_count() > 0
            && self
                .inner
                .sessions_feed
                .send(SessionMessage::SessionEvent(e))
                .is_ok()
        {
            n += 1;
        }
        self.inner.published.fetch_add(n, Ordering::Relaxed);
    }

    /// Subscribes to a sensor's processed samples.
    pub fn subscribe_raw(&self, sensor_id: &str) -> Subscription<Arc<RawFrame>> {
        self.inner.raw.subscribe(sensor_id)
    }

    /// Subscribes to a sensor's window features.
    pub fn subscribe_windows(&self, sensor_id: &str) -> Subscription<Arc<WindowRecord>> {
        self.inner.windows.subscribe(sensor_id)
    }

    /// Subscribes to the aggregates of a sensor's sessions.
    pub fn subscribe_aggregate(&self, sensor_id: &str) -> Subscription<Arc<SessionAggregate>> {
        self.inner.aggregate.subscribe(sensor_id)
    }

    /// Subscribes to one session's events and aggregates.
    pub fn subscribe_session(&self, session_id: &str) -> Subscription<SessionMessage> {
        self.inner.session.subscribe(session_id)
    }

    /// Subscribes to every session's events and aggregates (the dashboard's sessions table).
    pub fn subscribe_sessions(&self) -> Subscription<SessionMessage> {
        Subscription {
            rx: self.inner.sessions_feed.subscribe(),
            release: None,
        }
    }

    /// The latest aggregate published for a session, if still kept.
    pub fn latest_aggregate(&self, session_id: &str) -> Option<Arc<SessionAggregate>> {
        self.inner.latest.lock().get(session_id)
    }

    /// Messages handed to at least one subscriber since start (a message delivered to several
    /// topics counts once per topic).
    pub fn published_total(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Number of topics that currently have subscribers, by kind (`raw`, `windows`, `aggregate`,
    /// `session`).
    pub fn topic_counts(&self) -> [(&'static str, usize); 4] {
        [
            ("raw", self.inner.raw.len()),
            ("windows", self.inner.windows.len()),
            ("aggregate", self.inner.aggregate.len()),
            ("session", self.inner.session.len()),
        ]
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("topics", &self.topic_counts())
            .finish_non_exhaustive()
    }
}

/// A subscription to one topic. Dropping it unsubscribes, and removes the topic when it was the
/// last subscriber.
#[derive(Debug)]
pub struct Subscription<T: Clone> {
    rx: broadcast::Receiver<T>,
    release: Option<(Arc<Topics<T>>, Arc<str>)>,
}

impl<T: Clone> Subscription<T> {
    /// The next message. `Err(RecvError::Lagged(n))` when this subscriber fell behind and lost
    /// its `n` oldest messages (the next call continues with the oldest one still buffered);
    /// `Err(RecvError::Closed)` never happens while the hub lives.
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        self.rx.recv().await
    }

    /// Messages published to the topic that this subscriber has not received yet, including
    /// the ones it already lost to lag.
    pub fn pending(&self) -> usize {
        self.rx.len()
    }
}

impl<T: Clone> Drop for Subscription<T> {
    fn drop(&mut self) {
        if let Some((topics, key)) = self.release.take() {
            // Replace our receiver by a closed dummy first, so the count below excludes us.
            let (_, dummy) = broadcast::channel(1);
            drop(std::mem::replace(&mut self.rx, dummy));
            topics.release(&key);
        }
    }
}

/// One shard of a topic map: topic key -> channel.
type Shard<T> = RwLock<HashMap<Arc<str>, broadcast::Sender<T>>>;

/// A sharded map of topics of one kind.
#[derive(Debug)]
struct Topics<T> {
    shards: Box<[Shard<T>]>,
    hasher: RandomState,
    capacity: usize,
}

impl<T: Clone> Topics<T> {
    fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            capacity,
        }
    }

    fn shard(&self, key: &str) -> &Shard<T> {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        let i = std::hash::Hasher::finish(&h) as usize % SHARDS;
        &self.shards[i]
    }

    /// Sends `make()` to the topic's subscribers, if any; true when somebody got it.
    fn publish(&self, key: &str, make: impl FnOnce() -> T) -> bool {
        let shard = self.shard(key).read();
        match shard.get(key) {
            Some(tx) if tx.receiver_count() > 0 => tx.send(make()).is_ok(),
            _ => false,
        }
    }

    fn subscribe(self: &Arc<Self>, key: &str) -> Subscription<T> {
        let mut shard = self.shard(key).write();
        let rx = match shard.get(key) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.capacity);
                shard.insert(Arc::from(key), tx);
                rx
            }
        };
        let release = shard
            .get_key_value(key)
            .map(|(k, _)| (self.clone(), k.clone()));
        Subscription { rx, release }
    }

    /// Removes the topic if nobody listens any more. Subscribing takes the same write lock, so a
    /// subscriber arriving concurrently either is counted here or creates a fresh topic after.
    fn release(&self, key: &str) {
        let mut shard = self.shard(key).write();
        if shard.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
            shard.remove(key);
        }
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

/// Latest aggregate per session: all active sessions, plus a bounded number of ended ones.
#[derive(Debug)]
struct LatestAggregates {
    latest: HashMap<SessionId, Arc<SessionAggregate>>,
    ended: VecDeque<SessionId>,
    ended_kept: usize,
}

impl LatestAggregates {
    fn new(ended_kept: usize) -> Self {
        Self {
            latest: HashMap::new(),
            ended: VecDeque::new(),
            ended_kept,
        }
    }

    fn update(&mut self, a: &Arc<SessionAggregate>) {
        self.latest.insert(a.session_id.clone(), a.clone());
    }

    fn ended(&mut self, session_id: &SessionId) {
        if !self.latest.contains_key(session_id) {
            return;
        }
        self.ended.push_back(session_id.clone());
        while self.ended.len() > self.ended_kept {
            if let Some(old) = self.ended.pop_front() {
                self.latest.remove(&old);
            }
        }
    }

    fn get(&self, session_id: &str) -> Option<Arc<SessionAggregate>> {
        self.latest.get(session_id).cloned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sensorflow_records::{SessionEndReason, SessionRecord};

    fn chunk(sensor: &str, first_index: u32, n: u32) -> Arc<SampleChunk> {
        let mut c = SampleChunk::with_capacity(sensor.into(), format!("{sensor}_0").into(), 8);
        for i in first_index..first_index + n {
            c.sample_index.push(i);
            c.timestamp_us.push(i64::from(i) * 5000);
            for col in [
                &mut c.acc_x,
                &mut c.acc_y,
                &mut c.acc_z,
                &mut c.gyro_x,
                &mut c.gyro_y,
                &mut c.gyro_z,
                &mut c.mag_x,
                &mut c.mag_y,
                &mut c.mag_z,
                &mut c.accl_mag,
                &mut c.gyro_mag,
                &mut c.velocity_pred,
                &mut c.movement_prob,
            ] {
                col.push(0.5);
            }
            c.temp_raw.push(7);
            c.ingest_us.push(1);
        }
        Arc::new(c)
    }

    fn aggregate(session: &str) -> Arc<SessionAggregate> {
        Arc::new(SessionAggregate {
            session_id: session.into(),
            sensor_id: "s1".into(),
            emitted_at_us: 1,
            max_velocity: 2.0,
            distance_m: 3.0,
            mean_velocity: 1.0,
            moving_time_s: 4.0,
            sample_count: 5,
            duration_s: 6.0,
        })
    }

    fn ended(session: &str) -> Arc<SessionEvent> {
        Arc::new(SessionEvent::Ended {
            session: SessionRecord {
                session_id: session.into(),
                sensor_id: "s1".into(),
                start_us: 0,
                end_us: Some(1),
                last_seen_us: 1,
                sample_count: 1,
            },
            reason: SessionEndReason::Idle,
        })
    }

    #[tokio::test]
    async fn subscriber_receives_chunks_of_its_sensor_only() {
        let hub = Hub::new(HubConfig::default());
        let mut sub = hub.subscribe_raw("a");
        hub.publish_samples(chunk("b", 0, 4));
        hub.publish_samples(chunk("a", 0, 4));
        let frame = sub.recv().await.unwrap();
        assert_eq!(&*frame.chunk().sensor_id, "a");
        assert_eq!(sub.pending(), 0);
        assert_eq!(hub.published_total(), 1);
    }

    #[test]
    fn publishing_without_subscribers_does_nothing() {
        let hub = Hub::new(HubConfig::default());
        hub.publish_samples(chunk("a", 0, 4));
        hub.publish_window(Arc::new(WindowRecord {
            sensor_id: "a".into(),
            window_start_us: 0,
            window_end_us: 1,
            count: 0,
            accl_mag_mean: 0.0,
            accl_mag_std: 0.0,
            accl_mag_min: 0.0,
            accl_mag_max: 0.0,
            gyro_mag_mean: 0.0,
            gyro_mag_std: 0.0,
            gyro_mag_min: 0.0,
            gyro_mag_max: 0.0,
        }));
        assert_eq!(hub.published_total(), 0);
        assert!(hub.topic_counts().iter().all(|(_, n)| *n == 0));
    }

    #[test]
    fn topic_is_removed_when_its_last_subscriber_leaves() {
        let hub = Hub::new(HubConfig::default());
        let first = hub.subscribe_raw("a");
        let second = hub.subscribe_raw("a");
        assert_eq!(hub.topic_counts()[0], ("raw", 1));
        drop(first);
        assert_eq!(hub.topic_counts()[0], ("raw", 1));
        drop(second);
        assert_eq!(hub.topic_counts()[0], ("raw", 0));
    }

    #[tokio::test]
    async fn lagging_subscriber_loses_oldest_messages_and_is_told_how_many() {
        let hub = Hub::new(HubConfig {
            topic_capacity: 4,
            ..HubConfig::default()
        });
        let mut sub = hub.subscribe_raw("a");
        for i in 0..10 {
            hub.publish_samples(chunk("a", i, 1));
        }
        assert_eq!(sub.pending(), 10);
        assert_eq!(sub.recv().await.unwrap_err(), RecvError::Lagged(6));
        let next = sub.recv().await.unwrap();
        assert_eq!(next.chunk().sample_index, vec![6]);
    }

    #[test]
    fn raw_json_keeps_every_nth_sample_by_index() {
        let frame = RawFrame::new(chunk("a", 0, 8));
        let all: Vec<serde_json::Value> =
            serde_json::from_str(frame.json(1).unwrap().as_str()).unwrap();
        assert_eq!(all.len(), 8);
        assert_eq!(all[3]["sample_index"], 3);
        assert_eq!(all[3]["sensor_id"], "a");
        let half: Vec<serde_json::Value> =
            serde_json::from_str(frame.json(2).unwrap().as_str()).unwrap();
        let indexes: Vec<_> = half
            .iter()
            .map(|r| r["sample_index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, vec![0, 2, 4, 6]);
        let sparse: Vec<serde_json::Value> =
            serde_json::from_str(frame.json(100).unwrap().as_str()).unwrap();
        assert_eq!(sparse.len(), 1);
        assert!(RawFrame::new(chunk("a", 1, 3)).json(100).is_none());
    }

    #[tokio::test]
    async fn a_large_chunk_is_published_as_messages_of_bounded_rows() {
        let hub = Hub::new(HubConfig::default());
        let mut sub = hub.subscribe_raw("a");
        let rows = 2 * RAW_ROWS_PER_MESSAGE + 88;
        hub.publish_samples(chunk("a", 1000, rows as u32));
        let mut indexes = Vec::new();
        for expected in [RAW_ROWS_PER_MESSAGE, RAW_ROWS_PER_MESSAGE, 88] {
            let frame = sub.recv().await.unwrap();
            let json: Vec<serde_json::Value> =
                serde_json::from_str(frame.json(1).unwrap().as_str()).unwrap();
            assert_eq!(json.len(), expected);
            indexes.extend(json.iter().map(|r| r["sample_index"].as_u64().unwrap()));
        }
        assert_eq!(sub.pending(), 0);
        assert_eq!(indexes, (1000..1000 + rows as u64).collect::<Vec<_>>());
        assert_eq!(hub.published_total(), 3);
    }

    #[test]
    fn raw_json_is_serialised_once_per_factor() {
        let frame = RawFrame::new(chunk("a", 0, 8));
        let a = frame.json(4).unwrap();
        let b = frame.json(4).unwrap();
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
    }

    #[tokio::test]
    async fn session_feed_is_tagged_and_carries_events_and_aggregates() {
        let hub = Hub::new(HubConfig::default());
        let mut one = hub.subscribe_session("s1_0");
        let mut all = hub.subscribe_sessions();
        hub.publish_aggregate(aggregate("s1_0"));
        hub.publish_session_event(ended("s1_0"));
        let a = serde_json::to_value(one.recv().await.unwrap()).unwrap();
        assert_eq!(a["type"], "aggregate");
        assert_eq!(a["distance_m"], 3.0);
        let e = serde_json::to_value(one.recv().await.unwrap()).unwrap();
        assert_eq!(e["type"], "session_event");
        assert_eq!(e["event"], "ended");
        assert_eq!(e["session"]["session_id"], "s1_0");
        assert!(matches!(
            all.recv().await.unwrap(),
            SessionMessage::Aggregate(_)
        ));
        assert!(matches!(
            all.recv().await.unwrap(),
            SessionMessage::SessionEvent(_)
        ));
    }

    #[test]
    fn latest_aggregates_of_ended_sessions_are_bounded() {
        let hub = Hub::new(HubConfig {
            ended_aggregates_kept: 2,
            ..HubConfig::default()
        });
        for s in ["a_0", "b_0", "c_0"] {
            hub.publish_aggregate(aggregate(s));
        }
        hub.publish_aggregate(aggregate("d_0"));
        for s in ["a_0", "b_0", "c_0"] {
            hub.publish_session_event(ended(s));
        }
        assert!(hub.latest_aggregate("a_0").is_none());
        assert!(hub.latest_aggregate("b_0").is_some());
        assert!(hub.latest_aggregate("c_0").is_some());
        assert_eq!(hub.latest_aggregate("d_0").unwrap().distance_m, 3.0);
    }
}
