//! Sessions with next hops: at most `max_connections_per_hop` transactions
//! run towards one hop at a time, and a session that finished a transaction
//! cleanly waits here a few seconds for the next message to the same hop,
//! which then skips connect, greeting, EHLO, STARTTLS and AUTH.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_config::NextHop;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::client::{self, HopError, HopSettings, RecipientOutcome, Session, Transaction};

/// How long an idle session is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct SessionPool {
    idle: Mutex<HashMap<String, Vec<(Instant, Session)>>>,
    /// Transactions in progress per hop: the cap in force and its
    /// semaphore.
    busy: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

/// Where a session goes: a configured or MX next hop, and for MX the
/// address already resolved.
pub struct Target<'a> {
    pub hop: &'a NextHop,
    pub address: Option<IpAddr>,
}

impl Target<'_> {
    /// `host:port`, or `host[address]:port` for MX (as Postfix logs it).
    pub fn label(&self) -> String {
        match self.address {
            Some(ip) => format!("{}[{ip}]:{}", self.hop.host, self.hop.port),
            None => self.hop.to_string(),
        }
    }
}

impl SessionPool {
    fn take(&self, key: &str) -> Option<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        list.retain(|(since, _)| since.elapsed() < IDLE_FOR);
        list.pop().map(|(_, s)| s)
    }

    fn put(&self, key: String, session: Session, max_idle: usize) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < max_idle {
            list.push((Instant::now(), session));
        }
    }

    /// The semaphore of `hop` for a cap of `max`. A cap changed by a config
    /// reload gets a new semaphore for the next transactions (one per hop:
    /// the map does not grow with each change); those still running under
    /// the old cap finish under it.
    fn slots(&self, hop: &str, max: usize) -> Arc<Semaphore> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let entry = busy
            .entry(hop.to_string())
            .or_insert_with(|| (max, Arc::new(Semaphore::new(max.max(1)))));
        if entry.0 != max {
            *entry = (max, Arc::new(Semaphore::new(max.max(1))));
        }
        Arc::clone(&entry.1)
    }

    /// Closes (with QUIT) the sessions idle for longer than [`IDLE_FOR`].
    pub fn sweep(&self) {
        let mut stale = Vec::new();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            for list in idle.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|(since, _)| since.elapsed() >= IDLE_FOR);
                *list = fresh;
                stale.extend(old.into_iter().map(|(_, s)| s));
            }
            idle.retain(|_, list| !list.is_empty());
        }
        for session in stale {
            tokio::spawn(session.quit());
        }
    }

    /// Sends `tx` to `target`, on an idle session if there is one, waiting
    /// while `max_per_hop` transactions already run towards it. `Ok(None)`:
    /// `stop` came while waiting for the hop or connecting to it, before
    /// anything of the message was sent; once sending began, it finishes
    /// (stopping then could leave the hop with a copy we do not know of).
    pub async fn deliver(
        &self,
        target: &Target<'_>,
        settings: &HopSettings<'_>,
        max_per_hop: usize,
        tx: &Transaction<'_>,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<RecipientOutcome>>, HopError> {
        let hop_key = target.label();
        let slots = self.slots(&hop_key, max_per_hop);
        let _slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(None),
            slot = slots.acquire() => slot.ok(),
        };
        let key = settings.session_key(&hop_key);
        if let Some(mut session) = self.take(&key) {
            match session.send(tx).await {
                Ok(outcomes) => {
                    self.put(key, session, max_per_hop);
                    return Ok(Some(outcomes));
                }
                // A real answer from the hop stands.
                Err(e @ (HopError::Refused { .. } | HopError::Unsuitable { .. })) => return Err(e),
                // The idle session went stale: try a fresh one.
                Err(_) => {}
            }
        }
        let mut session = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(None),
            opened = client::open(target, settings) => opened?,
        };
        let result = session.send(tx).await;
        if result.is_ok() {
            self.put(key, session, max_per_hop);
        } else {
            session.quit().await;
        }
        result.map(Some)
    }
}
