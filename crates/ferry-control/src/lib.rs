//! The control plane: one versioned cluster config, applied by admins and
//! pushed over gRPC (mTLS) to every node.
//!
//! - [`proto`]: the types and service stubs generated from
//!   `proto/ferry/v1/control.proto` (built with protox: no system
//!   `protoc`).
//! - [`identity`]: the cluster CA, the certificates it issues and the
//!   identity (admin, node, control) each carries.
//! - [`store`]: where the history of snapshots and the node status live
//!   ([`store::Store`]); a file store for one replica, etcd for several.
//! - [`subscriber`]: the node side: Watch, apply through the node's
//!   [`subscriber::Applier`], keep a last-good copy, Report, reconnect.
//! - [`file_store`]: the embedded store, `file:DIR`.
//! - [`server`]: the gRPC services ([`server::ControlPlane`]) over any
//!   store, and the mTLS settings of the server and of its clients.
//! - `etcd_store` (feature `etcd`, which needs a system `protoc` to
//!   build): the store on an etcd cluster, for several replicas.
//!
//! The data-plane crates never see gRPC: a node's subscriber hands each
//! snapshot to the role's `apply` and reports the result. No SMTP here.
#![forbid(unsafe_code)]

#[cfg(feature = "etcd")]
pub mod etcd_store;
pub mod file_store;
pub mod identity;
pub mod server;
pub mod store;
pub mod subscriber;

/// The gRPC types and service stubs of `ferry.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("ferry.v1");
}

/// The largest config text the control plane stores, in octets: etcd
/// refuses requests over 1.5 MiB, and the snapshot's metadata and the
/// transaction need room beside the text.
pub const MAX_CONFIG_OCTETS: usize = 1024 * 1024;

/// How many versions a store keeps; older ones are dropped from the
/// history (their configs cannot be fetched or rolled back to).
pub const HISTORY_KEPT: usize = 100;

/// SHA-256 of `bytes`, lower-case hex: a snapshot's `sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}
