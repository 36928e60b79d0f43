//! `ferry queue`: list, show, retry, bounce or delete queued messages,
//! through a worker's admin endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Every message in the queue, one line each.
    List,
    /// One message in full (JSON).
    Show { id: String },
    /// Try a message again now.
    Retry { id: String },
    /// Give up on a message's pending recipients and bounce it to its sender.
    Bounce { id: String },
    /// Remove a message without telling anyone.
    Delete { id: String },
}

/// One HTTP/1.1 request to the admin endpoint; returns status and body.
fn request(
    admin: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let addr = admin
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .trim_end_matches('/');
    let mut s = TcpStream::connect(addr)
        .with_context(|| format!("connecting to the admin endpoint {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
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

pub fn run(
    admin: &str,
    token_file: Option<&std::path::Path>,
    cmd: QueueCommand,
) -> anyhow::Result<ExitCode> {
    let token = token_file.map(crate::token::read).transpose()?;
    let (method, path) = match &cmd {
        QueueCommand::List => ("GET", "/queue".to_string()),
        QueueCommand::Show { id } => ("GET", format!("/queue/{id}")),
        QueueCommand::Retry { id } => ("POST", format!("/queue/{id}/retry")),
        QueueCommand::Bounce { id } => ("POST", format!("/queue/{id}/bounce")),
        QueueCommand::Delete { id } => ("DELETE", format!("/queue/{id}")),
    };
    let (status, body) = request(admin, token.as_deref(), method, &path)?;
    if status != 200 {
        eprintln!("ferry queue: {status} {body}");
        return Ok(ExitCode::FAILURE);
    }
    if let QueueCommand::List = cmd {
        let v: serde_json::Value =
            serde_json::from_str(&body).context("reading the queue listing")?;
        let empty = Vec::new();
        let messages = v
            .get("messages")
            .and_then(|m| m.as_array())
            .unwrap_or(&empty);
        println!(
            "{:<20} {:>8} {:>8}  {:<30} recipients (state)",
            "id", "size", "attempts", "sender"
        );
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
            println!(
                "{:<20} {:>8} {:>8}  {:<30} {}",
                m["id"].as_str().unwrap_or(""),
                m["size"],
                m["attempts"],
                if sender.is_empty() { "<>" } else { &sender },
                rcpts.join(", ")
            );
        }
        println!("{} messages", messages.len());
    } else {
        println!("{body}");
    }
    Ok(ExitCode::SUCCESS)
}
