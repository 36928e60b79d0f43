//! `ferry cert`: the cluster CA and the certificates of the control
//! plane, its nodes and its admins. Keys are written mode 0600, and no
//! file is ever overwritten (a CA replaced by mistake would cut off every
//! node).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Subcommand};
use ferry_control::identity::{CertificateAuthority, Identity};

/// What `ferry cert` does.
#[derive(Subcommand)]
pub enum CertCommand {
    /// Make a cluster CA: DIR/ca.crt (what every party trusts) and
    /// DIR/ca.key (keep it offline; it signs every certificate)
    Ca {
        /// The directory to write ca.crt and ca.key in (created if
        /// needed; existing files are not overwritten)
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a certificate and key signed by the cluster CA: OUT/NAME.crt
    /// and OUT/NAME.key
    #[command(group(ArgGroup::new("identity").required(true).args(["admin", "node", "control"])))]
    Issue {
        /// The CA's directory (as `ferry cert ca --out` made it)
        #[arg(long)]
        ca: PathBuf,
        /// An admin certificate: may apply configs (`ferry ctl`); NAME is
        /// recorded as the author
        #[arg(long, value_name = "NAME")]
        admin: Option<String>,
        /// A node certificate: may subscribe as node ID only
        #[arg(long, value_name = "ID")]
        node: Option<String>,
        /// A control-plane server certificate, for the --host names
        /// nodes and admins dial (default: localhost, 127.0.0.1, ::1)
        #[arg(long, value_name = "NAME")]
        control: Option<String>,
        /// A DNS name or IP address the certificate is valid for
        /// (repeat for several)
        #[arg(long = "host", value_name = "H")]
        hosts: Vec<String>,
        /// The directory to write NAME.crt and NAME.key in (created if
        /// needed; existing files are not overwritten)
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs one `ferry cert` command.
pub fn run(command: CertCommand) -> anyhow::Result<ExitCode> {
    match command {
        CertCommand::Ca { out } => {
            let (_, issued) = CertificateAuthority::generate("Ferry Cluster CA")?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let (cert, key) = (out.join("ca.crt"), out.join("ca.key"));
            refuse_existing(&[&cert, &key])?;
            write_new(&cert, &issued.cert_pem, 0o644)?;
            write_new(&key, &issued.key_pem, 0o600)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(ExitCode::SUCCESS)
        }
        CertCommand::Issue {
            ca,
            admin,
            node,
            control,
            mut hosts,
            out,
        } => {
            let identity = match (admin, node, control) {
                (Some(name), _, _) => Identity::Admin(name),
                (_, Some(id), _) => Identity::Node(id),
                (_, _, Some(name)) => Identity::Control(name),
                // clap's group makes one of them required.
                _ => anyhow::bail!("say --admin NAME, --node ID or --control NAME"),
            };
            let name = Identity::from_uri(&identity.uri())?;
            let file_name = match &name {
                Identity::Admin(n) | Identity::Node(n) | Identity::Control(n) => n.clone(),
            };
            if matches!(identity, Identity::Control(_)) && hosts.is_empty() {
                hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            let read = |p: PathBuf| {
                std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
            };
            let authority =
                CertificateAuthority::load(&read(ca.join("ca.crt"))?, &read(ca.join("ca.key"))?)
                    .with_context(|| format!("the CA in {}", ca.display()))?;
            let issued = authority.issue(&identity, &hosts)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let cert = out.join(format!("{file_name}.crt"));
            let key = out.join(format!("{file_name}.key"));
            refuse_existing(&[&cert, &key])?;
            write_new(&cert, &issued.cert_pem, 0o644)?;
            write_new(&key, &issued.key_pem, 0o600)?;
            println!(
                "wrote {} and {} for {identity} ({})",
                cert.display(),
                key.display(),
                identity.uri()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    for path in paths {
        if path.exists() {
            anyhow::bail!("{} exists; not overwriting it", path.display());
        }
    }
    Ok(())
}

/// Writes a new file (never an existing one) with `mode`, synced.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_ca_and_certificates_with_private_keys_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        run(CertCommand::Ca { out: ca.clone() }).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join("ca.key")), 0o600);
        let before = std::fs::read(ca.join("ca.key")).unwrap();
        assert!(run(CertCommand::Ca { out: ca.clone() }).is_err());
        assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), before);

        let issue = |node: &str| CertCommand::Issue {
            ca: ca.clone(),
            admin: None,
            node: Some(node.into()),
            control: None,
            hosts: Vec::new(),
            out: dir.path().join("pki"),
        };
        run(issue("worker-1")).unwrap();
        assert_eq!(mode(&dir.path().join("pki/worker-1.key")), 0o600);
        assert!(dir.path().join("pki/worker-1.crt").exists());
        assert!(run(issue("worker-1")).is_err());
        let bad = run(issue("../x")).unwrap_err().to_string();
        assert!(bad.contains("not a valid name"), "{bad}");
    }
}
