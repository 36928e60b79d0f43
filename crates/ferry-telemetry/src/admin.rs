//! The admin HTTP endpoint: `/metrics`, `/livez`, `/readyz` and `/status`
//! for anyone; every other path (the node's operations) only with the
//! node's bearer token.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// What an [`AdminApi`] answers: a status and a JSON body, or `None` for a
/// path it does not know.
pub type AdminAnswer<'a> =
    std::pin::Pin<Box<dyn Future<Output = Option<(u16, String)>> + Send + 'a>>;

/// Operations a node adds to its admin endpoint (the worker's queue
/// administration). Gets the method and path; returns a status and a JSON
/// body, or `None` for a path it does not know.
pub trait AdminApi: Send + Sync {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a>;

    /// The methods `path` takes, for the `Allow` header of a 405 the API
    /// answered there (RFC 9110 §15.5.6); empty: none named.
    fn allowed(&self, _path: &str) -> &'static str {
        ""
    }
}

/// What the endpoint reports.
#[derive(Clone)]
pub struct AdminState {
    /// Node-specific operations, consulted for paths other than ours.
    pub api: Option<Arc<dyn AdminApi>>,
    pub metrics: PrometheusHandle,
    /// Ready to take traffic (listeners up, not draining, room to work).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The bearer token operations need; `None` turns operations off.
    pub token: Option<Arc<str>>,
}

/// Paths anyone may read: monitoring.
fn is_open(path: &str) -> bool {
    matches!(path, "/metrics" | "/livez" | "/readyz" | "/status")
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request for an operation is refused, if it is.
fn refusal(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = &state.token else {
        return Some(respond(
            StatusCode::FORBIDDEN,
            "application/json",
            r#"{"error":"operations are off: start the node with --admin-token-file"}"#,
        ));
    };
    // RFC 7235 §2.1: the scheme is case-insensitive, then 1*SP, then the
    // credentials.
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    if same(given.trim().as_bytes(), token.as_bytes()) {
        return None;
    }
    let mut resp = respond(
        StatusCode::UNAUTHORIZED,
        "application/json",
        r#"{"error":"missing or wrong bearer token"}"#,
    );
    if let Ok(v) = "Bearer".parse() {
        resp.headers_mut()
            .insert(hyper::header::WWW_AUTHENTICATE, v);
    }
    Some(resp)
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// A 405 with the `Allow` header RFC 9110 §15.5.6 requires.
fn not_allowed(content_type: &str, body: impl Into<Bytes>, allow: &str) -> Response<Full<Bytes>> {
    let mut resp = respond(StatusCode::METHOD_NOT_ALLOWED, content_type, body);
    if let Ok(v) = allow.parse() {
        resp.headers_mut().insert(hyper::header::ALLOW, v);
    }
    resp
}

async fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !is_open(path) {
        if let Some(refused) = refusal(state, req) {
            return refused;
        }
    }
    let ours = matches!(path, "/metrics" | "/livez" | "/readyz");
    if !ours {
        if let Some(api) = &state.api {
            if let Some((status, body)) = api.handle(req.method().as_str(), path).await {
                if status == 405 {
                    return not_allowed("application/json", body, api.allowed(path));
                }
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return respond(status, "application/json", body);
            }
        }
    }
    // `/status` is the API's (every role serves it); a method the API does
    // not answer there is still a wrong method on a known path.
    let known = ours || (path == "/status" && state.api.is_some());
    if !known {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    if req.method() != Method::GET {
        return not_allowed("text/plain", "GET only\n", "GET");
    }
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        "/livez" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if (state.ready)() => respond(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}
