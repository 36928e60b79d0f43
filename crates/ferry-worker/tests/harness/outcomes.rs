//! What delivery did, seen from outside: files a directory route wrote,
//! the delivery states in the spool, the tracking log, and a message sent
//! through the Anon Relay connector to start it all.

use std::path::Path;
use std::time::Duration;

use super::Harness;

/// How long a test waits for delivery to do something.
pub const WAIT: Duration = Duration::from_secs(30);

/// Sends one message through the Anon Relay connector (may relay
/// anywhere), from `app@example.test`.
pub async fn relay(h: &Harness, to: &[&str]) {
    relay_from(h, "app@example.test", to).await;
}

/// The same from `from` (`""` for the null sender); returns the queue id
/// of the `250` reply.
pub async fn relay_from(h: &Harness, from: &str, to: &[&str]) -> String {
    let (mut c, banner) = h.front_from("127.0.0.30").await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("EHLO app").await;
    assert_eq!(
        c.cmd(&format!("MAIL FROM:<{from}>")).await,
        "250 2.1.0 Sender OK"
    );
    for r in to {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{r}>")).await,
            "250 2.1.5 Recipient OK"
        );
    }
    c.cmd("DATA").await;
    c.send(b"Subject: quarterly report\r\nMessage-ID: <q1@example.test>\r\n\r\n..leading dot\r\nbody\r\n.\r\n")
        .await
        .unwrap();
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.6.0 "), "{reply}");
    c.cmd("QUIT").await;
    reply
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

/// Polls (bounded by [`WAIT`]) until `ready` holds; returns whether it did.
pub async fn eventually(mut ready: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if ready() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The texts of the `.eml` files in `dir` that contain `needle`.
pub fn emls(dir: &Path, needle: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter(|t| t.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) for `.eml` files in `dir` whose text contains `needle`.
pub async fn wait_for_eml(dir: &Path, needle: &str) -> Vec<String> {
    eventually(|| !emls(dir, needle).is_empty()).await;
    emls(dir, needle)
}

/// Waits (bounded) until a delivery state in the spool contains `want`;
/// returns them all.
pub async fn wait_for_state(h: &Harness, want: &str) -> serde_json::Value {
    let data = h.data();
    eventually(|| {
        spool_states(&data)
            .iter()
            .any(|s| s.to_string().contains(want))
    })
    .await;
    serde_json::Value::Array(spool_states(&data))
}

/// The delivery states in the spool, read back as a restart would.
pub fn spool_states(data: &Path) -> Vec<serde_json::Value> {
    ferry_queue::journal::scan_states(data)
        .unwrap()
        .into_iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect()
}

/// Tracking events, as JSON, from every file of the tracking log.
pub fn tracking(data: &Path) -> Vec<serde_json::Value> {
    let Ok(dir) = std::fs::read_dir(data.join("logs").join("tracking")) else {
        return Vec::new();
    };
    dir.filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect()
}
