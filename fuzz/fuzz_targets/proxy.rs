//! The worker's PROXY header parser on arbitrary input, whole and cut at
//! every length: it never panics, never asks for more than the cap, and
//! what it accepts it accepts the same way when fed in pieces.
#![no_main]

use ferry_worker::proxy::{parse, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    for cut in 0..data.len().min(MAX_HEADER + 16) {
        match parse(&data[..cut]) {
            // A complete header in a prefix is the same header in the whole.
            Ok(Some(p)) => {
                let Ok(Some(w)) = &whole else {
                    panic!("prefix accepted, whole not: {whole:?}");
                };
                assert_eq!(p.source, w.source);
                return;
            }
            Ok(None) => assert!(cut < MAX_HEADER, "asked for more past the cap"),
            Err(_) => return,
        }
    }
});
