//! SMTP wire protocol for Ferry, sans-IO.
//!
//! The server side of an SMTP session as an explicit state machine: bytes go
//! in with [`ServerSession::push`], and [`ServerSession::next_event`] hands
//! out either a reply the session decided itself (syntax, sequence, limits,
//! NOOP, HELP, ...) or an [`Event`] that needs a policy decision from the
//! caller (MAIL, RCPT, a complete message, STARTTLS, AUTH credentials). The
//! caller answers with [`ServerSession::decide`].
//!
//! Modules: [`address`] (the envelope address: mailbox, reverse- and
//! forward-path, their one wire form), [`command`] (MAIL and RCPT lines),
//! [`reply`] (reply type and wire form), [`client`] (reading a
//! server's replies and EHLO capabilities), [`session`] (the state
//! machine), [`data`] (DATA framing, dot-unstuffing and line-ending
//! normalisation), [`sasl`] (AUTH PLAIN and LOGIN decoding).
//!
//! Command parsing is Stalwart's `smtp-proto`, but for MAIL and RCPT,
//! whose paths are ours to keep exactly (see [`command`]). This crate owns no socket, no
//! clock and no policy: which sender may relay where is `ferry-config`'s
//! business, and sockets and timers are `ferry-worker`'s.
#![forbid(unsafe_code)]

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod reply;
pub mod sasl;
pub mod session;

pub use address::{AddressError, Domain, ForwardPath, Mailbox, ReversePath};
pub use reply::Reply;
pub use session::{
    AuthOffer, Credentials, Envelope, Event, MailFrom, ServerSession, SessionConfig,
};

/// The longest command line accepted, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// The longest AUTH command or SASL response line (RFC 4954 §4).
pub const MAX_AUTH_LINE: usize = 12_288;
