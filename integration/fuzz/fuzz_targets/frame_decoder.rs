//! Feeds arbitrary bytes to every decoding entry point of the wire protocol:
//! the slice parser, the streaming reader (with a small and the default
//! maximum frame size) and the message decoder. Any panic is a bug; every
//! input must end in a frame or a typed error.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use pyproxy::protocol::{Frame, FrameReader, Kind, Message, DEFAULT_MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::parse(rest, DEFAULT_MAX_FRAME) {
        if let Ok(msg) = Message::decode(&frame) {
            // Whatever decodes must encode back to the same frame.
            assert_eq!(msg.to_frame(frame.request_id), frame);
        }
        rest = &rest[used..];
    }
    for max in [64, DEFAULT_MAX_FRAME] {
        let mut reader = FrameReader::new(Cursor::new(data), max);
        while let Ok(frame) = reader.read_frame() {
            let _ = Message::decode(&frame);
        }
    }
    if let Some((&k, payload)) = data.split_first() {
        if let Ok(kind) = Kind::try_from(k) {
            let _ = Message::decode_parts(kind, payload);
        }
    }
});
