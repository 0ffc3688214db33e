//! Bearer tokens and CORS (DESIGN.md, "Security").
//!
//! The tokens file holds `name:sha256-hex-of-token` lines (`sensorflow token FILE NAME` writes
//! them). A request presents `Authorization: Bearer TOKEN`, or, for a WebSocket upgrade from a
//! browser (which cannot set headers there), the subprotocol `bearer.TOKEN`, which the upgrade
//! response then selects. The token's SHA-256 is compared with every stored digest in constant
//! time. Tokens are never logged: only the name of the matching entry is known after a match.

use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{ErrorBody, ErrorDetail};
use crate::server::ApiState;

/// Prefix of the WebSocket subprotocol that carries a token.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// Errors reading the tokens file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks a token name: non-empty, at most 128 bytes, no `:`, whitespace or control characters.
pub fn validate_token_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 128 {
        return Err("a token name must be 1 to 128 bytes");
    }
    if name
        .chars()
        .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("a token name must not contain ':', whitespace or control characters");
    }
    Ok(())
}

/// The API tokens: names and SHA-256 digests (never the tokens). Debug shows only the names.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiTokens {
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(n, _)| n))
            .finish()
    }
}

impl ApiTokens {
    /// Parses `name:sha256-hex` lines; `#` comments and blank lines are ignored.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TokenFileError> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let syntax = |reason| TokenFileError::Syntax {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let (name, hex) = line
                .split_once(':')
                .ok_or_else(|| syntax("expected name:sha256-hex"))?;
            validate_token_name(name).map_err(syntax)?;
            let digest = parse_hex32(hex).ok_or_else(|| syntax("not 64 hex digits"))?;
            if entries.iter().any(|(n, _)| n == name) {
                return Err(syntax("a token name appears twice"));
            }
            entries.push((name.to_owned(), digest));
        }
        Ok(Self { entries })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// SHA-256 of a token, as stored.
    pub fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// Adds the token `name` or replaces its digest; true when the name was new.
    pub fn set(&mut self, name: &str, digest: [u8; 32]) -> bool {
        if let Some(entry) = self.entries.iter_mut().find(|(n, _)| n == name) {
            entry.1 = digest;
            false
        } else {
            self.entries.push((name.to_owned(), digest));
            true
        }
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (name, digest) in &self.entries {
            out.push_str(name);
            out.push(':');
            for b in digest {
                out.push_str(&format!("{b:02x}"));
            }
            out.push('\n');
        }
        out
    }

    /// True without tokens.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the entry `token` matches. Every digest is compared, in constant time.
    pub fn verify(&self, token: &str) -> Option<&str> {
        let digest = Self::digest(token);
        let mut found = None;
        for (name, stored) in &self.entries {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Where a request's token came from.
#[derive(Debug, PartialEq, Eq)]
enum Presented<'a> {
    /// `Authorization: Bearer TOKEN`.
    Header(&'a str),
    /// `Sec-WebSocket-Protocol: ..., bearer.TOKEN, ...`: (the whole subprotocol, the token).
    Subprotocol(&'a str, &'a str),
}

fn presented(headers: &HeaderMap) -> Option<Presented<'_>> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| Presented::Header(token.trim()));
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| {
            p.strip_prefix(BEARER_SUBPROTOCOL_PREFIX)
                .map(|token| Presented::Subprotocol(p, token))
        })
}

/// Middleware of the protected routes: 401 unless tokens are off or a valid one is presented.
/// A WebSocket upgrade authorised by subprotocol gets that subprotocol selected in its 101.
pub(crate) async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = state.config.tokens.as_deref() else {
        return next.run(request).await;
    };
    let presented = presented(request.headers());
    let (token, subprotocol) = match presented {
        Some(Presented::Header(t)) => (t, None),
        Some(Presented::Subprotocol(p, t)) => (t, Some(p.to_owned())),
        None => return unauthorized("a bearer token is required"),
    };
    let Some(name) = tokens.verify(token) else {
        return unauthorized("the bearer token is not valid");
    };
    let mut request = request;
    if request.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
        match state
            .ws_per_token
            .acquire(name, state.config.max_websockets_per_token)
        {
            Some(permit) => {
                request.extensions_mut().insert(permit);
            }
            None => {
                state
                    .metrics()
                    .ws_refused_per_token
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return too_many_websockets(state.config.max_websockets_per_token);
            }
        }
    }
    let mut response = next.run(request).await;
    if let Some(protocol) = subprotocol
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
        && !response
            .headers()
            .contains_key(header::SEC_WEBSOCKET_PROTOCOL)
        && let Ok(value) = HeaderValue::from_str(&protocol)
    {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    response
}

/// Open WebSockets per token name.
#[derive(Debug, Default, Clone)]
pub(crate) struct WsPerToken {
    open: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
}

/// One open WebSocket of a token; released when the socket's task drops it. Handlers move it
/// into their `on_upgrade` future (see `ws.rs`).
#[derive(Debug, Clone)]
pub(crate) struct WsPermit(#[allow(dead_code)] std::sync::Arc<PermitSlot>);

#[derive(Debug)]
pub(crate) struct PermitSlot {
    counts: WsPerToken,
    name: String,
}

impl Drop for PermitSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock();
        if let Some(n) = open.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.name);
            }
        }
    }
}

impl WsPerToken {
    fn acquire(&self, name: &str, max: usize) -> Option<WsPermit> {
        let mut open = self.open.lock();
        let n = open.entry(name.to_owned()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(WsPermit(std::sync::Arc::new(PermitSlot {
            counts: self.clone(),
            name: name.to_owned(),
        })))
    }
}

fn too_many_websockets(max: usize) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "too_many_websockets".into(),
            message: format!("this token already has {max} open WebSockets"),
        },
    };
    (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response()
}

fn unauthorized(message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: "unauthorized".into(),
            message: message.into(),
        },
    };
    let mut response = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"sensorflow\""),
    );
    response
}

/// CORS for the origins in `ApiConfig::cors_origins` (`*`: any). Preflight requests from an
/// allowed origin are answered here (204); other responses to an allowed origin carry
/// `Access-Control-Allow-Origin`. Requests from other origins pass unchanged (the browser
/// then withholds the response from the page).
pub(crate) async fn cors(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| {
            state
                .config
                .cors_origins
                .iter()
                .any(|allowed| allowed == "*" || allowed == o)
        })
        .and_then(|o| HeaderValue::from_str(o).ok());
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// Documented paths open without a token (the dashboard's assets are not in the document).
pub(crate) const PUBLIC_PATHS: [&str; 4] = ["/", "/docs", "/health", "/ready"];

/// Adds the bearer scheme to the OpenAPI document, and to every operation but those of
/// [`PUBLIC_PATHS`] its security requirement and the 401 answer.
pub(crate) struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Required when auth.api_tokens_file is set (`sensorflow token FILE NAME`). \
                         WebSocket upgrades may send it as the subprotocol `bearer.TOKEN` instead.",
                    ))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            if PUBLIC_PATHS.contains(&path.as_str()) {
                continue;
            }
            for op in [
                item.get.as_mut(),
                item.post.as_mut(),
                item.put.as_mut(),
                item.delete.as_mut(),
                item.patch.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if path.starts_with("/ws/") {
                    op.responses.responses.insert(
                        "429".into(),
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(
                                    "The token has max_websockets_per_token open WebSockets",
                                )
                                .content(
                                    "application/json",
                                    ContentBuilder::new()
                                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                                        .build(),
                                )
                                .build(),
                        ),
                    );
                }
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
                op.responses.responses.insert(
                    "401".into(),
                    RefOr::T(
                        ResponseBuilder::new()
                            .description("No bearer token, or not a valid one (only when tokens are configured)")
                            .content(
                                "application/json",
                                ContentBuilder::new()
                                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                                    .build(),
                            )
                            .build(),
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_round_trips_and_verifies_by_digest() {
        let mut tokens = ApiTokens::default();
        assert!(tokens.set("ci", ApiTokens::digest("secret-1")));
        assert!(tokens.set("ops", ApiTokens::digest("secret-2")));
        assert!(!tokens.set("ci", ApiTokens::digest("secret-3")));
        let text = tokens.to_text();
        assert!(!text.contains("secret"));
        let parsed = ApiTokens::parse(&text, Path::new("t")).unwrap();
        assert_eq!(parsed, tokens);
        assert_eq!(parsed.verify("secret-3"), Some("ci"));
        assert_eq!(parsed.verify("secret-2"), Some("ops"));
        assert_eq!(parsed.verify("secret-1"), None);
        assert_eq!(parsed.verify(""), None);
        assert_eq!(format!("{parsed:?}"), "[\"ci\", \"ops\"]");
    }

    #[test]
    fn tokens_file_refuses_bad_lines() {
        let good = "a".repeat(64);
        for (text, line) in [
            ("nocolon\n".to_owned(), 1),
            ("# c\nx:abc\n".to_owned(), 2),
            (format!("x:{}\n", "g".repeat(64)), 1),
            (format!("x:{good}\nx:{good}\n"), 2),
            (format!("a b:{good}\n"), 1),
        ] {
            match ApiTokens::parse(&text, Path::new("t")) {
                Err(TokenFileError::Syntax { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_token_is_taken_from_the_header_or_a_bearer_subprotocol() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), None);
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("json, bearer.abc"),
        );
        assert_eq!(
            presented(&h),
            Some(Presented::Subprotocol("bearer.abc", "abc"))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        assert_eq!(presented(&h), Some(Presented::Header("xyz")));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic xyz"));
        assert_eq!(presented(&h), None);
    }
}
