//! One delivery attempt per message at a time, whatever the administrator
//! does: retries, bounces and deletes racing attempts towards a slow next
//! hop (a real SMTP sink on loopback), through the worker's admin API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_telemetry::admin::AdminApi;
use ferry_tests::sink::SmtpSink;
use ferry_worker::delivery::schedule::ScheduleStats;
use ferry_worker::delivery::QueueAdmin;
use harness::*;
use serde_json::Value;

const MESSAGES: usize = 10;

/// What happens to message `i`: retries only, or retries and bounces, or
/// retries and deletes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Kept,
    Bounced,
    Deleted,
}

fn fate(i: usize) -> Fate {
    match i {
        0..4 => Fate::Kept,
        4..7 => Fate::Bounced,
        _ => Fate::Deleted,
    }
}

fn config(sink: &SmtpSink) -> String {
    format!(
        r#"
[[routes]]
domains = ["sink.test"]
type = "smtp"
next_hops = ["{}"]
tls = "none"

[[routes]]
domains = ["example.test"]
type = "directory"
path = "mailbox"

# Two sessions at a time: attempts also queue for the hop, where an
# operation may stop them.
[delivery]
retry_interval = "1s"
max_connections_per_hop = 2
"#,
        sink.addr
    )
}

/// Message `i`: one recipient the hop takes (its final reply 300 ms late)
/// and one it defers for good.
async fn send(h: &Harness, i: usize) {
    let (mut c, banner) = h.front_from("127.0.0.30").await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("EHLO app").await;
    assert!(c
        .cmd("MAIL FROM:<app@example.test>")
        .await
        .starts_with("250"));
    for r in [format!("slow{i}@sink.test"), format!("temp{i}@sink.test")] {
        assert!(c.cmd(&format!("RCPT TO:<{r}>")).await.starts_with("250"));
    }
    c.cmd("DATA").await;
    c.send(format!("Subject: race {i}\r\n\r\nbody\r\n.\r\n").as_bytes())
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
}

/// `(status, JSON)` from the worker's admin API.
async fn admin(api: &QueueAdmin, method: &str, path: &str) -> (u16, Value) {
    let (status, body) = api.handle(method, path).await.expect("a queue path");
    (status, serde_json::from_str(&body).unwrap())
}

fn events<'a>(all: &'a [Value], event: &str, recipient: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|e| e["event"] == event && e["recipients"].to_string().contains(recipient))
        .collect()
}

/// Bounce notices in the mailbox folder naming `recipient`.
fn bounces_for(data: &Path, recipient: &str) -> usize {
    let needle = format!("Final-Recipient: rfc822; {recipient}\r\n");
    std::fs::read_dir(data.join("mailbox"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
                .filter(|t| t.contains("Undeliverable") && t.contains(&needle))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_operations_racing_attempts() {
    let sink = SmtpSink::start().await;
    // Every attempt takes a while at the hop: operations land during them.
    sink.delay_rcpt(Duration::from_millis(150));
    let h = Harness::start_with("{}", &config(&sink), None).await;
    let deliverer = Arc::clone(h.deliverer.as_ref().unwrap());
    let api = Arc::new(QueueAdmin::new(Arc::clone(&deliverer), Arc::new(|| true)));
    for i in 0..MESSAGES {
        send(&h, i).await;
    }
    let (_, listing) = admin(&api, "GET", "/queue").await;
    let mut ids = vec![String::new(); MESSAGES];
    for m in listing["messages"].as_array().unwrap() {
        let rcpts = m["recipients"].to_string();
        let i = (0..MESSAGES)
            .find(|i| rcpts.contains(&format!("\"slow{i}@sink.test\"")))
            .unwrap();
        ids[i] = m["id"].as_str().unwrap().to_string();
    }
    assert!(ids.iter().all(|id| id.len() == 20), "{listing}");

    // 100 calls at random moments over two seconds, ten a message: 82
    // retries, three bounces for each of three messages and three deletes
    // for each of three others, all racing the attempts the retries start.
    let mut calls = Vec::new();
    for k in 0..100 {
        let i = k % MESSAGES;
        let (method, path) = match (fate(i), k / MESSAGES) {
            (Fate::Bounced, 0..3) => ("POST", format!("/queue/{}/bounce", ids[i])),
            (Fate::Deleted, 0..3) => ("DELETE", format!("/queue/{}", ids[i])),
            _ => ("POST", format!("/queue/{}/retry", ids[i])),
        };
        let api = Arc::clone(&api);
        let pause = Duration::from_millis(rand::random::<u64>() % 2000);
        calls.push(tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let (status, body) = admin(&api, method, &path).await;
            (i, method, path, status, body)
        }));
    }
    let mut ok: HashMap<(usize, String), usize> = HashMap::new();
    let mut coalesced = 0;
    for call in calls {
        let (i, method, path, status, body) =
            tokio::time::timeout(WAIT, call).await.unwrap().unwrap();
        // A message bounced or deleted is not in the queue any more.
        assert!(
            status == 200 || status == 404,
            "{method} {path}: {status} {body}"
        );
        if status == 200 {
            *ok.entry((i, body["action"].as_str().unwrap().to_string()))
                .or_default() += 1;
        }
        if body["attempt"] == "after the current attempt" {
            coalesced += 1;
        }
    }
    // The race happened: some retries found an attempt under way.
    assert!(coalesced > 0, "no retry met an attempt under way");
    let done = |i: usize, action: &str| ok.get(&(i, action.to_string())).copied().unwrap_or(0);
    for i in 0..MESSAGES {
        // One bounce or delete did it; the next ones found nothing.
        let expected = match fate(i) {
            Fate::Kept => (10, 0, 0),
            Fate::Bounced => (done(i, "retry"), 1, 0),
            Fate::Deleted => (done(i, "retry"), 0, 1),
        };
        assert_eq!(
            (done(i, "retry"), done(i, "bounce"), done(i, "delete")),
            expected,
            "message {i}"
        );
    }
    let data = h.data();

    // Each bounced message: a bounce naming the recipient that was still
    // deferred, and the other one only if the hop never got it (a bounce
    // that waited for the attempt knows what the attempt did).
    for i in (0..MESSAGES).filter(|i| fate(*i) == Fate::Bounced) {
        let temp = format!("temp{i}@sink.test");
        assert!(
            eventually(|| bounces_for(&data, &temp) >= 1).await,
            "no bounce for {temp}"
        );
        let slow = format!("slow{i}@sink.test");
        let delivered = sink.received().iter().any(|m| m.rcpt_to.contains(&slow));
        assert_eq!(
            bounces_for(&data, &slow),
            usize::from(!delivered),
            "{slow}: delivered {delivered}"
        );
    }
    // Each deleted message: a `deleted` event, and no bounce.
    for i in (0..MESSAGES).filter(|i| fate(*i) == Fate::Deleted) {
        let temp = format!("temp{i}@sink.test");
        assert!(
            eventually(|| !events(&tracking(&data), "deleted", &temp).is_empty()).await,
            "no deleted event for {temp}"
        );
    }
    // The kept ones get their first delivery through.
    for i in (0..MESSAGES).filter(|i| fate(*i) == Fate::Kept) {
        let slow = format!("slow{i}@sink.test");
        assert!(
            eventually(|| sink.received().iter().any(|m| m.rcpt_to.contains(&slow))).await,
            "{slow} never delivered"
        );
    }

    // Retries from now on come once per retry interval (1 s, rounded up
    // to whole seconds: 2 s), not once per retry ever asked for: in 4 s at
    // most 3 attempts a message, 5 allowing for a late timer.
    let before: Vec<usize> = (0..4)
        .map(|i| sink.rcpt_count(&format!("temp{i}@sink.test")))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (i, before) in before.into_iter().enumerate() {
        let now = sink.rcpt_count(&format!("temp{i}@sink.test"));
        assert!(
            now - before <= 5,
            "temp{i}: {} attempts in 4 s",
            now - before
        );
    }

    // Stop starting attempts; wait for those under way to give back.
    let dir = h.stop().await;
    assert!(
        eventually(|| deliverer.schedule_stats().held == 0).await,
        "{:?}",
        deliverer.schedule_stats()
    );
    let states = ferry_queue::journal::scan_states(dir.path()).unwrap();
    // The kept messages remain, each known once and waiting once.
    assert_eq!(states.len(), 4, "{states:?}");
    assert_eq!(
        deliverer.schedule_stats(),
        ScheduleStats {
            messages: 4,
            waiting: 4,
            held: 0,
            timers: 4
        }
    );

    // Attempt counts are exact: each attempt of a kept message is one RCPT
    // at the hop for its deferred recipient and one `deferred` event, and
    // the events are numbered 1, 2, 3 … with no number twice or missing.
    for state in &states {
        let temp = state
            .recipients
            .iter()
            .find(|r| r.address.local_part().starts_with("temp"))
            .unwrap()
            .address
            .to_string();
        let attempts = state.attempts as usize;
        assert!(attempts >= 2, "{temp}: {attempts}");
        assert_eq!(sink.rcpt_count(&temp), attempts, "{temp}");
        assert!(
            eventually(|| events(&tracking(dir.path()), "deferred", &temp).len() >= attempts).await
        );
        let log = tracking(dir.path());
        let mut numbers: Vec<u64> = events(&log, "deferred", &temp)
            .iter()
            .map(|e| e["attempt"].as_u64().unwrap())
            .collect();
        numbers.sort_unstable();
        assert_eq!(numbers, (1..=attempts as u64).collect::<Vec<_>>(), "{temp}");
    }

    // The hop got each recipient at most once, whatever raced.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in sink.received() {
        for r in m.rcpt_to {
            *seen.entry(r).or_default() += 1;
        }
    }
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    let log = tracking(dir.path());
    for i in 0..MESSAGES {
        let temp = format!("temp{i}@sink.test");
        let (bounced, deleted) = (
            events(&log, "bounced", &temp).len(),
            events(&log, "deleted", &temp).len(),
        );
        let expected = match fate(i) {
            Fate::Kept => (0, 0),
            Fate::Bounced => (1, 0),
            Fate::Deleted => (0, 1),
        };
        assert_eq!((bounced, deleted), expected, "{temp}");
        assert_eq!(
            bounces_for(dir.path(), &temp),
            expected.0,
            "{temp}: bounces"
        );
    }
}

/// Sends one message from the Anon Relay connector to `to`.
async fn send_to(h: &Harness, to: &[&str]) {
    let (mut c, _) = h.front_from("127.0.0.30").await;
    c.cmd("EHLO app").await;
    assert!(c
        .cmd("MAIL FROM:<app@example.test>")
        .await
        .starts_with("250"));
    for r in to {
        assert!(c.cmd(&format!("RCPT TO:<{r}>")).await.starts_with("250"));
    }
    c.cmd("DATA").await;
    c.send(b"Subject: one at a time\r\n\r\nbody\r\n.\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
}

/// The queue id of the message for `recipient`.
async fn id_of(api: &QueueAdmin, recipient: &str) -> String {
    let (_, listing) = admin(api, "GET", "/queue").await;
    listing["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["recipients"].to_string().contains(recipient))
        .map(|m| m["id"].as_str().unwrap().to_string())
        .unwrap()
}

/// The same, step by step with one session to the hop: retries during a
/// transaction make one attempt after it; a delete stops an attempt that
/// waits for the hop (nothing sent); a bounce during a transaction waits
/// for its outcome and bounces only what was not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_wait_for_a_transaction_and_stop_a_waiting_attempt() {
    let sink = SmtpSink::start().await;
    sink.delay_rcpt(Duration::from_millis(400));
    let extra = config(&sink).replace("max_connections_per_hop = 2", "max_connections_per_hop = 1");
    let h = Harness::start_with("{}", &extra, None).await;
    let deliverer = Arc::clone(h.deliverer.as_ref().unwrap());
    let api = QueueAdmin::new(Arc::clone(&deliverer), Arc::new(|| true));
    let data = h.data();

    // A: five retries while its first transaction runs.
    send_to(&h, &["slowa@sink.test", "tempa@sink.test"]).await;
    let a = id_of(&api, "slowa@sink.test").await;
    assert!(eventually(|| sink.rcpt_count("slowa@sink.test") == 1).await);
    for _ in 0..5 {
        let (status, body) = admin(&api, "POST", &format!("/queue/{a}/retry")).await;
        assert_eq!(status, 200);
        assert_eq!(body["attempt"], "after the current attempt", "{body}");
    }

    // B waits for the hop's one session; a delete stops it unsent.
    send_to(&h, &["slowb@sink.test", "tempb@sink.test"]).await;
    let b = id_of(&api, "slowb@sink.test").await;
    assert!(eventually(|| deliverer.schedule_stats().held == 2).await);
    let (status, body) = admin(&api, "DELETE", &format!("/queue/{b}")).await;
    assert_eq!((status, &body["action"]), (200, &Value::from("delete")));
    let (status, _) = admin(&api, "GET", &format!("/queue/{b}")).await;
    assert_eq!(status, 404);

    // The five retries make one attempt, right after the first.
    assert!(eventually(|| sink.rcpt_count("tempa@sink.test") == 2).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.rcpt_count("tempa@sink.test"), 2);

    // C: bounced while the hop holds its data (slowc accepted, the final
    // reply 300 ms away): the bounce waits, and names tempc only.
    send_to(&h, &["slowc@sink.test", "tempc@sink.test"]).await;
    let c = id_of(&api, "slowc@sink.test").await;
    assert!(eventually(|| sink.rcpt_count("tempc@sink.test") == 1).await);
    let (status, _) = admin(&api, "POST", &format!("/queue/{c}/bounce")).await;
    assert_eq!(status, 200);
    assert!(eventually(|| bounces_for(&data, "tempc@sink.test") == 1).await);
    assert_eq!(bounces_for(&data, "slowc@sink.test"), 0);

    let got: Vec<Vec<String>> = sink.received().into_iter().map(|m| m.rcpt_to).collect();
    assert_eq!(got, vec![vec!["slowa@sink.test"], vec!["slowc@sink.test"]]);
    assert_eq!(sink.rcpt_count("slowb@sink.test"), 0);
    // The delete is in the tracking log, with the recipients it dropped.
    assert!(
        eventually(|| {
            let log = tracking(&data);
            let deleted = events(&log, "deleted", "slowb@sink.test");
            deleted.len() == 1
                && deleted[0]["recipients"]
                    .to_string()
                    .contains("tempb@sink.test")
        })
        .await
    );
}

/// The queue's index keeps no envelope and no delivery state: after a
/// restart, `ferry queue show` and the listing read them from the spool
/// (sender, client, connector, each recipient's state and reply), a retry
/// makes an attempt that starts from the state the last one wrote (the
/// recipient it delivered is not sent again, the count goes on), and a
/// delete removes the message for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_queue_is_read_from_the_spool() {
    let sink = SmtpSink::start().await;
    // No retry by the timers during the test: only the one asked for.
    let extra = config(&sink).replace("retry_interval = \"1s\"", "retry_interval = \"1h\"");
    let h = Harness::start_with("{}", &extra, None).await;
    let api = QueueAdmin::new(Arc::clone(h.deliverer.as_ref().unwrap()), Arc::new(|| true));
    send_to(&h, &["ok1@sink.test", "temp1@sink.test"]).await;
    let id = id_of(&api, "temp1@sink.test").await;
    let show = format!("/queue/{id}");
    let mut tried = false;
    for _ in 0..600 {
        let (_, m) = admin(&api, "GET", &show).await;
        if m["attempts"] == 1 {
            tried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tried, "never tried");
    drop(api);
    let dir = h.stop().await;

    let h = Harness::start_with("{}", &extra, Some(dir)).await;
    let deliverer = Arc::clone(h.deliverer.as_ref().unwrap());
    let api = QueueAdmin::new(Arc::clone(&deliverer), Arc::new(|| true));
    let (status, m) = admin(&api, "GET", &show).await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["sender"], "app@example.test");
    assert_eq!(m["client_ip"], "127.0.0.30");
    assert_eq!(m["connector"], "Anon Relay");
    assert_eq!(m["attempts"], 1);
    let in_an_hour = chrono::Utc::now().timestamp() + 3000;
    assert!(m["next_attempt"].as_i64().unwrap() > in_an_hour, "{m}");
    let hop = sink.addr.to_string();
    let recipients = m["recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), 2, "{m}");
    assert_eq!(recipients[0]["address"], "ok1@sink.test");
    assert_eq!(recipients[0]["state"], "delivered");
    assert_eq!(recipients[0]["next_hop"], hop.as_str());
    assert!(
        recipients[0]["reply"].as_str().unwrap().starts_with("250"),
        "{m}"
    );
    assert_eq!(recipients[1]["address"], "temp1@sink.test");
    assert_eq!(recipients[1]["state"], "deferred");
    assert_eq!(recipients[1]["reply"], "450 4.2.0 mailbox busy");
    // The listing says the same, and so do the counts.
    let (_, listing) = admin(&api, "GET", "/queue").await;
    assert_eq!(listing["messages"], Value::Array(vec![m.clone()]));
    let (_, status) = api.handle("GET", "/status").await.unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["queue"],
        serde_json::json!({ "messages": 1, "deferred": 1 })
    );

    // The retry starts from what the first attempt recorded.
    let (status, body) = admin(&api, "POST", &format!("{show}/retry")).await;
    assert_eq!((status, &body["attempt"]), (200, &Value::from("now")));
    assert!(eventually(|| sink.rcpt_count("temp1@sink.test") == 2).await);
    let mut second = Value::Null;
    for _ in 0..600 {
        second = admin(&api, "GET", &show).await.1;
        if second["attempts"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(second["attempts"], 2, "{second}");
    assert_eq!(second["recipients"][0], m["recipients"][0]);
    assert_eq!(sink.rcpt_count("ok1@sink.test"), 1, "delivered twice");
    let data = h.data();
    assert!(
        eventually(|| events(&tracking(&data), "deferred", "temp1@sink.test").len() == 2).await
    );
    let numbers: Vec<u64> = events(&tracking(&data), "deferred", "temp1@sink.test")
        .iter()
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2]);

    // Deleted: gone now, and after the next restart.
    let (status, _) = admin(&api, "DELETE", &show).await;
    assert_eq!(status, 200);
    assert_eq!(admin(&api, "GET", &show).await.0, 404);
    drop(api);
    let dir = h.stop().await;
    let h = Harness::start_with("{}", &extra, Some(dir)).await;
    let api = QueueAdmin::new(Arc::clone(h.deliverer.as_ref().unwrap()), Arc::new(|| true));
    assert_eq!(admin(&api, "GET", &show).await.0, 404);
    let (_, listing) = admin(&api, "GET", "/queue").await;
    assert_eq!(listing["messages"], Value::Array(Vec::new()));
}
