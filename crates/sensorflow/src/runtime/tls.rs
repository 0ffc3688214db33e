//! `[tls]` → rustls server configurations for the MQTT TLS listener and HTTPS, sharing one
//! certificate resolver that SIGHUP reloads: new handshakes use the new certificate and key,
//! open connections keep theirs (nothing is dropped). A reload that fails (unreadable file, key
//! not matching) keeps the current pair and logs why. The client CA (`tls.client_ca_file`) is
//! read at start only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::TlsSettings;

/// The loaded TLS material and the configurations built from it.
pub(crate) struct Tls {
    resolver: Arc<ReloadingCert>,
    /// MQTT: client certificates requested (not required) when a client CA is configured.
    pub(crate) mqtt: Arc<rustls::ServerConfig>,
    /// HTTPS: no client certificates.
    pub(crate) https: Arc<rustls::ServerConfig>,
}

/// Serves the current certificate and key to every handshake.
#[derive(Debug)]
struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

fn load_key_pair(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let certs = load_certs(cert_file).context("tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "tls.key_file: reading a PEM private key from {}",
            key_file.display()
        )
    })?;
    CertifiedKey::from_der(certs, key, provider).with_context(|| {
        format!(
            "tls: the key {} does not fit the certificate",
            key_file.display()
        )
    })
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading PEM certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificate in {}", path.display());
    }
    Ok(certs)
}

impl Tls {
    /// `None` unless both `tls.cert_file` and `tls.key_file` are set (one without the other is
    /// an error, and so is a client CA without them).
    pub(crate) fn load(settings: &TlsSettings) -> anyhow::Result<Option<Tls>> {
        let (cert_file, key_file) = match (&settings.cert_file, &settings.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (None, None) => {
                if settings.client_ca_file.is_some() {
                    bail!("tls.client_ca_file needs tls.cert_file and tls.key_file");
                }
                return Ok(None);
            }
            _ => bail!("tls.cert_file and tls.key_file must be set together"),
        };
        // ring, as the rest of the workspace (object_store) uses: aws-lc-rs would add a C build.
        // rustls 0.23.48 deprecated it only for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = load_key_pair(&cert_file, &key_file, &provider)?;
        let resolver = Arc::new(ReloadingCert {
            cert_file,
            key_file,
            provider: Arc::clone(&provider),
            current: RwLock::new(Arc::new(current)),
        });
        let builder = || {
            rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .context("tls: protocol versions")
        };
        let mut https = builder()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        https.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mqtt = match &settings.client_ca_file {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in load_certs(ca).context("tls.client_ca_file")? {
                    roots
                        .add(cert)
                        .with_context(|| format!("tls.client_ca_file {}", ca.display()))?;
                }
                // Not required at the TLS layer: a client without a certificate may still log
                // in with a password; without either it is refused at CONNECT.
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .allow_unauthenticated()
                .build()
                .context("tls.client_ca_file")?;
                builder()?
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(resolver.clone())
            }
            None => builder()?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone()),
        };
        Ok(Some(Tls {
            resolver,
            mqtt: Arc::new(mqtt),
            https: Arc::new(https),
        }))
    }

    /// Re-reads the certificate and key files; on error the current pair stays.
    pub(crate) fn reload(&self) -> anyhow::Result<()> {
        let r = &self.resolver;
        let pair = load_key_pair(&r.cert_file, &r.key_file, &r.provider)?;
        *r.current.write() = Arc::new(pair);
        Ok(())
    }

    /// Reloads on every SIGHUP until the process ends.
    pub(crate) fn reload_on_sighup(self: &Arc<Self>) {
        #[cfg(unix)]
        {
            let tls = Arc::clone(self);
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; tls certificates will not reload");
                    return;
                }
            };
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match tls.reload() {
                        Ok(()) => tracing::info!("tls certificate and key reloaded"),
                        Err(e) => tracing::warn!(
                            "tls reload failed, the current certificate stays: {e:#}"
                        ),
                    }
                }
            });
        }
    }
}
