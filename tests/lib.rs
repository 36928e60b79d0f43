//! Test support for Ferry's suites: an SMTP client that speaks over real
//! TCP (from a chosen loopback source address) and real TLS, throwaway
//! certificates, and a harness for the `ferry` binary.
//!
//! The end-to-end suite in `tests/` runs the real binary; the worker's
//! in-process tests use the client from here too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod backend;
pub mod binary;
pub mod control;
pub mod control_plane;
pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod sink;

pub use serde_json::json;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_client::io::Stream as Conn;
use ferry_client::ReadError;
use ferry_smtp::client::{ReplyError, ReplyReader};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// How long a test waits for any one reply.
pub const REPLY_WAIT: Duration = Duration::from_secs(15);

/// A deliberately plain SMTP client: it sends what the test says and
/// returns replies as text, so tests assert the exact wire replies. The
/// replies are read by the shared client's reader (`ferry-client`).
pub struct SmtpClient {
    conn: Conn,
    reader: ReplyReader,
}

impl SmtpClient {
    /// Connects to `addr`, from `source` if given (e.g. 127.0.0.30 to be a
    /// different client on loopback), and reads nothing yet.
    pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<Self> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = tokio::time::timeout(REPLY_WAIT, socket.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        Ok(Self {
            conn: Conn::Plain(stream),
            reader: ReplyReader::new(),
        })
    }

    /// Connects and returns the client with its greeting.
    pub async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> (Self, String) {
        let mut c = Self::connect_from(addr, source).await.expect("connect");
        let greeting = c.reply().await;
        (c, greeting)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_all(bytes).await?;
        self.conn.flush().await
    }

    /// Closes the sending side (half-close); replies can still be read.
    pub async fn shutdown_write(&mut self) {
        let _ = self.conn.shutdown().await;
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.conn.read(&mut chunk).await?;
        self.reader.push(&chunk[..n]);
        Ok(n)
    }

    /// Reads one whole reply (all its lines), CRLFs kept between lines and
    /// the last one trimmed. Returns "" if the server closed first, and
    /// the line itself if it is not an SMTP reply.
    pub async fn reply(&mut self) -> String {
        let read = ferry_client::read_reply(&mut self.conn, &mut self.reader);
        match tokio::time::timeout(REPLY_WAIT, read)
            .await
            .expect("no reply in time")
        {
            Ok(_) => String::from_utf8_lossy(self.reader.last_wire())
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            Err(ReadError::Malformed(ReplyError::Malformed(line))) => line,
            Err(_) => String::new(),
        }
    }

    /// Sends one command line and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes())
            .await
            .expect("send");
        self.reply().await
    }

    /// One transaction: `MAIL FROM:<from>` and `RCPT TO:<to>` (each must
    /// get its `250`), `DATA` (`354`), `body` and the final dot; returns
    /// the reply to the end of data.
    pub async fn send_mail(&mut self, from: &str, to: &str, body: &[u8]) -> String {
        assert_eq!(
            self.cmd(&format!("MAIL FROM:<{from}>")).await,
            "250 2.1.0 Sender OK"
        );
        assert_eq!(
            self.cmd(&format!("RCPT TO:<{to}>")).await,
            "250 2.1.5 Recipient OK"
        );
        let data = self.cmd("DATA").await;
        assert!(data.starts_with("354"), "{data}");
        self.send(body).await.expect("send");
        self.send(b".\r\n").await.expect("send");
        self.reply().await
    }

    /// True once the server has closed the connection (reads return 0).
    pub async fn is_closed(&mut self) -> bool {
        let result = tokio::time::timeout(REPLY_WAIT, async {
            loop {
                match self.read_more().await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await;
        result.unwrap_or(false)
    }

    /// STARTTLS, then a TLS handshake trusting `ca_pem`, for `localhost`.
    pub async fn starttls(&mut self, ca_pem: &[u8]) -> Result<String, String> {
        self.starttls_offering(ca_pem, rustls::DEFAULT_VERSIONS)
            .await
    }

    /// [`SmtpClient::starttls`] from a client that offers only the TLS
    /// `versions` given (`&[&rustls::version::TLS12]`: an older device).
    /// `Err` holds a reply other than `220`, or the handshake's error.
    pub async fn starttls_offering(
        &mut self,
        ca_pem: &[u8],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<String, String> {
        let reply = self.cmd("STARTTLS").await;
        if !reply.starts_with("220") {
            return Err(reply);
        }
        self.handshake(ca_pem, versions).await?;
        Ok(reply)
    }

    /// The TLS handshake alone (the `220` to STARTTLS already read),
    /// offering the TLS `versions` given, trusting `ca_pem`, for
    /// `localhost`; `Err` holds the handshake's error.
    pub async fn handshake(
        &mut self,
        ca_pem: &[u8],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<(), String> {
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Err("already TLS".into());
        };
        let config = client_config_offering(ca_pem, versions);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        self.conn = Conn::Tls(Box::new(tls));
        Ok(())
    }

    /// Is the connection TLS 1.3 (or 1.2)?
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match &self.conn {
            Conn::Tls(s) => s.get_ref().1.protocol_version(),
            _ => None,
        }
    }
}

/// Set by `.ci/run`: a peer the tests run against (Postfix, HAProxy,
/// promtool, root for a private Postfix) must be there.
pub const REQUIRE_PEERS: &str = "FERRY_REQUIRE_PEERS";

/// Whether a test must give up for want of a peer: the first of `reasons`
/// that is `Some` says why. Outside CI the test then skips, and says so
/// on standard error as `SKIPPED: TEST: WHY` (written past the harness's
/// capture, so it shows, and `.ci/run` counts it); with
/// [`REQUIRE_PEERS`] set to `1` it fails instead.
pub fn skip_for_want_of(reasons: &[Option<String>]) -> bool {
    let Some(why) = reasons.iter().flatten().next() else {
        return false;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    if std::env::var(REQUIRE_PEERS).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} ({REQUIRE_PEERS}=1: peers are required)");
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    true
}

/// `Some(why)` when the command `what` is not on the PATH.
pub fn missing_command(what: &str, hint: &str) -> Option<String> {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {what}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!found).then(|| format!("{what} is not installed ({hint})"))
}

/// A rustls client config trusting only `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> rustls::ClientConfig {
    client_config_offering(ca_pem, rustls::DEFAULT_VERSIONS)
}

/// A rustls client config trusting only `ca_pem` that offers only the TLS
/// `versions` given.
pub fn client_config_offering(
    ca_pem: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Writes a self-signed certificate for localhost into `dir` as
/// `test.crt` and `test.key`; returns the certificate PEM.
pub fn make_certificate(dir: &Path) -> Vec<u8> {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let pem = cert.cert.pem();
    std::fs::write(dir.join("test.crt"), &pem).unwrap();
    std::fs::write(dir.join("test.key"), cert.signing_key.serialize_pem()).unwrap();
    pem.into_bytes()
}

/// A throwaway CA and a server certificate it issued.
pub struct IssuedCertificate {
    /// The CA's certificate (what a client trusts).
    pub ca_pem: String,
    /// The server's certificate.
    pub cert_pem: String,
    /// The server's private key.
    pub key_pem: String,
}

/// A fresh CA and a server certificate it signs for `names` (DNS names,
/// or IP addresses as text).
pub fn issue_from_test_ca(names: &[&str]) -> IssuedCertificate {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Ferry test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    IssuedCertificate {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// AUTH PLAIN's initial response for `user` and `password`.
pub fn plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// A port free on `ip` right now (for configs of the real binary, which
/// binds its connector ports itself).
pub fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The messages in a worker's spool: (envelope as JSON, message), oldest
/// first. Reads without changing the spool.
pub fn spooled(data_dir: &Path) -> Vec<(serde_json::Value, Vec<u8>)> {
    if !data_dir.join("spool").exists() {
        return Vec::new();
    }
    ferry_queue::journal::scan(data_dir)
        .unwrap()
        .into_iter()
        .map(|(_, env, body)| (serde_json::to_value(env).unwrap(), body))
        .collect()
}

/// Bytes in the spool that are not whole records (a partial message).
pub fn spool_leftovers(data_dir: &Path) -> u64 {
    ferry_queue::journal::damaged_bytes(data_dir).unwrap()
}

/// The greeting at `addr` now, or "" when nothing answers.
pub async fn banner(addr: SocketAddr) -> String {
    match SmtpClient::connect_from(addr, None).await {
        Ok(mut c) => c.reply().await,
        Err(_) => String::new(),
    }
}

/// Waits (bounded by `wait`) until `addr` greets with `want`; the time it
/// took. Panics with the last greeting after `wait`.
pub async fn greets(addr: SocketAddr, want: &str, wait: Duration) -> Duration {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < wait {
        last = banner(addr).await;
        if last == want {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} greets {last:?}, not {want:?} after {wait:?}");
}
