//! The ports a node listens on, reconciled with each snapshot: ports that
//! appear are bound, ports that disappear stop accepting while their open
//! sessions finish (Envoy's listener drain on update is the model).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a listener does with each accepted connection: gets the stream,
/// the client's address and the configured port it came in on. It should
/// take the snapshot the session will serve with (the one in service
/// now), spawn the session on the node's tracker and return at once.
pub type OnAccept = Arc<dyn Fn(TcpStream, SocketAddr, u16) + Send + Sync>;

/// A port that could not be bound; the apply that wanted it changed
/// nothing.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// What one reconcile changed, by bound address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

struct Open {
    local: SocketAddr,
    stop: CancellationToken,
    /// The accept loop; it has ended (and taken no more connections) once
    /// this resolves after `stop`.
    accepting: JoinHandle<()>,
}

impl Open {
    /// Stops accepting and waits until the accept loop has ended.
    async fn close(self) -> SocketAddr {
        self.stop.cancel();
        let _ = self.accepting.await;
        self.local
    }
}

/// The node's listening sockets, keyed by configured port (port 0 binds
/// an ephemeral port once and keeps it across applies).
pub struct ListenerSet {
    listen: IpAddr,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Held across a whole reconcile, so two applies never interleave.
    /// Usually one listener a port; more when a caller adopts listeners
    /// on several addresses for one configured port.
    open: tokio::sync::Mutex<BTreeMap<u16, Vec<Open>>>,
}

impl ListenerSet {
    /// Listeners on the node address `listen`; accept loops run on
    /// `tracker` and end when `shutdown` is cancelled.
    pub fn new(listen: IpAddr, tracker: TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            listen,
            tracker,
            shutdown,
            open: tokio::sync::Mutex::default(),
        }
    }

    /// Makes the open ports equal `wanted`. Binds every new port first; if
    /// one cannot be bound, drops what this call bound and returns the
    /// error with nothing changed (`swap` not called). Otherwise stops
    /// accepting on the ports no longer wanted and waits for their accept
    /// loops to end (so every connection they took was handed over before
    /// the swap, under the old snapshot: the accept callback should take
    /// the snapshot it serves with there and then); sessions already
    /// accepted run on. Then calls `swap` (where the caller puts its new
    /// snapshot in service) and only then accepts on the new ports, so
    /// their first connection already sees it.
    ///
    /// # Errors
    /// [`ListenError`] for the first port that cannot be bound.
    pub async fn reconcile(
        &self,
        wanted: &[u16],
        swap: impl FnOnce(),
        on_accept: OnAccept,
    ) -> Result<Reconciled, ListenError> {
        let mut open = self.open.lock().await;
        let mut bound = Vec::new();
        for &port in wanted {
            if open.contains_key(&port) || bound.iter().any(|(p, _)| *p == port) {
                continue;
            }
            let addr = SocketAddr::new(self.listen, port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ListenError { addr, source })?;
            bound.push((port, listener));
        }
        let mut done = Reconciled::default();
        let removed: Vec<u16> = open
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for port in removed {
            for o in open.remove(&port).unwrap_or_default() {
                done.removed.push(o.close().await);
            }
        }
        swap();
        for (port, listener) in bound {
            let o = self.accept(port, listener, Arc::clone(&on_accept));
            done.added.push(o.local);
            open.entry(port).or_default().push(o);
        }
        Ok(done)
    }

    fn accept(&self, port: u16, listener: TcpListener, on_accept: OnAccept) -> Open {
        let local = listener
            .local_addr()
            .unwrap_or(SocketAddr::new(self.listen, port));
        let stop = self.shutdown.child_token();
        let accepting = self
            .tracker
            .spawn(accept_loop(listener, port, stop.clone(), on_accept));
        Open {
            local,
            stop,
            accepting,
        }
    }

    /// Accepts on `listener`, bound by the caller (a test binds port 0, or
    /// an address other than the node's), as the configured port `port`;
    /// a later reconcile keeps it while `port` is wanted and stops it when
    /// not. Several listeners (on other addresses) may share a `port`.
    pub async fn adopt(&self, port: u16, listener: TcpListener, on_accept: OnAccept) {
        let o = self.accept(port, listener, on_accept);
        self.open.lock().await.entry(port).or_default().push(o);
    }

    /// The bound addresses, in port order.
    pub async fn addresses(&self) -> Vec<SocketAddr> {
        let open = self.open.lock().await;
        open.values().flatten().map(|o| o.local).collect()
    }
}

async fn accept_loop(listener: TcpListener, port: u16, stop: CancellationToken, on: OnAccept) {
    loop {
        // Stop first: once stopped, no connection more is taken.
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                on(stream, peer, port);
            }
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, port, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    fn greeter(count: Arc<AtomicUsize>) -> OnAccept {
        Arc::new(move |mut s: TcpStream, _, port| {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = s.write_all(format!("{port}\n").as_bytes()).await;
            });
        })
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn adds_removes_and_refuses_a_taken_port_whole() {
        let set = ListenerSet::new(
            "127.0.0.1".parse().unwrap(),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let count = Arc::new(AtomicUsize::new(0));
        let (a, b) = (free_port(), free_port());
        let mut swaps = 0;
        let r = set
            .reconcile(&[a], || swaps += 1, greeter(Arc::clone(&count)))
            .await
            .unwrap();
        assert_eq!(r.added.len(), 1);
        assert!(TcpStream::connect(("127.0.0.1", a)).await.is_ok());

        // A port another process holds fails the whole apply: a stays, b is
        // not bound, swap is not called.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = taken.local_addr().unwrap().port();
        let err = set
            .reconcile(&[a, b, t], || swaps += 1, greeter(Arc::clone(&count)))
            .await
            .unwrap_err();
        assert_eq!(err.addr.port(), t);
        assert_eq!(swaps, 1);
        assert_eq!(set.addresses().await.len(), 1);
        assert!(std::net::TcpListener::bind(("127.0.0.1", b)).is_ok());

        // Replace a by b: b accepts, a refuses.
        let r = set
            .reconcile(&[b], || swaps += 1, greeter(Arc::clone(&count)))
            .await
            .unwrap();
        assert_eq!((r.added.len(), r.removed.len(), swaps), (1, 1, 2));
        assert!(TcpStream::connect(("127.0.0.1", b)).await.is_ok());
        // Closed by the time reconcile returns: its accept loop has ended,
        // so nothing accepted on it can meet the new snapshot.
        assert!(TcpStream::connect(("127.0.0.1", a)).await.is_err());
    }

    #[tokio::test]
    async fn adopted_listeners_on_two_addresses_share_a_port() {
        let set = ListenerSet::new(
            "127.0.0.1".parse().unwrap(),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let count = Arc::new(AtomicUsize::new(0));
        let v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        let other = TcpListener::bind(("127.0.0.3", port)).await.unwrap();
        set.adopt(port, v4, greeter(Arc::clone(&count))).await;
        set.adopt(port, other, greeter(Arc::clone(&count))).await;
        assert_eq!(set.addresses().await.len(), 2);
        assert!(TcpStream::connect(("127.0.0.1", port)).await.is_ok());
        assert!(TcpStream::connect(("127.0.0.3", port)).await.is_ok());
        // A snapshot without the port closes both.
        let r = set
            .reconcile(&[], || {}, greeter(Arc::clone(&count)))
            .await
            .unwrap();
        assert_eq!(r.removed.len(), 2);
        assert!(TcpStream::connect(("127.0.0.3", port)).await.is_err());
    }
}
