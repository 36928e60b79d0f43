//! The node registry served by tonic over real mTLS on loopback (port 0):
//! which workers are in the balancers' rotation, as `Nodes` shows it and
//! `WatchPool` streams it, with a short grace period.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::{Duration, Instant};

use common::{Plane, WAIT};
use ferry_control::identity::Identity;
use ferry_control::proto::config_admin_client::ConfigAdminClient;
use ferry_control::proto::config_discovery_client::ConfigDiscoveryClient;
use ferry_control::proto::{
    ApplyRequest, ConfigSnapshot, DrainRequest, NodeRole, NodeStatus, NodesRequest, Pool,
    PoolMember, ReportRequest, WatchPoolRequest, WatchRequest,
};
use ferry_control::server::tls;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const EXAMPLE: &str = include_str!("../../../deploy/examples/ferry.toml");
/// The grace period the control plane runs with here.
const GRACE: Duration = Duration::from_secs(1);

impl Plane {
    /// Applies `config` on top of version `expected`.
    async fn apply(&self, expected: u64, config: &str) {
        self.admin("alice")
            .await
            .apply(ApplyRequest {
                expected_version: expected,
                config: config.as_bytes().to_vec().into(),
                name: "ferry.toml".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nodes(&self) -> Vec<NodeStatus> {
        let r = self
            .admin("alice")
            .await
            .nodes(NodesRequest {})
            .await
            .unwrap();
        let r = r.into_inner();
        assert_eq!(r.grace_ms, 1000);
        r.nodes
    }

    async fn status(&self, id: &str) -> NodeStatus {
        let nodes = self.nodes().await;
        nodes.into_iter().find(|n| n.node_id == id).unwrap()
    }

    async fn pool(&self, balancer: &str) -> Streaming<Pool> {
        self.node(balancer)
            .await
            .watch_pool(WatchPoolRequest {
                node_id: balancer.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

/// A worker subscribed as `id` from SMTP address 127.0.0.x: its client
/// (for reports) and its stream.
async fn worker(
    plane: &Plane,
    id: &str,
    address: &str,
) -> (ConfigDiscoveryClient<Channel>, Streaming<ConfigSnapshot>) {
    let mut client = plane.node(id).await;
    let stream = client
        .watch(WatchRequest {
            node_id: id.into(),
            role: NodeRole::Worker as i32,
            smtp_address: address.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (client, stream)
}

async fn next<T>(stream: &mut Streaming<T>) -> T {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message in time")
        .unwrap()
        .expect("the stream is open")
}

/// Reads the worker's next snapshot and ACKs (or, with `error`, NACKs)
/// it; returns its version.
async fn answer(
    client: &mut ConfigDiscoveryClient<Channel>,
    stream: &mut Streaming<ConfigSnapshot>,
    id: &str,
    served: u64,
    error: &str,
) -> u64 {
    let snapshot = next(stream).await;
    let meta = snapshot.meta.unwrap();
    let applied = if error.is_empty() {
        meta.version
    } else {
        served
    };
    client
        .report(ReportRequest {
            node_id: id.into(),
            for_version: meta.version,
            applied_version: applied,
            sha256: String::new(),
            error: error.into(),
        })
        .await
        .unwrap();
    meta.version
}

/// Reads pools until one where `id` is `(in_rotation, out_reason)`;
/// returns that member, how long it took, and the whole pool.
async fn until_member(
    stream: &mut Streaming<Pool>,
    id: &str,
    wanted: (bool, &str),
) -> (PoolMember, Duration, Pool) {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < WAIT {
        let pool = next(stream).await;
        if let Some(m) = pool.members.iter().find(|m| m.node_id == id) {
            if (m.in_rotation, m.out_reason.as_str()) == wanted {
                return (m.clone(), start.elapsed(), pool.clone());
            }
        }
        seen.push(pool);
    }
    panic!("{id} never became {wanted:?}; pools seen: {seen:?}");
}

fn edited(banner: &str) -> String {
    EXAMPLE.replace("Ferry Default Frontend ready", banner)
}

#[tokio::test]
async fn a_worker_in_step_is_in_and_one_that_nacks_leaves_after_the_grace() {
    let plane = Plane::start(GRACE).await;
    plane.apply(0, EXAMPLE).await;
    let (mut w1, mut w1_stream) = worker(&plane, "w1", "127.0.0.11").await;
    assert_eq!(answer(&mut w1, &mut w1_stream, "w1", 0, "").await, 1);
    let (mut w2, mut w2_stream) = worker(&plane, "w2", "127.0.0.12").await;
    assert_eq!(answer(&mut w2, &mut w2_stream, "w2", 0, "").await, 1);
    let mut pool = plane.pool("b1").await;
    let (member, _, _) = until_member(&mut pool, "w1", (true, "")).await;
    assert_eq!(member.smtp_address, "127.0.0.11");
    let status = plane.status("w1").await;
    assert!(status.in_rotation && status.connected, "{status:?}");

    // Version 2: w1 cannot apply it, w2 can.
    plane.apply(1, &edited("Second")).await;
    assert_eq!(
        answer(&mut w1, &mut w1_stream, "w1", 1, "certs/x.crt: not found").await,
        2
    );
    assert_eq!(answer(&mut w2, &mut w2_stream, "w2", 1, "").await, 2);
    // Within the grace period it stays in.
    let status = plane.status("w1").await;
    assert_eq!((status.lag, status.nacked_version), (1, 2), "{status:?}");
    let (_, took, _) = until_member(&mut pool, "w1", (false, "nacked")).await;
    assert!(
        took >= GRACE / 2,
        "out after {took:?}, before the grace period"
    );
    let status = plane.status("w1").await;
    assert!(!status.in_rotation, "{status:?}");
    assert_eq!(status.out_reason, "nacked");
    let w2_status = plane.status("w2").await;
    assert!(w2_status.in_rotation, "{w2_status:?}");

    // Version 3 fixes it: w1 ACKs and is back in.
    plane.apply(2, &edited("Third")).await;
    assert_eq!(answer(&mut w1, &mut w1_stream, "w1", 1, "").await, 3);
    until_member(&mut pool, "w1", (true, "")).await;
}

/// A version every worker refuses (a typo in a certificate path) leaves
/// them all serving the one before: none is taken out for being behind,
/// or the balancers would have no worker at all.
#[tokio::test]
async fn a_version_every_worker_refuses_takes_none_out() {
    let plane = Plane::start(GRACE).await;
    plane.apply(0, EXAMPLE).await;
    let (mut w1, mut w1_stream) = worker(&plane, "w1", "127.0.0.11").await;
    assert_eq!(answer(&mut w1, &mut w1_stream, "w1", 0, "").await, 1);
    let (mut w2, mut w2_stream) = worker(&plane, "w2", "127.0.0.12").await;
    assert_eq!(answer(&mut w2, &mut w2_stream, "w2", 0, "").await, 1);
    plane.apply(1, &edited("Second")).await;
    for (id, client, stream) in [
        ("w1", &mut w1, &mut w1_stream),
        ("w2", &mut w2, &mut w2_stream),
    ] {
        assert_eq!(
            answer(client, stream, id, 1, "certs/typo.crt: not found").await,
            2
        );
    }
    // Well past the grace period, both are still in rotation...
    tokio::time::sleep(GRACE * 3).await;
    for id in ["w1", "w2"] {
        let status = plane.status(id).await;
        assert_eq!((status.lag, status.nacked_version), (1, 2), "{status:?}");
        assert!(status.in_rotation, "{status:?}");
    }
    // ...until one applies a later version: then the other is behind it.
    plane.apply(2, &edited("Third")).await;
    assert_eq!(answer(&mut w1, &mut w1_stream, "w1", 1, "").await, 3);
    assert_eq!(
        answer(
            &mut w2,
            &mut w2_stream,
            "w2",
            1,
            "certs/typo.crt: not found"
        )
        .await,
        3
    );
    let mut pool = plane.pool("b1").await;
    until_member(&mut pool, "w2", (false, "nacked")).await;
}

#[tokio::test]
async fn a_worker_disconnected_past_the_grace_leaves_and_a_balancer_is_no_member() {
    let plane = Plane::start(GRACE).await;
    plane.apply(0, EXAMPLE).await;
    let (mut w1, mut w1_stream) = worker(&plane, "w1", "127.0.0.11").await;
    answer(&mut w1, &mut w1_stream, "w1", 0, "").await;
    let mut pool = plane.pool("b1").await;
    until_member(&mut pool, "w1", (true, "")).await;
    drop((w1, w1_stream));
    // Disconnected, still in for the grace period, then out.
    let deadline = Instant::now() + WAIT;
    while plane.status("w1").await.connected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = plane.status("w1").await;
    assert!(!status.connected, "{status:?}");
    let (_, _, last) = until_member(&mut pool, "w1", (false, "disconnected")).await;
    assert_eq!(plane.status("w1").await.out_reason, "disconnected");
    // A balancer watching the pool is not in it.
    assert!(last.members.iter().all(|m| m.node_id == "w1"), "{last:?}");
    // Listed out of rotation, it leaves even while the pool is still
    // incomplete (the replica started less than a backoff cap ago).
    assert!(!last.complete, "{last:?}");
    // Back: in again.
    let (mut w1, mut w1_stream) = worker(&plane, "w1", "127.0.0.11").await;
    let _ = (&mut w1, &mut w1_stream);
    until_member(&mut pool, "w1", (true, "")).await;
}

#[tokio::test]
async fn drain_is_for_admins_takes_a_worker_out_and_outlives_a_restart() {
    let mut plane = Plane::start(GRACE).await;
    plane.apply(0, EXAMPLE).await;
    let (mut w1, mut w1_stream) = worker(&plane, "w1", "127.0.0.11").await;
    answer(&mut w1, &mut w1_stream, "w1", 0, "").await;
    let mut pool = plane.pool("b1").await;
    until_member(&mut pool, "w1", (true, "")).await;

    // A node certificate may not drain; an unknown worker is not found.
    let pem = plane.pem(Identity::Node("w1".into()));
    let mut as_node = ConfigAdminClient::new(tls::connect(&plane.url, &pem).await.unwrap());
    let refused = as_node
        .drain(DrainRequest {
            node_id: "w1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let mut admin = plane.admin("alice").await;
    let unknown = admin
        .drain(DrainRequest {
            node_id: "w9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    let drained = admin
        .drain(DrainRequest {
            node_id: "w1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert!(drained.drained && !drained.in_rotation, "{drained:?}");
    assert_eq!(drained.out_reason, "drained");
    // At once, not after the grace period.
    let (_, took, _) = until_member(&mut pool, "w1", (false, "drained")).await;
    assert!(took < GRACE, "{took:?}");

    // The control plane restarts: the worker reconnects and is still
    // drained.
    plane.restart().await;
    let (mut w1, mut w1_stream) = worker(&plane, "w1", "127.0.0.11").await;
    let _ = (&mut w1, &mut w1_stream);
    let status = plane.status("w1").await;
    assert!(status.drained && !status.in_rotation, "{status:?}");
    let mut pool = plane.pool("b1").await;
    let first = next(&mut pool).await;
    let member = first.members.iter().find(|m| m.node_id == "w1").unwrap();
    assert_eq!(
        (member.in_rotation, member.out_reason.as_str()),
        (false, "drained")
    );

    let mut admin = plane.admin("alice").await;
    let undrained = admin
        .undrain(DrainRequest {
            node_id: "w1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert!(!undrained.drained, "{undrained:?}");
    until_member(&mut pool, "w1", (true, "")).await;
}

#[tokio::test]
async fn a_pool_right_after_a_restart_is_incomplete() {
    let plane = Plane::start(GRACE).await;
    let mut pool = plane.pool("b1").await;
    let first = next(&mut pool).await;
    assert!(!first.complete, "{first:?}");
    assert!(first.members.is_empty(), "{first:?}");
    // Past the grace period it is still incomplete: a worker may be in
    // its longest reconnect backoff (the window itself is unit-tested
    // with a paused clock in `server::registry`).
    match tokio::time::timeout(GRACE * 3, next(&mut pool)).await {
        Err(_) => {}
        Ok(p) => assert!(!p.complete, "{p:?}"),
    }
}
