//! The balancer's part of the admin endpoint: `GET /status`,
//! `GET /backends` (state and load of every worker per listener),
//! `POST /backends/NAME/drain` and `POST /backends/NAME/undrain`.

use std::sync::Arc;

use ferry_telemetry::admin::{AdminAnswer, AdminApi};

use crate::{Balancer, State};

/// The balancer's admin API; reads the state in service at each call.
pub struct BalancerAdmin(pub Arc<Balancer>);

impl BalancerAdmin {
    fn backends(&self) -> String {
        serde_json::json!({ "backends": backend_list(&self.0.state()) }).to_string()
    }

    fn status(&self) -> String {
        let state = self.0.state();
        let listeners: Vec<serde_json::Value> = state
            .frontends()
            .map(|f| {
                serde_json::json!({
                    "name": f.listener.name,
                    "port": f.listener.port,
                    "backend_port": f.listener.backend_port,
                    "proxy_protocol": f.listener.proxy_protocol,
                    "eligible_backends": f.targets.iter().filter(|t| t.is_eligible()).count(),
                })
            })
            .collect();
        serde_json::json!({
            "role": "balancer",
            "version": env!("CARGO_PKG_VERSION"),
            "ready": self.0.is_ready(),
            "listeners": listeners,
            "backends": backend_list(&state),
        })
        .to_string()
    }
}

/// Every worker per listener, as the state in service has them.
fn backend_list(state: &State) -> Vec<serde_json::Value> {
    state
        .frontends()
        .flat_map(|f| {
            f.targets.iter().map(|t| {
                serde_json::json!({
                    "listener": f.listener.name,
                    "backend": t.name,
                    "address": t.addr.to_string(),
                    "weight": t.weight(),
                    "up": t.is_up(),
                    "draining": t.is_draining(),
                    "eligible": t.is_eligible(),
                    "active": t.active(),
                })
            })
        })
        .collect()
}

impl AdminApi for BalancerAdmin {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(async move {
            match (method, path) {
                ("GET", "/backends") => return Some((200, self.backends())),
                ("GET", "/status") => return Some((200, self.status())),
                _ => {}
            }
            let rest = path.strip_prefix("/backends/")?;
            let (name, action) = rest.rsplit_once('/')?;
            let on = match (method, action) {
                ("POST", "drain") => true,
                ("POST", "undrain") => false,
                _ => return Some((405, r#"{"error":"POST drain or undrain"}"#.into())),
            };
            if self.0.set_drain(name, on) {
                Some((200, self.backends()))
            } else {
                Some((
                    404,
                    serde_json::json!({ "error": format!("no backend {name}") }).to_string(),
                ))
            }
        })
    }

    fn allowed(&self, path: &str) -> &'static str {
        match path.starts_with("/backends/") {
            true => "POST",
            false => "",
        }
    }
}
