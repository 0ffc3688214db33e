//! Serves the API with a fake status source and synthetic sensors, for developing the dashboard
//! without the rest of the platform:
//!
//! ```text
//! cargo run -p sensorflow-api --example fake_server [-- 127.0.0.1:8000]
//! ```
//!
//! Three sensors stream 200 Hz samples in 64-sample chunks; each has an active session whose
//! aggregate is published every 2 s. Prints `http listening on ADDR` once bound.

use std::collections::BTreeMap;
use std::f32::consts::TAU;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use sensorflow_api::{
    ApiConfig, ApiState, ComponentStatus, Hub, HubConfig, ReadyStatus, SensorStatus, SessionQuery,
    SessionsQuery, StatusSource, StoreError,
};
use sensorflow_pipeline::{SampleChunk, SessionAggregate, SessionEvent, SessionRecord};

const SENSORS: [&str; 3] = ["imu-01", "imu-02", "imu-03"];
const RATE_HZ: i64 = 200;
const CHUNK: u32 = 64;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Status shared between the generator task and the API.
#[derive(Default)]
struct Fake {
    sensors: Mutex<BTreeMap<String, SensorStatus>>,
    sessions: Mutex<Vec<SessionRecord>>,
}

impl SessionsQuery for Fake {
    fn list(&self, q: &SessionQuery) -> Result<Vec<SessionRecord>, StoreError> {
        Ok(self
            .sessions
            .lock()
            .iter()
            .filter(|s| q.active.is_none_or(|a| a == s.end_us.is_none()))
            .filter(|s| q.sensor_id.as_deref().is_none_or(|id| id == &*s.sensor_id))
            .skip(q.offset)
            .take(q.limit)
            .cloned()
            .collect())
    }

    fn get(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self
            .sessions
            .lock()
            .iter()
            .find(|s| &*s.session_id == id)
            .cloned())
    }
}

impl StatusSource for Fake {
    fn sensors(&self) -> Vec<SensorStatus> {
        self.sensors.lock().values().cloned().collect()
    }

    fn sensor(&self, sensor_id: &str) -> Option<SensorStatus> {
        self.sensors.lock().get(sensor_id).cloned()
    }

    fn ready(&self) -> ReadyStatus {
        ReadyStatus {
            ready: true,
            components: BTreeMap::from([(
                "fake".to_owned(),
                ComponentStatus {
                    ok: true,
                    detail: "synthetic data".into(),
                },
            )]),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        out.push_str("# TYPE sensorflow_fake_up gauge\nsensorflow_fake_up 1\n");
    }

    fn sessions(&self) -> &dyn SessionsQuery {
        self
    }
}

/// One synthetic sensor: walks in bursts, with noise, so every chart has something to show.
struct Sim {
    id: Arc<str>,
    session: SessionRecord,
    phase: f32,
    next_index: u32,
    next_us: i64,
    distance: f64,
    moving_s: f64,
    max_v: f64,
    samples: u64,
}

impl Sim {
    fn new(id: &str, k: usize, start_us: i64) -> Self {
        let session_id: Arc<str> = format!("{id}_{start_us}").into();
        Self {
            id: id.into(),
            session: SessionRecord {
                session_id,
                sensor_id: id.into(),
                start_us,
                end_us: None,
                last_seen_us: start_us,
                sample_count: 0,
            },
            phase: k as f32 * 1.7,
            next_index: 0,
            next_us: start_us,
            distance: 0.0,
            moving_s: 0.0,
            max_v: 0.0,
            samples: 0,
        }
    }

    fn chunk(&mut self) -> SampleChunk {
        let mut c = SampleChunk::with_capacity(
            self.id.clone(),
            self.session.session_id.clone(),
            CHUNK as usize,
        );
        for _ in 0..CHUNK {
            // Seconds since the session start: absolute epoch seconds lose all precision in f32.
            let t = (self.next_us - self.session.start_us) as f32 / 1e6 + self.phase * 10.0;
            let walking = (t * 0.2).sin() > -0.3;
            let stride = (t * TAU * 1.8).sin();
            let amp = if walking { 0.45 } else { 0.03 };
            let noise = ((self.next_index as f32 * 12.9898).sin() * 43758.547).fract() - 0.5;
            let (ax, ay, az) = (
                amp * stride * 0.6,
                amp * (stride * 0.5).cos() * 0.3,
                1.0 + amp * stride + 0.02 * noise,
            );
            let (gx, gy, gz) = (
                amp * 2.0 * stride,
                amp * 1.2 * (t * 3.0).cos(),
                0.05 * noise,
            );
            let prob = if walking {
                0.85 + 0.1 * stride.abs()
            } else {
                0.08 + 0.05 * noise.abs()
            };
            let v = if prob >= 0.5 {
                1.3 + 0.25 * (t * 0.7).sin() + 0.05 * noise
            } else {
                0.0
            };
            c.sample_index.push(self.next_index);
            c.timestamp_us.push(self.next_us);
            c.acc_x.push(ax);
            c.acc_y.push(ay);
            c.acc_z.push(az);
            c.gyro_x.push(gx);
            c.gyro_y.push(gy);
            c.gyro_z.push(gz);
            c.mag_x.push(0.2);
            c.mag_y.push(-0.1);
            c.mag_z.push(0.4);
            c.temp_raw.push(2400);
            c.accl_mag.push((ax * ax + ay * ay + az * az).sqrt());
            c.gyro_mag.push((gx * gx + gy * gy + gz * gz).sqrt());
            c.velocity_pred.push(v);
            c.movement_prob.push(prob);
            c.ingest_us.push(now_us());
            let dt = 1.0 / RATE_HZ as f64;
            self.distance += f64::from(v) * dt;
            if v > 0.0 {
                self.moving_s += dt;
            }
            self.max_v = self.max_v.max(f64::from(v));
            self.samples += 1;
            self.next_index += 1;
            self.next_us += 1_000_000 / RATE_HZ;
        }
        self.session.last_seen_us = self.next_us;
        self.session.sample_count = self.samples;
        c
    }

    fn aggregate(&self) -> SessionAggregate {
        let duration_s = (self.next_us - self.session.start_us) as f64 / 1e6;
        SessionAggregate {
            session_id: self.session.session_id.clone(),
            sensor_id: self.id.clone(),
            emitted_at_us: now_us(),
            max_velocity: self.max_v,
            distance_m: self.distance,
            mean_velocity: if duration_s > 0.0 {
                self.distance / duration_s
            } else {
                0.0
            },
            moving_time_s: self.moving_s,
            sample_count: self.samples,
            duration_s,
        }
    }
}

async fn generate(hub: Hub, fake: Arc<Fake>) {
    let start = now_us();
    let mut sims: Vec<Sim> = SENSORS
        .iter()
        .enumerate()
        .map(|(k, id)| Sim::new(id, k, start))
        .collect();
    for sim in &sims {
        fake.sessions.lock().push(sim.session.clone());
        hub.publish_session_event(Arc::new(SessionEvent::Started {
            session: sim.session.clone(),
        }));
    }
    let period = Duration::from_micros(u64::from(CHUNK) * 1_000_000 / RATE_HZ as u64);
    let mut tick = tokio::time::interval(period);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let now = now_us();
        for (k, sim) in sims.iter_mut().enumerate() {
            let chunk = sim.chunk();
            let mut sensors = fake.sensors.lock();
            let s = sensors
                .entry(sim.id.to_string())
                .or_insert_with(|| SensorStatus {
                    sensor_id: sim.id.to_string(),
                    first_seen_us: Some(now),
                    ..SensorStatus::default()
                });
            s.last_seen_us = Some(now);
            s.samples_per_s = RATE_HZ as f64;
            s.packets_per_s = RATE_HZ as f64 / f64::from(CHUNK);
            s.packets_decoded += 1;
            s.samples_decoded += chunk.len() as u64;
            s.active_session_id = Some(sim.session.session_id.to_string());
            if k == 2 && n.is_multiple_of(50) {
                *s.bad.entry("bad_crc".to_owned()).or_default() += 1;
                s.bad_total += 1;
                s.gaps += 1;
                s.missing_samples += 64;
            }
            drop(sensors);
            hub.publish_samples(Arc::new(chunk));
            if let Some(stored) = fake
                .sessions
                .lock()
                .iter_mut()
                .find(|r| r.session_id == sim.session.session_id)
            {
                *stored = sim.session.clone();
            }
        }
        if n.is_multiple_of(6) {
            for sim in &sims {
                hub.publish_aggregate(Arc::new(sim.aggregate()));
            }
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("http listening on {}", listener.local_addr()?);
    let hub = Hub::new(HubConfig::default());
    let fake = Arc::new(Fake::default());
    tokio::spawn(generate(hub.clone(), fake.clone()));
    let state = ApiState::new(hub, fake, ApiConfig::default());
    sensorflow_api::serve(listener, state, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
