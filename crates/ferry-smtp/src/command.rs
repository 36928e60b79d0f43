//! MAIL and RCPT command lines: the path and its ESMTP parameters.
//!
//! smtp-proto parses every other command; these two are ours because its
//! address reader drops the quotes of a quoted local part (so
//! `"odd user"@example.test` became `odd user@example.test`, and
//! `"a>x"@example.test` went out as `<a>x@example.test>`) and refuses
//! address literals and `<Postmaster>`. The path is found by its grammar
//! (quoted strings and literals can hold `>` or spaces), so text inside
//! quotes can never be read as a parameter.

use crate::address::{AddressError, ForwardPath, ReversePath};

/// `MAIL FROM:<reverse-path> [SP mail-parameters]` (RFC 5321 §4.1.1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailCommand {
    pub path: ReversePath,
    /// SIZE= (RFC 1870), 0 when absent.
    pub size: usize,
    /// BODY=8BITMIME (RFC 6152).
    pub body_8bit: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

/// Why a MAIL or RCPT line was refused; [`CommandError::reply`] gives the
/// reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// Not `FROM:<...>` / `TO:<...>`.
    Syntax,
    /// The path is there but not an address.
    Address(AddressError),
    /// A parameter we do not offer, or a bad value for one we do.
    Parameter(String),
}

/// Which command a [`CommandError`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Mail,
    Rcpt,
}

impl CommandError {
    /// The reply code and text (RFC 5321 §4.2.3, RFC 3463 for the enhanced
    /// codes: 5.1.7 a bad sender, 5.1.3 a bad recipient; RFC 5321
    /// §4.1.1.11: 555 for parameters not recognised).
    pub fn reply(&self, verb: Verb) -> (u16, String) {
        match (self, verb) {
            (CommandError::Syntax, Verb::Mail) => {
                (501, "5.5.4 Syntax: MAIL FROM:<address> [parameters]".into())
            }
            (CommandError::Syntax, Verb::Rcpt) => {
                (501, "5.5.4 Syntax: RCPT TO:<address> [parameters]".into())
            }
            (CommandError::Address(e), Verb::Mail) => (501, format!("5.1.7 Invalid address: {e}")),
            (CommandError::Address(e), Verb::Rcpt) => (501, format!("5.1.3 Invalid address: {e}")),
            (CommandError::Parameter(p), _) => (555, format!("5.5.4 Unsupported parameter {p}")),
        }
    }
}

/// Is `line` a MAIL (or RCPT) command? Only the verb is looked at.
pub fn verb(line: &[u8]) -> Option<Verb> {
    if line.get(4) != Some(&b' ') {
        return None;
    }
    match line.get(..4)? {
        w if w.eq_ignore_ascii_case(b"MAIL") => Some(Verb::Mail),
        w if w.eq_ignore_ascii_case(b"RCPT") => Some(Verb::Rcpt),
        _ => None,
    }
}

/// Parses a MAIL line (CRLF included or not).
///
/// # Errors
/// [`CommandError`] naming what is wrong.
pub fn parse_mail(line: &[u8]) -> Result<MailCommand, CommandError> {
    let (path, params) = split(line, b"FROM:")?;
    let path = ReversePath::parse(path).map_err(CommandError::Address)?;
    let mut mail = MailCommand {
        path,
        size: 0,
        body_8bit: false,
        smtputf8: false,
    };
    for param in params {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                // A size beyond usize is beyond any limit: keep it huge.
                mail.size = v.parse().unwrap_or(usize::MAX);
            }
            ("BODY", v) if v.eq_ignore_ascii_case("8BITMIME") => mail.body_8bit = true,
            ("BODY", v) if v.eq_ignore_ascii_case("7BIT") => mail.body_8bit = false,
            ("SMTPUTF8", "") => mail.smtputf8 = true,
            // RFC 4954 §5: a server that offers AUTH must take AUTH= on
            // MAIL; it may ignore it, as we do (the session's own
            // authentication is what counts).
            ("AUTH", v) if !v.is_empty() => {}
            _ => return Err(CommandError::Parameter(param.to_string())),
        }
    }
    Ok(mail)
}

/// Parses a RCPT line. No RCPT parameter is offered (no DSN), so any is
/// refused.
///
/// # Errors
/// [`CommandError`] naming what is wrong.
pub fn parse_rcpt(line: &[u8]) -> Result<ForwardPath, CommandError> {
    let (path, mut params) = split(line, b"TO:")?;
    let path = ForwardPath::parse(path).map_err(CommandError::Address)?;
    match params.next() {
        Some(p) => Err(CommandError::Parameter(p.to_string())),
        None => Ok(path),
    }
}

/// Splits `VERB SP keyword [SP*] "<" path ">" *(SP param)` into the path's
/// content and the parameters.
fn split<'a>(
    line: &'a [u8],
    keyword: &[u8],
) -> Result<(&'a str, impl Iterator<Item = &'a str>), CommandError> {
    let line = std::str::from_utf8(line)
        .map_err(|_| CommandError::Address(AddressError::NotUtf8))?
        .trim_end_matches(['\r', '\n']);
    let rest = line.get(5..).ok_or(CommandError::Syntax)?;
    let head = rest.get(..keyword.len()).ok_or(CommandError::Syntax)?;
    if !head.as_bytes().eq_ignore_ascii_case(keyword) {
        return Err(CommandError::Syntax);
    }
    // Many clients write `MAIL FROM: <a@b>`; Postfix and Exchange take it.
    let rest = rest
        .get(keyword.len()..)
        .unwrap_or_default()
        .trim_start_matches(' ');
    let inner = rest.strip_prefix('<').ok_or(CommandError::Syntax)?;
    let end = path_end(inner).ok_or(CommandError::Syntax)?;
    let path = inner.get(..end).ok_or(CommandError::Syntax)?;
    let after = inner.get(end + 1..).unwrap_or_default();
    if !after.is_empty() && !after.starts_with(' ') {
        return Err(CommandError::Syntax);
    }
    Ok((path, after.split(' ').filter(|p| !p.is_empty())))
}

/// The index of the `>` that closes a path, skipping quoted strings (with
/// their backslash escapes) and address literals.
fn path_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    let mut literal = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '[' if !quoted => literal = true,
            ']' if !quoted => literal = false,
            '>' if !quoted && !literal => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Mailbox;

    #[test]
    fn mail_with_parameters() {
        let m = parse_mail(b"MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n").unwrap();
        assert_eq!(m.path.to_string(), "a@b.test");
        assert_eq!((m.size, m.body_8bit, m.smtputf8), (100, true, true));
        let m = parse_mail(b"MAIL FROM:<a@b.test> AUTH=<> BODY=7BIT\r\n").unwrap();
        assert!(!m.body_8bit);
        let m = parse_mail(b"mail from: <> \r\n").unwrap();
        assert!(m.path.is_null());
        assert_eq!(
            parse_mail(b"MAIL FROM:<a@b.test> RET=HDRS\r\n"),
            Err(CommandError::Parameter("RET=HDRS".into()))
        );
        assert_eq!(
            parse_mail(b"MAIL FROM:a@b.test\r\n"),
            Err(CommandError::Syntax)
        );
        assert_eq!(
            parse_mail(b"MAIL FROM:<a@b.test>x\r\n"),
            Err(CommandError::Syntax)
        );
        assert_eq!(
            parse_mail(b"MAIL TO:<a@b.test>\r\n"),
            Err(CommandError::Syntax)
        );
    }

    #[test]
    fn quotes_cannot_end_the_path_or_start_a_parameter() {
        let to = parse_rcpt(b"RCPT TO:<\"a> NOTIFY=NEVER\"@example.test>\r\n").unwrap();
        let ForwardPath::Mailbox(m) = to else {
            panic!("not a mailbox")
        };
        assert_eq!(m.local_part_text(), "a> NOTIFY=NEVER");
        assert_eq!(
            parse_rcpt(b"RCPT TO:<a@example.test> NOTIFY=NEVER\r\n"),
            Err(CommandError::Parameter("NOTIFY=NEVER".into()))
        );
    }

    #[test]
    fn rcpt_forms() {
        assert_eq!(
            parse_rcpt(b"RCPT TO:<postmaster>\r\n"),
            Ok(ForwardPath::Postmaster)
        );
        assert_eq!(
            parse_rcpt(b"RCPT TO:<ops@[IPv6:2001:db8::25]>\r\n"),
            Ok(ForwardPath::Mailbox(
                Mailbox::parse("ops@[IPv6:2001:db8::25]").unwrap()
            ))
        );
        assert!(matches!(
            parse_rcpt(b"RCPT TO:<a b@example.test>\r\n"),
            Err(CommandError::Address(_))
        ));
        assert_eq!(verb(b"rcpt TO:<x@y>"), Some(Verb::Rcpt));
        assert_eq!(verb(b"MAILX"), None);
    }
}
