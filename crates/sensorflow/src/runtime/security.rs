//! `[auth]` → the MQTT listener's [`AuthPolicy`] and the API's tokens, and the DESIGN rule on
//! anonymous access: anonymous clients are accepted when `auth.allow_anonymous` is set, or when
//! no password file and no client CA are configured and every MQTT listener (plain and TLS) is
//! on a loopback address; on any other address without a way to authenticate, the platform
//! refuses to start.

use std::net::SocketAddr;
#[cfg(test)]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sensorflow_api::ApiTokens;
use sensorflow_ingest::{Acl, AuthPolicy, PasswordFile};

use crate::config::AuthConfig;

/// The MQTT listener's policy, or why the platform must not start.
pub(crate) fn mqtt_policy(
    auth: &AuthConfig,
    listeners: &[SocketAddr],
    client_ca: bool,
) -> anyhow::Result<AuthPolicy> {
    let users = match &auth.password_file {
        Some(path) => Some(Arc::new(
            PasswordFile::load(path).context("loading auth.password_file")?,
        )),
        None => None,
    };
    let acl = match &auth.acl_file {
        Some(path) => Acl::load(path).context("loading auth.acl_file")?,
        None => Acl::default(),
    };
    let can_authenticate = users.is_some() || client_ca;
    let public = listeners.iter().find(|a| !a.ip().is_loopback());
    let loopback_dev = !can_authenticate && public.is_none();
    if let Some(listen) = public
        && !can_authenticate
        && !auth.allow_anonymous
    {
        bail!(
            "refusing to start: the MQTT listener {listen} is not a loopback address and no \
             device can authenticate. Add a user with `sensorflow passwd /etc/sensorflow/passwd \
             USER` (password on stdin) and set auth.password_file \
             (SENSORFLOW_AUTH_PASSWORD_FILE), or accept anonymous devices with \
             auth.allow_anonymous = true (SENSORFLOW_AUTH_ALLOW_ANONYMOUS=true)"
        );
    }
    let allow_anonymous = auth.allow_anonymous || loopback_dev;
    match (&users, allow_anonymous) {
        (Some(users), true) => tracing::warn!(
            users = users.len(),
            "mqtt: password users configured and anonymous clients allowed (auth.allow_anonymous)"
        ),
        (Some(users), false) => tracing::info!(
            users = users.len(),
            "mqtt: password authentication required"
        ),
        (None, _) if client_ca && !allow_anonymous => {
            tracing::info!("mqtt: client certificate authentication required")
        }
        (None, _) if auth.allow_anonymous => {
            tracing::warn!("mqtt: anonymous clients allowed (auth.allow_anonymous = true)")
        }
        (None, _) => tracing::info!(
            "mqtt: anonymous clients allowed on the loopback listener (no auth.password_file)"
        ),
    }
    Ok(AuthPolicy {
        users,
        acl: Arc::new(acl),
        allow_anonymous,
        max_failed_connects: auth.max_failed_connects,
        failure_window: Duration::from_secs(auth.failed_connect_window_secs),
        cache_ttl: Duration::from_secs(auth.verify_cache_secs),
        client_certs: client_ca,
        ..AuthPolicy::default()
    })
}

/// The API tokens of `auth.api_tokens_file`, if set. An empty file is an error: it would lock
/// every client out, which is never what was meant.
pub(crate) fn api_tokens(auth: &AuthConfig) -> anyhow::Result<Option<Arc<ApiTokens>>> {
    let Some(path) = &auth.api_tokens_file else {
        return Ok(None);
    };
    let tokens = ApiTokens::load(path).context("loading auth.api_tokens_file")?;
    if tokens.is_empty() {
        bail!(
            "auth.api_tokens_file {} holds no token: create one with `sensorflow token {} NAME`",
            path.display(),
            path.display()
        );
    }
    tracing::info!("http: bearer tokens required (auth.api_tokens_file)");
    Ok(Some(Arc::new(tokens)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn auth(allow_anonymous: bool, password_file: Option<PathBuf>) -> AuthConfig {
        AuthConfig {
            password_file,
            acl_file: None,
            allow_anonymous,
            max_failed_connects: 20,
            failed_connect_window_secs: 60,
            verify_cache_secs: 300,
            api_tokens_file: None,
            cors_origins: Vec::new(),
            max_websockets_per_token: 100,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn anonymous_only_on_loopback_without_users_or_client_ca_unless_allowed() {
        let local = [addr("127.0.0.1:1883"), addr("[::1]:8883")];
        let policy = mqtt_policy(&auth(false, None), &local, false).unwrap();
        assert!(policy.allow_anonymous);
        // A client CA is a way to authenticate: no anonymous access even on loopback.
        let policy = mqtt_policy(&auth(false, None), &local, true).unwrap();
        assert!(!policy.allow_anonymous && policy.client_certs);
        let policy = mqtt_policy(&auth(true, None), &[addr("0.0.0.0:1883")], false).unwrap();
        assert!(policy.allow_anonymous);
    }

    #[test]
    fn a_public_listener_without_a_way_to_authenticate_refuses_to_start() {
        for listeners in [
            vec![addr("0.0.0.0:1883")],
            // The plain listener on loopback does not make a public TLS listener safe.
            vec![addr("127.0.0.1:1883"), addr("0.0.0.0:8883")],
        ] {
            let err = format!(
                "{:#}",
                mqtt_policy(&auth(false, None), &listeners, false).unwrap_err()
            );
            assert!(
                err.contains("sensorflow passwd") && err.contains("allow_anonymous"),
                "{err}"
            );
        }
        assert!(mqtt_policy(&auth(false, None), &[addr("0.0.0.0:1883")], true).is_ok());
    }

    #[test]
    fn users_turn_anonymous_access_off_on_loopback_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let phc = sensorflow_ingest::auth::hash_password(b"pw", b"0123456789abcdef").unwrap();
        std::fs::write(&path, format!("imu-1:{phc}\n")).unwrap();
        let policy =
            mqtt_policy(&auth(false, Some(path)), &[addr("127.0.0.1:1883")], false).unwrap();
        assert!(!policy.allow_anonymous);
        assert_eq!(policy.users.unwrap().len(), 1);
    }
}
