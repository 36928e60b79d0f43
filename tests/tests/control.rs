//! The control plane end to end over the real binaries: `ferry cert`
//! makes the certificates, `ferry control` serves, `ferry ctl` applies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;

use ferry_tests::binary::{ferry_bin, http};
use ferry_tests::control_plane::{ControlProcess, Pki};

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/ferry.toml")
}

#[test]
fn an_admin_applies_the_example_and_a_bad_key_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    pki.issue("control", "control")
        .issue("admin", "alice")
        .issue("node", "worker-1");
    let store = format!("file:{}", dir.path().join("store").display());
    let mut control = ControlProcess::start(&store, &pki, &dir.path().join("control.log"));

    let example = example();
    let (code, out, err) = control.ctl(
        &pki,
        "alice",
        &["apply", example.to_str().unwrap(), "-m", "first config"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied version 1 "), "{out}");
    assert!(out.contains("+ connector \"Default Frontend\""), "{out}");

    // The admin endpoint: ready, and the current version on /metrics.
    let (status, _) = http(&control.admin, "GET", "/readyz");
    assert_eq!(status, 200);
    let (_, metrics) = http(&control.admin, "GET", "/metrics");
    assert!(
        metrics.lines().any(|l| l == "ferry_config_version 1"),
        "{metrics}"
    );

    // A key no config has: refused with its file, line and column.
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&example).unwrap().replacen(
        "[[connectors]]\n",
        "[[connectors]]\nbanner_colour = \"red\"\n",
        1,
    );
    let line = text
        .lines()
        .position(|l| l.starts_with("banner_colour"))
        .unwrap()
        + 1;
    std::fs::write(&bad, text).unwrap();
    let (code, out, err) = control.ctl(&pki, "alice", &["apply", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let place = format!("{}:{line}:1: ", bad.display());
    assert!(err.contains(&place), "{err}");
    assert!(err.contains("banner_colour"), "{err}");
    assert!(err.contains("INVALID_ARGUMENT"), "{err}");

    // Hundreds of errors (the wrong file named): the first ones and how
    // many more, in a reply that still fits its header.
    let many = dir.path().join("many.toml");
    let keys: String = (0..600).map(|i| format!("unknown_key_{i} = 1\n")).collect();
    std::fs::write(&many, keys).unwrap();
    let (code, _, err) = control.ctl(&pki, "alice", &["apply", many.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains(":1:1: "),
        "{err}"
    );
    assert!(
        err.contains(" more errors (`ferry config check FILE`"),
        "{err}"
    );

    // Larger than the control plane takes: refused before it is sent.
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; 1024 * 1024 + 1]).unwrap();
    let (code, _, err) = control.ctl(&pki, "alice", &["apply", big.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("larger than 1048576 octets"), "{err}");

    // A message is one line: a newline would forge log and history lines.
    let (code, _, err) = control.ctl(
        &pki,
        "alice",
        &["apply", example.to_str().unwrap(), "-m", "fix\nINFO forged"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("control characters"), "{err}");

    // A node's certificate names no host: it cannot pass for the control
    // plane.
    let out = Command::new(ferry_bin())
        .args(["cert", "issue", "--ca"])
        .arg(dir.path().join("pki/ca"))
        .args(["--role", "node", "evil", "--host", "127.0.0.1", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--host is for --role control"), "{err}");

    // A stale expected version: refused, exit 1.
    let (code, _, err) = control.ctl(
        &pki,
        "alice",
        &[
            "apply",
            example.to_str().unwrap(),
            "--expected-version",
            "0",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ABORTED"), "{err}");

    // A node certificate cannot apply.
    let (code, _, err) = control.ctl(&pki, "worker-1", &["apply", example.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("PERMISSION_DENIED"), "{err}");

    let (code, out, err) = control.ctl(&pki, "alice", &["history"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("VERSION"), "{out}");
    assert!(rows[1].starts_with("1 "), "{out}");
    assert!(
        rows[1].contains("alice") && rows[1].ends_with("first config"),
        "{out}"
    );

    // SIGHUP (a service manager's reload) neither stops it nor changes
    // anything; it says why in its log.
    control.hang_up();
    let log = dir.path().join("control.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("SIGHUP ignored")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no SIGHUP line in the log"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!control.has_exited(), "SIGHUP ended the control plane");
    let (code, _, err) = control.ctl(&pki, "alice", &["history"]);
    assert_eq!(code, 0, "{err}");

    // The history survives a restart of the control plane.
    assert!(control.terminate().is_some_and(|s| s.success()));
    let control = ControlProcess::start(&store, &pki, &dir.path().join("control2.log"));
    let (code, out, _) = control.ctl(&pki, "alice", &["get", "1"]);
    assert_eq!(code, 0);
    assert_eq!(out, std::fs::read_to_string(&example).unwrap());
}

#[test]
fn an_unreachable_control_plane_exits_2_and_etcd_needs_its_feature() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    pki.issue("control", "control").issue("admin", "alice");
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(ferry_bin())
        .args(["ctl", "--control", &format!("https://127.0.0.1:{port}")])
        .arg("--ca")
        .arg(pki.ca())
        .arg("--cert")
        .arg(pki.cert("alice"))
        .arg("--key")
        .arg(pki.key("alice"))
        .arg("history")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no control plane answered"), "{err}");

    let out = Command::new(ferry_bin())
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--store", "etcd:http://127.0.0.1:2379"])
        .arg("--ca")
        .arg(pki.ca())
        .arg("--cert")
        .arg(pki.cert("control"))
        .arg("--key")
        .arg(pki.key("control"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // A build with the etcd store fails to reach it instead (nothing
    // listens there).
    assert!(
        err.contains("this ferry was built without the etcd store; build with --features etcd")
            || err.contains("etcd store"),
        "{err}"
    );
}
