//! `ferry queue`: list, show, retry, bounce or delete queued messages,
//! through a worker's admin endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Every message in the queue, one line each.
    List,
    /// One message in full (JSON, times in RFC 3339).
    Show {
        /// The message's queue id (20 hex digits, any case).
        id: String,
    },
    /// Try a message again now.
    Retry {
        /// The message's queue id (20 hex digits, any case).
        id: String,
    },
    /// Give up on a message's pending recipients and bounce it to its sender.
    Bounce {
        /// The message's queue id (20 hex digits, any case).
        id: String,
    },
    /// Remove a message without telling anyone.
    Delete {
        /// The message's queue id (20 hex digits, any case).
        id: String,
    },
}

/// One HTTP/1.1 request to the admin endpoint; returns status and body.
pub(crate) fn request(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    request_within(addr, token, method, path, Duration::from_secs(30))
}

/// [`request`], giving up on connecting, and on each read, after `limit`.
pub(crate) fn request_within(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    let connected = match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => TcpStream::connect_timeout(&a, limit),
        Err(_) => TcpStream::connect(addr),
    };
    let mut s = connected.with_context(|| format!("connecting to the admin endpoint {addr}"))?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `http://127.0.0.1:8080/metrics`, `127.0.0.1:8080/` → `127.0.0.1:8080`.
fn admin_address(admin: &str) -> &str {
    admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .trim_end_matches("/metrics")
        .trim_end_matches('/')
}

/// Queue ids are upper-case hex; people copy them in any case.
fn queue_id(id: &str) -> anyhow::Result<String> {
    let id = id.trim();
    if id.len() != 20 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!("'{id}' is not a queue id (20 hex digits, as `ferry queue list` shows)");
    }
    Ok(id.to_ascii_uppercase())
}

pub fn run(
    admin: &str,
    token_file: Option<&std::path::Path>,
    cmd: QueueCommand,
) -> anyhow::Result<ExitCode> {
    let addr = admin_address(admin);
    let token = token_file.map(crate::token::read).transpose()?;
    let (method, path) = match &cmd {
        QueueCommand::List => ("GET", "/queue".to_string()),
        QueueCommand::Show { id } => ("GET", format!("/queue/{}", queue_id(id)?)),
        QueueCommand::Retry { id } => ("POST", format!("/queue/{}/retry", queue_id(id)?)),
        QueueCommand::Bounce { id } => ("POST", format!("/queue/{}/bounce", queue_id(id)?)),
        QueueCommand::Delete { id } => ("DELETE", format!("/queue/{}", queue_id(id)?)),
    };
    let (status, body) = request(addr, token.as_deref(), method, &path)?;
    if status != 200 {
        let role = match status {
            404 => node_role(addr),
            _ => None,
        };
        eprintln!(
            "ferry queue: {}",
            refusal(status, &body, addr, token_file.is_some(), role.as_deref())
        );
        return Ok(ExitCode::FAILURE);
    }
    let v: Value = serde_json::from_str(&body).context("reading the worker's answer")?;
    match cmd {
        QueueCommand::List => print!("{}", render_list(&v)),
        QueueCommand::Show { .. } => println!("{}", render_show(v)),
        _ => println!("{body}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The role a node's open `/status` names, if it answers.
fn node_role(addr: &str) -> Option<String> {
    let (status, body) = request(addr, None, "GET", "/status").ok()?;
    let v: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    v.get("role")?.as_str().map(String::from)
}

/// What to tell the user about a non-200 answer.
fn refusal(status: u16, body: &str, addr: &str, had_token: bool, role: Option<&str>) -> String {
    let error = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(String::from));
    let said = error.clone().unwrap_or_else(|| body.trim().to_string());
    match status {
        401 if had_token => format!(
            "401 {said}: the token in --token-file is not this worker's \
             (`ferry up` writes it to ferry-data/admin.token)"
        ),
        401 => format!(
            "401 {said}: queue operations need the worker's admin token; \
             pass its file with --token-file (`ferry up` writes ferry-data/admin.token)"
        ),
        403 => format!("403 {said}"),
        // A worker's own 404 names the message; anything else is not a worker.
        404 if error.is_some() => format!("404 {said}"),
        404 => match role {
            Some("worker") | None => format!(
                "404 from {addr}: it has no queue, so it is not a worker's admin endpoint \
                 (`ferry up` and `ferry worker` print each worker's admin URL)"
            ),
            Some(role) => format!(
                "404 from {addr}: that is a {role}'s admin endpoint, not a worker's; \
                 ferry queue needs a worker's (`ferry up` prints each worker's admin URL)"
            ),
        },
        _ => format!("{status} {said}"),
    }
}

/// Unix seconds as RFC 3339 (UTC, whole seconds).
fn rfc3339(secs: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The listing as an aligned table, then the count.
fn render_list(v: &Value) -> String {
    let empty = Vec::new();
    let messages = v["messages"].as_array().unwrap_or(&empty);
    let mut rows = vec![[
        "id".to_string(),
        "received".to_string(),
        "size".to_string(),
        "attempts".to_string(),
        "sender".to_string(),
        "recipients (state)".to_string(),
    ]];
    for m in messages {
        let rcpts: Vec<String> = m["recipients"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|r| {
                format!(
                    "{} ({})",
                    r["address"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or("")
                )
            })
            .collect();
        let sender = m["sender"].as_str().unwrap_or("");
        rows.push([
            m["id"].as_str().unwrap_or("").to_string(),
            m["received_at"].as_i64().map_or(String::new(), rfc3339),
            m["size"].to_string(),
            m["attempts"].to_string(),
            if sender.is_empty() { "<>" } else { sender }.to_string(),
            rcpts.join(", "),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            let cell = match i {
                // Numbers right-aligned, the last column not padded.
                2 | 3 => format!("{cell:>w$}  "),
                5 => cell.clone(),
                _ => format!("{cell:<w$}  "),
            };
            line.push_str(&cell);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let n = messages.len();
    out.push_str(&format!("{n} message{}\n", if n == 1 { "" } else { "s" }));
    out
}

/// One message as pretty JSON, its Unix-seconds fields in RFC 3339
/// (`next_attempt` 0 is "now": a retry was asked for).
fn render_show(mut v: Value) -> String {
    if let Some(m) = v.as_object_mut() {
        if let Some(at) = m.get("received_at").and_then(Value::as_i64) {
            m.insert("received_at".into(), Value::String(rfc3339(at)));
        }
        if let Some(at) = m.get("next_attempt").and_then(Value::as_i64) {
            let when = if at <= 0 { "now".into() } else { rfc3339(at) };
            m.insert("next_attempt".into(), Value::String(when));
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use serde_json::json;

    use super::*;

    #[test]
    fn the_listing_is_aligned_and_counts_in_words() {
        let list = json!({ "messages": [
            { "id": "0006412345678901ABCD", "received_at": 1_700_000_000, "size": 512, "attempts": 3,
              "sender": "scanner@example.test",
              "recipients": [{ "address": "a@elsewhere.test", "state": "deferred" }] },
            { "id": "0006412345678902ABCD", "received_at": 1_700_000_100, "size": 1_048_576, "attempts": 12,
              "sender": "", "recipients": [{ "address": "b@x.test", "state": "queued" }] },
        ]});
        let out = render_list(&list);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "id                    received                 size  attempts  sender                recipients (state)",
                "0006412345678901ABCD  2023-11-14T22:13:20Z      512         3  scanner@example.test  a@elsewhere.test (deferred)",
                "0006412345678902ABCD  2023-11-14T22:15:00Z  1048576        12  <>                    b@x.test (queued)",
                "2 messages",
            ]
        );
        let one = json!({ "messages": [list["messages"][0].clone()] });
        assert!(render_list(&one).ends_with("\n1 message\n"));
        assert!(render_list(&json!({ "messages": [] })).ends_with("\n0 messages\n"));
    }

    #[test]
    fn show_gives_times_in_rfc3339() {
        let shown =
            render_show(json!({ "received_at": 1_700_000_000, "next_attempt": 1_700_000_300 }));
        let v: Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(v["received_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["next_attempt"], "2023-11-14T22:18:20Z");
        let v: Value = serde_json::from_str(&render_show(json!({ "next_attempt": 0 }))).unwrap();
        assert_eq!(v["next_attempt"], "now");
    }

    #[test]
    fn ids_in_any_case_and_addresses_as_printed() {
        assert_eq!(
            queue_id(" 0006412345678901abcd").unwrap(),
            "0006412345678901ABCD"
        );
        assert!(queue_id("0006412345678901abc").is_err());
        assert!(queue_id("../../etc/passwd0000").is_err());
        for a in [
            "http://127.0.0.1:4000/metrics",
            "127.0.0.1:4000/",
            "http://127.0.0.1:4000",
        ] {
            assert_eq!(admin_address(a), "127.0.0.1:4000");
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let wrong = r#"{"error":"missing or wrong bearer token"}"#;
        assert!(refusal(401, wrong, "a:1", false, None).contains("pass its file with --token-file"));
        assert!(refusal(401, wrong, "a:1", true, None).contains("not this worker's"));
        let balancer = refusal(404, "not found\n", "127.0.0.1:9", true, Some("balancer"));
        assert_eq!(
            balancer,
            "404 from 127.0.0.1:9: that is a balancer's admin endpoint, not a worker's; \
             ferry queue needs a worker's (`ferry up` prints each worker's admin URL)"
        );
        let gone = r#"{"error":"no message 0006412345678901ABCD in the queue"}"#;
        assert_eq!(
            refusal(404, gone, "a:1", true, Some("worker")),
            "404 no message 0006412345678901ABCD in the queue"
        );
    }
}
