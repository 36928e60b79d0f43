//! The relay on its own, between two real loopback connections: bytes
//! arrive whole and in order when a side reads slowly (what the relay
//! read and could not write yet is kept until it can), a half-closed
//! connection carries the other side's last words, and after one side
//! closes the other has `fin_idle` of silence, not the whole idle timeout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use ferry_balancer::relay::{relay_with, RelayEnd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Two connected pairs: (the client's end, the relay's client side) and
/// (the relay's worker side, the worker's end).
async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (inner, _) = l.accept().await.unwrap();
        (outer, inner)
    }
    let (client, relay_client) = pair().await;
    let (worker, relay_worker) = pair().await;
    ((client, relay_client), (relay_worker, worker))
}

/// `len` octets of a pattern that shows a lost or repeated chunk (its
/// period, 251, divides no buffer size).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..251u8).cycle().take(len).map(|b| b ^ seed).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_whole_and_in_order_when_the_reader_is_slow() {
    let ((mut client, relay_client), (relay_worker, mut worker)) = pairs().await;
    let relay = tokio::spawn(relay_with(
        relay_client,
        relay_worker,
        Duration::from_secs(20),
        Duration::from_secs(20),
    ));
    // More than the socket buffers on both legs hold: the relay meets a
    // full send buffer and has to keep what it read.
    let up = pattern(16 << 20, 0x5a);
    let down = pattern(6 << 20, 0xa5);
    let (up_sent, down_sent) = (up.clone(), down.clone());
    let (mut cr, mut cw) = client.split();
    let (mut wr, mut ww) = worker.split();
    let client_side = async {
        cw.write_all(&up_sent).await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        got
    };
    let worker_side = async {
        // A slow start, then small reads.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = wr.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        ww.write_all(&down_sent).await.unwrap();
        ww.shutdown().await.unwrap();
        got
    };
    let (at_client, at_worker) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(client_side, worker_side)
    })
    .await
    .expect("the transfer did not finish");
    assert!(at_worker == up, "the worker got other bytes");
    assert!(at_client == down, "the client got other bytes");
    let r = relay.await.unwrap();
    assert_eq!(
        (r.to_worker, r.to_client, r.end),
        (up.len() as u64, down.len() as u64, RelayEnd::Closed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_half_close_the_last_words_arrive_then_silence_ends_it() {
    let ((mut client, relay_client), (relay_worker, mut worker)) = pairs().await;
    let fin = Duration::from_millis(400);
    let relay = tokio::spawn(relay_with(
        relay_client,
        relay_worker,
        Duration::from_secs(30),
        fin,
    ));
    client.write_all(b"QUIT\r\n").await.unwrap();
    client.shutdown().await.unwrap();
    // The worker gets the command, then the end of the client's data.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), worker.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"QUIT\r\n");
    // Its answer still reaches the client, whose side is half closed.
    worker.write_all(b"221 2.0.0 Bye\r\n").await.unwrap();
    let mut line = [0u8; 15];
    client.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"221 2.0.0 Bye\r\n");
    // Then the worker stays silent without closing: after `fin`, not the
    // 30 s idle timeout, both are closed.
    let silent = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay outlived its half-close timeout")
        .unwrap();
    let waited = silent.elapsed();
    assert_eq!((r.to_worker, r.to_client, r.end), (6, 15, RelayEnd::Idle));
    assert!(waited >= fin - Duration::from_millis(50), "{waited:?}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the client's connection was not closed");
}
