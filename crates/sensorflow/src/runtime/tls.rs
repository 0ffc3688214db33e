//! `[tls]` → rustls server configurations for the MQTT TLS listener and HTTPS, sharing one
//! certificate resolver that SIGHUP reloads: new handshakes use the new certificate and key,
//! open connections keep theirs (nothing is dropped). A reload that fails (unreadable file, key
//! not matching) keeps the current pair and logs why. The client CA (`tls.client_ca_file`) is
//! re-read on SIGHUP too, by a verifier that delegates to the current WebPKI verifier.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::TlsSettings;

/// The loaded TLS material and the configurations built from it.
pub(crate) struct Tls {
    resolver: Arc<ReloadingCert>,
    client_ca: Option<Arc<ReloadingClientCa>>,
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

/// Verifies client certificates against the current client CA file. Certificates are requested,
/// not required: a client without one may still log in with a password. No CA names are sent
/// as hints (they could change on reload); clients send the certificate they have.
#[derive(Debug)]
struct ReloadingClientCa {
    ca_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl ReloadingClientCa {
    fn load(
        ca_file: &Path,
        provider: &Arc<CryptoProvider>,
    ) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
        let mut roots = RootCertStore::empty();
        for cert in load_certs(ca_file).context("tls.client_ca_file")? {
            roots
                .add(cert)
                .with_context(|| format!("tls.client_ca_file {}", ca_file.display()))?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .allow_unauthenticated()
            .build()
            .context("tls.client_ca_file")
    }

    fn get(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.current.read())
    }
}

impl ClientCertVerifier for ReloadingClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.get().supported_verify_schemes()
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
        let client_ca = match &settings.client_ca_file {
            Some(ca) => Some(Arc::new(ReloadingClientCa {
                ca_file: ca.clone(),
                provider: Arc::clone(&provider),
                current: RwLock::new(ReloadingClientCa::load(ca, &provider)?),
            })),
            None => None,
        };
        let mqtt = match &client_ca {
            // Not required at the TLS layer: a client without a certificate may still log in
            // with a password; without either it is refused at CONNECT.
            Some(verifier) => builder()?
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(resolver.clone()),
            None => builder()?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone()),
        };
        Ok(Some(Tls {
            resolver,
            client_ca,
            mqtt: Arc::new(mqtt),
            https: Arc::new(https),
        }))
    }

    /// Re-reads the certificate, key and client CA files; on any error nothing changes.
    pub(crate) fn reload(&self) -> anyhow::Result<()> {
        let r = &self.resolver;
        let pair = load_key_pair(&r.cert_file, &r.key_file, &r.provider)?;
        let client_ca = match &self.client_ca {
            Some(ca) => Some(ReloadingClientCa::load(&ca.ca_file, &ca.provider)?),
            None => None,
        };
        *r.current.write() = Arc::new(pair);
        if let (Some(ca), Some(verifier)) = (&self.client_ca, client_ca) {
            *ca.current.write() = verifier;
        }
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
