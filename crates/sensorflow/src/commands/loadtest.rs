//! `sensorflow loadtest`: drives N virtual sensors at a platform and measures what came out.
//!
//! Without `--mqtt`/`--http` it starts `sensorflow run` as a child process on free loopback
//! ports with a temporary data dir (so the platform's CPU and memory are measured alone, from
//! `/proc`), publishes with QoS 1, subscribes to `/ws/raw` of a sample of sensors, then stops the
//! child gracefully and counts every acknowledged sample in the lake.
//!
//! Latency is publish → WebSocket receipt per packet: the simulator publishes a packet when its
//! last sample's period has elapsed, at `last_timestamp_us + period`, so a WebSocket message
//! whose newest sample has device time `t` was due for publishing at `t + period`; the latency
//! is its receipt time minus that. A lagging simulator makes latencies look worse, never better.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::runtime::now_us;
use crate::sim::{AckedPacket, SimConfig, Simulator};

/// How long the lake of a running platform may stay unchanged before it is counted as final.
const LAKE_SETTLE: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LoadtestArgs {
    /// Virtual sensors.
    #[arg(long, default_value_t = 100)]
    pub(crate) sensors: usize,
    /// Sample rate per sensor, Hz.
    #[arg(long, default_value_t = 200)]
    pub(crate) rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 60)]
    pub(crate) duration: u64,
    /// MQTT address of a running platform (default: start `sensorflow run` as a child).
    #[arg(long, requires = "http")]
    pub(crate) mqtt: Option<SocketAddr>,
    /// HTTP address of a running platform.
    #[arg(long, requires = "mqtt")]
    pub(crate) http: Option<SocketAddr>,
    /// Lake root of a running platform, to count delivered samples (child mode knows its own).
    #[arg(long)]
    pub(crate) lake: Option<PathBuf>,
    /// Sensors whose `/ws/raw` feed is measured for latency.
    #[arg(long, default_value_t = 20)]
    pub(crate) ws_sensors: usize,
    /// MQTT connections the sensors are spread over (default: the simulator's).
    #[arg(long)]
    pub(crate) connections: Option<usize>,
    /// Extra `KEY=VALUE` environment for the child platform (e.g. SENSORFLOW_LOG_DURABILITY=fsync).
    #[arg(long = "platform-env", value_name = "KEY=VALUE")]
    pub(crate) platform_env: Vec<String>,
    /// A run whose p99 publish → WebSocket latency exceeds this is not sustained: the platform
    /// is falling behind even if it catches up after the load stops.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) max_p99_ms: f64,
    /// Find the largest sustainable sensor count: double from --sensors until a run loses data
    /// or falls behind, then bisect.
    #[arg(long)]
    pub(crate) ramp: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write every latency measurement to this CSV file (`received_unix_us,latency_ms`, in
    /// receipt order) to see when the slow ones happened; a ramp overwrites it per run.
    #[arg(long, value_name = "FILE")]
    pub(crate) latency_log: Option<PathBuf>,
}

/// What one load test run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) sensors: usize,
    pub(crate) rate_hz: u32,
    pub(crate) duration_s: f64,
    pub(crate) samples_sent: u64,
    pub(crate) samples_acked: u64,
    /// `None` when the lake could not be read (a remote platform without `--lake`).
    pub(crate) samples_in_lake: Option<u64>,
    pub(crate) duplicates_in_lake: Option<u64>,
    /// Acknowledged samples missing from the lake.
    pub(crate) lost: Option<u64>,
    pub(crate) publish_errors: u64,
    /// Times the simulator could not publish on schedule (the platform slowed it down).
    pub(crate) lag_events: u64,
    pub(crate) latency_samples: usize,
    pub(crate) latency_ms_p50: Option<f64>,
    pub(crate) latency_ms_p99: Option<f64>,
    pub(crate) latency_ms_max: Option<f64>,
    pub(crate) rss_mb_max: Option<f64>,
    pub(crate) cpu_pct_mean: Option<f64>,
    /// Zero loss, no publish error, the simulator kept its schedule, and p99 latency stayed
    /// within `--max-p99-ms`.
    pub(crate) sustained: bool,
    /// The CPU the run was measured on (`None` where `/proc/cpuinfo` is not available): the
    /// same binary's figures differ severalfold between hosts of the same size.
    pub(crate) host_cpu: Option<String>,
}

pub(crate) async fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    if args.ramp {
        return ramp(args).await;
    }
    let report = one_run(&args, args.sensors).await?;
    print_report(&report, args.json)?;
    if report.lost.unwrap_or(0) > 0 {
        bail!(
            "{} acknowledged samples are missing from the lake",
            report.lost.unwrap_or(0)
        );
    }
    Ok(())
}

async fn ramp(args: LoadtestArgs) -> anyhow::Result<()> {
    let mut good: Option<Report> = None;
    let mut bad: Option<usize> = None;
    let mut n = args.sensors.max(1);
    loop {
        let report = one_run(&args, n).await?;
        eprintln!(
            "ramp: {n} sensors -> sustained={} lost={:?} lag_events={} p99={:?} ms",
            report.sustained, report.lost, report.lag_events, report.latency_ms_p99
        );
        if report.sustained {
            good = Some(report);
        } else {
            bad = Some(n);
        }
        let lo = good.as_ref().map_or(0, |r| r.sensors);
        n = match bad {
            None => n * 2,
            Some(hi) if hi - lo > (hi / 10).max(1) => lo + (hi - lo) / 2,
            Some(_) => break,
        };
    }
    match good {
        Some(report) => print_report(&report, args.json),
        None => bail!("not even {} sensors were sustained", args.sensors),
    }
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

/// The platform under test: a child process we own, or a running one.
struct Target {
    mqtt: SocketAddr,
    http: SocketAddr,
    lake: Option<PathBuf>,
    child: Option<ChildPlatform>,
}

struct ChildPlatform {
    child: Child,
    /// Deleted when this is dropped, after the child is gone (see `Drop`).
    _data_dir: tempfile::TempDir,
}

impl Drop for ChildPlatform {
    /// A normal run stops the child gracefully first (`stop_child`). On an early return (an
    /// error mid-run) the child would otherwise outlive the load test, orphaned, with its data
    /// directory deleted under it by `_data_dir` (dropped right after this): every log segment
    /// gone, its dataflow failing on each restart. So it is killed and reaped first.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn one_run(args: &LoadtestArgs, sensors: usize) -> anyhow::Result<Report> {
    let mut target = match (args.mqtt, args.http) {
        (Some(mqtt), Some(http)) => Target {
            mqtt,
            http,
            lake: args.lake.clone(),
            child: None,
        },
        _ => start_child(&args.platform_env)?,
    };
    let pid = target.child.as_ref().map(|c| c.child.id());

    // Resource sampling of the child, once a second.
    let (stop_tx, stop_rx) = watch::channel(false);
    let usage = pid.map(|pid| tokio::spawn(sample_usage(pid, stop_rx.clone())));

    // Latency: subscribe before publishing.
    // (receipt time µs since the epoch, latency ms), in receipt order.
    let latencies = Arc::new(Mutex::new(Vec::<(i64, f64)>::new()));
    let period_us = 1_000_000 / i64::from(args.rate.max(1));
    let sim_config = SimConfig {
        host: target.mqtt.ip().to_string(),
        port: target.mqtt.port(),
        sensors,
        rate_hz: args.rate,
        duration: Some(Duration::from_secs(args.duration)),
        connections: args.connections,
        seed: 42,
        ..SimConfig::default()
    };
    let ws_ids: Vec<String> = sim_config
        .sensor_ids()
        .step_by((sensors / args.ws_sensors.max(1)).max(1))
        .take(args.ws_sensors)
        .collect();
    let mut ws_tasks = Vec::new();
    for id in &ws_ids {
        let url = format!("ws://{}/ws/raw/{id}", target.http);
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("connecting {url}"))?;
        let latencies = latencies.clone();
        let mut stop = stop_rx.clone();
        ws_tasks.push(tokio::spawn(async move {
            let (_, mut read) = ws.split();
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    msg = read.next() => {
                        let Some(Ok(msg)) = msg else { break };
                        let received = now_us();
                        if let Ok(text) = msg.into_text()
                            && let Some(newest) = newest_timestamp(&text)
                        {
                            latencies.lock().push((received, (received - (newest + period_us)) as f64 / 1000.0));
                        }
                    }
                }
            }
        }));
    }

    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<AckedPacket>();
    let ack_counter = tokio::spawn(async move {
        let mut acked: HashMap<Arc<str>, u64> = HashMap::new();
        while let Some(p) = ack_rx.recv().await {
            *acked.entry(p.sensor_id).or_default() += u64::from(p.samples);
        }
        acked
    });
    let started = Instant::now();
    let (_sim_stop_tx, sim_stop_rx) = watch::channel(false);
    let sim = Simulator::spawn(
        SimConfig {
            on_ack: Some(ack_tx),
            ..sim_config
        },
        sim_stop_rx,
    )?;
    let sim_stats = sim.join().await;
    let elapsed = started.elapsed().as_secs_f64();
    let acked = ack_counter.await.context("counting acknowledgements")?;
    // Let the last packets reach the WebSocket feeds before closing them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    for t in ws_tasks {
        let _ = t.await;
    }
    let (rss_mb_max, cpu_pct_mean) = match usage {
        Some(handle) => handle.await.unwrap_or((None, None)),
        None => (None, None),
    };

    // Graceful stop of the child flushes the lake; then count. A running platform (e.g. the
    // processors of the distributed mode) commits its lake files on its own schedule: its lake
    // is counted again until nothing is missing or it stopped growing for LAKE_SETTLE.
    if let Some(child) = target.child.as_mut() {
        stop_child(&mut child.child)?;
    }
    let samples_acked: u64 = acked.values().sum();
    let mut lake_counts = None;
    if let Some(root) = &target.lake {
        let mut last_change = Instant::now();
        loop {
            let counts = tokio::task::spawn_blocking({
                let root = root.clone();
                move || sensorflow_lake::count_samples_by_sensor(&root)
            })
            .await??;
            let rows: u64 = counts.rows.values().sum();
            let before = lake_counts
                .as_ref()
                .map(|c: &sensorflow_lake::SampleCounts| c.rows.values().sum::<u64>());
            if before != Some(rows) {
                last_change = Instant::now();
            }
            lake_counts = Some(counts);
            if target.child.is_some()
                || rows >= samples_acked
                || last_change.elapsed() > LAKE_SETTLE
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let (samples_in_lake, duplicates, lost) = match &lake_counts {
        Some(c) => {
            let lost: u64 = acked
                .iter()
                .map(|(id, n)| n.saturating_sub(c.rows.get(&**id).copied().unwrap_or(0)))
                .sum();
            (Some(c.rows.values().sum()), Some(c.duplicates), Some(lost))
        }
        None => (None, None, None),
    };
    let measured = std::mem::take(&mut *latencies.lock());
    if let Some(path) = &args.latency_log {
        let csv: String = measured
            .iter()
            .map(|(at, ms)| format!("{at},{ms:.3}\n"))
            .collect();
        std::fs::write(path, format!("received_unix_us,latency_ms\n{csv}"))
            .with_context(|| format!("writing the latency log {}", path.display()))?;
    }
    let mut lat: Vec<f64> = measured.into_iter().map(|(_, ms)| ms).collect();
    lat.sort_by(f64::total_cmp);
    let pct =
        |p: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * p).round() as usize]);
    let p99 = pct(0.99);
    let sustained = lost == Some(0)
        && duplicates == Some(0)
        && sim_stats.errors == 0
        && sim_stats.lag_events == 0
        && sim_stats.packets_lost == 0
        && p99.is_some_and(|p| p <= args.max_p99_ms);
    drop(target);
    Ok(Report {
        sensors,
        rate_hz: args.rate,
        duration_s: elapsed,
        samples_sent: sim_stats.samples_sent,
        samples_acked,
        samples_in_lake,
        duplicates_in_lake: duplicates,
        lost,
        publish_errors: sim_stats.errors,
        lag_events: sim_stats.lag_events,
        latency_samples: lat.len(),
        latency_ms_p50: pct(0.50),
        latency_ms_p99: p99,
        latency_ms_max: lat.last().copied(),
        rss_mb_max,
        cpu_pct_mean,
        sustained,
        host_cpu: host_cpu(),
    })
}

/// `"{model name} (family F model M), N CPUs"` from `/proc/cpuinfo`, e.g. `"AMD EPYC (family 26
/// model 2), 2 CPUs"`: virtual machines often report only a brand, and the family/model pair
/// is what tells one generation of cores from another.
fn host_cpu() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let values = |key: &'static str| {
        info.lines()
            .filter_map(|line| line.split_once(':'))
            .filter(move |(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
    };
    let field = |key: &'static str| values(key).next();
    let cpus = values("processor").count();
    let name = field("model name")?;
    Some(match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => {
            format!("{name} (family {family} model {model}), {cpus} CPUs")
        }
        _ => format!("{name}, {cpus} CPUs"),
    })
}

/// The largest `timestamp_us` in a `/ws/raw` message (a JSON array of samples, or one sample).
fn newest_timestamp(text: &str) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Row {
        timestamp_us: i64,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Msg {
        Many(Vec<Row>),
        One(Row),
    }
    match serde_json::from_str::<Msg>(text).ok()? {
        Msg::Many(rows) => rows.iter().map(|r| r.timestamp_us).max(),
        Msg::One(row) => Some(row.timestamp_us),
    }
}

fn start_child(extra_env: &[String]) -> anyhow::Result<Target> {
    let data_dir = tempfile::Builder::new()
        .prefix("sensorflow-loadtest-")
        .tempdir()?;
    let exe = std::env::current_exe().context("locating the sensorflow binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "run",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data_dir.path())
    .env("SENSORFLOW_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for kv in extra_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--platform-env {kv:?} is not KEY=VALUE"))?;
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("starting `sensorflow run`")?;
    let stderr = child.stderr.take().context("child stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = (None, None);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for (key, slot) in [
                ("mqtt listening on ", &mut found.0),
                ("http listening on ", &mut found.1),
            ] {
                if let Some(rest) = line.split(key).nth(1) {
                    *slot = rest
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                }
            }
            if let (Some(m), Some(h)) = found {
                let _ = tx.send((m, h));
                found = (None, None);
            }
            if line.contains("ERROR") {
                eprintln!("platform: {line}");
            }
        }
    });
    let (mqtt, http) = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the platform did not report its listeners within 60 s")?;
    let lake = data_dir.path().join("lake");
    Ok(Target {
        mqtt,
        http,
        lake: Some(lake),
        child: Some(ChildPlatform {
            child,
            _data_dir: data_dir,
        }),
    })
}

fn stop_child(child: &mut Child) -> anyhow::Result<()> {
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .context("sending SIGTERM")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("the platform exited with {status}");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    bail!("the platform did not stop within 120 s of SIGTERM")
}

/// Samples the child's RSS (VmRSS) and CPU time from /proc every second until stopped.
/// Returns (max RSS MB, mean CPU % of one core).
async fn sample_usage(pid: u32, mut stop: watch::Receiver<bool>) -> (Option<f64>, Option<f64>) {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let mut max_rss = None::<f64>;
    let first = (Instant::now(), cpu_ticks(pid));
    let mut last = first;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if let Some(rss) = rss_mb(pid) {
            max_rss = Some(max_rss.map_or(rss, |m| m.max(rss)));
        }
        last = (Instant::now(), cpu_ticks(pid));
    }
    let cpu = match (first.1, last.1) {
        (Some(a), Some(b)) if last.0 > first.0 => Some(
            (b - a) as f64 / ticks_per_s / last.0.duration_since(first.0).as_secs_f64() * 100.0,
        ),
        _ => None,
    };
    (max_rss, cpu)
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn dropping_the_child_platform_kills_the_child_before_removing_its_data() {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let path = data_dir.path().to_owned();
        let child = Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawning sleep");
        let pid = child.id();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(ChildPlatform {
            child,
            _data_dir: data_dir,
        });
        // Killed and reaped (a zombie would still have its /proc entry), and the data gone.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the child outlived its handle"
        );
        assert!(!path.exists());
    }
}
