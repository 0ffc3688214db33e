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
mod model_source;
mod runtime;
mod sim;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the pipeline thread allocates each chunk of samples and
/// the sink thread frees it, a cross-thread pattern glibc's arenas handle slowly. Measured with
/// `loadtest --duration 60` (BENCHMARKS.md): ~5% less platform CPU at 3,000 and 5,000 sensors,
/// lower p50, peak RSS 85 -> 170 MB at 3,000.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sensorflow",
    version,
    about = "Real-time streaming platform for high-rate IoT sensors"
)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    #[cfg(feature = "failpoints")]
    if let Err(e) = configure_failpoints() {
        eprintln!("error: FAILPOINTS: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sensorflow")
        .build()
    {
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

/// Configures fail points from `FAILPOINTS="name=actions;..."` (the `fail` crate's syntax, e.g.
/// `sink-batch=sleep(100)`), reporting a malformed entry instead of panicking as
/// `fail::FailScenario::setup` would.
#[cfg(feature = "failpoints")]
fn configure_failpoints() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim()).map_err(|e| format!("{name}: {e}"))?;
        tracing::warn!(
            fail_point = name.trim(),
            actions = actions.trim(),
            "fail point configured"
        );
    }
    Ok(())
}

/// The filter when neither `SENSORFLOW_LOG` nor `RUST_LOG` is set. ONNX Runtime logs every
/// session option at info level through `ort`; ntex-service logs at info level, for every MQTT
/// connection, that it uses the default "IO Configuration" (ntex_service::cfg), which is noise.
const DEFAULT_LOG_FILTER: &str = "info,ort=warn,ntex_service::cfg=warn";

fn init_tracing() {
    use std::io::IsTerminal;

    let filter = tracing_subscriber::EnvFilter::try_from_env("SENSORFLOW_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // Colour codes only for a person at a terminal, never into files, journals or pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
