//! `sensorflow demo`: the embedded platform plus a built-in simulator, so a newcomer sees live
//! charts at once. The virtual sensors connect over real MQTT to the platform's own listener,
//! exactly like devices would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clap::Args;
use tokio::sync::watch;

use super::{LakeArg, PlatformArgs, shutdown_signal};
use crate::runtime::Embedded;
use crate::sim::{SimConfig, Simulator};

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
    #[command(flatten)]
    pub(crate) lake: LakeArg,
    /// Virtual sensors to simulate [default: demo.sensors, 20].
    #[arg(long)]
    pub(crate) sensors: Option<usize>,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut config = args.platform.load_config()?;
    args.lake.apply(&mut config);
    let platform = Embedded::start(&config).await?;
    let mut target = platform.mqtt_addr;
    // A wildcard listener is reached through loopback.
    if target.ip().is_unspecified() {
        target.set_ip(match target.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let sim_config = SimConfig {
        host: target.ip().to_string(),
        port: target.port(),
        sensors: args.sensors.unwrap_or(config.demo.sensors),
        rate_hz: config.demo.rate_hz.round() as u32,
        ..SimConfig::default()
    };
    let sensors = sim_config.sensors;
    let (stop_sim, stop_rx) = watch::channel(false);
    let sim = Simulator::spawn(sim_config, stop_rx)?;
    let dashboard = if platform.http_addr.ip().is_unspecified() {
        format!("http://localhost:{}", platform.http_addr.port())
    } else {
        format!("http://{}", platform.http_addr)
    };
    tracing::info!(sensors, "demo running: open {dashboard}");
    shutdown_signal().await;
    let _ = stop_sim.send(true);
    let stats = sim.join().await;
    tracing::info!(
        packets_sent = stats.packets_sent,
        packets_acked = stats.packets_acked,
        "simulator stopped"
    );
    platform.shutdown().await
}
