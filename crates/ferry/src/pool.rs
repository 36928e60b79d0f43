//! A balancer fed by the control plane balances over two lists: the
//! config's static `[[balancer.backends]]` and the control plane's worker
//! pool (`WatchPool`), the workers in rotation there, each named by its
//! node ID at its SMTP address, on every listener's backend port.
//!
//! [`Pooled`] is the balancer's role as the control-plane glue sees it:
//! its `apply` takes the config's snapshot, adds the pool's workers and
//! applies the result with the balancer's own `apply`; a new pool is
//! applied the same way on top of the config in service. So the balancer
//! crate knows nothing of gRPC, and a worker that joins waits for `rise`
//! good probes while one that leaves gets no new session (its open ones
//! finish), as for any backend a reload adds or removes. One lock makes
//! config and pool applies one at a time, each on the newest of the other.
//!
//! Each pool put in service is kept in the data directory
//! ([`crate::last_pool`]); a balancer that starts before the control plane
//! sends a pool serves the workers of that copy, so a restart during a
//! control-plane outage does not leave it without workers.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_balancer::Balancer;
use ferry_config::{Backend, BalancerConfig, ClusterConfig};
use ferry_control::proto::Pool;
use ferry_node::{ApplyError, Reconciled, Role, Snapshot};

/// What the pool puts in service: its workers in rotation, and those it
/// lists out of rotation (drained, behind, gone), which leave even when
/// the config also lists them as static backends.
#[derive(Debug, Clone, Default, PartialEq)]
struct InService {
    members: Vec<Backend>,
    out: Vec<Backend>,
}

impl InService {
    fn of(pool: &Pool, had: &[Backend]) -> Self {
        Self {
            members: members(pool, had),
            out: out_of_rotation(pool),
        }
    }
}

/// The balancer with the pool's workers added to its config.
pub struct Pooled {
    pub balancer: Arc<Balancer>,
    /// The config's snapshot in service, without the pool's workers.
    base: Mutex<Arc<Snapshot<BalancerConfig>>>,
    /// The pool's workers in service and those it lists out of
    /// rotation; the lock is held across each apply.
    members: tokio::sync::Mutex<InService>,
    /// The data directory, where the pool in service is kept.
    data: PathBuf,
}

impl Pooled {
    /// A balancer on `listen` serving `first` with the workers of `pool`
    /// (if one came already), else those of the copy kept in `data`: the
    /// first apply binds the listeners and counts every worker up at once.
    /// Returns the bound addresses.
    ///
    /// # Errors
    /// When the first apply fails (a port cannot be bound).
    pub async fn start(
        first: Snapshot<BalancerConfig>,
        listen: IpAddr,
        pool: Option<&Pool>,
        data: &Path,
    ) -> anyhow::Result<(Arc<Self>, Vec<std::net::SocketAddr>)> {
        let first = Arc::new(first);
        let dir = data.to_path_buf();
        let kept = tokio::task::spawn_blocking(move || crate::last_pool::load(&dir))
            .await
            .unwrap_or_default();
        let members = match pool {
            Some(p) => InService::of(p, &kept),
            None => {
                if !kept.is_empty() {
                    let names: Vec<&str> = kept.iter().map(|b| b.name.as_str()).collect();
                    tracing::info!(workers = ?names, "no pool from the control plane yet; serving the last pool kept");
                }
                InService {
                    members: kept,
                    out: Vec::new(),
                }
            }
        };
        let composed = compose(&first, &members);
        let balancer = Balancer::new(Arc::clone(&composed), listen);
        let bound = balancer.apply(composed).await?.added;
        let pooled = Arc::new(Self {
            balancer,
            base: Mutex::new(first),
            members: tokio::sync::Mutex::new(members),
            data: data.to_path_buf(),
        });
        if pool.is_some() {
            pooled.keep(&pooled.members.lock().await.members).await;
        }
        Ok((pooled, bound))
    }

    /// Puts a new pool in service: the workers in rotation there, plus,
    /// while the pool is incomplete (its control plane just started), the
    /// ones it does not list yet. A pool that changes nothing applies
    /// nothing.
    pub async fn set_pool(&self, pool: &Pool) {
        let mut current = self.members.lock().await;
        let next = InService::of(pool, &current.members);
        if next == *current {
            return;
        }
        let names = |m: &InService| m.members.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
        let base = Arc::clone(&self.base());
        match self.balancer.apply(compose(&base, &next)).await {
            Ok(_) => {
                tracing::info!(
                    workers = ?names(&next),
                    before = ?names(&current),
                    complete = pool.complete,
                    "the control plane's worker pool changed"
                );
                *current = next;
                self.keep(&current.members).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot put the control plane's worker pool in service")
            }
        }
    }

    /// Keeps `members` in the data directory for the next start (called
    /// with the members' lock held, so copies are written in order).
    async fn keep(&self, members: &[Backend]) {
        let dir = self.data.clone();
        let members = members.to_vec();
        let _ = tokio::task::spawn_blocking(move || crate::last_pool::store(&dir, &members)).await;
    }

    fn base(&self) -> Arc<Snapshot<BalancerConfig>> {
        Arc::clone(&self.base.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Role for Pooled {
    type Material = BalancerConfig;

    fn prepare(config: &ClusterConfig) -> Result<BalancerConfig, Vec<String>> {
        Balancer::prepare(config)
    }

    /// The config's snapshot, without the pool's workers: what the node
    /// serves of the control plane's config.
    fn current(&self) -> Arc<Snapshot<BalancerConfig>> {
        self.base()
    }

    async fn apply(
        &self,
        snapshot: Arc<Snapshot<BalancerConfig>>,
    ) -> Result<Reconciled, ApplyError> {
        let members = self.members.lock().await;
        let done = self.balancer.apply(compose(&snapshot, &members)).await?;
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
        Ok(done)
    }
}

/// The workers of `pool` to balance over, by name; `had` is the list in
/// service, kept for workers an incomplete pool does not list.
fn members(pool: &Pool, had: &[Backend]) -> Vec<Backend> {
    let mut out: Vec<Backend> = pool
        .members
        .iter()
        .filter(|m| m.in_rotation)
        .filter_map(|m| match address(&m.smtp_address) {
            Some(address) => Some(Backend {
                name: m.node_id.clone(),
                address,
                weight: 1,
            }),
            None => {
                tracing::warn!(node = %m.node_id, address = %m.smtp_address, "a pool worker without a usable SMTP address is left out");
                None
            }
        })
        .collect();
    if !pool.complete {
        let listed = |b: &Backend| pool.members.iter().any(|m| m.node_id == b.name);
        out.extend(had.iter().filter(|b| !listed(b)).cloned());
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The workers `pool` lists out of rotation (drained, behind, gone), by
/// name and address.
fn out_of_rotation(pool: &Pool) -> Vec<Backend> {
    pool.members
        .iter()
        .filter(|m| !m.in_rotation)
        .filter_map(|m| {
            Some(Backend {
                name: m.node_id.clone(),
                address: address(&m.smtp_address)?,
                weight: 1,
            })
        })
        .collect()
}

/// A worker's SMTP address as it subscribed: an IP address (with a port,
/// which is ignored: each listener names its backend port). An
/// unspecified address cannot be dialled.
fn address(text: &str) -> Option<IpAddr> {
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))?;
    (!ip.is_unspecified()).then_some(ip.to_canonical())
}

/// `base` with the pool's workers added after its static backends. A
/// static backend the pool lists out of rotation (by name or address)
/// leaves: a drain or a lagging worker applies to every balancer, static
/// list or not. A member whose name or address a static backend has
/// already is left out (the config's entry wins), as is one of another IP
/// family than the balancer's `source`.
fn compose(
    base: &Arc<Snapshot<BalancerConfig>>,
    pool: &InService,
) -> Arc<Snapshot<BalancerConfig>> {
    if pool.members.is_empty() && pool.out.is_empty() {
        return Arc::clone(base);
    }
    let mut material = base.material.clone();
    let out = |b: &Backend| {
        pool.out
            .iter()
            .any(|o| o.name == b.name || o.address == b.address)
    };
    material.backends.retain(|b| !out(b));
    for m in &pool.members {
        let taken = material
            .backends
            .iter()
            .any(|b| b.name == m.name || b.address == m.address);
        let family = material
            .source
            .is_none_or(|s| s.is_ipv4() == m.address.is_ipv4());
        match (taken, family) {
            (false, true) => material.backends.push(m.clone()),
            (true, _) => {
                tracing::debug!(worker = %m.name, "a pool worker the config lists already")
            }
            (false, false) => {
                tracing::warn!(worker = %m.name, address = %m.address, "a pool worker of another IP family than the balancer's source is left out")
            }
        }
    }
    Arc::new(Snapshot {
        version: base.version,
        sha256: base.sha256.clone(),
        source: base.source.clone(),
        loaded_at: base.loaded_at,
        config: Arc::clone(&base.config),
        material,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_control::proto::PoolMember;

    fn member(id: &str, address: &str, in_rotation: bool) -> PoolMember {
        PoolMember {
            node_id: id.into(),
            smtp_address: address.into(),
            in_rotation,
            out_reason: String::new(),
        }
    }

    fn names(backends: &[Backend]) -> Vec<&str> {
        backends.iter().map(|b| b.name.as_str()).collect()
    }

    /// The demo's workers are static backends and pool members at once:
    /// a drain (or a worker left behind) must take them out all the same.
    #[test]
    fn a_static_backend_the_pool_lists_out_of_rotation_leaves() {
        const EXAMPLE: &str = include_str!("../../../deploy/examples/ferry.toml");
        let config = ClusterConfig::parse("ferry.toml", EXAMPLE, Path::new(".")).unwrap();
        let material = Balancer::prepare(&config).unwrap();
        let statics: Vec<(String, IpAddr)> = material
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.address))
            .collect();
        assert!(statics.len() >= 2, "{statics:?}");
        let base = Arc::new(Snapshot {
            version: 1,
            sha256: String::new(),
            source: ferry_node::Source::File("ferry.toml".into()),
            loaded_at: std::time::SystemTime::now(),
            config: Arc::new(config),
            material,
        });
        let (drained, address) = &statics[0];
        let pool = Pool {
            members: vec![member(drained, &address.to_string(), false)],
            complete: true,
            current_version: 1,
        };
        let composed = compose(&base, &InService::of(&pool, &[]));
        let left: Vec<&str> = names(&composed.material.backends);
        assert!(!left.contains(&drained.as_str()), "{left:?}");
        assert_eq!(left.len(), statics.len() - 1, "{left:?}");
        // Back in rotation: the static entry serves again.
        let undrained = Pool {
            members: vec![member(drained, &address.to_string(), true)],
            ..pool
        };
        let composed = compose(&base, &InService::of(&undrained, &[]));
        assert_eq!(composed.material.backends.len(), statics.len());
    }

    #[test]
    fn members_in_rotation_join_and_an_incomplete_pool_drops_no_unlisted_one() {
        let pool = Pool {
            members: vec![
                member("w2", "127.0.0.12", true),
                member("w1", "127.0.0.11:2525", true),
                member("w3", "127.0.0.13", false),
                member("w4", "0.0.0.0", true),
            ],
            complete: true,
            current_version: 1,
        };
        let had = members(&pool, &[]);
        assert_eq!(names(&had), ["w1", "w2"]);
        assert_eq!(had[0].address, "127.0.0.11".parse::<IpAddr>().unwrap());
        // Right after a control-plane restart: w1 not heard of yet stays;
        // w2, listed out of rotation, leaves.
        let restarted = Pool {
            members: vec![member("w2", "127.0.0.12", false)],
            complete: false,
            current_version: 1,
        };
        assert_eq!(names(&members(&restarted, &had)), ["w1"]);
        let complete = Pool {
            complete: true,
            ..restarted
        };
        assert!(members(&complete, &had).is_empty());
    }
}
