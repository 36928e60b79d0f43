//! Session tests over in-memory input: what a client sends, what it reads.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use ferry_smtp::{AuthOffer, Event, Reply, ServerSession, SessionConfig};

fn config() -> SessionConfig {
    SessionConfig {
        hostname: "relay.test".into(),
        max_message_size: 1000,
        max_recipients: 2,
        max_header_size: 200,
        max_hop_count: 3,
        max_errors: 5,
        starttls: true,
        auth: AuthOffer::AfterTls,
        transcript: true,
        chunk_size: 64,
    }
}

/// Feeds `input`, accepting every decision; returns what the client reads
/// and the messages that were handed over.
fn run(session: &mut ServerSession, input: &[u8]) -> (String, Vec<Vec<u8>>) {
    session.push(input);
    let mut out = Vec::new();
    let mut messages = Vec::new();
    let mut current = Vec::new();
    while let Some(event) = session.next_event() {
        if let Event::Chunk(c) = &event {
            current.extend_from_slice(c);
            continue;
        }
        let reply = match event {
            Event::Reply(r) | Event::Close(r) => r,
            Event::Mail(_) => session.decide(Reply::new(250, "2.1.0 Sender OK")),
            Event::Rcpt(_) => session.decide(Reply::new(250, "2.1.5 Recipient OK")),
            Event::Chunk(_) => continue,
            Event::Message(end) => {
                current.extend_from_slice(&end.tail);
                assert_eq!(end.size, current.len());
                messages.push(std::mem::take(&mut current));
                session.decide(Reply::new(250, "2.6.0 Queued mail for delivery"))
            }
            Event::StartTls => {
                let r = session.decide(Reply::new(220, "2.0.0 SMTP server ready"));
                session.tls_established();
                r
            }
            Event::Auth(c) if c.password == "good" => {
                session.decide(Reply::new(235, "2.7.0 Authentication successful"))
            }
            Event::Auth(_) => session.decide(Reply::new(535, "5.7.8 Authentication failed")),
        };
        reply.write_to(&mut out);
    }
    (String::from_utf8(out).unwrap(), messages)
}

fn codes(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect()
}

#[test]
fn pipelined_transaction_in_one_write_gets_replies_in_order() {
    let mut s = ServerSession::new(config());
    let (out, msgs) = run(
        &mut s,
        b"EHLO dev\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
    );
    assert_eq!(codes(&out), ["250", "250", "250", "354", "250", "221"]);
    assert_eq!(msgs, vec![b"Subject: hi\r\n\r\n.dot\r\n".to_vec()]);
    assert!(s.is_closed());
}

#[test]
fn ehlo_advertises_extensions_and_auth_only_after_tls() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"EHLO dev\r\n");
    for ext in [
        "SIZE 1000",
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "STARTTLS",
    ] {
        assert!(out.contains(ext), "{ext} missing in {out}");
    }
    assert!(!out.contains("AUTH"));
    let (out, _) = run(&mut s, b"AUTH PLAIN AGZvbwBnb29k\r\n");
    assert_eq!(out, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    let (out, _) = run(&mut s, b"STARTTLS\r\nEHLO dev\r\n");
    // The pipelined EHLO after STARTTLS is discarded (RFC 3207 §4.2).
    assert_eq!(out, "220 2.0.0 SMTP server ready\r\n");
    assert!(s.helo().is_none());
    let (out, _) = run(&mut s, b"EHLO dev\r\n");
    assert!(out.contains("AUTH PLAIN LOGIN") && !out.contains("STARTTLS"));
    // "\0foo\0good"
    let (out, _) = run(&mut s, b"AUTH PLAIN AGZvbwBnb29k\r\n");
    assert_eq!(out, "235 2.7.0 Authentication successful\r\n");
    assert_eq!(s.user(), Some("foo"));
}

#[test]
fn auth_login_dialogue_and_transcript_hides_secrets() {
    let mut c = config();
    c.auth = AuthOffer::Always;
    let mut s = ServerSession::new(c);
    run(&mut s, b"EHLO dev\r\n");
    let (out, _) = run(&mut s, b"AUTH LOGIN\r\n");
    assert_eq!(out, "334 VXNlcm5hbWU6\r\n");
    let (out, _) = run(&mut s, b"Zm9v\r\n");
    assert_eq!(out, "334 UGFzc3dvcmQ6\r\n");
    let (out, _) = run(&mut s, b"YmFk\r\n");
    assert_eq!(out, "535 5.7.8 Authentication failed\r\n");
    assert_eq!(s.user(), None);
    let log = s.take_transcript().join("|");
    assert_eq!(log, "EHLO dev|AUTH LOGIN|****|****");
    let (_, _) = run(&mut s, b"AUTH PLAIN AGZvbwBnb29k\r\n");
    assert_eq!(s.take_transcript(), vec!["AUTH PLAIN"]);
}

#[test]
fn a_password_sent_after_a_refused_login_user_name_stays_out_of_the_transcript() {
    let mut c = config();
    c.auth = AuthOffer::Always;
    let mut s = ServerSession::new(c);
    run(&mut s, b"EHLO dev\r\n");
    run(&mut s, b"AUTH LOGIN\r\n");
    // A user name that is not UTF-8 ends the exchange; a client that does
    // not wait for the reply sends its password anyway ("pw").
    let (out, _) = run(&mut s, b"/w==\r\ncHc=\r\n");
    assert!(
        out.starts_with("501 5.5.2 SASL response is not UTF-8\r\n500 "),
        "{out}"
    );
    assert_eq!(
        s.take_transcript().join("|"),
        "EHLO dev|AUTH LOGIN|****|****"
    );
    // Only that one line.
    run(&mut s, b"NOOP\r\n");
    assert_eq!(s.take_transcript(), vec!["NOOP"]);
}

#[test]
fn sequence_and_syntax_errors() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"MAIL FROM:<a@x.test>\r\n");
    assert_eq!(out, "503 5.5.1 Send hello first\r\n");
    let (out, _) = run(
        &mut s,
        b"EHLO dev\r\nRCPT TO:<b@y.test>\r\nDATA\r\nMAIL FROM:a@x\r\n",
    );
    assert_eq!(codes(&out), ["250", "503", "503", "501"]);
    assert!(out.contains("501 5.5.4 Syntax"));
}

#[test]
fn too_many_errors_close_the_session() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"A\r\nB\r\nC\r\nD\r\nE\r\nNOOP\r\n");
    assert_eq!(codes(&out), ["500", "500", "500", "500", "421"]);
    assert!(s.is_closed());
}

#[test]
fn long_command_line_gets_500_5_5_2_and_is_skipped_to_its_end() {
    let mut s = ServerSession::new(config());
    let mut input = b"NOOP ".to_vec();
    input.extend(std::iter::repeat_n(b'x', 600));
    let (out, _) = run(&mut s, &input);
    assert_eq!(out, "500 5.5.2 Line too long\r\n");
    assert_eq!(s.buffered(), 0, "over-long line must not be kept");
    let (out, _) = run(&mut s, b"yyy\r\nNOOP\r\n");
    assert_eq!(out, "250 2.0.0 OK\r\n");
    // Exactly 512 octets with CRLF is fine.
    let mut line = b"NOOP ".to_vec();
    line.extend(std::iter::repeat_n(b'z', 505));
    line.extend(b"\r\n");
    assert_eq!(line.len(), 512);
    assert_eq!(run(&mut s, &line).0, "250 2.0.0 OK\r\n");
}

#[test]
fn size_limits_at_mail_and_at_end_of_data() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"EHLO d\r\nMAIL FROM:<a@x.test> SIZE=5000\r\n");
    assert!(out.ends_with("552 5.3.4 Message size exceeds fixed maximum message size\r\n"));
    let mut input = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 2000));
    input.extend(b"\r\n.\r\nNOOP\r\n");
    let (out, msgs) = run(&mut s, &input);
    assert_eq!(codes(&out), ["250", "250", "354", "552", "250"]);
    assert!(msgs.is_empty());
    assert!(!s.in_transaction());
}

#[test]
fn recipient_cap_and_hop_count_and_header_size() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(
        &mut s,
        b"HELO d\r\nMAIL FROM:<>\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n",
    );
    assert!(out.ends_with("452 4.5.3 Too many recipients\r\n"));
    assert_eq!(s.envelope().rcpt_to.len(), 2);
    let (out, _) = run(
        &mut s,
        b"DATA\r\nReceived: 1\r\nReceived: 2\r\nReceived: 3\r\nReceived: 4\r\n\r\nx\r\n.\r\n",
    );
    assert!(out.ends_with("554 5.4.6 Hop count exceeded - possible mail loop\r\n"));
    let mut input = b"MAIL FROM:<>\r\nRCPT TO:<a@y>\r\nDATA\r\nX-Long: ".to_vec();
    input.extend(std::iter::repeat_n(b'h', 300));
    input.extend(b"\r\n\r\nbody\r\n.\r\n");
    let (out, _) = run(&mut s, &input);
    assert!(out.ends_with("552 5.3.4 Message header size exceeds limit\r\n"));
}

#[test]
fn unadvertised_mail_parameters_are_refused() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"EHLO d\r\nMAIL FROM:<a@x> BODY=BINARYMIME\r\n");
    assert!(out.ends_with("555 5.5.4 Unsupported parameter BODY=BINARYMIME\r\n"));
    let (out, _) = run(&mut s, b"MAIL FROM:<a@x> RET=HDRS\r\n");
    assert!(out.ends_with("555 5.5.4 Unsupported parameter RET=HDRS\r\n"));
    let (out, _) = run(&mut s, b"MAIL FROM:<a@x> BODY=8BITMIME SMTPUTF8\r\n");
    assert!(out.ends_with("250 2.1.0 Sender OK\r\n"));
    assert!(s.envelope().mail_from.as_ref().unwrap().body_8bit);
}

#[test]
fn vrfy_help_rset() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"VRFY bob\r\nHELP\r\nRSET\r\n");
    assert_eq!(codes(&out), ["252", "214", "250"]);
    // HELP names only what the session is offered now, as EHLO does: AUTH
    // only after STARTTLS here, and STARTTLS only before it.
    assert!(out.contains("214 2.0.0 HELO EHLO STARTTLS MAIL"), "{out}");
    s.tls_established();
    let (out, _) = run(&mut s, b"HELP\r\n");
    assert!(out.contains("214 2.0.0 HELO EHLO AUTH MAIL"), "{out}");
    let mut c = config();
    c.starttls = false;
    c.auth = AuthOffer::Never;
    let mut s = ServerSession::new(c);
    let (out, _) = run(&mut s, b"HELP\r\n");
    assert!(out.contains("214 2.0.0 HELO EHLO MAIL RCPT"), "{out}");
}

/// RFC 5321 §4.1.1.1: the greeting names a domain; control characters and
/// undecodable octets never reach the Received header or the logs.
#[test]
fn helo_names_with_control_characters_are_refused() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(
        &mut s,
        b"EHLO a\x00b\r\nHELO a\x1b[31mred\r\nEHLO \xc3\xa4\xff\r\nEHLO my_printer\r\n",
    );
    assert_eq!(codes(&out), ["501", "501", "501", "250"]);
    assert!(
        out.starts_with("501 5.5.4 Invalid domain name\r\n"),
        "{out}"
    );
    assert_eq!(s.helo(), Some("my_printer"));
    // The transcript for the protocol log shows control characters escaped.
    let lines = s.take_transcript();
    assert_eq!(lines[1], "HELO a\\x1b[31mred");
}

/// Every RFC 5321 §4.1.2 path form: kept as written, in the envelope.
#[test]
fn every_path_form_is_taken_and_kept_as_written() {
    let mut c = config();
    c.max_recipients = 10;
    let mut s = ServerSession::new(c);
    let (out, _) = run(
        &mut s,
        b"EHLO d\r\nMAIL FROM:<scanner@[127.0.0.30]>\r\nRCPT TO:<Postmaster>\r\n\
          RCPT TO:<\"odd user\"@example.test>\r\nRCPT TO:<\"a>x\"@example.test>\r\n\
          RCPT TO:<ops@[192.0.2.25]>\r\nRCPT TO:<ops@[IPv6:2001:db8::25]>\r\n\
          RCPT TO:<@relay.test:user@Example.TEST.>\r\n",
    );
    assert_eq!(
        codes(&out),
        ["250", "250", "250", "250", "250", "250", "250", "250"]
    );
    let env = s.envelope();
    assert_eq!(
        env.mail_from.as_ref().unwrap().address.to_string(),
        "scanner@[127.0.0.30]"
    );
    let written: Vec<String> = env.rcpt_to.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        written,
        [
            "Postmaster",
            "\"odd user\"@example.test",
            "\"a>x\"@example.test",
            "ops@[192.0.2.25]",
            "ops@[IPv6:2001:db8::25]",
            "user@Example.TEST",
        ]
    );
}

/// RFC 6531 §3.4: non-ASCII addresses only with SMTPUTF8 on MAIL.
#[test]
fn non_ascii_addresses_need_smtputf8() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(
        &mut s,
        b"EHLO d\r\nMAIL FROM:<j\xc3\xbcrgen@example.test>\r\n",
    );
    assert!(
        out.ends_with(
            "553 5.6.7 Non-ASCII addresses not permitted for that sender without SMTPUTF8\r\n"
        ),
        "{out}"
    );
    let (out, _) = run(
        &mut s,
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@b\xc3\xbccher.test>\r\n",
    );
    assert!(
        out.ends_with(
            "553 5.6.7 Non-ASCII addresses not permitted for that recipient without SMTPUTF8\r\n"
        ),
        "{out}"
    );
    let (out, _) = run(&mut s, b"RSET\r\nMAIL FROM:<j\xc3\xbcrgen@example.test> SMTPUTF8\r\nRCPT TO:<b@b\xc3\xbccher.test>\r\n");
    assert_eq!(codes(&out), ["250", "250", "250"]);
}

#[test]
fn malformed_paths_get_501_with_the_reason() {
    let mut s = ServerSession::new(config());
    let (out, _) = run(&mut s, b"EHLO d\r\nMAIL FROM:<a b@x.test>\r\nMAIL FROM:<>\r\nRCPT TO:<a@[300.1.1.1]>\r\nRCPT TO:<Postmaster@>\r\nRCPT TO:<a@x.test> NOTIFY=NEVER\r\n");
    let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with("250")).collect();
    assert_eq!(
        lines,
        [
            "501 5.1.7 Invalid address: invalid local part",
            "501 5.1.3 Invalid address: invalid address literal",
            "501 5.1.3 Invalid address: invalid domain",
            "555 5.5.4 Unsupported parameter NOTIFY=NEVER",
        ]
    );
}

/// RFC 4954 §4: `=` is an empty initial response, not bad base64.
#[test]
fn auth_plain_with_an_empty_initial_response() {
    let mut c = config();
    c.auth = AuthOffer::Always;
    let mut s = ServerSession::new(c);
    let (out, _) = run(&mut s, b"EHLO d\r\nAUTH PLAIN =\r\n");
    assert!(
        out.ends_with("501 5.5.2 malformed PLAIN response\r\n"),
        "{out}"
    );
    // `=` is special only in an initial response; after a challenge it is
    // not base64.
    let (out, _) = run(&mut s, b"AUTH PLAIN\r\n=\r\n");
    assert!(
        out.ends_with("501 5.5.2 invalid base64 in SASL response\r\n"),
        "{out}"
    );
    // LOGIN with an empty initial response goes on to the password.
    let (out, _) = run(&mut s, b"AUTH LOGIN =\r\n");
    assert!(out.ends_with("334 UGFzc3dvcmQ6\r\n"), "{out}");
}

/// A session waiting for a command holds no input buffer, whatever came
/// before: a 12 KB AUTH line, a 40 KB over-long line, a pipelined batch.
/// Each still gets its reply, and the session goes on afterwards.
#[test]
fn a_waiting_session_holds_no_input_buffer_after_long_lines() {
    let mut s = ServerSession::new(config());
    assert_eq!(s.buffer_capacity(), 0);
    let (out, _) = run(&mut s, b"EHLO x\r\n");
    assert!(out.ends_with("250 STARTTLS\r\n"), "{out}");
    assert_eq!(s.buffer_capacity(), 0, "after EHLO");
    // Just under the AUTH line limit: answered (530: AUTH needs TLS here).
    let mut auth = b"AUTH PLAIN ".to_vec();
    auth.extend(std::iter::repeat_n(b'A', 12_000));
    auth.extend(b"\r\n");
    let (out, _) = run(&mut s, &auth);
    assert_eq!(out, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    assert_eq!(s.buffer_capacity(), 0, "after a 12 KB AUTH line");
    // Over the limit, in 4 KB reads as they come off a socket.
    let long = vec![b'x'; 40 * 1024];
    let mut out = String::new();
    for chunk in long.chunks(4096) {
        out.push_str(&run(&mut s, chunk).0);
        assert!(s.buffer_capacity() <= 2 * 4096, "{}", s.buffer_capacity());
    }
    assert_eq!(out, "500 5.5.2 Line too long\r\n");
    let (out, _) = run(&mut s, b"\r\nNOOP\r\nNOOP\r\nRSET\r\n");
    assert_eq!(
        out,
        "250 2.0.0 OK\r\n250 2.0.0 OK\r\n250 2.0.0 Resetting\r\n"
    );
    assert_eq!(s.buffer_capacity(), 0, "after the batch");
    // A partial line is kept until its end arrives.
    let (out, _) = run(&mut s, b"NO");
    assert_eq!(out, "");
    let (out, _) = run(&mut s, b"OP\r\n");
    assert_eq!(out, "250 2.0.0 OK\r\n");
    assert_eq!(s.buffer_capacity(), 0);
}
