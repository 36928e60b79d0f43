//! Delivery status notifications (RFC 3464): the bounce and the delay
//! notice sent to a message's envelope sender.

use ferry_smtp::Mailbox;

use crate::envelope::StoredEnvelope;

/// One recipient's line in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedRecipient {
    pub address: Mailbox,
    /// The enhanced status code, e.g. `5.1.1`.
    pub status: String,
    /// The remote reply (or our own reason), e.g. `550 5.1.1 no such user`.
    pub diagnostic: String,
    pub remote_mta: Option<String>,
}

/// Failed for good, or not yet delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Failed,
    Delayed,
}

/// Everything a report needs.
pub struct Report<'a> {
    pub kind: ReportKind,
    /// Our host name (Reporting-MTA, the From address's domain).
    pub reporting_mta: &'a str,
    pub original: &'a StoredEnvelope,
    pub original_id: &'a str,
    /// The original message (its header section is quoted back).
    pub original_message: &'a [u8],
    pub recipients: &'a [ReportedRecipient],
    /// RFC 5322 date of now.
    pub date: &'a str,
    /// A unique token for the Message-ID and MIME boundary.
    pub unique: &'a str,
}

fn original_headers(message: &[u8]) -> &[u8] {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    message.get(..end).unwrap_or(message)
}

fn subject(message: &[u8]) -> Option<String> {
    let headers = String::from_utf8_lossy(original_headers(message));
    headers
        .split("\r\n")
        .find(|l| {
            l.len() > 8
                && l.get(..8)
                    .is_some_and(|n| n.eq_ignore_ascii_case("subject:"))
        })
        .and_then(|l| l.get(8..))
        .map(|s| s.trim().chars().filter(|c| !c.is_control()).collect())
}

/// Renders the report as a message to `original.mail_from` from the null
/// sender. The caller must not report on a message from the null sender.
pub fn render(r: &Report<'_>) -> Vec<u8> {
    let boundary = format!("=_ferry_{}", r.unique);
    let (subject_prefix, action, intro) = match r.kind {
        ReportKind::Failed => (
            "Undeliverable",
            "failed",
            "Your message could not be delivered to these recipients:",
        ),
        ReportKind::Delayed => (
            "Delivery delayed",
            "delayed",
            "Your message has not been delivered yet to these recipients. Ferry keeps trying; you need not send it again.",
        ),
    };
    let subj = subject(r.original_message).unwrap_or_else(|| "(no subject)".into());
    let mut human = format!("{intro}\r\n\r\n");
    for rc in r.recipients {
        human.push_str(&format!("  <{}>: {}\r\n", rc.address, rc.diagnostic));
    }
    human.push_str(&format!(
        "\r\nThe message was received from {} (connector \"{}\") as queue id {}.\r\n",
        r.original.client_ip, r.original.connector, r.original_id
    ));
    let mut status = format!(
        "Reporting-MTA: dns; {}\r\nX-Ferry-Queue-ID: {}\r\n",
        r.reporting_mta, r.original_id
    );
    for rc in r.recipients {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {action}\r\nStatus: {}\r\n",
            rc.address, rc.status
        ));
        if let Some(mta) = &rc.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        status.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", rc.diagnostic));
    }
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject_prefix}: {subj}\r\n\
         Date: {date}\r\n\
         Message-ID: <{unique}@{mta}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a delivery status notification in MIME format.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         {human}\r\n\
         --{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         {status}\r\n\
         --{boundary}\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n",
        mta = r.reporting_mta,
        to = r.original.mail_from,
        date = r.date,
        unique = r.unique,
    )
    .into_bytes();
    out.extend_from_slice(original_headers(r.original_message));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}
