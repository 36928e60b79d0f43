//! A fake control plane for the node tests, as linkerd2-proxy's
//! integration tests fake their controller: a real tonic server speaking
//! `ferry.v1.ConfigDiscovery` over real mTLS on loopback, from a test CA.
//! The test pushes snapshots and reads the Watch requests and the reports
//! it received; it can stop the server and bring it back on the same
//! address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_control::identity::{CertificateAuthority, Identity};
use ferry_control::proto::config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer};
use ferry_control::proto::{
    ConfigSnapshot, Pool, ReportRequest, ReportResponse, SnapshotMeta, WatchPoolRequest,
    WatchRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// A test cluster CA with the control plane's certificate (for
/// 127.0.0.1) and node certificates, as files in a directory.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    ca_pem: String,
    authority: CertificateAuthority,
    control: ferry_control::identity::Issued,
}

impl Pki {
    /// A new CA in `dir` (created).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (authority, ca) = CertificateAuthority::generate("Ferry test CA").unwrap();
        let path = dir.join("ca.crt");
        std::fs::write(&path, &ca.cert_pem).unwrap();
        let control = authority
            .issue(&Identity::Control("cp".into()), &["127.0.0.1".into()])
            .unwrap();
        Self {
            dir: dir.to_path_buf(),
            ca: path,
            ca_pem: ca.cert_pem,
            authority,
            control,
        }
    }

    /// The flags a node `id` subscribes with, its certificate and key
    /// written beside the CA: `--node-id ID --ca … --cert … --key …`.
    pub fn node_flags(&self, id: &str) -> Vec<String> {
        let issued = self
            .authority
            .issue(&Identity::Node(id.into()), &[])
            .unwrap();
        let cert = self.dir.join(format!("{id}.crt"));
        let key = self.dir.join(format!("{id}.key"));
        std::fs::write(&cert, issued.cert_pem).unwrap();
        std::fs::write(&key, issued.key_pem).unwrap();
        let s = |p: &Path| p.display().to_string();
        vec![
            "--node-id".into(),
            id.into(),
            "--ca".into(),
            s(&self.ca),
            "--cert".into(),
            s(&cert),
            "--key".into(),
            s(&key),
        ]
    }

    fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.control.cert_pem,
                &self.control.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }
}

/// A Watch request as received, with the identity of the certificate
/// that made it.
#[derive(Debug, Clone)]
pub struct Watched {
    pub request: WatchRequest,
    pub identity: Option<Identity>,
}

#[derive(Default)]
struct Log {
    watches: Vec<Watched>,
    reports: Vec<ReportRequest>,
}

struct State {
    current: watch::Sender<Option<Arc<ConfigSnapshot>>>,
    log: Mutex<Log>,
}

#[derive(Clone)]
struct Service {
    state: Arc<State>,
    stop: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl ConfigDiscovery for Service {
    type WatchStream = ReceiverStream<Result<ConfigSnapshot, Status>>;
    type WatchPoolStream = ReceiverStream<Result<Pool, Status>>;

    /// The fake has no node registry, as a control plane before it had
    /// none: balancers keep their static backends.
    async fn watch_pool(
        &self,
        _request: Request<WatchPoolRequest>,
    ) -> Result<Response<Self::WatchPoolStream>, Status> {
        Err(Status::unimplemented(
            "this control plane has no node registry",
        ))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let identity = request
            .peer_certs()
            .and_then(|certs| certs.first().cloned())
            .and_then(|der| Identity::of_certificate(&der).ok());
        let request = request.into_inner();
        self.state.log.lock().unwrap().watches.push(Watched {
            request: request.clone(),
            identity,
        });
        let (tx, rx) = mpsc::channel(4);
        let mut current = self.state.current.subscribe();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut known = (request.known_version, request.known_sha256);
            // Bounded by the test's life: each turn waits for a change.
            loop {
                let newest = current.borrow_and_update().clone();
                if let Some(s) = newest {
                    let meta = s.meta.clone().unwrap_or_default();
                    if (meta.version, meta.sha256.clone()) != known {
                        known = (meta.version, meta.sha256);
                        if tx.send(Ok((*s).clone())).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return },
                    _ = stop.changed() => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        self.state
            .log
            .lock()
            .unwrap()
            .reports
            .push(request.into_inner());
        Ok(Response::new(ReportResponse {}))
    }
}

/// The fake control plane.
pub struct FakeControlPlane {
    pub addr: SocketAddr,
    state: Arc<State>,
    tls: ServerTlsConfig,
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl FakeControlPlane {
    /// Serves on a port of its own on 127.0.0.1.
    pub async fn start(pki: &Pki) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_on(pki, listener)
    }

    /// Serves on `addr`, a port the test reserved (the node was told it
    /// before the control plane came up).
    pub async fn start_at(pki: &Pki, addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve_on(pki, listener)
    }

    fn serve_on(pki: &Pki, listener: tokio::net::TcpListener) -> Self {
        let mut fake = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(State {
                current: watch::channel(None).0,
                log: Mutex::default(),
            }),
            tls: pki.server_tls(),
            running: None,
        };
        fake.run(listener);
        fake
    }

    fn run(&mut self, listener: tokio::net::TcpListener) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let service = Service {
            state: Arc::clone(&self.state),
            stop: stop_rx.clone(),
        };
        let mut stop = stop_rx;
        let server = Server::builder()
            .tls_config(self.tls.clone())
            .unwrap()
            .serve_with_incoming_shutdown(
                ConfigDiscoveryServer::new(service),
                TcpListenerStream::new(listener),
                async move {
                    let _ = stop.changed().await;
                },
            );
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        self.running = Some((stop_tx, task));
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Makes `config` the next version; returns it and its SHA-256.
    pub fn push(&self, config: &str) -> (u64, String) {
        let version = self
            .state
            .current
            .borrow()
            .as_ref()
            .and_then(|s| s.meta.as_ref().map(|m| m.version))
            .unwrap_or(0)
            + 1;
        let sha256 = ferry_control::subscriber::sha256_hex(config.as_bytes());
        let snapshot = ConfigSnapshot {
            meta: Some(SnapshotMeta {
                version,
                sha256: sha256.clone(),
                author: "test".into(),
                size: config.len() as u64,
                ..SnapshotMeta::default()
            }),
            config: Bytes::from(config.to_string()),
        };
        self.state.current.send_replace(Some(Arc::new(snapshot)));
        (version, sha256)
    }

    /// Every report received, oldest first.
    pub fn reports(&self) -> Vec<ReportRequest> {
        self.state.log.lock().unwrap().reports.clone()
    }

    /// Every Watch received, oldest first.
    pub fn watches(&self) -> Vec<Watched> {
        self.state.log.lock().unwrap().watches.clone()
    }

    /// Waits (bounded by `wait`) for a report about `version`.
    pub async fn report_for(&self, version: u64, wait: Duration) -> Option<ReportRequest> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(r) = self
                .reports()
                .into_iter()
                .find(|r| r.for_version == version)
            {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops serving: every stream ends, the port closes.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serves again on the same address, with the same history.
    pub async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.run(listener);
    }
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            task.abort();
        }
    }
}
