//! The admin endpoint over real TCP: monitoring paths are open, operations
//! need the bearer token, and a node without a token has them off.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use ferry_telemetry::admin::{serve, AdminAnswer, AdminApi, AdminState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Echo;

impl AdminApi for Echo {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(async move { Some((200, format!("{{\"did\":\"{method} {path}\"}}"))) })
    }
}

async fn start(token: Option<&str>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let state = AdminState {
        api: Some(Arc::new(Echo)),
        metrics: ferry_telemetry::metrics_handle(),
        ready: Arc::new(|| true),
        token: token.map(Arc::from),
    };
    tokio::spawn(serve(l, state, std::future::pending()));
    addr
}

async fn call(addr: &str, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let (status, _, body) = call_with_head(addr, method, path, auth).await;
    (status, body)
}

/// The status, the response head (status line and header lines) and the
/// body.
async fn call_with_head(
    addr: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (status, head.to_string(), body.to_string())
}

/// The value of header `name` in a response head, if there is one.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// A node's API as the roles write theirs: `None` for a path it does not
/// know, 405 for a wrong method on one it does, and the methods each path
/// takes.
struct NodeLike;

impl AdminApi for NodeLike {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(async move {
            let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            match (method, parts.as_slice()) {
                ("GET", ["status"]) => Some((200, "{}".into())),
                // Exactly this path, as the node's: `/config/reload/` is not it.
                ("POST", _) if path == "/config/reload" => Some((200, r#"{"ok":true}"#.into())),
                (_, _) if path == "/config/reload" => {
                    Some((405, r#"{"error":"POST /config/reload"}"#.into()))
                }
                ("GET" | "DELETE", ["queue", _]) | ("POST", ["queue", _, "retry"]) => {
                    Some((200, "{}".into()))
                }
                (_, ["queue", _] | ["queue", _, "retry"]) => Some((
                    405,
                    r#"{"error":"GET /queue/ID, POST /queue/ID/retry, DELETE /queue/ID"}"#.into(),
                )),
                ("POST", ["backends", _, "drain"]) => Some((200, "{}".into())),
                (_, ["backends", _, "drain"]) => {
                    Some((405, r#"{"error":"POST drain or undrain"}"#.into()))
                }
                _ => None,
            }
        })
    }

    fn allowed(&self, path: &str) -> &'static str {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        match parts.as_slice() {
            ["config", "reload"] | ["queue", _, "retry"] | ["backends", _, "drain"] => "POST",
            ["queue", _] => "GET, DELETE",
            _ => "",
        }
    }
}

async fn start_node_like(token: &str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let state = AdminState {
        api: Some(Arc::new(NodeLike)),
        metrics: ferry_telemetry::metrics_handle(),
        ready: Arc::new(|| true),
        token: Some(Arc::from(token)),
    };
    tokio::spawn(serve(l, state, std::future::pending()));
    addr
}

/// RFC 9110 §15.5.5 and §15.5.6: a path nobody serves is 404 whatever the
/// method; 405 is for a path served with other methods, and says which
/// in `Allow` (§10.2.1).
#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405_with_allow() {
    let token = "s3cret-token-0123456789";
    let addr = start_node_like(token).await;
    let auth = Some("Bearer s3cret-token-0123456789");
    for (method, path) in [
        ("POST", "/config/reload/"),
        ("POST", "/nothing"),
        ("DELETE", "/nothing"),
        ("GET", "/nothing"),
        ("POST", "/metrics/"),
    ] {
        let (status, head, _) = call_with_head(&addr, method, path, auth).await;
        assert_eq!(status, 404, "{method} {path}: {head}");
        assert_eq!(header(&head, "allow"), None, "{method} {path}");
    }
    let (status, _, body) = call_with_head(&addr, "POST", "/config/reload", auth).await;
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    for (method, path, allow) in [
        // The endpoint's own paths.
        ("POST", "/metrics", "GET"),
        ("DELETE", "/livez", "GET"),
        ("POST", "/readyz", "GET"),
        ("POST", "/status", "GET"),
        // A node API's 405s: the methods its error names for this path.
        ("GET", "/config/reload", "POST"),
        ("PUT", "/queue/0123456789abcdef0123", "GET, DELETE"),
        ("GET", "/queue/0123456789abcdef0123/retry", "POST"),
        ("GET", "/backends/worker-1/drain", "POST"),
    ] {
        let (status, head, _) = call_with_head(&addr, method, path, auth).await;
        assert_eq!(status, 405, "{method} {path}: {head}");
        assert_eq!(
            header(&head, "allow").as_deref(),
            Some(allow),
            "{method} {path}: {head}"
        );
    }
}

/// RFC 7235 §2.1: the auth scheme is case-insensitive (`bearer`, `BEARER`),
/// and one or more spaces separate it from the token.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let addr = start_node_like("s3cret-token-0123456789").await;
    for auth in [
        "bearer s3cret-token-0123456789",
        "BEARER s3cret-token-0123456789",
        "Bearer   s3cret-token-0123456789",
    ] {
        let (status, body) = call(&addr, "POST", "/config/reload", Some(auth)).await;
        assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#), "{auth}");
    }
    for auth in [
        "Basic s3cret-token-0123456789",
        "Bearers3cret-token-0123456789",
        "s3cret-token-0123456789",
        "bearer s3cret-token-012345678",
    ] {
        let (status, _) = call(&addr, "POST", "/config/reload", Some(auth)).await;
        assert_eq!(status, 401, "{auth}");
    }
}

#[tokio::test]
async fn operations_need_the_token_and_monitoring_does_not() {
    let addr = start(Some("s3cret-token-0123456789")).await;
    assert_eq!(call(&addr, "GET", "/livez", None).await.0, 200);
    assert_eq!(call(&addr, "GET", "/readyz", None).await.0, 200);
    assert_eq!(call(&addr, "GET", "/metrics", None).await.0, 200);
    assert_eq!(call(&addr, "GET", "/status", None).await.0, 200);
    let (status, body) = call(&addr, "POST", "/queue/X/retry", None).await;
    assert_eq!(
        (status, body.as_str()),
        (401, r#"{"error":"missing or wrong bearer token"}"#)
    );
    let wrong = Some("Bearer s3cret-token-012345678X");
    assert_eq!(call(&addr, "GET", "/queue", wrong).await.0, 401);
    let right = Some("Bearer s3cret-token-0123456789");
    let (status, body) = call(&addr, "POST", "/queue/X/retry", right).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"did":"POST /queue/X/retry"}"#)
    );
}

#[tokio::test]
async fn without_a_token_operations_are_off() {
    let addr = start(None).await;
    assert_eq!(call(&addr, "GET", "/status", None).await.0, 200);
    let (status, body) = call(&addr, "GET", "/queue", Some("Bearer anything-at-all-here")).await;
    assert_eq!(status, 403);
    assert!(body.contains("--admin-token-file"), "{body}");
}
