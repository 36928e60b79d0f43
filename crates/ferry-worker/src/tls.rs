//! The worker's material built from a config: one TLS acceptor per
//! connector that has TLS settings. Building it reads certificate and key
//! files, so it runs off the async threads, before a snapshot is put in
//! service; a file that is missing or unusable fails the whole snapshot.
//! The routes' `ca_file`s are checked here too, for the same reason
//! (delivery reads them again at each attempt).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_config::{ClusterConfig, RouteAction, TlsSettings, TlsVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why a connector's TLS acceptor could not be built. Each names the
/// connector and, where one is to blame, the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("connector '{connector}': cannot read {}: {source}", path.display())]
    Read {
        connector: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connector '{connector}': {} holds no usable {what}", path.display())]
    Pem {
        connector: String,
        path: PathBuf,
        what: &'static str,
    },
    /// The key's public half is not the certificate's (the usual slip: a
    /// renewed certificate with the old key, or the files of two hosts).
    #[error(
        "connector '{connector}': the key in {} does not match the certificate in {}",
        key.display(),
        certificate.display()
    )]
    KeyMismatch {
        connector: String,
        certificate: PathBuf,
        key: PathBuf,
    },
    /// A route's `ca_file` cannot be read or holds no CA certificate.
    #[error("route for {route}: ca_file {reason}")]
    RouteCaFile { route: String, reason: String },
    /// rustls refuses the certificate and key for another reason.
    #[error(
        "connector '{connector}': TLS setup with the certificate in {} and the key in {} failed: {source}",
        certificate.display(),
        key.display()
    )]
    Tls {
        connector: String,
        certificate: PathBuf,
        key: PathBuf,
        /// Boxed: `rustls::Error` would make every `TlsError` large.
        source: Box<rustls::Error>,
    },
}

/// The TLS acceptors of one config, by connector name.
#[derive(Default)]
pub struct TlsAcceptors {
    by_connector: HashMap<String, TlsAcceptor>,
}

impl std::fmt::Debug for TlsAcceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.by_connector.keys().collect();
        names.sort();
        f.debug_struct("TlsAcceptors")
            .field("connectors", &names)
            .finish()
    }
}

impl TlsAcceptors {
    /// Builds an acceptor for every connector with TLS settings (blocking:
    /// reads the certificate and key files).
    ///
    /// # Errors
    /// Every problem of every connector, not only the first: an operator
    /// fixes them all in one go.
    pub fn build(config: &ClusterConfig) -> Result<Self, Vec<TlsError>> {
        let mut by_connector = HashMap::new();
        let mut errors = Vec::new();
        for c in &config.connectors {
            if let Some(settings) = &c.tls {
                match acceptor(&c.name, settings) {
                    Ok(a) => {
                        by_connector.insert(c.name.clone(), a);
                    }
                    Err(mut e) => errors.append(&mut e),
                }
            }
        }
        for route in &config.routes {
            let (RouteAction::Smtp {
                ca_file: Some(path),
                ..
            }
            | RouteAction::Mx {
                ca_file: Some(path),
                ..
            }) = &route.action
            else {
                continue;
            };
            if let Err(e) = ferry_client::Verify::ca_file(path) {
                let names: Vec<String> = route.domains.iter().map(ToString::to_string).collect();
                errors.push(TlsError::RouteCaFile {
                    route: names.join(", "),
                    reason: e.to_string(),
                });
            }
        }
        match errors.is_empty() {
            true => Ok(Self { by_connector }),
            false => Err(errors),
        }
    }

    /// The TLS acceptor of a connector that has TLS settings.
    pub fn acceptor(&self, connector: &str) -> Option<&TlsAcceptor> {
        self.by_connector.get(connector)
    }
}

fn read(connector: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        connector: connector.into(),
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(connector: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(connector, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            connector: connector.into(),
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn private_key(connector: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(connector, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Pem {
        connector: connector.into(),
        path: path.to_path_buf(),
        what: "private key",
    })
}

/// One connector's acceptor; both files are read even when the first
/// fails, so both problems are reported.
fn acceptor(connector: &str, s: &TlsSettings) -> Result<TlsAcceptor, Vec<TlsError>> {
    let (certs, key) = match (
        certificates(connector, &s.certificate),
        private_key(connector, &s.key),
    ) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_err = |source| {
        let (connector, certificate, key) =
            (connector.into(), s.certificate.clone(), s.key.clone());
        vec![match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    connector,
                    certificate,
                    key,
                }
            }
            source => TlsError::Tls {
                connector,
                certificate,
                key,
                source: Box::new(source),
            },
        }]
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(tls_err)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn every_connector_and_every_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.crt"), "").unwrap();
        let text = r#"
accepted_domains = [{ domain = "example.test", kind = "authoritative" }]

[[connectors]]
name = "One"
port = 2525
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
auth = ["tls"]
tls = { certificate = "missing.crt", key = "missing.key" }

[[connectors]]
name = "Two"
port = 2587
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
auth = ["tls"]
tls = { certificate = "empty.crt", key = "other.key" }

[[routes]]
domains = ["smarthost.test", "*.smarthost.test"]
type = "smtp"
next_hops = ["relay.example.test"]
ca_file = "empty.crt"
"#;
        let config = ClusterConfig::parse("t.toml", text, dir.path()).unwrap();
        let errors: Vec<String> = TlsAcceptors::build(&config)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert!(
            errors[4].starts_with("route for smarthost.test, *.smarthost.test: ca_file ")
                && errors[4].ends_with("empty.crt: no certificate in the CA file"),
            "{}",
            errors[4]
        );
        assert!(errors[0].starts_with("connector 'One': cannot read "));
        assert!(errors[0].contains("missing.crt"));
        assert!(errors[1].contains("missing.key"));
        assert!(errors[2].starts_with("connector 'Two': "));
        assert!(errors[2].contains("empty.crt holds no usable certificate"));
        assert!(errors[3].contains("other.key"));
    }

    /// A certificate with another certificate's key: the operator is told
    /// which two files do not go together, in plain words.
    #[test]
    fn a_key_of_another_certificate_names_both_files() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        ferry_tests::make_certificate(first.path());
        ferry_tests::make_certificate(second.path());
        let cert = first.path().join("test.crt");
        let key = second.path().join("test.key");
        let text = format!(
            r#"
[[connectors]]
name = "Tls"
port = 2525
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "{}", key = "{}" }}
"#,
            cert.display(),
            key.display()
        );
        let config = ClusterConfig::parse("t.toml", &text, Path::new(".")).unwrap();
        let errors: Vec<String> = TlsAcceptors::build(&config)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [format!(
                "connector 'Tls': the key in {} does not match the certificate in {}",
                key.display(),
                cert.display()
            )]
        );
        // The matching key is accepted.
        let text = text.replace(
            &*second.path().to_string_lossy(),
            &first.path().to_string_lossy(),
        );
        let config = ClusterConfig::parse("t.toml", &text, Path::new(".")).unwrap();
        assert!(TlsAcceptors::build(&config).is_ok());
    }
}
