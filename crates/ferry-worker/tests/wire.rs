//! README promises about what a client sees on the wire, each checked
//! over real TCP (and TLS) on loopback against an in-process worker: the
//! refusals before a session (no connector, the connector's cap, the cap
//! per source counted on the client a balancer names), the whole-session
//! timeout, STARTTLS dropping what was pipelined behind it, bare CR in
//! DATA, `min_version = "1.3"`, and the full text of the replies the
//! README quotes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::time::{Duration, Instant};

use ferry_tests::sink::SmtpSink;
use harness::*;
use rustls::version::{TLS12, TLS13};

const LIMITS: &str = r#"{ max_connections_per_source = 2, max_header_size = "1KB", max_hop_count = 3, max_protocol_errors = 50, tarpit = "0s" }"#;

/// Connectors on the shared front port for one client address each (a
/// /32 beats the Default Frontend's /0): a capped one with a short
/// session, one that refuses TLS 1.2 (and the harness's [`BASIC_AUTH`]).
const EXTRA: &str = r#"
[[connectors]]
name = "Capped"
port = FRONT
remote_ranges = ["127.0.0.72/30"]
permissions = ["anonymous"]
banner = "Capped ready"
limits = { max_connections = 2, connection_timeout = "2s" }

[[connectors]]
name = "TLS 1.3 Only"
port = FRONT
remote_ranges = ["127.0.0.71/32"]
permissions = ["anonymous"]
auth = ["tls"]
tls = { certificate = "test.crt", key = "test.key", min_version = "1.3" }
banner = "TLS 1.3 Only ready"
"#;

/// A worker with the harness's connectors and [`EXTRA`]'s (applied as
/// version 2), and `more` config appended.
async fn start(more: &str) -> Harness {
    let h = Harness::start_with(LIMITS, more, None).await;
    h.apply_more(&format!("{EXTRA}{BASIC_AUTH}")).await;
    h
}

const NO_CONNECTOR: &str = "554 5.7.1 No receive connector accepts connections from your address";
const PER_SOURCE: &str = "421 4.3.2 Too many connections from your address, try again later";
const CAPPED: &str = "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel";
const TIMED_OUT: &str = "421 4.4.2 Connection timed out, closing transmission channel";

/// No connector takes the client (here an IPv6 client a balancer names,
/// on a port whose one connector takes IPv4 only): the whole README line,
/// then the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connector_for_the_client_gets_554_and_is_closed() {
    let h = start("").await;
    let (mut c, greeting) = h.proxied(h.client, "[2001:db8::25]:40000").await;
    assert_eq!(greeting, NO_CONNECTOR);
    assert!(c.is_closed().await);
    // The same port serves an IPv4 client.
    let (_c, greeting) = h.proxied(h.client, "192.0.2.25:40000").await;
    assert_eq!(greeting, "220 Client Frontend ready");
}

/// `max_connections_per_source` counts the client the trusted proxy
/// names, not the proxy: the balancer holds more sessions than the cap
/// allows one source, and only the third from one client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_source_cap_counts_the_proxied_client_not_the_balancer() {
    let h = start("").await;
    let mut open = Vec::new();
    for port in [40001, 40002] {
        let (c, greeting) = h.proxied(h.front, &format!("192.0.2.1:{port}")).await;
        assert_eq!(greeting, "220 Default Frontend ready");
        open.push(c);
    }
    let (mut c, greeting) = h.proxied(h.front, "192.0.2.1:40003").await;
    assert_eq!(greeting, PER_SOURCE);
    assert!(c.is_closed().await);
    // A third session from the same balancer for another client.
    let (_other, greeting) = h.proxied(h.front, "192.0.2.2:40004").await;
    assert_eq!(greeting, "220 Default Frontend ready");
}

/// The connector's `max_connections`: the one over it gets `421 4.3.2`
/// and is closed. `connection_timeout` ends a session that is busy all
/// along (no inactivity timeout applies) with `421 4.4.2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_cap_and_the_whole_session_timeout_on_the_wire() {
    let h = start("").await;
    let started = Instant::now();
    let (mut busy, greeting) = h.front_from("127.0.0.72").await;
    assert_eq!(greeting, "220 Capped ready");
    let (mut idle, greeting) = h.front_from("127.0.0.73").await;
    assert_eq!(greeting, "220 Capped ready");
    let (mut over, greeting) = h.front_from("127.0.0.74").await;
    assert_eq!(greeting, CAPPED);
    assert!(over.is_closed().await);
    // Another connector on the same port is not affected.
    let (_c, greeting) = h.front_from("127.0.0.1").await;
    assert_eq!(greeting, "220 Default Frontend ready");

    // Busy all along: a NOOP every 100 ms (pacing a client that is never
    // idle, not waiting for anything), bounded in count.
    let mut last = String::new();
    for _ in 0..100 {
        last = busy.cmd("NOOP").await;
        if last != "250 2.0.0 OK" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lasted = started.elapsed();
    assert_eq!(last, TIMED_OUT);
    assert!(
        lasted >= Duration::from_millis(1900) && lasted < Duration::from_secs(8),
        "the session lasted {lasted:?}, not its 2 s"
    );
    assert!(busy.is_closed().await);
    assert_eq!(idle.reply().await, TIMED_OUT);
    assert!(idle.is_closed().await);
    // Both places are given back.
    let freed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_c, greeting) = h.front_from("127.0.0.74").await;
            if greeting == "220 Capped ready" {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        freed.is_ok(),
        "the capped connector never took a client again"
    );
}

/// RFC 3207 §4.2: commands pipelined behind STARTTLS in the same packet
/// are dropped, not run inside the TLS session (the CVE-2011-0411 kind of
/// injection), and the session starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_drops_commands_pipelined_behind_it() {
    let h = start("").await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.send(b"EHLO device\r\nSTARTTLS\r\nEHLO injected\r\nMAIL FROM:<injected@example.test>\r\nRCPT TO:<victim@example.test>\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250-relay.test Hello device"));
    assert_eq!(c.reply().await, "220 2.0.0 SMTP server ready");
    c.handshake(&h.ca, &[&TLS13]).await.unwrap();
    // The first reply inside TLS is to our first command there.
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test>").await,
        "503 5.5.1 Send hello first"
    );
    assert!(c
        .cmd("EHLO device")
        .await
        .starts_with("250-relay.test Hello device"));
    assert_eq!(
        c.cmd("RCPT TO:<victim@example.test>").await,
        "503 5.5.1 Need MAIL before RCPT"
    );
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
    assert!(spooled(&h.data()).is_empty());
}

/// A bare CR never ends DATA (`CR . CRLF` and `CR . CR` are content), and
/// the next hop gets every bare CR as CRLF, dot-stuffed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_never_ends_data_and_reaches_the_next_hop_as_crlf() {
    let sink = SmtpSink::start().await;
    let routes = format!(
        "[[routes]]\ndomains = [\"sink.test\"]\ntype = \"smtp\"\nnext_hops = [\"{}\"]\ntls = \"none\"\n",
        sink.addr
    );
    let h = start(&routes).await;
    let (mut c, greeting) = h.front_from("127.0.0.30").await;
    assert_eq!(greeting, "220 Anon Relay ready");
    c.cmd("EHLO app").await;
    let reply = send_message(
        &mut c,
        "app@example.test",
        "cr@sink.test",
        "Subject: cr\r\n\r\none\rtwo\r.\r\nthree\r.\rfour\r\n",
    )
    .await;
    assert!(reply.starts_with("250 2.6.0 "), "{reply}");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    let got = sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "one message, not cut at a bare CR");
    let data = String::from_utf8(got[0].data.clone()).unwrap();
    assert!(
        data.ends_with("\r\nSubject: cr\r\n\r\none\r\ntwo\r\n..\r\nthree\r\n..\r\nfour\r\n"),
        "{data:?}"
    );
    assert!(
        !data.replace("\r\n", "").contains('\r'),
        "a bare CR went on: {data:?}"
    );
}

/// `min_version = "1.3"` refuses a client that offers only TLS 1.2; the
/// same client gets TLS 1.2 from a connector with the default (`"1.2"`),
/// and a TLS 1.3 client gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_1_3_refuses_a_tls_1_2_client() {
    let h = start("").await;
    let (mut c, greeting) = h.front_from("127.0.0.71").await;
    assert_eq!(greeting, "220 TLS 1.3 Only ready");
    c.cmd("EHLO old").await;
    let err = c.starttls_offering(&h.ca, &[&TLS12]).await.unwrap_err();
    assert!(err.contains("ProtocolVersion"), "{err}");

    let (mut c, _) = h.front_from("127.0.0.71").await;
    c.cmd("EHLO new").await;
    c.starttls_offering(&h.ca, &[&TLS13]).await.unwrap();
    assert_eq!(c.tls_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(c.cmd("EHLO new").await.starts_with("250-relay.test"));

    let (mut c, greeting) = h.front_from("127.0.0.1").await;
    assert_eq!(greeting, "220 Default Frontend ready");
    c.cmd("EHLO old").await;
    c.starttls_offering(&h.ca, &[&TLS12]).await.unwrap();
    assert_eq!(c.tls_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(c.cmd("EHLO old").await.starts_with("250-relay.test"));
}

/// The replies the README quotes in full (SMTP behaviour, limits), each
/// as a whole line over the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_quoted_in_the_readme_come_whole() {
    let h = start("").await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    let replies = [
        ("BOGUS", "500 5.5.1 Command unrecognized"),
        ("MAIL FROM:<a@example.test>", "503 5.5.1 Send hello first"),
        ("EHLO", "501 5.5.4 Syntax: EHLO domain"),
        ("EHLO device", ""),
        (
            "VRFY alice",
            "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (
            "MAIL FROM:<a@example.test> BODY=BINARYMIME",
            "555 5.5.4 Unsupported parameter BODY=BINARYMIME",
        ),
        (
            "MAIL FROM:<a.@example.test>",
            "501 5.1.7 Invalid address: invalid local part",
        ),
        (
            "MAIL FROM:<jos\u{e9}@example.test>",
            "553 5.6.7 Non-ASCII addresses not permitted for that sender without SMTPUTF8",
        ),
        (
            "RCPT TO:<a@example.test>",
            "503 5.5.1 Need MAIL before RCPT",
        ),
        ("MAIL FROM:<a@example.test>", "250 2.1.0 Sender OK"),
        (
            "RCPT TO:<a@-bad-.test>",
            "501 5.1.3 Invalid address: invalid domain",
        ),
        (
            "RCPT TO:<a@example.test> NOTIFY=NEVER",
            "555 5.5.4 Unsupported parameter NOTIFY=NEVER",
        ),
        ("RCPT TO:<a@example.test>", "250 2.1.5 Recipient OK"),
    ];
    for (command, want) in replies {
        let got = c.cmd(command).await;
        if want.is_empty() {
            assert!(got.starts_with("250-"), "{command}: {got}");
        } else {
            assert_eq!(got, want, "{command}");
        }
    }
    // A line over 512 octets, a header over max_header_size, a message
    // over max_hop_count.
    assert_eq!(
        c.cmd(&format!("NOOP {}", "x".repeat(600))).await,
        "500 5.5.2 Line too long"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    let header = format!("X-Big: {}\r\n", "h".repeat(2000));
    c.send(format!("{header}\r\nbody\r\n.\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        c.reply().await,
        "552 5.3.4 Message header size exceeds limit"
    );
    c.cmd("MAIL FROM:<a@example.test>").await;
    c.cmd("RCPT TO:<a@example.test>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send("Received: from a\r\n".repeat(4).as_bytes())
        .await
        .unwrap();
    c.send(b"\r\nlooping\r\n.\r\n").await.unwrap();
    assert_eq!(
        c.reply().await,
        "554 5.4.6 Hop count exceeded - possible mail loop"
    );
    assert!(spooled(&h.data()).is_empty());

    // AUTH PLAIN with "=" (an empty initial response, RFC 4954 §4).
    let (mut c, greeting) = h.front_from("127.0.0.70").await;
    assert_eq!(greeting, "220 Basic Auth ready");
    c.cmd("EHLO device").await;
    assert_eq!(
        c.cmd("AUTH PLAIN =").await,
        "501 5.5.2 malformed PLAIN response"
    );
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("scanner", "wrong")))
            .await,
        "535 5.7.8 Authentication credentials invalid"
    );
}
