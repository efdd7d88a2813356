//! Arbitrary bytes from a control peer, fed in arbitrary chunks: the frame
//! decoder and the message decoder must never panic, never yield a frame
//! over the maximum, and whatever decodes must encode back to a decodable
//! frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skerry::frame::{FrameDecoder, MAX_FRAME_LEN};
use skerry::protocol::Message;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut decoder = FrameDecoder::new();
    for chunk in [&data[..split], &data[split..]] {
        if decoder.feed(chunk).is_err() {
            return;
        }
        while let Ok(Some(body)) = decoder.next_frame() {
            assert!(!body.is_empty() && body.len() <= MAX_FRAME_LEN);
            if let Ok(msg) = Message::decode(&body) {
                let mut wire = Vec::new();
                if msg.encode(&mut wire).is_ok() {
                    let mut again = FrameDecoder::new();
                    again.feed(&wire).expect("own frame header");
                    let body = again.next_frame().expect("own frame").expect("whole frame");
                    assert_eq!(Message::decode(&body).expect("own message"), msg);
                }
            }
        }
    }
});
