//! The demo cluster's control-plane certificates in `DATA/pki`, made with
//! `ferry cert`'s own code: the cluster CA, the control plane's server
//! certificate, an admin certificate for `ferry ctl`, one node
//! certificate per node. Made once and kept across restarts: a node's
//! identity does not change because the demo restarted.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_control::identity::Identity;

use crate::cert;

/// The control plane's certificate name (`control.crt`).
pub const CONTROL: &str = "control";
/// The admin certificate `ferry up` applies with and prints for `ferry ctl`.
pub const ADMIN: &str = "admin";
/// The names the control plane's certificate is valid for: where
/// `ferry up` runs it.
const CONTROL_HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

/// `DATA/pki`.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The cluster CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(cert::CA_CERT)
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The CA, the control plane's and the admin's certificates.
    ///
    /// # Errors
    /// A file that cannot be read or written.
    pub fn ensure_control(&self) -> anyhow::Result<()> {
        if !(self.dir.join(cert::CA_CERT).exists() && self.dir.join(cert::CA_KEY).exists()) {
            self.new_ca()?;
        }
        let hosts: Vec<String> = CONTROL_HOSTS.map(String::from).to_vec();
        self.ensure(&Identity::Control(CONTROL.into()), &hosts)?;
        self.ensure(&Identity::Admin(ADMIN.into()), &[])
    }

    /// A node certificate for each of `nodes` that has none yet.
    ///
    /// # Errors
    /// A name that is not a valid node ID, a file that cannot be written.
    pub fn ensure_nodes(&self, nodes: &[String]) -> anyhow::Result<()> {
        for node in nodes {
            self.ensure(&Identity::Node(node.clone()), &[])?;
        }
        Ok(())
    }

    /// A certificate for `identity`, unless one is there (both files).
    fn ensure(&self, identity: &Identity, hosts: &[String]) -> anyhow::Result<()> {
        let name = match identity {
            Identity::Admin(n) | Identity::Node(n) | Identity::Control(n) => n,
        };
        let (crt, key) = (self.cert(name), self.key(name));
        if crt.exists() && key.exists() {
            return Ok(());
        }
        // Half a pair (an interrupted run): made again whole.
        remove(&crt)?;
        remove(&key)?;
        cert::issue(&self.dir, identity, hosts, &self.dir)?;
        Ok(())
    }

    /// A new CA. Every certificate in the directory was signed by the one
    /// that is gone (or half there) and would be refused: all are removed,
    /// to be issued again by the new one.
    fn new_ca(&self) -> anyhow::Result<()> {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("crt" | "key")
                ) {
                    remove(&path)?;
                }
            }
        }
        cert::init(&self.dir)?;
        Ok(())
    }
}

fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn certificates_are_made_once_and_remade_with_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path().join("pki"));
        pki.ensure_control().unwrap();
        pki.ensure_nodes(&["worker-1".into(), "balancer".into()])
            .unwrap();
        let read = |p: PathBuf| std::fs::read(p).unwrap();
        let (ca, admin, node) = (
            read(pki.ca()),
            read(pki.cert(ADMIN)),
            read(pki.cert("worker-1")),
        );
        // Again: nothing changes.
        pki.ensure_control().unwrap();
        pki.ensure_nodes(&["worker-1".into()]).unwrap();
        assert_eq!(read(pki.ca()), ca);
        assert_eq!(read(pki.cert(ADMIN)), admin);
        assert_eq!(read(pki.cert("worker-1")), node);
        // A lost key: that pair is made again, the rest kept.
        std::fs::remove_file(pki.key("worker-1")).unwrap();
        pki.ensure_nodes(&["worker-1".into()]).unwrap();
        assert_ne!(read(pki.cert("worker-1")), node);
        assert_eq!(read(pki.cert(ADMIN)), admin);
        // A lost CA key: a new CA, and nothing the old one signed is left.
        std::fs::remove_file(dir.path().join("pki/ca.key")).unwrap();
        pki.ensure_control().unwrap();
        assert_ne!(read(pki.ca()), ca);
        assert_ne!(read(pki.cert(ADMIN)), admin);
        assert!(!pki.cert("balancer").exists());
        assert!(pki.ensure_nodes(&["no/such".into()]).is_err());
    }
}
