//! The dashboard and the API docs page, embedded in the binary (no files needed at run time, no
//! CDN: uPlot is vendored under `assets/vendor/`, MIT licence beside it).

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");
const DOCS_HTML: &str = include_str!("../assets/docs.html");
const UPLOT_JS: &str = include_str!("../assets/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/vendor/uPlot.min.css");

// Assets are small and change only with the binary; `no-cache` makes browsers revalidate after
// an upgrade instead of running a stale app against a new API.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The live dashboard: sensors, live charts and sessions.
#[utoipa::path(get, path = "/", tag = "docs",
    responses((status = 200, description = "Dashboard page", content_type = "text/html")))]
pub(crate) async fn dashboard() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// A human-readable rendering of `/openapi.json`.
#[utoipa::path(get, path = "/docs", tag = "docs",
    responses((status = 200, description = "API documentation page", content_type = "text/html")))]
pub(crate) async fn docs() -> Html<&'static str> {
    Html(DOCS_HTML)
}

pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

pub(crate) async fn uplot_js() -> Response {
    asset("text/javascript; charset=utf-8", UPLOT_JS)
}

pub(crate) async fn uplot_css() -> Response {
    asset("text/css; charset=utf-8", UPLOT_CSS)
}
