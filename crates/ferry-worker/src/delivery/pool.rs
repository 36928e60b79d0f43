//! Reuse of SMTP sessions with next hops: a session that finished a
//! transaction cleanly waits here a few seconds for the next message to the
//! same hop, which then skips connect, greeting, EHLO, STARTTLS and AUTH.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_config::NextHop;

use super::client::{self, HopError, HopSettings, RecipientOutcome, Session, Transaction};

/// How long an idle session is kept.
const IDLE_FOR: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct SessionPool {
    idle: Mutex<HashMap<String, Vec<(Instant, Session)>>>,
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
        list.retain(|(since, _)| since.elapsed() < IDLE_FOR);
        if list.len() < max_idle {
            list.push((Instant::now(), session));
        }
    }

    /// Sends `tx` to `hop`, on an idle session if there is one.
    pub async fn deliver(
        &self,
        hop: &NextHop,
        settings: &HopSettings<'_>,
        max_idle: usize,
        tx: &Transaction<'_>,
    ) -> Result<Vec<RecipientOutcome>, HopError> {
        let key = format!(
            "{hop}|{:?}|{}|{}",
            settings.tls,
            settings.verify_certificates,
            settings.auth.map_or("", |(user, _)| user.as_str())
        );
        if let Some(mut session) = self.take(&key) {
            match session.send(tx).await {
                Ok(outcomes) => {
                    self.put(key, session, max_idle);
                    return Ok(outcomes);
                }
                // A real answer from the hop stands.
                Err(e @ HopError::Refused { .. }) => return Err(e),
                // The idle session went stale: try a fresh one.
                Err(_) => {}
            }
        }
        let mut session = client::open(hop, settings).await?;
        let result = session.send(tx).await;
        if result.is_ok() {
            self.put(key, session, max_idle);
        } else {
            session.quit().await;
        }
        result
    }
}
