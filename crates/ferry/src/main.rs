//! `ferry`: the one binary of a Ferry cluster. Each role is a subcommand;
//! the logic lives in the library crates, this crate only wires it up.
#![forbid(unsafe_code)]

mod balancer;
mod cert;
mod config_cmd;
mod control;
mod controlled;
mod ctl;
mod demo_certs;
mod last_pool;
mod node;
mod pool;
mod queue;
mod send;
mod token;
mod up;
mod user;
mod worker;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// jemalloc rather than the system's malloc: an idle session costs a third
/// of the memory, and its background thread hands freed memory back to the
/// system within seconds of a spike (glibc kept all of it, mimalloc most of
/// it). Figures: `bench/idle.sh`, README "Memory".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a highly available SMTP relay for devices and applications"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a demo cluster on loopback: a control plane, then two workers
    /// and a balancer configured through it, with the example config.
    Up {
        /// Where the demo keeps its config, certificates (DATA/pki for the
        /// control plane), the control plane's history, spools and logs
        /// (each node's output goes to DATA/logs/NAME.log).
        #[arg(long, default_value = "ferry-data")]
        data: PathBuf,
        /// Run this cluster config instead of the example (copied into
        /// DATA; its [[balancer.backends]] are the workers started).
        #[arg(long, hide = true)]
        config: Option<PathBuf>,
        /// The balancer's address.
        #[arg(long, hide = true, default_value = "127.0.0.1")]
        listen: IpAddr,
    },
    /// Run a relay worker.
    Worker {
        #[command(flatten)]
        source: controlled::SourceFlags,
        /// The address every connector port is bound on.
        #[arg(long)]
        listen: IpAddr,
        /// Spool, logs and state.
        #[arg(long)]
        data: PathBuf,
        /// The admin HTTP endpoint (/metrics, /livez, /readyz); port 0 picks one.
        #[arg(long)]
        admin: SocketAddr,
        /// Our name in SMTP replies and Received headers.
        #[arg(long)]
        hostname: Option<String>,
        /// A file holding the bearer token for admin operations (the
        /// queue); without it they are off.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
    },
    /// Run a balancer in front of the workers (the config's [balancer]).
    Balancer {
        #[command(flatten)]
        source: controlled::SourceFlags,
        /// The address every balancer listener is bound on.
        #[arg(long)]
        listen: IpAddr,
        /// The admin HTTP endpoint (/metrics, /readyz, /backends); port 0 picks one.
        #[arg(long)]
        admin: SocketAddr,
        /// A file holding the bearer token for admin operations (backends,
        /// drain); without it they are off.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// With --control: where the last-good copy of the config is kept.
        #[arg(long, required_unless_present = "config")]
        data: Option<PathBuf>,
    },
    /// Validate or explain a cluster config.
    Config {
        #[command(subcommand)]
        command: config_cmd::ConfigCommand,
    },
    /// Look at and act on a worker's queue, through its admin endpoint.
    Queue {
        /// The worker's admin address (as `ferry worker` printed it).
        #[arg(long)]
        admin: String,
        /// The file with the worker's admin token (`--admin-token-file`).
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        command: queue::QueueCommand,
    },
    /// Device credentials.
    User {
        #[command(subcommand)]
        command: user::UserCommand,
    },
    /// Run the control plane: one versioned cluster config, applied with
    /// `ferry ctl` and pushed to every subscribed node (gRPC, mTLS).
    Control {
        /// The gRPC address (mTLS) nodes and admins dial; port 0 picks one.
        #[arg(long)]
        listen: SocketAddr,
        /// Where the config history lives: file:DIR (one replica) or
        /// etcd:URL[,URL…] (several replicas; needs a build with --features etcd).
        #[arg(long)]
        store: control::StoreSpec,
        /// The cluster CA certificate (PEM): client certificates must chain to it.
        #[arg(long)]
        ca: PathBuf,
        /// This control plane's certificate (PEM; `ferry cert issue --role control`).
        #[arg(long)]
        cert: PathBuf,
        /// The certificate's private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// The admin HTTP endpoint (/metrics, /livez, /readyz); port 0 picks one.
        #[arg(long)]
        admin: SocketAddr,
        /// How long a worker may be disconnected, or behind the current
        /// version (a NACK, a lost stream), before the balancers take it
        /// out of rotation (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Talk to the control plane as an admin: apply, diff, history, get,
    /// rollback, nodes, drain, undrain.
    Ctl {
        /// The control plane's URLs (https://HOST:PORT), comma-separated,
        /// tried in turn.
        #[arg(long, value_delimiter = ',', required = true, value_name = "URL")]
        control: Vec<String>,
        /// The cluster CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Your admin certificate (PEM; `ferry cert issue --role admin`).
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Print the control plane's answer as JSON (one object), for
        /// scripts; errors stay on standard error, exit codes as without.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: ctl::CtlCommand,
    },
    /// Make the cluster CA and the certificates of control planes, nodes
    /// and admins.
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// Send one message through a relay, trying every address of its
    /// name (`ferry send --help` lists the options).
    #[command(disable_help_flag = true)]
    Send {
        /// The options of `ferry send` (see `ferry send --help`); parsed
        /// by it, so that a usage error exits with 4.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> std::process::ExitCode {
    up::exit_with_parent();
    let cli = Cli::parse();
    ferry_telemetry::init_logging(cli.log_json);
    let result = match cli.command {
        Command::Send { args } => return send::run(args),
        Command::Config { command } => config_cmd::run(command),
        Command::User { command } => user::run(command),
        Command::Cert { command } => cert::run(command),
        Command::Control {
            listen,
            store,
            ca,
            cert,
            key,
            admin,
            grace,
        } => runtime().and_then(|rt| {
            rt.block_on(control::run(control::Args {
                listen,
                store,
                ca,
                cert,
                key,
                admin,
                grace,
            }))
        }),
        Command::Ctl {
            control,
            ca,
            cert,
            key,
            json,
            command,
        } => runtime().map(|rt| {
            rt.block_on(ctl::run(
                ctl::Target {
                    urls: control,
                    ca,
                    cert,
                    key,
                    json,
                },
                command,
            ))
        }),
        Command::Queue {
            admin,
            token_file,
            command,
        } => queue::run(&admin, token_file.as_deref(), command),
        Command::Worker {
            source,
            listen,
            data,
            admin,
            hostname,
            admin_token_file,
        } => source.source().and_then(|source| {
            runtime()?.block_on(worker::run(worker::Args {
                source,
                listen,
                data,
                admin,
                hostname,
                admin_token_file,
            }))
        }),
        Command::Balancer {
            source,
            listen,
            admin,
            admin_token_file,
            data,
        } => source.source().and_then(|source| {
            runtime()?.block_on(balancer::run(balancer::Args {
                source,
                listen,
                admin,
                admin_token_file,
                data,
            }))
        }),
        // Polled on this thread, which outlives the children: the parent
        // death signal follows the thread that started them.
        Command::Up {
            data,
            config,
            listen,
        } => runtime().and_then(|rt| {
            rt.block_on(up::run(up::Args {
                data,
                config,
                listen,
                log_json: cli.log_json,
            }))
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// `ferry config check --help` once showed a bare `<FILE>`: every
    /// command and every argument says what it is.
    #[test]
    fn every_command_and_argument_has_help() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                missing.push(path.clone());
            }
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if arg.get_help().is_none() && !builtin && !arg.is_hide_set() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
