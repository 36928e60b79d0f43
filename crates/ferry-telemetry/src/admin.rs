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
///
/// A 405 answer's body is `{"error": "..."}` naming the allowed methods as
/// comma-separated `METHOD /path` clauses (an upper-case segment such as
/// `ID` stands for any) or `METHOD words`; the endpoint derives the
/// `Allow` header RFC 9110 §15.5.6 requires from it (see [`allow_from`]).
pub type AdminAnswer<'a> =
    std::pin::Pin<Box<dyn Future<Output = Option<(u16, String)>> + Send + 'a>>;

/// Operations a node adds to its admin endpoint (the worker's queue
/// administration). Gets the method and path; returns a status and a JSON
/// body, or `None` for a path it does not know.
pub trait AdminApi: Send + Sync {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a>;
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

/// HTTP methods, as they may appear in a 405 answer's error text.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

/// The `Allow` value for a 405 an [`AdminApi`] gave for `path`, from the
/// methods its error text names: the clauses whose `/path` template fits
/// `path` (or that name no path); when none fits, every method named.
/// Empty (RFC 9110 §10.2.1: "allows no methods") if the text names none.
pub fn allow_from(body: &str, path: &str) -> String {
    let error = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    let segments = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let wanted = segments(path);
    let fits = |template: &str| {
        let template = segments(template);
        template.len() == wanted.len()
            && template.iter().zip(&wanted).all(|(t, w)| {
                t == w || (t.chars().all(|c| c.is_ascii_uppercase()) && !t.is_empty())
            })
    };
    let mut named = Vec::new();
    let mut fitting = Vec::new();
    for clause in error.split(',') {
        let mut words = clause.split_whitespace();
        let Some(method) = words.next().filter(|m| METHODS.contains(m)) else {
            continue;
        };
        let template = words.next().filter(|w| w.starts_with('/'));
        if !named.contains(&method) {
            named.push(method);
        }
        if template.is_none_or(fits) && !fitting.contains(&method) {
            fitting.push(method);
        }
    }
    if fitting.is_empty() { named } else { fitting }.join(", ")
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
                    let allow = allow_from(&body, path);
                    return not_allowed("application/json", body, &allow);
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

#[cfg(test)]
mod tests {
    use super::allow_from;

    /// The 405 texts the roles answer today.
    #[test]
    fn allow_comes_from_the_methods_the_error_names_for_the_path() {
        let queue = r#"{"error":"GET /queue/ID, POST /queue/ID/retry, POST /queue/ID/bounce, DELETE /queue/ID"}"#;
        assert_eq!(allow_from(queue, "/queue/0123"), "GET, DELETE");
        assert_eq!(allow_from(queue, "/queue/0123/bounce"), "POST");
        // No clause fits: every method named rather than none.
        assert_eq!(allow_from(queue, "/queue/0123/x"), "GET, POST, DELETE");
        assert_eq!(allow_from(r#"{"error":"GET /queue"}"#, "/queue/"), "GET");
        let reload = r#"{"error":"POST /config/reload"}"#;
        assert_eq!(allow_from(reload, "/config/reload"), "POST");
        let drain = r#"{"error":"POST drain or undrain"}"#;
        assert_eq!(allow_from(drain, "/backends/w1/drain"), "POST");
        assert_eq!(allow_from("not json", "/x"), "");
    }
}
