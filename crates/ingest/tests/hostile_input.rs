//! Hostile or careless clients cannot make the MQTT listener buffer without bound or keep
//! state forever: packet size, client id length, keep-alive 0 and persistent sessions are
//! bounded. Raw sockets, so that the tests control every byte the server sees.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw5::{packet, read_packet, string};
use common::{FakeSink, WAIT, local_config, start};
use sensorflow_ingest::{IngestConfig, IngestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest remaining length MQTT can express: 256 MiB - 1.
const HUGE_LENGTH: [u8; 4] = [0xff, 0xff, 0xff, 0x7f];

/// A config where nothing but the feature under test closes a connection soon: without the
/// packet size limit a huge CONNECT would only be dropped by the connect timeout.
fn patient_config() -> IngestConfig {
    IngestConfig {
        connect_timeout: Duration::from_secs(120),
        ..local_config()
    }
}

/// CONNECT body: protocol `level` (4 = 3.1.1, 5 = 5.0), given flags and keep-alive.
fn connect_body(level: u8, flags: u8, keep_alive: u16, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string("MQTT", &mut body);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    string(client_id, &mut body);
    body
}

/// Opens a connection and returns it with the CONNACK body.
async fn connect(
    addr: SocketAddr,
    level: u8,
    flags: u8,
    keep_alive: u16,
    client_id: &str,
) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = connect_body(level, flags, keep_alive, client_id);
    stream.write_all(&packet(0x10, &body)).await.unwrap();
    let (kind, ack) = read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!(kind >> 4, 2, "expected CONNACK, got {kind:#x}");
    (stream, ack)
}

/// Waits until the server closed `stream` (EOF or reset), skipping packets it sends first
/// (MQTT 5: DISCONNECT). Panics after [`WAIT`].
async fn assert_closed_by_server(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server did not close the connection");
}

/// MQTT 5 CONNACK properties this server sends, by property id, as integers.
fn connack_properties(ack: &[u8]) -> Vec<(u8, u64)> {
    let (mut len, mut shift, mut at) = (0usize, 0, 2);
    loop {
        let b = ack[at];
        at += 1;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let props = &ack[at..at + len];
    let mut out = Vec::new();
    let mut i = 0;
    while i < props.len() {
        let id = props[i];
        i += 1;
        let width = match id {
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x13 | 0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            // strings / binary data: skip them
            0x12 | 0x1f | 0x1a | 0x1c | 0x15 | 0x16 => {
                let n = usize::from(u16::from_be_bytes([props[i], props[i + 1]]));
                i += 2 + n;
                continue;
            }
            other => panic!("unexpected CONNACK property {other:#x}"),
        };
        let value = props[i..i + width]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b));
        out.push((id, value));
        i += width;
    }
    out
}

async fn wait_no_connections(server: &IngestServer) {
    tokio::time::timeout(WAIT, async {
        // Updated on the server's threads; polled, bounded by the timeout.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while server.stats().connections_current != 0 {
            tick.tick().await;
        }
    })
    .await
    .expect("connections never closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_declaring_256_mib_is_refused_from_its_fixed_header_on_both_versions() {
    let sink = FakeSink::open();
    let (server, _) = start(patient_config(), &sink).await;
    for level in [4u8, 5] {
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        // Fixed header, the 256 MiB length, and just enough of the variable header for the
        // protocol version to be known; the rest of the body is never sent.
        let mut head = vec![0x10];
        head.extend_from_slice(&HUGE_LENGTH);
        string("MQTT", &mut head);
        head.extend_from_slice(&[level, 0x02, 0, 60]);
        stream.write_all(&head).await.unwrap();
        assert_closed_by_server(&mut stream).await;
    }
    assert_eq!(server.stats().packets_too_large, 2);
    assert_eq!(server.stats().connections_total, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_publish_declaring_256_mib_close_the_connection_unread() {
    let sink = FakeSink::open();
    let (server, _) = start(patient_config(), &sink).await;
    let mut refused = 0;
    for level in [4u8, 5] {
        // SUBSCRIBE (0x82) and QoS 1 PUBLISH (0x32) on a data topic.
        for first in [0x82u8, 0x32] {
            let (mut stream, ack) = connect(server.local_addr(), level, 0x02, 60, "big").await;
            assert_eq!(ack[1], 0, "connect accepted");
            let mut head = vec![first];
            head.extend_from_slice(&HUGE_LENGTH);
            string("stream/imu-1", &mut head);
            head.extend_from_slice(&[0, 1]);
            stream.write_all(&head).await.unwrap();
            assert_closed_by_server(&mut stream).await;
            refused += 1;
            assert_eq!(server.stats().packets_too_large, refused);
        }
    }
    assert_eq!(sink.started(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_connack_advertises_the_maximum_packet_size() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        max_message_bytes: 4096,
        ..local_config()
    };
    let expected = config.max_packet_bytes() as u64;
    let (server, _) = start(config, &sink).await;
    let (_stream, ack) = connect(server.local_addr(), 5, 0x02, 60, "probe").await;
    assert_eq!(ack[1], 0);
    let props = connack_properties(&ack);
    assert!(
        props.contains(&(0x27, expected)),
        "maximum packet size {expected} missing in {props:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_longer_than_the_limit_is_refused_with_the_version_specific_code() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        max_client_id_bytes: 32,
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    let long = "x".repeat(33);
    let (_s, ack) = connect(server.local_addr(), 4, 0x02, 60, &long).await;
    assert_eq!(ack, vec![0, 2], "3.1.1: identifier rejected");
    let (_s, ack) = connect(server.local_addr(), 5, 0x02, 60, &long).await;
    assert_eq!(ack[1], 0x85, "5.0: client identifier not valid");
    let (_s, ack) = connect(server.local_addr(), 4, 0x02, 60, &"x".repeat(32)).await;
    assert_eq!(ack, vec![0, 0], "an id at the limit is accepted");
    let stats = server.stats();
    assert_eq!(stats.client_id_too_long, 2);
    assert_eq!(stats.connections_refused, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_connections_are_closed_after_the_idle_timeout() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        idle_timeout: Duration::from_secs(2),
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    for level in [4u8, 5] {
        let started = Instant::now();
        let (mut stream, ack) = connect(server.local_addr(), level, 0x02, 0, "silent").await;
        if level == 5 {
            assert_eq!(ack[1], 0);
            let props = connack_properties(&ack);
            let server_keep_alive = props.iter().find(|(id, _)| *id == 0x13).map(|p| p.1);
            assert!(
                matches!(server_keep_alive, Some(1..=2)),
                "server keep alive within the idle timeout: {props:?}"
            );
        }
        assert_closed_by_server(&mut stream).await;
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "closed too early: {:?}",
            started.elapsed()
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_persistent_session_cap_the_longest_detached_session_is_evicted() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        max_persistent_sessions: 2,
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    let addr = server.local_addr();
    // clean session = false (flags 0x00): persistent.
    for id in ["first", "second", "third"] {
        let (mut stream, ack) = connect(addr, 4, 0x00, 60, id).await;
        assert_eq!(ack, vec![0, 0]);
        stream.write_all(&[0xe0, 0x00]).await.unwrap(); // DISCONNECT
        assert_closed_by_server(&mut stream).await;
        wait_no_connections(&server).await;
    }
    assert_eq!(server.stats().sessions_evicted, 1);
    let (_s, ack) = connect(addr, 4, 0x00, 60, "second").await;
    assert_eq!(ack, vec![1, 0], "second kept its session");
    let (_s, ack) = connect(addr, 4, 0x00, 60, "first").await;
    assert_eq!(ack, vec![0, 0], "first, detached longest ago, was evicted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_never_completes_is_closed_after_the_connect_timeout() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        connect_timeout: Duration::from_secs(2),
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    // A CONNECT of 40 bytes of which only the version part arrives (slow loris), and a
    // connection that sends nothing at all.
    let mut partial = vec![0x10, 40];
    string("MQTT", &mut partial);
    partial.extend_from_slice(&[4, 0x02]);
    for head in [partial, Vec::new()] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream.write_all(&head).await.unwrap();
        assert_closed_by_server(&mut stream).await;
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(1500)..Duration::from_millis(4000)).contains(&took),
            "closed after {took:?}, expected about the 2 s connect timeout"
        );
    }
    assert_eq!(server.stats().connections_total, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_keep_alive_zero_keeps_a_silent_v3_connection_past_the_idle_timeout() {
    let sink = FakeSink::open();
    let config = IngestConfig {
        idle_timeout: Duration::from_secs(1),
        allow_keep_alive_zero: true,
        ..local_config()
    };
    let (server, _) = start(config, &sink).await;
    let (mut stream, ack) = connect(server.local_addr(), 4, 0x02, 0, "silent").await;
    assert_eq!(ack, vec![0, 0]);
    // A bounded wait for something that must not happen: well past the 1 s idle timeout
    // (which the test above shows closes such a connection when not allowed).
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(2500), stream.read(&mut buf)).await;
    assert!(
        read.is_err(),
        "the connection was closed or written to: {read:?}"
    );
    server.stop().await;
}
