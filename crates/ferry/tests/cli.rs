//! The `ferry` command line, run as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Write;
use std::process::{Command, Stdio};

fn ferry(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/examples/ferry.toml"
);

#[test]
fn example_config_checks_ok_once_its_certificate_files_exist() {
    // The example names certs/ferry.crt and certs/ferry.key beside it
    // (`ferry up` makes them); a node would refuse it without them, and so
    // does the check, naming each file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::copy(EXAMPLE, &path).unwrap();
    let (ok, _, err) = ferry(&["config", "check", path.to_str().unwrap()]);
    assert!(!ok);
    let crt = dir.path().join("certs/ferry.crt");
    // Two TLS connectors, each missing its certificate and its key.
    assert!(err.starts_with("4 errors in "), "{err}");
    assert!(
        err.contains(&format!(
            "connector 'Client Frontend': cannot read {}",
            crt.display()
        )),
        "{err}"
    );

    // A file that is there but holds no certificate.
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(&crt, "not a certificate\n").unwrap();
    std::fs::write(dir.path().join("certs/ferry.key"), "not a key\n").unwrap();
    let (ok, _, err) = ferry(&["config", "check", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("holds no usable certificate"), "{err}");

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("certs/ferry.key"),
        cert.signing_key.serialize_pem(),
    )
    .unwrap();
    let (ok, out, err) = ferry(&["config", "check", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ok (3 connectors on ports [2525, 2587], 1 accepted domains, 1 users, 2 routes; balancer: 2 listeners, 2 backends)"),
        "{out}"
    );
}

#[test]
fn an_empty_config_is_not_ok() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.toml");
    std::fs::write(&path, "").unwrap();
    let (ok, out, err) = ferry(&["config", "check", path.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(err.starts_with("2 errors in "), "{err}");
    assert!(
        err.contains("no [[connectors]]: a worker would accept no mail"),
        "{err}"
    );
    assert!(
        err.contains("no [[routes]]: accepted mail would be delivered nowhere"),
        "{err}"
    );
}

#[test]
fn bad_config_lists_every_error_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[connectors]]\nname = \"A\"\nport = 25\nremote_ranges = [\"10.0.0.0/8\"]\npermissions = [\"anonymous\"]\n\n\
         [[connectors]]\nname = \"B\"\nport = 25\nremote_ranges = [\"10.0.0.0/8\", \"300.1.1.1\"]\npermissions = [\"anonymous\"]\n",
    )
    .unwrap();
    let (ok, _, err) = ferry(&["config", "check", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.starts_with("2 errors in "), "{err}");
    assert!(
        err.contains(
            "bad.toml:10:18: remote range 10.0.0.0/8 on port 25 is also claimed by connector 'A'"
        ),
        "{err}"
    );
    assert!(
        err.contains("bad.toml:10:32: '300.1.1.1' is not an IP address or CIDR range"),
        "{err}"
    );
}

#[test]
fn explain_names_connector_rule_and_decisions() {
    let (ok, out, _) = ferry(&[
        "config",
        "explain",
        EXAMPLE,
        "--client",
        "127.0.0.30",
        "--port",
        "2525",
    ]);
    assert!(ok);
    assert!(
        out.starts_with(
            "balancer: client 127.0.0.30 allowed (allow 127.0.0.0/8) on listener \"smtp\"\n"
        ),
        "{out}"
    );
    assert!(out.contains("connector \"Anon Relay\""), "{out}");
    assert!(
        out.contains("remote range 127.0.0.30/32 is the most specific"),
        "{out}"
    );
    assert!(
        out.contains("shadows: \"Default Frontend\" (range 0.0.0.0/0)"),
        "{out}"
    );
    assert!(
        out.contains("RCPT TO:<someone@outside.invalid> -> 250 accepted"),
        "{out}"
    );

    let (_, out, _) = ferry(&[
        "config",
        "explain",
        EXAMPLE,
        "--client",
        "192.0.2.7",
        "--port",
        "2525",
    ]);
    assert!(out.contains("balancer: client 192.0.2.7 denied (no allow range holds it); the connection gets: 554 5.7.1 Access denied"), "{out}");
    assert!(out.contains("connector \"Default Frontend\""), "{out}");
    assert!(out.contains(
        "RCPT TO:<someone@outside.invalid> -> 550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    ), "{out}");

    let (_, out, _) = ferry(&[
        "config",
        "explain",
        EXAMPLE,
        "--client",
        "::ffff:192.0.2.7",
        "--port",
        "2587",
        "--tls",
        "--user",
        "scanner",
    ]);
    assert!(out.contains("connector \"Client Frontend\""), "{out}");
    assert!(out.contains("relay decisions (user scanner"), "{out}");
    assert!(
        out.contains("RCPT TO:<someone@outside.invalid> -> 250 accepted"),
        "{out}"
    );

    let (_, out, _) = ferry(&[
        "config",
        "explain",
        EXAMPLE,
        "--client",
        "192.0.2.7",
        "--port",
        "25",
    ]);
    assert!(out.contains("no connector holds this address"), "{out}");
    assert!(out.contains("554 5.7.1"), "{out}");
}

#[test]
fn user_hash_makes_a_verifiable_argon2id_hash() {
    use argon2::{Argon2, PasswordHash, PasswordVerifier};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["user", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"printer-pw\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    // The documented cost parameters (README, "AUTH under load").
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    let parsed = PasswordHash::new(hash).unwrap();
    assert!(Argon2::default()
        .verify_password(b"printer-pw", &parsed)
        .is_ok());
    assert!(Argon2::default()
        .verify_password(b"other", &parsed)
        .is_err());
}

fn explain(args: &[&str]) -> String {
    let mut all = vec!["config", "explain", EXAMPLE];
    all.extend_from_slice(args);
    let (ok, out, err) = ferry(&all);
    assert!(ok, "{err}");
    out
}

#[test]
fn explain_says_starttls_is_done_once_the_session_is_tls() {
    let plain = explain(&["--client", "192.0.2.7", "--port", "2587"]);
    assert!(plain.contains("\n  STARTTLS: offered\n"), "{plain}");
    let tls = explain(&["--client", "192.0.2.7", "--port", "2587", "--tls"]);
    assert!(
        tls.contains("\n  STARTTLS: done (the session is TLS; not offered again, RFC 3207 §4.2)\n"),
        "{tls}"
    );
    // The Anon Relay connector has no TLS at all.
    let none = explain(&["--client", "127.0.0.30", "--port", "2525", "--tls"]);
    assert!(
        none.contains("STARTTLS: not offered: a session on this connector cannot be TLS"),
        "{none}"
    );
}

#[test]
fn explain_says_when_the_balancer_has_no_listener_on_the_port() {
    let out = explain(&["--client", "127.0.0.5", "--port", "25"]);
    assert!(
        out.starts_with("balancer: no listener on port 25; a client connecting to the balancer there is refused"),
        "{out}"
    );
    assert!(!out.contains("allowed"), "{out}");
    let out = explain(&["--client", "127.0.0.5", "--port", "2587"]);
    assert!(
        out.starts_with(
            "balancer: client 127.0.0.5 allowed (allow 127.0.0.0/8) on listener \"submission\"\n"
        ),
        "{out}"
    );
}

#[test]
fn explain_says_what_holds_for_a_denied_client_and_for_the_trusted_proxy() {
    let out = explain(&["--client", "192.0.2.7", "--port", "2587"]);
    assert!(
        out.starts_with("balancer: client 192.0.2.7 denied (no allow range holds it); the connection gets: 554 5.7.1 Access denied (what follows holds for a client connecting to a worker directly)\n"),
        "{out}"
    );
    let out = explain(&["--client", "127.0.0.2", "--port", "2525"]);
    assert!(
        out.contains("client 127.0.0.2 is a trusted proxy: a connection from it to a worker must start with a PROXY header"),
        "{out}"
    );
    let out = explain(&["--client", "127.0.0.5", "--port", "2525"]);
    assert!(!out.contains("trusted proxy"), "{out}");
}

#[test]
fn config_diff_names_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let old = std::fs::read_to_string(EXAMPLE).unwrap();
    let new = old
        .replace(
            "banner = \"Ferry Anon Relay ready\"",
            "banner = \"Ferry Anon Relay, new\"",
        )
        .replace("name = \"scanner\"", "name = \"printer\"");
    // Both in one folder: relative paths (certificates, route folders)
    // are relative to the config file's folder, so they compare equal.
    let old_path = dir.path().join("old.toml");
    std::fs::write(&old_path, &old).unwrap();
    let new_path = dir.path().join("new.toml");
    std::fs::write(&new_path, &new).unwrap();
    let (old_path, new_path) = (old_path.to_str().unwrap(), new_path.to_str().unwrap());
    let (ok, out, err) = ferry(&["config", "diff", old_path, new_path]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "~ connector \"Anon Relay\"\n+ user \"printer\"\n- user \"scanner\"\n"
    );
    let (ok, out, _) = ferry(&["config", "diff", EXAMPLE, EXAMPLE]);
    assert!(ok);
    assert_eq!(out, "no change\n");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "prots = 1\n").unwrap();
    let (ok, _, err) = ferry(&["config", "diff", EXAMPLE, bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("1:1: unknown key `prots`"), "{err}");
}
