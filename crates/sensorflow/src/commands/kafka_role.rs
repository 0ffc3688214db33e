//! The flags every distributed role (`gateway`, `processor`, `api`) shares, and how they are
//! layered over the configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::config::Config;

#[derive(Args, Debug)]
pub(crate) struct KafkaRoleArgs {
    /// Configuration file (TOML); see `sensorflow config` for every key.
    #[arg(long, env = "SENSORFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap brokers, HOST:PORT[,…] [default: kafka.brokers].
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// HTTP listener [default: 0.0.0.0:8000]; port 0 picks a free port.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
}

impl KafkaRoleArgs {
    /// Defaults, then the file, then `SENSORFLOW_*` and the Kafka client's env, then these
    /// flags, then the role's own flags (`role_flags`); the result is validated.
    pub(crate) fn load_config(
        &self,
        role_flags: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())?;
        config.kafka.apply_client_env(std::env::vars());
        if let Some(b) = &self.kafka_brokers {
            config.kafka.brokers = b.clone();
        }
        if let Some(a) = self.http_listen {
            config.http.listen = a;
        }
        role_flags(&mut config);
        config.validate()?;
        Ok(config)
    }
}
