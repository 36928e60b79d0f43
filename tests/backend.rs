//! A scripted worker on loopback for the balancer's tests: it reads the
//! PROXY v2 header every connection from a balancer starts with, tells a
//! probe (`LOCAL`) from a client's session (`PROXY`), and answers each as
//! the test says at the moment, so that one backend can pass its probes
//! while it fails its handoffs, stop listening, hang, or close its side
//! first. Each session's bytes and the moment the balancer closed it are
//! kept for the test to read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the backend answers a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `220 NAME ready`, `250 NAME` to EHLO, `221` to QUIT, `250 ok` to
    /// anything else.
    Serve,
    /// This line instead of a greeting, then close (`554 …`, `421 …`).
    Greet(&'static str),
    /// Greets with `220`, then answers EHLO with `502 5.5.1`.
    RefuseEhlo,
    /// Accepts and says nothing.
    Hang,
    /// Greets with `220`, then closes its sending side (a half-close) and
    /// reads on until the balancer closes the other.
    HalfClose,
}

/// One client session as the backend saw it.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Everything the client sent after the PROXY header.
    pub received: Vec<u8>,
    /// When the balancer closed its side (EOF), if it has.
    pub closed_at: Option<Instant>,
}

struct State {
    name: String,
    probe: Mutex<Answer>,
    session: Mutex<Answer>,
    probes: AtomicUsize,
    sessions: Mutex<Vec<Session>>,
    accepting: Mutex<Option<JoinHandle<()>>>,
}

/// A scripted backend; stops listening when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

impl Backend {
    /// One backend per name, each on its own address of `addrs` and all on
    /// one port (a balancer's listener has one `backend_port`), serving
    /// probes and sessions.
    pub async fn start_group(addrs: &[&str], names: &[&str]) -> Vec<Backend> {
        for _ in 0..50 {
            let mut bound = Vec::new();
            let mut port = 0;
            for addr in addrs {
                let at = SocketAddr::new(addr.parse().unwrap(), port);
                match TcpListener::bind(at).await {
                    Ok(l) => {
                        port = l.local_addr().unwrap().port();
                        bound.push(l);
                    }
                    Err(_) => break,
                }
            }
            if bound.len() == addrs.len() {
                return bound
                    .into_iter()
                    .zip(names)
                    .map(|(l, name)| Backend::serve(l, name))
                    .collect();
            }
        }
        panic!("no port free on every one of {addrs:?}");
    }

    fn serve(listener: TcpListener, name: &str) -> Backend {
        let state = Arc::new(State {
            name: name.to_string(),
            probe: Mutex::new(Answer::Serve),
            session: Mutex::new(Answer::Serve),
            probes: AtomicUsize::new(0),
            sessions: Mutex::default(),
            accepting: Mutex::default(),
        });
        let addr = listener.local_addr().unwrap();
        let b = Backend { addr, state };
        b.accept_on(listener);
        b
    }

    fn accept_on(&self, listener: TcpListener) {
        let state = Arc::clone(&self.state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(connection(Arc::clone(&state), stream));
            }
        });
        *self.state.accepting.lock().unwrap() = Some(task);
    }

    /// The backend's name, as its greeting gives it (`220 NAME ready`).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// How probes are answered from now on.
    pub fn answer_probes(&self, answer: Answer) {
        *self.state.probe.lock().unwrap() = answer;
    }

    /// How client sessions are answered from now on.
    pub fn answer_sessions(&self, answer: Answer) {
        *self.state.session.lock().unwrap() = answer;
    }

    /// Probes (PROXY `LOCAL` connections) accepted so far.
    pub fn probes(&self) -> usize {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// Client sessions accepted so far, oldest first.
    pub fn sessions(&self) -> Vec<Session> {
        self.state.sessions.lock().unwrap().clone()
    }

    /// Closes the listening socket: connections are refused from now on.
    pub fn stop_listening(&self) {
        if let Some(task) = self.state.accepting.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Waits (bounded by `wait`) until `n` probes have reached it.
    pub async fn wait_probes(&self, n: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.probes() < n {
            assert!(
                Instant::now() < deadline,
                "{}: {} probes, not {n}, after {wait:?}",
                self.name(),
                self.probes()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reads a PROXY v2 header: `Some(true)` for LOCAL (a probe), `Some(false)`
/// for PROXY (a client's session), `None` for anything else.
async fn read_proxy_header(s: &mut TcpStream) -> Option<bool> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed).await.ok()?;
    if &fixed[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
        return None;
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await.ok()?;
    match fixed[12] {
        0x20 => Some(true),
        0x21 => Some(false),
        _ => None,
    }
}

async fn connection(state: Arc<State>, mut s: TcpStream) {
    let Some(probe) = read_proxy_header(&mut s).await else {
        return;
    };
    let (answer, session) = if probe {
        state.probes.fetch_add(1, Ordering::SeqCst);
        (*state.probe.lock().unwrap(), None)
    } else {
        let mut sessions = state.sessions.lock().unwrap();
        sessions.push(Session::default());
        (*state.session.lock().unwrap(), Some(sessions.len() - 1))
    };
    let name = &state.name;
    let greeting = format!("220 {name} ready\r\n");
    let greeting = match answer {
        Answer::Hang => {
            // Held open until the balancer gives up on it.
            let mut sink = [0u8; 256];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        Answer::Greet(line) => {
            let _ = s.write_all(format!("{line}\r\n").as_bytes()).await;
            return;
        }
        Answer::Serve | Answer::RefuseEhlo | Answer::HalfClose => greeting,
    };
    if s.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    if answer == Answer::HalfClose {
        let _ = s.shutdown().await;
    }
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        if let Some(i) = session {
            let mut sessions = state.sessions.lock().unwrap();
            let record = &mut sessions[i];
            record.received.extend_from_slice(&buf[..n]);
            if n == 0 {
                record.closed_at = Some(Instant::now());
            }
        }
        if n == 0 || answer == Answer::HalfClose {
            if n == 0 {
                return;
            }
            continue;
        }
        line.extend_from_slice(&buf[..n]);
        while let Some(end) = line.windows(2).position(|w| w == b"\r\n") {
            let command = String::from_utf8_lossy(&line[..end]).to_ascii_uppercase();
            line.drain(..end + 2);
            let reply = match (command.split(' ').next().unwrap_or(""), answer) {
                ("EHLO", Answer::RefuseEhlo) => "502 5.5.1 EHLO refused here".to_string(),
                ("EHLO", _) => format!("250 {name}"),
                ("QUIT", _) => "221 2.0.0 bye".to_string(),
                _ => "250 ok".to_string(),
            };
            if s.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            if reply.starts_with("221") {
                return;
            }
        }
    }
}
