//! Protocol logs in Exchange's SMTP receive format: CSV, one file a day
//! (`DATA/logs/smtp-receive/RECVyyyymmdd.LOG`), written for connectors
//! whose `protocol_log` is `verbose`. AUTH secrets never reach it: the
//! session masks them before they are logged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;

use crate::daily::{DailyFile, Overflow};

/// Lines that may wait for the writer thread (a few seconds of a busy
/// node's sessions).
const QUEUED_LINES: usize = 64 * 1024;

const FIELDS: &str =
    "date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context";

/// The shared writer of one node's protocol log. Lines are written by a
/// thread of its own; when it is `QUEUED_LINES` behind, lines are dropped
/// and counted (`ferry_log_lines_dropped_total{log="RECV"}`): a
/// diagnostic log must never slow the sessions it describes.
pub struct ProtocolLogger {
    file: DailyFile,
}

fn header() -> String {
    format!(
        "#Software: Ferry\r\n#Version: {}\r\n#Log-type: SMTP Receive Protocol Log\r\n#Date: {}\r\n#Fields: {FIELDS}\r\n",
        env!("CARGO_PKG_VERSION"),
        Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
    )
}

impl ProtocolLogger {
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("logs").join("smtp-receive");
        Self {
            file: DailyFile::new(dir, "RECV", "LOG", header, Overflow::Drop, QUEUED_LINES),
        }
    }

    /// The file of a given day.
    pub fn path_for(&self, day: chrono::NaiveDate) -> PathBuf {
        self.file.path_for(day)
    }

    fn write_line(&self, line: String) {
        self.file.append(line);
    }

    /// Resolves once every line logged before is written.
    pub async fn flush(&self) {
        self.file.flush().await;
    }
}

/// Quotes a CSV field where it must be quoted.
fn csv(field: &str) -> String {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// One session's view of the log: numbers its lines.
pub struct SessionLog {
    logger: Option<Arc<ProtocolLogger>>,
    connector: String,
    session_id: String,
    local: SocketAddr,
    remote: SocketAddr,
    seq: u32,
}

/// Exchange's event column.
#[derive(Debug, Clone, Copy)]
pub enum LogEvent {
    Connect,
    Disconnect,
    Send,
    Receive,
    Info,
}

impl LogEvent {
    fn symbol(self) -> &'static str {
        match self {
            LogEvent::Connect => "+",
            LogEvent::Disconnect => "-",
            LogEvent::Send => ">",
            LogEvent::Receive => "<",
            LogEvent::Info => "*",
        }
    }
}

impl SessionLog {
    pub fn new(
        logger: Option<Arc<ProtocolLogger>>,
        connector: &str,
        session_id: &str,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Self {
        Self {
            logger,
            connector: connector.to_string(),
            session_id: session_id.to_string(),
            local,
            remote,
            seq: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.logger.is_some()
    }

    pub fn log(&mut self, event: LogEvent, data: &str, context: &str) {
        let Some(logger) = &self.logger else { return };
        let line = format!(
            "{},{},{},{},{},{},{},{},{}\r\n",
            Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            csv(&self.connector),
            self.session_id,
            self.seq,
            self.local,
            self.remote,
            event.symbol(),
            csv(data),
            csv(context),
        );
        self.seq += 1;
        logger.write_line(line);
    }
}
