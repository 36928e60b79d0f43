//! Delivery as the next hop sees it, over real TCP and TLS on loopback:
//! TLS with the hop's certificate verified against a private CA, against
//! the web PKI, or not at all; AUTH to a smarthost over TLS; what MAIL
//! carries on (`BODY=8BITMIME`, `SMTPUTF8`); failover past hops that greet
//! with a refusal; the 5-address cap of `mx` routes; and `550 5.4.4` where
//! there is no route or no address.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use ferry_tests::dns::{Entry, TestDns};
use ferry_tests::issue_from_test_ca;
use ferry_tests::sink::SmtpSink;
use harness::*;

/// An `smtp` route for `domain` to `hops` with `settings` (TOML lines),
/// then mail for example.test to the `mailbox` folder (where bounces go).
fn smtp_route(domain: &str, hops: &[&SmtpSink], settings: &str) -> String {
    let hops: Vec<String> = hops.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    format!(
        r#"
[[routes]]
domains = ["{domain}"]
type = "smtp"
next_hops = [{}]
{settings}
"#,
        hops.join(", ")
    )
}

const MAILBOX: &str = r#"
[[routes]]
domains = ["example.test"]
type = "directory"
path = "mailbox"
"#;

/// The delivery state of `recipient` once it has one other than queued.
async fn state_of(h: &Harness, recipient: &str) -> serde_json::Value {
    let data = h.data();
    let find = || {
        spool_states(&data)
            .iter()
            .flat_map(|s| s["recipients"].as_array().cloned().unwrap_or_default())
            .find(|r| r["address"] == recipient && r["state"] != "queued")
    };
    eventually(|| find().is_some()).await;
    find().unwrap_or_else(|| panic!("no state for {recipient}: {:?}", spool_states(&data)))
}

/// `verify_certificates` with a `ca_file` trusts the hop's certificate
/// from a private CA; without one (the web PKI's roots) the same hop is
/// refused and the mail waits; with verification off any certificate
/// goes, still over TLS. Each transaction is over TLS at the hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_hop_verified_against_a_private_ca_the_web_pki_or_not_at_all() {
    let pki = issue_from_test_ca(&["127.0.0.1"]);
    let sink = SmtpSink::start_tls(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hop-ca.pem"), &pki.ca_pem).unwrap();
    let extra = [
        smtp_route(
            "verified.test",
            &[&sink],
            "tls = \"required\"\nverify_certificates = true\nca_file = \"hop-ca.pem\"",
        ),
        smtp_route("webpki.test", &[&sink], "tls = \"required\""),
        smtp_route(
            "unverified.test",
            &[&sink],
            "tls = \"required\"\nverify_certificates = false",
        ),
        MAILBOX.into(),
    ]
    .concat();
    let h = Harness::start_with("{}", &extra, Some(dir)).await;
    relay(
        &h,
        &["a@verified.test", "b@webpki.test", "c@unverified.test"],
    )
    .await;

    let got = sink.wait_for(2, WAIT).await;
    let mut rcpts: Vec<(Vec<String>, bool)> =
        got.iter().map(|m| (m.rcpt_to.clone(), m.tls)).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec![
            (vec!["a@verified.test".to_string()], true),
            (vec!["c@unverified.test".to_string()], true),
        ]
    );
    let webpki = state_of(&h, "b@webpki.test").await;
    assert_eq!(webpki["state"], "deferred", "{webpki}");
    let reply = webpki["reply"].as_str().unwrap();
    assert!(
        reply.starts_with(&format!("451 4.4.0 TLS with {} failed", sink.addr))
            && reply.contains("UnknownIssuer"),
        "{reply}"
    );
    assert_eq!(
        sink.received().len(),
        2,
        "sent to a hop it could not verify"
    );
}

/// A smarthost route authenticates with its credential, over TLS only;
/// a credential the hop refuses (`535`) fails its recipients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smarthost_gets_auth_with_the_configured_credential_over_tls() {
    let pki = issue_from_test_ca(&["127.0.0.1"]);
    let sink = SmtpSink::start_tls(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).await;
    sink.require_auth("relay-user", "hop-s3cret");
    let settings = |password: &str| {
        format!(
            "tls = \"required\"\nverify_certificates = false\n\
             auth = {{ username = \"relay-user\", password = \"{password}\" }}"
        )
    };
    let extra = [
        smtp_route("smarthost.test", &[&sink], &settings("hop-s3cret")),
        smtp_route("wrong.test", &[&sink], &settings("not-it")),
        MAILBOX.into(),
    ]
    .concat();
    let h = Harness::start_with("{}", &extra, None).await;
    relay(&h, &["a@smarthost.test", "b@wrong.test"]).await;

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "{:?}", spool_states(&h.data()));
    assert_eq!(got[0].rcpt_to, ["a@smarthost.test"]);
    assert_eq!(got[0].auth.as_deref(), Some("relay-user"));
    assert!(got[0].tls);
    let bounces = wait_for_eml(&h.data().join("mailbox"), "Undeliverable").await;
    assert_eq!(bounces.len(), 1);
    assert!(
        bounces[0].contains(
            "Final-Recipient: rfc822; b@wrong.test\r\nAction: failed\r\nStatus: 5.7.8\r\n"
        ) && bounces[0]
            .contains("Diagnostic-Code: smtp; 535 5.7.8 Authentication credentials invalid"),
        "{}",
        bounces[0]
    );
    assert_eq!(sink.received().len(), 1);
}

/// Towards the hop, MAIL declares SIZE, and passes `BODY=8BITMIME` and
/// `SMTPUTF8` on when the client gave them (and only then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_8bitmime_and_smtputf8_are_passed_on() {
    let sink = SmtpSink::start().await;
    sink.offer_smtputf8();
    let extra = smtp_route("sink.test", &[&sink], "tls = \"none\"") + MAILBOX;
    let h = Harness::start_with("{}", &extra, None).await;
    let (mut c, _) = h.front_from("127.0.0.30").await;
    c.cmd("EHLO app").await;
    assert_eq!(
        c.cmd("MAIL FROM:<j\u{fc}rgen@example.test> BODY=8BITMIME SMTPUTF8")
            .await,
        "250 2.1.0 Sender OK"
    );
    assert!(c
        .cmd("RCPT TO:<b\u{f6}b@sink.test>")
        .await
        .starts_with("250"));
    c.cmd("DATA").await;
    c.send("Subject: Gr\u{fc}\u{df}e\r\n\r\nsch\u{f6}n\r\n.\r\n".as_bytes())
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    relay(&h, &["plain@sink.test"]).await;

    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got.len(), 2);
    let utf8 = got
        .iter()
        .find(|m| m.rcpt_to == ["b\u{f6}b@sink.test"])
        .unwrap();
    let size = utf8.data.len();
    // The size declared is the message's (give or take dot-stuffing,
    // which this one does not need).
    assert_eq!(
        utf8.mail_line,
        format!("MAIL FROM:<j\u{fc}rgen@example.test> SIZE={size} BODY=8BITMIME SMTPUTF8")
    );
    assert!(String::from_utf8_lossy(&utf8.data).ends_with("sch\u{f6}n\r\n"));
    let plain = got
        .iter()
        .find(|m| m.rcpt_to == ["plain@sink.test"])
        .unwrap();
    let size = plain.data.len() - 1; // one dot stuffed on the wire
    assert_eq!(
        plain.mail_line,
        format!("MAIL FROM:<app@example.test> SIZE={size}")
    );
}

/// A hop that greets with a refusal (`554`, or `421`) is skipped for the
/// next one in the list; when every hop refuses, the mail waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_greets_with_a_refusal_is_skipped_for_the_next() {
    let refusing = SmtpSink::start().await;
    refusing.greet_with("554 5.3.2 Not accepting mail now");
    let busy = SmtpSink::start().await;
    busy.greet_with("421 4.3.2 Too busy, try later");
    let good = SmtpSink::start().await;
    let extra = [
        smtp_route("sink.test", &[&refusing, &busy, &good], "tls = \"none\""),
        smtp_route("nowhere.test", &[&refusing], "tls = \"none\""),
        MAILBOX.into(),
    ]
    .concat();
    let h = Harness::start_with("{}", &extra, None).await;
    relay(&h, &["ok@sink.test", "x@nowhere.test"]).await;
    let got = good.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "{:?}", spool_states(&h.data()));
    assert_eq!(got[0].rcpt_to, ["ok@sink.test"]);
    let nowhere = state_of(&h, "x@nowhere.test").await;
    assert_eq!(nowhere["state"], "deferred", "{nowhere}");
    assert!(
        nowhere["reply"]
            .as_str()
            .unwrap()
            .contains("554 5.3.2 Not accepting mail now"),
        "{nowhere}"
    );
    assert!(refusing.received().is_empty() && busy.received().is_empty());
    assert!(emls(&h.data().join("mailbox"), "Undeliverable").is_empty());
    // RFC 5321 §3.1: the hop that greeted with 554 was told QUIT.
    assert!(refusing.quits_after_refusal() >= 1);
}

/// An `mx` route tries at most 5 addresses per attempt over all
/// exchangers: a live exchanger 5th in preference order gets the mail,
/// one 6th is never tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_route_tries_only_the_first_five_addresses() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let live = SmtpSink::start_on("127.0.0.76:0".parse().unwrap()).await;
    // Nothing listens on .71 to .75 at the live port: refused at once.
    let dead = [
        "d1.cap.test",
        "d2.cap.test",
        "d3.cap.test",
        "d4.cap.test",
        "d5.cap.test",
    ];
    let mut zone = vec![Entry::Ip("live.cap.test", ip("127.0.0.76"))];
    for (i, name) in dead.iter().enumerate() {
        zone.push(Entry::Ip(name, ip(&format!("127.0.0.{}", 71 + i))));
        zone.push(Entry::Mx("six.test", 10 * (i as u16 + 1), name));
        if i < 4 {
            zone.push(Entry::Mx("five.test", 10 * (i as u16 + 1), name));
        }
    }
    zone.push(Entry::Mx("five.test", 50, "live.cap.test"));
    zone.push(Entry::Mx("six.test", 60, "live.cap.test"));
    let dns = TestDns::start(zone).await;
    let extra = format!(
        r#"
[[routes]]
domains = ["five.test", "six.test"]
type = "mx"
port = {}
tls = "none"
{MAILBOX}
[delivery]
dns_servers = ["{}"]
"#,
        live.addr.port(),
        dns.addr
    );
    let h = Harness::start_with("{}", &extra, None).await;
    relay(&h, &["a@five.test", "b@six.test"]).await;
    let got = live.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "{:?}", spool_states(&h.data()));
    assert_eq!(got[0].rcpt_to, ["a@five.test"]);
    let six = state_of(&h, "b@six.test").await;
    assert_eq!(six["state"], "deferred", "{six}");
    let reply = six["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("451 4.4.0 connection to d5.cap.test[127.0.0.75]:"),
        "{reply}"
    );
    assert_eq!(live.rcpt_count("b@six.test"), 0);
    assert_eq!(live.received().len(), 1);
}

/// A recipient whose domain no route takes, and one whose exchangers have
/// no address, fail with `550 5.4.4`: one bounce names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_and_exchangers_without_addresses_fail_with_5_4_4() {
    let dns = TestDns::start(vec![
        Entry::Mx("noaddr.test", 10, "mx1.noaddr.test"),
        Entry::Mx("noaddr.test", 20, "mx2.noaddr.test"),
        // mx1 exists with no address record; mx2 does not exist at all.
        Entry::Mx("mx1.noaddr.test", 10, "elsewhere.test"),
    ])
    .await;
    let extra = format!(
        r#"
[[routes]]
domains = ["noaddr.test"]
type = "mx"
tls = "none"
{MAILBOX}
[delivery]
dns_servers = ["{}"]
"#,
        dns.addr
    );
    let h = Harness::start_with("{}", &extra, None).await;
    relay(&h, &["a@unrouted.test", "b@noaddr.test"]).await;
    let bounces = wait_for_eml(&h.data().join("mailbox"), "Undeliverable").await;
    assert_eq!(bounces.len(), 1, "{:?}", spool_states(&h.data()));
    for expected in [
        "Final-Recipient: rfc822; a@unrouted.test\r\nAction: failed\r\nStatus: 5.4.4\r\n",
        "Diagnostic-Code: smtp; 550 5.4.4 No route for the recipient's domain\r\n",
        "Final-Recipient: rfc822; b@noaddr.test\r\nAction: failed\r\nStatus: 5.4.4\r\n",
        "Diagnostic-Code: smtp; 550 5.4.4 Unable to route: no address for any mail exchanger of noaddr.test\r\n",
    ] {
        assert!(
            bounces[0].contains(expected),
            "missing {expected:?} in\n{}",
            bounces[0]
        );
    }
    assert!(eventually(|| spool_states(&h.data()).is_empty()).await);
}
