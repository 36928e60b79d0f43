//! What `ferry up` prints once every node runs: each node's addresses, the
//! `ferry ctl` command line that works against the control plane, and how
//! to reach and change the demo.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::children::{Node, Role};
use super::pki::{self, Pki};
use crate::demo_certs;

/// What the startup text is made of.
pub struct Startup<'a> {
    pub data: &'a Path,
    pub nodes: &'a [Node],
    pub balancer: &'a ferry_config::BalancerConfig,
    pub listen: &'a IpAddr,
    /// The config is the example, untouched: describe its connectors.
    pub example: bool,
    /// The control plane's `https://` URL.
    pub url: &'a str,
    pub pki: &'a Pki,
    /// The version the nodes started with.
    pub version: u64,
}

pub fn print(s: &Startup<'_>) {
    let data = s.data;
    show!();
    show!(
        "Ferry is up: a demo cluster on loopback (data in {})",
        data.display()
    );
    for n in s.nodes {
        let pid = n.child.id().unwrap_or(0);
        let metrics = format!("admin {}  metrics {}/metrics", n.admin, n.admin);
        match n.role {
            Role::Control => show!("  {:<10} pid {pid:<7} grpc {}  {metrics}", n.name, n.grpc),
            _ => show!(
                "  {:<10} pid {pid:<7} smtp {}  {metrics}",
                n.name,
                n.smtp.join(", ")
            ),
        }
    }
    show!("Each node's log: {}/NAME.log", data.join("logs").display());
    show!(
        "The control plane runs config version {} (history in {}); every node gets it from there",
        s.version,
        data.join("control").display()
    );
    show!(
        "Its admin client, with the admin certificate (certificates in {}):",
        data.join("pki").display()
    );
    show!("  {}", ctl_line(s.url, s.pki, "nodes"));
    show!(
        "Admin operations on a node (queue, drain) need the bearer token in {}",
        data.join("admin.token").display()
    );
    show!(
        "TLS clients can verify every node against the demo CA in {}",
        data.join(demo_certs::CA_FILE).display()
    );
    let port = |i: usize| s.balancer.listeners.get(i).map_or(0, |l| l.port);
    let (smtp, submission) = (port(0), port(1));
    let listen = s.listen;
    show!("Through the balancer:");
    if s.example {
        show!("  internal relay:      {listen}:{smtp} (anonymous, to @example.test)");
        show!("  authenticated relay: {listen}:{submission} (STARTTLS, then AUTH as scanner / ferry-demo)");
        show!(
            "  anonymous relay:     {listen}:{smtp} from source address 127.0.0.30 (to anywhere)"
        );
    } else {
        // Not the example: say only what the config says.
        for l in &s.balancer.listeners {
            show!("  {:<20} {listen}:{}", format!("{}:", l.name), l.port);
        }
        show!(
            "  (which connector serves a client: ferry config explain FILE --client IP --port N)"
        );
    }
    let direct: Vec<String> = s
        .nodes
        .iter()
        .filter(|n| n.role == Role::Worker)
        .filter_map(|n| n.smtp.first().cloned())
        .collect();
    match s.balancer.source {
        Some(source) => show!(
            "Directly to a worker: {} (the balancer connects from {source}, the workers' only trusted proxy)",
            direct.join(", ")
        ),
        None => show!("Directly to a worker: {}", direct.join(", ")),
    }
    let file = data.join("ferry.toml");
    show!(
        "To change the config: edit {}, then kill -HUP {} (ferry up applies it and says what each node did), or run the ferry ctl line above with `apply {}` instead of `nodes`",
        file.display(),
        std::process::id(),
        file.display()
    );
    show!("Press Ctrl-C to stop (SIGTERM stops it too).");
}

/// The `ferry ctl` command line for `command` against the control plane
/// at `url` as the admin of `pki`, ready to paste.
pub fn ctl_line(url: &str, pki: &Pki, command: &str) -> String {
    format!(
        "{} ctl --control {url} --ca {} --cert {} --key {} {command}",
        program(),
        pki.ca().display(),
        pki.cert(pki::ADMIN).display(),
        pki.key(pki::ADMIN).display()
    )
}

/// How to run this binary from the user's shell: `ferry` when that is
/// what `ferry` on the PATH runs, else its path (relative to the current
/// directory when inside it, as `target/release/ferry` after `cargo run`).
fn program() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "ferry".into();
    };
    let same = |p: PathBuf| {
        p.canonicalize()
            .is_ok_and(|p| Some(p) == exe.canonicalize().ok())
    };
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| same(dir.join("ferry"))));
    if on_path {
        return "ferry".into();
    }
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf));
    match relative {
        // A bare name would be looked up on the PATH.
        Some(r) if r.parent() == Some(Path::new("")) => format!("./{}", r.display()),
        Some(r) => r.display().to_string(),
        None => exe.display().to_string(),
    }
}
