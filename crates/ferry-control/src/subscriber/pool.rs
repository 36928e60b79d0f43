//! A balancer's second subscription: the worker pool (`WatchPool`), with
//! the same control planes, certificate, backoff and keepalive as the
//! config's Watch. Each pool goes into a `watch` channel: the balancer's
//! glue takes the newest, whatever it missed in between.

use std::sync::Arc;

use rand::SeedableRng as _;
use tokio::sync::watch;

use super::{describe_status, Backoff, Subscriber};
use crate::proto::config_discovery_client::ConfigDiscoveryClient;
use crate::proto::{Pool, WatchPoolRequest};

impl Subscriber {
    /// Watches the pool for the life of the process: each URL in turn,
    /// with backoff between attempts; each pool received replaces the one
    /// in `pools`. While no control plane answers, `pools` keeps the last
    /// one (the balancer keeps its workers). A control plane without a
    /// node registry (UNIMPLEMENTED) is logged once and tried again like
    /// an unreachable one.
    pub async fn watch_pool(self: Arc<Self>, pools: watch::Sender<Option<Pool>>) {
        let mut backoff = Backoff::default();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let urls = self.options.urls.clone();
        let mut logged = false;
        for url in urls.iter().cycle() {
            let (opened, why) = self.attempt_pool(url, &pools).await;
            match (opened, logged) {
                (true, _) => {
                    tracing::warn!(control_plane = %url, error = %why, "lost the pool stream; keeping the workers known");
                    backoff.reset();
                    logged = false;
                }
                (false, false) => {
                    tracing::warn!(control_plane = %url, error = %why, "cannot watch the worker pool; retrying with backoff");
                    logged = true;
                }
                (false, true) => {
                    tracing::debug!(control_plane = %url, error = %why, "cannot watch the worker pool");
                }
            }
            tokio::time::sleep(backoff.next_delay(&mut rng)).await;
        }
    }

    /// One connection and its pool stream, until it ends: whether the
    /// stream opened, and why it ended.
    async fn attempt_pool(&self, url: &str, pools: &watch::Sender<Option<Pool>>) -> (bool, String) {
        let channel = match self.connect(url).await {
            Ok(c) => c,
            Err(why) => return (false, why),
        };
        let mut client = ConfigDiscoveryClient::new(channel);
        let request = WatchPoolRequest {
            node_id: self.options.node_id.clone(),
        };
        let mut stream = match client.watch_pool(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return (false, describe_status(&status)),
        };
        tracing::info!(control_plane = url, "watching the worker pool");
        loop {
            match stream.message().await {
                Ok(Some(pool)) => {
                    pools.send_replace(Some(pool));
                }
                Ok(None) => return (true, "the control plane ended the stream".into()),
                Err(status) => return (true, describe_status(&status)),
            }
        }
    }
}
