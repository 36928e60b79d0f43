//! Balancer operations on the admin endpoint: `GET /backends` (state and
//! load of every worker per listener), `POST /backends/NAME/drain` and
//! `POST /backends/NAME/undrain`.

use std::sync::Arc;

use ferry_telemetry::admin::{AdminAnswer, AdminApi};

use crate::Balancer;

pub struct BalancerAdmin(pub Arc<Balancer>);

impl BalancerAdmin {
    fn backends(&self) -> String {
        let list: Vec<serde_json::Value> = self
            .0
            .frontends
            .iter()
            .flat_map(|f| {
                f.targets.iter().map(|t| {
                    serde_json::json!({
                        "listener": f.listener.name,
                        "backend": t.backend.name,
                        "address": t.addr.to_string(),
                        "weight": t.backend.weight,
                        "up": t.is_up(),
                        "draining": t.is_draining(),
                        "eligible": t.is_eligible(),
                        "active": t.active(),
                    })
                })
            })
            .collect();
        serde_json::json!({ "backends": list }).to_string()
    }
}

impl AdminApi for BalancerAdmin {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(async move {
            if (method, path) == ("GET", "/backends") {
                return Some((200, self.backends()));
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
}
