//! The HTTP server bounds what a client can hold: half-sent requests are closed after the
//! header read timeout, connections are capped per source IP, and `/sensors` is paginated.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use sensorflow_api::{ApiConfig, HubConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{FakeStatus, fake_status, sensor, start, state_with};

/// Reads until the server closes the connection; returns what it sent. Fails after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server did not close the connection");
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(10)).await
}

#[tokio::test]
async fn a_half_sent_request_is_closed_after_the_header_read_timeout() {
    let config = ApiConfig {
        header_read_timeout: Duration::from_secs(1),
        ..ApiConfig::default()
    };
    let server = start(state_with(fake_status(), HubConfig::default(), config)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed before the timeout: {took:?}"
    );
    // The server still answers complete requests.
    assert!(
        get(server.addr, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn connections_beyond_the_per_ip_cap_are_closed_at_accept_and_counted() {
    let config = ApiConfig {
        max_connections_per_ip: 2,
        ..ApiConfig::default()
    };
    let state = state_with(fake_status(), HubConfig::default(), config);
    let server = start(state.clone()).await;
    // Two idle connections (inside the header timeout) hold both slots of 127.0.0.1.
    let _a = TcpStream::connect(server.addr).await.unwrap();
    let _b = TcpStream::connect(server.addr).await.unwrap();
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert_eq!(answer, "", "the third connection got no answer");
    let mut metrics = String::new();
    state.metrics().render(&state.hub, &mut metrics);
    assert!(
        metrics.contains("sensorflow_http_connections_refused_total{reason=\"per_ip\"} 1"),
        "{metrics}"
    );
    // Freeing a slot lets the next connection in.
    drop(_a);
    common::wait_until("a slot is free", Duration::from_secs(10), || {
        let mut m = String::new();
        state.metrics().render(&state.hub, &mut m);
        m.contains("sensorflow_http_connections 1\n")
    })
    .await;
    assert!(
        get(server.addr, "/health")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn sensors_are_paged_with_limit_offset_and_prefix_and_a_total_count() {
    let status = std::sync::Arc::new(FakeStatus {
        sensors: ["imu-3", "imu-1", "temp-1", "imu-2"]
            .into_iter()
            .map(|id| sensor(id, 0))
            .collect(),
        ..std::sync::Arc::into_inner(fake_status()).unwrap()
    });
    let server = start(state_with(
        status,
        HubConfig::default(),
        ApiConfig::default(),
    ))
    .await;
    let ids = |response: &str| -> (Vec<String>, String) {
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let total = head
            .lines()
            .find_map(|l| l.strip_prefix("x-total-count: "))
            .unwrap_or_default()
            .to_owned();
        let body = body.trim();
        // Chunked or not: the JSON array is the part between the outer brackets.
        let json = &body[body.find('[').unwrap()..=body.rfind(']').unwrap()];
        let v: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
        (
            v.iter()
                .map(|s| s["sensor_id"].as_str().unwrap().to_owned())
                .collect(),
            total,
        )
    };
    let (page, total) = ids(&get(server.addr, "/sensors?limit=2&prefix=imu-").await);
    assert_eq!(page, ["imu-1", "imu-2"]);
    assert_eq!(total, "3");
    let (page, _) = ids(&get(server.addr, "/sensors?limit=2&offset=2&prefix=imu-").await);
    assert_eq!(page, ["imu-3"]);
    let (page, total) = ids(&get(server.addr, "/sensors").await);
    assert_eq!(page.len(), 4);
    assert_eq!(total, "4");
    assert!(
        get(server.addr, "/sensors?limit=1001")
            .await
            .starts_with("HTTP/1.1 400")
    );
}
