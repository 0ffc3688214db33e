//! What the api role's HTTP API shows, built from the output topics: the sessions table, a
//! sensor table derived from the rows (last seen, sample and packet counts and rates, gaps, late
//! samples, active session), readiness (the sessions catch-up) and the consumers' metrics.
//!
//! Counters only the processor knows (bad input by reason, duplicates, restarts, reordered
//! samples) are not on any topic: they stay 0 here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use sensorflow_api::{ComponentStatus, Hub, ReadyStatus, SensorStatus, StatusSource};
use sensorflow_kafka::TopicNames;
use sensorflow_kafka::api_feed::sessions::{SessionTable, SharedSessions};
use sensorflow_kafka::api_feed::{FeedRecord, FeedStats, OutputTopic};
use sensorflow_records::{GapRecord, LateRecord, SampleChunk, SessionEvent, SessionsQuery};

use crate::runtime::{RateState, family, gauge_like, sample};

/// Sessions the table holds before it forgets the ended ones that started first (about 0.5 KB
/// each).
pub(super) const MAX_SESSIONS: usize = 1_000_000;

/// One sensor as the topics show it.
#[derive(Clone, Debug, Default)]
struct SensorEntry {
    first_seen_us: Option<i64>,
    last_seen_us: Option<i64>,
    samples: u64,
    packets: u64,
    gaps: u64,
    missing_samples: u64,
    late: u64,
    active_session: Option<Arc<str>>,
    rates: RateState,
}

/// Every sensor the topics named since start, bounded like the pipeline's sensor state.
#[derive(Debug)]
pub(super) struct SensorTable {
    sensors: HashMap<Arc<str>, SensorEntry>,
    max_sensors: usize,
    /// Records of sensors beyond `max_sensors`.
    untracked: u64,
    last_refresh: Option<Instant>,
}

impl SensorTable {
    pub(super) fn new(max_sensors: usize) -> SensorTable {
        SensorTable {
            sensors: HashMap::new(),
            max_sensors,
            untracked: 0,
            last_refresh: None,
        }
    }

    fn entry(&mut self, sensor_id: &Arc<str>) -> Option<&mut SensorEntry> {
        if !self.sensors.contains_key(sensor_id) {
            if self.sensors.len() >= self.max_sensors {
                self.untracked += 1;
                return None;
            }
            self.sensors
                .insert(Arc::clone(sensor_id), SensorEntry::default());
        }
        self.sensors.get_mut(sensor_id)
    }

    /// One message's chunk of processed samples: `last_seen_us` is the latest receive time
    /// (`ingest_us`) of its rows.
    pub(super) fn samples(&mut self, chunk: &SampleChunk) {
        let Some(e) = self.entry(&chunk.sensor_id) else {
            return;
        };
        e.samples += chunk.len() as u64;
        e.packets += 1;
        if let Some(last) = chunk.ingest_us.iter().max() {
            e.last_seen_us = Some(e.last_seen_us.map_or(*last, |l| l.max(*last)));
        }
        if let Some(first) = chunk.ingest_us.iter().min() {
            e.first_seen_us = Some(e.first_seen_us.map_or(*first, |f| f.min(*first)));
        }
    }

    pub(super) fn gap(&mut self, g: &GapRecord) {
        if let Some(e) = self.entry(&g.sensor_id) {
            e.gaps += 1;
            e.missing_samples += g.missing;
        }
    }

    pub(super) fn late(&mut self, l: &LateRecord) {
        if let Some(e) = self.entry(&l.sensor_id) {
            e.late += 1;
        }
    }

    /// A sensor's events arrive in order (one partition per key): the last one says whether a
    /// session is active.
    pub(super) fn session(&mut self, event: &SessionEvent) {
        let s = event.session();
        let Some(e) = self.entry(&s.sensor_id) else {
            return;
        };
        match event {
            SessionEvent::Started { session } => {
                e.active_session = Some(session.session_id.clone())
            }
            SessionEvent::Ended { session, .. } => {
                if e.active_session.as_deref() == Some(&*session.session_id) {
                    e.active_session = None;
                }
            }
        }
    }

    /// Updates the smoothed rates from the counts since the previous refresh.
    pub(super) fn refresh(&mut self, now: Instant) {
        let elapsed = self
            .last_refresh
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|s| *s > 0.0);
        for e in self.sensors.values_mut() {
            e.rates = RateState::next(Some(e.rates), e.samples, e.packets, elapsed);
        }
        self.last_refresh = Some(now);
    }

    fn status(id: &str, e: &SensorEntry) -> SensorStatus {
        SensorStatus {
            sensor_id: id.to_owned(),
            last_seen_us: e.last_seen_us,
            first_seen_us: e.first_seen_us,
            samples_per_s: e.rates.samples_per_s,
            packets_per_s: e.rates.packets_per_s,
            packets_decoded: e.packets,
            samples_decoded: e.samples,
            gaps: e.gaps,
            missing_samples: e.missing_samples,
            late: e.late,
            active_session_id: e.active_session.as_deref().map(str::to_owned),
            ..SensorStatus::default()
        }
    }

    pub(super) fn get(&self, sensor_id: &str) -> Option<SensorStatus> {
        self.sensors
            .get_key_value(sensor_id)
            .map(|(id, e)| Self::status(id, e))
    }

    pub(super) fn all(&self) -> Vec<SensorStatus> {
        self.sensors
            .iter()
            .map(|(id, e)| Self::status(id, e))
            .collect()
    }
}

/// Catch-up of one from-beginning reader: partitions at their start end offsets, partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CatchUpState {
    at_end: usize,
    partitions: usize,
    done: bool,
}

/// The api role's [`StatusSource`].
pub(crate) struct ApiStatus {
    sessions: SharedSessions,
    sensors: Mutex<SensorTable>,
    feed: Arc<FeedStats>,
    topics: TopicNames,
    /// Catch-up of the sessions and aggregates readers; absent until they opened.
    catch_up: RwLock<BTreeMap<OutputTopic, CatchUpState>>,
    /// `Ok(detail)` once the consumers are assigned, `Err(why not)` before.
    kafka: RwLock<Result<String, String>>,
}

impl ApiStatus {
    pub(crate) fn new(topics: TopicNames, max_sensors: usize, feed: Arc<FeedStats>) -> ApiStatus {
        ApiStatus {
            sessions: SharedSessions::new(SessionTable::new(MAX_SESSIONS)),
            sensors: Mutex::new(SensorTable::new(max_sensors)),
            feed,
            topics,
            catch_up: RwLock::new(BTreeMap::new()),
            kafka: RwLock::new(Err("not connected yet".into())),
        }
    }

    /// Applies one record to the tables and, when `live`, publishes it to the hub as the
    /// embedded pipeline does (samples, windows, aggregates, session events).
    pub(crate) fn apply(&self, hub: &Hub, record: FeedRecord, live: bool) {
        match record {
            FeedRecord::Samples(chunks) => {
                let mut sensors = self.sensors.lock();
                for c in &chunks {
                    sensors.samples(c);
                }
                drop(sensors);
                if live {
                    for c in chunks {
                        hub.publish_samples(Arc::new(c));
                    }
                }
            }
            FeedRecord::Aggregate(a) => {
                let a = Arc::new(a);
                self.sessions.update(|t| t.apply_aggregate((*a).clone()));
                if live {
                    hub.publish_aggregate(a);
                }
            }
            FeedRecord::Session(e) => {
                self.sessions.update(|t| t.apply_event(&e));
                self.sensors.lock().session(&e);
                if live {
                    hub.publish_session_event(Arc::new(e));
                }
            }
            FeedRecord::Window(w) => {
                if live {
                    hub.publish_window(Arc::new(w));
                }
            }
            FeedRecord::Gap(g) => self.sensors.lock().gap(&g),
            FeedRecord::Late(l) => self.sensors.lock().late(&l),
        }
    }

    /// Records a from-beginning reader's progress.
    pub(crate) fn catch_up(
        &self,
        topic: OutputTopic,
        (at_end, partitions): (usize, usize),
        done: bool,
    ) {
        let state = CatchUpState {
            at_end,
            partitions,
            done,
        };
        let mut catch_up = self.catch_up.write();
        if catch_up.get(&topic) != Some(&state) {
            catch_up.insert(topic, state);
        }
    }

    pub(crate) fn set_kafka(&self, state: Result<String, String>) {
        *self.kafka.write() = state;
    }

    /// Rates (every 500 ms from a timer).
    pub(crate) fn refresh(&self, now: Instant) {
        self.sensors.lock().refresh(now);
    }

    /// True once both from-beginning readers read up to the end offsets captured at start.
    fn caught_up(&self) -> bool {
        let catch_up = self.catch_up.read();
        [OutputTopic::Sessions, OutputTopic::Aggregates]
            .iter()
            .all(|t| catch_up.get(t).is_some_and(|s| s.done))
    }
}

impl StatusSource for ApiStatus {
    fn sensors(&self) -> Vec<SensorStatus> {
        self.sensors.lock().all()
    }

    fn sensor(&self, sensor_id: &str) -> Option<SensorStatus> {
        self.sensors.lock().get(sensor_id)
    }

    fn ready(&self) -> ReadyStatus {
        let mut components = BTreeMap::new();
        components.insert(
            "kafka".to_owned(),
            match &*self.kafka.read() {
                Ok(d) => ComponentStatus {
                    ok: true,
                    detail: d.clone(),
                },
                Err(e) => ComponentStatus {
                    ok: false,
                    detail: e.clone(),
                },
            },
        );
        let catch_up = self.catch_up.read().clone();
        let caught_up = self.caught_up();
        let detail = if caught_up {
            format!(
                "read {} and {} up to their end offsets at start; following them",
                self.topics.sessions, self.topics.aggregated
            )
        } else {
            let progress: Vec<String> = [OutputTopic::Sessions, OutputTopic::Aggregates]
                .iter()
                .map(|t| match catch_up.get(t) {
                    Some(s) => format!(
                        "{}: {} of {} partitions at their end offset",
                        t.name(&self.topics),
                        s.at_end,
                        s.partitions
                    ),
                    None => format!("{}: not reading yet", t.name(&self.topics)),
                })
                .collect();
            format!("catching up: {}", progress.join(", "))
        };
        components.insert(
            "sessions".to_owned(),
            ComponentStatus {
                ok: caught_up,
                detail,
            },
        );
        ReadyStatus {
            ready: components.values().all(|c| c.ok),
            components,
        }
    }

    fn render_metrics(&self, out: &mut String) {
        let sensors = self.sensors();
        family(
            out,
            "sensorflow_sensor_samples_total",
            "counter",
            "Samples read per sensor since start.",
        );
        for s in &sensors {
            sample(
                out,
                "sensorflow_sensor_samples_total",
                &[("sensor_id", &s.sensor_id)],
                s.samples_decoded,
            );
        }
        family(
            out,
            "sensorflow_sensor_packets_total",
            "counter",
            "Sample messages (packets) read per sensor since start.",
        );
        for s in &sensors {
            sample(
                out,
                "sensorflow_sensor_packets_total",
                &[("sensor_id", &s.sensor_id)],
                s.packets_decoded,
            );
        }
        type Counter = fn(&FeedStats, OutputTopic) -> u64;
        let per_topic: [(&str, &str, &str, Counter); 3] = [
            (
                "sensorflow_kafka_records_consumed_total",
                "counter",
                "Records read from each output topic and applied.",
                FeedStats::consumed,
            ),
            (
                "sensorflow_kafka_records_malformed_total",
                "counter",
                "Records of each output topic that did not decode, skipped.",
                FeedStats::malformed,
            ),
            (
                "sensorflow_kafka_consumer_lag_records",
                "gauge",
                "Committed records of each output topic not read yet (librdkafka statistics, about 1 s old).",
                FeedStats::lag,
            ),
        ];
        for (name, kind, help, value) in per_topic {
            family(out, name, kind, help);
            for t in OutputTopic::ALL {
                sample(
                    out,
                    name,
                    &[("topic", t.name(&self.topics))],
                    value(&self.feed, t),
                );
            }
        }
        gauge_like(
            out,
            "sensorflow_kafka_consumer_errors_total",
            "counter",
            "Errors the output topics' consumers reported.",
            self.feed.errors(),
        );
        let (held, evicted) = self.sessions.read(|t| (t.len() as u64, t.evicted()));
        gauge_like(
            out,
            "sensorflow_api_sessions",
            "gauge",
            "Sessions held (from the sessions topic).",
            held,
        );
        gauge_like(
            out,
            "sensorflow_api_sessions_evicted_total",
            "counter",
            "Ended sessions forgotten to stay within the table's bound.",
            evicted,
        );
        let untracked = self.sensors.lock().untracked;
        gauge_like(
            out,
            "sensorflow_api_sensors_untracked_total",
            "counter",
            "Records of sensors beyond pipeline.max_sensors, not shown per sensor.",
            untracked,
        );
        gauge_like(
            out,
            "sensorflow_api_caught_up",
            "gauge",
            "1 once the sessions and aggregates topics were read up to their end offsets at start.",
            u64::from(self.caught_up()),
        );
    }

    fn sessions(&self) -> &dyn SessionsQuery {
        &self.sessions
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;
    use sensorflow_records::{SessionAggregate, SessionEndReason, SessionRecord};
    use std::time::Duration;

    fn topics() -> TopicNames {
        TopicNames {
            ingest: "i".into(),
            transformed: "t".into(),
            aggregated: "a".into(),
            sessions: "s".into(),
            windows: "w".into(),
            gaps: "g".into(),
            late: "l".into(),
            changelog: "c".into(),
        }
    }

    fn chunk(sensor: &str, n: usize, ingest_us: i64) -> SampleChunk {
        let mut c = SampleChunk::with_capacity(sensor.into(), format!("{sensor}_1").into(), n);
        for i in 0..n {
            c.sample_index.push(i as u32);
            c.timestamp_us.push(i as i64);
            for col in c.f32_columns_mut() {
                col.push(0.0);
            }
            c.temp_raw.push(0);
            c.ingest_us.push(ingest_us);
        }
        c
    }

    fn session(sensor: &str, start_us: i64) -> SessionRecord {
        SessionRecord {
            session_id: format!("{sensor}_{start_us}").into(),
            sensor_id: sensor.into(),
            start_us,
            end_us: None,
            last_seen_us: start_us,
            sample_count: 1,
        }
    }

    #[test]
    fn sensors_show_what_the_topics_carry() {
        let status = ApiStatus::new(topics(), 10, Arc::default());
        let hub = Hub::new(Default::default());
        status.apply(&hub, FeedRecord::Samples(vec![chunk("a", 64, 100)]), true);
        status.apply(
            &hub,
            FeedRecord::Samples(vec![chunk("a", 64, 50), chunk("b", 3, 7)]),
            true,
        );
        status.apply(
            &hub,
            FeedRecord::Gap(GapRecord {
                sensor_id: "a".into(),
                from_index: 1,
                to_index: 5,
                missing: 4,
                detected_at_us: 1,
            }),
            true,
        );
        status.apply(
            &hub,
            FeedRecord::Session(SessionEvent::Started {
                session: session("a", 1),
            }),
            false,
        );
        let a = status.sensor("a").unwrap();
        assert_eq!((a.samples_decoded, a.packets_decoded), (128, 2));
        assert_eq!((a.first_seen_us, a.last_seen_us), (Some(50), Some(100)));
        assert_eq!((a.gaps, a.missing_samples), (1, 4));
        assert_eq!(a.active_session_id.as_deref(), Some("a_1"));
        assert!(
            a.bad.is_empty() && a.bad_total == 0,
            "only the processor knows bad input"
        );
        status.apply(
            &hub,
            FeedRecord::Session(SessionEvent::Ended {
                session: session("a", 1),
                reason: SessionEndReason::Idle,
            }),
            false,
        );
        assert_eq!(status.sensor("a").unwrap().active_session_id, None);
        assert_eq!(status.sensors().len(), 2);
    }

    #[test]
    fn rates_follow_the_samples_read_between_refreshes() {
        let mut t = SensorTable::new(10);
        let t0 = Instant::now();
        t.samples(&chunk("a", 64, 1));
        t.refresh(t0);
        for _ in 0..10 {
            t.samples(&chunk("a", 64, 1));
        }
        t.refresh(t0 + Duration::from_secs(1));
        let a = t.get("a").unwrap();
        assert!(
            a.samples_per_s > 0.0 && a.samples_per_s < 640.0,
            "{}",
            a.samples_per_s
        );
        assert!(a.packets_per_s > 0.0);
    }

    #[test]
    fn the_sensor_table_is_bounded() {
        let mut t = SensorTable::new(1);
        t.samples(&chunk("a", 1, 1));
        t.samples(&chunk("b", 1, 1));
        assert!(t.get("b").is_none());
        assert_eq!(t.untracked, 1);
    }

    #[test]
    fn ready_only_once_sessions_and_aggregates_caught_up() {
        let status = ApiStatus::new(topics(), 10, Arc::default());
        status.set_kafka(Ok("consuming".into()));
        assert!(!status.ready().ready);
        status.catch_up(OutputTopic::Sessions, (3, 3), true);
        status.catch_up(OutputTopic::Aggregates, (1, 3), false);
        let r = status.ready();
        assert!(!r.ready);
        assert!(
            r.components["sessions"].detail.contains("a: 1 of 3"),
            "{r:?}"
        );
        status.catch_up(OutputTopic::Aggregates, (3, 3), true);
        assert!(status.ready().ready);
    }

    #[test]
    fn history_feeds_the_tables_but_only_live_records_reach_the_hub() {
        let status = ApiStatus::new(topics(), 10, Arc::default());
        let hub = Hub::new(Default::default());
        let a = SessionAggregate {
            session_id: "a_1".into(),
            sensor_id: "a".into(),
            emitted_at_us: 5,
            max_velocity: 1.0,
            distance_m: 2.0,
            mean_velocity: 0.5,
            moving_time_s: 1.0,
            sample_count: 9,
            duration_s: 3.0,
        };
        status.apply(
            &hub,
            FeedRecord::Session(SessionEvent::Started {
                session: session("a", 1),
            }),
            false,
        );
        status.apply(&hub, FeedRecord::Aggregate(a.clone()), false);
        assert!(hub.latest_aggregate("a_1").is_none());
        let view = status.sessions().get("a_1").unwrap().unwrap();
        assert_eq!(view.aggregate, Some(a.clone()));
        status.apply(&hub, FeedRecord::Aggregate(a), true);
        assert!(hub.latest_aggregate("a_1").is_some());
        let mut m = String::new();
        status.render_metrics(&mut m);
        assert!(m.contains("sensorflow_api_sessions 1"), "{m}");
        assert!(
            m.contains("sensorflow_kafka_records_malformed_total{topic=\"s\"} 0"),
            "{m}"
        );
    }
}
