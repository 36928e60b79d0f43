//! `ferry send`: one message through a relay, for scripts, troubleshooting
//! and device simulation (as swaks or Send-MailMessage). Every address of
//! the server's name is tried in turn (the shared client's happy
//! eyeballs), so it survives a DNS round-robin pool with a dead member;
//! `--resolve` stands in for DNS, as curl's option does.
//!
//! Exit codes: 0 sent to every recipient, 1 refused permanently (a 5xx for
//! at least one recipient), 2 temporary failure (4xx, or the connection
//! lost mid-session), 3 no server reachable (no address, none greeted
//! with 220, or TLS could not be had), 4 usage or local error. The last
//! line printed says which recipient got what.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ferry_client::{
    Credentials, Error, Line, Outcome, Settings, Target, Timeouts, TlsMode, TlsSettings,
    Transaction, Transcript, Verify,
};
use ferry_smtp::{Mailbox, ReversePath};
use mail_builder::headers::address::Address;
use mail_builder::headers::text::Text;
use mail_builder::MessageBuilder;
use zeroize::Zeroizing;

/// Where the password comes from when not from standard input.
pub const PASSWORD_VARIABLE: &str = "FERRY_SEND_PASSWORD";

const EXIT_PERMANENT: u8 = 1;
const EXIT_TEMPORARY: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_LOCAL: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "ferry send",
    about = "Send one message through an SMTP relay, trying every address of its name",
    after_help = "The password for --auth comes from FERRY_SEND_PASSWORD or the first line of \
standard input, never from a flag.\n\nExit codes: 0 sent to every recipient, 1 refused \
permanently (5xx), 2 temporary failure (4xx), 3 no server reachable, 4 usage or local error."
)]
struct SendArgs {
    /// The relay: a name or address, and the port (25 by default, 465
    /// with --tls).
    #[arg(long, value_name = "NAME[:PORT]")]
    server: String,
    /// Use these addresses for NAME instead of DNS (as curl's --resolve).
    #[arg(long, value_name = "NAME:ADDR[,ADDR...]")]
    resolve: Vec<String>,
    /// STARTTLS after EHLO; the message is not sent without it.
    #[arg(long, conflicts_with = "tls")]
    starttls: bool,
    /// TLS from the first byte (port 465, RFC 8314).
    #[arg(long)]
    tls: bool,
    /// Trust the CA certificates in this PEM file (instead of the web PKI).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Accept any server certificate (encrypted, not authenticated).
    #[arg(long)]
    insecure: bool,
    /// AUTH as this user (PLAIN, or LOGIN where only that is offered).
    #[arg(long, value_name = "USER")]
    auth: Option<String>,
    /// The name sent with EHLO (default: this host's name).
    #[arg(long, value_name = "NAME")]
    helo: Option<String>,
    /// Connect from this local address.
    #[arg(long, value_name = "IP")]
    source: Option<IpAddr>,
    /// The sender (envelope and From:).
    #[arg(long, value_name = "ADDR")]
    from: String,
    /// Recipients (envelope and To:).
    #[arg(long, value_name = "ADDR", num_args = 1.., required = true)]
    to: Vec<String>,
    /// More recipients (envelope and Cc:).
    #[arg(long, value_name = "ADDR", num_args = 1..)]
    cc: Vec<String>,
    /// The Subject: header.
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "Test message from ferry send"
    )]
    subject: String,
    /// The text of the message (default: standard input).
    #[arg(long, value_name = "TEXT", conflicts_with = "body_file")]
    body: Option<String>,
    /// The text of the message, from a UTF-8 file.
    #[arg(long, value_name = "FILE")]
    body_file: Option<PathBuf>,
    /// Attach files (content type from the file name).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    attach: Vec<PathBuf>,
    /// Add a header line.
    #[arg(long, value_name = "Name: value")]
    header: Vec<String>,
    /// Print the dialogue as swaks does (-> sent, <- received, ~> and <~
    /// over TLS, AUTH secrets masked).
    #[arg(long)]
    verbose: bool,
}

/// Runs `ferry send` with its arguments (those after `send`).
pub fn run(args: Vec<OsString>) -> ExitCode {
    let argv = std::iter::once(OsString::from("ferry send")).chain(args);
    let args = match SendArgs::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_LOCAL)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let job = match Job::prepare(args) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("ferry send: {e}");
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry send: {e}");
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    let (code, last_line) = runtime.block_on(job.send());
    println!("{last_line}");
    ExitCode::from(code)
}

/// Everything needed to send, checked before connecting.
struct Job {
    target: Target,
    settings: Settings,
    mail_from: ReversePath,
    recipients: Vec<Mailbox>,
    message: Vec<u8>,
    verbose: bool,
}

impl Job {
    fn prepare(args: SendArgs) -> Result<Self, String> {
        let default_port = if args.tls { 465 } else { 25 };
        let (host, port) = split_server(&args.server, default_port)?;
        let mut target = Target::new(host.clone(), port);
        for entry in &args.resolve {
            let (name, addresses) = parse_resolve(entry)?;
            if name.eq_ignore_ascii_case(&host) {
                target.addresses = Some(addresses);
            }
        }
        let mail_from =
            ReversePath::parse(&args.from).map_err(|e| format!("--from {:?}: {e}", args.from))?;
        let mut recipients = Vec::new();
        for r in args.to.iter().chain(&args.cc) {
            let mailbox = Mailbox::parse(r).map_err(|e| format!("recipient {r:?}: {e}"))?;
            if !recipients.contains(&mailbox) {
                recipients.push(mailbox);
            }
        }
        let password_on_stdin =
            args.auth.is_some() && std::env::var_os(PASSWORD_VARIABLE).is_none();
        let body = match (&args.body, &args.body_file) {
            (Some(text), _) => text.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("--body-file {}: {e}", file.display()))?,
            (None, None) if password_on_stdin => {
                return Err(format!(
                    "the password is read from standard input, so the body cannot be: \
                     give --body or --body-file, or the password in {PASSWORD_VARIABLE}"
                ))
            }
            (None, None) => read_stdin_body()?,
        };
        let auth = match &args.auth {
            Some(user) => Some(Credentials {
                user: user.clone(),
                password: read_password(user)?,
                mechanism: None,
            }),
            None => None,
        };
        let message = build_message(&args, &body)?;
        let mode = match (args.starttls, args.tls) {
            (true, _) => TlsMode::Required,
            (_, true) => TlsMode::Implicit,
            _ => TlsMode::Off,
        };
        let verify = match (&args.ca, args.insecure) {
            (Some(file), _) => Verify::ca_file(file).map_err(|e| format!("--ca: {e}"))?,
            (None, true) => Verify::Off,
            (None, false) => Verify::WebPki,
        };
        let settings = Settings {
            helo: args.helo.clone().unwrap_or_else(local_hostname),
            tls: TlsSettings { mode, verify },
            auth,
            source: args.source,
            timeouts: Timeouts {
                connect: Duration::from_secs(10),
                greeting: Duration::from_secs(60),
                command: Duration::from_secs(60),
                data_end: Duration::from_secs(600),
            },
            transcript: args
                .verbose
                .then(|| Arc::new(Printer) as Arc<dyn Transcript>),
            ..Settings::default()
        };
        Ok(Job {
            target,
            settings,
            mail_from,
            recipients,
            message,
            verbose: args.verbose,
        })
    }

    /// Sends; the exit code and the last line.
    async fn send(self) -> (u8, String) {
        let all = |what: &str| -> String {
            self.recipients
                .iter()
                .map(|r| format!("{r}: {what}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let mut session = match ferry_client::connect(&self.target, &self.settings).await {
            Ok(session) => session,
            Err(e) => {
                if let (Error::Unreachable { attempts, .. }, false) = (&e, self.verbose) {
                    for a in attempts {
                        eprintln!("ferry send: {a}");
                    }
                }
                let (code, word) = classify(&e);
                return (code, format!("{word}: {}", all(&format!("not sent: {e}"))));
            }
        };
        if !self.verbose {
            for a in session.failed_attempts() {
                eprintln!("ferry send: {a}; tried the next address");
            }
        }
        let tx = Transaction {
            mail_from: &self.mail_from,
            recipients: &self.recipients,
            message: &self.message,
            body_8bit: self.message.iter().any(|b| !b.is_ascii()),
            smtputf8: self.recipients.iter().any(|r| !r.is_ascii())
                || self.mail_from.mailbox().is_some_and(|m| !m.is_ascii()),
        };
        let result = match session.handshake(&self.settings).await {
            Ok(()) => session.send(&tx).await,
            Err(e) => Err(e),
        };
        session.quit().await;
        match result {
            Ok(results) => {
                let code = results
                    .iter()
                    .map(|r| match r.outcome {
                        Outcome::Accepted => 0,
                        Outcome::Permanent => EXIT_PERMANENT,
                        Outcome::Temporary => EXIT_TEMPORARY,
                    })
                    .min_by_key(|c| match *c {
                        EXIT_PERMANENT => 0,
                        EXIT_TEMPORARY => 1,
                        _ => 2,
                    })
                    .unwrap_or(0);
                let word = match code {
                    0 => "sent",
                    EXIT_PERMANENT => "refused",
                    _ => "deferred",
                };
                let each = results
                    .iter()
                    .map(|r| format!("{}: {}", r.recipient, r.reply))
                    .collect::<Vec<_>>()
                    .join("; ");
                (code, format!("{word}: {each}"))
            }
            Err(e) => {
                let (code, word) = classify(&e);
                let what = match &e {
                    Error::Refused { command, reply, .. } => {
                        format!("not sent: {command} answered {reply}")
                    }
                    other => format!("not sent: {other}"),
                };
                (code, format!("{word}: {}", all(&what)))
            }
        }
    }
}

/// The exit code and the last line's first word for an error.
fn classify(e: &Error) -> (u8, &'static str) {
    match e {
        Error::Refused { reply, .. } if reply.code() >= 500 => (EXIT_PERMANENT, "refused"),
        Error::Unsuitable { .. } => (EXIT_PERMANENT, "refused"),
        Error::Refused { .. } | Error::Connection { .. } => (EXIT_TEMPORARY, "deferred"),
        Error::Local(_) => (EXIT_LOCAL, "error"),
        _ => (EXIT_UNREACHABLE, "unreachable"),
    }
}

/// `NAME`, `NAME:PORT`, `ADDR`, `[IPV6]:PORT`.
fn split_server(server: &str, default_port: u16) -> Result<(String, u16), String> {
    let bad = || format!("--server {server:?}: expected NAME or NAME:PORT");
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
    if let Some(rest) = server.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((ip.to_string(), port(p)?)),
            None if after.is_empty() => Ok((ip.to_string(), default_port)),
            None => Err(bad()),
        };
    }
    if server.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((server.to_string(), default_port));
    }
    match server.split_once(':') {
        Some((name, p)) if !name.is_empty() => Ok((name.to_string(), port(p)?)),
        None if !server.is_empty() => Ok((server.to_string(), default_port)),
        _ => Err(bad()),
    }
}

/// `NAME:ADDR[,ADDR...]` (IPv6 addresses may be in brackets).
fn parse_resolve(entry: &str) -> Result<(String, Vec<IpAddr>), String> {
    let bad = |why: String| format!("--resolve {entry:?}: {why}");
    let (name, list) = entry
        .split_once(':')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| bad("expected NAME:ADDR[,ADDR...]".into()))?;
    let addresses = list
        .split(',')
        .map(|a| {
            a.trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| bad(format!("{a:?} is not an IP address")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_string(), addresses))
}

fn read_stdin_body() -> Result<String, String> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("ferry send: type the message text, then Ctrl-D");
    }
    let mut body = String::new();
    stdin
        .read_to_string(&mut body)
        .map_err(|e| format!("reading the body from standard input: {e}"))?;
    Ok(body)
}

/// The password: `FERRY_SEND_PASSWORD`, else standard input's first line
/// (without its line ending).
fn read_password(user: &str) -> Result<Zeroizing<String>, String> {
    if let Some(value) = std::env::var_os(PASSWORD_VARIABLE) {
        return value
            .into_string()
            .map(Zeroizing::new)
            .map_err(|_| format!("{PASSWORD_VARIABLE} is not UTF-8"));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("password for {user} (then Enter):");
    }
    let mut line = Zeroizing::new(String::new());
    stdin
        .read_line(&mut line)
        .map_err(|e| format!("reading the password from standard input: {e}"))?;
    let password = Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_string());
    if password.is_empty() {
        return Err(format!(
            "--auth {user}: no password (set {PASSWORD_VARIABLE} or give it on standard input)"
        ));
    }
    Ok(password)
}

/// The message, built by mail-builder: From, To, Cc, Subject, the extra
/// headers, Date, Message-ID and MIME-Version, the text, the attachments
/// with their content types.
fn build_message(args: &SendArgs, body: &str) -> Result<Vec<u8>, String> {
    let list = |addrs: &[String]| {
        Address::new_list(
            addrs
                .iter()
                .map(|a| Address::new_address(None::<&str>, a.clone()))
                .collect(),
        )
    };
    let mut builder = MessageBuilder::new()
        .from(Address::new_address(None::<&str>, args.from.clone()))
        .to(list(&args.to))
        .subject(args.subject.as_str());
    if !args.cc.is_empty() {
        builder = builder.cc(list(&args.cc));
    }
    for line in &args.header {
        let (name, value) = parse_header(line)?;
        builder = builder.header(name, Text::new(value));
    }
    builder = builder.text_body(body);
    for path in &args.attach {
        let data = std::fs::read(path).map_err(|e| format!("--attach {}: {e}", path.display()))?;
        let name = file_name(path);
        let content_type = mime_guess::from_path(path).first_or_octet_stream();
        builder = builder.attachment(content_type.essence_str().to_string(), name, data);
    }
    builder
        .write_to_vec()
        .map_err(|e| format!("building the message: {e}"))
}

/// `Name: value`, the name printable ASCII without spaces or colons
/// (RFC 5322 §2.2), the value on one line.
fn parse_header(line: &str) -> Result<(String, String), String> {
    let bad = |why: &str| format!("--header {line:?}: {why}");
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| bad("expected \"Name: value\""))?;
    let name = name.trim();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(bad("the name must be printable ASCII without spaces"));
    }
    if value.contains(['\r', '\n']) {
        return Err(bad("the value must be one line"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "attachment".into())
}

/// This host's name for EHLO.
fn local_hostname() -> String {
    let name = gethostname::gethostname().to_string_lossy().into_owned();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Prints the dialogue on standard output, as swaks does.
struct Printer;

impl Transcript for Printer {
    fn line(&self, line: Line<'_>) {
        let mut out = std::io::stdout().lock();
        let _ = match line {
            Line::Sent { text, tls } => writeln!(out, " {}> {text}", if tls { '~' } else { '-' }),
            Line::Received { text, tls } => {
                writeln!(out, "<{}  {text}", if tls { '~' } else { '-' })
            }
            Line::Note(text) => writeln!(out, "=== {text}"),
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_names_and_ports() {
        assert_eq!(
            split_server("relay.test", 25).unwrap(),
            ("relay.test".into(), 25)
        );
        assert_eq!(
            split_server("relay.test:2587", 25).unwrap(),
            ("relay.test".into(), 2587)
        );
        assert_eq!(
            split_server("[::1]:2525", 25).unwrap(),
            ("::1".into(), 2525)
        );
        assert_eq!(split_server("::1", 465).unwrap(), ("::1".into(), 465));
        for bad in [
            "",
            ":25",
            "relay.test:",
            "relay.test:0",
            "relay.test:x",
            "[::1",
        ] {
            assert!(split_server(bad, 25).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_entries() {
        let (name, addrs) = parse_resolve("relay.test:127.0.0.61,[::1], 127.0.0.12").unwrap();
        assert_eq!(name, "relay.test");
        assert_eq!(
            addrs,
            ["127.0.0.61", "::1", "127.0.0.12"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        assert!(parse_resolve("relay.test").is_err());
        assert!(parse_resolve("relay.test:nowhere").is_err());
    }

    #[test]
    fn headers_are_one_line_with_a_plain_name() {
        assert_eq!(
            parse_header("X-Device: printer 4").unwrap(),
            ("X-Device".into(), "printer 4".into())
        );
        assert!(parse_header("X Device: a").is_err());
        assert!(parse_header("X-Device a").is_err());
        assert!(parse_header("X-A: b\r\nBcc: c").is_err());
    }
}
