//! Topic administration: creates the topics a role needs if they are missing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

/// How long the cluster may take to answer a create request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates each of `topics` that does not exist, with `kafka.partitions` partitions and
/// `kafka.replication_factor` replicas. An existing topic is left as it is, whatever its
/// partition count. Returns the topics it created.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<Vec<String>> {
    let mut client = ClientConfig::new();
    for (k, v) in config.client_properties(&[("client.id", "sensorflow-admin")]) {
        client.set(k, v);
    }
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|source| Error::Client {
            what: "admin client",
            source,
        })?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|source| Error::Request {
            what: "create topics",
            source,
        })?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: format!("{code:?}"),
                });
            }
        }
    }
    Ok(created)
}
