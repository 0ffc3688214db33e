//! sensorflow-ingest: the MQTT endpoint devices publish to.
//!
//! An MQTT 3.1.1 and 5.0 server (QoS 0, 1 and 2) built on ntex-mqtt. Each PUBLISH on a data
//! topic becomes an [`sensorflow_protocol::IngestRecord`] handed to an [`IngestSink`]; a QoS 1
//! publish is acknowledged only after the sink reported it durably stored.
//!
//! # Architecture invariants
//!
//! - A PUBACK (QoS 1) or PUBREC (QoS 2) with a success code is sent only after
//!   [`IngestSink::append`] returned `Ok` for that message. Sink failures are never
//!   acknowledged as success (MQTT 5: error reason code; MQTT 3.1.1: connection closed).
//! - Backpressure: once `receive_maximum` publishes (or `max_inflight_bytes`) of a connection
//!   are in flight, the connection is not read further (`core::ReadGate`, our own gate:
//!   ntex-mqtt 9's built-in limit did not hold in measurements), so a slow sink slows the
//!   publisher through TCP flow control. A burst already in the read buffer may overshoot by
//!   that buffer (measured: 15 read with a limit of 4 and 1 KiB messages). MQTT 5 clients are
//!   told the limit in CONNACK (Receive Maximum) and ntex-mqtt disconnects those exceeding it.
//! - No packet is buffered beyond `IngestConfig::max_packet_bytes` (`max_message_bytes` plus
//!   room for topic and properties): a larger declared length closes the connection from the
//!   fixed header, counted in `packets_too_large`.
//! - Input that is not stored is never dropped silently: unknown topics and oversize payloads
//!   are counted in [`IngestStats`] and reported to the [`IngestObserver`].
//! - A publish outside an authenticated user's ACL is never handed to the sink: MQTT 5 gets
//!   PUBACK 0x87, MQTT 3.1.1 (QoS ≥ 1) has its connection closed; counted as `acl_denied`.
//! - Ingest does not decode payloads and delivers nothing to subscribers.
//!
//! # Layout
//!
//! - [`auth`] — device authentication (argon2id password file, off the I/O thread, cached,
//!   failed CONNECTs rate-limited per source address) and the publish ACL.
//! - [`config`] — [`IngestConfig`] and [`TopicPattern`] (`stream/{sensor_id}`, ...).
//! - [`sink`] — the [`IngestSink`] and [`IngestObserver`] seams.
//! - [`stats`] — counters.
//! - `core` — routing, admission, the append, per-connection drain (protocol independent).
//! - `limits` — the cap on distinct sensor ids and the per-connection publish rate.
//! - `mqtt` — ntex-mqtt handlers for v3.1.1 and v5, and how each outcome maps to
//!   PUBACK reason codes.
//! - `session` — minimal per-client-id session state (`session_present`, takeover).
//! - [`server`] — [`IngestServer`]: threads, start and graceful stop.
//!
//! # Sessions and keep-alive
//!
//! There is nothing to persist for an ingest endpoint except the session's existence: a
//! client connecting with clean session = false (v3) or a session expiry > 0 (v5) gets
//! `session_present = true` when it reconnects. A second connection with the same client id
//! takes the session over and the older connection is closed (v5: DISCONNECT 0x8E).
//! Keep-alive is enforced by ntex-mqtt (1.5 × the client's interval); a client asking for
//! keep-alive 0 gets `idle_timeout` unless `allow_keep_alive_zero` is set. Persistent sessions
//! are capped (`max_persistent_sessions`, the one detached longest ago is evicted) and kept at
//! most `session_expiry_max`; client ids are capped at `max_client_id_bytes`. A connection held in
//! backpressure longer than that is closed by the keep-alive timer; its unacknowledged
//! messages are re-sent by the client.
//!
//! # Known limits
//!
//! - QoS 2 state lives in the connection: a PUBREL re-sent after a reconnect is answered by
//!   ntex-mqtt with PUBCOMP "packet identifier not found" (v5) or a disconnect (v3.1.1).
//!   The message itself was already stored when PUBREC was sent (at-least-once; the pipeline
//!   de-duplicates by sample index).
//! - `max_connections` counts MQTT sessions; TCP connections that never send CONNECT are
//!   closed after `connect_timeout`.

pub mod auth;
pub mod config;
mod core;
mod limits;
mod mqtt;
pub mod server;
mod session;
pub mod sink;
pub mod stats;

pub use auth::{Acl, AuthFailure, AuthFileError, AuthPolicy, PasswordFile};
pub use config::{ConfigError, IngestConfig, MqttTls, TopicPattern};
pub use server::{IngestError, IngestServer};
pub use sink::{IngestObserver, IngestSink, NoopObserver, SinkError};
pub use stats::{IngestStats, IngestStatsSnapshot};
