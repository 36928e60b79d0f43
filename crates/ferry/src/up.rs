//! `ferry up`: the demo cluster on loopback, each role its own child
//! process, with the example config and a throwaway certificate.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const EXAMPLE_CONFIG: &str = include_str!("../../../deploy/examples/ferry.toml");

/// The demo's workers and their addresses (as in the example config's
/// `[[balancer.backends]]`).
const WORKERS: [(&str, &str); 2] = [("worker-1", "127.0.0.11"), ("worker-2", "127.0.0.12")];

/// A child node and what it printed at start.
struct Node {
    name: String,
    child: Child,
    smtp: Vec<String>,
    admin: String,
}

pub async fn run(data: PathBuf) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(data.join("certs"))
        .with_context(|| format!("creating {}", data.display()))?;
    let config = data.join("ferry.toml");
    std::fs::write(&config, EXAMPLE_CONFIG).context("writing the example config")?;
    throwaway_certificate(&data.join("certs"))?;
    let token_file = data.join("admin.token");
    crate::token::ensure(&token_file)?;
    let token_arg = token_file.display().to_string();

    let config_arg = config.display().to_string();
    let mut nodes = Vec::new();
    for (name, address) in WORKERS {
        let data_dir = data.join(name).display().to_string();
        let hostname = format!("{name}.ferry.test");
        let args = [
            "worker",
            "--config",
            &config_arg,
            "--listen",
            address,
            "--data",
            &data_dir,
            "--admin",
            "127.0.0.1:0",
            "--hostname",
            &hostname,
            "--admin-token-file",
            &token_arg,
        ];
        nodes.push(start_node(name, &args).await?);
    }
    let args = [
        "balancer",
        "--config",
        &config_arg,
        "--listen",
        "127.0.0.1",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        &token_arg,
    ];
    nodes.push(start_node("balancer", &args).await?);

    println!();
    println!(
        "Ferry is up: a demo cluster on loopback (data in {})",
        data.display()
    );
    for n in &nodes {
        println!(
            "  {:<10} pid {:<7} smtp {}  admin {}  metrics {}",
            n.name,
            n.child.id().unwrap_or(0),
            n.smtp.join(", "),
            n.admin.trim_end_matches("/metrics"),
            n.admin
        );
    }
    println!("Admin operations (queue, drain) need the bearer token in {token_arg}");
    println!("Through the balancer (the workers are reachable directly too):");
    println!("  internal relay:      127.0.0.1:2525 (anonymous, to @example.test)");
    println!("  authenticated relay: 127.0.0.1:2587 (STARTTLS, then AUTH as scanner / ferry-demo)");
    println!("  anonymous relay:     127.0.0.1:2525 from source address 127.0.0.30 (to anywhere)");
    println!("Press Ctrl-C to stop.");

    // A worker that dies leaves the others serving (that is the point of
    // the balancer); the balancer dying ends the demo.
    let stopped_by_user = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break true,
            (name, status) = first_exit(&mut nodes) => {
                nodes.retain(|n| n.name != name);
                if name == "balancer" {
                    eprintln!("ferry up: the balancer exited ({status}); stopping the workers");
                    break false;
                }
                eprintln!("ferry up: {name} exited ({status}); the balancer sends its sessions to the other worker");
                if nodes.len() == 1 {
                    eprintln!("ferry up: no worker left; the balancer answers 421 until you stop it");
                }
            }
        }
    };
    for n in &mut nodes {
        stop(n).await;
    }
    Ok(if stopped_by_user {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn start_node(name: &str, args: &[&str]) -> anyhow::Result<Node> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let Some(stdout) = child.stdout.take() else {
        bail!("{name}: no stdout")
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut node = Node {
        name: name.into(),
        child,
        smtp: Vec::new(),
        admin: String::new(),
    };
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            let mut words = line.split_whitespace().skip(1);
            match (words.next(), words.next()) {
                (Some("smtp"), Some(addr)) => node.smtp.push(addr.to_string()),
                (Some("admin"), Some(url)) => node.admin = url.to_string(),
                (Some("ready"), None) => return Ok(true),
                _ => {}
            }
        }
        Ok::<_, std::io::Error>(false)
    })
    .await;
    match ready {
        Ok(Ok(true)) => {}
        _ => bail!("{name} did not start (see its log above)"),
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(node)
}

async fn first_exit(nodes: &mut [Node]) -> (String, String) {
    let waits = nodes.iter_mut().map(|n| {
        Box::pin(async move {
            let status = n.child.wait().await;
            (
                n.name.clone(),
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            )
        })
    });
    futures_select_all(waits).await
}

/// The first of several futures to finish.
async fn futures_select_all<F, T>(futures: impl IntoIterator<Item = F>) -> T
where
    F: std::future::Future<Output = T> + Unpin,
{
    let mut futures: Vec<F> = futures.into_iter().collect();
    std::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// SIGTERM (graceful drain), then SIGKILL after a while.
async fn stop(node: &mut Node) {
    if let Some(pid) = node.child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), node.child.wait())
        .await
        .is_err()
    {
        let _ = node.child.kill().await;
    }
}

/// A self-signed certificate for localhost, made once per data directory.
fn throwaway_certificate(dir: &Path) -> anyhow::Result<()> {
    let (crt, key) = (dir.join("ferry.crt"), dir.join("ferry.key"));
    if crt.exists() && key.exists() {
        return Ok(());
    }
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "worker-1.ferry.test".to_string(),
        "worker-2.ferry.test".to_string(),
        "127.0.0.11".to_string(),
        "127.0.0.12".to_string(),
    ];
    let cert = rcgen::generate_simple_self_signed(names).context("making a certificate")?;
    std::fs::write(&crt, cert.cert.pem())?;
    std::fs::write(&key, cert.signing_key.serialize_pem())?;
    Ok(())
}
