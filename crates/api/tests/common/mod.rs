//! Shared fixtures: a fake status source, sample data and a server on 127.0.0.1:0.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use sensorflow_api::{
    ApiConfig, ApiState, ComponentStatus, Hub, HubConfig, ReadyStatus, SensorStatus, StatusSource,
};
use sensorflow_records::{
    SampleChunk, SessionAggregate, SessionEndReason, SessionQuery, SessionView, SessionsQuery,
    StoreError,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A status source backed by fixed data.
pub struct FakeStatus {
    pub ready: AtomicBool,
    pub sensors: Vec<SensorStatus>,
    pub sessions: FakeSessions,
}

/// Sessions store over a vector; records the last query.
pub struct FakeSessions {
    pub records: Vec<SessionView>,
    pub last_query: Mutex<Option<SessionQuery>>,
    pub fail: AtomicBool,
}

impl SessionsQuery for FakeSessions {
    fn list(&self, q: &SessionQuery) -> Result<Vec<SessionView>, StoreError> {
        *self.last_query.lock() = Some(q.clone());
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::backend(std::io::Error::other("disk on fire")));
        }
        Ok(self
            .records
            .iter()
            .filter(|r| q.active.is_none_or(|a| a == r.end_us.is_none()))
            .filter(|r| q.sensor_id.as_deref().is_none_or(|s| s == r.sensor_id))
            .skip(q.offset)
            .take(q.limit)
            .cloned()
            .collect())
    }

    fn get(&self, id: &str) -> Result<Option<SessionView>, StoreError> {
        Ok(self.records.iter().find(|r| r.session_id == id).cloned())
    }
}

impl StatusSource for FakeStatus {
    fn sensors(&self) -> Vec<SensorStatus> {
        self.sensors.clone()
    }

    fn sensor(&self, sensor_id: &str) -> Option<SensorStatus> {
        self.sensors
            .iter()
            .find(|s| s.sensor_id == sensor_id)
            .cloned()
    }

    fn ready(&self) -> ReadyStatus {
        let ok = self.ready.load(Ordering::Relaxed);
        ReadyStatus {
            ready: ok,
            components: BTreeMap::from([(
                "pipeline".to_owned(),
                ComponentStatus {
                    ok,
                    detail: if ok { "running" } else { "starting" }.into(),
                },
            )]),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        out.push_str("# TYPE sensorflow_runtime_up gauge\nsensorflow_runtime_up 1\n");
    }

    fn sessions(&self) -> &dyn SessionsQuery {
        &self.sessions
    }
}

pub fn sensor(id: &str, gaps: u64) -> SensorStatus {
    SensorStatus {
        sensor_id: id.into(),
        last_seen_us: Some(1_700_000_000_000_000),
        samples_per_s: 200.0,
        gaps,
        bad: BTreeMap::from([("bad_crc".to_owned(), 2)]),
        bad_total: 2,
        ..SensorStatus::default()
    }
}

/// A stored session; an ended one (`end_us` given) ended by a gap with its last aggregate.
pub fn session(id: &str, sensor: &str, end_us: Option<i64>) -> SessionView {
    SessionView {
        session_id: id.into(),
        sensor_id: sensor.into(),
        start_us: 1_000,
        end_us,
        last_seen_us: 2_000,
        sample_count: 10,
        end_reason: end_us.map(|_| SessionEndReason::Gap),
        active: end_us.is_none(),
        aggregate: end_us.map(|_| (*aggregate(id, sensor)).clone()),
    }
}

pub fn aggregate(session_id: &str, sensor: &str) -> Arc<SessionAggregate> {
    Arc::new(SessionAggregate {
        session_id: session_id.into(),
        sensor_id: sensor.into(),
        emitted_at_us: 5,
        max_velocity: 2.5,
        distance_m: 12.0,
        mean_velocity: 1.2,
        moving_time_s: 8.0,
        sample_count: 10,
        duration_s: 9.0,
    })
}

/// `n` consecutive samples of `sensor` starting at sample index `first`.
pub fn chunk(sensor: &str, first: u32, n: u32) -> Arc<SampleChunk> {
    let mut c = SampleChunk::with_capacity(sensor.into(), format!("{sensor}_0").into(), n as usize);
    for i in first..first + n {
        c.sample_index.push(i);
        c.timestamp_us
            .push(1_700_000_000_000_000 + i64::from(i) * 5000);
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
            col.push(i as f32 * 0.25);
        }
        c.temp_raw.push(21);
        c.ingest_us.push(1_700_000_000_000_000);
    }
    Arc::new(c)
}

pub fn fake_status() -> Arc<FakeStatus> {
    Arc::new(FakeStatus {
        ready: AtomicBool::new(true),
        sensors: vec![sensor("s2", 3), sensor("s1", 0)],
        sessions: FakeSessions {
            records: vec![
                session("s1_1000", "s1", None),
                session("s2_1000", "s2", None),
                session("s1_0", "s1", Some(900)),
            ],
            last_query: Mutex::new(None),
            fail: AtomicBool::new(false),
        },
    })
}

pub fn state_with(status: Arc<FakeStatus>, hub: HubConfig, config: ApiConfig) -> ApiState {
    ApiState::new(Hub::new(hub), status, config)
}

/// A running server; dropping the shutdown sender stops it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: ApiState,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

pub async fn start(state: ApiState) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(sensorflow_api::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        state,
        shutdown: Some(tx),
        task,
    }
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
