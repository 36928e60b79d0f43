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
//!
//! The message is handed on in pieces as it arrives ([`DataReader::take_chunk`]),
//! so a session holds a piece, not the message: line endings are
//! normalised across pieces (a CR at the end of one waits for the next
//! byte), and the header section is read line by line on the way
//! ([`HeaderSummary`]) for the checks and trace fields that need it.

use std::mem;

use smtp_proto::request::receiver::DataReceiver;

/// What a message's header section says, as far as a relay needs it.
/// Read as the message streams by, never held whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSummary {
    /// Octets of the header section, its blank line included (the whole
    /// message if it has none), as [`header_len`] counts them.
    pub len: usize,
    /// `Received:` fields: the hop count (RFC 5321 §6.3).
    pub received: usize,
    /// The first `Message-ID:` field's value, unfolded and trimmed (as
    /// [`header_value`] reads it); `Some("")` for an empty field.
    pub message_id: Option<String>,
    /// A `Date:` field is there.
    pub has_date: bool,
}

/// Of one header line, this much is kept to read its field (the rest is
/// counted, not kept): more than any Message-ID a mailer makes.
const KEEP_LINE: usize = 4096;

/// Reads a header section line by line (CRLF-normalised input).
#[derive(Debug)]
struct HeaderScan {
    summary: HeaderSummary,
    /// The blank line that ends the header section was seen.
    done: bool,
    first_line: bool,
    /// The current line: its first [`KEEP_LINE`] octets, and its length.
    line: Vec<u8>,
    line_len: usize,
    /// The current field is the first `Message-ID:` (continuation lines
    /// belong to it).
    in_message_id: bool,
}

impl HeaderScan {
    fn new() -> Self {
        Self {
            summary: HeaderSummary::default(),
            done: false,
            first_line: true,
            line: Vec::new(),
            line_len: 0,
            in_message_id: false,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !self.done && !bytes.is_empty() {
            let (part, rest, whole) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    let (line, rest) = bytes.split_at(i + 1);
                    (line, rest, true)
                }
                None => (bytes, &[][..], false),
            };
            self.line_len += part.len();
            let room = KEEP_LINE.saturating_sub(self.line.len()).min(part.len());
            self.line
                .extend_from_slice(part.get(..room).unwrap_or_default());
            if whole {
                self.end_line();
            }
            bytes = rest;
        }
    }

    fn end_line(&mut self) {
        let line = mem::take(&mut self.line);
        let len = mem::replace(&mut self.line_len, 0);
        let first = mem::replace(&mut self.first_line, false);
        if len == 2 && line == b"\r\n" {
            // A message that starts with the blank line has no header.
            if !first {
                self.summary.len += 2;
            }
            self.done = true;
            return;
        }
        self.summary.len += len;
        self.field(&line);
    }

    fn field(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.starts_with([' ', '\t']) {
            if let Some(id) = self
                .summary
                .message_id
                .as_mut()
                .filter(|_| self.in_message_id)
            {
                id.push(' ');
                id.push_str(text.trim());
            }
            return;
        }
        self.in_message_id = false;
        if line
            .get(..9)
            .is_some_and(|name| name.eq_ignore_ascii_case(b"received:"))
        {
            self.summary.received += 1;
        }
        let Some((name, value)) = text.split_once(':') else {
            return;
        };
        if name.eq_ignore_ascii_case("message-id") && self.summary.message_id.is_none() {
            self.summary.message_id = Some(value.trim().to_string());
            self.in_message_id = true;
        } else if name.eq_ignore_ascii_case("date") {
            self.summary.has_date = true;
        }
    }

    /// The message ended: a last line without CRLF is header too.
    fn finish(mut self) -> HeaderSummary {
        if !self.done && self.line_len > 0 {
            let line = mem::take(&mut self.line);
            self.summary.len += self.line_len;
            self.field(&line);
        }
        if let Some(id) = self.summary.message_id.as_mut() {
            *id = id.trim().to_string();
        }
        self.summary
    }
}

/// Turns bare LF and bare CR into CRLF across pieces: a CR at the end of
/// a piece waits for the next byte.
#[derive(Debug, Default)]
struct Normalizer {
    cr_pending: bool,
}

impl Normalizer {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if mem::take(&mut self.cr_pending) {
            out.extend_from_slice(b"\r\n");
            if rest.first() == Some(&b'\n') {
                rest = rest.get(1..).unwrap_or_default();
            }
        }
        while let Some(i) = rest.iter().position(|b| *b == b'\r' || *b == b'\n') {
            out.extend_from_slice(rest.get(..i).unwrap_or_default());
            let after = rest.get(i + 1..).unwrap_or_default();
            if rest.get(i) == Some(&b'\n') {
                out.extend_from_slice(b"\r\n");
                rest = after;
            } else if after.is_empty() {
                self.cr_pending = true;
                rest = after;
            } else {
                out.extend_from_slice(b"\r\n");
                rest = after.strip_prefix(b"\n").unwrap_or(after);
            }
        }
        out.extend_from_slice(rest);
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if mem::take(&mut self.cr_pending) {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The limits one DATA command is read under, in octets.
#[derive(Debug, Clone, Copy)]
pub struct DataLimits {
    /// The largest message accepted (`552 5.3.4` above).
    pub max_size: usize,
    /// The largest header section accepted.
    pub max_header: usize,
    /// The most `Received:` fields accepted.
    pub max_hops: usize,
    /// Content is handed on in pieces of at least this many octets.
    pub chunk: usize,
}

/// Reads the body of one DATA command, handing it on in pieces.
pub struct DataReader {
    receiver: DataReceiver,
    /// Unstuffed octets of the last feed, before normalisation.
    scratch: Vec<u8>,
    normalizer: Normalizer,
    /// Normalised content not yet taken.
    body: Vec<u8>,
    header: HeaderScan,
    /// Octets of content received (unstuffed, before normalisation).
    received: usize,
    /// Octets taken as chunks.
    taken: usize,
    limits: DataLimits,
    /// The message will be refused: nothing more is kept or handed on.
    refused: bool,
}

/// The end of a message that may be accepted.
#[derive(Debug, PartialEq, Eq)]
pub struct MessageEnd {
    /// The message's last octets, after every chunk taken.
    pub tail: Vec<u8>,
    pub header: HeaderSummary,
    /// Octets of the whole message (chunks and tail).
    pub size: usize,
}

/// A finished DATA phase.
#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// The unstuffed, CRLF-normalised message (its last part).
    Message(MessageEnd),
    /// More than the limit arrived; the content was discarded.
    TooLarge { received: usize },
    /// The header section is over its limit.
    HeaderTooLarge,
    /// Too many `Received:` fields: a loop.
    TooManyHops,
}

impl DataReader {
    pub fn new(limits: DataLimits) -> Self {
        let mut receiver = DataReceiver::new();
        // The reader starts as if a CRLF had just been seen, so that a
        // message that is only ".\r\n" ends at once (an empty message).
        let mut primer = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut primer);
        Self {
            receiver,
            scratch: Vec::new(),
            normalizer: Normalizer::default(),
            body: Vec::new(),
            header: HeaderScan::new(),
            received: 0,
            taken: 0,
            limits,
            refused: false,
        }
    }

    /// Feeds `input`; returns how many bytes were consumed and whether the
    /// end of data was reached. Bytes after the end belong to the next
    /// command (pipelining).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut iter = input.iter();
        self.scratch.clear();
        let done = self.receiver.ingest(&mut iter, &mut self.scratch);
        let consumed = input.len() - iter.as_slice().len();
        self.received += self.scratch.len();
        if self.received > self.limits.max_size {
            self.refuse();
        }
        if !self.refused {
            let start = self.body.len();
            self.normalizer.push(&self.scratch, &mut self.body);
            self.header.feed(self.body.get(start..).unwrap_or_default());
            if self.header.summary.len > self.limits.max_header
                || self.header.summary.received > self.limits.max_hops
            {
                self.refuse();
            }
        }
        if self.scratch.capacity() > 64 * 1024 {
            self.scratch = Vec::new();
        }
        (consumed, done)
    }

    /// Keeps nothing more: the message will be refused whatever comes.
    fn refuse(&mut self) {
        self.refused = true;
        self.body = Vec::new();
    }

    /// The content received so far, once there is at least a chunk of it
    /// (and the message is not already bound to be refused).
    pub fn take_chunk(&mut self) -> Option<Vec<u8>> {
        if self.refused || self.body.len() < self.limits.chunk {
            return None;
        }
        self.taken += self.body.len();
        Some(mem::take(&mut self.body))
    }

    /// Octets of content received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    pub fn finish(mut self) -> DataOutcome {
        if self.received > self.limits.max_size {
            return DataOutcome::TooLarge {
                received: self.received,
            };
        }
        let start = self.body.len();
        self.normalizer.finish(&mut self.body);
        self.header.feed(self.body.get(start..).unwrap_or_default());
        let header = self.header.finish();
        if header.len > self.limits.max_header {
            return DataOutcome::HeaderTooLarge;
        }
        if header.received > self.limits.max_hops {
            return DataOutcome::TooManyHops;
        }
        DataOutcome::Message(MessageEnd {
            size: self.taken + self.body.len(),
            tail: self.body,
            header,
        })
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
    let mut stuffer = DotStuffer::default();
    stuffer.push(message, &mut out);
    stuffer.finish(&mut out);
    out
}

/// Dot-stuffs a CRLF-normalised message piece by piece for sending
/// (RFC 5321 §4.5.2): a line that starts with `.` gets another in front,
/// wherever the pieces are cut; [`DotStuffer::finish`] ends the data.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    /// The last two octets so far (to end with CRLF).
    last: [u8; 2],
    empty: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self {
            at_line_start: true,
            last: [0; 2],
            empty: true,
        }
    }
}

impl DotStuffer {
    /// Appends `piece`, stuffed, to `out`.
    pub fn push(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        let mut rest = piece;
        while !rest.is_empty() {
            if self.at_line_start && rest.first() == Some(&b'.') {
                out.push(b'.');
            }
            let (line, after) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => rest.split_at(i + 1),
                None => (rest, &[][..]),
            };
            out.extend_from_slice(line);
            self.at_line_start = line.last() == Some(&b'\n');
            rest = after;
        }
        match piece {
            [] => {}
            [b] => self.last = [self.last[1], *b],
            [.., a, b] => self.last = [*a, *b],
        }
        self.empty &= piece.is_empty();
    }

    /// Ends the data: a CRLF if the message did not end with one, then
    /// `.CRLF`.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.empty && self.last != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DataLimits = DataLimits {
        max_size: 1000,
        max_header: 1000,
        max_hops: 30,
        chunk: 1 << 20,
    };

    fn limits(max_size: usize) -> DataLimits {
        DataLimits { max_size, ..LIMITS }
    }

    fn message(outcome: DataOutcome) -> Vec<u8> {
        match outcome {
            DataOutcome::Message(end) => end.tail,
            other => panic!("not a message: {other:?}"),
        }
    }

    fn read_all(input: &[u8], max: usize) -> (DataOutcome, usize) {
        let mut r = DataReader::new(limits(max));
        let (n, done) = r.feed(input);
        assert!(done, "end of data not found");
        (r.finish(), n)
    }

    #[test]
    fn empty_message_ends_at_once() {
        let (out, n) = read_all(b".\r\n", 100);
        assert_eq!((message(out), n), (vec![], 3));
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
        assert_eq!(message(out), original.to_vec());
        assert_eq!(n, stuffed.len());
    }

    #[test]
    fn stuffing_in_pieces_is_stuffing_whole() {
        let original = b".a\r\n.b\r\nc.\r\n\r\n.\r\nend";
        for cut in 0..=original.len() {
            for cut2 in cut..=original.len() {
                let mut out = Vec::new();
                let mut s = DotStuffer::default();
                s.push(&original[..cut], &mut out);
                s.push(&original[cut..cut2], &mut out);
                s.push(&original[cut2..], &mut out);
                s.finish(&mut out);
                assert_eq!(out, dot_stuff(original), "cut at {cut}, {cut2}");
            }
        }
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"x\r\n"), b"x\r\n.\r\n");
    }

    #[test]
    fn bare_lf_never_ends_data_and_is_normalised() {
        let mut r = DataReader::new(LIMITS);
        let (n, done) = r.feed(b"a\n.\nb\n.\r\nc\r\n.\nd\r\n");
        assert!(!done);
        assert_eq!(n, 17);
        let (_, done) = r.feed(b".\r\nQUIT\r\n");
        assert!(done);
        assert_eq!(
            message(r.finish()),
            // "CRLF ." starts a stuffed line: that dot goes; the LF-led dots stay.
            b"a\r\n.\r\nb\r\n.\r\nc\r\n\r\nd\r\n".to_vec()
        );
    }

    #[test]
    fn end_split_across_reads_and_leftover_kept() {
        let mut r = DataReader::new(LIMITS);
        assert_eq!(r.feed(b"hello\r"), (6, false));
        assert_eq!(r.feed(b"\n."), (2, false));
        assert_eq!(r.feed(b"\r\nQUIT\r\n"), (2, true));
        assert_eq!(message(r.finish()), b"hello\r\n".to_vec());
    }

    #[test]
    fn over_the_limit_is_discarded_to_the_end() {
        let mut r = DataReader::new(limits(10));
        let (_, done) = r.feed(&[b'x'; 5000]);
        assert!(!done);
        assert_eq!(r.take_chunk(), None);
        let (_, done) = r.feed(b"\r\n.\r\n");
        assert!(done);
        assert_eq!(r.finish(), DataOutcome::TooLarge { received: 5002 });
    }

    #[test]
    fn content_is_handed_on_in_chunks_and_normalised_across_them() {
        let chunked = DataLimits { chunk: 4, ..LIMITS };
        let input: &[&[u8]] = &[
            b"Subject: a\r",
            b"\nX: b\r",
            b"c\n",
            b"\r\nbody\r",
            b"\r\n.\r\n",
        ];
        let mut r = DataReader::new(chunked);
        let mut got = Vec::new();
        for piece in input {
            r.feed(piece);
            while let Some(c) = r.take_chunk() {
                got.extend_from_slice(&c);
            }
        }
        let DataOutcome::Message(end) = r.finish() else {
            panic!("refused")
        };
        got.extend_from_slice(&end.tail);
        assert_eq!(got, b"Subject: a\r\nX: b\r\nc\r\n\r\nbody\r\n\r\n");
        assert_eq!(end.size, got.len());
        assert_eq!(end.header.len, header_len(&got));
    }

    #[test]
    fn the_header_read_in_passing_says_what_reading_it_whole_says() {
        let messages: &[&[u8]] = &[
            b"Received: a\r\nreceived: b\r\nMessage-ID:\r\n <x@y>\r\nDate: now\r\n\r\nMessage-ID: <body>\r\n",
            b"\r\nReceived: body\r\n",
            b"Subject: no body",
            b"Message-ID: \r\nSubject: x\r\n\r\n",
            b"Message-Id: <a@b>\r\n\r\n",
        ];
        for m in messages {
            let mut scan = HeaderScan::new();
            for b in m.chunks(3) {
                scan.feed(b);
            }
            let h = scan.finish();
            assert_eq!(h.len, header_len(m), "{m:?}");
            assert_eq!(h.received, received_count(m), "{m:?}");
            assert_eq!(h.message_id, header_value(m, "Message-ID"), "{m:?}");
            assert_eq!(h.has_date, header_value(m, "Date").is_some(), "{m:?}");
        }
    }

    #[test]
    fn too_many_hops_and_a_long_header_are_refused() {
        let hops = DataLimits {
            max_hops: 1,
            ..LIMITS
        };
        let (out, _) = {
            let mut r = DataReader::new(hops);
            let n = r.feed(b"Received: a\r\nReceived: b\r\n\r\nx\r\n.\r\n");
            (r.finish(), n)
        };
        assert_eq!(out, DataOutcome::TooManyHops);
        let short = DataLimits {
            max_header: 10,
            ..LIMITS
        };
        let mut r = DataReader::new(short);
        r.feed(b"Subject: longer than ten\r\n\r\nx\r\n.\r\n");
        assert_eq!(r.finish(), DataOutcome::HeaderTooLarge);
    }

    #[test]
    fn bare_cr_is_normalised() {
        assert_eq!(
            normalize_line_endings(b"a\rb\r\nc\r".to_vec()),
            b"a\r\nb\r\nc\r\n"
        );
        assert_eq!(normalize_line_endings(b"\nx".to_vec()), b"\r\nx");
        // The same, in pieces.
        for input in [&b"a\rb\r\nc\r"[..], b"\nx", b"\r\r\n\n\r"] {
            for cut in 0..=input.len() {
                let mut n = Normalizer::default();
                let mut out = Vec::new();
                n.push(&input[..cut], &mut out);
                n.push(&input[cut..], &mut out);
                n.finish(&mut out);
                assert_eq!(
                    out,
                    normalize_line_endings(input.to_vec()),
                    "{input:?} cut at {cut}"
                );
            }
        }
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
