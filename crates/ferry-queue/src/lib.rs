//! Ferry's spool: where accepted messages live until they are delivered.
//!
//! [`Spool`] is the interface the worker hands accepted messages to; its
//! `store` returns only once message and envelope are durable, and only then
//! may the worker answer `250`. [`Journal`] appends messages to segment
//! files and makes many durable with one `fdatasync` (group commit), so a
//! crash at any moment leaves each message whole or absent, and nothing
//! acknowledged is lost. It deletes segments once their messages are gone,
//! and re-appends the few live messages of an old segment (compaction) so
//! that a message deferred for days does not keep every later segment on
//! disk.
//!
//! Modules: [`dsn`] (bounces and delay notices, RFC 3464), [`envelope`] (what is stored with a message), [`journal`] (the
//! on-disk spool and its recovery), [`state`] (per-recipient delivery state). Delivery, retries and DSNs build on
//! this; the network is never touched here.
#![forbid(unsafe_code)]

pub mod dsn;
pub mod envelope;
pub mod journal;
pub mod state;

use std::future::Future;
use std::pin::Pin;

pub use envelope::{QueueId, StoredEnvelope};
pub use journal::{Journal, MessageWriter, QueueCounts, SpooledBody, SpooledMessage, CHUNK_SIZE};
pub use state::{DeliveryState, RecipientState, RecipientStatus};

/// Why a message could not be stored. Every variant is temporary for the
/// client: it gets a 4xx and sends again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The disk is full (`452 4.3.1`).
    #[error("no space left in the spool: {0}")]
    Full(std::io::Error),
    /// Any other I/O failure (`451 4.3.0`).
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("spool task failed: {0}")]
    Task(String),
}

pub type StoreFuture<'a> = Pin<Box<dyn Future<Output = Result<QueueId, SpoolError>> + Send + 'a>>;
pub type AppendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SpoolError>> + Send + 'a>>;

/// Durable storage for accepted messages.
pub trait Spool: Send + Sync + 'static {
    /// Stores a message under `id` (made with [`QueueId::new`]); resolves
    /// once it is durable on disk.
    fn store(&self, id: QueueId, envelope: StoredEnvelope, message: Vec<u8>) -> StoreFuture<'_>;

    /// Starts a message under `id` that arrives in pieces (DATA as it
    /// comes): the session's memory is one piece, not the message.
    fn begin(&self, id: QueueId) -> Box<dyn MessageSink>;
}

/// A message being written to the spool as it arrives. Dropped without
/// [`MessageSink::commit`], it leaves nothing a restart would find.
pub trait MessageSink: Send {
    /// Appends the message's next bytes. Waits only for the piece before
    /// (at most one is being written while the session reads on).
    fn append(&mut self, bytes: Vec<u8>) -> AppendFuture<'_>;

    /// Octets appended so far.
    fn appended(&self) -> u64;

    /// Ends the message: `head` (trace fields) goes in front of what was
    /// appended, `tail` after it. Resolves once the whole message and its
    /// envelope are durable (then, and only then, `250`).
    fn commit(
        self: Box<Self>,
        envelope: StoredEnvelope,
        head: Vec<u8>,
        tail: Vec<u8>,
    ) -> StoreFuture<'static>;
}
