//! `ferry config explain`: which connector and which rule decide for a
//! given client, port, TLS and auth state.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{ClusterConfig, Connector};

/// The situation to explain.
#[derive(Debug, Clone)]
pub struct Question {
    pub client: IpAddr,
    pub port: u16,
    /// The node's local address (defaults to 0.0.0.0: only connectors bound
    /// to no address match).
    pub local: Option<IpAddr>,
    pub tls: bool,
    pub user: Option<String>,
}

/// Renders the explanation as text for a person.
pub fn explain(config: &ClusterConfig, q: &Question) -> String {
    let mut out = String::new();
    if let Some(b) = &config.balancer {
        let listener = b.listeners.iter().find(|l| l.port == q.port);
        let _ = match (listener, b.access.rule_for(q.client)) {
            (None, _) => writeln!(
                out,
                "balancer: no listener on port {}; a client connecting to the balancer there is refused \
                 (what follows holds for a client connecting to a worker directly)",
                q.port
            ),
            (Some(l), Some((net, true))) => {
                let forward = if l.backend_port == l.port {
                    String::new()
                } else {
                    format!(", to the workers' port {}", l.backend_port)
                };
                writeln!(
                    out,
                    "balancer: client {} allowed (allow {net}) on listener \"{}\"{forward}",
                    q.client, l.name
                )
            }
            (Some(_), Some((net, false))) => writeln!(
                out,
                "balancer: client {} denied (deny {net}); the connection gets: 554 5.7.1 Access denied \
                 (what follows holds for a client connecting to a worker directly)",
                q.client
            ),
            (Some(_), None) => writeln!(
                out,
                "balancer: client {} denied (no allow range holds it); the connection gets: 554 5.7.1 Access denied \
                 (what follows holds for a client connecting to a worker directly)",
                q.client
            ),
        };
    }
    if config.is_trusted_proxy(q.client) {
        let _ = writeln!(
            out,
            "client {} is a trusted proxy: a connection from it to a worker must start with a PROXY header, \
             which names the client the rest applies to",
            q.client
        );
    }
    let local = q.local.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let Some(sel) = config.select(local, q.port, q.client) else {
        let _ = writeln!(
            out,
            "client {} on port {}: no connector holds this address\n  \
             the connection gets: 554 5.7.1 No receive connector accepts connections from your address",
            q.client, q.port
        );
        return out;
    };
    let c = &sel.connector;
    let binding = c
        .local_address
        .map_or("any local address".to_string(), |a| {
            format!("local address {a}")
        });
    let _ = writeln!(
        out,
        "client {} on port {}: connector \"{}\"",
        q.client, q.port, c.name
    );
    let _ = writeln!(
        out,
        "  why: bound to {binding}; remote range {} is the most specific holding {} (/{})",
        sel.matched,
        q.client.to_canonical(),
        sel.matched.prefix_len()
    );
    for (other, net) in &sel.shadowed {
        let _ = writeln!(out, "  shadows: \"{}\" (range {net})", other.name);
    }
    let _ = writeln!(out, "  banner: 220 {}", c.banner);
    // After TLS is up, EHLO no longer lists STARTTLS (RFC 3207 §4.2).
    let _ = writeln!(
        out,
        "  STARTTLS: {}",
        match (c.auth.starttls, q.tls) {
            (true, false) => "offered",
            (true, true) => "done (the session is TLS; not offered again, RFC 3207 §4.2)",
            (false, false) => "not offered",
            (false, true) =>
                "not offered: a session on this connector cannot be TLS, so --tls does not apply",
        }
    );
    let _ = writeln!(out, "  AUTH: {}", auth_state(c, q.tls));

    let user = match &q.user {
        None => None,
        Some(name) => match config.user(name) {
            None => {
                let _ = writeln!(
                    out,
                    "  user {name}: no such user; the session stays anonymous"
                );
                None
            }
            Some(_) if !auth_available(c, q.tls) => {
                let _ = writeln!(
                    out,
                    "  user {name}: cannot authenticate here ({}); the session stays anonymous",
                    auth_state(c, q.tls)
                );
                None
            }
            Some(u) => Some(u.clone()),
        },
    };
    let who = user
        .as_ref()
        .map_or("anonymous".to_string(), |u| format!("user {}", u.name));
    let inside = config
        .accepted_domains
        .first()
        .map_or("example.invalid".to_string(), |d| d.domain.clone());
    let sender = user
        .as_ref()
        .and_then(|u| u.allowed_senders.first())
        .map_or(format!("device@{inside}"), |p| match p {
            crate::model::SenderPattern::Address(a) => a.to_string(),
            crate::model::SenderPattern::Domain(d) => format!("device@{d}"),
            crate::model::SenderPattern::Any => format!("device@{inside}"),
        });
    let _ = writeln!(out, "  relay decisions ({who}, sender <{sender}>):");
    let sender_path = ferry_smtp::ReversePath::parse(&sender).unwrap_or_default();
    match config.check_sender(c, user.as_deref(), q.client, &sender_path) {
        Err(refusal) => {
            let _ = writeln!(out, "    MAIL FROM:<{sender}> -> {refusal}");
        }
        Ok(()) => {
            let _ = writeln!(out, "    MAIL FROM:<{sender}> -> 250 accepted");
            for rcpt in [
                format!("someone@{inside}"),
                "someone@outside.invalid".to_string(),
            ] {
                let verdict = match ferry_smtp::ForwardPath::parse(&rcpt) {
                    Err(e) => format!("501 5.1.3 Invalid address: {e}"),
                    Ok(path) => match config.check_recipient(c, user.as_deref(), &path, local) {
                        Ok(()) => "250 accepted".to_string(),
                        Err(r) => r.to_string(),
                    },
                };
                let _ = writeln!(out, "    RCPT TO:<{rcpt}> -> {verdict}");
            }
        }
    }
    out
}

fn auth_available(c: &Connector, tls: bool) -> bool {
    c.auth.basic && (tls || !c.auth.require_tls)
}

fn auth_state(c: &Connector, tls: bool) -> &'static str {
    match (c.auth.basic, c.auth.require_tls, tls) {
        (false, _, _) => "not offered",
        (true, true, false) => "only after STARTTLS (530 5.7.0 before it)",
        (true, _, _) => "PLAIN LOGIN offered",
    }
}
