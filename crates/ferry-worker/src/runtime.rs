//! A config snapshot made ready to serve: the validated config plus one
//! TLS acceptor per connector that offers STARTTLS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_config::{ClusterConfig, TlsSettings, TlsVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why a config could not be put into service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("connector '{connector}': cannot read {path}: {source}")]
    Read {
        connector: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connector '{connector}': {path} holds no usable {what}")]
    Pem {
        connector: String,
        path: PathBuf,
        what: &'static str,
    },
    #[error("connector '{connector}': TLS setup failed: {source}")]
    Tls {
        connector: String,
        source: rustls::Error,
    },
}

/// What sessions need from the config, built once per config version.
pub struct Runtime {
    pub config: Arc<ClusterConfig>,
    tls: HashMap<String, TlsAcceptor>,
}

impl Runtime {
    pub fn new(config: ClusterConfig) -> Result<Self, RuntimeError> {
        let mut tls = HashMap::new();
        for c in &config.connectors {
            if let Some(settings) = &c.tls {
                tls.insert(c.name.clone(), acceptor(&c.name, settings)?);
            }
        }
        Ok(Self {
            config: Arc::new(config),
            tls,
        })
    }

    /// The TLS acceptor of a connector that offers STARTTLS.
    pub fn tls_acceptor(&self, connector: &str) -> Option<&TlsAcceptor> {
        self.tls.get(connector)
    }
}

fn read(connector: &str, path: &Path) -> Result<Vec<u8>, RuntimeError> {
    std::fs::read(path).map_err(|source| RuntimeError::Read {
        connector: connector.into(),
        path: path.to_path_buf(),
        source,
    })
}

fn acceptor(connector: &str, s: &TlsSettings) -> Result<TlsAcceptor, RuntimeError> {
    let pem_error = |path: &Path, what| RuntimeError::Pem {
        connector: connector.into(),
        path: path.to_path_buf(),
        what,
    };
    let cert_pem = read(connector, &s.certificate)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| pem_error(&s.certificate, "certificate"))?;
    if certs.is_empty() {
        return Err(pem_error(&s.certificate, "certificate"));
    }
    let key_pem = read(connector, &s.key)?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| pem_error(&s.key, "private key"))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_err = |source| RuntimeError::Tls {
        connector: connector.into(),
        source,
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(tls_err)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
