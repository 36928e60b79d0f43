//! The worker's receive side over real TCP and TLS on loopback. Clients
//! bind different 127.0.0.x source addresses to be different clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::time::{Duration, Instant};

use harness::*;

const LIMITS: &str = r#"{ max_message_size = "64KB", max_recipients = 3, max_connections_per_source = 3, tarpit = "400ms" }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_table_anonymous_internal_relay() {
    let h = Harness::start(LIMITS).await;
    let (mut c, banner) = h.front_from("127.0.0.1").await;
    assert_eq!(banner, "220 Default Frontend ready");
    assert!(c
        .cmd("EHLO printer")
        .await
        .starts_with("250-relay.test Hello printer"));
    assert_eq!(
        c.cmd("MAIL FROM:<printer@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await,
        "250 2.1.5 Recipient OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<bob@elsewhere.test>").await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    assert_eq!(
        c.cmd("RCPT TO:<bob%elsewhere.test@example.test>").await,
        "550 5.7.1 Sender-specified routing is not allowed"
    );
    assert_eq!(
        c.cmd("RCPT TO:<\"bob@elsewhere.test\"@example.test>").await,
        "550 5.7.1 Sender-specified routing is not allowed"
    );
    assert_eq!(
        c.cmd("DATA").await,
        "354 Start mail input; end with <CRLF>.<CRLF>"
    );
    c.send(b"Subject: scan\r\n\r\nhello\r\n.\r\n")
        .await
        .unwrap();
    let r = c.reply().await;
    assert!(
        r.starts_with("250 2.6.0 ") && r.ends_with(" Queued mail for delivery"),
        "{r}"
    );
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
    assert!(c.is_closed().await);

    let spool = spooled(&h.data());
    assert_eq!(spool.len(), 1);
    let (env, msg) = &spool[0];
    assert_eq!(env["rcpt_to"], ferry_tests::json!(["alice@example.test"]));
    assert_eq!(env["client_ip"], "127.0.0.1");
    assert_eq!(env["connector"], "Default Frontend");
    let msg = String::from_utf8_lossy(msg);
    assert!(msg.starts_with(
        "Received: from printer ([127.0.0.1])\r\n\tby relay.test (Ferry) with ESMTP id "
    ));
    assert!(msg.ends_with("Subject: scan\r\n\r\nhello\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_table_anonymous_relay_and_not_authenticated() {
    let h = Harness::start(LIMITS).await;
    // Anon Relay (/32) beats Lab (/28) and Default (/0) for 127.0.0.30.
    let (mut c, banner) = h.front_from("127.0.0.30").await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("HELO app").await;
    assert_eq!(
        c.cmd("MAIL FROM:<app@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<someone@elsewhere.test>").await,
        "250 2.1.5 Recipient OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await,
        "250 2.1.5 Recipient OK"
    );

    // Client Frontend has no anonymous permission.
    let (mut c, _) = SmtpClient::connect(h.client, ip("127.0.0.1")).await;
    c.cmd("EHLO device").await;
    assert_eq!(
        c.cmd("MAIL FROM:<device@example.test>").await,
        "530 5.7.1 Client was not authenticated"
    );
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await,
        "503 5.5.1 Need MAIL before RCPT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_specific_connector_wins_ipv4_and_ipv6() {
    let h = Harness::start(LIMITS).await;
    for (source, banner) in [
        ("127.0.0.30", "220 Anon Relay ready"),
        ("127.0.0.20", "220 Lab ready"),
        ("127.0.0.31", "220 Lab ready"),
        ("127.0.0.32", "220 Default Frontend ready"),
        ("127.0.0.1", "220 Default Frontend ready"),
    ] {
        let (_c, got) = h.front_from(source).await;
        assert_eq!(got, banner, "client {source}");
    }
    let (_c, got) = SmtpClient::connect(h.v6, ip("::1")).await;
    assert_eq!(got, "220 V6 Loopback ready");
    // The Lab connector has no STARTTLS: only the Default Frontend offers it.
    let (mut c, _) = h.front_from("127.0.0.20").await;
    assert!(!c.cmd("EHLO x").await.contains("STARTTLS"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_then_auth_relays_anywhere() {
    let h = Harness::start(LIMITS).await;
    let (mut c, _) = SmtpClient::connect(h.client, ip("127.0.0.1")).await;
    let ehlo = c.cmd("EHLO device").await;
    assert!(ehlo.ends_with("250 STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("scanner", PASSWORD)))
            .await,
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    assert_eq!(
        c.starttls(&h.ca).await.unwrap(),
        "220 2.0.0 SMTP server ready"
    );
    assert_eq!(c.tls_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let ehlo = c.cmd("EHLO device").await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    // AUTH LOGIN this time.
    assert_eq!(c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd("c2Nhbm5lcg==").await, "334 UGFzc3dvcmQ6");
    assert_eq!(
        c.cmd("czNjcmV0").await,
        "235 2.7.0 Authentication successful"
    );
    let r = send_message(
        &mut c,
        "scanner@example.test",
        "boss@elsewhere.test",
        "Subject: x\r\n\r\ny\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.6.0"), "{r}");
    let spool = spooled(&h.data());
    assert_eq!(spool[0].0["user"], "scanner");
    assert!(String::from_utf8_lossy(&spool[0].1).contains("with ESMTPSA id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_tarpitted() {
    let h = Harness::start(LIMITS).await;
    let (mut c, _) = SmtpClient::connect(h.client, ip("127.0.0.1")).await;
    c.cmd("EHLO device").await;
    c.starttls(&h.ca).await.unwrap();
    c.cmd("EHLO device").await;
    let t = Instant::now();
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("scanner", "wrong")))
            .await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "no tarpit: {:?}",
        t.elapsed()
    );
    // An unknown user gets the same answer.
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("nobody", PASSWORD)))
            .await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<scanner@example.test>").await,
        "530 5.7.1 Client was not authenticated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_sender_and_source_restrictions() {
    let h = Harness::start(LIMITS).await;
    let mut c = h.authenticated("127.0.0.1", "scanner").await;
    assert_eq!(
        c.cmd("MAIL FROM:<ceo@example.test>").await,
        "550 5.7.1 Sender <ceo@example.test> is not allowed for user scanner"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<unit7@devices.example.test>").await,
        "250 2.1.0 Sender OK"
    );

    let mut c = h.authenticated("127.0.0.41", "printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<printer@example.test>").await,
        "550 5.7.1 User printer may not send from 127.0.0.41"
    );
    let mut c = h.authenticated("127.0.0.40", "printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<anyone@anywhere.test>").await,
        "250 2.1.0 Sender OK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_and_recipient_limits() {
    let h = Harness::start(LIMITS).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    assert!(c.cmd("EHLO x").await.contains("250-SIZE 65536"));
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test> SIZE=70000").await,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test> SIZE=1000").await,
        "250 2.1.0 Sender OK"
    );
    for n in 0..3 {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<u{n}@example.test>")).await,
            "250 2.1.5 Recipient OK"
        );
    }
    assert_eq!(
        c.cmd("RCPT TO:<u9@example.test>").await,
        "452 4.5.3 Too many recipients"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    let big = "x".repeat(1000);
    for _ in 0..70 {
        c.send(format!("{big}\r\n").as_bytes()).await.unwrap();
    }
    c.send(b".\r\n").await.unwrap();
    assert_eq!(
        c.reply().await,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    // The session goes on; nothing was queued.
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    assert!(spooled(&h.data()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_connection_cap() {
    let h = Harness::start(LIMITS).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (c, banner) = h.front_from("127.0.0.50").await;
        assert_eq!(banner, "220 Default Frontend ready");
        open.push(c);
    }
    let (mut c, refused) = h.front_from("127.0.0.50").await;
    assert_eq!(
        refused,
        "421 4.3.2 Too many connections from your address, try again later"
    );
    assert!(c.is_closed().await);
    // Another source is not affected; a freed place is reused.
    let (_other, banner) = h.front_from("127.0.0.51").await;
    assert_eq!(banner, "220 Default Frontend ready");
    drop(open.pop());
    let ok = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_c, banner) = h.front_from("127.0.0.50").await;
            if banner == "220 Default Frontend ready" {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(ok.is_ok(), "the freed place was never given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_end_the_session_with_421_4_4_2() {
    let h = Harness::start(r#"{ command_timeout = "1s", data_timeout = "1s" }"#).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    let t = Instant::now();
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Connection timed out, closing transmission channel"
    );
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert!(c.is_closed().await);
    // In the middle of DATA: the half message is dropped.
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.cmd("HELO x").await;
    c.cmd("MAIL FROM:<a@example.test>").await;
    c.cmd("RCPT TO:<b@example.test>").await;
    c.cmd("DATA").await;
    c.send(b"Subject: half\r\n").await.unwrap();
    assert_eq!(
        c.reply().await,
        "421 4.4.2 Connection timed out, closing transmission channel"
    );
    assert!(spooled(&h.data()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_close_after_the_limit() {
    let h = Harness::start(LIMITS).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    for _ in 0..4 {
        assert_eq!(c.cmd("BOGUS").await, "500 5.5.1 Command unrecognized");
    }
    assert_eq!(
        c.cmd("BOGUS").await,
        "421 4.7.0 Too many errors on this connection, closing transmission channel"
    );
    assert!(c.is_closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transaction_dot_stuffing_and_bare_lf() {
    let h = Harness::start(LIMITS).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.send(
        b"EHLO app\r\nMAIL FROM:<app@example.test>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n\
Subject: dots\r\n\r\n..leading dot\r\n...two\r\nbare\nlf\n.\nnot the end\r\n.\r\nQUIT\r\n",
    )
    .await
    .unwrap();
    let mut replies = Vec::new();
    for _ in 0..7 {
        replies.push(c.reply().await);
    }
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(codes, ["250", "250", "250", "250", "354", "250", "221"]);
    let spool = spooled(&h.data());
    assert_eq!(spool.len(), 1);
    let msg = String::from_utf8_lossy(&spool[0].1);
    assert!(
        msg.ends_with(
            "Subject: dots\r\n\r\n.leading dot\r\n..two\r\nbare\r\nlf\r\n.\r\nnot the end\r\n"
        ),
        "{msg:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_log_of_one_session() {
    let h = Harness::start(LIMITS).await;
    let mut c = h.authenticated("127.0.0.1", "scanner").await;
    send_message(
        &mut c,
        "scanner@example.test",
        "x@elsewhere.test",
        "Subject: log\r\n\r\nbody\r\n",
    )
    .await;
    c.cmd("QUIT").await;
    assert!(c.is_closed().await);
    // Log lines are written by a thread of their own: wait for them.
    h.worker.flush_logs().await;
    let dir = h.data().join("logs/smtp-receive");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("RECV") && name.ends_with(".LOG"), "{name}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(
        "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context"
    ));
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.splitn(9, ',').collect())
        .collect();
    let events: Vec<(&str, &str)> = rows.iter().map(|r| (r[6], r[7])).collect();
    let expected_start = [
        ("+", ""),
        ("*", "AuthenticatedUsers"),
        (">", "220 Client Frontend ready"),
        ("<", "EHLO device"),
        (">", "250-relay.test Hello device"),
    ];
    assert_eq!(&events[..5], &expected_start);
    assert!(events.contains(&("<", "AUTH PLAIN")));
    assert!(events.contains(&(">", "235 2.7.0 Authentication successful")));
    assert!(events.contains(&("<", "MAIL FROM:<scanner@example.test>")));
    assert_eq!(events.last(), Some(&("-", "")));
    assert_eq!(rows.last().unwrap()[8], "Remote quit");
    // The password never reaches the log, in any form.
    assert!(!text.contains(PASSWORD) && !text.contains(&plain("scanner", PASSWORD)));
    // Sequence numbers count up within the session; remote is the client.
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[1], "Client Frontend");
        assert_eq!(r[3], i.to_string());
        assert!(r[5].starts_with("127.0.0.1:"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_vanishing_clients_and_huge_lines_never_hurt() {
    let h = Harness::start(LIMITS).await;
    // Garbage bytes, including NULs and invalid UTF-8.
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.send(&[0xff, 0x00, 0xfe, b'\r', b'\n', 0x80, 0x81, b'\n'])
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("500"));
    // A 10 MB line: one 500 5.5.2, then the session goes on.
    let (mut c, _) = h.front_from("127.0.0.1").await;
    let line = vec![b'A'; 10 * 1024 * 1024];
    let send = c.send(&line);
    let _ = tokio::time::timeout(Duration::from_secs(30), send).await;
    c.send(b"\r\nNOOP\r\n").await.unwrap();
    assert_eq!(c.reply().await, "500 5.5.2 Line too long");
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    // A client vanishing mid-DATA leaves nothing behind.
    for i in 0..5 {
        let (mut c, _) = h.front_from(&format!("127.0.0.{}", 60 + i)).await;
        c.cmd("HELO x").await;
        c.cmd("MAIL FROM:<a@example.test>").await;
        c.cmd("RCPT TO:<b@example.test>").await;
        c.cmd("DATA").await;
        c.send(b"Subject: cut\r\n\r\npartial body").await.unwrap();
        drop(c);
    }
    // The worker still serves, and the spool holds only whole messages.
    let (mut c, _) = h.front_from("127.0.0.2").await;
    c.cmd("HELO x").await;
    let r = send_message(
        &mut c,
        "a@example.test",
        "b@example.test",
        "Subject: whole\r\n\r\nok\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.6.0"));
    let spool = spooled(&h.data());
    assert_eq!(spool.len(), 1);
    assert!(String::from_utf8_lossy(&spool[0].1).ends_with("Subject: whole\r\n\r\nok\r\n"));
    assert_eq!(spool_leftovers(&h.data()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_transactions_finish_and_tells_idle_sessions() {
    let h = Harness::start(LIMITS).await;
    let (mut idle, _) = h.front_from("127.0.0.1").await;
    idle.cmd("HELO idle").await;
    let (mut busy, _) = h.front_from("127.0.0.2").await;
    busy.cmd("HELO busy").await;
    busy.cmd("MAIL FROM:<a@example.test>").await;
    busy.cmd("RCPT TO:<b@example.test>").await;
    busy.cmd("DATA").await;
    busy.send(b"Subject: in flight\r\n\r\n").await.unwrap();

    h.worker.shutdown_token().cancel();
    assert_eq!(
        idle.reply().await,
        "421 4.3.2 Service shutting down, closing transmission channel"
    );
    assert!(idle.is_closed().await);
    // New connections are no longer accepted.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match SmtpClient::connect_from(h.front, ip("127.0.0.3")).await {
                Err(_) => return,
                Ok(mut c) => {
                    if c.reply().await.is_empty() {
                        return;
                    }
                }
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok(), "still accepting after shutdown");
    busy.send(b"body\r\n.\r\n").await.unwrap();
    assert!(busy.reply().await.starts_with("250 2.6.0"));
    assert_eq!(
        busy.reply().await,
        "421 4.3.2 Service shutting down, closing transmission channel"
    );
    assert!(busy.is_closed().await);
    let data = h.data();
    tokio::time::timeout(Duration::from_secs(10), h.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(spooled(&data).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_disk_space_refuses_new_mail_and_reports_not_ready() {
    // No disk has this much free: the worker is under its floor at once.
    let h = Harness::start_with(LIMITS, "[spool]\nmin_free_space = \"1000000000GB\"", None).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.cmd("HELO x").await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test>").await,
        "452 4.3.1 Insufficient system resources"
    );
    assert!(!h.worker.is_ready());
    assert!(spooled(&h.data()).is_empty());

    // With room to spare, the same worker setup accepts and is ready.
    let h = Harness::start_with(LIMITS, "[spool]\nmin_free_space = \"1MB\"", None).await;
    let (mut c, _) = h.front_from("127.0.0.1").await;
    c.cmd("HELO x").await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    let ready = tokio::time::timeout(Duration::from_secs(5), async {
        while !h.worker.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ready.is_ok());
}

/// Under TLS the session reads straight from rustls's buffer, holding no
/// buffer of its own between commands: a pipelined batch is answered in
/// order, a 12 KB AUTH line sent in pieces is read whole (its `501`, not
/// `500 5.5.2 Line too long`), a longer one gets `500 5.5.2`, and the
/// session goes on to authenticate after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_session_reads_pipelined_batches_and_long_lines() {
    let h = Harness::start(LIMITS).await;
    let (mut c, _) = SmtpClient::connect(h.client, ip("127.0.0.1")).await;
    c.cmd("EHLO device").await;
    c.starttls(&h.ca).await.unwrap();
    c.send(b"EHLO device\r\nNOOP\r\nRSET\r\n").await.unwrap();
    let ehlo = c.reply().await;
    assert!(ehlo.ends_with("250 AUTH PLAIN LOGIN"), "{ehlo}");
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    assert_eq!(c.reply().await, "250 2.0.0 Resetting");
    // 12 000 octets of base64 (zeros once decoded): a line within the
    // AUTH limit, malformed as PLAIN.
    let long = format!("AUTH PLAIN {}\r\n", "A".repeat(12_000));
    for piece in long.as_bytes().chunks(5_000) {
        c.send(piece).await.unwrap();
    }
    assert_eq!(c.reply().await, "501 5.5.2 malformed PLAIN response");
    let too_long = format!("AUTH PLAIN {}\r\nNOOP\r\n", "A".repeat(20_000));
    c.send(too_long.as_bytes()).await.unwrap();
    assert_eq!(c.reply().await, "500 5.5.2 Line too long");
    assert_eq!(c.reply().await, "250 2.0.0 OK");
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("scanner", PASSWORD)))
            .await,
        "235 2.7.0 Authentication successful"
    );
}
