//! Property tests of the envelope address: every RFC 5321 §4.1.2 form
//! (dot-string and quoted local parts, names, IPv4 and IPv6 literals, UTF-8
//! per RFC 6531) written and parsed back is the same address, and what is
//! written is a path a session reads back whole, with nothing of the
//! address taken for a parameter.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use ferry_smtp::command::{parse_mail, parse_rcpt};
use ferry_smtp::{Domain, ForwardPath, Mailbox, ReversePath};
use proptest::prelude::*;

/// Local-part texts: plain atoms, and texts that need quoting (spaces,
/// quotes, backslashes, `>`, `@`, `<`, parameter-looking text, UTF-8).
fn local_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,12}(\\.[a-zA-Z0-9_-]{1,8}){0,2}",
        "[ -~]{1,20}",
        "[a-z]{1,6}[ \"\\\\<>@,;:.]{1,4}[a-z]{0,6}( SIZE=1| NOTIFY=NEVER)?",
        "[a-zäöüé日本]{1,10}",
    ]
}

fn domain() -> impl Strategy<Value = Domain> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}"
            .prop_map(|d| Domain::parse(&d).unwrap()),
        "[A-Z][a-zA-Z0-9]{0,8}\\.(TEST|Example)".prop_map(|d| Domain::parse(&d).unwrap()),
        any::<[u8; 4]>().prop_map(|o| {
            Domain::parse(&format!("[{}.{}.{}.{}]", o[0], o[1], o[2], o[3])).unwrap()
        }),
        any::<u128>().prop_map(|n| {
            let ip = std::net::Ipv6Addr::from(n);
            Domain::parse(&format!("[IPv6:{ip}]")).unwrap()
        }),
        "b[üä]cher\\.test".prop_map(|d| Domain::parse(&d).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn written_then_parsed_is_the_same_mailbox(text in local_text(), domain in domain()) {
        let mailbox = Mailbox::from_parts(&text, domain.clone()).unwrap();
        let written = mailbox.to_string();
        let again = Mailbox::parse(&written).unwrap();
        prop_assert_eq!(&again, &mailbox);
        prop_assert_eq!(again.local_part_text(), text);
        prop_assert_eq!(again.domain().normalized(), domain.normalized());
        // Stored and read back (the spool's JSON) unchanged.
        let stored = serde_json::to_string(&mailbox).unwrap();
        prop_assert_eq!(serde_json::from_str::<Mailbox>(&stored).unwrap(), mailbox.clone());
    }

    #[test]
    fn written_path_is_read_back_whole_by_mail_and_rcpt(
        text in local_text(),
        domain in domain(),
        size in 0usize..100_000,
    ) {
        let mailbox = Mailbox::from_parts(&text, domain).unwrap();
        let line = format!("MAIL FROM:<{mailbox}> SIZE={size} SMTPUTF8\r\n");
        let mail = parse_mail(line.as_bytes()).unwrap();
        prop_assert_eq!(mail.path, ReversePath::Mailbox(mailbox.clone()));
        prop_assert_eq!(mail.size, size);
        prop_assert!(mail.smtputf8);
        let line = format!("RCPT TO:<{mailbox}>\r\n");
        prop_assert_eq!(parse_rcpt(line.as_bytes()).unwrap(), ForwardPath::Mailbox(mailbox));
    }

    /// Whatever a client sends, the parser answers without panicking, and
    /// whatever it accepts it writes back in a form it accepts again.
    #[test]
    fn any_path_parses_or_is_refused(path in "[ -~]{0,40}") {
        let line = format!("RCPT TO:<{path}>\r\n");
        if let Ok(ForwardPath::Mailbox(m)) = parse_rcpt(line.as_bytes()) {
            let again = format!("RCPT TO:<{m}>\r\n");
            prop_assert_eq!(parse_rcpt(again.as_bytes()).unwrap(), ForwardPath::Mailbox(m));
        }
    }
}
