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
    let specs: Vec<TopicSpec<'_>> = topics
        .iter()
        .map(|name| TopicSpec {
            name,
            partitions: config.partitions,
            configs: &[],
        })
        .collect();
    ensure_topic_specs(config, &specs).await
}

/// A topic to create if missing: its partition count and topic-level configs (e.g.
/// `cleanup.policy = compact`).
pub struct TopicSpec<'a> {
    /// The topic name.
    pub name: &'a str,
    /// Partitions.
    pub partitions: i32,
    /// Topic configs.
    pub configs: &'a [(&'a str, &'a str)],
}

/// [`ensure_topics`] with a partition count and configs per topic.
pub async fn ensure_topic_specs(
    config: &KafkaConfig,
    topics: &[TopicSpec<'_>],
) -> Result<Vec<String>> {
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
            let mut topic = NewTopic::new(
                t.name,
                t.partitions,
                TopicReplication::Fixed(config.replication_factor),
            );
            for (k, v) in t.configs {
                topic = topic.set(k, v);
            }
            topic
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
