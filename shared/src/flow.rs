//! The header that opens every tunneled flow.
//!
//! The edge never learns where a flow goes at home, so it tells the
//! home-agent what it knows instead: which public port the client reached,
//! over which protocol, and from which address. The home-agent maps the port
//! to a target and can hand the client address on (PROXY protocol).
//!
//! TCP: one [`FlowHeader`] at the start of the stream the edge opens to
//! `home:`[`TCP_FLOW_PORT`] through the tunnel, then the client's bytes.
//! A version 1 flow carries one connection, and TCP's own end of stream
//! ends it. A version 2 flow (sent only to a home-agent that speaks
//! control protocol [`FRAMED_FLOWS_VERSION`](crate::protocol::FRAMED_FLOWS_VERSION))
//! carries framed bytes instead: each direction is a run of frames, a
//! big-endian u16 length and that many bytes, and a frame of length 0 ends
//! that direction. Home follows its end-of-stream frame with [`FINISHED`]
//! once its side of the connection is over (everything handed to the
//! target's socket, both directions ended), in the same segment when it can; only
//! then does the edge send the next connection's header on the flow. That
//! saves each short connection the in-tunnel handshake and teardown.
//!
//! UDP: every datagram between the edge (from its WireGuard port on its
//! tunnel address, a port reserved anyway) and `home:`[`UDP_FLOW_PORT`]
//! starts with a [`DatagramHeader`] (the same fields plus the edge's flow
//! id), then the payload. Both directions carry it; the
//! edge routes replies by flow id alone and ignores the address fields, so
//! a home-agent cannot make the edge send to an address of its choosing.
//!
//! ```text
//! FlowHeader:     version(1) protocol(1) public_port(2) family(1) client_ip(4|16) client_port(2)
//! DatagramHeader: version(1) flow_id(4)  public_port(2) family(1) client_ip(4|16) client_port(2)
//! ```
//!
//! All integers big-endian. Datagrams have version 1 only; TCP flows 1 or 2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use thiserror::Error;

use crate::portmap::Protocol;

/// Port on the home tunnel address where the edge opens TCP flows.
pub const TCP_FLOW_PORT: u16 = 7001;
/// Port on the home tunnel address that carries UDP datagrams (the edge
/// sends them from its WireGuard port on its own tunnel address).
pub const UDP_FLOW_PORT: u16 = 7002;
/// UDP flows the edge keeps open at once (home allows twice as many, as
/// its idle time may be longer than the edge's).
pub const MAX_UDP_FLOWS: usize = 4096;
pub const FLOW_VERSION: u8 = 1;
/// A TCP flow whose bytes are framed, so that it can be reused.
pub const FRAMED_FLOW_VERSION: u8 = 2;
/// The longest frame's payload.
pub const MAX_FRAME: usize = u16::MAX as usize;
/// The frame that ends one direction of a framed flow.
pub const END_OF_STREAM: [u8; 2] = [0, 0];
/// What home sends after its end-of-stream frame once it has finished the
/// connection: the flow is free for the next one.
pub const FINISHED: [u8; 2] = [0, 0];
/// How long the home-agent waits for the header of a flow the edge has
/// opened. Long, because the edge opens flows ahead of the connections that
/// will use them (its flow pool); it replaces an unused one after
/// [`POOLED_FLOW_MAX_IDLE`], well within this.
pub const FLOW_HEADER_WAIT: Duration = Duration::from_secs(300);
/// How long the edge keeps an unused pooled flow before replacing it.
pub const POOLED_FLOW_MAX_IDLE: Duration = Duration::from_secs(120);
/// Client bytes the edge sends in the same segment as a TCP flow's header,
/// at most: home reads a header and these at once.
pub const MAX_EARLY_DATA: usize = 4096;
/// The largest encoded header (IPv6 client).
pub const MAX_FLOW_HEADER_LEN: usize = 1 + 1 + 2 + 1 + 16 + 2;
pub const MAX_DATAGRAM_HEADER_LEN: usize = 1 + 4 + 2 + 1 + 16 + 2;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Why bytes are not a flow header.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum FlowHeaderError {
    #[error("flow header version {0} is not supported")]
    Version(u8),
    #[error("unknown protocol number {0} in flow header")]
    Protocol(u8),
    #[error("unknown address family {0} in flow header")]
    Family(u8),
    #[error("public port 0 in flow header")]
    PortZero,
}

/// What the edge tells home about one TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowHeader {
    /// Framed bytes follow (version 2), not raw ones (version 1).
    pub framed: bool,
    pub protocol: Protocol,
    pub public_port: u16,
    pub client: SocketAddr,
}

/// What travels before each UDP payload, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    pub flow_id: u32,
    pub public_port: u16,
    pub client: SocketAddr,
}

impl FlowHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(if self.framed {
            FRAMED_FLOW_VERSION
        } else {
            FLOW_VERSION
        });
        out.push(match self.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        });
        out.extend_from_slice(&self.public_port.to_be_bytes());
        encode_addr(self.client, out);
    }

    /// Decodes a header from the start of `buf`: `Ok(None)` while more bytes
    /// are needed, else the header and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(FlowHeader, usize)>, FlowHeaderError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != FLOW_VERSION && version != FRAMED_FLOW_VERSION {
            return Err(FlowHeaderError::Version(version));
        }
        let Some(&proto) = buf.get(1) else {
            return Ok(None);
        };
        let protocol = match proto {
            PROTO_TCP => Protocol::Tcp,
            PROTO_UDP => Protocol::Udp,
            other => return Err(FlowHeaderError::Protocol(other)),
        };
        let Some(public_port) = read_u16(buf, 2) else {
            return Ok(None);
        };
        if public_port == 0 {
            return Err(FlowHeaderError::PortZero);
        }
        let Some((client, used)) = decode_addr(buf, 4)? else {
            return Ok(None);
        };
        Ok(Some((
            FlowHeader {
                framed: version == FRAMED_FLOW_VERSION,
                protocol,
                public_port,
                client,
            },
            used,
        )))
    }
}

impl DatagramHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FLOW_VERSION);
        out.extend_from_slice(&self.flow_id.to_be_bytes());
        out.extend_from_slice(&self.public_port.to_be_bytes());
        encode_addr(self.client, out);
    }

    /// Decodes the header of one datagram, returning it and the payload.
    /// A datagram is whole or nothing, so a short one is an error here.
    pub fn decode(buf: &[u8]) -> Result<(DatagramHeader, &[u8]), DatagramError> {
        let version = *buf.first().ok_or(DatagramError::Short)?;
        if version != FLOW_VERSION {
            return Err(FlowHeaderError::Version(version).into());
        }
        let id = buf.get(1..5).ok_or(DatagramError::Short)?;
        let flow_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let public_port = read_u16(buf, 5).ok_or(DatagramError::Short)?;
        if public_port == 0 {
            return Err(FlowHeaderError::PortZero.into());
        }
        let (client, used) = decode_addr(buf, 7)?.ok_or(DatagramError::Short)?;
        Ok((
            DatagramHeader {
                flow_id,
                public_port,
                client,
            },
            &buf[used..],
        ))
    }
}

/// Why a tunneled datagram was dropped.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum DatagramError {
    #[error("datagram shorter than its header")]
    Short,
    #[error(transparent)]
    Header(#[from] FlowHeaderError),
}

/// The length prefix of a frame of `len` bytes: none for 0 (that is the
/// end of the stream) or more than [`MAX_FRAME`].
pub fn frame_header(len: usize) -> Option<[u8; 2]> {
    let len = NonZeroU16::new(u16::try_from(len).ok()?)?;
    Some(len.get().to_be_bytes())
}

/// What [`FrameDecoder::decode`] found at the start of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEvent {
    /// This many bytes of payload: pass them on.
    Payload(usize),
    /// This many bytes of a frame's length prefix: drop them.
    Prefix(usize),
    /// The end-of-stream frame, completed by this many bytes; what follows
    /// it belongs to whatever comes next on the flow.
    End(usize),
    /// Nothing to decode: more input is needed.
    Empty,
}

/// Where one direction of a framed flow stands, without I/O: the relay
/// feeds it what it reads, and splices a long payload past it.
///
/// Every u16 is a valid length, so framing itself cannot be malformed;
/// only a flow that ends before its end-of-stream frame is.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    state: FrameState,
    /// The length of the last frame begun.
    last_len: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum FrameState {
    /// Reading a length prefix; the first byte, once it is in.
    #[default]
    Prefix,
    PrefixHalf(u8),
    Payload {
        left: usize,
    },
    Ended,
}

impl FrameDecoder {
    /// Decodes from the start of `input`: the caller consumes what the
    /// event says and calls again with the rest.
    pub fn decode(&mut self, input: &[u8]) -> FrameEvent {
        if self.state == FrameState::Ended {
            return FrameEvent::End(0);
        }
        let Some(&first) = input.first() else {
            return FrameEvent::Empty;
        };
        match self.state {
            FrameState::Prefix => match input.get(1) {
                Some(&second) => self.start_frame(first, second, 2),
                None => {
                    self.state = FrameState::PrefixHalf(first);
                    FrameEvent::Prefix(1)
                }
            },
            FrameState::PrefixHalf(hi) => self.start_frame(hi, first, 1),
            FrameState::Payload { left } => {
                let n = left.min(input.len());
                self.take_payload(n);
                FrameEvent::Payload(n)
            }
            FrameState::Ended => FrameEvent::End(0),
        }
    }

    fn start_frame(&mut self, hi: u8, lo: u8, used: usize) -> FrameEvent {
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        self.last_len = len;
        if len == 0 {
            self.state = FrameState::Ended;
            FrameEvent::End(used)
        } else {
            self.state = FrameState::Payload { left: len };
            FrameEvent::Prefix(used)
        }
    }

    /// Payload bytes of the current frame not yet passed on.
    pub fn payload_left(&self) -> usize {
        match self.state {
            FrameState::Payload { left } => left,
            _ => 0,
        }
    }

    /// Bytes of a length prefix still to come (0 inside a payload).
    pub fn prefix_missing(&self) -> usize {
        match self.state {
            FrameState::Prefix => 2,
            FrameState::PrefixHalf(_) => 1,
            FrameState::Payload { .. } | FrameState::Ended => 0,
        }
    }

    /// `n` bytes of the current payload were passed on without
    /// [`decode`](Self::decode) (spliced); at most [`payload_left`](Self::payload_left).
    pub fn take_payload(&mut self, n: usize) {
        if let FrameState::Payload { left } = self.state {
            let left = left.saturating_sub(n);
            self.state = if left == 0 {
                FrameState::Prefix
            } else {
                FrameState::Payload { left }
            };
        }
    }

    /// The length of the last frame begun: a long one means bulk, where
    /// reading just the next prefix lets its payload be spliced.
    pub fn last_frame_len(&self) -> usize {
        self.last_len
    }

    pub fn is_ended(&self) -> bool {
        self.state == FrameState::Ended
    }
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn encode_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    // A v4-mapped v6 address is a v4 client seen through a dual-stack socket.
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn decode_addr(buf: &[u8], at: usize) -> Result<Option<(SocketAddr, usize)>, FlowHeaderError> {
    let Some(&family) = buf.get(at) else {
        return Ok(None);
    };
    let ip_len = match family {
        FAMILY_V4 => 4,
        FAMILY_V6 => 16,
        other => return Err(FlowHeaderError::Family(other)),
    };
    let ip_at = at + 1;
    let Some(ip) = buf.get(ip_at..ip_at + ip_len) else {
        return Ok(None);
    };
    let ip = if ip_len == 4 {
        IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(ip);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let Some(port) = read_u16(buf, ip_at + ip_len) else {
        return Ok(None);
    };
    Ok(Some((SocketAddr::new(ip, port), ip_at + ip_len + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(o, p)| SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)).to_canonical(),
                p
            )),
        ]
    }

    #[test]
    fn v4_mapped_client_is_sent_as_v4() {
        let h = FlowHeader {
            framed: false,
            protocol: Protocol::Tcp,
            public_port: 443,
            client: "[::ffff:198.18.1.2]:5000".parse().unwrap(),
        };
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out.len(), 1 + 1 + 2 + 1 + 4 + 2);
        let (d, used) = FlowHeader::decode(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(d.client, "198.18.1.2:5000".parse().unwrap());
    }

    #[test]
    fn incomplete_is_not_invalid() {
        let h = FlowHeader {
            framed: true,
            protocol: Protocol::Udp,
            public_port: 53,
            client: "[2001:db8::1]:9".parse().unwrap(),
        };
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out.len(), MAX_FLOW_HEADER_LEN);
        for n in 0..out.len() {
            assert_eq!(
                FlowHeader::decode(&out[..n]),
                Ok(None),
                "prefix of {n} bytes"
            );
        }
        assert_eq!(FlowHeader::decode(&[3]), Err(FlowHeaderError::Version(3)));
        assert_eq!(
            FlowHeader::decode(&[2]),
            Ok(None),
            "framed flows are version 2"
        );
        assert_eq!(
            FlowHeader::decode(&[1, 99]),
            Err(FlowHeaderError::Protocol(99))
        );
        assert_eq!(
            FlowHeader::decode(&[1, 6, 0, 0]),
            Err(FlowHeaderError::PortZero)
        );
        assert_eq!(
            FlowHeader::decode(&[1, 6, 0, 1, 5]),
            Err(FlowHeaderError::Family(5))
        );
    }

    #[test]
    fn a_long_payload_can_be_spliced_past_the_decoder() {
        let mut dec = FrameDecoder::default();
        assert_eq!(frame_header(0), None);
        assert_eq!(frame_header(MAX_FRAME + 1), None);
        let prefix = frame_header(MAX_FRAME).unwrap();
        assert_eq!(dec.prefix_missing(), 2);
        assert_eq!(dec.decode(&prefix[..1]), FrameEvent::Prefix(1));
        assert_eq!(dec.prefix_missing(), 1);
        assert_eq!(dec.decode(&prefix[1..]), FrameEvent::Prefix(1));
        assert_eq!(dec.payload_left(), MAX_FRAME);
        assert_eq!(dec.last_frame_len(), MAX_FRAME);
        dec.take_payload(MAX_FRAME - 3);
        assert_eq!(dec.decode(&[1, 2, 3, 4]), FrameEvent::Payload(3));
        assert_eq!(dec.prefix_missing(), 2);
        assert_eq!(dec.decode(&[0, 0, 9]), FrameEvent::End(2));
        assert!(dec.is_ended());
        assert_eq!(
            dec.decode(&[9]),
            FrameEvent::End(0),
            "nothing after the end"
        );
    }

    proptest! {
        #[test]
        fn flow_header_round_trips(framed in any::<bool>(), tcp in any::<bool>(), port in 1u16.., client in any_addr(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let h = FlowHeader { framed, protocol: if tcp { Protocol::Tcp } else { Protocol::Udp }, public_port: port, client };
            let mut out = Vec::new();
            h.encode(&mut out);
            let n = out.len();
            out.extend_from_slice(&tail);
            prop_assert_eq!(FlowHeader::decode(&out).unwrap(), Some((h, n)));
        }

        #[test]
        fn datagram_header_round_trips(id in any::<u32>(), port in 1u16.., client in any_addr(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let h = DatagramHeader { flow_id: id, public_port: port, client };
            let mut out = Vec::new();
            h.encode(&mut out);
            out.extend_from_slice(&payload);
            let (d, p) = DatagramHeader::decode(&out).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
        }

        /// A run of frames, an end and whatever follows, cut anywhere:
        /// the payload comes out whole, the end where it was, the rest
        /// untouched.
        #[test]
        fn frames_decode_across_any_cuts(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..6),
            after in proptest::collection::vec(any::<u8>(), 0..8),
            cuts in proptest::collection::vec(1usize..40, 1..50),
        ) {
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend_from_slice(&frame_header(p.len()).unwrap());
                wire.extend_from_slice(p);
            }
            wire.extend_from_slice(&END_OF_STREAM);
            let end_at = wire.len();
            wire.extend_from_slice(&after);
            let mut dec = FrameDecoder::default();
            let mut got = Vec::new();
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            let ended_at = 'outer: loop {
                let mut chunk = &wire[at..(at + cut.next().copied().unwrap_or(1)).min(wire.len())];
                prop_assert!(!chunk.is_empty(), "ran out of input before the end");
                loop {
                    match dec.decode(chunk) {
                        FrameEvent::Payload(n) => { got.extend_from_slice(&chunk[..n]); chunk = &chunk[n..]; at += n; }
                        FrameEvent::Prefix(n) => { chunk = &chunk[n..]; at += n; }
                        FrameEvent::End(n) => break 'outer at + n,
                        FrameEvent::Empty => break,
                    }
                }
            };
            prop_assert_eq!(got, payloads.concat());
            prop_assert_eq!(ended_at, end_at);
            prop_assert!(dec.is_ended());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FlowHeader::decode(&bytes);
            let _ = DatagramHeader::decode(&bytes);
        }
    }
}
