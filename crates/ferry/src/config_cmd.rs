//! `ferry config check` and `ferry config explain`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use ferry_config::explain::{explain, Question};
use ferry_config::ClusterConfig;
use ferry_node::Role;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file as a node would before applying it: every
    /// error with its line and column, then the certificate and key files
    /// it names (only binding its ports is left to the node).
    Check {
        /// The cluster config file to check.
        file: PathBuf,
    },
    /// Say what changed between two config files (connectors, users,
    /// routes, accepted domains, balancer listeners and backends, settings),
    /// without touching a node.
    Diff {
        /// The config in force.
        old: PathBuf,
        /// The config to compare with it.
        new: PathBuf,
    },
    /// Say which connector and which rule decide for a client.
    Explain {
        /// The cluster config file to ask.
        file: PathBuf,
        /// The client's IP address.
        #[arg(long)]
        client: IpAddr,
        /// The port the client connects to.
        #[arg(long)]
        port: u16,
        /// The node address the client connects to (default: any).
        #[arg(long)]
        local: Option<IpAddr>,
        /// The session has completed STARTTLS.
        #[arg(long)]
        tls: bool,
        /// The session authenticated as this user.
        #[arg(long)]
        user: Option<String>,
    },
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCommand::Check { file } => match ClusterConfig::load(&file) {
            Ok(c) => {
                // The checks a node runs before applying: TLS material for
                // the worker, the [balancer] section for a balancer.
                let mut errors = Vec::new();
                // Valid, but a cluster that cannot relay: most likely an
                // empty or cut-short file (a reload refuses such a change).
                if c.connectors.is_empty() {
                    errors.push("no [[connectors]]: a worker would accept no mail".to_string());
                }
                if c.routes.is_empty() {
                    errors.push(
                        "no [[routes]]: accepted mail would be delivered nowhere".to_string(),
                    );
                }
                errors.extend(ferry_worker::Worker::prepare(&c).err().unwrap_or_default());
                if c.balancer.is_some() {
                    errors.extend(
                        ferry_balancer::Balancer::prepare(&c)
                            .err()
                            .unwrap_or_default(),
                    );
                }
                if !errors.is_empty() {
                    eprintln!(
                        "{} error{} in {}",
                        errors.len(),
                        if errors.len() == 1 { "" } else { "s" },
                        file.display()
                    );
                    for e in errors {
                        eprintln!("  {e}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
                let balancer = c.balancer.as_ref().map_or(String::new(), |b| {
                    format!(
                        "; balancer: {} listeners, {} backends",
                        b.listeners.len(),
                        b.backends.len()
                    )
                });
                println!(
                    "{}: ok ({} connectors on ports {:?}, {} accepted domains, {} users, {} routes{balancer})",
                    file.display(),
                    c.connectors.len(),
                    c.ports(),
                    c.accepted_domains.len(),
                    c.users.len(),
                    c.routes.len(),
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        ConfigCommand::Diff { old, new } => {
            let (old, new) = match (ClusterConfig::load(&old), ClusterConfig::load(&new)) {
                (Ok(o), Ok(n)) => (o, n),
                (o, n) => {
                    for e in [o.err(), n.err()].into_iter().flatten() {
                        eprintln!("{e}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            };
            let changes = ferry_config::diff::changes(&old, &new);
            if changes.is_empty() {
                println!("no change");
            }
            for c in changes {
                println!("{c}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Explain {
            file,
            client,
            port,
            local,
            tls,
            user,
        } => {
            let config = match ClusterConfig::load(&file) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let q = Question {
                client,
                port,
                local,
                tls,
                user,
            };
            print!("{}", explain(&config, &q));
            Ok(ExitCode::SUCCESS)
        }
    }
}
