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
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
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
