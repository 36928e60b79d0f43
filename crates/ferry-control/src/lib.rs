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
//! - `etcd_store` (feature `etcd`, which needs a system `protoc` to
//!   build): the store on an etcd cluster, for several replicas.
//!
//! The data-plane crates never see gRPC: a node's subscriber hands each
//! snapshot to the role's `apply` and reports the result. No SMTP here.
#![forbid(unsafe_code)]

#[cfg(feature = "etcd")]
pub mod etcd_store;
pub mod identity;
pub mod store;

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
