//! The message tracking log and the `Received:` header, as the README
//! describes them, for mail that comes through a balancer (PROXY v2) and
//! goes to a real next hop on loopback: every line's fields for the
//! receipt, each recipient's outcome and the bounce, and a `Received:`
//! naming the client the balancer named, the RFC 3848 protocol and the
//! queue id of the `250`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::collections::BTreeSet;

use ferry_tests::sink::{SinkMessage, SmtpSink};
use harness::*;
use serde_json::{json, Value};

const LIMITS: &str = r#"{ tarpit = "0s" }"#;

/// Everything goes to `sink`, which refuses `perm…` recipients for good.
fn to_the_sink(sink: &SmtpSink) -> String {
    format!(
        "[[routes]]\ndomains = [\"*\"]\ntype = \"smtp\"\nnext_hops = [\"{}\"]\ntls = \"none\"\n",
        sink.addr
    )
}

/// The queue id in a `250` to the end of data.
fn queue_id(reply: &str) -> String {
    reply
        .strip_prefix("250 2.6.0 ")
        .and_then(|r| r.strip_suffix(" Queued mail for delivery"))
        .unwrap_or_else(|| panic!("not a 250 to DATA: {reply}"))
        .to_string()
}

/// The events named `event` for `queue_id`.
fn events<'a>(log: &'a [Value], event: &str, queue_id: &str) -> Vec<&'a Value> {
    log.iter()
        .filter(|e| e["event"] == event && e["queue_id"] == queue_id)
        .collect()
}

fn keys(event: &Value) -> BTreeSet<&str> {
    event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracking_log_follows_a_message_to_each_recipient_and_its_bounce() {
    let sink = SmtpSink::start().await;
    let h = Harness::start_with(LIMITS, &to_the_sink(&sink), None).await;
    // Through the balancer for 192.0.2.44, authenticated after STARTTLS.
    let (mut c, greeting) = h.proxied(h.client, "192.0.2.44:40000").await;
    assert_eq!(greeting, "220 Client Frontend ready");
    c.cmd("EHLO scanner").await;
    c.starttls(&h.ca).await.unwrap();
    c.cmd("EHLO scanner").await;
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain("scanner", PASSWORD)))
        .await;
    assert_eq!(r, "235 2.7.0 Authentication successful");
    c.cmd("MAIL FROM:<scanner@example.test>").await;
    for to in ["ok@example.test", "perm@example.test"] {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{to}>")).await,
            "250 2.1.5 Recipient OK"
        );
    }
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(b"Subject: tracked\r\nMessage-ID: <t1@example.test>\r\n\r\nscan\r\n.\r\n")
        .await
        .unwrap();
    let id = queue_id(&c.reply().await);
    c.cmd("QUIT").await;

    // The bounce for perm@ goes back to the sender, through the sink too.
    let data = h.data();
    let done = eventually(|| {
        let log = tracking(&data);
        events(&log, "bounced", &id).first().is_some_and(|b| {
            let dsn = b["dsn_queue_id"].as_str().unwrap_or("");
            !events(&log, "delivered", dsn).is_empty()
        })
    })
    .await;
    assert!(done, "no delivered bounce in {:#?}", tracking(&data));
    let log = tracking(&data);
    // An `smtp` route's hop as configured (an `mx` exchanger would be
    // `host[address]:port`).
    let hop = sink.addr.to_string();

    // The same message fields on every line about the message.
    let about_it: Vec<&Value> = log.iter().filter(|e| e["queue_id"] == id).collect();
    for e in &about_it {
        assert_eq!(e["message_id"], "<t1@example.test>", "{e}");
        assert_eq!(e["client_ip"], "192.0.2.44", "{e}");
        assert_eq!(e["connector"], "Client Frontend", "{e}");
        assert_eq!(e["user"], "scanner", "{e}");
        assert_eq!(e["sender"], "scanner@example.test", "{e}");
        let time = e["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z'),
            "not RFC 3339 UTC with milliseconds: {time}"
        );
        chrono::DateTime::parse_from_rfc3339(time).unwrap();
    }
    let order: Vec<&str> = about_it
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(order[0], "received", "{order:?}");
    assert_eq!(order.len(), 4, "{order:?}");
    let common = [
        "time",
        "event",
        "queue_id",
        "message_id",
        "client_ip",
        "connector",
        "user",
        "sender",
        "recipients",
    ];
    let with = |more: &[&'static str]| -> BTreeSet<&'static str> {
        common.iter().chain(more).copied().collect()
    };

    // Received: both recipients, the size stored and sent on, the session.
    let received = events(&log, "received", &id)[0];
    assert_eq!(keys(received), with(&["size", "session_id"]));
    assert_eq!(
        received["recipients"],
        json!(["ok@example.test", "perm@example.test"])
    );
    let sent = sink.wait_for(1, EVENTUALLY).await;
    let original: &SinkMessage = sent
        .iter()
        .find(|m| m.rcpt_to == ["ok@example.test"])
        .expect("the message at the next hop");
    assert_eq!(received["size"], original.data.len());
    let session = received["session_id"].as_str().unwrap();
    h.worker.flush_logs().await;
    let protocol_log = std::fs::read_dir(data.join("logs/smtp-receive"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect::<String>();
    assert!(
        protocol_log
            .lines()
            .any(|l| l.contains(&format!(",{session},")) && l.contains(&format!(",{id},Queued"))),
        "session {session} and {id} not in the protocol log:\n{protocol_log}"
    );

    // One line per recipient and attempt, with the hop and its reply.
    let delivered = events(&log, "delivered", &id);
    assert_eq!(delivered.len(), 1);
    assert_eq!(keys(delivered[0]), with(&["next_hop", "reply", "attempt"]));
    assert_eq!(delivered[0]["recipients"], json!(["ok@example.test"]));
    assert_eq!(delivered[0]["next_hop"], hop.as_str());
    assert_eq!(delivered[0]["reply"], "250 2.0.0 queued as SINK");
    assert_eq!(delivered[0]["attempt"], 1);
    let failed = events(&log, "failed", &id);
    assert_eq!(failed.len(), 1);
    assert_eq!(keys(failed[0]), with(&["next_hop", "reply", "attempt"]));
    assert_eq!(failed[0]["recipients"], json!(["perm@example.test"]));
    assert_eq!(failed[0]["next_hop"], hop.as_str());
    assert_eq!(failed[0]["reply"], "550 5.1.1 no such user");
    assert_eq!(failed[0]["attempt"], 1);

    // The bounce names the failed recipient and the DSN's own queue id,
    // whose delivery to the sender has lines of its own.
    let bounced = events(&log, "bounced", &id);
    assert_eq!(bounced.len(), 1);
    assert_eq!(keys(bounced[0]), with(&["dsn_queue_id"]));
    assert_eq!(bounced[0]["recipients"], json!(["perm@example.test"]));
    let dsn = bounced[0]["dsn_queue_id"].as_str().unwrap();
    assert_eq!(dsn.len(), 20, "{dsn}");
    let dsn_delivered = events(&log, "delivered", dsn);
    assert_eq!(dsn_delivered.len(), 1);
    assert_eq!(dsn_delivered[0]["sender"], "");
    assert_eq!(
        dsn_delivered[0]["recipients"],
        json!(["scanner@example.test"])
    );
    assert_eq!(dsn_delivered[0]["next_hop"], hop.as_str());
    let bounce = sent_to(&sink, "scanner@example.test").await;
    assert_eq!(bounce.mail_from, "");

    // One file a day, named for its UTC date.
    let names: Vec<String> = std::fs::read_dir(data.join("logs/tracking"))
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!names.is_empty());
    for name in &names {
        let digits = name
            .strip_prefix("TRACK")
            .and_then(|n| n.strip_suffix(".jsonl"))
            .unwrap_or("");
        assert!(
            digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{name}"
        );
    }
}

/// Waits (bounded) for the message the sink got for `rcpt`.
async fn sent_to(sink: &SmtpSink, rcpt: &str) -> SinkMessage {
    let mut found = None;
    let got = eventually(|| {
        found = sink
            .received()
            .into_iter()
            .find(|m| m.rcpt_to.iter().any(|r| r == rcpt));
        found.is_some()
    })
    .await;
    assert!(got, "nothing for {rcpt} at the next hop");
    found.unwrap()
}

/// How a session authenticates, if at all.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    None,
    Plain,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_names_the_proxied_client_the_protocol_and_the_queue_id_of_the_250() {
    let sink = SmtpSink::start().await;
    let h = Harness::start_with(LIMITS, &to_the_sink(&sink), None).await;
    h.apply_more(BASIC_AUTH).await;
    // (client the balancer names, port, STARTTLS, AUTH, protocol)
    let cases = [
        ("192.0.2.45", h.front, true, Auth::None, "ESMTPS"),
        ("192.0.2.46", h.front, false, Auth::Plain, "ESMTPA"),
        ("192.0.2.47", h.client, true, Auth::Plain, "ESMTPSA"),
    ];
    for (n, (client, port, tls, auth, protocol)) in cases.into_iter().enumerate() {
        let (mut c, greeting) = h.proxied(port, &format!("{client}:4100{n}")).await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        let helo = format!("device-{n}");
        c.cmd(&format!("EHLO {helo}")).await;
        if tls {
            c.starttls(&h.ca).await.unwrap();
            c.cmd(&format!("EHLO {helo}")).await;
        }
        if auth == Auth::Plain {
            let r = c
                .cmd(&format!("AUTH PLAIN {}", plain("scanner", PASSWORD)))
                .await;
            assert_eq!(r, "235 2.7.0 Authentication successful", "{protocol}");
        }
        let rcpt = format!("r{n}@example.test");
        let reply = send_message(
            &mut c,
            "scanner@example.test",
            &rcpt,
            "Subject: hop\r\n\r\nbody\r\n",
        )
        .await;
        let id = queue_id(&reply);
        c.cmd("QUIT").await;

        // The tracking log names the user of an authenticated session only.
        h.worker.flush_logs().await;
        let log = tracking(&h.data());
        let received = events(&log, "received", &id);
        assert_eq!(received.len(), 1, "{protocol}");
        assert_eq!(received[0]["client_ip"], client);
        match auth {
            Auth::Plain => assert_eq!(received[0]["user"], "scanner"),
            Auth::None => assert!(received[0].get("user").is_none(), "{}", received[0]),
        }

        let got = sent_to(&sink, &rcpt).await;
        let text = String::from_utf8(got.data).unwrap();
        let want = format!(
            "Received: from {helo} ([{client}])\r\n\tby relay.test (Ferry) with {protocol} id {id};\r\n\t"
        );
        assert!(text.starts_with(&want), "{protocol}: {text}");
        let date = text[want.len()..].split("\r\n").next().unwrap();
        chrono::DateTime::parse_from_rfc2822(date)
            .unwrap_or_else(|e| panic!("{protocol}: {date:?} is no RFC 5322 date: {e}"));
    }
}
