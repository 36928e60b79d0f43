//! Arbitrary client input, cut into arbitrary reads, into one SMTP session.
//! The session must never panic, never buffer without bound, and answer
//! every decision it asks for.
#![no_main]

use ferry_smtp::{AuthOffer, Event, Reply, ServerSession, SessionConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, input)) = data.split_first() else { return };
    let mut session = ServerSession::new(SessionConfig {
        hostname: "fuzz.test".into(),
        max_message_size: 4096,
        max_recipients: 4,
        max_header_size: 1024,
        max_hop_count: 3,
        max_errors: 1000,
        starttls: knobs & 1 != 0,
        auth: match knobs >> 1 & 3 {
            0 => AuthOffer::Never,
            1 => AuthOffer::Always,
            _ => AuthOffer::AfterTls,
        },
        transcript: knobs & 8 != 0,
    });
    // Read sizes vary with the input so framing is tried at every boundary.
    let chunk = usize::from(knobs >> 4) + 1;
    for piece in input.chunks(chunk) {
        session.push(piece);
        let mut decisions = 0u32;
        while let Some(event) = session.next_event() {
            decisions += 1;
            let accept = decisions % 3 != 0;
            let answer = |ok: u16| Reply::new(if accept { ok } else { 550 }, "x");
            match event {
                Event::Reply(r) | Event::Close(r) => {
                    let _ = r.to_wire();
                }
                Event::Mail(_) | Event::Rcpt(_) | Event::Message(_) => {
                    session.decide(answer(250));
                }
                Event::StartTls => {
                    session.decide(answer(220));
                    if accept {
                        session.tls_established();
                    }
                }
                Event::Auth(_) => {
                    session.decide(answer(235));
                }
            }
        }
        let _ = session.take_transcript();
        // Command mode never holds more than one (long) line plus one read.
        assert!(
            session.in_transaction() || session.buffered() <= ferry_smtp::MAX_AUTH_LINE + chunk,
            "buffer grew to {}",
            session.buffered()
        );
    }
});
