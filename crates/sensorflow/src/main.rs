//! `sensorflow`: the command-line entry point. Thin glue: parse flags, load the config, start
//! tracing, run the chosen command, map errors to exit codes.
//!
//! # Layout
//!
//! - [`commands`]: one module per subcommand (`run`, `demo`, `simulate`, `config`), each with its
//!   clap args and an `async fn run`.
//! - [`config`]: `sensorflow.toml` layering (embedded defaults, file, env, flags).
//! - [`runtime`]: the embedded platform: MQTT ingest → log → pipeline → sinks and API.
//! - [`sim`]: the device simulator used by `simulate` and `demo`.

mod commands;
mod config;
mod runtime;
mod sim;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "sensorflow", version, about = "Real-time streaming platform for high-rate IoT sensors")]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("sensorflow").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENSORFLOW_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
}
