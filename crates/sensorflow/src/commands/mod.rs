//! Subcommands. Each module exports its clap args and an `async fn run(args)`.

pub(crate) mod api;
pub(crate) mod demo;
pub(crate) mod gateway;
mod kafka_role;
pub(crate) mod loadtest;
pub(crate) mod passwd;
pub(crate) mod processor;
pub(crate) mod replay;
pub(crate) mod run;
pub(crate) mod simulate;
pub(crate) mod token;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::{Config, DEFAULT_TOML};

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the whole platform embedded in this process.
    Run(run::RunArgs),
    /// `run` plus a built-in simulator feeding virtual sensors; open http://localhost:8000.
    Demo(demo::DemoArgs),
    /// Distributed mode: MQTT ingest that produces every message to Kafka (`imu-data-all`).
    Gateway(gateway::GatewayArgs),
    /// Distributed mode: a consumer group member running the pipeline on its share of
    /// `imu-data-all`, producing the output topics and the lake exactly-once.
    Processor(processor::ProcessorArgs),
    /// Distributed mode: the REST API, WebSockets and dashboard, fed from the output topics;
    /// any number of replicas.
    Api(api::ApiArgs),
    /// Publish simulated device packets to any MQTT broker (also our load generator).
    Simulate(simulate::SimulateArgs),
    /// Drive N virtual sensors at a platform; report loss, latency, CPU and memory.
    Loadtest(loadtest::LoadtestArgs),
    /// Reprocess the retained log from a point in time into a new lake (e.g. with a new model).
    Replay(replay::ReplayArgs),
    /// Print the default configuration, every key documented.
    Config,
    /// Add or update an MQTT user in a password file (password read from stdin).
    Passwd(passwd::PasswdArgs),
    /// Create an API bearer token: prints it once, stores only its SHA-256.
    Token(token::TokenArgs),
}

pub(crate) async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Gateway(args) => gateway::run(args).await,
        Command::Processor(args) => processor::run(args).await,
        Command::Api(args) => api::run(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Loadtest(args) => loadtest::run(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Passwd(args) => passwd::run(args).await,
        Command::Token(args) => token::run(args).await,
        Command::Config => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
    }
}

/// Flags shared by the roles that run the platform (`run`, `demo`).
#[derive(Args, Clone, Debug)]
pub(crate) struct PlatformArgs {
    /// Configuration file (TOML); see `sensorflow config` for every key.
    #[arg(long, env = "SENSORFLOW_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Directory for the log, sessions store and default lake [default: ./data].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// MQTT listener [default: 0.0.0.0:1883]; port 0 picks a free port.
    #[arg(long)]
    pub(crate) mqtt_listen: Option<SocketAddr>,
    /// HTTP listener [default: 0.0.0.0:8000]; port 0 picks a free port.
    #[arg(long)]
    pub(crate) http_listen: Option<SocketAddr>,
    /// ONNX model: a path, an http(s):// URL or s3://bucket/key; its sidecar is the same
    /// location with the extension .json [default: the bundled demo model].
    #[arg(long)]
    pub(crate) model: Option<String>,
}

impl PlatformArgs {
    /// Defaults, then the file, then `SENSORFLOW_*` env, then these flags.
    pub(crate) fn load_config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())?;
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(a) = self.mqtt_listen {
            config.mqtt.listen = a;
        }
        if let Some(a) = self.http_listen {
            config.http.listen = a;
        }
        if let Some(m) = &self.model {
            config.model.path = Some(m.clone());
        }
        Ok(config)
    }
}

/// `--lake`, for the roles that write the lake (`run`, `demo`).
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct LakeArg {
    /// Lake: a directory or s3://bucket/prefix (credentials, region and endpoint from the
    /// standard AWS_* variables) [default: lake.root, else DATA_DIR/lake].
    #[arg(long, value_name = "URL")]
    pub(crate) lake: Option<String>,
}

impl LakeArg {
    /// Overrides `lake.root` with the flag, if given.
    pub(crate) fn apply(&self, config: &mut Config) {
        if let Some(lake) = &self.lake {
            config.lake.root = Some(PathBuf::from(lake));
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
