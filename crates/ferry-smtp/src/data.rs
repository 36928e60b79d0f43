//! DATA framing: end-of-data detection, dot-unstuffing, a size cap, and
//! line-ending normalisation.
//!
//! Only `CRLF . CRLF` ends the data. A bare LF or bare CR never takes part in
//! the end-of-data sequence, so `LF . CRLF` or `CRLF . LF` is message content
//! (the "SMTP smuggling" ambiguity is closed on our side). Ferry accepts such
//! messages and normalises every bare LF and bare CR to CRLF before it stores
//! them, as Postfix's `smtpd_forbid_bare_newline = normalize` does: devices
//! that end lines with LF keep working, and the stored message is canonical
//! and re-stuffed on the way out.

use smtp_proto::request::receiver::DataReceiver;

/// Reads the body of one DATA command.
pub struct DataReader {
    receiver: DataReceiver,
    body: Vec<u8>,
    received: usize,
    max: usize,
    /// The node ran short of memory for DATA: read to the end, keep nothing.
    shed: bool,
}

/// A finished DATA phase.
#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// The unstuffed, CRLF-normalised message.
    Message(Vec<u8>),
    /// More than the limit arrived; the content was discarded.
    TooLarge { received: usize },
    /// The node could not hold the message in memory; it was discarded.
    Shed,
}

impl DataReader {
    /// `max` is the largest message accepted, in octets.
    pub fn new(max: usize) -> Self {
        let mut receiver = DataReceiver::new();
        // The reader starts as if a CRLF had just been seen, so that a
        // message that is only ".\r\n" ends at once (an empty message).
        let mut primer = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut primer);
        Self {
            receiver,
            body: Vec::new(),
            received: 0,
            max,
            shed: false,
        }
    }

    /// Feeds `input`; returns how many bytes were consumed and whether the
    /// end of data was reached. Bytes after the end belong to the next
    /// command (pipelining).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut iter = input.iter();
        let before = self.body.len();
        let done = self.receiver.ingest(&mut iter, &mut self.body);
        let consumed = input.len() - iter.as_slice().len();
        self.received += self.body.len().saturating_sub(before);
        if self.received > self.max || self.shed {
            // Keep nothing over the limit in memory; keep reading to the end.
            self.body = Vec::new();
        }
        (consumed, done)
    }

    /// Octets of memory the message holds now.
    pub fn in_memory(&self) -> usize {
        self.body.capacity()
    }

    /// Drops what was read and keeps nothing more; the outcome will be
    /// [`DataOutcome::Shed`].
    pub fn shed(&mut self) {
        self.shed = true;
        self.body = Vec::new();
    }

    /// Octets of content received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    pub fn finish(self) -> DataOutcome {
        if self.shed {
            return DataOutcome::Shed;
        }
        if self.received > self.max {
            return DataOutcome::TooLarge {
                received: self.received,
            };
        }
        DataOutcome::Message(normalize_line_endings(self.body))
    }
}

/// Turns every bare LF and bare CR into CRLF.
pub fn normalize_line_endings(body: Vec<u8>) -> Vec<u8> {
    let clean = body.windows(2).all(|w| match w {
        [b'\r', b] => *b == b'\n',
        [a, b'\n'] => *a == b'\r',
        _ => true,
    }) && !body.starts_with(b"\n")
        && !body.ends_with(b"\r");
    if clean {
        return body;
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / 32);
    let mut iter = body.iter().peekable();
    while let Some(&b) = iter.next() {
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if iter.peek() == Some(&&b'\n') {
                    iter.next();
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            _ => out.push(b),
        }
    }
    out
}

/// Length of the header section: up to and including the blank line, or
/// the whole message if it has no body.
pub fn header_len(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 4)
}

/// How many `Received:` header fields the message carries (its hop count).
pub fn received_count(message: &[u8]) -> usize {
    let header = message.get(..header_len(message)).unwrap_or(message);
    header
        .split(|b| *b == b'\n')
        .filter(|line| {
            line.get(..9)
                .is_some_and(|name| name.eq_ignore_ascii_case(b"received:"))
        })
        .count()
}

/// The value of the first header field called `name` (unfolded, trimmed).
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let header = message.get(..header_len(message)).unwrap_or(message);
    let text = String::from_utf8_lossy(header);
    let mut lines = text.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        if !field.eq_ignore_ascii_case(name) {
            continue;
        }
        let mut value = value.trim().to_string();
        while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
            value.push(' ');
            value.push_str(next.trim());
            lines.next();
        }
        return Some(value.trim().to_string());
    }
    None
}

/// Dot-stuffs a CRLF-normalised message for sending and appends `.CRLF`.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], max: usize) -> (DataOutcome, usize) {
        let mut r = DataReader::new(max);
        let (n, done) = r.feed(input);
        assert!(done, "end of data not found");
        (r.finish(), n)
    }

    #[test]
    fn empty_message_ends_at_once() {
        assert_eq!(read_all(b".\r\n", 100), (DataOutcome::Message(vec![]), 3));
    }

    #[test]
    fn dot_stuffing_round_trip() {
        let original = b"line one\r\n.hidden\r\n..two dots\r\n.\r\nnot end\r\n";
        let stuffed = dot_stuff(original);
        assert_eq!(
            stuffed,
            b"line one\r\n..hidden\r\n...two dots\r\n..\r\nnot end\r\n.\r\n"
        );
        let (out, n) = read_all(&stuffed, 1000);
        assert_eq!(out, DataOutcome::Message(original.to_vec()));
        assert_eq!(n, stuffed.len());
    }

    #[test]
    fn bare_lf_never_ends_data_and_is_normalised() {
        let mut r = DataReader::new(1000);
        let (n, done) = r.feed(b"a\n.\nb\n.\r\nc\r\n.\nd\r\n");
        assert!(!done);
        assert_eq!(n, 17);
        let (_, done) = r.feed(b".\r\nQUIT\r\n");
        assert!(done);
        assert_eq!(
            r.finish(),
            // "CRLF ." starts a stuffed line: that dot goes; the LF-led dots stay.
            DataOutcome::Message(b"a\r\n.\r\nb\r\n.\r\nc\r\n\r\nd\r\n".to_vec())
        );
    }

    #[test]
    fn end_split_across_reads_and_leftover_kept() {
        let mut r = DataReader::new(1000);
        assert_eq!(r.feed(b"hello\r"), (6, false));
        assert_eq!(r.feed(b"\n."), (2, false));
        assert_eq!(r.feed(b"\r\nQUIT\r\n"), (2, true));
        assert_eq!(r.finish(), DataOutcome::Message(b"hello\r\n".to_vec()));
    }

    #[test]
    fn over_the_limit_is_discarded_to_the_end() {
        let mut r = DataReader::new(10);
        let (_, done) = r.feed(&[b'x'; 5000]);
        assert!(!done);
        let (_, done) = r.feed(b"\r\n.\r\n");
        assert!(done);
        assert_eq!(r.finish(), DataOutcome::TooLarge { received: 5002 });
    }

    #[test]
    fn bare_cr_is_normalised() {
        assert_eq!(
            normalize_line_endings(b"a\rb\r\nc\r".to_vec()),
            b"a\r\nb\r\nc\r\n"
        );
        assert_eq!(normalize_line_endings(b"\nx".to_vec()), b"\r\nx");
    }

    #[test]
    fn header_values_unfold() {
        let m = b"Subject: a\r\nMessage-ID:\r\n <x@y>\r\n\r\nMessage-ID: <body>\r\n";
        assert_eq!(header_value(m, "message-id").as_deref(), Some("<x@y>"));
        assert_eq!(header_value(m, "From"), None);
    }

    #[test]
    fn hop_count_reads_header_only() {
        let m = b"Received: a\r\nreceived: b\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(received_count(m), 2);
        assert_eq!(header_len(m), 40);
    }
}
