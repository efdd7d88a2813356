//! Arbitrary bytes as a TCP flow header and as a tunneled UDP datagram:
//! never a panic, and what decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skerry::flow::{DatagramHeader, FlowHeader};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, used))) = FlowHeader::decode(data) {
        let mut again = Vec::new();
        header.encode(&mut again);
        // A v4-mapped client is sent as IPv4, so compare decoded values.
        let (back, n) = FlowHeader::decode(&again).expect("own header").expect("whole header");
        assert_eq!(back, header);
        assert_eq!(n, again.len());
        assert!(used <= data.len());
    }
    if let Ok((header, payload)) = DatagramHeader::decode(data) {
        let mut again = Vec::new();
        header.encode(&mut again);
        again.extend_from_slice(payload);
        let (back, p) = DatagramHeader::decode(&again).expect("own datagram");
        assert_eq!(back, header);
        assert_eq!(p, payload);
    }
});
