//! A real three-member etcd cluster on loopback (Debian's `etcd-server`),
//! killed on drop: the one harness of every etcd test (the store's own in
//! `tests/etcd_store.rs`, the control plane's over the real binary in
//! `tests/control_etcd.rs`). Feature `etcd` of this package.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

/// Set by `.ci/run`: etcd must be there, a test that misses it fails.
pub const REQUIRE_ETCD: &str = "FERRY_REQUIRE_ETCD";

/// Whether the test must give up for want of `etcd`: it then says
/// `SKIPPED: TEST: WHY` on standard error (as `ferry_tests::skip_for_want_of`
/// does, which `.ci/run` counts), or fails with [`REQUIRE_ETCD`]`=1`.
pub fn skip_without_etcd() -> bool {
    let Some(why) = crate::missing_command("etcd", "apt-get install etcd-server") else {
        return false;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    assert!(
        std::env::var(REQUIRE_ETCD).map_or(true, |v| v != "1"),
        "{test} cannot run: {why} ({REQUIRE_ETCD}=1: etcd is required)"
    );
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
    true
}

struct Member {
    name: String,
    client_url: String,
    /// etcd's arguments, to start it again on its data directory.
    args: Vec<std::ffi::OsString>,
    child: Option<Child>,
}

/// Three etcd members in a temporary directory.
pub struct Cluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

/// Free loopback ports: all bound at once (so that they differ), then
/// released for etcd to take.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Cluster {
    /// Starts three members and waits until they have a leader; `None`
    /// when etcd is missing (and not required).
    pub async fn start() -> Option<Self> {
        if skip_without_etcd() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(6);
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial: Vec<String> = (0..3).map(|i| format!("m{i}={}", peer(i))).collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for i in 0..3 {
            let name = format!("m{i}");
            let client_url = format!("http://127.0.0.1:{}", ports[2 * i]);
            let data = dir.path().join(&name);
            let args = [
                "--name",
                &name,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer(i),
                "--initial-advertise-peer-urls",
                &peer(i),
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "ferry-test",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--data-dir",
            ];
            let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
            args.push(data.into_os_string());
            members.push(Member {
                name,
                client_url,
                args,
                child: None,
            });
        }
        let mut cluster = Self { members, dir };
        for i in 0..3 {
            cluster.restart(i);
        }
        cluster.leader().await;
        Some(cluster)
    }

    /// Every member's client URL, dead or alive.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// A client on the live members.
    pub async fn client(&self) -> Client {
        let live: Vec<_> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(3));
        Client::connect(live, Some(options)).await.unwrap()
    }

    /// The index of the leader among the live members, waiting (up to
    /// 30 s) until they agree on one.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, member) in self.members.iter().enumerate() {
                if member.child.is_none() {
                    continue;
                }
                if let Some(leader) = status(&member.client_url).await {
                    if leader.0 != 0 && leader.0 == leader.1 {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster has no leader after 30 s; logs in {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts member `i` (again, on its data directory: the initial
    /// cluster flags are then ignored).
    pub fn restart(&mut self, i: usize) {
        let member = &mut self.members[i];
        if member.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", member.name)))
            .unwrap();
        let child = Command::new("etcd")
            .args(&member.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        member.child = Some(child);
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where the members' logs are, for a failing assertion.
    pub fn logs(&self) -> String {
        let names: Vec<_> = self.members.iter().map(|m| m.name.as_str()).collect();
        format!("{} ({}.log)", show(self.dir.path()), names.join(".log, "))
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

/// `(leader ID, this member's ID)` as the member at `url` sees them.
async fn status(url: &str) -> Option<(u64, u64)> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_millis(500));
    let mut client = Client::connect([url], Some(options)).await.ok()?;
    let status = client.status().await.ok()?;
    let member = status.header()?.member_id();
    Some((status.leader(), member))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
