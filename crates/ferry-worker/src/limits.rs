//! Connection caps per connector: in all, and per source IP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Counts {
    per_connector: HashMap<String, u32>,
    per_source: HashMap<(String, IpAddr), u32>,
}

/// Live connection counts.
#[derive(Clone, Default)]
pub(crate) struct ConnectionLimits {
    counts: Arc<Mutex<Counts>>,
}

/// Which cap a connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OverLimit {
    Connector,
    Source,
}

/// Holds one connection's place; gives it back when dropped.
pub(crate) struct Slot {
    counts: Arc<Mutex<Counts>>,
    connector: String,
    source: IpAddr,
}

impl ConnectionLimits {
    pub(crate) fn acquire(
        &self,
        connector: &str,
        source: IpAddr,
        max_total: u32,
        max_per_source: u32,
    ) -> Result<Slot, OverLimit> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let total = c.per_connector.get(connector).copied().unwrap_or(0);
        if total >= max_total {
            return Err(OverLimit::Connector);
        }
        let key = (connector.to_string(), source);
        let from_source = c.per_source.get(&key).copied().unwrap_or(0);
        if from_source >= max_per_source {
            return Err(OverLimit::Source);
        }
        *c.per_connector.entry(connector.to_string()).or_default() += 1;
        *c.per_source.entry(key).or_default() += 1;
        Ok(Slot {
            counts: Arc::clone(&self.counts),
            connector: connector.to_string(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.per_connector.get_mut(&self.connector) {
            *n = n.saturating_sub(1);
        }
        let key = (std::mem::take(&mut self.connector), self.source);
        if let Some(n) = c.per_source.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_source.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let l = ConnectionLimits::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.acquire("c", a, 3, 2).unwrap();
        let _s2 = l.acquire("c", a, 3, 2).unwrap();
        assert_eq!(l.acquire("c", a, 3, 2).err(), Some(OverLimit::Source));
        let _s3 = l.acquire("c", b, 3, 2).unwrap();
        assert_eq!(l.acquire("c", b, 3, 2).err(), Some(OverLimit::Connector));
        drop(s1);
        assert!(l.acquire("c", a, 3, 2).is_ok());
    }
}
