//! The demo's certificates: a throwaway CA and a server certificate it
//! signs, with the names clients use for the demo's nodes, so that a client
//! can verify the server (`openssl s_client -verify_hostname localhost
//! -CAfile ferry-data/certs/ca.crt`) rather than turn verification off.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA clients trust, relative to the data directory.
pub const CA_FILE: &str = "certs/ca.crt";
/// The server certificate and key the example config names.
const CERT_FILE: &str = "certs/ferry.crt";
const KEY_FILE: &str = "certs/ferry.key";

/// Makes the demo CA and a server certificate for `names` (host names and
/// IP addresses) under `data/certs`, unless a set made earlier is there
/// and covers the same names. The CA's key is not kept: nothing else is
/// ever signed with it. Key files are 0600.
///
/// # Errors
/// Making the certificates or writing a file failed.
pub fn ensure(data: &Path, names: &[String]) -> anyhow::Result<()> {
    let (ca, crt, key) = (
        data.join(CA_FILE),
        data.join(CERT_FILE),
        data.join(KEY_FILE),
    );
    let names_file = data.join("certs/names");
    let wanted = names.join("\n");
    let current = std::fs::read_to_string(&names_file).unwrap_or_default();
    if ca.exists() && crt.exists() && key.exists() && current == wanted {
        // A key written by an older version may be readable by all.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", key.display()))?;
        return Ok(());
    }
    if let Some(dir) = ca.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Ferry demo CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().context("making the demo CA key")?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("making the demo CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(names.to_vec()).context("certificate names")?;
    let common_name = names.first().map_or("localhost", String::as_str);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate().context("making the server key")?;
    let server = params
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;

    write_private(&key, server_key.serialize_pem().as_bytes())?;
    std::fs::write(&crt, server.pem()).with_context(|| format!("writing {}", crt.display()))?;
    std::fs::write(&ca, ca_cert.pem()).with_context(|| format!("writing {}", ca.display()))?;
    std::fs::write(&names_file, wanted)
        .with_context(|| format!("writing {}", names_file.display()))?;
    Ok(())
}

/// Writes `bytes` to a fresh file readable by its owner only (0600 from
/// the start, so the key is never readable by others, even briefly).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    fn verify(data: &Path, name: &str) -> Result<(), rustls::Error> {
        let ca = CertificateDer::from_pem_file(data.join(CA_FILE)).unwrap();
        let leaf = CertificateDer::from_pem_file(data.join(CERT_FILE)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn the_server_certificate_chains_to_the_demo_ca_with_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = [
            "localhost",
            "127.0.0.1",
            "worker-1.ferry.test",
            "127.0.0.11",
        ]
        .map(String::from)
        .to_vec();
        ensure(dir.path(), &names).unwrap();
        for name in &names {
            verify(dir.path(), name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // Names it was not made for do not pass.
        assert!(verify(dir.path(), "other.ferry.test").is_err());
        assert!(verify(dir.path(), "127.0.0.12").is_err());

        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        // No CA key is left behind.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("certs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(files.iter().all(|f| !f.starts_with("ca.key")), "{files:?}");

        // Run again: kept as is, and an old world-readable key is fixed.
        let before = std::fs::read(dir.path().join(CERT_FILE)).unwrap();
        std::fs::set_permissions(
            dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        ensure(dir.path(), &names).unwrap();
        assert_eq!(std::fs::read(dir.path().join(CERT_FILE)).unwrap(), before);
        assert_eq!(mode(KEY_FILE), 0o600);
        // Other names: a new certificate.
        ensure(dir.path(), &names[..2]).unwrap();
        assert_ne!(std::fs::read(dir.path().join(CERT_FILE)).unwrap(), before);
    }
}
