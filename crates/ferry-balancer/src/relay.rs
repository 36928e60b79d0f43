//! Bytes both ways between client and worker. When one side stops sending
//! (EOF), the other side's write half is shut down and the opposite
//! direction goes on until it ends too (half-close). With no byte in
//! either direction for `idle`, both are closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

const BUFFER: usize = 16 * 1024;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished sending.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A read or write failed (reset, broken pipe).
    Error,
}

/// Octets moved and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub to_worker: u64,
    pub to_client: u64,
    pub end: RelayEnd,
}

struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    activity: &Activity,
) -> (u64, RelayEnd) {
    let mut buf = vec![0u8; BUFFER];
    let mut moved = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return (moved, RelayEnd::Closed);
            }
            Ok(n) => n,
            Err(_) => return (moved, RelayEnd::Error),
        };
        activity.touch();
        if to
            .write_all(buf.get(..n).unwrap_or_default())
            .await
            .is_err()
        {
            return (moved, RelayEnd::Error);
        }
        moved += n as u64;
    }
}

/// Resolves once nothing has moved for `idle`. One timer for the whole
/// connection, re-armed only when it fires, rather than one per read.
async fn idle_watch(activity: &Activity, idle: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// Relays until both directions end, either fails, or `idle` passes with
/// no traffic.
pub async fn relay(client: TcpStream, worker: TcpStream, idle: Duration) -> Relayed {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (cr, cw) = client.into_split();
    let (wr, ww) = worker.into_split();
    let up = pipe(cr, ww, &activity);
    let down = pipe(wr, cw, &activity);
    let idle_out = idle_watch(&activity, idle);
    tokio::pin!(up, down, idle_out);
    let (to_worker, to_client, end) = tokio::select! {
        (n, end) = &mut up => match end {
            RelayEnd::Closed => tokio::select! {
                (m, end) = &mut down => (n, m, end),
                _ = &mut idle_out => (n, 0, RelayEnd::Idle),
            },
            other => (n, 0, other),
        },
        (m, end) = &mut down => match end {
            RelayEnd::Closed => tokio::select! {
                (n, end) = &mut up => (n, m, end),
                _ = &mut idle_out => (0, m, RelayEnd::Idle),
            },
            other => (0, m, other),
        },
        _ = &mut idle_out => (0, 0, RelayEnd::Idle),
    };
    Relayed {
        to_worker,
        to_client,
        end,
    }
}

/// The same relay through the kernel: `splice(2)` from each socket into a
/// pipe and from the pipe into the other socket, so the bytes never enter
/// user space.
pub async fn relay_splice(client: TcpStream, worker: TcpStream, idle: Duration) -> Relayed {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up = splice_pipe(&client, &worker, &activity);
    let down = splice_pipe(&worker, &client, &activity);
    let idle_out = idle_watch(&activity, idle);
    tokio::pin!(up, down, idle_out);
    let (to_worker, to_client, end) = tokio::select! {
        (n, end) = &mut up => match end {
            RelayEnd::Closed => tokio::select! {
                (m, end) = &mut down => (n, m, end),
                _ = &mut idle_out => (n, 0, RelayEnd::Idle),
            },
            other => (n, 0, other),
        },
        (m, end) = &mut down => match end {
            RelayEnd::Closed => tokio::select! {
                (n, end) = &mut up => (n, m, end),
                _ = &mut idle_out => (0, m, RelayEnd::Idle),
            },
            other => (0, m, other),
        },
        _ = &mut idle_out => (0, 0, RelayEnd::Idle),
    };
    Relayed {
        to_worker,
        to_client,
        end,
    }
}

async fn splice_pipe(from: &TcpStream, to: &TcpStream, activity: &Activity) -> (u64, RelayEnd) {
    use nix::fcntl::{splice, OFlag, SpliceFFlags};
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let Ok((pipe_r, pipe_w)) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) else {
        return (0, RelayEnd::Error);
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved = 0u64;
    loop {
        let n = loop {
            if from.readable().await.is_err() {
                return (moved, RelayEnd::Error);
            }
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe_w, None, BUFFER * 4, flags).map_err(std::io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return (moved, RelayEnd::Error),
            }
        };
        if n == 0 {
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return (moved, RelayEnd::Closed);
        }
        activity.touch();
        let mut left = n;
        while left > 0 {
            if to.writable().await.is_err() {
                return (moved, RelayEnd::Error);
            }
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_r, None, to, None, left, flags).map_err(std::io::Error::from)
            }) {
                Ok(w) => left -= w,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return (moved, RelayEnd::Error),
            }
        }
        moved += n as u64;
    }
}
