//! Delivery to a real SMTP next hop on loopback: per-recipient outcomes,
//! failover, TLS policy, bounces, delay notices, retry after a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::time::Duration;

use ferry_tests::free_port;
use ferry_tests::sink::SmtpSink;
use harness::*;

fn routes(hops: &str, tls: &str, delivery: &str) -> String {
    format!(
        r#"
[[routes]]
domains = ["sink.test"]
type = "smtp"
next_hops = [{hops}]
tls = "{tls}"

[[routes]]
domains = ["example.test"]
type = "directory"
path = "mailbox"

[delivery]
{delivery}
"#
    )
}

/// A sink on loopback, and a worker whose route to sink.test leads there
/// with `tls`, and `delivery` as its `[delivery]` settings.
async fn worker_and_sink(tls: &str, delivery: &str) -> (SmtpSink, Harness) {
    let sink = SmtpSink::start().await;
    let extra = routes(&format!("\"{}\"", sink.addr), tls, delivery);
    let h = Harness::start_with("{}", &extra, None).await;
    (sink, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delivered_one_retried_one_bounced() {
    let (sink, h) = worker_and_sink("none", "").await;
    relay(&h, &["ok@sink.test", "temp@sink.test", "perm@sink.test"]).await;

    // The next hop got one copy, for the one recipient it accepted, with
    // the content intact (dot-stuffed on the wire).
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "app@example.test");
    assert_eq!(got[0].rcpt_to, vec!["ok@sink.test"]);
    let data = String::from_utf8_lossy(&got[0].data);
    assert!(
        data.starts_with("Received: from app ([127.0.0.30])"),
        "{data}"
    );
    assert!(data.ends_with("Subject: quarterly report\r\nMessage-ID: <q1@example.test>\r\n\r\n..leading dot\r\nbody\r\n"), "{data:?}");

    // The sender gets a bounce naming the refused recipient and the reply.
    let bounces = wait_for_eml(&h.data().join("mailbox"), "Undeliverable").await;
    assert_eq!(bounces.len(), 1);
    let b = &bounces[0];
    for expected in [
        "X-Ferry-Mail-From: <>\r\n",
        "X-Ferry-Rcpt-To: <app@example.test>\r\n",
        "From: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n",
        "To: <app@example.test>\r\n",
        "Subject: Undeliverable: quarterly report\r\n",
        "Auto-Submitted: auto-replied\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n",
        "Final-Recipient: rfc822; perm@sink.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; 127.0.0.1\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n",
        "Content-Type: text/rfc822-headers\r\n\r\nReceived: from app ([127.0.0.30])",
        "Subject: quarterly report\r\nMessage-ID: <q1@example.test>\r\n",
    ] {
        assert!(b.contains(expected), "missing {expected:?} in\n{b}");
    }
    assert!(
        !b.contains("ok@sink.test") && !b.contains("temp@sink.test"),
        "{b}"
    );
    assert!(!b.contains("body\r\n"), "a bounce quotes headers only");

    // The 450 recipient waits for its retry, durably.
    let states = wait_for_state(&h, "deferred").await;
    let s = states.to_string();
    assert!(
        s.contains(
            r#""address":"temp@sink.test","reply":"450 4.2.0 mailbox busy","state":"deferred""#
        ),
        "{s}"
    );
    assert!(
        s.contains(r#""address":"ok@sink.test""#) && s.contains(r#""state":"delivered""#),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_failover() {
    let sink = SmtpSink::start().await;
    let dead = free_port("127.0.0.1".parse().unwrap());
    let extra = routes(
        &format!("\"127.0.0.1:{dead}\", \"{}\"", sink.addr),
        "none",
        "",
    );
    let h = Harness::start_with("{}", &extra, None).await;
    relay(&h, &["ok@sink.test"]).await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "the second next hop was not tried");
    assert_eq!(got[0].rcpt_to, vec!["ok@sink.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_is_never_sent_in_clear() {
    let (sink, h) = worker_and_sink("required", "").await;
    relay(&h, &["ok@sink.test"]).await;
    let states = wait_for_state(&h, "deferred").await.to_string();
    assert!(
        states.contains("does not offer STARTTLS, and the route requires TLS"),
        "{states}"
    );
    assert!(sink.received().is_empty(), "sent in clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_notice_then_retry_after_restart() {
    let sink = SmtpSink::start().await;
    let extra = routes(
        &format!("\"{}\"", sink.addr),
        "none",
        "retry_interval = \"1s\"\ndelay_notice_after = \"1s\"",
    );
    let h = Harness::start_with("{}", &extra, None).await;
    relay(&h, &["temp@sink.test"]).await;
    let notices = wait_for_eml(&h.data().join("mailbox"), "Delivery delayed").await;
    assert_eq!(
        notices.len(),
        1,
        "no delay notice: {:?}",
        spool_states(&h.data())
    );
    let n = &notices[0];
    assert!(
        n.contains(
            "Final-Recipient: rfc822; temp@sink.test\r\nAction: delayed\r\nStatus: 4.2.0\r\n"
        ),
        "{n}"
    );
    assert!(
        n.contains("Diagnostic-Code: smtp; 450 4.2.0 mailbox busy"),
        "{n}"
    );

    // Restart on the same data directory; the next hop now accepts.
    let dir = h.stop().await;
    assert!(sink.received().is_empty());
    sink.accept_everything();
    let h = Harness::start_with("{}", &extra, Some(dir)).await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "not retried after the restart");
    assert_eq!(got[0].rcpt_to, vec!["temp@sink.test"]);
    // Delivered, so retired: only a single delay notice, no second one.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !spool_states(&h.data()).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(spool_states(&h.data()).is_empty());
    assert_eq!(
        wait_for_eml(&h.data().join("mailbox"), "Delivery delayed")
            .await
            .len(),
        1
    );
}

/// An `mx` route, resolved through a DNS server on loopback: preference
/// order, fallback to the next exchanger, the domain's own address when it
/// has no MX, and null MX, unknown domains and DNS failures each with its
/// outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_route_follows_dns() {
    use ferry_tests::dns::{Entry, TestDns};
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let a = SmtpSink::start_on("127.0.0.41:0".parse().unwrap()).await;
    let port = a.addr.port();
    let b = SmtpSink::start_on(format!("127.0.0.42:{port}").parse().unwrap()).await;
    let dns = TestDns::start(vec![
        Entry::Mx("pref.test", 20, "b.pref.test"),
        Entry::Mx("pref.test", 10, "a.pref.test"),
        Entry::Ip("a.pref.test", ip("127.0.0.41")),
        Entry::Ip("b.pref.test", ip("127.0.0.42")),
        Entry::Mx("order.test", 30, "b.pref.test"),
        Entry::Mx("order.test", 20, "b.pref.test"),
        Entry::Mx("order.test", 5, "a.pref.test"),
        // The preferred exchanger does not answer: the next one gets it.
        Entry::Mx("fallback.test", 10, "dead.fallback.test"),
        Entry::Mx("fallback.test", 20, "b.fallback.test"),
        Entry::Ip("dead.fallback.test", ip("127.0.0.43")),
        Entry::Ip("b.fallback.test", ip("127.0.0.42")),
        // No MX: the domain's own address.
        Entry::Ip("implicit.test", ip("127.0.0.42")),
        Entry::Mx("nullmx.test", 0, "."),
        Entry::ServFail("broken.test"),
    ])
    .await;
    let extra = format!(
        r#"
[[routes]]
domains = ["*"]
type = "mx"
port = {port}
tls = "none"

[[routes]]
domains = ["example.test"]
type = "directory"
path = "mailbox"

[delivery]
dns_servers = ["{}"]
"#,
        dns.addr
    );
    let h = Harness::start_with("{}", &extra, None).await;
    relay(
        &h,
        &[
            "one@pref.test",
            "two@fallback.test",
            "three@implicit.test",
            "four@nullmx.test",
            "five@nxdomain.test",
            "six@broken.test",
            "seven@order.test",
            "perm@pref.test",
        ],
    )
    .await;

    let mut got_a: Vec<Vec<String>> = a
        .wait_for(2, WAIT)
        .await
        .into_iter()
        .map(|m| m.rcpt_to)
        .collect();
    got_a.sort();
    assert_eq!(got_a, vec![vec!["one@pref.test"], vec!["seven@order.test"]]);
    let mut got_b: Vec<Vec<String>> = b
        .wait_for(2, WAIT)
        .await
        .into_iter()
        .map(|m| m.rcpt_to)
        .collect();
    got_b.sort();
    assert_eq!(
        got_b,
        vec![vec!["three@implicit.test"], vec!["two@fallback.test"]]
    );

    let bounces = wait_for_eml(&h.data().join("mailbox"), "Undeliverable").await;
    assert_eq!(bounces.len(), 1);
    let bounce = &bounces[0];
    for expected in [
        "Final-Recipient: rfc822; four@nullmx.test\r\nAction: failed\r\nStatus: 5.1.10\r\n",
        "Diagnostic-Code: smtp; 556 5.1.10 Domain nullmx.test does not accept mail (null MX)",
        "Final-Recipient: rfc822; five@nxdomain.test\r\nAction: failed\r\nStatus: 5.1.2\r\n",
        "Diagnostic-Code: smtp; 550 5.1.2 Host or domain name not found: nxdomain.test",
        // Refused by an exchanger: named by its MX host name.
        "Final-Recipient: rfc822; perm@pref.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; a.pref.test\r\n",
    ] {
        assert!(
            bounce.contains(expected),
            "missing {expected:?} in\n{bounce}"
        );
    }
    let states = wait_for_state(&h, "4.4.3").await.to_string();
    assert!(
        states.contains(r#""address":"six@broken.test","reply":"451 4.4.3 DNS lookup of MX for broken.test failed"#),
        "{states}"
    );
}

/// `max_connections_per_hop` caps sessions towards one next hop, and idle
/// sessions are closed with QUIT a few seconds after their last message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_hop_are_capped_and_idle_ones_closed() {
    let (sink, h) = worker_and_sink("none", "max_connections_per_hop = 2").await;
    // Each delivery takes 300 ms at the hop, so eight queued messages
    // would open eight sessions without the cap.
    for _ in 0..8 {
        relay(&h, &["slow@sink.test"]).await;
    }
    assert_eq!(sink.wait_for(8, WAIT).await.len(), 8);
    assert_eq!(sink.peak_sessions(), 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    while sink.open_sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sink.open_sessions(), 0, "idle sessions were kept open");
}

/// A next hop whose SIZE is smaller than the message never gets it: the
/// sender gets a bounce with `552 5.3.4`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_hops_size_is_bounced_unsent() {
    let (sink, h) = worker_and_sink("none", "").await;
    sink.limit_size(100);
    relay(&h, &["ok@sink.test"]).await;
    let bounces = wait_for_eml(&h.data().join("mailbox"), "Undeliverable").await;
    assert_eq!(bounces.len(), 1);
    assert!(
        bounces[0].contains("Status: 5.3.4\r\n")
            && bounces[0].contains("exceeds the limit 100 of 127.0.0.1:"),
        "{}",
        bounces[0]
    );
    assert!(sink.received().is_empty());
}

/// A directory route's file carries the envelope on top: the queue id of
/// the `250`, and the original client (named by the trusted proxy, not
/// the proxy's own address); the file is named by the queue id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_files_carry_the_queue_id_and_the_original_client() {
    let h = Harness::start_with("{}", &routes("\"127.0.0.1:9\"", "none", ""), None).await;
    let mut c = SmtpClient::connect_from(h.front, ip(PROXY)).await.unwrap();
    let header = format!(
        "PROXY TCP4 192.0.2.44 127.0.0.1 40000 {}\r\n",
        h.front.port()
    );
    c.send(header.as_bytes()).await.unwrap();
    assert_eq!(c.reply().await, "220 Default Frontend ready");
    c.cmd("EHLO scanner").await;
    let reply = send_message(
        &mut c,
        "scanner@example.test",
        "alice@example.test",
        "Subject: scan\r\n\r\npage 1\r\n",
    )
    .await;
    c.cmd("QUIT").await;
    let id = reply.split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(id.len(), 20, "{reply}");

    let mailbox = h.data().join("mailbox");
    let files = wait_for_eml(&mailbox, "Subject: scan").await;
    assert_eq!(files.len(), 1);
    assert!(
        files[0].starts_with(&format!(
            "X-Ferry-Queue-Id: {id}\r\nX-Ferry-Mail-From: <scanner@example.test>\r\n\
             X-Ferry-Rcpt-To: <alice@example.test>\r\nX-Ferry-Client: 192.0.2.44\r\n"
        )),
        "{}",
        files[0]
    );
    let names: Vec<String> = std::fs::read_dir(&mailbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.len() == 1 && names[0].starts_with(&format!("{id}-")),
        "{names:?}"
    );
}

/// Still deferred after `bounce_after`: the recipient fails as expired,
/// and the sender's bounce says `Status: 4.4.7` with the last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_deferred_past_bounce_after_expires_with_4_4_7() {
    let (sink, h) = worker_and_sink("none", "retry_interval = \"1s\"\nbounce_after = \"1s\"").await;
    let id = relay_from(&h, "app@example.test", &["temp@sink.test"]).await;
    let bounces = wait_for_eml(&h.data().join("mailbox"), "Undeliverable").await;
    assert_eq!(bounces.len(), 1, "{:?}", spool_states(&h.data()));
    let b = &bounces[0];
    for expected in [
        "X-Ferry-Rcpt-To: <app@example.test>\r\n",
        "Final-Recipient: rfc822; temp@sink.test\r\nAction: failed\r\nStatus: 4.4.7\r\n",
        "Diagnostic-Code: smtp; 4.4.7 Message expired after ",
        "last error: 450 4.2.0 mailbox busy",
    ] {
        assert!(b.contains(expected), "missing {expected:?} in\n{b}");
    }
    // The message is retired, and the tracking log says why.
    assert!(eventually(|| spool_states(&h.data()).is_empty()).await);
    assert!(
        eventually(|| tracking(&h.data())
            .iter()
            .any(|e| e["event"] == "expired" && e["queue_id"] == id.as_str()))
        .await
    );
    assert!(sink.received().is_empty());
}

/// A message from the null sender is never reported on: a recipient that
/// fails gets no bounce and one deferred past `delay_notice_after` no
/// delay notice (RFC 5321 §4.5.5: no report about a report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_reported_to_the_null_sender() {
    let (sink, h) = worker_and_sink(
        "none",
        "retry_interval = \"1s\"\ndelay_notice_after = \"1s\"",
    )
    .await;
    let id = relay_from(&h, "", &["perm@sink.test", "temp@sink.test"]).await;
    // Three attempts: a bounce would be queued by the first, a delay
    // notice by the second (over a second old by then); both before the
    // attempt's state is written, so before the third starts.
    assert!(
        eventually(|| tracking(&h.data()).iter().any(|e| {
            e["event"] == "deferred" && e["queue_id"] == id.as_str() && e["attempt"] == 3
        }))
        .await,
        "{:?}",
        spool_states(&h.data())
    );
    let states = spool_states(&h.data());
    assert_eq!(states.len(), 1, "a report was queued: {states:?}");
    let s = states[0].to_string();
    assert!(
        s.contains(r#""address":"perm@sink.test","next_hop":"#) && s.contains("550 5.1.1"),
        "{s}"
    );
    assert!(emls(&h.data().join("mailbox"), "").is_empty());
    let log = tracking(&h.data());
    assert!(
        !log.iter()
            .any(|e| e["event"] == "bounced" || e["event"] == "delay_notified"),
        "{log:?}"
    );
    assert!(sink.received().is_empty());
}
