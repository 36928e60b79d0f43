//! The control plane's fan-out benchmark (`bench/control.sh` runs it).
//!
//! N light subscribers, each on its own mTLS connection with its own node
//! certificate, watch a running `ferry control` and ACK every snapshot
//! as soon as it arrives. The bench then applies C changes one after
//! another and times each from Apply returning to the last subscriber's
//! ACK being answered. With `--pid`, it reads the control plane's
//! resident memory and CPU time from /proc over the measured changes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use ferry_control::identity::{CertificateAuthority, Identity};
use ferry_control::proto::config_admin_client::ConfigAdminClient;
use ferry_control::proto::config_discovery_client::ConfigDiscoveryClient;
use ferry_control::proto::{ApplyRequest, GetRequest, NodeRole, ReportRequest, WatchRequest};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

#[derive(Parser)]
struct Args {
    /// The control plane, https://HOST:PORT.
    #[arg(long)]
    control: String,
    /// The directory with the cluster CA's ca.crt and ca.key (subscriber
    /// certificates are issued from it).
    #[arg(long)]
    ca_dir: PathBuf,
    /// An admin certificate and key, to apply the changes.
    #[arg(long)]
    admin_cert: PathBuf,
    #[arg(long)]
    admin_key: PathBuf,
    /// The config applied (a comment line is appended for each change).
    #[arg(long)]
    config: PathBuf,
    /// Subscribers.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Changes applied and timed.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// The control plane's process id, to read its memory and CPU.
    #[arg(long)]
    pid: Option<u32>,
}

/// Each change waits at most this long for every ACK.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let ca_pem = std::fs::read_to_string(args.ca_dir.join("ca.crt")).expect("ca.crt");
    let ca_key = std::fs::read_to_string(args.ca_dir.join("ca.key")).expect("ca.key");
    let ca = CertificateAuthority::load(&ca_pem, &ca_key).expect("the CA loads");
    let host = args
        .control
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .expect("https://HOST:PORT");
    let tls = |cert: String, key: String| {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .identity(TlsIdentity::from_pem(cert, key))
            .domain_name(host.clone())
    };
    let connect = |tls: ClientTlsConfig| {
        let url = args.control.clone();
        async move {
            Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .expect("connect to the control plane")
        }
    };

    let admin_channel = connect(tls(
        std::fs::read_to_string(&args.admin_cert).unwrap(),
        std::fs::read_to_string(&args.admin_key).unwrap(),
    ))
    .await;
    let mut admin = ConfigAdminClient::new(admin_channel);
    let base = std::fs::read_to_string(&args.config).unwrap();
    let current = admin
        .get(GetRequest { version: 0 })
        .await
        .ok()
        .and_then(|r| r.into_inner().meta)
        .map_or(0, |m| m.version);
    let mut version = apply(&mut admin, current, &base, 0).await;

    // Subscribers: every ACK answered goes to the driver as (version, when).
    let (acks, mut acked) = mpsc::unbounded_channel::<(u64, Instant)>();
    let started = Instant::now();
    for i in 0..args.subscribers {
        let id = format!("bench-{i}");
        let issued = ca.issue(&Identity::Node(id.clone()), &[]).unwrap();
        let channel = connect(tls(issued.cert_pem, issued.key_pem)).await;
        tokio::spawn(subscribe(channel, id, acks.clone()));
    }
    wait_for(&mut acked, version, args.subscribers).await;
    println!(
        "{} subscribers connected and synced in {:.2} s",
        args.subscribers,
        started.elapsed().as_secs_f64()
    );

    let before = args.pid.map(cpu_seconds);
    let mut times = Vec::with_capacity(args.changes);
    let mut peak_rss = 0;
    for change in 1..=args.changes {
        version = apply(&mut admin, version, &base, change).await;
        let applied = Instant::now();
        let last = wait_for(&mut acked, version, args.subscribers).await;
        times.push(last.saturating_duration_since(applied));
        if let Some(pid) = args.pid {
            peak_rss = peak_rss.max(rss_kib(pid));
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = times[times.len() / 2];
    let p99 = times[(times.len() * 99).div_ceil(100) - 1];
    println!(
        "N={} changes={} apply→last ACK: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.subscribers,
        args.changes,
        ms(p50),
        ms(p99),
        ms(*times.last().unwrap())
    );
    if let (Some(pid), Some(before)) = (args.pid, before) {
        println!(
            "control plane: {:.0} MB resident (peak over the changes), {:.2} CPU seconds for {} changes ({:.1} ms per change)",
            peak_rss as f64 / 1024.0,
            cpu_seconds(pid) - before,
            args.changes,
            (cpu_seconds(pid) - before) * 1000.0 / args.changes as f64
        );
    }
}

/// Applies `base` plus a comment naming `change` against `expected`;
/// returns the new version.
async fn apply(
    admin: &mut ConfigAdminClient<Channel>,
    expected: u64,
    base: &str,
    change: usize,
) -> u64 {
    let text = format!("{base}\n# bench change {change}\n");
    let reply = admin
        .apply(ApplyRequest {
            expected_version: expected,
            config: Bytes::from(text),
            message: format!("bench change {change}"),
            dry_run: false,
            force: false,
            name: "bench.toml".into(),
        })
        .await
        .expect("apply")
        .into_inner();
    reply.meta.expect("the applied version").version
}

/// One light subscriber: watch, and ACK each snapshot at once.
async fn subscribe(channel: Channel, id: String, acks: mpsc::UnboundedSender<(u64, Instant)>) {
    let mut client = ConfigDiscoveryClient::new(channel);
    let mut stream = client
        .watch(WatchRequest {
            node_id: id.clone(),
            role: NodeRole::Worker as i32,
            smtp_address: "127.0.0.1:25".into(),
            known_version: 0,
            known_sha256: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    while let Ok(Some(snapshot)) = stream.message().await {
        let meta = snapshot.meta.unwrap_or_default();
        let report = ReportRequest {
            node_id: id.clone(),
            for_version: meta.version,
            applied_version: meta.version,
            sha256: meta.sha256,
            error: String::new(),
        };
        if client.report(report).await.is_ok() {
            let _ = acks.send((meta.version, Instant::now()));
        }
    }
}

/// Waits until `n` ACKs of `version` came in; returns when the last did.
async fn wait_for(
    acked: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    version: u64,
    n: usize,
) -> Instant {
    let deadline = tokio::time::Instant::now() + CHANGE_LIMIT;
    let (mut count, mut last) = (0, Instant::now());
    while count < n {
        match tokio::time::timeout_at(deadline, acked.recv()).await {
            Ok(Some((v, at))) if v == version => {
                count += 1;
                last = last.max(at);
            }
            Ok(Some(_)) => {}
            _ => panic!(
                "only {count} of {n} subscribers ACKed version {version} within {CHANGE_LIMIT:?}"
            ),
        }
    }
    last
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
