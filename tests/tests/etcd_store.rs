//! The etcd store (`ferry_control::etcd_store`) against a real
//! three-member etcd cluster on loopback: two stores on it play replicas A
//! and B of the control plane. Feature `etcd`; with
//! `FERRY_REQUIRE_ETCD=1` a missing etcd fails the tests instead of
//! skipping them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{CompactionOptions, GetOptions};
use ferry_control::etcd_store::{EtcdOptions, EtcdStore};
use ferry_control::proto::{ConfigSnapshot, NodeRole, NodeStatus, SnapshotMeta};
use ferry_control::store::{Store, StoreError};
use ferry_control::MAX_CONFIG_OCTETS;
use ferry_tests::etcd::Cluster;
use tokio::sync::watch;

fn snapshot(version: u64, text: &str) -> ConfigSnapshot {
    ConfigSnapshot {
        meta: Some(SnapshotMeta {
            version,
            sha256: format!("sha-of-{version}"),
            author: "admin".into(),
            message: format!("change {version}"),
            size: text.len() as u64,
            ..SnapshotMeta::default()
        }),
        config: text.as_bytes().to_vec().into(),
    }
}

/// The version of a snapshot (0 without metadata).
fn version_of(snapshot: &ConfigSnapshot) -> u64 {
    snapshot.meta.as_ref().map_or(0, |m| m.version)
}

fn version(current: &watch::Receiver<Option<Arc<ConfigSnapshot>>>) -> u64 {
    current.borrow().as_ref().map_or(0, |s| version_of(s))
}

async fn replica(cluster: &Cluster, name: &str, options: EtcdOptions) -> EtcdStore {
    // The store's own log, shown with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ferry_control=debug")
        .with_test_writer()
        .try_init();
    EtcdStore::connect_with(&cluster.endpoints(), name, options)
        .await
        .unwrap()
}

/// Waits up to `within` until `store`'s current version is `wanted`;
/// returns how long it took.
async fn sees(store: &EtcdStore, wanted: u64, within: Duration) -> Duration {
    let start = Instant::now();
    let mut current = store.current();
    let seen = tokio::time::timeout(
        within,
        current.wait_for(|s| s.as_ref().is_some_and(|s| version_of(s) == wanted)),
    )
    .await;
    assert!(
        matches!(seen, Ok(Ok(_))),
        "version {wanted} not current within {within:?}: still {}",
        version(&store.current())
    );
    start.elapsed()
}

#[tokio::test]
async fn an_append_through_a_reaches_b() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    let b = replica(&cluster, "b", EtcdOptions::default()).await;
    assert!(b.current().borrow().is_none());
    a.append(0, snapshot(1, "one")).await.unwrap();
    sees(&b, 1, Duration::from_secs(1)).await;
    let start = Instant::now();
    a.append(1, snapshot(2, "two")).await.unwrap();
    sees(&b, 2, Duration::from_secs(1)).await;
    eprintln!("B saw A's append {:?} after A began it", start.elapsed());
    assert_eq!(b.current().borrow().as_deref(), Some(&snapshot(2, "two")));
    assert_eq!(b.get(1).await.unwrap(), Some(snapshot(1, "one")));
    assert_eq!(b.get(3).await.unwrap(), None);
    let history: Vec<u64> = b
        .history(0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(history, [2, 1]);
    let newest = b.history(1).await.unwrap();
    assert_eq!(newest, [snapshot(2, "two").meta.unwrap()]);
    // A replica started later reads the current version at once.
    let c = replica(&cluster, "c", EtcdOptions::default()).await;
    assert_eq!(version(&c.current()), 2);
}

#[tokio::test]
async fn of_two_appends_against_one_version_one_wins() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    let b = replica(&cluster, "b", EtcdOptions::default()).await;
    a.append(0, snapshot(1, "one")).await.unwrap();
    let (from_a, from_b) = tokio::join!(
        a.append(1, snapshot(2, "from a")),
        b.append(1, snapshot(2, "from b"))
    );
    let (won, lost) = match (from_a, from_b) {
        (Ok(()), Err(e)) => ("from a", e),
        (Err(e), Ok(())) => ("from b", e),
        other => panic!("not exactly one winner: {other:?}"),
    };
    assert!(
        matches!(
            lost,
            StoreError::Conflict {
                expected: 1,
                current: 2
            }
        ),
        "{lost:?}"
    );
    assert_eq!(a.get(2).await.unwrap(), Some(snapshot(2, won)));
    // An append against a version long gone is refused too.
    let stale = b.append(1, snapshot(2, "stale")).await.unwrap_err();
    assert!(
        matches!(
            stale,
            StoreError::Conflict {
                expected: 1,
                current: 2
            }
        ),
        "{stale:?}"
    );
    // And on an empty prefix, against 0 only.
    let empty = EtcdOptions {
        prefix: "/other/".into(),
        ..EtcdOptions::default()
    };
    let other = replica(&cluster, "o", empty).await;
    let e = other.append(3, snapshot(4, "x")).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Conflict {
                expected: 3,
                current: 0
            }
        ),
        "{e:?}"
    );
    other.append(0, snapshot(1, "first")).await.unwrap();
}

#[tokio::test]
async fn with_the_leader_killed_appends_work_again_within_seconds() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    let b = replica(&cluster, "b", EtcdOptions::default()).await;
    a.append(0, snapshot(1, "one")).await.unwrap();
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let killed = Instant::now();
    let mut tries = 0;
    // Bounded: 20 tries, 10 s.
    loop {
        tries += 1;
        match a.append(1, snapshot(2, "two")).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    tries < 20 && killed.elapsed() < Duration::from_secs(10),
                    "no append {:?} after the leader died: {e}",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let took = killed.elapsed();
    eprintln!("appended {took:?} after the leader died ({tries} tries)");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // B follows on, whichever member its watch was on.
    sees(&b, 2, Duration::from_secs(10)).await;
    a.append(2, snapshot(3, "three")).await.unwrap();
    sees(&b, 3, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn without_a_quorum_appends_fail_quickly_and_current_holds() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    let b = replica(&cluster, "b", EtcdOptions::default()).await;
    a.append(0, snapshot(1, "one")).await.unwrap();
    sees(&b, 1, Duration::from_secs(1)).await;
    cluster.kill(1);
    cluster.kill(2);
    let start = Instant::now();
    let e = a.append(1, snapshot(2, "two")).await.unwrap_err();
    let took = start.elapsed();
    eprintln!("without a quorum, append failed after {took:?}: {e}");
    let StoreError::Unavailable(why) = &e else {
        panic!("not Unavailable: {e:?}");
    };
    assert!(
        why.starts_with(
            "etcd: storing a new version failed for 3000 ms (is a majority of the etcd members up?); last error: "
        ),
        "{why}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The nodes keep being served what was current.
    assert_eq!(b.current().borrow().as_deref(), Some(&snapshot(1, "one")));
    assert_eq!(a.current().borrow().as_deref(), Some(&snapshot(1, "one")));
    let e = b.history(0).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    // The majority back, both replicas go on without a restart.
    cluster.restart(1);
    cluster.restart(2);
    let back = Instant::now();
    // Bounded: 20 tries, 20 s.
    for tries in 1.. {
        match a.append(1, snapshot(2, "two")).await {
            Ok(()) => break,
            Err(e) => assert!(
                tries < 20 && back.elapsed() < Duration::from_secs(20),
                "no append {:?} after the majority came back: {e}",
                back.elapsed()
            ),
        }
    }
    eprintln!("appended {:?} after the majority came back", back.elapsed());
    sees(&b, 2, Duration::from_secs(5)).await;
    b.append(2, snapshot(3, "three")).await.unwrap();
    sees(&a, 3, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn after_a_compaction_b_reads_again_and_follows() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    a.append(0, snapshot(1, "one")).await.unwrap();
    a.append(1, snapshot(2, "two")).await.unwrap();
    let mut etcd = cluster.client().await;
    let revision = etcd
        .get("/ferry/current", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    etcd.compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    // B's first watch starts below the compaction: etcd cancels it.
    let compacted = EtcdOptions {
        first_watch_revision: Some(1),
        ..EtcdOptions::default()
    };
    let b = replica(&cluster, "b", compacted).await;
    assert_eq!(version(&b.current()), 2);
    a.append(2, snapshot(3, "three")).await.unwrap();
    sees(&b, 3, Duration::from_secs(2)).await;
    a.append(3, snapshot(4, "four")).await.unwrap();
    sees(&b, 4, Duration::from_secs(1)).await;
}

fn node(id: &str) -> NodeStatus {
    NodeStatus {
        node_id: id.into(),
        role: NodeRole::Worker.into(),
        smtp_address: "127.0.0.1:2525".into(),
        connected: true,
        applied_version: 1,
        ..NodeStatus::default()
    }
}

/// The IDs of the nodes `store` lists, sorted.
async fn node_ids(store: &EtcdStore) -> Vec<String> {
    let mut ids: Vec<_> = store
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    ids.sort();
    ids
}

/// Polls `store`'s node list until it is `wanted`, up to `within`.
async fn lists(store: &EtcdStore, wanted: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let ids = node_ids(store).await;
        if ids == wanted {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "nodes {ids:?}, not {wanted:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn nodes_are_seen_by_every_replica_and_go_with_theirs() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a:7000", EtcdOptions::default()).await;
    let b = replica(&cluster, "b:7000", EtcdOptions::default()).await;
    a.put_node(node("w1")).await.unwrap();
    a.put_node(node("w2")).await.unwrap();
    b.put_node(node("w3")).await.unwrap();
    assert_eq!(node_ids(&b).await, ["w1", "w2", "w3"]);
    let listed = b.nodes().await.unwrap();
    let w1 = listed.iter().find(|n| n.node_id == "w1").unwrap();
    assert_eq!(w1.replica, "a:7000");
    assert_eq!(w1.smtp_address, "127.0.0.1:2525");
    // A node that moved to B stays when A goes.
    b.put_node(node("w2")).await.unwrap();
    drop(a);
    // Revoked at once: well within the 10 s TTL.
    let took = lists(&b, &["w2", "w3"], Duration::from_secs(5)).await;
    eprintln!("A's nodes went {took:?} after A stopped");
}

/// A drain is no replica's: set through A, seen by B, and kept when A
/// goes (its lease, and the node entries on it, go).
#[tokio::test]
async fn a_drain_is_seen_by_every_replica_and_outlives_them() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    let b = replica(&cluster, "b", EtcdOptions::default()).await;
    a.set_drained("w1", true).await.unwrap();
    a.set_drained("w2", true).await.unwrap();
    b.set_drained("w2", false).await.unwrap();
    // Clearing what is not set is no error.
    b.set_drained("w3", false).await.unwrap();
    drop(a);
    let drained: Vec<String> = b.drained().await.unwrap().into_iter().collect();
    assert_eq!(drained, ["w1"]);
    let mut etcd = cluster.client().await;
    let key = etcd.get("/ferry/drained/w1", None).await.unwrap();
    assert_eq!(key.kvs()[0].lease(), 0, "a drain hangs on no lease");
}

/// The pool a balancer on replica B watches lists a worker served by
/// replica A; when A dies (its lease and the worker's entry go), B counts
/// the worker as disconnected from then, in rotation for the grace
/// period, then out; a drain through A takes it out on B at once.
#[tokio::test]
async fn the_pool_on_b_follows_a_worker_served_by_a() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let grace = Duration::from_secs(2);
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    let b = Arc::new(replica(&cluster, "b", EtcdOptions::default()).await);
    let on_b = ferry_control::server::ControlPlane::with_grace(Arc::clone(&b), "b", grace);
    a.append(0, snapshot(1, "one")).await.unwrap();
    sees(&b, 1, Duration::from_secs(1)).await;
    a.put_node(node("w1")).await.unwrap();
    a.put_node(node("w2")).await.unwrap();
    let state = |pool: &ferry_control::proto::Pool, id: &str| {
        let m = pool.members.iter().find(|m| m.node_id == id);
        m.map(|m| (m.in_rotation, m.out_reason.clone()))
    };
    let pool = on_b.pool().await.unwrap();
    assert_eq!(state(&pool, "w1"), Some((true, String::new())), "{pool:?}");
    a.set_drained("w2", true).await.unwrap();
    let pool = on_b.pool().await.unwrap();
    assert_eq!(
        state(&pool, "w2"),
        Some((false, "drained".into())),
        "{pool:?}"
    );
    // B last saw w1 just now: its grace period runs from here.
    let gone = Instant::now();
    drop(a);
    lists(&b, &[], Duration::from_secs(5)).await;
    let pool = on_b.pool().await.unwrap();
    assert_eq!(state(&pool, "w1"), Some((true, String::new())), "{pool:?}");
    let mut last = pool;
    while gone.elapsed() < grace * 3 {
        last = on_b.pool().await.unwrap();
        if state(&last, "w1") != Some((true, String::new())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        state(&last, "w1"),
        Some((false, "disconnected".into())),
        "{last:?}"
    );
    assert!(gone.elapsed() >= grace - Duration::from_millis(200));
}

#[tokio::test]
async fn a_replica_whose_lease_expired_records_its_nodes_again() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let short = EtcdOptions {
        lease_ttl: Duration::from_secs(3),
        ..EtcdOptions::default()
    };
    let a = replica(&cluster, "a", short).await;
    let b = replica(&cluster, "b", EtcdOptions::default()).await;
    a.put_node(node("w1")).await.unwrap();
    let old = a.lease_id();
    // What etcd does to a lease not kept alive for its TTL.
    let mut etcd = cluster.client().await;
    etcd.lease_revoke(old).await.unwrap();
    // A node recorded meanwhile waits for the new lease (a tick, 1 s),
    // not for the request timeout (3 s).
    let start = Instant::now();
    a.put_node(node("w2")).await.unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2500), "{took:?}");
    lists(&b, &["w1", "w2"], Duration::from_secs(5)).await;
    let key = etcd
        .get("/ferry/nodes/w1", Some(GetOptions::new()))
        .await
        .unwrap();
    let lease = key.kvs()[0].lease();
    assert_ne!(lease, old);
    assert_eq!(lease, a.lease_id());
    // And the new lease is kept alive past its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(node_ids(&b).await, ["w1", "w2"]);
}

#[tokio::test]
async fn the_history_is_bounded() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let three = EtcdOptions {
        history_kept: 3,
        ..EtcdOptions::default()
    };
    let a = replica(&cluster, "a", three).await;
    for v in 1..=5 {
        a.append(v - 1, snapshot(v, &format!("config {v}")))
            .await
            .unwrap();
    }
    let history: Vec<u64> = a
        .history(0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(history, [5, 4, 3]);
    assert_eq!(a.get(2).await.unwrap(), None);
    assert_eq!(a.get(3).await.unwrap(), Some(snapshot(3, "config 3")));
    // Nothing else is left behind in etcd.
    let mut etcd = cluster.client().await;
    let all = etcd
        .get(
            "/ferry/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    let mut keys: Vec<_> = all
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    keys.sort();
    let wanted = [
        "/ferry/current",
        "/ferry/meta/00000000000000000003",
        "/ferry/meta/00000000000000000004",
        "/ferry/meta/00000000000000000005",
        "/ferry/snapshots/00000000000000000003",
        "/ferry/snapshots/00000000000000000004",
        "/ferry/snapshots/00000000000000000005",
    ];
    assert_eq!(keys, wanted);
}

#[tokio::test]
async fn a_config_over_the_cap_is_refused_before_etcd_is_asked() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    // The cap fits in etcd's request limit, with the metadata.
    let most = "#".repeat(MAX_CONFIG_OCTETS);
    a.append(0, snapshot(1, &most)).await.unwrap();
    assert_eq!(a.get(1).await.unwrap(), Some(snapshot(1, &most)));
    // With every member gone, any request would fail as Unavailable.
    for i in 0..3 {
        cluster.kill(i);
    }
    let big = "#".repeat(MAX_CONFIG_OCTETS + 1);
    let start = Instant::now();
    let e = a.append(1, snapshot(2, &big)).await.unwrap_err();
    assert!(
        matches!(e, StoreError::TooLarge { size, max } if size == MAX_CONFIG_OCTETS + 1 && max == MAX_CONFIG_OCTETS),
        "{e:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(500));
    let e = a.append(1, snapshot(2, "small")).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
}

#[tokio::test]
async fn an_append_repeated_after_a_lost_answer_is_not_a_conflict() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let a = replica(&cluster, "a", EtcdOptions::default()).await;
    a.append(0, snapshot(1, "one")).await.unwrap();
    // What a try whose answer was lost looks like to the next try.
    a.append(0, snapshot(1, "one")).await.unwrap();
    let history: Vec<u64> = a
        .history(0)
        .await
        .unwrap()
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(history, [1]);
    // Another config against the same version is a conflict.
    let e = a.append(0, snapshot(1, "another")).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Conflict {
                expected: 0,
                current: 1
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn connecting_without_etcd_fails_clearly_and_in_time() {
    let e = EtcdStore::connect(&[], "a").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the store is unavailable: etcd: no endpoint given (etcd:http://HOST:PORT[,...])"
    );
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = EtcdOptions {
        request_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    };
    let start = Instant::now();
    let e = EtcdStore::connect_with(&[format!("http://127.0.0.1:{port}")], "a", options)
        .await
        .unwrap_err();
    let took = start.elapsed();
    let StoreError::Unavailable(why) = &e else {
        panic!("not Unavailable: {e:?}");
    };
    assert!(
        why.starts_with("etcd: reading the current version failed for 1000 ms"),
        "{why}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
}
