//! End-to-end behaviour of the MQTT ingest server with real MQTT 3.1.1 and 5.0 clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{FakeSink, QUIET, WAIT, assert_none_within_quiet, local_config, next_matching, start};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode as SubReason5};
use sensorflow_ingest::{IngestConfig, SinkError};
use sensorflow_protocol::PayloadFormat;
use sensorflow_protocol::framing::BadReason;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

mod ev3 {
    pub(crate) use rumqttc::{Event, Incoming as P, QoS, SubscribeReasonCode};

    pub(crate) fn puback(ev: &super::common::v3::Ev) -> Option<u16> {
        match ev {
            Ok(Event::Incoming(P::PubAck(ack))) => Some(ack.pkid),
            _ => None,
        }
    }

    pub(crate) fn connack(ev: &super::common::v3::Ev) -> Option<bool> {
        match ev {
            Ok(Event::Incoming(P::ConnAck(ack))) => Some(ack.session_present),
            _ => None,
        }
    }

    pub(crate) fn error(ev: &super::common::v3::Ev) -> Option<String> {
        ev.as_ref().err().cloned()
    }
}

mod ev5 {
    pub(crate) use rumqttc::v5::Event;
    pub(crate) use rumqttc::v5::mqttbytes::QoS;
    pub(crate) use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet as P, PubAck};

    pub(crate) fn puback(ev: &super::common::v5::Ev) -> Option<PubAck> {
        match ev {
            Ok(Event::Incoming(P::PubAck(ack))) => Some(ack.clone()),
            _ => None,
        }
    }

    pub(crate) fn connack(ev: &super::common::v5::Ev) -> Option<ConnAck> {
        match ev {
            Ok(Event::Incoming(P::ConnAck(ack))) => Some(ack.clone()),
            _ => None,
        }
    }

    pub(crate) fn is_disconnect_or_error(ev: &super::common::v5::Ev) -> bool {
        matches!(ev, Err(_) | Ok(Event::Incoming(P::Disconnect(_))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos1_puback_arrives_only_after_the_sink_completes() {
    let sink = FakeSink::gated();
    let (server, _) = start(local_config(), &sink).await;
    let (client, mut events) =
        common::v5::connect(common::v5::options("imu-v5", server.local_addr()));
    next_matching(&mut events, "CONNACK", ev5::connack).await;

    let before = now_us();
    client
        .publish(
            "stream/imu-1",
            ev5::QoS::AtLeastOnce,
            false,
            vec![1u8, 2, 3],
        )
        .await
        .unwrap();
    sink.wait_started(1).await;
    assert_none_within_quiet(&mut events, "PUBACK while the append is pending", |e| {
        ev5::puback(e).is_some()
    })
    .await;

    sink.release(1);
    let ack = next_matching(&mut events, "PUBACK", ev5::puback).await;
    assert_eq!(ack.reason, PubAckReason::Success);
    let records = sink.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].sensor_id, "imu-1");
    assert_eq!(records[0].format as u8, PayloadFormat::Binary as u8);
    assert_eq!(&records[0].payload[..], &[1, 2, 3]);
    assert!(records[0].ingest_us >= before && records[0].ingest_us <= now_us());
    let stats = server.stats();
    assert_eq!(
        (stats.received_by_qos[1], stats.stored, stats.acked),
        (1, 1, 1)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_qos1_puback_arrives_only_after_the_sink_completes() {
    let sink = FakeSink::gated();
    let (server, _) = start(local_config(), &sink).await;
    let (client, mut events) =
        common::v3::connect(common::v3::options("imu-v3", server.local_addr()));
    next_matching(&mut events, "CONNACK", ev3::connack).await;

    client
        .publish(
            "sensors/imu-2/data",
            ev3::QoS::AtLeastOnce,
            false,
            b"{}".to_vec(),
        )
        .await
        .unwrap();
    sink.wait_started(1).await;
    assert_none_within_quiet(&mut events, "PUBACK while the append is pending", |e| {
        ev3::puback(e).is_some()
    })
    .await;

    sink.release(1);
    next_matching(&mut events, "PUBACK", ev3::puback).await;
    let records = sink.records();
    assert_eq!(records[0].sensor_id, "imu-2");
    assert_eq!(records[0].format as u8, PayloadFormat::Json as u8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_publishes_of_both_versions_reach_the_sink_with_routed_sensor_ids() {
    let sink = FakeSink::open();
    let (server, _) = start(local_config(), &sink).await;
    let (c3, mut e3) = common::v3::connect(common::v3::options("q0-v3", server.local_addr()));
    let (c5, mut e5) = common::v5::connect(common::v5::options("q0-v5", server.local_addr()));
    next_matching(&mut e3, "v3 CONNACK", ev3::connack).await;
    next_matching(&mut e5, "v5 CONNACK", ev5::connack).await;

    c3.publish("stream/a", ev3::QoS::AtMostOnce, false, vec![0x7C])
        .await
        .unwrap();
    sink.wait_stored(1).await;
    c5.publish(
        "sensors/b/data",
        ev5::QoS::AtMostOnce,
        false,
        b"{\"x\":1}".to_vec(),
    )
    .await
    .unwrap();
    sink.wait_stored(2).await;

    let records = sink.records();
    assert_eq!(
        (records[0].sensor_id.as_str(), records[0].format as u8),
        ("a", PayloadFormat::Binary as u8)
    );
    assert_eq!(
        (records[1].sensor_id.as_str(), records[1].format as u8),
        ("b", PayloadFormat::Json as u8)
    );
    assert_eq!(server.stats().received_by_qos[0], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_and_oversize_are_counted_reported_and_not_stored() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        max_message_bytes: 1000,
        ..local_config()
    };
    let (server, observer) = start(config, &sink).await;
    let (c5, mut e5) = common::v5::connect(common::v5::options("bad-v5", server.local_addr()));
    next_matching(&mut e5, "CONNACK", ev5::connack).await;

    c5.publish("devices/x/telemetry", ev5::QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    let ack = next_matching(&mut e5, "PUBACK", ev5::puback).await;
    assert_eq!(ack.reason, PubAckReason::TopicNameInvalid);
    c5.publish("stream/big", ev5::QoS::AtLeastOnce, false, vec![0; 1001])
        .await
        .unwrap();
    let ack = next_matching(&mut e5, "PUBACK", ev5::puback).await;
    assert_eq!(ack.reason, PubAckReason::QuotaExceeded);

    // MQTT 3.1.1 cannot NACK: the message is acknowledged, counted and dropped.
    let (c3, mut e3) = common::v3::connect(common::v3::options("bad-v3", server.local_addr()));
    next_matching(&mut e3, "CONNACK", ev3::connack).await;
    c3.publish("nowhere", ev3::QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    next_matching(&mut e3, "PUBACK", ev3::puback).await;

    assert!(sink.records().is_empty());
    assert_eq!(sink.started(), 0);
    let stats = server.stats();
    assert_eq!(
        (stats.unknown_topic, stats.oversize, stats.stored),
        (2, 1, 0)
    );
    assert_eq!((stats.nacked, stats.acked), (2, 1));
    let reports = observer.reports.lock().clone();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0].0, None);
    assert_eq!(reports[0].1, BadReason::UnknownTopic);
    assert_eq!(reports[0].2, "devices/x/telemetry");
    assert_eq!(
        (reports[1].0.as_deref(), reports[1].1),
        (Some("big"), BadReason::Oversize)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_sink_failure_is_answered_with_an_error_reason_code() {
    let sink = FakeSink::open();
    sink.fail_with(SinkError::Unavailable("log full".into()));
    let (server, _) = start(local_config(), &sink).await;
    let (c5, mut e5) = common::v5::connect(common::v5::options("fail-v5", server.local_addr()));
    next_matching(&mut e5, "CONNACK", ev5::connack).await;

    c5.publish("stream/s", ev5::QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    let ack = next_matching(&mut e5, "PUBACK", ev5::puback).await;
    assert_eq!(ack.reason, PubAckReason::UnspecifiedError);

    sink.fail_with(SinkError::Rejected("policy".into()));
    c5.publish("stream/s", ev5::QoS::AtLeastOnce, false, vec![2])
        .await
        .unwrap();
    let ack = next_matching(&mut e5, "PUBACK", ev5::puback).await;
    assert_eq!(ack.reason, PubAckReason::ImplementationSpecificError);
    let stats = server.stats();
    assert_eq!(
        (stats.rejected_by_sink, stats.acked, stats.nacked),
        (2, 0, 2)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_sink_failure_closes_the_connection_without_puback() {
    let sink = FakeSink::open();
    sink.fail_with(SinkError::Unavailable("log full".into()));
    let (server, _) = start(local_config(), &sink).await;
    let (c3, mut e3) = common::v3::connect(common::v3::options("fail-v3", server.local_addr()));
    next_matching(&mut e3, "CONNACK", ev3::connack).await;

    c3.publish("stream/s", ev3::QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    let outcome = next_matching(&mut e3, "PUBACK or connection loss", |e| {
        ev3::puback(e)
            .map(|_| "puback".to_string())
            .or_else(|| ev3::error(e))
    })
    .await;
    assert_ne!(
        outcome, "puback",
        "a failed append must not be acknowledged"
    );
    assert_eq!(server.stats().acked, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_in_flight_qos1_from_one_v5_client_do_not_disconnect_it() {
    let sink = FakeSink::gated();
    let (server, _) = start(local_config(), &sink).await;
    let (c5, mut e5) = common::v5::connect(common::v5::options("burst-v5", server.local_addr()));
    let connack = next_matching(&mut e5, "CONNACK", ev5::connack).await;
    let receive_max = connack.properties.and_then(|p| p.receive_max);
    assert_eq!(receive_max, Some(1024));

    for i in 0..100u8 {
        c5.publish("stream/burst", ev5::QoS::AtLeastOnce, false, vec![i])
            .await
            .unwrap();
    }
    // All 100 are read and pending in the sink at once: nothing was refused.
    sink.wait_started(100).await;
    sink.release(100);
    let mut acks = 0;
    while acks < 100 {
        let ev = next_matching(&mut e5, "PUBACK", |e| {
            assert!(
                !ev5::is_disconnect_or_error(e),
                "client disconnected: {e:?}"
            );
            ev5::puback(e)
        })
        .await;
        assert_eq!(ev.reason, PubAckReason::Success);
        acks += 1;
    }
    // append() is called in publish order (the sink may complete them in any order).
    let payloads: Vec<u8> = sink.calls().iter().map(|r| r.payload[0]).collect();
    assert_eq!(payloads, (0..100).collect::<Vec<u8>>());
    assert_eq!(sink.records().len(), 100);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_stops_reading_beyond_receive_maximum() {
    const SENT: usize = 2000;
    let sink = FakeSink::gated();
    let config = IngestConfig {
        receive_maximum: 4,
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    // MQTT 3.1.1 clients are not told any limit: the server must enforce it by not reading.
    let mut opts = common::v3::options("slow-v3", server.local_addr());
    opts.set_inflight(u16::try_from(SENT).unwrap());
    let (c3, mut e3) = common::v3::connect(opts);
    next_matching(&mut e3, "CONNACK", ev3::connack).await;
    tokio::spawn(async move {
        for i in 0..SENT {
            c3.publish(
                "stream/slow",
                ev3::QoS::AtLeastOnce,
                false,
                vec![i as u8; 1024],
            )
            .await
            .unwrap();
        }
        std::future::pending::<()>().await; // keep the client alive
    });
    sink.wait_started(4).await;
    // The count plateaus: at most the limit plus what already sat in the read buffer.
    let mut plateau = sink.started();
    loop {
        let before = plateau;
        sink.assert_started_below(SENT).await;
        plateau = sink.started();
        if plateau == before {
            break;
        }
    }
    assert!(
        plateau < 100,
        "{plateau} of {SENT} publishes read while the sink was blocked"
    );

    sink.release(SENT);
    sink.wait_stored(SENT).await;
    let mut acks = 0;
    while acks < SENT {
        next_matching(&mut e3, "PUBACK", ev3::puback).await;
        acks += 1;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_zero_binds_a_free_port_and_reports_it() {
    let sink = FakeSink::open();
    let (a, _) = start(local_config(), &sink).await;
    let (b, _) = start(local_config(), &sink).await;
    assert_ne!(a.local_addr().port(), 0);
    assert_ne!(a.local_addr(), b.local_addr());
    let (_c, mut events) = common::v3::connect(common::v3::options("port0", b.local_addr()));
    next_matching(&mut events, "CONNACK", ev3::connack).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_in_flight_appends_so_their_pubacks_go_out() {
    let sink = FakeSink::gated();
    let (server, _) = start(local_config(), &sink).await;
    let addr = server.local_addr();
    let mut conn = common::raw5::connect(addr, "stop-v5").await;
    common::raw5::publish_qos1(&mut conn, "stream/s", 1, &[1]).await;
    sink.wait_started(1).await;

    let mut stopping = tokio::spawn(server.stop());
    assert!(
        tokio::time::timeout(QUIET, &mut stopping).await.is_err(),
        "stop() returned while an append was pending"
    );
    sink.release(1);
    // On the wire, in order: PUBACK (id 1, success), DISCONNECT 0x8B, end of stream.
    let (kind, body) = common::raw5::read_packet(&mut conn).await.expect("PUBACK");
    assert_eq!(kind, 0x40, "PUBACK expected, got {kind:#x} {body:?}");
    assert_eq!(&body[..2], &[0, 1]);
    assert!(
        body.len() == 2 || body[2] == 0,
        "success reason code: {body:?}"
    );
    let (kind, body) = common::raw5::read_packet(&mut conn)
        .await
        .expect("DISCONNECT");
    assert_eq!(
        (kind, body.first().copied()),
        (0xE0, Some(0x8B)),
        "DISCONNECT server shutting down"
    );
    assert!(
        common::raw5::read_packet(&mut conn).await.is_none(),
        "connection closed"
    );
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stop completes")
        .unwrap();
    assert_eq!(sink.records().len(), 1);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_arriving_during_stop_are_neither_stored_nor_acknowledged() {
    let sink = FakeSink::gated();
    let (server, _) = start(local_config(), &sink).await;
    let mut conn = common::raw5::connect(server.local_addr(), "late-v5").await;
    common::raw5::publish_qos1(&mut conn, "stream/s", 1, &[1]).await;
    sink.wait_started(1).await;
    let stats = server.stats_handle();
    let stopping = tokio::spawn(server.stop());
    // Publish 2 must arrive after stop() began draining. (Sent right after the spawn, it raced
    // stop() under load: it was stored behind the closed gate and stop() waited for it.)
    tokio::time::timeout(WAIT, async {
        while !stats.draining() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("stop() begins draining");
    // Arrives while the first append is pending and stop() has begun draining.
    common::raw5::publish_qos1(&mut conn, "stream/s", 2, &[2]).await;
    sink.assert_started_stays(1).await;
    sink.release(1);
    let (kind, body) = common::raw5::read_packet(&mut conn).await.expect("PUBACK");
    assert_eq!(
        (kind, &body[..2]),
        (0x40, &[0u8, 1][..]),
        "only packet 1 is acknowledged"
    );
    let (kind, _) = common::raw5::read_packet(&mut conn)
        .await
        .expect("DISCONNECT");
    assert_eq!(kind, 0xE0);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stop completes")
        .unwrap();
    assert_eq!(sink.calls().len(), 1);
    assert_eq!(stats.snapshot().dropped_on_shutdown, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_are_reported_present_on_reconnect() {
    let sink = FakeSink::open();
    let (server, _) = start(local_config(), &sink).await;
    let addr = server.local_addr();

    let mut opts = common::v3::options("persist-v3", addr);
    opts.set_clean_session(false);
    for expected in [false, true] {
        let (c, mut e) = common::v3::connect(opts.clone());
        assert_eq!(
            next_matching(&mut e, "CONNACK", ev3::connack).await,
            expected
        );
        c.disconnect().await.unwrap();
        next_matching(&mut e, "connection end", ev3::error).await;
        wait_connections(&server, 0).await;
    }

    let mut opts = common::v5::options("persist-v5", addr);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(60));
    for expected in [false, true] {
        let (c, mut e) = common::v5::connect(opts.clone());
        assert_eq!(
            next_matching(&mut e, "CONNACK", ev5::connack)
                .await
                .session_present,
            expected
        );
        c.disconnect().await.unwrap();
        next_matching(&mut e, "connection end", |e| e.as_ref().err().cloned()).await;
        wait_connections(&server, 0).await;
    }

    // A clean session is never present.
    let (_c, mut e) = common::v3::connect(common::v3::options("persist-v3", addr));
    assert!(!next_matching(&mut e, "CONNACK", ev3::connack).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_refused_because_ingest_delivers_nothing() {
    let sink = FakeSink::open();
    let (server, _) = start(local_config(), &sink).await;
    let (c3, mut e3) = common::v3::connect(common::v3::options("sub-v3", server.local_addr()));
    next_matching(&mut e3, "CONNACK", ev3::connack).await;
    c3.subscribe("stream/#", ev3::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = next_matching(&mut e3, "SUBACK", |e| match e {
        Ok(ev3::Event::Incoming(ev3::P::SubAck(ack))) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(codes, vec![ev3::SubscribeReasonCode::Failure]);

    let (c5, mut e5) = common::v5::connect(common::v5::options("sub-v5", server.local_addr()));
    next_matching(&mut e5, "CONNACK", ev5::connack).await;
    c5.subscribe("stream/x", ev5::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = next_matching(&mut e5, "SUBACK", |e| match e {
        Ok(ev5::Event::Incoming(ev5::P::SubAck(ack))) => Some(ack.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(codes, vec![SubReason5::NotAuthorized]);
    // The connection stays usable for publishing.
    c5.publish("stream/x", ev5::QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    assert_eq!(
        next_matching(&mut e5, "PUBACK", ev5::puback).await.reason,
        PubAckReason::Success
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_is_stored_once_and_completes_the_handshake() {
    let sink = FakeSink::open();
    let (server, _) = start(local_config(), &sink).await;
    let (c5, mut e5) = common::v5::connect(common::v5::options("q2-v5", server.local_addr()));
    next_matching(&mut e5, "CONNACK", ev5::connack).await;
    c5.publish("stream/q2", ev5::QoS::ExactlyOnce, false, vec![9])
        .await
        .unwrap();
    next_matching(&mut e5, "PUBCOMP", |e| {
        matches!(e, Ok(ev5::Event::Incoming(ev5::P::PubComp(_)))).then_some(())
    })
    .await;

    let (c3, mut e3) = common::v3::connect(common::v3::options("q2-v3", server.local_addr()));
    next_matching(&mut e3, "CONNACK", ev3::connack).await;
    c3.publish("stream/q2", ev3::QoS::ExactlyOnce, false, vec![8])
        .await
        .unwrap();
    next_matching(&mut e3, "PUBCOMP", |e| {
        matches!(e, Ok(ev3::Event::Incoming(ev3::P::PubComp(_)))).then_some(())
    })
    .await;
    assert_eq!(sink.records().len(), 2);
    assert_eq!(server.stats().received_by_qos[2], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    let sink = FakeSink::open();
    let (server, _) = start(local_config(), &sink).await;
    let (_old, mut old_events) =
        common::v5::connect(common::v5::options("twin", server.local_addr()));
    next_matching(&mut old_events, "CONNACK", ev5::connack).await;
    let (_new, mut new_events) =
        common::v5::connect(common::v5::options("twin", server.local_addr()));
    next_matching(&mut new_events, "CONNACK", ev5::connack).await;
    next_matching(&mut old_events, "DISCONNECT of the old connection", |e| {
        ev5::is_disconnect_or_error(e).then_some(())
    })
    .await;
    wait_connections(&server, 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        max_connections: 1,
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    let (_a, mut ea) = common::v5::connect(common::v5::options("first", server.local_addr()));
    next_matching(&mut ea, "CONNACK", ev5::connack).await;
    let (_b, mut eb) = common::v5::connect(common::v5::options("second", server.local_addr()));
    let refused = next_matching(&mut eb, "refusal", |e| e.as_ref().err().cloned()).await;
    assert!(
        refused.contains("refused") || refused.contains("Refused"),
        "{refused}"
    );
    assert_eq!(server.stats().connections_refused, 1);
    server.stop().await;
}

async fn wait_connections(server: &sensorflow_ingest::IngestServer, n: u64) {
    tokio::time::timeout(WAIT, async {
        // The counter is updated on the server's threads; poll it (bounded by the timeout).
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
        while server.stats().connections_current != n {
            tick.tick().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("connections never reached {n}"));
}

/// Regression: ntex-mqtt hands on a PUBLISH whose payload has not fully arrived as a stream and
/// goes on with the next ones; a later, fully buffered publish could then reach the sink
/// first, putting a device's packets out of order (and dedupe would drop the overtaken one).
/// Writing the stream in small pieces makes payloads arrive split across reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_reach_the_sink_in_arrival_order_when_payloads_arrive_in_pieces() {
    use tokio::io::AsyncWriteExt;

    const N: u16 = 400;
    let sink = FakeSink::open();
    let (server, _) = start(local_config(), &sink).await;
    let mut conn = common::raw5::connect(server.local_addr(), "pieces").await;
    conn.set_nodelay(true).unwrap();
    let mut wire = Vec::new();
    for id in 1..=N {
        let mut payload = vec![0u8; 1300];
        payload[..2].copy_from_slice(&id.to_be_bytes());
        wire.extend(common::raw5::encode_publish_qos1("stream/s", id, &payload));
    }
    for piece in wire.chunks(211) {
        conn.write_all(piece).await.unwrap();
        conn.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    sink.wait_stored(usize::from(N)).await;
    let order: Vec<u16> = sink
        .calls()
        .iter()
        .map(|r| u16::from_be_bytes([r.payload[0], r.payload[1]]))
        .collect();
    assert_eq!(order, (1..=N).collect::<Vec<_>>());
    server.stop().await;
}
