//! Framing of the control channel.
//!
//! Every control message travels as one frame:
//!
//! ```text
//! +---------+----------------+----------------------+
//! | version | length (u32 BE)| body (postcard)      |
//! | 1 byte  | 4 bytes        | `length` bytes       |
//! +---------+----------------+----------------------+
//! ```
//!
//! The version is that of the framing itself (the message protocol negotiates
//! its own version in the first exchange). The length is checked against
//! [`MAX_FRAME_LEN`] before anything is allocated, so a peer cannot make us
//! reserve memory by announcing a large frame. The decoder is pure: it tells
//! "not enough bytes yet" (`Ok(None)`) from "this is not a frame" (`Err`).

use thiserror::Error;

/// The only framing version this build speaks.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 5;
/// The largest body accepted: a 1,000-entry port map with allow lists fits
/// with room to spare.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why bytes from the peer are not a frame. Each closes the connection.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum FrameError {
    #[error("frame version {0} is not supported (this build speaks version {FRAME_VERSION})")]
    Version(u8),
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    TooLarge(u64),
    #[error("empty frame")]
    Empty,
}

/// Writes a frame around `body` into `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len() as u64));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len() as u64))?;
    out.reserve(HEADER_LEN + body.len());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Reads the header at the start of `buf`: the body length, once enough
/// bytes are there.
pub fn body_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    let Some(len) = buf.get(1..HEADER_LEN) else {
        return Ok(None);
    };
    let mut be = [0u8; 4];
    be.copy_from_slice(len);
    let len = u32::from_be_bytes(be);
    let len_usize = usize::try_from(len).map_err(|_| FrameError::TooLarge(u64::from(len)))?;
    if len_usize > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    if len_usize == 0 {
        return Err(FrameError::Empty);
    }
    Ok(Some(len_usize))
}

/// Accumulates bytes from a stream and yields whole frame bodies.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the peer. Validates the header as soon as it
    /// is complete, so an oversized frame is refused before its body arrives.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        body_len(&self.buf).map(|_| ())
    }

    /// The next whole frame body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = body_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(body))
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_split_anywhere() {
        let mut wire = Vec::new();
        encode(b"hello", &mut wire).unwrap();
        encode(&[7u8; 300], &mut wire).unwrap();
        for split in 0..wire.len() {
            let mut d = FrameDecoder::new();
            d.feed(&wire[..split]).unwrap();
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.feed(&wire[split..]).unwrap();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got, vec![b"hello".to_vec(), vec![7u8; 300]]);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_header_refused_before_body() {
        let mut d = FrameDecoder::new();
        let len = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
        let mut hdr = vec![FRAME_VERSION];
        hdr.extend_from_slice(&len.to_be_bytes());
        assert_eq!(
            d.feed(&hdr),
            Err(FrameError::TooLarge(
                u64::try_from(MAX_FRAME_LEN + 1).unwrap()
            ))
        );
    }

    #[test]
    fn bad_version_and_empty_refused() {
        assert_eq!(body_len(&[9, 0, 0, 0, 1]), Err(FrameError::Version(9)));
        assert_eq!(
            body_len(&[FRAME_VERSION, 0, 0, 0, 0]),
            Err(FrameError::Empty)
        );
        assert_eq!(body_len(&[FRAME_VERSION, 0, 0]), Ok(None));
        assert_eq!(encode(&[], &mut Vec::new()), Err(FrameError::Empty));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new();
            for c in chunks {
                if d.feed(&c).is_err() { break; }
                while let Ok(Some(f)) = d.next_frame() {
                    prop_assert!(!f.is_empty() && f.len() <= MAX_FRAME_LEN);
                }
            }
        }

        #[test]
        fn bodies_round_trip(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..2048), 1..8)) {
            let mut wire = Vec::new();
            for b in &bodies { encode(b, &mut wire).unwrap(); }
            let mut d = FrameDecoder::new();
            d.feed(&wire).unwrap();
            for b in &bodies { let f = d.next_frame().unwrap(); prop_assert_eq!(f.as_ref(), Some(b)); }
            prop_assert_eq!(d.next_frame().unwrap(), None);
        }
    }
}
