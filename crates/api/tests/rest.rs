//! REST endpoints through the router (no sockets): status codes, JSON shapes, metrics, OpenAPI.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use sensorflow_api::{ApiConfig, HubConfig, router};
use serde_json::Value;
use tower::ServiceExt;

use common::{aggregate, fake_status, state_with};

async fn get(app: &axum::Router, uri: &str) -> (StatusCode, String, String) {
    let response = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

async fn get_json(app: &axum::Router, uri: &str) -> (StatusCode, Value) {
    let (status, content_type, body) = get(app, uri).await;
    assert!(
        content_type.starts_with("application/json"),
        "{uri}: content type {content_type}"
    );
    (status, serde_json::from_str(&body).unwrap())
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
}

fn app() -> (
    axum::Router,
    std::sync::Arc<common::FakeStatus>,
    sensorflow_api::ApiState,
) {
    let status = fake_status();
    let state = state_with(status.clone(), HubConfig::default(), ApiConfig::default());
    (router(state.clone()), status, state)
}

#[tokio::test]
async fn health_answers_ok() {
    let (app, ..) = app();
    let (status, body) = get_json(&app, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn ready_is_503_with_component_status_until_every_component_is_ok() {
    let (app, status, _) = app();
    let (code, body) = get_json(&app, "/ready").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["ready"], true);
    status.ready.store(false, Ordering::Relaxed);
    let (code, body) = get_json(&app, "/ready").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    assert_eq!(body["components"]["pipeline"]["ok"], false);
    assert_eq!(body["components"]["pipeline"]["detail"], "starting");
}

#[tokio::test]
async fn sensors_are_listed_sorted_by_id_with_counters() {
    let (app, ..) = app();
    let (code, body) = get_json(&app, "/sensors").await;
    assert_eq!(code, StatusCode::OK);
    let ids: Vec<_> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sensor_id"].clone())
        .collect();
    assert_eq!(ids, vec!["s1", "s2"]);
    assert_eq!(body[1]["gaps"], 3);
    assert_eq!(body[1]["bad"]["bad_crc"], 2);
    assert_eq!(body[1]["samples_per_s"], 200.0);
}

#[tokio::test]
async fn one_sensor_is_served_and_an_unknown_one_is_404_not_found() {
    let (app, ..) = app();
    let (code, body) = get_json(&app, "/sensors/s2").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["sensor_id"], "s2");
    let (code, body) = get_json(&app, "/sensors/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
}

#[tokio::test]
async fn sessions_default_to_active_ones_with_their_latest_aggregate() {
    let (app, status, state) = app();
    state.hub.publish_aggregate(aggregate("s1_1000", "s1"));
    let (code, body) = get_json(&app, "/sessions").await;
    assert_eq!(code, StatusCode::OK);
    let sessions = body.as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(
        sessions
            .iter()
            .all(|s| s["active"] == true && s["end_us"].is_null())
    );
    assert_eq!(sessions[0]["session_id"], "s1_1000");
    assert_eq!(sessions[0]["aggregate"]["distance_m"], 12.0);
    assert!(sessions[1]["aggregate"].is_null());
    let query = status.sessions.last_query.lock().clone().unwrap();
    assert_eq!(
        (query.active, query.limit, query.offset),
        (Some(true), 100, 0)
    );
}

#[tokio::test]
async fn sessions_query_parameters_reach_the_store() {
    let (app, status, _) = app();
    let (code, body) = get_json(
        &app,
        "/sessions?sensor_id=s1&active=any&from_us=5&to_us=10&limit=7&offset=1",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 1);
    let q = status.sessions.last_query.lock().clone().unwrap();
    assert_eq!(q.sensor_id.as_deref(), Some("s1"));
    assert_eq!(
        (q.active, q.from_us, q.to_us, q.limit, q.offset),
        (None, Some(5), Some(10), 7, 1)
    );
    let (_, ended) = get_json(&app, "/sessions?active=false").await;
    assert_eq!(ended[0]["session_id"], "s1_0");
    assert_eq!(ended[0]["active"], false);
    assert_eq!(ended[0]["end_reason"], "gap");
    assert_eq!(ended[0]["aggregate"]["emitted_at_us"], 5);
}

#[tokio::test]
async fn invalid_sessions_parameters_are_400_bad_request() {
    let (app, ..) = app();
    for uri in [
        "/sessions?limit=0",
        "/sessions?limit=5000",
        "/sessions?limit=abc",
        "/sessions?active=maybe",
        "/sessions?from_us=10&to_us=5",
        "/sessions?sensor=s1",
        "/sessions?sensor_id=",
    ] {
        let (code, body) = get_json(&app, uri).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri}");
        assert_error(&body, "bad_request");
    }
}

#[tokio::test]
async fn a_failing_sessions_store_is_503_unavailable() {
    let (app, status, _) = app();
    status.sessions.fail.store(true, Ordering::Relaxed);
    let (code, body) = get_json(&app, "/sessions").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_error(&body, "unavailable");
}

#[tokio::test]
async fn one_session_is_served_and_an_unknown_one_is_404_not_found() {
    let (app, ..) = app();
    let (code, body) = get_json(&app, "/sessions/s1_0").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["end_us"], 900);
    assert_eq!(body["end_reason"], "gap");
    assert_eq!(
        body["aggregate"]["distance_m"], 12.0,
        "an ended session is served with its stored aggregate, no live one needed"
    );
    let (code, body) = get_json(&app, "/sessions/s9_1").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
}

#[tokio::test]
async fn unknown_routes_and_methods_use_the_error_shape() {
    let (app, ..) = app();
    let (code, body) = get_json(&app, "/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
    let response = app
        .clone()
        .oneshot(Request::post("/sensors").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_error(&body, "method_not_allowed");
}

#[tokio::test]
async fn websocket_endpoints_without_upgrade_are_426_upgrade_required() {
    let (app, ..) = app();
    let (code, body) = get_json(&app, "/ws/raw/s1").await;
    assert_eq!(code, StatusCode::UPGRADE_REQUIRED);
    assert_error(&body, "upgrade_required");
    let (code, body) = get_json(&app, "/ws/raw/s1?every=0").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_runtime_and_api_families() {
    let (app, ..) = app();
    get(&app, "/health").await;
    let (code, content_type, body) = get(&app, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for line in [
        "sensorflow_runtime_up 1",
        "# TYPE sensorflow_ws_clients gauge",
        "sensorflow_ws_clients{kind=\"raw\"} 0",
        "sensorflow_ws_messages_sent_total{kind=\"raw\"} 0",
        "sensorflow_ws_messages_dropped_total{kind=\"raw\"} 0",
        "sensorflow_ws_clients_closed_slow_total{kind=\"sessions\"} 0",
        "sensorflow_hub_topics{kind=\"raw\"} 0",
        "sensorflow_hub_published_total 0",
        "sensorflow_http_requests_total{route=\"/health\",status=\"200\"} 1",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        );
    }
    // Every sample line belongs to a family declared by a TYPE line.
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} has no TYPE line"
        );
    }
}

#[tokio::test]
async fn openapi_document_lists_every_endpoint_and_schema() {
    let (app, ..) = app();
    let (code, doc) = get_json(&app, "/openapi.json").await;
    assert_eq!(code, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/",
        "/docs",
        "/health",
        "/ready",
        "/sensors",
        "/sensors/{sensor_id}",
        "/sessions",
        "/sessions/{session_id}",
        "/metrics",
        "/openapi.json",
        "/ws/raw/{sensor_id}",
        "/ws/windows/{sensor_id}",
        "/ws/aggregate/{sensor_id}",
        "/ws/session/{session_id}",
        "/ws/sessions",
    ] {
        assert!(paths.contains_key(path), "missing path {path}");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "SensorStatus",
        "ReadyStatus",
        "SessionView",
        "ErrorBody",
        "SampleRow",
        "WindowRecord",
        "SessionAggregate",
        "SessionMessage",
    ] {
        assert!(schemas.contains_key(schema), "missing schema {schema}");
    }
    let params: Vec<_> = doc["paths"]["/sessions"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        params,
        ["sensor_id", "active", "from_us", "to_us", "limit", "offset"]
    );
}

#[tokio::test]
async fn dashboard_docs_and_assets_are_served_from_the_binary() {
    let (app, ..) = app();
    let (code, content_type, body) = get(&app, "/").await;
    assert_eq!(code, StatusCode::OK);
    assert!(content_type.starts_with("text/html"));
    assert!(body.contains("data-testid=\"sensors-table\""));
    for (uri, kind, needle) in [
        ("/assets/app.js", "text/javascript", "/ws/raw/"),
        ("/assets/style.css", "text/css", "--accent"),
        (
            "/assets/vendor/uPlot.iife.min.js",
            "text/javascript",
            "uPlot",
        ),
        ("/assets/vendor/uPlot.min.css", "text/css", ".uplot"),
        ("/docs", "text/html", "/openapi.json"),
    ] {
        let (code, content_type, body) = get(&app, uri).await;
        assert_eq!(code, StatusCode::OK, "{uri}");
        assert!(content_type.starts_with(kind), "{uri}: {content_type}");
        assert!(body.contains(needle), "{uri}");
    }
}
