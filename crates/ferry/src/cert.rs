//! `ferry cert`: the cluster CA and the certificates of the control
//! plane, its nodes and its admins. Keys are written mode 0600, and no
//! file is ever overwritten (a CA replaced by mistake would cut off every
//! node).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use ferry_control::identity::{CertificateAuthority, Identity};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA key's file name in a CA directory.
pub const CA_KEY: &str = "ca.key";

/// What `ferry cert` does.
#[derive(Subcommand)]
pub enum CertCommand {
    /// Make a cluster CA: DIR/ca.crt (what every party trusts) and
    /// DIR/ca.key (mode 0600; keep it offline: it signs every
    /// certificate). Refuses to overwrite either
    Init {
        /// The directory to write ca.crt and ca.key in (created if needed)
        dir: PathBuf,
    },
    /// Issue a certificate and key signed by the cluster CA: OUT/NAME.crt
    /// and OUT/NAME.key (mode 0600). Refuses to overwrite either
    Issue {
        /// The CA's directory (as `ferry cert init DIR` made it)
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// What the certificate may do: node (subscribe as node NAME),
        /// admin (apply configs with `ferry ctl`; NAME is recorded as the
        /// author) or control (a control plane's server certificate)
        #[arg(long, value_enum)]
        role: CertRole,
        /// The node ID, admin name or control-plane name (1 to 64
        /// letters, digits, '.', '_' or '-')
        name: String,
        /// A DNS name or IP address the certificate is valid for (repeat
        /// for several; a control certificate without one is made for
        /// localhost, 127.0.0.1 and ::1)
        #[arg(long = "host", value_name = "H")]
        hosts: Vec<String>,
        /// The directory to write NAME.crt and NAME.key in (default: the
        /// CA's directory; created if needed)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// The role a certificate carries (`--role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CertRole {
    /// A node: may Watch and Report as its node ID.
    Node,
    /// An admin: may Apply, Rollback and read the history.
    Admin,
    /// A control-plane replica's server certificate.
    Control,
}

impl CertRole {
    /// The identity `name` gets in this role.
    pub fn identity(self, name: &str) -> Identity {
        match self {
            CertRole::Node => Identity::Node(name.to_string()),
            CertRole::Admin => Identity::Admin(name.to_string()),
            CertRole::Control => Identity::Control(name.to_string()),
        }
    }
}

/// Runs one `ferry cert` command.
pub fn run(command: CertCommand) -> anyhow::Result<ExitCode> {
    match command {
        CertCommand::Init { dir } => {
            let (cert, key) = init(&dir)?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
        CertCommand::Issue {
            ca,
            role,
            name,
            hosts,
            out,
        } => {
            let identity = role.identity(&name);
            let out = out.unwrap_or_else(|| ca.clone());
            let (cert, key) = issue(&ca, &identity, &hosts, &out)?;
            println!(
                "wrote {} and {} for {identity} ({})",
                cert.display(),
                key.display(),
                identity.uri()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes a cluster CA in `dir` (created if needed): `ca.crt` and
/// `ca.key` (0600). Returns their paths.
///
/// # Errors
/// Either file exists already (nothing is written), or it cannot be
/// written.
pub fn init(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert, &key])?;
    let (_, issued) = CertificateAuthority::generate("Ferry Cluster CA")?;
    write_new(&key, &issued.key_pem, 0o600)?;
    write_new(&cert, &issued.cert_pem, 0o644)?;
    Ok((cert, key))
}

/// Issues a certificate for `identity`, signed by the CA in `ca`, valid
/// for `hosts` (for a control certificate, by default localhost,
/// 127.0.0.1 and ::1), as `out/NAME.crt` and `out/NAME.key` (0600).
/// Returns their paths.
///
/// # Errors
/// A bad name or host, a CA that cannot be read, an existing file
/// (nothing is written), a file that cannot be written.
pub fn issue(
    ca: &Path,
    identity: &Identity,
    hosts: &[String],
    out: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    // The name becomes a file name: checked before it touches a path.
    let checked = Identity::from_uri(&identity.uri())?;
    let file_name = match &checked {
        Identity::Admin(n) | Identity::Node(n) | Identity::Control(n) => n.clone(),
    };
    let mut hosts = hosts.to_vec();
    if !matches!(identity, Identity::Control(_)) && !hosts.is_empty() {
        anyhow::bail!(
            "--host is for --role control: a node's or an admin's certificate is a client certificate and names no host"
        );
    }
    if matches!(identity, Identity::Control(_)) && hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    }
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    };
    let authority = CertificateAuthority::load(&read(ca.join(CA_CERT))?, &read(ca.join(CA_KEY))?)
        .with_context(|| format!("the CA in {}", ca.display()))?;
    let issued = authority.issue(identity, &hosts)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cert = out.join(format!("{file_name}.crt"));
    let key = out.join(format!("{file_name}.key"));
    refuse_existing(&[&cert, &key])?;
    write_new(&key, &issued.key_pem, 0o600)?;
    write_new(&cert, &issued.cert_pem, 0o644)?;
    Ok((cert, key))
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
        run(CertCommand::Init { dir: ca.clone() }).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join("ca.key")), 0o600);
        let before = std::fs::read(ca.join("ca.key")).unwrap();
        let again = run(CertCommand::Init { dir: ca.clone() }).unwrap_err();
        assert!(
            again.to_string().contains("exists; not overwriting"),
            "{again}"
        );
        assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), before);

        let issue = |role: CertRole, name: &str, out: Option<PathBuf>| CertCommand::Issue {
            ca: ca.clone(),
            role,
            name: name.into(),
            hosts: Vec::new(),
            out,
        };
        let pki = dir.path().join("pki");
        run(issue(CertRole::Node, "worker-1", Some(pki.clone()))).unwrap();
        assert_eq!(mode(&pki.join("worker-1.key")), 0o600);
        assert!(pki.join("worker-1.crt").exists());
        assert!(run(issue(CertRole::Node, "worker-1", Some(pki.clone()))).is_err());
        let bad = run(issue(CertRole::Node, "../x", Some(pki)))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("not a valid name"), "{bad}");

        // Without --out, beside the CA, carrying the role asked for.
        run(issue(CertRole::Admin, "alice", None)).unwrap();
        run(issue(CertRole::Control, "cp-1", None)).unwrap();
        for (name, identity) in [
            ("alice", Identity::Admin("alice".into())),
            ("cp-1", Identity::Control("cp-1".into())),
        ] {
            let pem = std::fs::read(ca.join(format!("{name}.crt"))).unwrap();
            let der = rustls_pemfile_der(&pem);
            assert_eq!(Identity::of_certificate(&der).unwrap(), identity);
        }
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem)
            .unwrap()
            .to_vec()
    }
}
