//! TLS settings for sessions: when to start TLS, and which certificates
//! to trust.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::Error;

/// When a session uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never.
    #[default]
    Off,
    /// STARTTLS when the server offers it (RFC 3207), plain otherwise.
    Opportunistic,
    /// STARTTLS, or no transaction.
    Required,
    /// TLS from the first byte (submissions on port 465, RFC 8314).
    Implicit,
}

/// Which server certificates are accepted.
#[derive(Debug, Clone)]
pub enum Verify {
    /// Those that chain to the web PKI's roots (Mozilla's, built in).
    WebPki,
    /// Those that chain to one of these roots (a private CA's file).
    Roots(Arc<rustls::RootCertStore>),
    /// Any: still encrypted, not authenticated (signatures are checked, so
    /// the handshake is real).
    Off,
}

impl Verify {
    /// Trust only the CA certificates in the PEM file at `path`.
    ///
    /// # Errors
    /// [`Error::Local`] when the file cannot be read or holds no
    /// certificate.
    pub fn ca_file(path: &Path) -> Result<Self, Error> {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Local(format!("cannot read {}: {e}", path.display())))?;
        Self::ca_pem(&pem).map_err(|e| Error::Local(format!("{}: {e}", path.display())))
    }

    /// Trust only the CA certificates in `pem`.
    ///
    /// # Errors
    /// [`Error::Local`] when `pem` holds no usable certificate.
    pub fn ca_pem(pem: &[u8]) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Local(format!("bad PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Local(format!("bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Local("no certificate in the CA file".into()));
        }
        Ok(Verify::Roots(Arc::new(roots)))
    }

    /// The rustls client config for these settings. The web PKI and
    /// no-verification configs are built once per process and shared.
    ///
    /// # Errors
    /// [`Error::Local`] if rustls refuses the protocol versions (it does
    /// not with its defaults).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        static WEBPKI: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        static ANY: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        let cached = match self {
            Verify::WebPki => &WEBPKI,
            Verify::Off => &ANY,
            Verify::Roots(roots) => return build(Some(roots.as_ref().clone())),
        };
        if let Some(config) = cached.get() {
            return Ok(Arc::clone(config));
        }
        let config = match self {
            Verify::WebPki => build(Some(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }))?,
            _ => build(None)?,
        };
        Ok(Arc::clone(cached.get_or_init(|| config)))
    }
}

fn build(roots: Option<rustls::RootCertStore>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Local(format!("TLS setup: {e}")))?;
    let config = match roots {
        Some(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// TLS for a session: when, and whom to trust.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub mode: TlsMode,
    pub verify: Verify,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            mode: TlsMode::Off,
            verify: Verify::WebPki,
        }
    }
}

/// The name a certificate must carry: the host name the client was given
/// (an IP literal works too).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| e.to_string())
}

/// Accepts any server certificate (signatures are still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
