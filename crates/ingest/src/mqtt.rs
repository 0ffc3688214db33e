//! ntex-mqtt glue: CONNECT, PUBLISH and control packets for MQTT 3.1.1 and 5.0.
//!
//! Acknowledgement rules (the [`Verdict`] of [`Core::ingest`] → the wire):
//!
//! | verdict            | MQTT 5 (QoS 1/2)              | MQTT 3.1.1 (QoS 1/2)          |
//! |--------------------|-------------------------------|-------------------------------|
//! | stored             | PUBACK/PUBREC 0x00            | PUBACK/PUBREC                 |
//! | unknown topic      | 0x90 topic name invalid       | PUBACK (counted, not stored)  |
//! | oversize           | 0x97 quota exceeded           | PUBACK (counted, not stored)  |
//! | new id beyond cap  | 0x97 quota exceeded           | PUBACK (counted, not stored)  |
//! | ACL refused        | 0x87 not authorized           | connection closed, no PUBACK  |
//! | sink `Unavailable` | 0x80 unspecified error        | connection closed, no PUBACK  |
//! | sink `Rejected`    | 0x83 implementation specific  | connection closed, no PUBACK  |
//! | shutting down      | no answer, connection closed  | no answer, connection closed  |
//!
//! MQTT 3.1.1 has no negative acknowledgement. A sink failure must not be acknowledged, so
//! the connection is closed and the client re-sends after reconnecting. Unknown topics and
//! oversize messages are acknowledged on 3.1.1 instead: they will never be stored, and
//! closing would make the client re-send the same message forever.
//!
//! The PUBLISH handler returns only after the sink's append completed; ntex-mqtt sends the
//! PUBACK when the handler returns, in arrival order. That is the whole durability argument.
//!
//! Subscriptions are not routed (this is an ingest endpoint): SUBSCRIBE is answered with
//! failure (3.1.1: 0x80) / "not authorized" (5: 0x87) for every filter, which paho and rumqttc
//! report to the application instead of waiting for messages that will never come.
//! UNSUBSCRIBE is acknowledged (5: "no subscription existed"). Will messages are accepted in
//! CONNECT and discarded: there is nobody to deliver them to.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ntex_bytes::ByteString;
use ntex_mqtt::{v3, v5};
use ntex_util::time::Seconds;

use crate::auth::AuthFailure;
use crate::core::{CloseReason, Conn, Core, Refusal, Verdict, closer};
use crate::session::Expiry;
use crate::sink::SinkError;

/// Why a connection is closed from inside a handler.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    /// MQTT 3.1.1 publish the sink did not store: closing is the only way not to ack it.
    #[error("sink did not store a QoS>0 publish: {0}")]
    Sink(SinkError),
    /// MQTT 3.1.1 publish (QoS ≥ 1) outside the user's ACL: 3.1.1 has no negative PUBACK.
    #[error("publish refused by the ACL")]
    NotAuthorized,
    /// The payload stream of a publish broke.
    #[error("publish payload stream broke")]
    Payload,
}

impl From<()> for ConnError {
    fn from((): ()) -> Self {
        ConnError::Payload
    }
}

// ntex-mqtt asks whether a handler error can still be answered with a PUBACK; ours cannot:
// every answerable outcome is returned as `Ok(PublishAck)`.
impl TryFrom<ConnError> for v5::PublishAck {
    type Error = ConnError;

    fn try_from(err: ConnError) -> Result<Self, Self::Error> {
        Err(err)
    }
}

/// MQTT keep-alive: ntex-mqtt's idle timeout is 1.5 × the client's value. A client asking
/// for 0 (no keep-alive) would otherwise hold its connection and session forever while silent,
/// so it gets the server's `idle_timeout` unless `allow_keep_alive_zero` is set.
fn v3_idle_timeout(core: &Core, keep_alive: u16) -> Seconds {
    if keep_alive == 0 {
        if core.config.allow_keep_alive_zero {
            Seconds::ZERO
        } else {
            Seconds(idle_timeout_secs(core))
        }
    } else {
        Seconds(keep_alive.saturating_add(keep_alive / 2))
    }
}

/// `idle_timeout` in whole seconds (validated to fit in 1..=65535).
fn idle_timeout_secs(core: &Core) -> u16 {
    u16::try_from(core.config.idle_timeout.as_secs())
        .unwrap_or(u16::MAX)
        .max(1)
}

/// True (and counted) when a client id is longer than `max_client_id_bytes`: such ids would be
/// kept per connection and per persistent session, so their size is bounded.
fn client_id_too_long(core: &Core, client_id: &ByteString) -> bool {
    if client_id.len() <= core.config.max_client_id_bytes {
        return false;
    }
    crate::stats::bump(&core.stats.client_id_too_long);
    crate::stats::bump(&core.stats.connections_refused);
    tracing::debug!(
        len = client_id.len(),
        max = core.config.max_client_id_bytes,
        "mqtt connect refused: client id too long"
    );
    true
}

/// Counts connections the codec closed because a packet declared more than the maximum packet
/// size (the packet's body is never read). The default control handling (close; MQTT 5:
/// DISCONNECT 0x95 packet too large) stays as it is: this only observes.
fn count_stop<E>(core: &Core, control: &ntex_mqtt::Control<E>) {
    if let ntex_mqtt::Control::Stop(ntex_mqtt::Reason::Protocol(err)) = control {
        count_protocol_error(core, err.get_ref());
    }
}

pub(crate) fn count_protocol_error(core: &Core, err: &ntex_mqtt::MqttProtocolError) {
    if let ntex_mqtt::MqttProtocolError::Decode(ntex_mqtt::error::DecodeError::MaxSizeExceeded {
        size,
        max_size,
    }) = err
    {
        crate::stats::bump(&core.stats.packets_too_large);
        tracing::debug!(size, max_size, "mqtt packet too large, connection closed");
    }
}

pub(crate) async fn control_v3(
    session: &v3::Session<Conn>,
    control: ntex_mqtt::Control<ConnError>,
) -> Result<Option<v3::codec::Encoded>, ConnError> {
    count_stop(&session.core, &control);
    Ok(None)
}

pub(crate) async fn control_v5(
    session: &v5::Session<Conn>,
    control: ntex_mqtt::Control<ConnError>,
) -> Result<Option<v5::codec::Encoded>, ConnError> {
    count_stop(&session.core, &control);
    Ok(None)
}

/// The source IP of a handshake's connection, for the failed-CONNECT rate limit.
fn peer_ip(io: &ntex_io::IoBoxed) -> Option<std::net::IpAddr> {
    io.query::<ntex_io::types::PeerAddr>()
        .get()
        .map(|addr| addr.0.ip())
}

/// The subject CN of the client certificate of a TLS connection, if it presented one.
fn certificate_cn(io: &ntex_io::IoBoxed) -> Option<String> {
    let cert = io.query::<ntex_tls::rustls::PeerCert<'static>>();
    cert.as_ref()
        .and_then(|c| crate::auth::certificate_common_name(c.0.as_ref()))
}

fn client_id_or_generated(core: &Core, given: &ByteString) -> (Arc<str>, bool) {
    if given.is_empty() {
        (Arc::from(core.generated_client_id()), true)
    } else {
        (Arc::from(given.as_str()), false)
    }
}

pub(crate) async fn connect_v3(
    core: Arc<Core>,
    connect: v3::Connect,
) -> Result<v3::ConnectAck<Conn>, ConnError> {
    let pkt = connect.packet();
    let clean = pkt.clean_session;
    let keep_alive = pkt.keep_alive;
    if pkt.client_id.is_empty() && !clean {
        // [MQTT-3.1.3-8]: a persistent session needs a client id.
        crate::stats::bump(&core.stats.connections_refused);
        return Ok(connect.identifier_rejected());
    }
    if client_id_too_long(&core, &pkt.client_id) {
        return Ok(connect.identifier_rejected());
    }
    let identity = match core
        .auth
        .authenticate(
            peer_ip(connect.io()),
            certificate_cn(connect.io()),
            pkt.username.as_ref().map(|u| u.as_str()),
            pkt.password.as_deref(),
        )
        .await
    {
        Ok(identity) => identity,
        Err(AuthFailure::BadCredentials) => return Ok(connect.bad_username_or_pwd()),
        Err(AuthFailure::NotAuthorized | AuthFailure::AclDenied) => {
            return Ok(connect.not_authorized());
        }
        Err(AuthFailure::RateLimited) => return Ok(connect.service_unavailable()),
    };
    let pkt = connect.packet();
    let (client_id, _) = client_id_or_generated(&core, &pkt.client_id);
    // No expiry in 3.1.1: kept until `session_expiry_max` (the registry's bound).
    let expiry = if clean {
        Expiry::OnClose
    } else {
        Expiry::After(Duration::MAX)
    };
    let (conn, attached, closed) =
        match core.open(client_id, peer_ip(connect.io()), identity, clean, expiry) {
            Ok(opened) => opened,
            Err(refusal) => {
                tracing::debug!(?refusal, "mqtt v3 connect refused");
                return Ok(connect.service_unavailable());
            }
        };
    tracing::debug!(
        client_id = conn.client_id(),
        clean,
        keep_alive,
        "mqtt v3.1.1 connected"
    );
    let inflight = Rc::clone(&conn.inflight);
    let core_for_idle = Arc::clone(&core);
    let (ack, session) = connect.ack_and_session(conn, attached.session_present);
    let sink = session.sink().clone();
    ntex_rt::spawn(closer(
        core,
        inflight,
        attached.kick,
        closed,
        move |_reason| sink.close(),
    ));
    let idle = v3_idle_timeout(&core_for_idle, keep_alive);
    Ok(ack.idle_timeout(idle))
}

pub(crate) async fn publish_v3(
    session: &v3::Session<Conn>,
    mut publish: v3::Publish,
) -> Result<(), ConnError> {
    let conn: &Conn = session;
    let qos = publish.qos();
    let topic = publish.packet().topic.clone();
    let size = publish.payload_size();
    let payload = publish.take_payload();
    match conn.core.ingest(conn, &topic, qos, size, payload).await {
        Verdict::Stored | Verdict::UnknownTopic | Verdict::Oversize | Verdict::SensorIdCap => {
            if qos != v3::QoS::AtMostOnce {
                conn.acked();
            }
            Ok(())
        }
        Verdict::NotAuthorized if qos == v3::QoS::AtMostOnce => Ok(()),
        Verdict::NotAuthorized => Err(ConnError::NotAuthorized),
        Verdict::SinkFailed(_) if qos == v3::QoS::AtMostOnce => Ok(()),
        Verdict::SinkFailed(err) => Err(ConnError::Sink(err)),
        Verdict::ShuttingDown if qos == v3::QoS::AtMostOnce => Ok(()),
        // Never answered: the closer closes the connection, the client re-sends elsewhere.
        Verdict::ShuttingDown => std::future::pending().await,
        Verdict::PayloadBroken => Err(ConnError::Payload),
    }
}

pub(crate) async fn protocol_v3(
    msg: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck, ConnError> {
    Ok(match msg {
        // Return codes start out as 0x80 (failure) for every filter.
        v3::ProtocolMessage::Subscribe(subscribe) => subscribe.ack(),
        v3::ProtocolMessage::Unsubscribe(unsubscribe) => unsubscribe.ack(),
        v3::ProtocolMessage::PublishRelease(release) => release.ack(),
        v3::ProtocolMessage::Ping(ping) => ping.ack(),
        v3::ProtocolMessage::Disconnect(disconnect) => disconnect.ack(),
    })
}

pub(crate) async fn connect_v5(
    core: Arc<Core>,
    connect: v5::Connect,
) -> Result<v5::ConnectAck<Conn>, ConnError> {
    let pkt = connect.packet();
    let clean = pkt.clean_start;
    let expiry_secs = pkt.session_expiry_interval_secs;
    let keep_alive = pkt.keep_alive;
    if client_id_too_long(&core, &pkt.client_id) {
        return Ok(connect.failed(v5::codec::ConnectAckReason::ClientIdentifierNotValid));
    }
    let identity = match core
        .auth
        .authenticate(
            peer_ip(connect.io()),
            certificate_cn(connect.io()),
            pkt.username.as_ref().map(|u| u.as_str()),
            pkt.password.as_deref(),
        )
        .await
    {
        Ok(identity) => identity,
        Err(failure) => {
            use v5::codec::ConnectAckReason as C;
            return Ok(connect.failed(match failure {
                AuthFailure::BadCredentials => C::BadUserNameOrPassword,
                AuthFailure::NotAuthorized | AuthFailure::AclDenied => C::NotAuthorized,
                AuthFailure::RateLimited => C::ConnectionRateExceeded,
            }));
        }
    };
    let pkt = connect.packet();
    let (client_id, assigned) = client_id_or_generated(&core, &pkt.client_id);
    let expiry = match expiry_secs {
        0 => Expiry::OnClose,
        u32::MAX => Expiry::After(Duration::MAX),
        secs => Expiry::After(Duration::from_secs(u64::from(secs))),
    };
    let (conn, attached, closed) =
        match core.open(client_id, peer_ip(connect.io()), identity, clean, expiry) {
            Ok(opened) => opened,
            Err(refusal) => {
                tracing::debug!(?refusal, "mqtt v5 connect refused");
                let code = match refusal {
                    Refusal::Busy => v5::codec::ConnectAckReason::ServerBusy,
                    Refusal::ShuttingDown => v5::codec::ConnectAckReason::ServerUnavailable,
                    Refusal::PerIp => v5::codec::ConnectAckReason::QuotaExceeded,
                };
                return Ok(connect.failed(code));
            }
        };
    tracing::debug!(
        client_id = conn.client_id(),
        clean,
        expiry_secs,
        "mqtt v5 connected"
    );
    let assigned_id = assigned.then(|| ByteString::from(conn.client_id()));
    let inflight = Rc::clone(&conn.inflight);
    let idle_secs = idle_timeout_secs(&core);
    let allow_zero = core.config.allow_keep_alive_zero;
    let (mut ack, session) = connect.ack_and_session(conn);
    let sink = session.sink().clone();
    ntex_rt::spawn(closer(
        core,
        inflight,
        attached.kick,
        closed,
        move |reason| {
            let code = match reason {
                CloseReason::TakenOver => v5::codec::DisconnectReasonCode::SessionTakenOver,
                CloseReason::ShuttingDown => v5::codec::DisconnectReasonCode::ServerShuttingDown,
            };
            sink.close_with_reason(v5::codec::Disconnect::new(code));
        },
    ));
    let mut server_keep_alive = None;
    if keep_alive == 0 {
        if allow_zero {
            // ntex-mqtt cannot switch its idle timer off for MQTT 5 (it defaults to 30 s for
            // keep-alive 0); the longest it takes is about 18 hours.
            ack = ack.keep_alive(u16::MAX);
        } else {
            // Closed after `idle_timeout` of silence; the client is told a Server Keep Alive
            // of two thirds of it, so that a compliant client pings in time.
            ack = ack.keep_alive(idle_secs);
            server_keep_alive = Some((idle_secs / 3 * 2).max(1));
        }
    }
    // ntex-mqtt advertises the codec's maximum packet size (`max_packet_bytes`) in CONNACK
    // and keeps enforcing it after the handshake.
    Ok(ack.with(|p| {
        if server_keep_alive.is_some() {
            p.server_keepalive_sec = server_keep_alive;
        }
        p.session_present = attached.session_present;
        p.assigned_client_id = assigned_id;
        // Honest capabilities: nothing is ever delivered to subscribers.
        p.wildcard_subscription_available = false;
        p.shared_subscription_available = false;
        p.subscription_identifiers_available = false;
    }))
}

pub(crate) async fn publish_v5(
    session: &v5::Session<Conn>,
    mut publish: v5::Publish,
) -> Result<v5::PublishAck, ConnError> {
    use v5::codec::PublishAckReason as R;
    let conn: &Conn = session;
    let qos = publish.qos();
    let topic = publish.packet().topic.clone();
    let size = publish.payload_size();
    let payload = publish.take_payload();
    let (reason, text) = match conn.core.ingest(conn, &topic, qos, size, payload).await {
        Verdict::Stored => (R::Success, None),
        Verdict::NotAuthorized => (R::NotAuthorized, Some("topic not allowed for this user")),
        Verdict::UnknownTopic => (R::TopicNameInvalid, Some("topic matches no ingest pattern")),
        Verdict::Oversize => (R::QuotaExceeded, Some("payload exceeds max_message_bytes")),
        Verdict::SensorIdCap => (R::QuotaExceeded, Some("too many distinct sensor ids")),
        Verdict::SinkFailed(SinkError::Unavailable(_)) => {
            (R::UnspecifiedError, Some("storage unavailable"))
        }
        Verdict::SinkFailed(SinkError::Rejected(_)) => {
            (R::ImplementationSpecificError, Some("record rejected"))
        }
        Verdict::ShuttingDown if qos == v5::QoS::AtMostOnce => (R::Success, None),
        Verdict::ShuttingDown => std::future::pending().await,
        Verdict::PayloadBroken => return Err(ConnError::Payload),
    };
    if qos != v5::QoS::AtMostOnce {
        if reason == R::Success {
            conn.acked()
        } else {
            conn.nacked()
        }
    }
    let mut ack = v5::PublishAck::new(reason);
    if let Some(text) = text {
        ack = ack.reason(ByteString::from_static(text));
    }
    Ok(ack)
}

pub(crate) async fn protocol_v5(
    msg: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck, ConnError> {
    Ok(match msg {
        v5::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut sub in subscribe.iter_mut() {
                sub.fail(v5::codec::SubscribeAckReason::NotAuthorized);
            }
            subscribe
                .ack_reason(ByteString::from_static(
                    "sensorflow ingest does not deliver messages",
                ))
                .ack()
        }
        v5::ProtocolMessage::Unsubscribe(mut unsubscribe) => {
            for mut item in unsubscribe.iter_mut() {
                item.fail(v5::codec::UnsubscribeAckReason::NoSubscriptionExisted);
            }
            unsubscribe.ack()
        }
        other => other.ack(),
    })
}
