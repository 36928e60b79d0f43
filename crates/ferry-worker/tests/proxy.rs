//! PROXY protocol on the worker: only a trusted proxy may name the client,
//! and the client it names drives connector choice, relay decisions and
//! the protocol log; anyone else's header is just a bad command, and a bad
//! header from the proxy ends the connection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;
use proxy_header::{ProxiedAddress, ProxyHeader, Tlv};

const LIMITS: &str = "{}";

async fn from(h: &Harness, source: &str, header: &[u8]) -> SmtpClient {
    let mut c = SmtpClient::connect_from(h.front, ip(source)).await.unwrap();
    c.send(header).await.unwrap();
    c
}

/// MAIL and RCPT to a domain outside the accepted ones.
async fn relay_reply(c: &mut SmtpClient) -> String {
    c.cmd("EHLO device").await;
    assert_eq!(
        c.cmd("MAIL FROM:<app@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    c.cmd("RCPT TO:<x@elsewhere.test>").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trusted_proxy_names_the_client() {
    let h = Harness::start(LIMITS).await;

    // v1 naming 127.0.0.30: the Anon Relay connector, which may relay.
    let v1 = format!(
        "PROXY TCP4 127.0.0.30 127.0.0.1 40000 {}\r\n",
        h.front.port()
    );
    let mut c = from(&h, PROXY, v1.as_bytes()).await;
    assert_eq!(c.reply().await, "220 Anon Relay ready");
    assert_eq!(relay_reply(&mut c).await, "250 2.1.5 Recipient OK");
    c.cmd("QUIT").await;

    // v2 naming 127.0.0.1: the Default Frontend, which may not.
    let mut c = from(&h, PROXY, &proxy_v2("127.0.0.1:40001", h.front, "BAL-1")).await;
    assert_eq!(c.reply().await, "220 Default Frontend ready");
    assert_eq!(
        relay_reply(&mut c).await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    c.cmd("QUIT").await;

    // LOCAL (a health probe): the proxy itself is the client.
    let mut local = Vec::new();
    ProxyHeader::with_local().encode_v2(&mut local).unwrap();
    let mut c = from(&h, PROXY, &local).await;
    assert_eq!(c.reply().await, "220 Default Frontend ready");
    assert!(c.cmd("EHLO probe").await.starts_with("250-relay.test"));
    c.cmd("QUIT").await;
    assert!(c.is_closed().await);

    // The protocol log names the original client and the balancer session.
    // Log lines are written by a thread of their own: wait for them.
    h.worker.flush_logs().await;
    let dir = h.data().join("logs/smtp-receive");
    let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap();
    let text = std::fs::read_to_string(file.path()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("session BAL-1"))
        .expect("no PROXY line");
    assert!(
        line.contains(",127.0.0.1:40001,*,\"proxied by 127.0.0.99:"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anyone_elses_header_is_an_unknown_command() {
    let h = Harness::start(LIMITS).await;
    // A client straight to the worker forges v1 and v2 headers claiming
    // to be 127.0.0.30: it keeps its own connector and may not relay.
    let v1 = format!(
        "PROXY TCP4 127.0.0.30 127.0.0.1 40000 {}\r\n",
        h.front.port()
    );
    let (mut c, banner) = h.front_from("127.0.0.1").await;
    assert_eq!(banner, "220 Default Frontend ready");
    let r = c.cmd(v1.trim_end()).await;
    assert!(r.starts_with("500 5.5."), "{r}");
    assert_eq!(
        relay_reply(&mut c).await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );

    let (mut c, banner) = h.front_from("127.0.0.1").await;
    assert_eq!(banner, "220 Default Frontend ready");
    // The v2 signature holds a line "QUIT": the session reads its lines
    // as commands (bad ones, then QUIT) and ends, as the signature's
    // designers intended for servers that do not speak PROXY.
    c.send(&proxy_v2("127.0.0.30:40000", h.front, "FORGED"))
        .await
        .unwrap();
    let mut replies = Vec::new();
    loop {
        let r = c.reply().await;
        if r.is_empty() {
            break;
        }
        replies.push(r);
    }
    assert_eq!(
        replies.last().map(String::as_str),
        Some("221 2.0.0 Service closing transmission channel"),
        "{replies:?}"
    );
    assert!(
        replies[..replies.len() - 1]
            .iter()
            .all(|r| r.starts_with("500 5.5.")),
        "{replies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_from_the_proxy_close_the_connection() {
    let h = Harness::start(LIMITS).await;
    let good = proxy_v2("127.0.0.30:40000", h.front, "BAL-2");

    // Truncated: half a header, then the proxy closes its side.
    let mut c = from(&h, PROXY, &good[..good.len() / 2]).await;
    c.shutdown_write().await;
    assert_eq!(c.reply().await, "", "a truncated header got a banner");

    // Garbage, and an SMTP command where the header should be.
    for junk in [
        &b"\r\n\r\n\x00garbage-garbage\r\n"[..],
        b"EHLO balancer\r\n",
    ] {
        let mut c = from(&h, PROXY, junk).await;
        assert_eq!(c.reply().await, "", "{junk:?} got a banner");
    }

    // A header with a CRC32C that does not match.
    let addr = ProxiedAddress::stream("127.0.0.30:40000".parse().unwrap(), h.front);
    let mut bad_crc = Vec::new();
    ProxyHeader::with_tlvs(Some(addr), [Tlv::Crc32c(0x1234_5678)])
        .encode_v2(&mut bad_crc)
        .unwrap();
    let mut c = from(&h, PROXY, &bad_crc).await;
    assert_eq!(c.reply().await, "");

    // Slow: nothing within 5 s.
    let started = Instant::now();
    let mut c = from(&h, PROXY, b"").await;
    assert_eq!(c.reply().await, "");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(4900),
        "closed after {waited:?}"
    );

    // The proxy's next, good header still works.
    let mut c = from(&h, PROXY, &good).await;
    assert_eq!(c.reply().await, "220 Anon Relay ready");
}

/// Behind the balancer, an address literal is local when it names the
/// address the client reached (the PROXY header's destination) and a route
/// names it; the worker's own address is not what the client reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_literal_is_local_when_it_names_the_address_the_client_reached() {
    let routes = "[[routes]]\ndomains = [\"[192.0.2.80]\", \"[127.0.0.1]\"]\ntype = \"directory\"\npath = \"mail\"\n";
    let h = Harness::start_extra(LIMITS, routes).await;
    let balancer: SocketAddr = "192.0.2.80:25".parse().unwrap();
    let mut c = from(&h, PROXY, &proxy_v2("127.0.0.1:40002", balancer, "BAL-2")).await;
    assert_eq!(c.reply().await, "220 Default Frontend ready");
    c.cmd("EHLO device").await;
    assert_eq!(
        c.cmd("MAIL FROM:<app@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<ops@[192.0.2.80]>").await,
        "250 2.1.5 Recipient OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<ops@[127.0.0.1]>").await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    c.cmd("QUIT").await;
}

/// A worker that could not apply the control plane's current config for
/// longer than the grace period refuses the balancer's probes, so every
/// balancer takes it out of rotation, while clients that reach it
/// (directly or still through a balancer) are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_behind_the_control_plane_refuses_probes_only() {
    let h = Harness::start(LIMITS).await;
    let mut local = Vec::new();
    ProxyHeader::with_local().encode_v2(&mut local).unwrap();
    // Ready once its accept loop runs (the harness starts it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.worker.is_ready() {
        assert!(Instant::now() < deadline, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    h.worker.core().set_config_behind(true);
    assert!(
        !h.worker.is_ready(),
        "/readyz must say not ready while behind"
    );
    let mut probe = from(&h, PROXY, &local).await;
    assert_eq!(
        probe.reply().await,
        "421 4.3.0 This worker's config is out of date, closing transmission channel"
    );
    assert!(probe.is_closed().await);
    let mut client = from(&h, PROXY, &proxy_v2("127.0.0.1:40002", h.front, "BAL-2")).await;
    assert_eq!(client.reply().await, "220 Default Frontend ready");
    client.cmd("QUIT").await;

    h.worker.core().set_config_behind(false);
    assert!(h.worker.is_ready());
    let mut probe = from(&h, PROXY, &local).await;
    assert_eq!(probe.reply().await, "220 Default Frontend ready");
    probe.cmd("QUIT").await;
}
