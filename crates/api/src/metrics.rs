//! The API's own metrics (WebSocket clients and messages, HTTP requests), rendered in the
//! Prometheus text format after the runtime's metrics on `GET /metrics`.
//!
//! Counters are plain atomics indexed by [`WsKind`]: the WebSocket send loop touches them per
//! message, so they must not take a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::collections::BTreeMap;

use crate::hub::Hub;

/// The kinds of WebSocket feeds, one label value each in the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WsKind {
    /// `/ws/raw/{sensor_id}`
    Raw,
    /// `/ws/windows/{sensor_id}`
    Windows,
    /// `/ws/aggregate/{sensor_id}`
    Aggregate,
    /// `/ws/session/{session_id}`
    Session,
    /// `/ws/sessions`
    Sessions,
}

impl WsKind {
    /// Every kind, in label order.
    pub const ALL: [WsKind; 5] = [
        WsKind::Raw,
        WsKind::Windows,
        WsKind::Aggregate,
        WsKind::Session,
        WsKind::Sessions,
    ];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WsKind::Raw => "raw",
            WsKind::Windows => "windows",
            WsKind::Aggregate => "aggregate",
            WsKind::Session => "session",
            WsKind::Sessions => "sessions",
        }
    }
}

#[derive(Debug, Default)]
struct WsCounters {
    clients: AtomicI64,
    connections: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    closed_slow: AtomicU64,
}

/// Counters of the API, shared by every handler.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    ws: [WsCounters; 5],
    /// Requests by (matched route, status code).
    http: Mutex<BTreeMap<(String, u16), u64>>,
    /// Open HTTP connections (WebSockets included until they close).
    pub(crate) http_connections: AtomicI64,
    /// HTTP connections closed at accept: `max_connections_per_ip` reached.
    pub(crate) http_refused_per_ip: AtomicU64,
    /// HTTP connections closed at accept: `max_connections` reached.
    pub(crate) http_refused_total_cap: AtomicU64,
    /// WebSocket upgrades refused: `max_websockets_per_token` reached for the token.
    pub(crate) ws_refused_per_token: AtomicU64,
}

impl ApiMetrics {
    fn ws(&self, kind: WsKind) -> &WsCounters {
        &self.ws[kind as usize]
    }

    /// A WebSocket client of `kind` connected.
    pub fn ws_connected(&self, kind: WsKind) {
        self.ws(kind).clients.fetch_add(1, Ordering::Relaxed);
        self.ws(kind).connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A WebSocket client of `kind` went away.
    pub fn ws_disconnected(&self, kind: WsKind) {
        self.ws(kind).clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// A message was written to a client.
    pub fn ws_sent(&self, kind: WsKind) {
        self.ws(kind).sent.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` messages never reached a client: it fell behind the topic buffer, or was closed
    /// for being slow with messages still queued.
    pub fn ws_dropped(&self, kind: WsKind, n: u64) {
        self.ws(kind).dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// A client was closed because a send took longer than the send timeout.
    pub fn ws_closed_slow(&self, kind: WsKind) {
        self.ws(kind).closed_slow.fetch_add(1, Ordering::Relaxed);
    }

    /// Connected clients of `kind`.
    pub fn ws_clients(&self, kind: WsKind) -> i64 {
        self.ws(kind).clients.load(Ordering::Relaxed)
    }

    /// Messages sent to clients of `kind` since start.
    pub fn ws_sent_total(&self, kind: WsKind) -> u64 {
        self.ws(kind).sent.load(Ordering::Relaxed)
    }

    /// Messages dropped for clients of `kind` since start.
    pub fn ws_dropped_total(&self, kind: WsKind) -> u64 {
        self.ws(kind).dropped.load(Ordering::Relaxed)
    }

    /// Clients of `kind` closed for being slow since start.
    pub fn ws_closed_slow_total(&self, kind: WsKind) -> u64 {
        self.ws(kind).closed_slow.load(Ordering::Relaxed)
    }

    /// An HTTP request to `route` (the matched route pattern, so ids do not explode the label
    /// set) answered `status`.
    pub fn http_request(&self, route: &str, status: u16) {
        let mut http = self.http.lock();
        match http.get_mut(&(route.to_owned(), status)) {
            Some(n) => *n += 1,
            None => {
                http.insert((route.to_owned(), status), 1);
            }
        }
    }

    /// Appends the API and hub metrics to `out` in the Prometheus text format 0.0.4.
    pub fn render(&self, hub: &Hub, out: &mut String) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        type Getter = fn(&WsCounters) -> f64;
        let families: [(&str, &str, &str, Getter); 5] = [
            (
                "sensorflow_ws_clients",
                "gauge",
                "Connected WebSocket clients.",
                |c| c.clients.load(Ordering::Relaxed) as f64,
            ),
            (
                "sensorflow_ws_connections_total",
                "counter",
                "WebSocket connections accepted.",
                |c| c.connections.load(Ordering::Relaxed) as f64,
            ),
            (
                "sensorflow_ws_messages_sent_total",
                "counter",
                "Messages written to WebSocket clients.",
                |c| c.sent.load(Ordering::Relaxed) as f64,
            ),
            (
                "sensorflow_ws_messages_dropped_total",
                "counter",
                "Messages a WebSocket client never got: it fell behind the topic buffer (lag) or was closed for being slow.",
                |c| c.dropped.load(Ordering::Relaxed) as f64,
            ),
            (
                "sensorflow_ws_clients_closed_slow_total",
                "counter",
                "WebSocket clients closed because a send took longer than the send timeout.",
                |c| c.closed_slow.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ws in WsKind::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{kind=\"{}\"}} {}",
                    ws.as_str(),
                    get(self.ws(ws))
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP sensorflow_hub_topics Live hub topics that have subscribers.\n# TYPE sensorflow_hub_topics gauge"
        );
        for (kind, n) in hub.topic_counts() {
            let _ = writeln!(out, "sensorflow_hub_topics{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP sensorflow_hub_published_total Messages the hub handed to at least one subscriber.\n# TYPE sensorflow_hub_published_total counter\nsensorflow_hub_published_total {}",
            hub.published_total()
        );
        let _ = writeln!(
            out,
            "# HELP sensorflow_http_connections Open HTTP connections.\n# TYPE sensorflow_http_connections gauge\nsensorflow_http_connections {}",
            self.http_connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sensorflow_http_connections_refused_total HTTP connections closed at accept, by the limit reached.\n# TYPE sensorflow_http_connections_refused_total counter\nsensorflow_http_connections_refused_total{{reason=\"per_ip\"}} {}\nsensorflow_http_connections_refused_total{{reason=\"total\"}} {}",
            self.http_refused_per_ip.load(Ordering::Relaxed),
            self.http_refused_total_cap.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sensorflow_ws_refused_per_token_total WebSocket upgrades refused because the token had max_websockets_per_token open.\n# TYPE sensorflow_ws_refused_per_token_total counter\nsensorflow_ws_refused_per_token_total {}",
            self.ws_refused_per_token.load(Ordering::Relaxed)
        );
        // A family's samples follow its HELP and TYPE lines, before any other family.
        let _ = writeln!(
            out,
            "# HELP sensorflow_http_requests_total HTTP requests by route and status.\n# TYPE sensorflow_http_requests_total counter"
        );
        for ((route, status), n) in self.http.lock().iter() {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "sensorflow_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
}
