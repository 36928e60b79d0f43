//! The control plane served by tonic over real mTLS on loopback (port 0),
//! with clients holding certificates from the cluster CA (or another).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::{Plane, WAIT};
use ferry_control::identity::{CertificateAuthority, Identity};
use ferry_control::proto::config_admin_client::ConfigAdminClient;
use ferry_control::proto::config_discovery_client::ConfigDiscoveryClient;
use ferry_control::proto::{
    ApplyRequest, ApplyResponse, ConfigSnapshot, HistoryRequest, NodeRole, NodesRequest,
    ReportRequest, RollbackRequest, WatchRequest,
};
use ferry_control::server::tls::Pem;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const EXAMPLE: &str = include_str!("../../../deploy/examples/ferry.toml");
/// How long a test waits to see that nothing comes.
const QUIET: Duration = Duration::from_millis(500);

/// The control plane under test, with the default grace period.
async fn start() -> Plane {
    Plane::start(ferry_control::server::DEFAULT_GRACE).await
}

fn apply_request(expected: u64, config: &str) -> ApplyRequest {
    ApplyRequest {
        expected_version: expected,
        config: config.as_bytes().to_vec().into(),
        message: format!("change on {expected}"),
        name: "ferry.toml".into(),
        ..Default::default()
    }
}

async fn apply(
    admin: &mut ConfigAdminClient<Channel>,
    expected: u64,
    config: &str,
) -> ApplyResponse {
    admin
        .apply(apply_request(expected, config))
        .await
        .unwrap()
        .into_inner()
}

fn version(meta: &ApplyResponse) -> u64 {
    meta.meta.as_ref().unwrap().version
}

fn edited(banner: &str) -> String {
    EXAMPLE.replace("Ferry Default Frontend ready", banner)
}

async fn history_len(admin: &mut ConfigAdminClient<Channel>) -> usize {
    admin
        .history(HistoryRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .len()
}

async fn watch(
    node: &mut ConfigDiscoveryClient<Channel>,
    id: &str,
    known: Option<&ConfigSnapshot>,
) -> Result<Streaming<ConfigSnapshot>, tonic::Status> {
    let meta = known.and_then(|s| s.meta.clone()).unwrap_or_default();
    node.watch(WatchRequest {
        node_id: id.into(),
        role: NodeRole::Worker as i32,
        smtp_address: "127.0.0.11:2525".into(),
        known_version: meta.version,
        known_sha256: meta.sha256,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn next(stream: &mut Streaming<ConfigSnapshot>) -> ConfigSnapshot {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a snapshot in time")
        .unwrap()
        .expect("the stream is open")
}

/// Asserts nothing arrives on the stream within a short, bounded wait.
async fn nothing(stream: &mut Streaming<ConfigSnapshot>) {
    if let Ok(got) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("expected no message, got {got:?}");
    }
}

fn snapshot_version(s: &ConfigSnapshot) -> u64 {
    s.meta.as_ref().unwrap().version
}

async fn report(
    node: &mut ConfigDiscoveryClient<Channel>,
    id: &str,
    for_version: u64,
    applied: &ConfigSnapshot,
    error: &str,
) {
    let meta = applied.meta.clone().unwrap_or_default();
    node.report(ReportRequest {
        node_id: id.into(),
        for_version,
        applied_version: meta.version,
        sha256: meta.sha256,
        error: error.into(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_invalid_config_is_refused_with_every_error_and_nothing_is_stored() {
    let cp = start().await;
    let mut admin = cp.admin("alice").await;
    let bad = EXAMPLE.replacen("port = 2525", "port = 99999", 1).replacen(
        "name = \"Client Frontend\"",
        "name = \"Client Frontend\"\nbogus = 1",
        1,
    );
    let refused = admin.apply(apply_request(0, &bad)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let lines: Vec<&str> = refused.message().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let mut parts = line.splitn(4, ':');
        assert_eq!(parts.next(), Some("ferry.toml"), "{line}");
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
    }
    assert!(refused.message().contains("bogus"), "{}", refused.message());
    assert_eq!(history_len(&mut admin).await, 0);
    // A dry run of a valid config stores nothing either.
    let mut dry = apply_request(0, EXAMPLE);
    dry.dry_run = true;
    let preview = admin.apply(dry).await.unwrap().into_inner();
    assert!(preview.dry_run);
    assert_eq!(version(&preview), 1);
    assert!(preview
        .changes
        .iter()
        .any(|c| c == "+ connector \"Default Frontend\""));
    assert_eq!(history_len(&mut admin).await, 0);
}

#[tokio::test]
async fn a_stale_version_and_an_emptying_change_are_refused() {
    let cp = start().await;
    let mut admin = cp.admin("alice").await;
    assert_eq!(version(&apply(&mut admin, 0, EXAMPLE).await), 1);
    let second = apply(&mut admin, 1, &edited("Second")).await;
    assert_eq!(version(&second), 2);
    assert_eq!(second.changes, ["~ connector \"Default Frontend\""]);
    // Made against version 1: someone applied version 2 in between.
    let stale = admin
        .apply(apply_request(1, &edited("Third")))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert!(
        stale.message().contains("current version is 2"),
        "{}",
        stale.message()
    );

    let empty = admin.apply(apply_request(2, "")).await.unwrap_err();
    assert_eq!(empty.code(), Code::FailedPrecondition, "{empty:?}");
    assert!(
        empty.message().contains("no connectors"),
        "{}",
        empty.message()
    );
    assert_eq!(history_len(&mut admin).await, 2);
    let mut forced = apply_request(2, "");
    forced.force = true;
    let stored = admin.apply(forced).await.unwrap().into_inner();
    assert_eq!(version(&stored), 3);
    assert!(stored
        .changes
        .iter()
        .any(|c| c == "- connector \"Default Frontend\""));
}

#[tokio::test]
async fn rollback_is_a_new_version_and_history_survives_a_restart() {
    let mut cp = start().await;
    let mut admin = cp.admin("alice").await;
    apply(&mut admin, 0, EXAMPLE).await;
    apply(&mut admin, 1, &edited("Second")).await;
    let back = admin
        .rollback(RollbackRequest {
            to_version: 1,
            expected_version: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let meta = back.meta.unwrap();
    assert_eq!((meta.version, meta.rollback_of), (3, 1));
    assert_eq!(meta.author, "alice");
    assert_eq!(back.changes, ["~ connector \"Default Frontend\""]);

    // A node's open stream ends when the control plane stops (it does
    // not hold the stop up); the node would reconnect.
    let mut w1 = cp.node("w1").await;
    let mut stream = watch(&mut w1, "w1", None).await.unwrap();
    assert_eq!(snapshot_version(&next(&mut stream).await), 3);
    cp.restart().await;
    let ended = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    let mut admin = cp.admin("bob").await;
    let history = admin
        .history(HistoryRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let versions: Vec<u64> = history.iter().map(|m| m.version).collect();
    assert_eq!(versions, [3, 2, 1]);
    assert_eq!(history[0].message, "rollback to version 1");
    assert_eq!(history[2].message, "change on 0");
    assert!(history.iter().all(|m| m.author == "alice"));
    let current = admin
        .get(ferry_control::proto::GetRequest { version: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&current.config[..], EXAMPLE.as_bytes());
    assert_eq!(current.meta.unwrap().sha256, history[2].sha256);
    let gone = admin
        .get(ferry_control::proto::GetRequest { version: 9 })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn callers_are_who_their_certificate_says() {
    let cp = start().await;
    // A node certificate cannot Apply.
    let node_pem = cp.pem(Identity::Node("w1".into()));
    let mut as_node = ConfigAdminClient::new(cp.channel(&node_pem).await.unwrap());
    let refused = as_node.apply(apply_request(0, EXAMPLE)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // An admin certificate cannot Watch.
    let admin_pem = cp.pem(Identity::Admin("alice".into()));
    let mut as_admin = ConfigDiscoveryClient::new(cp.channel(&admin_pem).await.unwrap());
    let refused = watch(&mut as_admin, "alice", None).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A node cannot Watch, or report, as another node.
    let mut w1 = cp.node("w1").await;
    let refused = watch(&mut w1, "w2", None).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = w1
        .report(ReportRequest {
            node_id: "w2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Certificates from another CA, or none, fail at the handshake.
    let (other, _) = CertificateAuthority::generate("Other CA").unwrap();
    for identity in [Identity::Admin("alice".into()), Identity::Node("w1".into())] {
        let issued = other.issue(&identity, &[]).unwrap();
        let pem = Pem {
            ca: cp.ca.cert_pem().to_string(),
            cert: issued.cert_pem,
            key: issued.key_pem,
        };
        assert_refused(&cp, &pem).await;
    }
    let endpoint = tonic::transport::Endpoint::from_shared(cp.url.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(cp.ca.cert_pem())),
        )
        .unwrap();
    let outcome = match endpoint.connect().await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => ConfigAdminClient::new(channel)
            .history(HistoryRequest { limit: 0 })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "a client without a certificate was served"
    );
}

/// The TLS handshake refuses the certificate: no call gets through.
async fn assert_refused(cp: &Plane, pem: &Pem) {
    let outcome = match cp.channel(pem).await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => ConfigAdminClient::new(channel)
            .history(HistoryRequest { limit: 0 })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    assert!(outcome.is_err(), "a certificate from another CA was served");
}

#[tokio::test]
async fn watch_sends_what_a_node_lacks_and_only_that() {
    let cp = start().await;
    let mut admin = cp.admin("alice").await;
    apply(&mut admin, 0, EXAMPLE).await;
    let mut w1 = cp.node("w1").await;
    // A node with nothing gets the current version at once.
    let mut stream = watch(&mut w1, "w1", None).await.unwrap();
    let first = next(&mut stream).await;
    assert_eq!(snapshot_version(&first), 1);
    assert_eq!(&first.config[..], EXAMPLE.as_bytes());
    report(&mut w1, "w1", 1, &first, "").await;
    // A node that has the current version gets nothing.
    let mut w2 = cp.node("w2").await;
    let mut current = watch(&mut w2, "w2", Some(&first)).await.unwrap();
    nothing(&mut current).await;
    // Both get the next version.
    apply(&mut admin, 1, &edited("Second")).await;
    assert_eq!(snapshot_version(&next(&mut stream).await), 2);
    assert_eq!(snapshot_version(&next(&mut current).await), 2);

    let nodes = admin.nodes(NodesRequest {}).await.unwrap().into_inner();
    assert_eq!(nodes.current_version, 2);
    let w1_status = nodes.nodes.iter().find(|n| n.node_id == "w1").unwrap();
    assert!(w1_status.connected);
    assert_eq!(
        (
            w1_status.applied_version,
            w1_status.sent_version,
            w1_status.lag
        ),
        (1, 2, 1)
    );
    assert_eq!(w1_status.smtp_address, "127.0.0.11:2525");
    drop(stream);
    // The end of the stream shows in Nodes (polled, bounded).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let nodes = admin.nodes(NodesRequest {}).await.unwrap().into_inner();
        if nodes
            .nodes
            .iter()
            .any(|n| n.node_id == "w1" && !n.connected)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "w1 still shows connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_nacked_version_is_not_resent_and_superseded_reports_are_ignored() {
    let cp = start().await;
    let mut admin = cp.admin("alice").await;
    apply(&mut admin, 0, EXAMPLE).await;
    let mut w1 = cp.node("w1").await;
    let mut stream = watch(&mut w1, "w1", None).await.unwrap();
    let v1 = next(&mut stream).await;
    report(&mut w1, "w1", 1, &v1, "").await;

    apply(&mut admin, 1, &edited("Second")).await;
    let v2 = next(&mut stream).await;
    assert_eq!(snapshot_version(&v2), 2);
    report(
        &mut w1,
        "w1",
        2,
        &v1,
        "certs/ferry.crt: No such file or directory",
    )
    .await;
    let nodes = admin.nodes(NodesRequest {}).await.unwrap().into_inner();
    let status = &nodes.nodes[0];
    assert_eq!((status.nacked_version, status.applied_version), (2, 1));
    assert!(status.nack_error.contains("No such file"), "{status:?}");

    // The node reconnects with its old version: version 2 is not resent.
    drop(stream);
    let mut stream = watch(&mut w1, "w1", Some(&v1)).await.unwrap();
    nothing(&mut stream).await;
    // A late ACK of version 1 is about a superseded version: ignored.
    report(&mut w1, "w1", 1, &v1, "").await;
    let nodes = admin.nodes(NodesRequest {}).await.unwrap().into_inner();
    assert_eq!(nodes.nodes[0].nacked_version, 2, "{:?}", nodes.nodes[0]);
    // The next version is sent, and its ACK clears the NACK.
    apply(&mut admin, 2, &edited("Third")).await;
    let v3 = next(&mut stream).await;
    assert_eq!(snapshot_version(&v3), 3);
    report(&mut w1, "w1", 3, &v3, "").await;
    let nodes = admin.nodes(NodesRequest {}).await.unwrap().into_inner();
    let status = &nodes.nodes[0];
    assert_eq!(
        (status.nacked_version, status.applied_version, status.lag),
        (0, 3, 0)
    );
    assert!(status.nack_error.is_empty());
}
