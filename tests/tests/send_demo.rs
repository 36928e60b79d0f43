//! `ferry send` and the shared client against the real `ferry up` demo,
//! the README walkthrough's scenarios: internal relay accepted, external
//! relay refused with `550 5.7.54`, authenticated relay on the submission
//! port after STARTTLS verified with the demo CA (AUTH PLAIN from `ferry
//! send`, AUTH LOGIN from the library), an attachment that arrives byte
//! for byte, and the anonymous relay for 127.0.0.30.
//!
//! The demo's own ports are fixed (2525, 2587), so it runs the example
//! config on free ports and other loopback addresses (`ferry up`'s hidden
//! `--config` and `--listen`), as tests/up.rs does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_client::{
    Credentials, Line, Mechanism, Outcome, Settings, Target, TlsMode, TlsSettings, Transaction,
    Transcript, Verify,
};
use ferry_smtp::{Mailbox, ReversePath};
use ferry_tests::binary::{ferry_bin, ferry_send, SendRun};
use ferry_tests::free_port;
use mail_parser::MimeHeaders;

const EXAMPLE: &str = include_str!("../../deploy/examples/ferry.toml");
const WAIT: Duration = Duration::from_secs(60);
/// The demo device's password (deploy/examples/ferry.toml).
const PASSWORD: &str = "ferry-demo";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A running `ferry up`: its data directory, its balancer's address and
/// ports; every node killed on drop.
struct Demo {
    child: Child,
    data: tempfile::TempDir,
    pids: Vec<i32>,
    balancer: IpAddr,
    smtp: u16,
    submission: u16,
}

impl Demo {
    fn start(balancer: &str, workers: [&str; 2]) -> Demo {
        let addrs = [ip(balancer), ip(workers[0]), ip(workers[1])];
        let port = || {
            (0..50)
                .map(|_| free_port(addrs[0]))
                .find(|p| {
                    addrs[1..]
                        .iter()
                        .all(|a| std::net::TcpListener::bind(SocketAddr::new(*a, *p)).is_ok())
                })
                .expect("no port free on every address")
        };
        let (smtp, submission) = (port(), port());
        let config = EXAMPLE
            .replace("2525", &smtp.to_string())
            .replace("2587", &submission.to_string())
            .replace("127.0.0.11", workers[0])
            .replace("127.0.0.12", workers[1]);
        let data = tempfile::tempdir().unwrap();
        let given = data.path().join("given.toml");
        std::fs::write(&given, config).unwrap();
        let mut child = Command::new(ferry_bin())
            .arg("up")
            .arg("--data")
            .arg(data.path().join("ferry-data"))
            .arg("--config")
            .arg(&given)
            .args(["--listen", balancer])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(data.path().join("up.err")).unwrap())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut demo = Demo {
            child,
            data,
            pids: Vec::new(),
            balancer: addrs[0],
            smtp,
            submission,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("ferry up did not start");
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [_, "pid", pid, ..] = words.as_slice() {
                demo.pids.push(pid.parse().unwrap());
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        demo
    }

    fn dir(&self) -> PathBuf {
        self.data.path().join("ferry-data")
    }

    fn ca(&self) -> PathBuf {
        self.dir().join("certs/ca.crt")
    }

    /// The `.eml` files delivered to the demo's folder `mail/WHICH`.
    fn delivered(&self, which: &str) -> Vec<Vec<u8>> {
        let dir = self.dir().join("mail").join(which);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p: &PathBuf| p.extension().is_some_and(|e| e == "eml"));
        files.sort();
        files.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    /// Waits (bounded) until `mail/WHICH` holds `n` messages.
    fn wait_delivered(&self, which: &str, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.delivered(which);
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(args: &[&str], env: &[(&str, &str)]) -> SendRun {
    ferry_send(args, env, "")
}

#[test]
fn the_walkthrough_with_ferry_send() {
    let demo = Demo::start("127.0.0.90", ["127.0.0.91", "127.0.0.92"]);
    let smtp = format!("{}:{}", demo.balancer, demo.smtp);

    // Internal relay: anyone may mail the accepted domain.
    let run = send(
        &[
            "--server",
            &smtp,
            "--from",
            "app@example.test",
            "--to",
            "helpdesk@example.test",
        ]
        .into_iter()
        .chain(["--subject", "internal", "--body", "for the helpdesk"])
        .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.last_line()
            .starts_with("sent: helpdesk@example.test: 250 2.6.0"),
        "{run:?}"
    );
    let inside = demo.wait_delivered("example.test", 1);
    assert_eq!(inside.len(), 1);
    assert!(String::from_utf8_lossy(&inside[0]).contains("for the helpdesk"));

    // External relay, anonymously: refused with Exchange's wording.
    let run = send(
        &[
            "--server",
            &smtp,
            "--from",
            "app@example.test",
            "--to",
            "someone@outside.test",
            "--body",
            "x",
        ],
        &[],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(
        run.last_line(),
        "refused: someone@outside.test: 550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );

    // Authenticated relay on the submission port, after STARTTLS with the
    // demo CA verified, with an attachment.
    let attachment: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let file = demo.data.path().join("scan.pdf");
    std::fs::write(&file, &attachment).unwrap();
    // By address, as the README does: the certificate names 127.0.0.90
    // too (the library's test below uses the name localhost).
    let submission = format!("{}:{}", demo.balancer, demo.submission);
    let ca = demo.ca();
    let authenticated = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["--server", &submission, "--starttls"];
        args.extend(["--auth", "scanner", "--from", "scanner@example.test"]);
        args.extend(["--to", "someone@outside.test", "--subject", "scan"]);
        args.extend(extra);
        send(&args, env)
    };
    let run = authenticated(
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--body",
            "see attached",
            "--verbose",
        ]
        .into_iter()
        .chain([
            "--attach",
            file.to_str().unwrap(),
            "--header",
            "X-Device: scanner 3",
        ])
        .collect::<Vec<_>>(),
        &[("FERRY_SEND_PASSWORD", PASSWORD)],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let out = &run.stdout;
    for line in [
        "<-  220 Ferry Client Frontend ready",
        " -> STARTTLS",
        "=== TLS started: TLSv1_3",
        " ~> AUTH PLAIN ********",
        "<~  235 2.7.0 Authentication successful",
        " ~> RCPT TO:<someone@outside.test>",
        " ~> X-Device: scanner 3",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    assert!(
        !out.contains(PASSWORD),
        "the password in the transcript:\n{out}"
    );
    assert!(
        !out.contains(&ferry_tests::plain("scanner", PASSWORD)),
        "{out}"
    );
    assert!(
        run.last_line()
            .starts_with("sent: someone@outside.test: 250 2.6.0"),
        "{run:?}"
    );
    let outside = demo.wait_delivered("outside", 1);
    assert_eq!(outside.len(), 1);
    let message = mail_parser::MessageParser::default()
        .parse(&outside[0])
        .expect("a MIME message");
    assert_eq!(message.subject(), Some("scan"));
    assert_eq!(
        message.body_text(0).as_deref().map(str::trim_end),
        Some("see attached")
    );
    let part = message.attachment(0).expect("the attachment");
    assert_eq!(part.attachment_name(), Some("scan.pdf"));
    let ct = part.content_type().expect("a content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("application", Some("pdf")));
    assert!(
        part.contents() == attachment.as_slice(),
        "the attachment changed on its way"
    );
    assert!(message.date().is_some() && message.message_id().is_some());

    // Without the demo CA the certificate is not trusted: no session.
    let run = authenticated(&["--body", "x"], &[("FERRY_SEND_PASSWORD", PASSWORD)]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.last_line()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{run:?}"
    );
    // A wrong password: refused permanently, nothing sent.
    let run = authenticated(
        &["--ca", ca.to_str().unwrap(), "--body", "x"],
        &[("FERRY_SEND_PASSWORD", "wrong")],
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.last_line().contains("AUTH answered 535 5.7.8"),
        "{run:?}"
    );

    // Anonymous relay for the one address allowed it.
    let run = send(
        &[
            "--server",
            &smtp,
            "--source",
            "127.0.0.30",
            "--from",
            "app@example.test",
        ]
        .into_iter()
        .chain(["--to", "someone@outside.test", "--body", "from .30"])
        .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let outside = demo.wait_delivered("outside", 2);
    assert_eq!(outside.len(), 2);
    assert!(outside
        .iter()
        .any(|m| String::from_utf8_lossy(m).contains("from .30")));
}

/// Keeps a transcript's lines.
#[derive(Default)]
struct Kept(Mutex<Vec<String>>);

impl Transcript for Kept {
    fn line(&self, line: Line<'_>) {
        let text = match line {
            Line::Sent { text, .. } => format!("-> {text}"),
            Line::Received { text, .. } => format!("<- {text}"),
            Line::Note(text) => format!("== {text}"),
        };
        self.0.lock().unwrap().push(text);
    }
}

/// The library (as an application embeds it): STARTTLS verified with the
/// demo CA, then AUTH LOGIN and AUTH PLAIN each chosen explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_authenticates_with_login_and_plain() {
    let demo =
        tokio::task::spawn_blocking(|| Demo::start("127.0.0.93", ["127.0.0.94", "127.0.0.95"]))
            .await
            .unwrap();
    let target = Target {
        host: "localhost".into(),
        port: demo.submission,
        addresses: Some(vec![demo.balancer]),
        label: None,
    };
    let from = ReversePath::parse("scanner@example.test").unwrap();
    let to = [Mailbox::parse("far@outside.test").unwrap()];
    for (mechanism, password) in [
        (Mechanism::Login, PASSWORD),
        (Mechanism::Plain, PASSWORD),
        (Mechanism::Login, "wrong"),
    ] {
        let kept = Arc::new(Kept::default());
        let settings = Settings {
            helo: "scanner.test".into(),
            tls: TlsSettings {
                mode: TlsMode::Required,
                verify: Verify::ca_file(&demo.ca()).unwrap(),
            },
            auth: Some(Credentials {
                user: "scanner".into(),
                password: password.to_string().into(),
                mechanism: Some(mechanism),
            }),
            transcript: Some(kept.clone()),
            ..Settings::default()
        };
        let opened = ferry_client::open(&target, &settings).await;
        let lines = kept.0.lock().unwrap().clone();
        let login = mechanism == Mechanism::Login;
        assert_eq!(
            lines.contains(&"-> AUTH LOGIN".to_string()),
            login,
            "{lines:#?}"
        );
        assert!(
            lines.contains(&"-> ********".to_string()) == login,
            "{lines:#?}"
        );
        let encoded = |s: &str| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(s)
        };
        // The user name shows; the password never does, in any form.
        assert_eq!(lines.contains(&format!("-> {}", encoded("scanner"))), login);
        for line in &lines {
            assert!(
                !line.contains(password) && !line.contains(&encoded(password)),
                "{line}"
            );
        }
        if password == "wrong" {
            match opened {
                Err(ferry_client::Error::Refused { command, reply, .. }) => {
                    assert_eq!(command, "AUTH");
                    assert_eq!(reply.code(), 535);
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a wrong password was accepted"),
            }
            continue;
        }
        let mut session = opened.unwrap_or_else(|e| panic!("{e}: {lines:#?}"));
        assert!(session.is_tls());
        let message = format!("Subject: {mechanism:?}\r\n\r\nvia the library\r\n");
        let results = session
            .send(&Transaction {
                mail_from: &from,
                recipients: &to,
                message: &message.as_bytes(),
                body_8bit: false,
                smtputf8: false,
            })
            .await
            .unwrap();
        session.quit().await;
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].outcome, Outcome::Accepted, "{results:?}");
        assert!(results[0].reply.to_string().starts_with("250 2.6.0"));
    }
    let demo = Arc::new(demo);
    let d = Arc::clone(&demo);
    let got = tokio::task::spawn_blocking(move || d.wait_delivered("outside", 2))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
}
