//! mTLS on every control-plane channel: the server asks every client for
//! a certificate from the cluster CA (the handshake fails without one),
//! and clients trust only that CA.

use std::time::Duration;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity, ServerTlsConfig,
};

/// How long a client waits for a TCP connection and TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PEM material of one party: the cluster CA's certificate, and this
/// party's certificate and key.
#[derive(Clone)]
pub struct Pem {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem").finish_non_exhaustive()
    }
}

impl Pem {
    /// Reads the three files.
    ///
    /// # Errors
    /// The file that cannot be read, with the reason.
    pub fn read(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self, String> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        Ok(Self {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
        })
    }
}

/// The server side: our certificate, and client certificates required,
/// signed by the cluster CA.
pub fn server_config(pem: &Pem) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(&pem.cert, &pem.key))
        .client_ca_root(Certificate::from_pem(&pem.ca))
        .client_auth_optional(false)
        .timeout(CONNECT_TIMEOUT)
}

/// The endpoint for `url` (`https://HOST:PORT`, or `HOST:PORT`) with our
/// client certificate, trusting only the cluster CA.
///
/// # Errors
/// A URL that does not parse, or TLS settings refused.
pub fn endpoint(url: &str, pem: &Pem) -> Result<Endpoint, tonic::transport::Error> {
    let url = match url.contains("://") {
        true => url.to_string(),
        false => format!("https://{url}"),
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pem.ca))
        .identity(TlsIdentity::from_pem(&pem.cert, &pem.key));
    Ok(Endpoint::from_shared(url)?
        .tls_config(tls)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Connects to `url` (see [`endpoint`]).
///
/// # Errors
/// As [`endpoint`], and when the connection or handshake fails.
pub async fn connect(url: &str, pem: &Pem) -> Result<Channel, tonic::transport::Error> {
    endpoint(url, pem)?.connect().await
}
