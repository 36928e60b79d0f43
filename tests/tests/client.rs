//! The shared SMTP client (`ferry-client`) over real TCP and TLS on
//! loopback: a result per recipient with RCPTs pipelined, SIZE honoured
//! before anything is sent, address families alternated with each
//! failure reported, HELO when EHLO is refused, implicit TLS verified.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use ferry_client::{
    AttemptFailure, Error, Line, Outcome, Settings, Target, TlsMode, TlsSettings, Transaction,
    Transcript, Verify,
};
use ferry_smtp::{Mailbox, ReversePath};
use ferry_tests::sink::SmtpSink;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Keeps a transcript's lines.
#[derive(Default)]
struct Kept(Mutex<Vec<String>>);

impl Transcript for Kept {
    fn line(&self, line: Line<'_>) {
        let text = match line {
            Line::Sent { text, tls } => format!("{}> {text}", if tls { "~" } else { "-" }),
            Line::Received { text, tls } => format!("<{} {text}", if tls { "~" } else { "-" }),
            Line::Note(text) => format!("== {text}"),
        };
        self.0.lock().unwrap().push(text);
    }
}

fn settings(kept: &Arc<Kept>) -> Settings {
    Settings {
        helo: "client.test".into(),
        transcript: Some(kept.clone()),
        ..Settings::default()
    }
}

fn mailboxes(list: &[&str]) -> Vec<Mailbox> {
    list.iter().map(|m| Mailbox::parse(m).unwrap()).collect()
}

#[tokio::test]
async fn each_recipient_gets_its_result_with_rcpts_pipelined() {
    let sink = SmtpSink::start().await;
    let kept = Arc::new(Kept::default());
    let mut session = ferry_client::open(&Target::address(sink.addr), &settings(&kept))
        .await
        .unwrap();
    assert!(session.capabilities().pipelining);
    let from = ReversePath::parse("app@example.test").unwrap();
    let to = mailboxes(&["ok@sink.test", "temp@sink.test", "perm@sink.test"]);
    let results = session
        .send(&Transaction {
            mail_from: &from,
            recipients: &to,
            message: b"Subject: three\r\n\r\n.leading dot\r\n",
            body_8bit: false,
            smtputf8: false,
        })
        .await
        .unwrap();
    session.quit().await;
    let got: Vec<(String, Outcome, String)> = results
        .iter()
        .map(|r| (r.recipient.to_string(), r.outcome, r.reply.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "ok@sink.test".into(),
                Outcome::Accepted,
                "250 2.0.0 queued as SINK".into()
            ),
            (
                "temp@sink.test".into(),
                Outcome::Temporary,
                "450 4.2.0 mailbox busy".into()
            ),
            (
                "perm@sink.test".into(),
                Outcome::Permanent,
                "550 5.1.1 no such user".into()
            ),
        ]
    );
    // MAIL and the three RCPTs went in one batch, before any reply.
    let lines = kept.0.lock().unwrap().clone();
    let mail = lines
        .iter()
        .position(|l| l.starts_with("-> MAIL FROM:"))
        .unwrap();
    assert_eq!(
        lines[mail..mail + 5],
        [
            "-> MAIL FROM:<app@example.test> SIZE=32",
            "-> RCPT TO:<ok@sink.test>",
            "-> RCPT TO:<temp@sink.test>",
            "-> RCPT TO:<perm@sink.test>",
            "<- 250 2.1.0 OK",
        ]
    );
    let got = sink.wait_for(1, std::time::Duration::from_secs(10)).await;
    assert_eq!(got[0].rcpt_to, ["ok@sink.test"]);
    // Dot-stuffed on the wire.
    assert!(got[0].data.ends_with(b"..leading dot\r\n"));
}

#[tokio::test]
async fn a_message_over_the_servers_size_is_not_sent() {
    let sink = SmtpSink::start().await;
    sink.limit_size(100);
    let kept = Arc::new(Kept::default());
    let mut session = ferry_client::open(&Target::address(sink.addr), &settings(&kept))
        .await
        .unwrap();
    let from = ReversePath::parse("app@example.test").unwrap();
    let to = mailboxes(&["big@sink.test"]);
    let message = vec![b'x'; 1000];
    let err = session
        .send(&Transaction {
            mail_from: &from,
            recipients: &to,
            message: &message,
            body_8bit: false,
            smtputf8: false,
        })
        .await
        .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(
        err.to_string(),
        format!(
            "552 5.3.4 Message size 1000 exceeds the limit 100 of {}",
            sink.addr
        )
    );
    session.quit().await;
    assert_eq!(sink.rcpt_count("big@sink.test"), 0);
}

#[tokio::test]
async fn families_alternate_and_each_failure_is_reported() {
    let sink = SmtpSink::start().await;
    let port = sink.addr.port();
    // Nothing on [::1] at the sink's port (checked): the first address,
    // IPv6, fails at once, and the next tried is 127.0.0.1, not ::2 (the
    // families alternate, RFC 8305 §4).
    assert!(
        std::net::TcpListener::bind(("::1", port)).is_ok(),
        "[::1]:{port} is taken"
    );
    let target = Target {
        host: "relay.test".into(),
        port,
        addresses: Some(vec![
            "::1".parse().unwrap(),
            "::2".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ]),
        label: None,
    };
    let kept = Arc::new(Kept::default());
    let session = ferry_client::connect(&target, &settings(&kept))
        .await
        .unwrap();
    assert_eq!(session.peer(), sink.addr);
    assert_eq!(session.label(), format!("relay.test[127.0.0.1]:{port}"));
    let failed = session.failed_attempts().to_vec();
    session.quit().await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        failed[0].addr,
        SocketAddr::new("::1".parse().unwrap(), port)
    );
    assert!(
        matches!(failed[0].failure, AttemptFailure::Connect(_)),
        "{failed:?}"
    );
    let lines = kept.0.lock().unwrap().clone();
    let tried: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("== Trying"))
        .collect();
    assert_eq!(
        tried,
        [
            &format!("== Trying [::1]:{port}..."),
            &format!("== Trying 127.0.0.1:{port}...")
        ]
    );

    // None answers: every address with its reason.
    let closed = SocketAddr::new(
        IpAddr::from([127, 0, 0, 1]),
        ferry_tests::free_port(IpAddr::from([127, 0, 0, 1])),
    );
    let err = ferry_client::connect(
        &Target {
            addresses: Some(vec!["::1".parse().unwrap(), closed.ip()]),
            ..Target::new("relay.test", closed.port())
        },
        &Settings::default(),
    )
    .await
    .err()
    .unwrap();
    let Error::Unreachable { attempts, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(attempts.len(), 2, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}: connect failed", closed.port())),
        "{err}"
    );
}

/// Serves one session on `stream`: `greeting`, then each line answered
/// by `answer` until QUIT.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    greeting: &str,
    answer: fn(&str) -> &'static str,
) {
    let mut stream = BufReader::new(stream);
    stream
        .write_all(format!("{greeting}\r\n").as_bytes())
        .await
        .unwrap();
    // Bounded: a session of a few commands.
    for _ in 0..32 {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let reply = answer(line.trim_end());
        stream
            .write_all(format!("{reply}\r\n").as_bytes())
            .await
            .unwrap();
        if reply.starts_with("221") {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

fn old_server(line: &str) -> &'static str {
    match line.split_whitespace().next().unwrap_or("") {
        "EHLO" => "502 5.5.1 EHLO not implemented",
        "HELO" => "250 old.test",
        "QUIT" => "221 bye",
        _ => "500 what?",
    }
}

#[tokio::test]
async fn helo_when_ehlo_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        serve(s, "220 old.test", old_server).await;
    });
    let kept = Arc::new(Kept::default());
    let session = ferry_client::open(&Target::address(addr), &settings(&kept))
        .await
        .unwrap();
    assert!(!session.capabilities().pipelining);
    session.quit().await;
    let lines = kept.0.lock().unwrap().clone();
    assert!(
        lines.contains(&"-> HELO client.test".to_string()),
        "{lines:#?}"
    );
}

fn tls_server(line: &str) -> &'static str {
    match line.split_whitespace().next().unwrap_or("") {
        "EHLO" => "250 tls.test",
        "QUIT" => "221 bye",
        _ => "500 what?",
    }
}

#[tokio::test]
async fn implicit_tls_is_verified_from_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    let pem = ferry_tests::make_certificate(dir.path());
    let key = std::fs::read(dir.path().join("test.key")).unwrap();
    let config = {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap()
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // Two sessions: one verified, one that refuses the certificate.
        for _ in 0..2 {
            let (s, _) = listener.accept().await.unwrap();
            if let Ok(tls) = acceptor.accept(s).await {
                serve(tls, "220 tls.test ready", tls_server).await;
            }
        }
    });
    let target = Target {
        host: "localhost".into(),
        ..Target::address(addr)
    };
    let kept = Arc::new(Kept::default());
    let mut trusted = settings(&kept);
    trusted.tls = TlsSettings {
        mode: TlsMode::Implicit,
        verify: Verify::ca_pem(&pem).unwrap(),
    };
    let session = ferry_client::open(&target, &trusted).await.unwrap();
    assert!(session.is_tls());
    session.quit().await;
    let lines = kept.0.lock().unwrap().clone();
    assert!(
        lines.contains(&"<~ 220 tls.test ready".to_string()),
        "{lines:#?}"
    );

    // The web PKI does not know this certificate: no session.
    let mut untrusted = trusted.clone();
    untrusted.tls.verify = Verify::WebPki;
    let err = ferry_client::open(&target, &untrusted).await.err().unwrap();
    assert!(
        matches!(&err, Error::Unreachable { attempts, .. }
        if matches!(&attempts[0].failure, AttemptFailure::Setup(why) if why.contains("certificate"))),
        "{err}"
    );
}

/// A name goes through the system resolver (here `/etc/hosts`): every
/// address of `localhost` is tried, and the one the sink listens on wins.
#[tokio::test]
async fn a_name_is_resolved_by_the_system() {
    let sink = SmtpSink::start().await;
    let kept = Arc::new(Kept::default());
    let session = ferry_client::connect(
        &Target::new("localhost", sink.addr.port()),
        &settings(&kept),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(session.peer(), sink.addr);
    assert_eq!(
        session.label(),
        format!("localhost[127.0.0.1]:{}", sink.addr.port())
    );
    session.quit().await;
    let err = ferry_client::connect(
        &Target::new("no-such-host.invalid", 25),
        &Settings::default(),
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, Error::Resolve { .. }), "{err}");
}
