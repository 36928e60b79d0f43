//! The client side: reading a server's replies (sans-IO) and what its EHLO
//! says it supports.

use crate::reply::Reply;

/// The longest reply line accepted from a server (RFC 5321 says 512; some
/// servers send more, so a little room).
const MAX_REPLY_LINE: usize = 2048;
/// The most lines of one reply.
const MAX_REPLY_LINES: usize = 128;

/// A server said something that is not an SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    #[error("reply line too long")]
    TooLong,
    #[error("reply has too many lines")]
    TooManyLines,
}

/// Collects replies from the bytes a server sends. The I/O loop that feeds
/// it is `ferry-client`'s `read_reply`, the only one in the workspace.
#[derive(Debug, Default)]
pub struct ReplyReader {
    buf: Vec<u8>,
    lines: Vec<String>,
    /// The bytes of the reply being read, and of the last one completed:
    /// a transcript shows what the server sent, and a balancer forwards a
    /// greeting as it came.
    wire: Vec<u8>,
    last_wire: Vec<u8>,
}

impl ReplyReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes as they arrived from the server.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The last complete reply as it came on the wire, CRLFs included.
    pub fn last_wire(&self) -> &[u8] {
        &self.last_wire
    }

    /// Bytes received past the last complete reply (a pipelining server's
    /// next replies, or the start of one).
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete reply, if one has arrived.
    pub fn next_reply(&mut self) -> Option<Result<Reply, ReplyError>> {
        loop {
            let Some(lf) = self.buf.iter().position(|b| *b == b'\n') else {
                return (self.buf.len() > MAX_REPLY_LINE).then_some(Err(ReplyError::TooLong));
            };
            let raw: Vec<u8> = self.buf.drain(..=lf).collect();
            if self.lines.is_empty() {
                self.wire.clear();
            }
            self.wire.extend_from_slice(&raw);
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (200..600).contains(c));
            let sep = line.as_bytes().get(3).copied();
            let (Some(code), Some(b' ' | b'-') | None) = (code, sep) else {
                return Some(Err(ReplyError::Malformed(line)));
            };
            self.lines.push(line.get(4..).unwrap_or("").to_string());
            if self.lines.len() > MAX_REPLY_LINES {
                return Some(Err(ReplyError::TooManyLines));
            }
            if sep != Some(b'-') {
                self.last_wire = std::mem::take(&mut self.wire);
                return Some(Ok(Reply::multi(code, std::mem::take(&mut self.lines))));
            }
        }
    }
}

/// What a server's EHLO reply offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// SIZE's limit; `Some(0)` means no stated limit.
    pub size: Option<u64>,
    /// AUTH offers PLAIN (RFC 4616).
    pub auth_plain: bool,
    /// AUTH offers LOGIN (draft-murchison-sasl-login).
    pub auth_login: bool,
    /// EHLO has an AUTH line at all.
    pub auth: bool,
}

impl Capabilities {
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut c = Capabilities::default();
        for line in reply.lines().iter().skip(1) {
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => c.pipelining = true,
                "STARTTLS" => c.starttls = true,
                "8BITMIME" => c.eight_bit_mime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "SIZE" => c.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => {
                    c.auth = true;
                    for m in words {
                        c.auth_plain |= m.eq_ignore_ascii_case("PLAIN");
                        c.auth_login |= m.eq_ignore_ascii_case("LOGIN");
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// The enhanced status code at the start of a reply's text, if any.
pub fn enhanced_code(reply: &Reply) -> Option<String> {
    let first = reply.lines().first()?.split_whitespace().next()?;
    is_enhanced_code(first).then(|| first.to_string())
}

/// Is `word` an enhanced status code (RFC 3463), such as `5.1.1`?
pub fn is_enhanced_code(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && matches!(parts.first(), Some(&"2" | &"4" | &"5"))
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn reads_multi_line_replies_split_anywhere() {
        let mut r = ReplyReader::new();
        r.push(b"250-mx.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r");
        assert!(r.next_reply().is_none());
        r.push(b"\n250 STARTTLS\r\n220 next\r\n");
        let ehlo = r.next_reply().unwrap().unwrap();
        assert_eq!(ehlo.code(), 250);
        let caps = Capabilities::from_ehlo(&ehlo);
        assert!(caps.pipelining && caps.starttls && !caps.auth_plain);
        assert_eq!(caps.size, Some(1000));
        assert_eq!(r.next_reply().unwrap().unwrap(), Reply::new(220, "next"));
        assert_eq!(r.last_wire(), b"220 next\r\n");
        assert!(r.buffered().is_empty());
    }

    #[test]
    fn keeps_the_wire_form_of_each_reply() {
        let mut r = ReplyReader::new();
        r.push(b"250-one\r\n250 two\n354 go");
        assert_eq!(r.next_reply().unwrap().unwrap().code(), 250);
        assert_eq!(r.last_wire(), b"250-one\r\n250 two\n");
        assert!(r.next_reply().is_none());
        assert_eq!(r.buffered(), b"354 go");
        let caps =
            Capabilities::from_ehlo(&Reply::multi(250, vec!["x".into(), "AUTH LOGIN".into()]));
        assert!(caps.auth && caps.auth_login && !caps.auth_plain);
    }

    #[test]
    fn refuses_garbage() {
        let mut r = ReplyReader::new();
        r.push(b"hello\r\n");
        assert!(matches!(
            r.next_reply(),
            Some(Err(ReplyError::Malformed(_)))
        ));
        r.push(&[b'2'; 5000]);
        assert_eq!(r.next_reply(), Some(Err(ReplyError::TooLong)));
    }

    proptest::proptest! {
        /// However the bytes are cut, the replies read are those sent, and
        /// their wire forms put together are the bytes sent.
        #[test]
        fn replies_cut_anywhere_read_the_same(
            replies in proptest::collection::vec(
                (200u16..600, proptest::collection::vec("[ -~]{0,40}", 1..4)),
                1..6,
            ),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let sent: Vec<Reply> = replies
                .into_iter()
                .map(|(code, lines)| Reply::multi(code, lines))
                .collect();
            let wire: Vec<u8> = sent.iter().flat_map(Reply::to_wire).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut r = ReplyReader::new();
            let (mut got, mut rewired, mut from) = (Vec::new(), Vec::new(), 0);
            for cut in cuts {
                r.push(&wire[from..cut]);
                from = cut;
                while let Some(reply) = r.next_reply() {
                    got.push(reply.unwrap());
                    rewired.extend_from_slice(r.last_wire());
                }
            }
            proptest::prop_assert_eq!(got, sent);
            proptest::prop_assert_eq!(rewired, wire);
            proptest::prop_assert!(r.buffered().is_empty());
        }

        /// Any bytes: a reply, an error, or a wait for more; never a panic,
        /// and never a line longer than the limit held.
        #[test]
        fn any_bytes_are_answered(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let mut r = ReplyReader::new();
            r.push(&bytes);
            for _ in 0..200 {
                match r.next_reply() {
                    None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        }
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(
            enhanced_code(&Reply::new(550, "5.1.1 no such user")).as_deref(),
            Some("5.1.1")
        );
        assert_eq!(enhanced_code(&Reply::new(550, "no such user")), None);
    }
}
