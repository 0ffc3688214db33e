//! WebSocket feeds over real sockets: downsampling, tagging, slow clients and shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sensorflow_api::{ApiConfig, HubConfig, WsKind};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use common::{TestServer, aggregate, chunk, fake_status, start, state_with, wait_until};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

const LIMIT: Duration = Duration::from_secs(10);

async fn server(hub: HubConfig, config: ApiConfig) -> TestServer {
    start(state_with(fake_status(), hub, config)).await
}

/// Connects to `path` and waits until the server has subscribed the client to the hub.
async fn connect(server: &TestServer, path: &str, kind: WsKind) -> Client {
    let before = server.state.metrics().ws_clients(kind);
    let (client, _) = connect_async(format!("ws://{}{path}", server.addr))
        .await
        .unwrap();
    let metrics = server.state.clone();
    wait_until("the client is subscribed", LIMIT, || {
        metrics.metrics().ws_clients(kind) > before
    })
    .await;
    client
}

async fn next_json(client: &mut Client) -> Value {
    loop {
        let message = timeout(LIMIT, client.next())
            .await
            .expect("message in time")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

fn indexes(rows: &Value) -> Vec<u64> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["sample_index"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn raw_feed_sends_each_chunk_as_an_array_of_rows_and_every_n_downsamples() {
    let server = server(HubConfig::default(), ApiConfig::default()).await;
    let mut all = connect(&server, "/ws/raw/s1", WsKind::Raw).await;
    let mut half = connect(&server, "/ws/raw/s1?every=2", WsKind::Raw).await;
    server.state.hub.publish_samples(chunk("s2", 0, 8));
    server.state.hub.publish_samples(chunk("s1", 0, 8));
    server.state.hub.publish_samples(chunk("s1", 8, 8));

    let first = next_json(&mut all).await;
    assert_eq!(indexes(&first), (0..8).collect::<Vec<_>>());
    assert_eq!(first[3]["sensor_id"], "s1");
    assert_eq!(first[3]["session_id"], "s1_0");
    assert_eq!(first[3]["accl_mag"], 0.75);
    assert_eq!(first[3]["temp_raw"], 21);
    assert_eq!(
        indexes(&next_json(&mut all).await),
        (8..16).collect::<Vec<_>>()
    );

    assert_eq!(indexes(&next_json(&mut half).await), vec![0, 2, 4, 6]);
    assert_eq!(indexes(&next_json(&mut half).await), vec![8, 10, 12, 14]);
    let metrics = server.state.metrics();
    wait_until("sends are counted", LIMIT, || {
        metrics.ws_sent_total(WsKind::Raw) == 4
    })
    .await;
}

#[tokio::test]
async fn session_feeds_carry_tagged_events_and_aggregates() {
    let server = server(HubConfig::default(), ApiConfig::default()).await;
    let mut one = connect(&server, "/ws/session/s1_1000", WsKind::Session).await;
    let mut all = connect(&server, "/ws/sessions", WsKind::Sessions).await;
    let mut by_sensor = connect(&server, "/ws/aggregate/s1", WsKind::Aggregate).await;
    server
        .state
        .hub
        .publish_aggregate(aggregate("s2_1000", "s2"));
    server
        .state
        .hub
        .publish_aggregate(aggregate("s1_1000", "s1"));

    let m = next_json(&mut one).await;
    assert_eq!(
        (m["type"].as_str(), m["session_id"].as_str()),
        (Some("aggregate"), Some("s1_1000"))
    );
    assert_eq!(next_json(&mut all).await["session_id"], "s2_1000");
    assert_eq!(next_json(&mut all).await["session_id"], "s1_1000");
    let a = next_json(&mut by_sensor).await;
    assert_eq!(a["session_id"], "s1_1000");
    assert!(
        a.get("type").is_none(),
        "the aggregate feed carries bare aggregates"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_slow_the_publisher_and_is_dropped() {
    let config = ApiConfig {
        ws_send_timeout: Duration::from_millis(300),
        ..ApiConfig::default()
    };
    let server = server(
        HubConfig {
            topic_capacity: 16,
            ..HubConfig::default()
        },
        config,
    )
    .await;
    // Connected, subscribed, and never polled again: the server's writes pile up in TCP buffers.
    let _stalled = connect(&server, "/ws/raw/s1", WsKind::Raw).await;

    let hub = server.state.hub.clone();
    let big = chunk("s1", 0, 64);
    let started = Instant::now();
    let publisher = hub.clone();
    let published = tokio::task::spawn_blocking(move || {
        for _ in 0..100_000 {
            publisher.publish_samples(big.clone());
        }
    });
    timeout(LIMIT, published)
        .await
        .expect("publisher finished in time")
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "publishing 100k chunks took {elapsed:?}"
    );

    let metrics = server.state.metrics();
    wait_until("lost messages are counted", LIMIT, || {
        metrics.ws_dropped_total(WsKind::Raw) > 0
    })
    .await;
    let sent = metrics.ws_sent_total(WsKind::Raw);
    assert!(
        sent < 100_000,
        "a stalled client cannot have received everything ({sent})"
    );

    // Keep the feed going until the socket buffers are full and a write times out.
    let stop = Arc::new(AtomicBool::new(false));
    let (publisher, stopped) = (hub.clone(), stop.clone());
    let feeding = tokio::task::spawn_blocking(move || {
        let big = chunk("s1", 0, 64);
        while !stopped.load(Ordering::Relaxed) {
            publisher.publish_samples(big.clone());
            std::thread::yield_now();
        }
    });
    wait_until("the stalled client is closed", LIMIT, || {
        metrics.ws_closed_slow_total(WsKind::Raw) == 1 && metrics.ws_clients(WsKind::Raw) == 0
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    feeding.await.unwrap();
    // The topic went away with its last subscriber.
    assert_eq!(server.state.hub.topic_counts()[0], ("raw", 0));
}

#[tokio::test]
async fn a_lagging_client_skips_ahead_and_keeps_receiving() {
    let server = server(
        HubConfig {
            topic_capacity: 4,
            ..HubConfig::default()
        },
        ApiConfig::default(),
    )
    .await;
    let mut client = connect(&server, "/ws/windows/s1", WsKind::Windows).await;
    let mut sub = server.state.hub.subscribe_windows("s1");
    // Fill far past the buffer before the server task can forward: it must report lag and go on.
    let window = |start: i64| {
        Arc::new(sensorflow_records::WindowRecord {
            sensor_id: "s1".into(),
            window_start_us: start,
            window_end_us: start + 1,
            count: 1,
            accl_mag_mean: 1.0,
            accl_mag_std: 0.0,
            accl_mag_min: 1.0,
            accl_mag_max: 1.0,
            gyro_mag_mean: 0.0,
            gyro_mag_std: 0.0,
            gyro_mag_min: 0.0,
            gyro_mag_max: 0.0,
        })
    };
    for i in 0..1000 {
        server.state.hub.publish_window(window(i));
    }
    // Our own subscriber saw the same lag the server's did.
    assert!(matches!(
        sub.recv().await,
        Err(sensorflow_api::hub::RecvError::Lagged(_))
    ));
    let last = loop {
        let w = next_json(&mut client).await;
        if w["window_start_us"] == 999 {
            break w;
        }
    };
    assert_eq!(last["count"], 1);
    let metrics = server.state.metrics();
    // Every message is either sent or counted as dropped (the last send is counted just after
    // the client may have read it).
    wait_until("every message is accounted for", LIMIT, || {
        metrics.ws_sent_total(WsKind::Windows) + metrics.ws_dropped_total(WsKind::Windows) == 1000
    })
    .await;
    assert!(metrics.ws_dropped_total(WsKind::Windows) > 0);
}

#[tokio::test]
async fn shutdown_closes_websocket_clients_as_going_away_and_stops_serving() {
    let mut server = server(HubConfig::default(), ApiConfig::default()).await;
    let mut client = connect(&server, "/ws/raw/s1", WsKind::Raw).await;
    let _ = server.shutdown.take().unwrap().send(());
    let close = loop {
        match timeout(LIMIT, client.next()).await.expect("close in time") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1001);
    let _ = client.close(None).await;
    timeout(LIMIT, &mut server.task)
        .await
        .expect("server stopped in time")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn client_messages_are_ignored_and_a_client_close_is_counted() {
    let server = server(HubConfig::default(), ApiConfig::default()).await;
    let mut client = connect(&server, "/ws/raw/s1", WsKind::Raw).await;
    client.send(Message::text("hello")).await.unwrap();
    server.state.hub.publish_samples(chunk("s1", 0, 2));
    assert_eq!(indexes(&next_json(&mut client).await), vec![0, 1]);
    client.close(None).await.unwrap();
    let metrics = server.state.metrics();
    wait_until("the client is gone", LIMIT, || {
        metrics.ws_clients(WsKind::Raw) == 0
    })
    .await;
}
