//! The node's part of the admin endpoint, around the role's own:
//! `POST /config/reload` (with the admin token) and the `config` part of
//! `GET /status`.

use std::sync::Arc;

use ferry_telemetry::admin::{AdminAnswer, AdminApi};

use crate::reload::{Reloader, Role};

/// The role's admin API plus config reload and status.
pub struct NodeAdmin<R: Role> {
    pub role: Arc<dyn AdminApi>,
    pub reloader: Arc<Reloader<R>>,
}

impl<R: Role> AdminApi for NodeAdmin<R> {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(async move {
            match (method, path) {
                // 422: the request was fine, the config it names is not.
                ("POST", "/config/reload") => {
                    let report = self.reloader.reload().await;
                    let status = if report.ok { 200 } else { 422 };
                    Some((status, report.to_json().to_string()))
                }
                (_, "/config/reload") => Some((405, r#"{"error":"POST /config/reload"}"#.into())),
                ("GET", "/status") => {
                    let (code, body) = self.role.handle(method, path).await?;
                    let mut status: serde_json::Value =
                        serde_json::from_str(&body).unwrap_or_else(|_| serde_json::json!({}));
                    if let Some(map) = status.as_object_mut() {
                        map.insert("config".into(), self.reloader.status());
                    }
                    Some((code, status.to_string()))
                }
                _ => self.role.handle(method, path).await,
            }
        })
    }

    fn allowed(&self, path: &str) -> &'static str {
        match path {
            "/config/reload" => "POST",
            _ => self.role.allowed(path),
        }
    }
}
