//! An in-process worker on port-0 listeners, with a config made for tests.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, SaltString};
use argon2::{Argon2, PasswordHasher};
use ferry_config::ClusterConfig;
use ferry_node::{LoadedConfig, Role, Source};
use ferry_queue::Journal;
use ferry_worker::{Deliverer, Worker, WorkerOptions, WorkerSnapshot};
use tokio::net::TcpListener;

mod outcomes;

#[allow(unused_imports)]
pub use ferry_tests::{plain, spool_leftovers, spooled, SmtpClient};
#[allow(unused_imports)]
pub use outcomes::*;

pub const PASSWORD: &str = "s3cret";
/// The one peer allowed to send PROXY headers (a balancer).
pub const PROXY: &str = "127.0.0.99";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub worker: Arc<Worker>,
    pub ca: Vec<u8>,
    /// Port shared by Default Frontend, Lab and Anon Relay.
    pub front: SocketAddr,
    /// Client Frontend (STARTTLS + AUTH).
    pub client: SocketAddr,
    /// IPv6 listener on ::1.
    pub v6: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
    /// The delivery agent, when the worker delivers.
    pub deliverer: Option<Arc<Deliverer>>,
    /// The config text version 1 was made from.
    pub text: String,
}

pub fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

impl Harness {
    /// Starts a worker; `limits` is a TOML inline table for every connector.
    /// Delivery does not run: what was accepted stays in the spool.
    pub async fn start(limits: &str) -> Harness {
        Self::launch(limits, "", None, false).await
    }

    /// Like [`Harness::start`], with `extra` config appended.
    pub async fn start_extra(limits: &str, extra: &str) -> Harness {
        Self::launch(limits, extra, None, false).await
    }

    /// Starts a worker that also delivers, with `extra` config (routes,
    /// delivery) appended, in `dir` if given (a restart on the same data
    /// directory).
    pub async fn start_with(limits: &str, extra: &str, dir: Option<tempfile::TempDir>) -> Harness {
        Self::launch(limits, extra, dir, true).await
    }

    async fn launch(
        limits: &str,
        extra: &str,
        dir: Option<tempfile::TempDir>,
        delivery: bool,
    ) -> Harness {
        let dir = match dir {
            Some(d) => d,
            None => tempfile::tempdir().unwrap(),
        };
        let ca = ferry_tests::make_certificate(dir.path());
        let front_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v6_l = TcpListener::bind("[::1]:0").await.unwrap();
        let (front, client, v6) = (
            front_l.local_addr().unwrap(),
            client_l.local_addr().unwrap(),
            v6_l.local_addr().unwrap(),
        );
        let h = hash(PASSWORD);
        let text = format!(
            r#"
accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]
trusted_proxies = ["{PROXY}"]

[[connectors]]
name = "Default Frontend"
port = {fp}
remote_ranges = ["0.0.0.0/0", "::/0"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "test.crt", key = "test.key" }}
banner = "Default Frontend ready"
protocol_log = "verbose"
limits = {limits}

[[connectors]]
name = "Lab"
port = {fp}
remote_ranges = ["127.0.0.16/28"]
permissions = ["anonymous"]
banner = "Lab ready"
limits = {limits}

[[connectors]]
name = "Anon Relay"
port = {fp}
remote_ranges = ["127.0.0.30"]
permissions = ["anonymous", "accept_any_recipient"]
banner = "Anon Relay ready"
limits = {limits}

[[connectors]]
name = "Client Frontend"
port = {cp}
remote_ranges = ["0.0.0.0/0"]
permissions = ["users"]
auth = ["tls", "basic_auth_require_tls"]
tls = {{ certificate = "test.crt", key = "test.key", min_version = "1.2" }}
banner = "Client Frontend ready"
protocol_log = "verbose"
limits = {limits}

[[connectors]]
name = "V6 Any"
port = {vp}
remote_ranges = ["::/0"]
permissions = ["anonymous"]
banner = "V6 Any ready"

[[connectors]]
name = "V6 Loopback"
port = {vp}
remote_ranges = ["::1/128"]
permissions = ["anonymous"]
banner = "V6 Loopback ready"

[[users]]
name = "scanner"
password_hash = "{h}"
allowed_senders = ["scanner@example.test", "*@devices.example.test"]

[[users]]
name = "printer"
password_hash = "{h}"
allowed_senders = ["*"]
allowed_ranges = ["127.0.0.40/32"]

{extra}
"#,
            fp = front.port(),
            cp = client.port(),
            vp = v6.port(),
        );
        let snapshot = snapshot(&text, dir.path(), 1);
        let spool = Journal::open(dir.path()).unwrap();
        let journal = spool.clone();
        let worker = Worker::new(
            WorkerOptions {
                listen: "127.0.0.1".parse().unwrap(),
                data_dir: dir.path().to_path_buf(),
                hostname: "relay.test".into(),
            },
            snapshot,
            Arc::new(spool),
        );
        for (port, listener) in [front_l, client_l, v6_l]
            .into_iter()
            .map(|l| (l.local_addr().unwrap().port(), l))
        {
            worker.adopt(port, listener).await;
        }
        let deliverer = delivery.then(|| {
            let deliverer = Deliverer::new(Arc::clone(worker.core()), journal);
            tokio::spawn(Arc::clone(&deliverer).run(worker.shutdown_token()));
            deliverer
        });
        let task = tokio::spawn(Arc::clone(&worker).run(Duration::from_secs(10)));
        Harness {
            dir,
            worker,
            ca,
            front,
            client,
            v6,
            task,
            deliverer,
            text,
        }
    }

    /// Applies `text` as config `version` to the running worker, as a
    /// reload does.
    pub async fn apply(&self, text: &str, version: u64) {
        let snapshot = snapshot(text, self.dir.path(), version);
        self.worker.apply(Arc::new(snapshot)).await.unwrap();
    }

    /// Applies version 1's config with `more` appended as version 2; `FRONT`
    /// in `more` stands for the shared front port (known once bound), so
    /// extra connectors can share it.
    pub async fn apply_more(&self, more: &str) {
        let more = more.replace("FRONT", &self.front.port().to_string());
        self.apply(&format!("{}\n{more}", self.text), 2).await;
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Shuts the worker down and hands back its data directory.
    pub async fn stop(self) -> tempfile::TempDir {
        self.worker.shutdown_token().cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        self.dir
    }

    /// Connects to the shared front port from `source`; checks the banner.
    pub async fn front_from(&self, source: &str) -> (SmtpClient, String) {
        SmtpClient::connect(self.front, ip(source)).await
    }

    /// Connects to `to` from the trusted proxy and sends a PROXY v2 header
    /// naming `client` (`ADDR:PORT`) as the client, as the balancer does;
    /// returns the session's greeting.
    pub async fn proxied(&self, to: SocketAddr, client: &str) -> (SmtpClient, String) {
        let mut c = SmtpClient::connect_from(to, ip(PROXY)).await.unwrap();
        c.send(&proxy_v2(client, to, "BAL-1")).await.unwrap();
        let greeting = c.reply().await;
        (c, greeting)
    }

    /// A client on the Client Frontend after STARTTLS, EHLO and AUTH.
    pub async fn authenticated(&self, source: &str, user: &str) -> SmtpClient {
        let (mut c, banner) = SmtpClient::connect(self.client, ip(source)).await;
        assert_eq!(banner, "220 Client Frontend ready");
        c.cmd("EHLO device").await;
        c.starttls(&self.ca).await.unwrap();
        c.cmd("EHLO device").await;
        let r = c
            .cmd(&format!("AUTH PLAIN {}", plain(user, PASSWORD)))
            .await;
        assert_eq!(r, "235 2.7.0 Authentication successful");
        c
    }
}

/// `version` of the config `text` (files named in it are relative to
/// `dir`), with its TLS acceptors.
pub fn snapshot(text: &str, dir: &std::path::Path, version: u64) -> WorkerSnapshot {
    let config = ClusterConfig::parse("test.toml", text, dir).unwrap();
    let material = Worker::prepare(&config).unwrap();
    LoadedConfig {
        config: Arc::new(config),
        sha256: ferry_node::sha256_hex(text.as_bytes()),
        source: Source::File("test.toml".into()),
    }
    .into_snapshot(version, material)
}

/// A PROXY v2 header naming `client` (`ADDR:PORT`) connected to `to`,
/// with the balancer's session id `session` (its UNIQUE_ID TLV).
pub fn proxy_v2(client: &str, to: SocketAddr, session: &str) -> Vec<u8> {
    use proxy_header::{ProxiedAddress, ProxyHeader, Tlv};
    let client: SocketAddr = client.parse().unwrap();
    // Both addresses of a header are of one family: an IPv6 client reached
    // an IPv4 listener as its IPv4-mapped address.
    let to = match to.ip() {
        IpAddr::V4(v4) if client.is_ipv6() => {
            SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port())
        }
        _ => to,
    };
    let addr = ProxiedAddress::stream(client, to);
    let mut out = Vec::new();
    ProxyHeader::with_tlvs(Some(addr), [Tlv::UniqueId(session.as_bytes().into())])
        .encode_v2(&mut out)
        .unwrap();
    out
}

/// Every tracking-log event written so far, from every file, in order.
pub fn tracking(data: &std::path::Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("logs").join("tracking"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How long [`eventually`] polls.
pub const EVENTUALLY: Duration = Duration::from_secs(30);

/// Polls (bounded by [`EVENTUALLY`]) until `ready` holds; returns whether
/// it did.
pub async fn eventually(mut ready: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if ready() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A full transaction; returns the reply to the end of data.
pub async fn send_message(c: &mut SmtpClient, from: &str, to: &str, body: &str) -> String {
    c.send_mail(from, to, body.as_bytes()).await
}

/// A connector on the shared front port (`FRONT`, for
/// [`Harness::apply_more`]) with AUTH in clear, for 127.0.0.70 and for
/// 192.0.2.46 (as a balancer names it).
pub const BASIC_AUTH: &str = r#"
[[connectors]]
name = "Basic Auth"
port = FRONT
remote_ranges = ["127.0.0.70/32", "192.0.2.46/32"]
permissions = ["users"]
auth = ["basic_auth"]
banner = "Basic Auth ready"
limits = { tarpit = "0s" }
"#;
