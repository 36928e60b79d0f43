//! Envelope addresses end to end, through a real next hop on loopback:
//! the bare `<Postmaster>`, quoted local parts and address literals are
//! accepted, stored and sent on exactly as RFC 5321 §4.1.2 writes them,
//! and everywhere the address is written again (next hop, DSN, tracking
//! log, `X-Ferry-*` headers, the queue's admin view) it is a valid path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::path::Path;
use std::time::Duration;

use ferry_tests::sink::SmtpSink;
use harness::*;

const WAIT: Duration = Duration::from_secs(20);

/// Waits (bounded) for a tracking event `event` to appear.
async fn wait_tracked(data: &Path, event: &str) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines = tracking(data);
        if lines.iter().any(|l| l["event"] == event) || tokio::time::Instant::now() >= deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) for the first `.eml` file in `dir`; its text.
async fn first_eml(dir: &Path) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".eml"));
        if let Some(e) = found {
            return std::fs::read_to_string(e.path()).unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "no .eml in {dir:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sink_route(domains: &str, sink: &SmtpSink) -> String {
    format!(
        r#"
[[routes]]
domains = [{domains}]
type = "smtp"
next_hops = ["{}"]
tls = "none"

[delivery]
retry_interval = "1s"
"#,
        sink.addr
    )
}

/// RFC 5321 §4.5.1: `<Postmaster>` without a domain is accepted on a
/// connector that may not relay, and goes to the cluster's postmaster
/// (by default `postmaster@` the first authoritative domain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_postmaster_is_accepted_and_delivered_to_the_postmaster_address() {
    let sink = SmtpSink::start().await;
    let h = Harness::start_with("{}", &sink_route("\"example.test\"", &sink), None).await;
    let (mut c, banner) = h.front_from("127.0.0.1").await;
    assert_eq!(banner, "220 Default Frontend ready");
    c.cmd("EHLO printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<printer@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<Postmaster>").await,
        "250 2.1.5 Recipient OK"
    );
    // Relay is still refused on this connector.
    assert_eq!(
        c.cmd("RCPT TO:<someone@elsewhere.test>").await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: toner low\r\n\r\nplease\r\n.\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["postmaster@example.test"]);
    assert_eq!(got[0].mail_from, "printer@example.test");
}

/// A quoted local part survives: stored as received and written back as a
/// valid forward-path to the next hop, in the tracking log, in a DSN and in
/// the admin view; a quoted `>` never ends the path there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_local_parts_are_kept_everywhere_they_are_written() {
    let sink = SmtpSink::start().await;
    let routes = format!(
        "{}\n[[routes]]\ndomains = [\"dir.test\"]\ntype = \"directory\"\npath = \"mailbox\"\n",
        sink_route("\"example.test\", \"sink.test\"", &sink)
    );
    let h = Harness::start_with("{}", &routes, None).await;
    let (mut c, _) = h.front_from("127.0.0.30").await;
    c.cmd("EHLO app").await;
    assert_eq!(
        c.cmd("MAIL FROM:<\"app sender\"@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    for rcpt in [
        "\"odd user\"@example.test",
        "\"a>x\"@example.test",
        "\"perm user\"@sink.test",
        "\"odd user\"@dir.test",
    ] {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{rcpt}>")).await,
            "250 2.1.5 Recipient OK",
            "{rcpt}"
        );
    }
    c.cmd("DATA").await;
    c.send(b"Subject: odd\r\n\r\nbody\r\n.\r\n").await.unwrap();
    let queued = c.reply().await;
    assert!(queued.starts_with("250 2.6.0"), "{queued}");
    let id = queued.split_whitespace().nth(2).unwrap().to_string();
    c.cmd("QUIT").await;

    // The message, then the bounce for "perm user" (from <>).
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let message = got.iter().find(|m| !m.mail_from.is_empty()).unwrap();
    assert_eq!(message.mail_from, "\"app sender\"@example.test");
    let mut rcpts = message.rcpt_to.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["\"a>x\"@example.test", "\"odd user\"@example.test"]);
    let bounce = got.iter().find(|m| m.mail_from.is_empty()).unwrap();
    assert_eq!(bounce.rcpt_to, ["\"app sender\"@example.test"]);
    let dsn = String::from_utf8_lossy(&bounce.data);
    assert!(
        dsn.contains("Final-Recipient: rfc822; \"perm user\"@sink.test\r\n"),
        "{dsn}"
    );
    assert!(
        dsn.contains("To: <\"app sender\"@example.test>\r\n"),
        "{dsn}"
    );

    // The folder copy names the envelope in its X-Ferry-* header fields.
    let dir = h.data().join("mailbox");
    let eml = first_eml(&dir).await;
    assert!(
        eml.contains("X-Ferry-Mail-From: <\"app sender\"@example.test>\r\n"),
        "{eml}"
    );
    assert!(
        eml.contains("X-Ferry-Rcpt-To: <\"odd user\"@dir.test>\r\n"),
        "{eml}"
    );

    // The tracking log writes the same forms.
    let lines = wait_tracked(&h.data(), "bounced").await;
    let received = lines.iter().find(|l| l["event"] == "received").unwrap();
    assert_eq!(received["queue_id"], id.as_str());
    assert_eq!(received["sender"], "\"app sender\"@example.test");
    assert_eq!(
        received["recipients"],
        serde_json::json!([
            "\"odd user\"@example.test",
            "\"a>x\"@example.test",
            "\"perm user\"@sink.test",
            "\"odd user\"@dir.test"
        ])
    );
    let failed = lines.iter().find(|l| l["event"] == "failed").unwrap();
    assert_eq!(
        failed["recipients"],
        serde_json::json!(["\"perm user\"@sink.test"])
    );
    // The bounce's own events carry the Message-ID it was written with.
    let bounced = lines.iter().find(|l| l["event"] == "bounced").unwrap();
    let dsn_id = bounced["dsn_queue_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    let dsn_delivered = loop {
        let lines = tracking(&h.data());
        if let Some(l) = lines
            .into_iter()
            .find(|l| l["event"] == "delivered" && l["queue_id"] == dsn_id.as_str())
        {
            break l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivered event for the DSN"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dsn_message_id = dsn_delivered["message_id"].as_str().unwrap();
    assert!(
        dsn.contains(&format!("Message-ID: {dsn_message_id}\r\n")),
        "{dsn}"
    );
}

/// Address literals (RFC 5321 §4.1.3) are mailboxes: accepted in MAIL and
/// RCPT, relayed where the connector may relay, matched by routes; on a
/// connector that may not relay, only a literal naming this node is local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_literals_are_mailboxes_that_routes_can_match() {
    let sink = SmtpSink::start().await;
    let routes = format!(
        r#"{}
[[routes]]
domains = ["[127.0.0.1]"]
type = "mx"
port = {}
tls = "none"
"#,
        sink_route("\"[192.0.2.25]\", \"[IPv6:2001:db8::25]\"", &sink),
        sink.addr.port()
    );
    let h = Harness::start_with("{}", &routes, None).await;

    let (mut c, banner) = h.front_from("127.0.0.30").await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("EHLO scanner").await;
    assert_eq!(
        c.cmd("MAIL FROM:<scanner@[127.0.0.30]>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<ops@[192.0.2.25]>").await,
        "250 2.1.5 Recipient OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<ops@[IPv6:2001:db8::25]>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: scan\r\n\r\nscan\r\n.\r\n").await.unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "scanner@[127.0.0.30]");
    assert_eq!(
        got[0].rcpt_to,
        ["ops@[192.0.2.25]", "ops@[IPv6:2001:db8::25]"]
    );

    // Default Frontend may not relay: a literal of another host is relaying,
    // one naming the address the client reached is local, and an `mx`
    // route takes it to that address itself (no DNS).
    let (mut c, banner) = h.front_from("127.0.0.1").await;
    assert_eq!(banner, "220 Default Frontend ready");
    c.cmd("EHLO printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<printer@[127.0.0.1]>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<ops@[192.0.2.25]>").await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    assert_eq!(
        c.cmd("RCPT TO:<ops@[127.0.0.1]>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: local\r\n\r\nhi\r\n.\r\n").await.unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].rcpt_to, ["ops@[127.0.0.1]"]);
}

/// Domains compare without case and trailing dot; the address goes on as
/// the client wrote it. Non-ASCII addresses need SMTPUTF8 (RFC 6531).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_case_trailing_dot_and_smtputf8() {
    let sink = SmtpSink::start().await;
    // The sink offers no SMTPUTF8, so UTF-8 mail goes to a folder.
    let routes = format!(
        "{}\n[[routes]]\ndomains = [\"utf8.test\"]\ntype = \"directory\"\npath = \"mailbox\"\n",
        sink_route("\"example.test\"", &sink)
    );
    let h = Harness::start_with("{}", &routes, None).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.cmd("EHLO printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<j\u{fc}rgen@example.test>").await,
        "553 5.6.7 Non-ASCII addresses not permitted for that sender without SMTPUTF8"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<printer@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<j\u{fc}rgen@example.test>").await,
        "553 5.6.7 Non-ASCII addresses not permitted for that recipient without SMTPUTF8"
    );
    assert_eq!(
        c.cmd("RCPT TO:<Alice@EXAMPLE.Test.>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: case\r\n\r\nhi\r\n.\r\n").await.unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    // With SMTPUTF8, UTF-8 addresses are taken, and the Received header
    // names the protocol RFC 6531 §3.7.3 gives it (from the Anon Relay,
    // which may send to utf8.test).
    let (mut c, _) = h.front_from("127.0.0.30").await;
    c.cmd("EHLO app").await;
    assert_eq!(
        c.cmd("MAIL FROM:<j\u{fc}rgen@example.test> SMTPUTF8").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<b\u{f6}b@utf8.test>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: utf8\r\n\r\nhi\r\n.\r\n").await.unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpt_to, ["Alice@EXAMPLE.Test"]);
    assert!(String::from_utf8_lossy(&got[0].data).contains(" with ESMTP id "));
    let dir = h.data().join("mailbox");
    let eml = first_eml(&dir).await;
    assert!(
        eml.contains("X-Ferry-Mail-From: <j\u{fc}rgen@example.test>\r\n"),
        "{eml}"
    );
    assert!(
        eml.contains("X-Ferry-Rcpt-To: <b\u{f6}b@utf8.test>\r\n"),
        "{eml}"
    );
    assert!(eml.contains(" with UTF8SMTP id "), "{eml}");
}

/// Devices often send neither Message-ID nor Date: both are added (with
/// the node's host name), and the tracking log records the Message-ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_message_id_and_date_are_added_and_tracked() {
    let sink = SmtpSink::start().await;
    let h = Harness::start_with("{}", &sink_route("\"example.test\"", &sink), None).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.cmd("EHLO printer").await;
    c.cmd("MAIL FROM:<printer@example.test>").await;
    c.cmd("RCPT TO:<alice@example.test>").await;
    c.cmd("DATA").await;
    c.send(b"Subject: scan\r\n\r\nno ids here\r\n.\r\n")
        .await
        .unwrap();
    let queued = c.reply().await;
    let id = queued.split_whitespace().nth(2).unwrap().to_string();
    // One that has both keeps its own.
    c.cmd("MAIL FROM:<printer@example.test>").await;
    c.cmd("RCPT TO:<bob@example.test>").await;
    c.cmd("DATA").await;
    c.send(b"Message-ID: <own@printer>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nx\r\n.\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    // An empty Message-ID field is kept (a second one would be invalid),
    // but it is no id for the tracking log.
    c.cmd("MAIL FROM:<printer@example.test>").await;
    c.cmd("RCPT TO:<carol@example.test>").await;
    c.cmd("DATA").await;
    c.send(b"Message-ID:\r\nSubject: empty id\r\n\r\nx\r\n.\r\n")
        .await
        .unwrap();
    let empty = c.reply().await;
    let empty_id = empty.split_whitespace().nth(2).unwrap().to_string();
    c.cmd("QUIT").await;

    let got = sink.wait_for(3, WAIT).await;
    let third = got
        .iter()
        .find(|m| m.rcpt_to == ["carol@example.test"])
        .unwrap();
    let data = String::from_utf8_lossy(&third.data);
    assert_eq!(data.matches("Message-ID:").count(), 1, "{data}");
    let first = got
        .iter()
        .find(|m| m.rcpt_to == ["alice@example.test"])
        .unwrap();
    let data = String::from_utf8_lossy(&first.data);
    let made = format!("<{id}@relay.test>");
    assert!(
        data.contains(&format!("\r\nMessage-ID: {made}\r\n")),
        "{data}"
    );
    assert!(data.contains("\r\nDate: "), "{data}");
    let second = got
        .iter()
        .find(|m| m.rcpt_to == ["bob@example.test"])
        .unwrap();
    let data = String::from_utf8_lossy(&second.data);
    assert_eq!(data.matches("Message-ID:").count(), 1, "{data}");
    assert_eq!(data.matches("Date:").count(), 1, "{data}");

    let lines = wait_tracked(&h.data(), "delivered").await;
    let received = lines
        .iter()
        .find(|l| l["event"] == "received" && l["queue_id"] == id.as_str())
        .unwrap();
    assert_eq!(received["message_id"], made.as_str());
    let received = lines
        .iter()
        .find(|l| l["event"] == "received" && l["queue_id"] == empty_id.as_str())
        .unwrap();
    assert!(received.get("message_id").is_none(), "{received}");
}

/// `<Postmaster>` and `<postmaster@example.test>`, or one address given
/// twice in another spelling, are one mailbox: one copy, delivered once,
/// and the message is done (no retry, no bounce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mailbox_given_twice_is_delivered_once() {
    let sink = SmtpSink::start().await;
    let h = Harness::start_with("{}", &sink_route("\"example.test\"", &sink), None).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.cmd("EHLO printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<printer@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    for rcpt in [
        "Postmaster",
        "postmaster@example.test",
        "\"Postmaster\"@EXAMPLE.test",
        "alice@example.test",
        "\"alice\"@EXAMPLE.test",
    ] {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{rcpt}>")).await,
            "250 2.1.5 Recipient OK"
        );
    }
    c.cmd("DATA").await;
    c.send(b"Subject: twice\r\n\r\nonce\r\n.\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].rcpt_to,
        ["postmaster@example.test", "alice@example.test"]
    );
    // The message is done: nothing left to retry (retry_interval is 1 s).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ferry_queue::journal::scan_states(&h.data())
        .unwrap()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "message still queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.received().len(), 1);
}
