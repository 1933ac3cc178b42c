//! Drives the server's handshake state machine with arbitrary first frames:
//! whatever a stranger sends before proving the token must end in an accepted
//! HELLO/ATTACH or a refusal with an ERROR frame, never a panic — and a HELLO
//! without the right proof must never be accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pyproxy::protocol::{Frame, FrameReader};
use pyproxy::server::handshake::{Challenger, FirstFrame, PRE_AUTH_MAX_FRAME};
use pyproxy::server::token::Token;

fuzz_target!(|data: &[u8]| {
    let challenger = Challenger::with_nonce(Some(Token::new("fuzz-token")), [7u8; 32]);
    let _ = challenger.challenge();
    let mut reader = FrameReader::new(std::io::Cursor::new(data), PRE_AUTH_MAX_FRAME);
    while let Ok(frame) = reader.read_frame() {
        match challenger.classify(&frame) {
            Ok(FirstFrame::Hello(h)) => {
                // Only a correct proof over this challenger's nonce gets here; the
                // fuzzer cannot forge HMAC-SHA256, so reaching this is a bug.
                panic!("unauthenticated HELLO accepted: {:?}", h.client_nonce);
            }
            Ok(FirstFrame::Attach(_)) => {}
            Err(refusal) => {
                let f: Frame = refusal.to_frame();
                assert!(!f.payload.is_empty());
            }
        }
    }
});
