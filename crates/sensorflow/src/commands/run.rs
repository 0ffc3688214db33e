//! `sensorflow run`: the embedded platform until SIGINT/SIGTERM.

use clap::Args;

use super::{LakeArg, PlatformArgs, shutdown_signal};
use crate::runtime::Embedded;

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) platform: PlatformArgs,
    #[command(flatten)]
    pub(crate) lake: LakeArg,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = args.platform.load_config()?;
    args.lake.apply(&mut config);
    let platform = Embedded::start(&config).await?;
    shutdown_signal().await;
    platform.shutdown().await
}
