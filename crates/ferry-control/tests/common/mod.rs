//! A control plane served in process by tonic over real mTLS on loopback
//! (port 0), on a file store in a temporary directory, with clients
//! holding certificates from its cluster CA.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_control::file_store::FileStore;
use ferry_control::identity::{CertificateAuthority, Identity};
use ferry_control::proto::config_admin_client::ConfigAdminClient;
use ferry_control::proto::config_discovery_client::ConfigDiscoveryClient;
use ferry_control::server::tls::{self, Pem};
use ferry_control::server::{self, ControlPlane};
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Plane {
    pub url: String,
    pub ca: CertificateAuthority,
    grace: Duration,
    store_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Plane {
    /// A control plane whose workers leave the rotation after `grace`.
    pub async fn start(grace: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::generate("Test Cluster CA").unwrap();
        let mut plane = Self {
            url: String::new(),
            ca,
            grace,
            store_dir: dir.path().join("store"),
            stop: None,
            served: None,
            _dir: dir,
        };
        plane.serve().await;
        plane
    }

    /// Serves the store directory (again, after a stop: a restart).
    async fn serve(&mut self) {
        let store = Arc::new(FileStore::open(&self.store_dir).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.url = format!("https://{addr}");
        let issued = self
            .ca
            .issue(&Identity::Control("cp".into()), &["127.0.0.1".into()])
            .unwrap();
        let pem = Pem {
            ca: self.ca.cert_pem().to_string(),
            cert: issued.cert_pem,
            key: issued.key_pem,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let plane = ControlPlane::with_grace(store, addr.to_string(), self.grace);
        self.served = Some(tokio::spawn(async move {
            server::serve(plane, listener, tls::server_config(&pem), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        }));
        self.stop = Some(stop);
    }

    /// Stops the server (every stream ends) and serves the same store.
    pub async fn restart(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(WAIT, served).await.unwrap().unwrap();
        }
        self.serve().await;
    }

    /// A certificate and key for `identity` from the cluster CA.
    pub fn pem(&self, identity: Identity) -> Pem {
        let issued = self.ca.issue(&identity, &[]).unwrap();
        Pem {
            ca: self.ca.cert_pem().to_string(),
            cert: issued.cert_pem,
            key: issued.key_pem,
        }
    }

    pub async fn channel(&self, pem: &Pem) -> Result<Channel, tonic::transport::Error> {
        tls::connect(&self.url, pem).await
    }

    pub async fn admin(&self, name: &str) -> ConfigAdminClient<Channel> {
        let pem = self.pem(Identity::Admin(name.into()));
        ConfigAdminClient::new(self.channel(&pem).await.unwrap())
    }

    pub async fn node(&self, id: &str) -> ConfigDiscoveryClient<Channel> {
        let pem = self.pem(Identity::Node(id.into()));
        ConfigDiscoveryClient::new(self.channel(&pem).await.unwrap())
    }
}
