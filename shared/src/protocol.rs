//! Control messages and the two ends of a control session, without I/O.
//!
//! The home-agent speaks first ([`Hello`]: the protocol versions it speaks
//! and its WireGuard key); the edge answers [`Welcome`] (the chosen version,
//! its own key, the tunnel's addresses and its public addresses) or
//! [`Refusal`]. After that the home sends port maps ([`ApplyPorts`]) and the
//! edge answers each entry ([`PortsApplied`]); the edge also says when the
//! home's traffic starts coming from a new address ([`Message::HomeMoved`]).
//!
//! [`HomeSession`] and [`EdgeSession`] are the state machines of the two
//! ends: messages in, messages and events out. The async shells in the
//! agents only move frames between them and a stream.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{self, FrameError};
use crate::portmap::{PortKey, PublicPort};
use crate::tunnel::TunnelAddrs;

/// Message protocol versions this build speaks.
pub const MIN_VERSION: u16 = 1;
pub const MAX_VERSION: u16 = 3;
/// From this version on, the edge opens framed, reusable TCP flows (flow
/// header version 2, see [`crate::flow`]). The messages are those of
/// version 1: the version tells the edge that home reads such flows, so an
/// edge image and a home-agent of different releases still agree.
pub const FRAMED_FLOWS_VERSION: u16 = 2;
/// From this version on, the edge sends [`Message::HomeMoved`]; an older
/// home-agent could not read it.
pub const HOME_MOVED_VERSION: u16 = 3;
/// Longest free-text field we accept from a peer.
pub const MAX_TEXT_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refusal),
    ApplyPorts(ApplyPorts),
    PortsApplied(PortsApplied),
    Ping(u64),
    Pong(u64),
    /// Edge to home: the home's control traffic now comes from this
    /// address (a new IP from the ISP, a router that mapped anew). The
    /// edge sends tunnel packets to wherever the home's last one came
    /// from, so home answers with a tunnel packet at once rather than at
    /// its next keepalive. Appended last: earlier variants keep their
    /// encoding.
    HomeMoved(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// The home-agent's WireGuard public key: the only key the edge will
    /// accept tunnel packets from.
    pub wireguard_key: [u8; 32],
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    pub wireguard_key: [u8; 32],
    pub wireguard_port: u16,
    pub tunnel: TunnelAddrs,
    /// Addresses the edge serves public ports on, as it sees them.
    pub public_addrs: Vec<IpAddr>,
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: String,
}

/// The whole public port map of one generation: the edge makes its
/// listeners match it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyPorts {
    pub generation: u64,
    pub entries: Vec<PublicPort>,
    /// How long flows on ports this map removes may go on before the edge
    /// closes them.
    pub drain_grace_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsApplied {
    pub generation: u64,
    pub results: Vec<EntryResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryResult {
    pub key: PortKey,
    pub status: EntryStatus,
}

/// The edge's answer for one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryStatus {
    Listening,
    /// Another program on the edge holds the port.
    InUse,
    /// The edge's own control or WireGuard port.
    Reserved,
    Invalid(String),
}

impl EntryStatus {
    pub fn is_ok(&self) -> bool {
        matches!(self, EntryStatus::Listening)
    }
}

impl std::fmt::Display for EntryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryStatus::Listening => f.write_str("listening"),
            EntryStatus::InUse => f.write_str("in use on the edge by another program"),
            EntryStatus::Reserved => {
                f.write_str("reserved for the edge's control or WireGuard port")
            }
            EntryStatus::Invalid(why) => write!(f, "invalid: {why}"),
        }
    }
}

/// Whether a map of `entries` goes to the edge: its `ApplyPorts` must fit
/// one control frame, or every session would fail at sending it and the
/// whole tunnel with it. Only long `allow=` lists come near: an entry
/// costs a few bytes, a CIDR up to 18.
pub fn check_map_size(entries: &[PublicPort]) -> Result<(), MapTooLarge> {
    let message = Message::ApplyPorts(ApplyPorts {
        generation: u64::MAX,
        entries: entries.to_vec(),
        drain_grace_secs: u32::MAX,
    });
    let len = postcard::to_stdvec(&message).map_or(usize::MAX, |body| body.len());
    if len > frame::MAX_FRAME_LEN {
        return Err(MapTooLarge { len });
    }
    Ok(())
}

/// A port map too large to send to the edge.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
#[error(
    "the port map would take {len} bytes to send to the edge, more than the control channel's \
     {max} (long allow= lists: merge their prefixes into wider ones, or share one list between \
     ports by giving them as a range)",
    max = frame::MAX_FRAME_LEN
)]
pub struct MapTooLarge {
    pub len: usize,
}

/// Why a control session ends.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum ProtocolError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("unexpected {got} while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error(
        "no common protocol version: peer speaks {min}..={max}, we speak {MIN_VERSION}..={MAX_VERSION}"
    )]
    Version { min: u16, max: u16 },
    #[error("edge refused the session: {0}")]
    Refused(String),
    #[error("text field of {0} bytes is longer than {MAX_TEXT_LEN}")]
    TextTooLong(usize),
    #[error(
        "a port map of {0} entries, more than the {max} a map holds: join ports into ranges \
         (tcp/30000-30099=… is one entry); a home-agent of this edge's version or later names \
         the entries over the limit",
        max = crate::portmap::MAX_ENTRIES
    )]
    TooManyEntries(usize),
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refused(_) => "Refused",
            Message::ApplyPorts(_) => "ApplyPorts",
            Message::PortsApplied(_) => "PortsApplied",
            Message::Ping(_) => "Ping",
            Message::Pong(_) => "Pong",
            Message::HomeMoved(_) => "HomeMoved",
        }
    }

    /// Encodes as one frame, appended to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let body = postcard::to_stdvec(self).map_err(|e| ProtocolError::Decode(e.to_string()))?;
        frame::encode(&body, out)?;
        Ok(())
    }

    /// Decodes one frame body.
    pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
        let (msg, rest): (Message, _) =
            postcard::take_from_bytes(body).map_err(|e| ProtocolError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ProtocolError::Decode(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        msg.check_text()?;
        Ok(msg)
    }

    fn check_text(&self) -> Result<(), ProtocolError> {
        let text = match self {
            Message::Hello(h) => h.agent.len(),
            Message::Welcome(w) => w.agent.len(),
            Message::Refused(r) => r.reason.len(),
            _ => 0,
        };
        if text > MAX_TEXT_LEN {
            return Err(ProtocolError::TextTooLong(text));
        }
        Ok(())
    }
}

fn agent_string() -> String {
    format!("skerry/{}", env!("CARGO_PKG_VERSION"))
}

/// What the home side learns from the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeEvent {
    Established(Welcome),
    Applied(PortsApplied),
    Pong(u64),
    /// The edge sees the home's traffic come from this address now.
    Moved(SocketAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HomeState {
    AwaitWelcome,
    Established,
}

/// The home end of a control session.
#[derive(Debug)]
pub struct HomeSession {
    state: HomeState,
    wireguard_key: [u8; 32],
}

impl HomeSession {
    /// Starts a session; the returned message must be sent first.
    pub fn start(wireguard_key: [u8; 32]) -> (HomeSession, Message) {
        let hello = Message::Hello(Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            wireguard_key,
            agent: agent_string(),
        });
        (
            HomeSession {
                state: HomeState::AwaitWelcome,
                wireguard_key,
            },
            hello,
        )
    }

    pub fn is_established(&self) -> bool {
        self.state == HomeState::Established
    }

    pub fn wireguard_key(&self) -> [u8; 32] {
        self.wireguard_key
    }

    /// A port map to send, once established.
    pub fn apply(
        &self,
        generation: u64,
        entries: Vec<PublicPort>,
        drain_grace_secs: u32,
    ) -> Result<Message, ProtocolError> {
        if self.state != HomeState::Established {
            return Err(ProtocolError::Unexpected {
                got: "ApplyPorts",
                state: "waiting for Welcome",
            });
        }
        Ok(Message::ApplyPorts(ApplyPorts {
            generation,
            entries,
            drain_grace_secs,
        }))
    }

    pub fn handle(&mut self, msg: Message) -> Result<HomeEvent, ProtocolError> {
        match (self.state, msg) {
            (HomeState::AwaitWelcome, Message::Welcome(w)) => {
                if !(MIN_VERSION..=MAX_VERSION).contains(&w.version) {
                    return Err(ProtocolError::Version {
                        min: w.version,
                        max: w.version,
                    });
                }
                self.state = HomeState::Established;
                Ok(HomeEvent::Established(w))
            }
            (_, Message::Refused(r)) => Err(ProtocolError::Refused(r.reason)),
            (HomeState::Established, Message::PortsApplied(a)) => Ok(HomeEvent::Applied(a)),
            (HomeState::Established, Message::Pong(n)) => Ok(HomeEvent::Pong(n)),
            (HomeState::Established, Message::HomeMoved(seen)) => Ok(HomeEvent::Moved(seen)),
            (state, other) => Err(ProtocolError::Unexpected {
                got: other.name(),
                state: match state {
                    HomeState::AwaitWelcome => "waiting for Welcome",
                    HomeState::Established => "established (home side)",
                },
            }),
        }
    }
}

/// What the edge tells a new home-agent about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeInfo {
    pub wireguard_key: [u8; 32],
    pub wireguard_port: u16,
    pub tunnel: TunnelAddrs,
    pub public_addrs: Vec<IpAddr>,
}

/// Why a home cannot be told it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untold {
    /// Not yet: the session is not established.
    NotEstablished,
    /// Its release cannot read [`Message::HomeMoved`]: the edge learns where
    /// it is from its next tunnel packet instead.
    OlderRelease,
}

/// What the edge must do after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeAction {
    /// Accept tunnel packets from this key from now on, and send the reply.
    Established {
        home_key: [u8; 32],
        /// The version agreed: it says which TCP flows home reads.
        version: u16,
        reply: Message,
    },
    /// Make the listeners match this map, then send [`EdgeSession::applied`].
    Apply(ApplyPorts),
    Reply(Message),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgeState {
    AwaitHello,
    /// With the version agreed.
    Established(u16),
}

/// The edge end of a control session.
#[derive(Debug)]
pub struct EdgeSession {
    state: EdgeState,
    info: EdgeInfo,
}

impl EdgeSession {
    pub fn new(info: EdgeInfo) -> Self {
        EdgeSession {
            state: EdgeState::AwaitHello,
            info,
        }
    }

    pub fn handle(&mut self, msg: Message) -> Result<EdgeAction, ProtocolError> {
        match (self.state, msg) {
            (EdgeState::AwaitHello, Message::Hello(h)) => {
                let version = h.max_version.min(MAX_VERSION);
                if h.min_version > h.max_version || version < MIN_VERSION.max(h.min_version) {
                    return Err(ProtocolError::Version {
                        min: h.min_version,
                        max: h.max_version,
                    });
                }
                self.state = EdgeState::Established(version);
                Ok(EdgeAction::Established {
                    home_key: h.wireguard_key,
                    version,
                    reply: Message::Welcome(Welcome {
                        version,
                        wireguard_key: self.info.wireguard_key,
                        wireguard_port: self.info.wireguard_port,
                        tunnel: self.info.tunnel,
                        public_addrs: self.info.public_addrs.clone(),
                        agent: agent_string(),
                    }),
                })
            }
            // More entries than a map holds (a home-agent from before the
            // limit): refused before anything opens, as the answer to
            // every entry might not fit a frame.
            (EdgeState::Established(_), Message::ApplyPorts(a))
                if a.entries.len() > crate::portmap::MAX_ENTRIES =>
            {
                Err(ProtocolError::TooManyEntries(a.entries.len()))
            }
            (EdgeState::Established(_), Message::ApplyPorts(a)) => Ok(EdgeAction::Apply(a)),
            (EdgeState::Established(_), Message::Ping(n)) => {
                Ok(EdgeAction::Reply(Message::Pong(n)))
            }
            (state, other) => Err(ProtocolError::Unexpected {
                got: other.name(),
                state: match state {
                    EdgeState::AwaitHello => "waiting for Hello",
                    EdgeState::Established(_) => "established (edge side)",
                },
            }),
        }
    }

    /// What to tell the home when its traffic comes from a new address,
    /// or why it cannot be told (yet).
    pub fn home_moved(&self, seen: SocketAddr) -> Result<Message, Untold> {
        match self.state {
            EdgeState::AwaitHello => Err(Untold::NotEstablished),
            EdgeState::Established(v) if v >= HOME_MOVED_VERSION => Ok(Message::HomeMoved(seen)),
            EdgeState::Established(_) => Err(Untold::OlderRelease),
        }
    }

    /// The answer to an applied map.
    pub fn applied(&self, generation: u64, results: Vec<EntryResult>) -> Message {
        Message::PortsApplied(PortsApplied {
            generation,
            results,
        })
    }

    /// The message that tells a peer why the session ends, if it can be told.
    pub fn refusal(err: &ProtocolError) -> Message {
        Message::Refused(Refusal {
            reason: err.to_string().chars().take(MAX_TEXT_LEN / 2).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::portmap::{PortPolicy, PortRange, Protocol};
    use proptest::prelude::*;

    /// An entry whose allow list has `cidrs` prefixes.
    fn allowing(port: u16, cidrs: u32) -> PublicPort {
        let allow: Vec<String> = (0..cidrs)
            .map(|i| format!("10.{}.{}.0/24", i >> 8 & 0xff, i & 0xff))
            .collect();
        let spec: crate::portmap::PortSpec =
            format!("tcp/{port}=127.0.0.1:{port},allow={}", allow.join(","))
                .parse()
                .unwrap();
        spec.public()
    }

    #[test]
    fn a_map_too_large_for_one_frame_is_refused_before_it_is_sent() {
        let small = vec![allowing(80, 1000), allowing(443, 1000)];
        check_map_size(&small).unwrap();
        // 30 entries of 10,000 prefixes: ~6 bytes each.
        let large: Vec<PublicPort> = (1..=30).map(|p| allowing(p, 10_000)).collect();
        let e = check_map_size(&large).unwrap_err();
        assert!(e.len > frame::MAX_FRAME_LEN, "{e}");
        // What the check refuses is what the frame would have refused.
        let msg = Message::ApplyPorts(ApplyPorts {
            generation: 2,
            entries: large,
            drain_grace_secs: 30,
        });
        assert!(matches!(
            msg.encode(&mut Vec::new()),
            Err(ProtocolError::Frame(_))
        ));
    }

    fn info() -> EdgeInfo {
        EdgeInfo {
            wireguard_key: [2; 32],
            wireguard_port: 51820,
            tunnel: TunnelAddrs::DEFAULT,
            public_addrs: vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        }
    }

    /// Carries a message across the real framing, as a stream would.
    fn wire(msg: &Message) -> Message {
        let mut bytes = Vec::new();
        msg.encode(&mut bytes).unwrap();
        let mut d = FrameDecoder::new();
        d.feed(&bytes).unwrap();
        Message::decode(&d.next_frame().unwrap().unwrap()).unwrap()
    }

    /// An edge refuses a map of more entries than a map holds before it
    /// opens anything: its answer to each might not fit a frame.
    #[test]
    fn the_edge_refuses_a_map_of_too_many_entries() {
        let (_, hello) = HomeSession::start([1; 32]);
        let mut edge = EdgeSession::new(info());
        edge.handle(wire(&hello)).unwrap();
        let entries: Vec<PublicPort> = (1..=u16::try_from(crate::portmap::MAX_ENTRIES + 1)
            .unwrap())
            .map(|port| PublicPort {
                protocol: Protocol::Udp,
                ports: PortRange::new(port, port).unwrap(),
                policy: PortPolicy::default(),
            })
            .collect();
        let apply = |entries: Vec<PublicPort>| {
            Message::ApplyPorts(ApplyPorts {
                generation: 2,
                entries,
                drain_grace_secs: 30,
            })
        };
        let fitting = entries[..crate::portmap::MAX_ENTRIES].to_vec();
        assert!(matches!(
            edge.handle(wire(&apply(entries))),
            Err(ProtocolError::TooManyEntries(n)) if n == crate::portmap::MAX_ENTRIES + 1
        ));
        assert!(matches!(
            edge.handle(wire(&apply(fitting))),
            Ok(EdgeAction::Apply(_))
        ));
    }

    #[test]
    fn pair_establishes_and_applies() {
        let (mut home, hello) = HomeSession::start([1; 32]);
        let mut edge = EdgeSession::new(info());
        let EdgeAction::Established {
            home_key,
            version,
            reply,
        } = edge.handle(wire(&hello)).unwrap()
        else {
            panic!("edge did not establish");
        };
        assert_eq!(home_key, [1; 32]);
        assert_eq!(version, MAX_VERSION);
        let HomeEvent::Established(w) = home.handle(wire(&reply)).unwrap() else {
            panic!("home did not establish");
        };
        assert_eq!(w.wireguard_key, [2; 32]);
        assert_eq!(w.public_addrs.len(), 2);

        let entry = PublicPort {
            protocol: Protocol::Tcp,
            ports: PortRange::new(8080, 8081).unwrap(),
            policy: PortPolicy::default(),
        };
        let apply = home.apply(3, vec![entry.clone()], 30).unwrap();
        let EdgeAction::Apply(a) = edge.handle(wire(&apply)).unwrap() else {
            panic!("edge did not apply");
        };
        assert_eq!(a.generation, 3);
        assert_eq!(a.entries, vec![entry]);
        let answer = edge.applied(
            3,
            vec![EntryResult {
                key: PortKey {
                    protocol: Protocol::Tcp,
                    ports: PortRange::new(8080, 8081).unwrap(),
                },
                status: EntryStatus::Listening,
            }],
        );
        assert!(
            matches!(home.handle(wire(&answer)).unwrap(), HomeEvent::Applied(p) if p.generation == 3)
        );
    }

    #[test]
    fn ports_before_hello_is_refused() {
        let mut edge = EdgeSession::new(info());
        let err = edge
            .handle(Message::ApplyPorts(ApplyPorts {
                generation: 1,
                entries: vec![],
                drain_grace_secs: 30,
            }))
            .unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::Unexpected {
                got: "ApplyPorts",
                ..
            }
        ));
        let (home, _) = HomeSession::start([0; 32]);
        assert!(home.apply(1, vec![], 30).is_err());
    }

    /// A home-agent of the release before framed flows: the edge agrees on
    /// version 1, so it will open raw flows, the only ones that home reads.
    #[test]
    fn an_older_home_gets_version_1() {
        let mut edge = EdgeSession::new(info());
        let action = edge
            .handle(Message::Hello(Hello {
                min_version: 1,
                max_version: 1,
                wireguard_key: [1; 32],
                agent: "home-agent 0.1".into(),
            }))
            .unwrap();
        let EdgeAction::Established { version, reply, .. } = action else {
            panic!("edge did not establish");
        };
        assert_eq!(version, 1);
        assert!(matches!(
            reply,
            Message::Welcome(Welcome { version: 1, .. })
        ));
    }

    fn hello_up_to(max_version: u16) -> Message {
        Message::Hello(Hello {
            min_version: 1,
            max_version,
            wireguard_key: [1; 32],
            agent: "home-agent".into(),
        })
    }

    #[test]
    fn a_home_that_moved_is_told_so_when_it_can_read_it() {
        let seen: SocketAddr = "[2001:db8::7]:40123".parse().unwrap();
        let mut edge = EdgeSession::new(info());
        assert_eq!(edge.home_moved(seen), Err(Untold::NotEstablished));
        let (mut home, hello) = HomeSession::start([1; 32]);
        let EdgeAction::Established { reply, .. } = edge.handle(wire(&hello)).unwrap() else {
            panic!("edge did not establish");
        };
        home.handle(wire(&reply)).unwrap();
        let told = edge
            .home_moved(seen)
            .expect("an established home of this release is told");

        assert_eq!(home.handle(wire(&told)).unwrap(), HomeEvent::Moved(seen));

        // A home-agent of an earlier release could not decode the message.
        let mut edge = EdgeSession::new(info());
        edge.handle(hello_up_to(HOME_MOVED_VERSION - 1)).unwrap();
        assert_eq!(edge.home_moved(seen), Err(Untold::OlderRelease));
    }

    #[test]
    fn home_moved_before_welcome_is_unexpected() {
        let (mut home, _) = HomeSession::start([1; 32]);
        let seen: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        assert!(matches!(
            home.handle(Message::HomeMoved(seen)),
            Err(ProtocolError::Unexpected {
                got: "HomeMoved",
                ..
            })
        ));
    }

    /// A new message goes last, so the ones both releases know keep their
    /// encoding (postcard numbers variants in order).
    #[test]
    fn earlier_messages_keep_their_encoding() {
        assert_eq!(postcard::to_stdvec(&Message::Ping(1)).unwrap(), [5, 1]);
        assert_eq!(postcard::to_stdvec(&Message::Pong(1)).unwrap(), [6, 1]);
        let moved = Message::HomeMoved("198.51.100.7:4000".parse().unwrap());
        assert_eq!(postcard::to_stdvec(&moved).unwrap()[0], 7);
    }

    #[test]
    fn version_without_overlap_is_refused() {
        let mut edge = EdgeSession::new(info());
        let err = edge
            .handle(Message::Hello(Hello {
                min_version: 7,
                max_version: 9,
                wireguard_key: [0; 32],
                agent: String::new(),
            }))
            .unwrap_err();
        assert_eq!(err, ProtocolError::Version { min: 7, max: 9 });
        let refusal = EdgeSession::refusal(&err);
        let (mut home, _) = HomeSession::start([0; 32]);
        assert!(matches!(
            home.handle(refusal),
            Err(ProtocolError::Refused(_))
        ));
    }

    #[test]
    fn long_text_and_trailing_bytes_are_refused() {
        let body = postcard::to_stdvec(&Message::Refused(Refusal {
            reason: "x".repeat(MAX_TEXT_LEN + 1),
        }))
        .unwrap();
        assert!(matches!(
            Message::decode(&body),
            Err(ProtocolError::TextTooLong(_))
        ));
        let mut body = postcard::to_stdvec(&Message::Ping(1)).unwrap();
        body.push(0);
        assert!(matches!(
            Message::decode(&body),
            Err(ProtocolError::Decode(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }
    }
}
