//! Who is calling: the control plane's certificates and the identity each
//! one carries.
//!
//! One cluster CA signs every certificate. The role and name sit in the
//! certificate's URI subject alternative name, SPIFFE style
//! (`spiffe://ferry/KIND/NAME`), as Istio and Linkerd name workloads:
//! the control plane reads it from the verified client certificate, so a
//! node can only speak for itself and only an admin can change the
//! config.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The trust domain in every Ferry identity URI.
const PREFIX: &str = "spiffe://ferry/";

/// What a certificate may do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// May call `ConfigAdmin`; the name is recorded as the author.
    Admin(String),
    /// May call `ConfigDiscovery` as this node ID.
    Node(String),
    /// A control-plane replica's server certificate.
    Control(String),
}

/// Why an identity or a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A name outside `[A-Za-z0-9._-]{1,64}`.
    #[error("{0:?} is not a valid name: use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// The certificate carries no `spiffe://ferry/KIND/NAME` URI.
    #[error(
        "the certificate carries no Ferry identity (a spiffe://ferry/admin|node|control/NAME URI)"
    )]
    Missing,
    /// The certificate or key cannot be parsed or signed.
    #[error("certificate: {0}")]
    Certificate(String),
}

impl Identity {
    /// The identity's URI, `spiffe://ferry/KIND/NAME`.
    pub fn uri(&self) -> String {
        let (kind, name) = self.parts();
        format!("{PREFIX}{kind}/{name}")
    }

    /// Reads an identity URI.
    ///
    /// # Errors
    /// [`IdentityError::Missing`] for a URI that is not Ferry's,
    /// [`IdentityError::BadName`] for a bad name.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri.strip_prefix(PREFIX).ok_or(IdentityError::Missing)?;
        let (kind, name) = rest.split_once('/').ok_or(IdentityError::Missing)?;
        let name = valid_name(name)?.to_string();
        match kind {
            "admin" => Ok(Identity::Admin(name)),
            "node" => Ok(Identity::Node(name)),
            "control" => Ok(Identity::Control(name)),
            _ => Err(IdentityError::Missing),
        }
    }

    /// The Ferry identity in a DER certificate (the first Ferry URI SAN).
    ///
    /// # Errors
    /// [`IdentityError::Certificate`] when it does not parse,
    /// [`IdentityError::Missing`] when it has no Ferry URI.
    pub fn of_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?
            .ok_or(IdentityError::Missing)?;
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Identity::from_uri(uri).ok(),
                _ => None,
            })
            .next()
            .ok_or(IdentityError::Missing)
    }

    fn parts(&self) -> (&'static str, &str) {
        match self {
            Identity::Admin(n) => ("admin", n),
            Identity::Node(n) => ("node", n),
            Identity::Control(n) => ("control", n),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, name) = self.parts();
        write!(f, "{kind} {name}")
    }
}

/// Checks a node ID or admin name: 1 to 64 of `[A-Za-z0-9._-]`.
///
/// # Errors
/// [`IdentityError::BadName`].
pub fn valid_name(name: &str) -> Result<&str, IdentityError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match ok {
        true => Ok(name),
        false => Err(IdentityError::BadName(name.to_string())),
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// The cluster CA: signs every control-plane, node and admin certificate.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// A new CA named `name` (its subject's common name).
    ///
    /// # Errors
    /// [`IdentityError::Certificate`] when signing fails.
    pub fn generate(name: &str) -> Result<(Self, Issued), IdentityError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.self_signed(&key).map_err(cert_error)?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok((
            Self {
                issuer: Issuer::new(params, key),
                cert_pem: issued.cert_pem.clone(),
            },
            issued,
        ))
    }

    /// The CA from its certificate and key (PEM), to sign more.
    ///
    /// # Errors
    /// [`IdentityError::Certificate`] when either does not parse.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_error)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_error)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate, PEM: what every party trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `identity`. A control-plane certificate is a
    /// server certificate for `hosts` (DNS names or IP addresses nodes and
    /// admins dial); node and admin certificates are client certificates
    /// only, whatever hosts they name.
    ///
    /// # Errors
    /// [`IdentityError::Certificate`] for a bad host name or when signing
    /// fails.
    pub fn issue(&self, identity: &Identity, hosts: &[String]) -> Result<Issued, IdentityError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
        let (_, name) = identity.parts();
        params.distinguished_name.push(DnType::CommonName, name);
        let mut sans = vec![SanType::URI(identity.uri().try_into().map_err(cert_error)?)];
        for host in hosts {
            sans.push(match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.clone().try_into().map_err(cert_error)?),
            });
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // Only a control certificate may serve: a node's or an admin's
        // key, stolen or not, cannot pass for the control plane (a TLS
        // client checks the server's extended key usage, RFC 5280
        // 4.2.1.12).
        params.extended_key_usages = match identity {
            Identity::Control(_) => vec![ExtendedKeyUsagePurpose::ServerAuth],
            _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn cert_error(e: impl fmt::Display) -> IdentityError {
    IdentityError::Certificate(e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_issued_certificate_carries_its_identity() {
        let (ca, _) = CertificateAuthority::generate("Test CA").unwrap();
        for identity in [
            Identity::Admin("alice".into()),
            Identity::Node("worker-1".into()),
            Identity::Control("cp-a".into()),
        ] {
            let issued = ca.issue(&identity, &["127.0.0.1".into()]).unwrap();
            let der = rustls_pki_der(&issued.cert_pem);
            assert_eq!(Identity::of_certificate(&der).unwrap(), identity);
        }
        // Reloaded from PEM, the CA signs the same way.
        let (_, pem) = CertificateAuthority::generate("Test CA").unwrap();
        let again = CertificateAuthority::load(&pem.cert_pem, &pem.key_pem).unwrap();
        let issued = again.issue(&Identity::Node("n".into()), &[]).unwrap();
        assert_eq!(
            Identity::of_certificate(&rustls_pki_der(&issued.cert_pem)).unwrap(),
            Identity::Node("n".into())
        );
    }

    /// Only a control certificate may serve TLS: a stolen node or admin
    /// key cannot pass for the control plane.
    #[test]
    fn only_a_control_certificate_is_a_server_certificate() {
        let (ca, _) = CertificateAuthority::generate("Test CA").unwrap();
        let usage = |identity: Identity| {
            let issued = ca.issue(&identity, &["127.0.0.1".into()]).unwrap();
            let der = rustls_pki_der(&issued.cert_pem);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap().value.clone();
            (eku.server_auth, eku.client_auth)
        };
        assert_eq!(usage(Identity::Control("cp".into())), (true, false));
        assert_eq!(usage(Identity::Node("n".into())), (false, true));
        assert_eq!(usage(Identity::Admin("a".into())), (false, true));
    }

    #[test]
    fn names_and_uris_are_checked() {
        assert!(Identity::from_uri("spiffe://ferry/node/../x").is_err());
        assert!(Identity::from_uri("spiffe://other/node/x").is_err());
        assert!(Identity::from_uri("spiffe://ferry/root/x").is_err());
        assert!(valid_name(&"a".repeat(65)).is_err());
        assert!(valid_name("").is_err());
        assert_eq!(
            Identity::from_uri("spiffe://ferry/admin/ops.team-1").unwrap(),
            Identity::Admin("ops.team-1".into())
        );
    }

    fn rustls_pki_der(pem: &str) -> Vec<u8> {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        parsed.contents
    }
}
