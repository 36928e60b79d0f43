//! The ports a node listens on, reconciled with each snapshot: ports that
//! appear are bound, ports that disappear stop accepting while their open
//! sessions finish (Envoy's listener drain on update is the model).
//!
//! Each port listens with the backlog its config asks for (tokio's
//! `TcpListener::bind` always uses 128), capped by the kernel's
//! `net.core.somaxconn`, with a log line when the cap bites. A new backlog
//! for a port already open is applied to its socket in place: on Linux
//! `listen(2)` on a listening socket sets its queue length, so the port is
//! never closed and no connection waiting in the queue is lost.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ferry_config::ListenPort;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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
    /// Ports kept whose listen queue took a new length.
    pub resized: Vec<SocketAddr>,
}

/// The kernel's cap on a listen queue, `None` where it cannot be read.
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The queue length to ask of `listen(2)` for `wanted` on `addr`: the
/// kernel silently caps it at `somaxconn`, so say so when it does.
fn queue_length(addr: SocketAddr, wanted: u32) -> u32 {
    match somaxconn() {
        Some(max) if wanted > max => {
            tracing::warn!(
                %addr,
                backlog = wanted,
                somaxconn = max,
                "backlog is more than the kernel's net.core.somaxconn: the listen queue holds {max}"
            );
            max
        }
        _ => wanted,
    }
}

/// Binds `addr` and listens with `backlog`; the address is reusable at
/// once after a restart, as with tokio's own `bind`.
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(queue_length(addr, backlog))
}

struct Open {
    local: SocketAddr,
    /// The accept loop owns the socket (it closes when the loop ends, at
    /// shutdown too); this reaches it to set a new backlog.
    listener: Weak<TcpListener>,
    /// The backlog it listens with; `None` for an adopted listener, bound
    /// by someone else.
    backlog: Option<u32>,
    stop: CancellationToken,
    /// The accept loop; it has ended (and taken no more connections) once
    /// this resolves after `stop`.
    accepting: JoinHandle<()>,
}

impl Open {
    /// Stops accepting and waits until the accept loop has ended; the
    /// socket closes as this returns.
    async fn close(self) -> SocketAddr {
        self.stop.cancel();
        let _ = self.accepting.await;
        self.local
    }

    /// Sets the listen queue of the open socket to `backlog`; false (and
    /// a log line, the old queue serving on) if the kernel refuses.
    fn resize(&mut self, backlog: u32) -> bool {
        // Gone with its accept loop: nothing listens to resize.
        let Some(listener) = self.listener.upgrade() else {
            return false;
        };
        let length = queue_length(self.local, backlog);
        let sock = socket2::SockRef::from(listener.as_ref());
        match sock.listen(i32::try_from(length).unwrap_or(i32::MAX)) {
            Ok(()) => {
                tracing::info!(addr = %self.local, backlog = length, "listen queue resized");
                self.backlog = Some(backlog);
                true
            }
            Err(e) => {
                tracing::warn!(addr = %self.local, backlog = length, error = %e, "cannot resize the listen queue; the old one serves on");
                false
            }
        }
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

    /// Makes the open ports equal `wanted`. Binds every new port first,
    /// with its backlog; if one cannot be bound, drops what this call
    /// bound and returns the error with nothing changed (`swap` not
    /// called). Otherwise stops
    /// accepting on the ports no longer wanted and waits for their accept
    /// loops to end (so every connection they took was handed over before
    /// the swap, under the old snapshot: the accept callback should take
    /// the snapshot it serves with there and then); sessions already
    /// accepted run on. Then calls `swap` (where the caller puts its new
    /// snapshot in service) and only then accepts on the new ports, so
    /// their first connection already sees it. A port that stays with
    /// another backlog gets it in place.
    ///
    /// # Errors
    /// [`ListenError`] for the first port that cannot be bound.
    pub async fn reconcile(
        &self,
        wanted: &[ListenPort],
        swap: impl FnOnce(),
        on_accept: OnAccept,
    ) -> Result<Reconciled, ListenError> {
        let mut open = self.open.lock().await;
        let mut bound: Vec<(u16, u32, TcpListener)> = Vec::new();
        for w in wanted {
            if open.contains_key(&w.port) || bound.iter().any(|(p, _, _)| *p == w.port) {
                continue;
            }
            let addr = SocketAddr::new(self.listen, w.port);
            let listener = bind(addr, w.backlog).map_err(|source| ListenError { addr, source })?;
            bound.push((w.port, w.backlog, listener));
        }
        let mut done = Reconciled::default();
        let removed: Vec<u16> = open
            .keys()
            .filter(|p| !wanted.iter().any(|w| w.port == **p))
            .copied()
            .collect();
        for port in removed {
            for o in open.remove(&port).unwrap_or_default() {
                done.removed.push(o.close().await);
            }
        }
        swap();
        for w in wanted {
            for o in open.get_mut(&w.port).into_iter().flatten() {
                if o.backlog != Some(w.backlog) && o.resize(w.backlog) {
                    done.resized.push(o.local);
                }
            }
        }
        for (port, backlog, listener) in bound {
            let o = self.accept(port, listener, Some(backlog), Arc::clone(&on_accept));
            done.added.push(o.local);
            open.entry(port).or_default().push(o);
        }
        Ok(done)
    }

    fn accept(
        &self,
        port: u16,
        listener: TcpListener,
        backlog: Option<u32>,
        on_accept: OnAccept,
    ) -> Open {
        let local = listener
            .local_addr()
            .unwrap_or(SocketAddr::new(self.listen, port));
        // The accept loop gets the only strong reference.
        let listener = Arc::new(listener);
        let weak = Arc::downgrade(&listener);
        let stop = self.shutdown.child_token();
        let accepting = self
            .tracker
            .spawn(accept_loop(listener, port, stop.clone(), on_accept));
        Open {
            local,
            listener: weak,
            backlog,
            stop,
            accepting,
        }
    }

    /// Accepts on `listener`, bound by the caller (a test binds port 0, or
    /// an address other than the node's), as the configured port `port`;
    /// a later reconcile keeps it while `port` is wanted and stops it when
    /// not. Several listeners (on other addresses) may share a `port`.
    /// The listener keeps its backlog until a reconcile sets the port's.
    pub async fn adopt(&self, port: u16, listener: TcpListener, on_accept: OnAccept) {
        let o = self.accept(port, listener, None, on_accept);
        self.open.lock().await.entry(port).or_default().push(o);
    }

    /// The bound addresses, in port order.
    pub async fn addresses(&self) -> Vec<SocketAddr> {
        let open = self.open.lock().await;
        open.values().flatten().map(|o| o.local).collect()
    }
}

async fn accept_loop(listener: Arc<TcpListener>, port: u16, stop: CancellationToken, on: OnAccept) {
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

    fn wanted(ports: &[u16]) -> Vec<ListenPort> {
        ports
            .iter()
            .map(|&port| ListenPort {
                port,
                backlog: ferry_config::DEFAULT_BACKLOG,
            })
            .collect()
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
            .reconcile(&wanted(&[a]), || swaps += 1, greeter(Arc::clone(&count)))
            .await
            .unwrap();
        assert_eq!(r.added.len(), 1);
        assert!(TcpStream::connect(("127.0.0.1", a)).await.is_ok());

        // A port another process holds fails the whole apply: a stays, b is
        // not bound, swap is not called.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let t = taken.local_addr().unwrap().port();
        let err = set
            .reconcile(
                &wanted(&[a, b, t]),
                || swaps += 1,
                greeter(Arc::clone(&count)),
            )
            .await
            .unwrap_err();
        assert_eq!(err.addr.port(), t);
        assert_eq!(swaps, 1);
        assert_eq!(set.addresses().await.len(), 1);
        assert!(std::net::TcpListener::bind(("127.0.0.1", b)).is_ok());

        // Replace a by b: b accepts, a refuses.
        let r = set
            .reconcile(&wanted(&[b]), || swaps += 1, greeter(Arc::clone(&count)))
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
