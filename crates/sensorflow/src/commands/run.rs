//! `sensorflow run`: the embedded platform until SIGINT/SIGTERM.

use clap::Args;

use super::{PlatformArgs, shutdown_signal};
use crate::runtime::Embedded;

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.platform.load_config()?;
    let platform = Embedded::start(&config).await?;
    shutdown_signal().await;
    platform.shutdown().await
}
