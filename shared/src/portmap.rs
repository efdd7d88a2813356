//! Port specs and the port map: which public ports the edge opens, and where
//! the home-agent sends what arrives on them.
//!
//! A user writes one entry per `-p` flag or `ports add`:
//!
//! ```text
//! PROTO/PORT[-END]=TARGET[,proxy=v1|v2][,allow=CIDR[,CIDR…]][,max-conns=N]
//!
//! tcp/443=127.0.0.1:8443,proxy=v2,allow=203.0.113.0/24,max-conns=10
//! udp/30000-30009=[::1]:40000        (30003 goes to [::1]:40003)
//! ```
//!
//! [`PortSpec`] is such an entry parsed once into typed values; its `Display`
//! prints the canonical form, which parses back to the same value.
//! [`PortMap`] is the home side's validated set of entries with a generation
//! number. [`PublicPort`] is all the edge ever learns of an entry (protocol,
//! public ports, policy), never the target, so a compromised edge learns
//! nothing about the home network.
//!
//! Values that cross the wire ([`PortRange`], [`Cidr`], [`PortPolicy`]) check
//! their invariants when deserialized: a peer cannot hand us a value that the
//! parser would have refused.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// The longest public range one entry may open. Each port is a listener on
/// the edge, so a slip like `tcp/1-65535` must not open them all.
pub const MAX_RANGE_LEN: u32 = 1024;

/// The most entries a map holds (a range is one). The edge answers every
/// entry of every map in one control frame, which this keeps well inside
/// its limit; no one maps this many ports one by one.
pub const MAX_ENTRIES: usize = 4096;

const OPTIONS: &str = "proxy=v1|v2, allow=CIDR[,CIDR…], max-conns=N";
const SYNTAX: &str = "PROTO/PORT[-END]=TARGET[,option…], e.g. tcp/443=127.0.0.1:8443";

/// Why a port spec, key, range or CIDR was refused. Every message names what
/// was wrong and how to write it instead, because the user reads it as is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PortSpecError {
    #[error("empty port spec (write {SYNTAX})")]
    Empty,
    #[error("whitespace inside `{spec}` (write the entry without spaces: {SYNTAX})")]
    Whitespace { spec: String },
    #[error("missing protocol in `{written}` (write tcp/PORT or udp/PORT)")]
    MissingProtocol { written: String },
    #[error("unknown protocol `{protocol}` (use tcp or udp)")]
    UnknownProtocol { protocol: String },
    #[error("`{text}` is not a port number (use 1-65535)")]
    InvalidPort { text: String },
    #[error("port 0 is not a valid public port (use 1-65535)")]
    PortZero,
    /// `written` is the range as the user wrote it, with its protocol if any.
    #[error("`{written}`: range end {end} is below start {start}")]
    RangeReversed {
        written: String,
        start: u16,
        end: u16,
    },
    #[error("range of {len} ports is longer than the maximum of {MAX_RANGE_LEN}")]
    RangeTooLong { len: u32 },
    #[error("missing `=` between public port and target in `{spec}`")]
    MissingTarget { spec: String },
    #[error("missing target after `=` in `{spec}` (write IP:PORT, e.g. 127.0.0.1:8080)")]
    EmptyTarget { spec: String },
    #[error(
        "hostnames are not accepted as targets: `{target}` (write an IP address and port, e.g. 192.168.1.10:80)"
    )]
    HostnameTarget { target: String },
    #[error("target `{target}` has no port (write IP:PORT, or [IPv6]:PORT)")]
    TargetWithoutPort { target: String },
    #[error("target `{target}` is not an IP address and port (write IP:PORT, or [IPv6]:PORT)")]
    InvalidTarget { target: String },
    #[error("target {target} has port 0 (use the port the service listens on)")]
    TargetPortZero { target: SocketAddr },
    /// A range maps port for port, so the target range must fit below 65536.
    #[error(
        "target port {port} + {offset} overflows for range {ports} (the target range must end at 65535 or below)"
    )]
    TargetOverflow {
        port: u16,
        offset: u32,
        ports: PortRange,
    },
    #[error("unknown option `{option}` (options: {OPTIONS})")]
    UnknownOption { option: String },
    #[error("option `{option}` needs a value (options: {OPTIONS})")]
    MissingValue { option: String },
    #[error(
        "option `{option}` is given twice (give each option once; allow= takes several CIDRs separated by commas)"
    )]
    DuplicateOption { option: String },
    #[error("empty option in `{spec}` (remove the doubled or trailing comma)")]
    EmptyOption { spec: String },
    #[error("PROXY protocol v1 has no form for UDP (use proxy=v2, or no proxy)")]
    ProxyV1OverUdp,
    #[error("unknown PROXY protocol version `{version}` (use v1 or v2)")]
    UnknownProxy { version: String },
    #[error("`{text}` is not a CIDR (write ADDR/PREFIX, e.g. 203.0.113.0/24 or 2001:db8::/32)")]
    InvalidCidr { text: String },
    #[error("prefix /{prefix} is too long for {addr} (at most /{max})")]
    PrefixTooLong { addr: IpAddr, prefix: u8, max: u8 },
    #[error("{addr}/{prefix} has host bits set; did you mean {network}/{prefix}?")]
    HostBitsSet {
        addr: IpAddr,
        prefix: u8,
        network: IpAddr,
    },
    #[error("`{value}` is not a valid max-conns (use a whole number from 1 to 4294967295)")]
    InvalidMaxConns { value: String },
    #[error("max-conns must be at least 1")]
    MaxConnsZero,
    /// `entry` is the 0-based index given to [`PortMap::from_specs`]; the
    /// message counts from 1, as a person does.
    #[error("overlaps {key} (entry {})", .entry + 1)]
    OverlapsEntry { key: PortKey, entry: usize },
    #[error("overlaps {key}, which is already mapped (remove it first)")]
    OverlapsMapped { key: PortKey },
    #[error("{key} is not mapped")]
    NotMapped { key: PortKey },
    #[error(
        "the map holds {MAX_ENTRIES} entries, the most it can: join ports into ranges \
         (tcp/30000-30099=127.0.0.1:30000 is one entry)"
    )]
    MapFull,
    #[error("{key} is part of {entry}; remove {entry} instead")]
    PartOfEntry { key: PortKey, entry: PortKey },
}

/// Transport protocol of a public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The name used in specs and keys.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(PortSpecError::UnknownProtocol {
                protocol: s.to_owned(),
            }),
        }
    }
}

/// An inclusive range of public ports: `1 <= start <= end` and at most
/// [`MAX_RANGE_LEN`] ports. The fields are private so that no other value
/// exists, whether built, parsed or deserialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "(u16, u16)", into = "(u16, u16)")]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    pub fn new(start: u16, end: u16) -> Result<Self, PortSpecError> {
        Self::checked(start, end, || format!("{start}-{end}"))
    }

    /// A range of one port.
    pub fn single(port: u16) -> Result<Self, PortSpecError> {
        Self::new(port, port)
    }

    /// `written` names the range in an error the way the user wrote it.
    fn checked(
        start: u16,
        end: u16,
        written: impl FnOnce() -> String,
    ) -> Result<Self, PortSpecError> {
        if start == 0 || end == 0 {
            return Err(PortSpecError::PortZero);
        }
        if end < start {
            return Err(PortSpecError::RangeReversed {
                written: written(),
                start,
                end,
            });
        }
        let len = u32::from(end) - u32::from(start) + 1;
        if len > MAX_RANGE_LEN {
            return Err(PortSpecError::RangeTooLong { len });
        }
        Ok(Self { start, end })
    }

    /// Parses `443` or `30000-30009`.
    fn parse(text: &str, written: &str) -> Result<Self, PortSpecError> {
        let (start, end) = match text.split_once('-') {
            Some((start, end)) => (parse_port(start)?, parse_port(end)?),
            None => {
                let port = parse_port(text)?;
                (port, port)
            }
        };
        Self::checked(start, end, || written.to_owned())
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    /// Number of ports, at least 1.
    #[expect(clippy::len_without_is_empty, reason = "a range is never empty")]
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + use<> {
        self.start..=self.end
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl TryFrom<(u16, u16)> for PortRange {
    type Error = PortSpecError;

    fn try_from((start, end): (u16, u16)) -> Result<Self, Self::Error> {
        Self::new(start, end)
    }
}

impl From<PortRange> for (u16, u16) {
    fn from(range: PortRange) -> Self {
        (range.start, range.end)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for PortRange {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, s)
    }
}

/// The PROXY protocol header the home-agent writes to a target before the
/// client's bytes, so that the target sees the real client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V1,
    V2,
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

impl FromStr for ProxyProtocol {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(Self::V1),
            "v2" => Ok(Self::V2),
            _ => Err(PortSpecError::UnknownProxy {
                version: s.to_owned(),
            }),
        }
    }
}

/// A block of source addresses, such as `203.0.113.0/24`. Host bits must be
/// zero: `203.0.113.5/24` is refused rather than masked, because it usually
/// means the user meant something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "(IpAddr, u8)", into = "(IpAddr, u8)")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, PortSpecError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(PortSpecError::PrefixTooLong { addr, prefix, max });
        }
        let network = network(addr, prefix);
        if network != addr {
            return Err(PortSpecError::HostBitsSet {
                addr,
                prefix,
                network,
            });
        }
        Ok(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the block. An IPv4 address and its IPv4-mapped
    /// IPv6 form (`::ffff:a.b.c.d`) are the same address here, on either
    /// side, because a dual-stack listener reports IPv4 clients in the mapped
    /// form. Everything is compared in IPv6 space, so `::/0` holds all.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, prefix) = match self.addr {
            IpAddr::V4(addr) => (addr.to_ipv6_mapped(), self.prefix + 96),
            IpAddr::V6(addr) => (addr, self.prefix),
        };
        let ip = match ip {
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            IpAddr::V6(ip) => ip,
        };
        ip.to_bits() & v6_mask(prefix) == net.to_bits()
    }
}

impl TryFrom<(IpAddr, u8)> for Cidr {
    type Error = PortSpecError;

    fn try_from((addr, prefix): (IpAddr, u8)) -> Result<Self, Self::Error> {
        Self::new(addr, prefix)
    }
}

impl From<Cidr> for (IpAddr, u8) {
    fn from(cidr: Cidr) -> Self {
        (cidr.addr, cidr.prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = PortSpecError;

    /// `203.0.113.0/24`, `2001:db8::/32`, or a bare address for one host.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || PortSpecError::InvalidCidr { text: s.to_owned() };
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let prefix = match prefix {
            Some(prefix) => parse_decimal(prefix).ok_or_else(invalid)?,
            None => max_prefix(addr),
        };
        Self::new(addr, prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with everything after the first `prefix` bits cleared.
fn network(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(addr) => IpAddr::V4(Ipv4Addr::from_bits(addr.to_bits() & v4_mask(prefix))),
        IpAddr::V6(addr) => IpAddr::V6(Ipv6Addr::from_bits(addr.to_bits() & v6_mask(prefix))),
    }
}

fn v4_mask(prefix: u8) -> u32 {
    !u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    !u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)
}

/// What the edge enforces on a public port before anything crosses the
/// tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPolicy {
    /// Source blocks allowed to connect; empty admits everyone.
    pub allow: Vec<Cidr>,
    /// Most simultaneous connections (flows, for UDP); `None` is no cap.
    /// Never `Some(0)`: deserialization refuses it like the parser does.
    #[serde(deserialize_with = "max_conns_at_least_one")]
    pub max_conns: Option<u32>,
}

impl PortPolicy {
    pub fn admits(&self, ip: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|cidr| cidr.contains(ip))
    }

    fn validate(&self) -> Result<(), PortSpecError> {
        if self.max_conns == Some(0) {
            return Err(PortSpecError::MaxConnsZero);
        }
        Ok(())
    }
}

fn max_conns_at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let max_conns = Option::<u32>::deserialize(d)?;
    if max_conns == Some(0) {
        return Err(serde::de::Error::custom(PortSpecError::MaxConnsZero));
    }
    Ok(max_conns)
}

/// What the edge learns of one entry: protocol, public ports, policy. Never
/// the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicPort {
    pub protocol: Protocol,
    pub ports: PortRange,
    pub policy: PortPolicy,
}

impl PublicPort {
    pub fn key(&self) -> PortKey {
        PortKey {
            protocol: self.protocol,
            ports: self.ports,
        }
    }
}

/// Names an entry without its target, as in `ports rm tcp/25565`; within a
/// protocol, entries never overlap, so the key identifies one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortKey {
    pub protocol: Protocol,
    pub ports: PortRange,
}

impl PortKey {
    fn parse(text: &str) -> Result<Self, PortSpecError> {
        let Some((protocol, ports)) = text.split_once('/') else {
            return Err(PortSpecError::MissingProtocol {
                written: text.to_owned(),
            });
        };
        Ok(Self {
            protocol: protocol.parse()?,
            ports: PortRange::parse(ports, text)?,
        })
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.ports)
    }
}

impl FromStr for PortKey {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.trim())
    }
}

/// One `-p` entry as the user wrote it. Serialized as its canonical text, so
/// a stored or transmitted spec goes through the parser again on the way in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortSpec {
    pub protocol: Protocol,
    pub ports: PortRange,
    pub target: SocketAddr,
    pub proxy: Option<ProxyProtocol>,
    pub policy: PortPolicy,
}

impl PortSpec {
    /// Where a flow arriving on `public_port` goes. Ranges map port for
    /// port: in `tcp/30000-30009=127.0.0.1:40000`, 30003 goes to 40003.
    pub fn target_for(&self, public_port: u16) -> Option<SocketAddr> {
        if !self.ports.contains(public_port) {
            return None;
        }
        let port = self
            .target
            .port()
            .checked_add(public_port - self.ports.start())?;
        let mut target = self.target;
        target.set_port(port);
        Some(target)
    }

    pub fn public(&self) -> PublicPort {
        PublicPort {
            protocol: self.protocol,
            ports: self.ports,
            policy: self.policy.clone(),
        }
    }

    pub fn key(&self) -> PortKey {
        PortKey {
            protocol: self.protocol,
            ports: self.ports,
        }
    }

    /// The checks the types cannot carry, for specs built field by field.
    fn validate(&self) -> Result<(), PortSpecError> {
        check_target(self.target, self.ports)?;
        self.policy.validate()
    }
}

fn check_target(target: SocketAddr, ports: PortRange) -> Result<(), PortSpecError> {
    if target.port() == 0 {
        return Err(PortSpecError::TargetPortZero { target });
    }
    let offset = ports.len() - 1;
    if u32::from(target.port()) + offset > u32::from(u16::MAX) {
        return Err(PortSpecError::TargetOverflow {
            port: target.port(),
            offset,
            ports,
        });
    }
    Ok(())
}

fn parse_target(text: &str, spec: &str) -> Result<SocketAddr, PortSpecError> {
    if text.is_empty() {
        return Err(PortSpecError::EmptyTarget {
            spec: spec.to_owned(),
        });
    }
    if let Ok(target) = text.parse() {
        return Ok(target);
    }
    let unbracketed = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Err(PortSpecError::TargetWithoutPort {
            target: text.to_owned(),
        });
    }
    let host = text.rsplit_once(':').map_or(text, |(host, _)| host);
    let hostname = host.bytes().any(|b| b.is_ascii_alphabetic())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if hostname {
        return Err(PortSpecError::HostnameTarget {
            target: text.to_owned(),
        });
    }
    Err(PortSpecError::InvalidTarget {
        target: text.to_owned(),
    })
}

fn parse_port(text: &str) -> Result<u16, PortSpecError> {
    parse_decimal(text).ok_or_else(|| PortSpecError::InvalidPort {
        text: text.to_owned(),
    })
}

/// Plain ASCII digits only: `str::parse` would also take a leading `+`.
fn parse_decimal<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use PortSpecError as E;

        let spec = s.trim();
        if spec.is_empty() {
            return Err(E::Empty);
        }
        if spec.contains(char::is_whitespace) {
            return Err(E::Whitespace {
                spec: spec.to_owned(),
            });
        }
        let (public, rest) = match spec.split_once('=') {
            Some((public, rest)) if !public.contains(',') => (public, rest),
            _ => {
                return Err(E::MissingTarget {
                    spec: spec.to_owned(),
                });
            }
        };
        let PortKey { protocol, ports } = PortKey::parse(public)?;

        let mut tokens = rest.split(',').peekable();
        let target = parse_target(tokens.next().unwrap_or_default(), spec)?;
        check_target(target, ports)?;

        let mut proxy = None;
        let mut allow: Option<Vec<Cidr>> = None;
        let mut max_conns = None;
        while let Some(token) = tokens.next() {
            let (name, value) = token.split_once('=').unwrap_or((token, ""));
            let known = matches!(name, "proxy" | "allow" | "max-conns");
            if name.is_empty() && value.is_empty() {
                return Err(E::EmptyOption {
                    spec: spec.to_owned(),
                });
            }
            if !known {
                return Err(E::UnknownOption {
                    option: name.to_owned(),
                });
            }
            if value.is_empty() {
                return Err(E::MissingValue {
                    option: name.to_owned(),
                });
            }
            let given_before = match name {
                "proxy" => proxy.replace(value.parse()?).is_some(),
                "allow" => {
                    // Tokens without `=` continue the allow list.
                    let mut list = vec![value.parse()?];
                    while let Some(cidr) = tokens.next_if(|t| !t.contains('=')) {
                        if cidr.is_empty() {
                            return Err(E::EmptyOption {
                                spec: spec.to_owned(),
                            });
                        }
                        list.push(cidr.parse()?);
                    }
                    allow.replace(list).is_some()
                }
                _ => {
                    let n: u32 = parse_decimal(value).ok_or_else(|| E::InvalidMaxConns {
                        value: value.to_owned(),
                    })?;
                    if n == 0 {
                        return Err(E::MaxConnsZero);
                    }
                    max_conns.replace(n).is_some()
                }
            };
            if given_before {
                return Err(E::DuplicateOption {
                    option: name.to_owned(),
                });
            }
        }

        if protocol == Protocol::Udp && proxy == Some(ProxyProtocol::V1) {
            return Err(E::ProxyV1OverUdp);
        }
        Ok(Self {
            protocol,
            ports,
            target,
            proxy,
            policy: PortPolicy {
                allow: allow.unwrap_or_default(),
                max_conns,
            },
        })
    }
}

/// The canonical form: options in the order proxy, allow, max-conns; IPv6
/// targets bracketed. It parses back to the same value.
impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}={}", self.protocol, self.ports, self.target)?;
        if let Some(proxy) = self.proxy {
            write!(f, ",proxy={proxy}")?;
        }
        for (i, cidr) in self.policy.allow.iter().enumerate() {
            let lead = if i == 0 { ",allow=" } else { "," };
            write!(f, "{lead}{cidr}")?;
        }
        if let Some(max_conns) = self.policy.max_conns {
            write!(f, ",max-conns={max_conns}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for PortSpec {
    type Error = PortSpecError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<PortSpec> for String {
    fn from(spec: PortSpec) -> Self {
        spec.to_string()
    }
}

/// The home-side map: validated specs plus a generation number. Entries of
/// one protocol never overlap. Changes make a new map with the next
/// generation, so the edge can tell which one it has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortMap {
    generation: u64,
    specs: Vec<PortSpec>,
    /// Position in `specs` by (protocol, first port): entries are disjoint,
    /// so the last one starting at or below a port is the only candidate.
    index: BTreeMap<(Protocol, u16), usize>,
}

impl PortMap {
    /// Generation 0, no entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a map from entries, refusing each bad one alone: returns the
    /// map of the good ones and, for each refused one, its index in `specs`
    /// and why. An entry that overlaps an earlier one of the same protocol
    /// is refused with [`PortSpecError::OverlapsEntry`] naming that entry.
    pub fn from_specs(
        generation: u64,
        specs: Vec<PortSpec>,
    ) -> (PortMap, Vec<(usize, PortSpecError)>) {
        let mut map = PortMap {
            generation,
            ..Self::default()
        };
        // Input index of each accepted spec, to name it in overlap errors.
        let mut origin = Vec::new();
        let mut refused = Vec::new();
        for (entry, spec) in specs.into_iter().enumerate() {
            let checked = spec
                .validate()
                .and_then(|()| match map.overlapping(spec.key()) {
                    Some(i) => Err(PortSpecError::OverlapsEntry {
                        key: map.specs[i].key(),
                        entry: origin[i],
                    }),
                    None if map.specs.len() >= MAX_ENTRIES => Err(PortSpecError::MapFull),
                    None => Ok(()),
                });
            match checked {
                Ok(()) => {
                    origin.push(entry);
                    map.push(spec);
                }
                Err(error) => refused.push((entry, error)),
            }
        }
        (map, refused)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Entries in the order given, with inserted ones at the end.
    pub fn specs(&self) -> &[PortSpec] {
        &self.specs
    }

    /// The map as the edge may see it.
    pub fn public(&self) -> Vec<PublicPort> {
        self.specs.iter().map(PortSpec::public).collect()
    }

    /// The spec serving a public port. Called per flow: O(log n).
    pub fn lookup(&self, protocol: Protocol, port: u16) -> Option<&PortSpec> {
        let (&(found, _), &i) = self.index.range(..=(protocol, port)).next_back()?;
        let spec = self.specs.get(i)?;
        (found == protocol && spec.ports.contains(port)).then_some(spec)
    }

    /// A new map, one generation on, with `spec` added. A spec with the same
    /// key as an entry replaces it in place (a retarget, or a new policy);
    /// one that overlaps a different entry is refused.
    pub fn insert(&self, spec: PortSpec) -> Result<PortMap, PortSpecError> {
        spec.validate()?;
        let key = spec.key();
        let mut specs = self.specs.clone();
        if let Some(i) = self.position(key) {
            specs[i] = spec;
        } else if let Some(i) = self.overlapping(key) {
            return Err(PortSpecError::OverlapsMapped {
                key: self.specs[i].key(),
            });
        } else if self.specs.len() >= MAX_ENTRIES {
            return Err(PortSpecError::MapFull);
        } else {
            specs.push(spec);
        }
        Ok(self.next(specs))
    }

    /// A new map, one generation on, without the entry named by `key`, which
    /// must name a whole entry.
    pub fn remove(&self, key: &PortKey) -> Result<PortMap, PortSpecError> {
        let Some(i) = self.position(*key) else {
            return Err(match self.overlapping(*key) {
                Some(i) => PortSpecError::PartOfEntry {
                    key: *key,
                    entry: self.specs[i].key(),
                },
                None => PortSpecError::NotMapped { key: *key },
            });
        };
        let mut specs = self.specs.clone();
        specs.remove(i);
        Ok(self.next(specs))
    }

    /// Position of the entry with exactly this key.
    fn position(&self, key: PortKey) -> Option<usize> {
        let &i = self.index.get(&(key.protocol, key.ports.start()))?;
        (self.specs.get(i)?.ports == key.ports).then_some(i)
    }

    /// Position of an entry of the same protocol sharing a port with `key`.
    fn overlapping(&self, key: PortKey) -> Option<usize> {
        let (&(protocol, _), &i) = self
            .index
            .range(..=(key.protocol, key.ports.end()))
            .next_back()?;
        let spec = self.specs.get(i)?;
        (protocol == key.protocol && spec.ports.overlaps(&key.ports)).then_some(i)
    }

    /// Appends a spec already checked to be valid and disjoint.
    fn push(&mut self, spec: PortSpec) {
        self.index
            .insert((spec.protocol, spec.ports.start()), self.specs.len());
        self.specs.push(spec);
    }

    /// The map after a change: `specs` are valid and disjoint.
    fn next(&self, specs: Vec<PortSpec>) -> PortMap {
        // Saturating: 2^64 changes will not happen, and a wrap would make
        // the edge think a new map is older.
        let mut map = PortMap {
            generation: self.generation.saturating_add(1),
            ..Self::default()
        };
        for spec in specs {
            map.push(spec);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddrV6;

    #[test]
    fn a_map_holds_at_most_max_entries_and_refuses_only_the_rest() {
        let specs: Vec<PortSpec> = (1..=u16::try_from(MAX_ENTRIES + 2).unwrap())
            .map(|p| spec(&format!("tcp/{p}=127.0.0.1:{p}")))
            .collect();
        let (map, refused) = PortMap::from_specs(1, specs);
        assert_eq!(map.specs().len(), MAX_ENTRIES);
        assert_eq!(
            refused,
            [
                (MAX_ENTRIES, PortSpecError::MapFull),
                (MAX_ENTRIES + 1, PortSpecError::MapFull)
            ]
        );
        assert_eq!(
            map.insert(spec("udp/9=127.0.0.1:9")).unwrap_err(),
            PortSpecError::MapFull
        );
        // Retargeting an entry of a full map is no new entry.
        assert!(map.insert(spec("tcp/1=127.0.0.1:2")).is_ok());
        assert!(map.remove(&"tcp/1".parse().unwrap()).is_ok());
    }

    fn spec(text: &str) -> PortSpec {
        text.parse()
            .unwrap_or_else(|e| panic!("`{text}` should parse: {e}"))
    }

    fn err(text: &str) -> PortSpecError {
        match text.parse::<PortSpec>() {
            Ok(spec) => panic!("`{text}` should be refused, got {spec:?}"),
            Err(e) => e,
        }
    }

    fn range(start: u16, end: u16) -> PortRange {
        PortRange::new(start, end).unwrap()
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn key(text: &str) -> PortKey {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_the_full_example_and_prints_it_back() {
        let text = "tcp/443=127.0.0.1:8443,proxy=v2,allow=203.0.113.0/24,max-conns=10";
        let s = spec(text);
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.ports, range(443, 443));
        assert_eq!(s.target, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(s.proxy, Some(ProxyProtocol::V2));
        assert_eq!(s.policy.allow, vec![cidr("203.0.113.0/24")]);
        assert_eq!(s.policy.max_conns, Some(10));
        assert_eq!(s.to_string(), text);
    }

    #[test]
    fn parses_targets_of_every_kind() {
        assert_eq!(
            spec("tcp/25565=127.0.0.1:25565").target,
            "127.0.0.1:25565".parse().unwrap()
        );
        let v6 = spec("tcp/8080=[::1]:8080");
        assert_eq!(v6.target, "[::1]:8080".parse().unwrap());
        assert_eq!(v6.to_string(), "tcp/8080=[::1]:8080");
        assert_eq!(
            spec("udp/80=192.168.1.10:80").target,
            "192.168.1.10:80".parse().unwrap()
        );
    }

    #[test]
    fn parses_a_range_with_defaults() {
        let s = spec("udp/30000-30009=127.0.0.1:40000");
        assert_eq!(s.protocol, Protocol::Udp);
        assert_eq!(s.ports, range(30000, 30009));
        assert_eq!(s.proxy, None);
        assert_eq!(s.policy, PortPolicy::default());
        assert_eq!(s.to_string(), "udp/30000-30009=127.0.0.1:40000");
    }

    #[test]
    fn allow_list_continues_until_the_next_option() {
        let s = spec("tcp/22=10.0.0.1:22,allow=203.0.113.0/24,2001:db8::/32,max-conns=10");
        assert_eq!(
            s.policy.allow,
            vec![cidr("203.0.113.0/24"), cidr("2001:db8::/32")]
        );
        assert_eq!(s.policy.max_conns, Some(10));
        let bare = spec("tcp/22=10.0.0.1:22,allow=198.51.100.7,::1");
        assert_eq!(
            bare.policy.allow,
            vec![cidr("198.51.100.7/32"), cidr("::1/128")]
        );
        assert_eq!(
            bare.to_string(),
            "tcp/22=10.0.0.1:22,allow=198.51.100.7/32,::1/128"
        );
    }

    #[test]
    fn options_in_any_order_print_canonically() {
        let s = spec("  tcp/80=1.2.3.4:80,max-conns=3,allow=10.0.0.0/8,proxy=v1\n");
        assert_eq!(
            s.to_string(),
            "tcp/80=1.2.3.4:80,proxy=v1,allow=10.0.0.0/8,max-conns=3"
        );
    }

    /// Each refusal: the variant, and a message that says what to do.
    #[test]
    fn refuses_bad_specs_with_useful_messages() {
        use PortSpecError as E;
        let cases: Vec<(&str, PortSpecError, &str)> = vec![
            ("", E::Empty, "empty port spec (write PROTO/PORT"),
            (
                "tcp/80 =1.2.3.4:80",
                E::Whitespace {
                    spec: "tcp/80 =1.2.3.4:80".into(),
                },
                "whitespace inside `tcp/80 =1.2.3.4:80`",
            ),
            (
                "80=1.2.3.4:80",
                E::MissingProtocol {
                    written: "80".into(),
                },
                "missing protocol in `80` (write tcp/PORT or udp/PORT)",
            ),
            (
                "sctp/80=1.2.3.4:80",
                E::UnknownProtocol {
                    protocol: "sctp".into(),
                },
                "unknown protocol `sctp` (use tcp or udp)",
            ),
            (
                "tcp/http=1.2.3.4:80",
                E::InvalidPort {
                    text: "http".into(),
                },
                "`http` is not a port number (use 1-65535)",
            ),
            (
                "tcp/70000=1.2.3.4:80",
                E::InvalidPort {
                    text: "70000".into(),
                },
                "`70000` is not a port number (use 1-65535)",
            ),
            (
                "tcp/+80=1.2.3.4:80",
                E::InvalidPort { text: "+80".into() },
                "`+80` is not a port number",
            ),
            (
                "tcp/0=1.2.3.4:80",
                E::PortZero,
                "port 0 is not a valid public port (use 1-65535)",
            ),
            (
                "tcp/80-70=1.2.3.4:80",
                E::RangeReversed {
                    written: "tcp/80-70".into(),
                    start: 80,
                    end: 70,
                },
                "`tcp/80-70`: range end 70 is below start 80",
            ),
            (
                "tcp/1000-5999=1.2.3.4:80",
                E::RangeTooLong { len: 5000 },
                "range of 5000 ports is longer than the maximum of 1024",
            ),
            (
                "tcp/80",
                E::MissingTarget {
                    spec: "tcp/80".into(),
                },
                "missing `=` between public port and target in `tcp/80`",
            ),
            (
                "tcp/80,proxy=v2",
                E::MissingTarget {
                    spec: "tcp/80,proxy=v2".into(),
                },
                "missing `=` between public port and target in `tcp/80,proxy=v2`",
            ),
            (
                "tcp/80=",
                E::EmptyTarget {
                    spec: "tcp/80=".into(),
                },
                "missing target after `=` in `tcp/80=`",
            ),
            (
                "tcp/80=nas.local:80",
                E::HostnameTarget {
                    target: "nas.local:80".into(),
                },
                "hostnames are not accepted as targets: `nas.local:80` (write an IP address",
            ),
            (
                "tcp/80=localhost:80",
                E::HostnameTarget {
                    target: "localhost:80".into(),
                },
                "hostnames are not accepted",
            ),
            (
                "tcp/80=127.0.0.1",
                E::TargetWithoutPort {
                    target: "127.0.0.1".into(),
                },
                "target `127.0.0.1` has no port (write IP:PORT",
            ),
            (
                "tcp/80=[::1]",
                E::TargetWithoutPort {
                    target: "[::1]".into(),
                },
                "has no port",
            ),
            (
                "tcp/80=1.2.3.4:99999",
                E::InvalidTarget {
                    target: "1.2.3.4:99999".into(),
                },
                "target `1.2.3.4:99999` is not an IP address and port",
            ),
            (
                "tcp/80=1.2.3.4:0",
                E::TargetPortZero {
                    target: "1.2.3.4:0".parse().unwrap(),
                },
                "target 1.2.3.4:0 has port 0",
            ),
            (
                "tcp/30000-30009=127.0.0.1:65535",
                E::TargetOverflow {
                    port: 65535,
                    offset: 9,
                    ports: range(30000, 30009),
                },
                "target port 65535 + 9 overflows for range 30000-30009",
            ),
            (
                "tcp/80=1.2.3.4:80,foo=1",
                E::UnknownOption {
                    option: "foo".into(),
                },
                "unknown option `foo` (options: proxy=v1|v2, allow=CIDR[,CIDR…], max-conns=N)",
            ),
            (
                "tcp/80=1.2.3.4:80,foo",
                E::UnknownOption {
                    option: "foo".into(),
                },
                "unknown option `foo`",
            ),
            (
                "tcp/80=1.2.3.4:80,proxy",
                E::MissingValue {
                    option: "proxy".into(),
                },
                "option `proxy` needs a value",
            ),
            (
                "tcp/80=1.2.3.4:80,allow=",
                E::MissingValue {
                    option: "allow".into(),
                },
                "option `allow` needs a value",
            ),
            (
                "tcp/80=1.2.3.4:80,proxy=v1,proxy=v2",
                E::DuplicateOption {
                    option: "proxy".into(),
                },
                "option `proxy` is given twice",
            ),
            (
                "tcp/80=1.2.3.4:80,allow=10.0.0.0/8,max-conns=1,allow=::1",
                E::DuplicateOption {
                    option: "allow".into(),
                },
                "option `allow` is given twice",
            ),
            (
                "tcp/80=1.2.3.4:80,",
                E::EmptyOption {
                    spec: "tcp/80=1.2.3.4:80,".into(),
                },
                "empty option in `tcp/80=1.2.3.4:80,` (remove the doubled or trailing comma)",
            ),
            (
                "tcp/80=1.2.3.4:80,allow=10.0.0.0/8,,max-conns=1",
                E::EmptyOption {
                    spec: "tcp/80=1.2.3.4:80,allow=10.0.0.0/8,,max-conns=1".into(),
                },
                "empty option",
            ),
            (
                "udp/27015=1.2.3.4:27015,proxy=v1",
                E::ProxyV1OverUdp,
                "PROXY protocol v1 has no form for UDP (use proxy=v2",
            ),
            (
                "tcp/80=1.2.3.4:80,proxy=v3",
                E::UnknownProxy {
                    version: "v3".into(),
                },
                "unknown PROXY protocol version `v3` (use v1 or v2)",
            ),
            (
                "tcp/80=1.2.3.4:80,allow=office",
                E::InvalidCidr {
                    text: "office".into(),
                },
                "`office` is not a CIDR (write ADDR/PREFIX",
            ),
            (
                "tcp/80=1.2.3.4:80,allow=10.0.0.0/33",
                E::PrefixTooLong {
                    addr: ip("10.0.0.0"),
                    prefix: 33,
                    max: 32,
                },
                "prefix /33 is too long for 10.0.0.0 (at most /32)",
            ),
            (
                "tcp/80=1.2.3.4:80,allow=203.0.113.5/24",
                E::HostBitsSet {
                    addr: ip("203.0.113.5"),
                    prefix: 24,
                    network: ip("203.0.113.0"),
                },
                "203.0.113.5/24 has host bits set; did you mean 203.0.113.0/24?",
            ),
            (
                "tcp/80=1.2.3.4:80,max-conns=lots",
                E::InvalidMaxConns {
                    value: "lots".into(),
                },
                "`lots` is not a valid max-conns (use a whole number",
            ),
            (
                "tcp/80=1.2.3.4:80,max-conns=0",
                E::MaxConnsZero,
                "max-conns must be at least 1",
            ),
        ];
        for (text, expected, message) in cases {
            let got = err(text);
            assert_eq!(got, expected, "for `{text}`");
            assert!(
                got.to_string().contains(message),
                "for `{text}`: message `{got}` should contain `{message}`"
            );
        }
    }

    #[test]
    fn range_maps_port_for_port() {
        let s = spec("tcp/30000-30009=127.0.0.1:40000");
        assert_eq!(
            s.target_for(30000),
            Some("127.0.0.1:40000".parse().unwrap())
        );
        assert_eq!(
            s.target_for(30003),
            Some("127.0.0.1:40003".parse().unwrap())
        );
        assert_eq!(
            s.target_for(30009),
            Some("127.0.0.1:40009".parse().unwrap())
        );
        assert_eq!(s.target_for(29999), None);
        assert_eq!(s.target_for(30010), None);
        let edge = spec("udp/100-109=[::1]:65526");
        assert_eq!(edge.target_for(109), Some("[::1]:65535".parse().unwrap()));
    }

    #[test]
    fn port_range_basics() {
        let r = range(30000, 30009);
        assert_eq!((r.start(), r.end(), r.len()), (30000, 30009, 10));
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            (30000..=30009).collect::<Vec<_>>()
        );
        assert!(r.contains(30000) && r.contains(30009) && !r.contains(30010));
        assert!(r.overlaps(&range(30009, 30100)));
        assert!(r.overlaps(&range(29990, 30000)));
        assert!(!r.overlaps(&range(30010, 30011)));
        assert_eq!(r.to_string(), "30000-30009");
        assert_eq!(PortRange::single(443).unwrap().to_string(), "443");
        assert_eq!(PortRange::single(0), Err(PortSpecError::PortZero));
        assert_eq!(range(1, 1024).len(), MAX_RANGE_LEN);
        assert_eq!(
            PortRange::new(1, 1025),
            Err(PortSpecError::RangeTooLong { len: 1025 })
        );
        assert_eq!(range(65535, 65535).iter().count(), 1);
        assert_eq!(
            PortRange::new(80, 70).unwrap_err().to_string(),
            "`80-70`: range end 70 is below start 80"
        );
        assert_eq!("30000-30009".parse::<PortRange>(), Ok(r));
    }

    #[test]
    fn protocol_and_proxy_text() {
        assert_eq!("tcp".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!(Protocol::Udp.to_string(), "udp");
        assert!("TCP".parse::<Protocol>().is_err());
        assert_eq!("v1".parse::<ProxyProtocol>(), Ok(ProxyProtocol::V1));
        assert_eq!(ProxyProtocol::V2.to_string(), "v2");
    }

    #[test]
    fn port_keys() {
        let k = key("tcp/30000-30009");
        assert_eq!(k.protocol, Protocol::Tcp);
        assert_eq!(k.ports, range(30000, 30009));
        assert_eq!(k.to_string(), "tcp/30000-30009");
        assert_eq!(key(" udp/25565 ").to_string(), "udp/25565");
        assert!(matches!(
            "25565".parse::<PortKey>(),
            Err(PortSpecError::MissingProtocol { .. })
        ));
        assert!(key("tcp/1") < key("tcp/2") && key("tcp/65535") < key("udp/1"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(cidr("203.0.113.0/24").to_string(), "203.0.113.0/24");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(
            cidr("198.51.100.7"),
            Cidr::new(ip("198.51.100.7"), 32).unwrap()
        );
        assert_eq!(cidr("2001:db8::1").prefix(), 128);
        assert_eq!(cidr("0.0.0.0/0").addr(), ip("0.0.0.0"));
        assert_eq!(
            "203.0.113.5/24".parse::<Cidr>().unwrap_err().to_string(),
            "203.0.113.5/24 has host bits set; did you mean 203.0.113.0/24?"
        );
        assert_eq!(
            "2001:db8::1/32".parse::<Cidr>().unwrap_err().to_string(),
            "2001:db8::1/32 has host bits set; did you mean 2001:db8::/32?"
        );
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(PortSpecError::PrefixTooLong { max: 128, .. })
        ));
        for bad in [
            "",
            "/24",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/999",
            "10.0.0/8",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(PortSpecError::InvalidCidr { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn cidr_contains_treats_v4_mapped_as_v4() {
        let v4 = cidr("203.0.113.0/24");
        assert!(v4.contains(ip("203.0.113.5")));
        assert!(v4.contains(ip("::ffff:203.0.113.5")));
        assert!(!v4.contains(ip("203.0.114.5")));
        assert!(!v4.contains(ip("::ffff:203.0.114.5")));
        assert!(!v4.contains(ip("2001:db8::1")));
        // A 96-bit-offset v4 address that is not v4-mapped is not the same.
        assert!(!v4.contains(ip("::203.0.113.5")));

        let mapped = cidr("::ffff:203.0.113.0/120");
        assert!(mapped.contains(ip("203.0.113.5")));
        assert!(mapped.contains(ip("::ffff:203.0.113.200")));
        assert!(!mapped.contains(ip("203.0.112.5")));

        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:1::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("32.1.13.184")));

        assert!(cidr("0.0.0.0/0").contains(ip("::ffff:1.2.3.4")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("1.2.3.4")));
        assert!(cidr("198.51.100.7").contains(ip("198.51.100.7")));
        assert!(!cidr("198.51.100.7").contains(ip("198.51.100.8")));
    }

    #[test]
    fn policy_admits() {
        let all = PortPolicy::default();
        assert!(all.admits(ip("1.2.3.4")) && all.admits(ip("::1")));
        let some = spec("tcp/1=1.1.1.1:1,allow=10.0.0.0/8,2001:db8::/32").policy;
        assert!(some.admits(ip("10.1.2.3")));
        assert!(some.admits(ip("::ffff:10.1.2.3")));
        assert!(some.admits(ip("2001:db8::5")));
        assert!(!some.admits(ip("11.0.0.1")));
    }

    #[test]
    fn public_view_has_no_target() {
        let s = spec("tcp/443=192.168.1.10:8443,proxy=v2,allow=203.0.113.0/24");
        let public = s.public();
        assert_eq!(
            public,
            PublicPort {
                protocol: Protocol::Tcp,
                ports: range(443, 443),
                policy: s.policy.clone(),
            }
        );
        assert_eq!(public.key(), s.key());
        let bytes = postcard::to_allocvec(&public).unwrap();
        let target_octets = [192u8, 168, 1, 10];
        assert!(!bytes.windows(4).any(|w| w == target_octets));
    }

    #[test]
    fn from_specs_refuses_each_bad_entry_alone() {
        let mut bad_target = spec("tcp/9000=127.0.0.1:9000");
        bad_target.target.set_port(0);
        let mut zero_conns = spec("udp/53=127.0.0.1:5353");
        zero_conns.policy.max_conns = Some(0);
        let entries = vec![
            spec("tcp/80=127.0.0.1:8080"),
            spec("tcp/8000-8010=127.0.0.1:9000"),
            spec("tcp/8005=127.0.0.1:1"),
            spec("udp/8005=127.0.0.1:1"),
            bad_target,
            spec("tcp/7990-8000=127.0.0.1:2"),
            zero_conns,
            spec("tcp/80=127.0.0.1:1"),
            spec("tcp/8011=127.0.0.1:3"),
        ];
        let (map, refused) = PortMap::from_specs(7, entries);
        assert_eq!(map.generation(), 7);
        let kept: Vec<String> = map.specs().iter().map(|s| s.key().to_string()).collect();
        assert_eq!(kept, ["tcp/80", "tcp/8000-8010", "udp/8005", "tcp/8011"]);
        let overlap = PortSpecError::OverlapsEntry {
            key: key("tcp/8000-8010"),
            entry: 1,
        };
        assert_eq!(overlap.to_string(), "overlaps tcp/8000-8010 (entry 2)");
        assert_eq!(
            refused,
            vec![
                (2, overlap.clone()),
                (
                    4,
                    PortSpecError::TargetPortZero {
                        target: "127.0.0.1:0".parse().unwrap()
                    }
                ),
                (5, overlap),
                (6, PortSpecError::MaxConnsZero),
                (
                    7,
                    PortSpecError::OverlapsEntry {
                        key: key("tcp/80"),
                        entry: 0
                    }
                ),
            ]
        );
        assert_eq!(map.public().len(), 4);
    }

    #[test]
    fn insert_remove_and_retarget_make_new_generations() {
        let map = PortMap::new();
        assert_eq!((map.generation(), map.specs().len()), (0, 0));

        let map1 = map.insert(spec("tcp/25565=127.0.0.1:25565")).unwrap();
        let map2 = map1
            .insert(spec("udp/30000-30009=127.0.0.1:40000"))
            .unwrap();
        assert_eq!((map1.generation(), map2.generation()), (1, 2));
        assert_eq!(map.specs().len(), 0, "the old map is unchanged");

        let retargeted = map2
            .insert(spec("tcp/25565=192.168.1.20:25565,proxy=v2"))
            .unwrap();
        assert_eq!(retargeted.generation(), 3);
        assert_eq!(retargeted.specs().len(), 2);
        assert_eq!(
            retargeted.lookup(Protocol::Tcp, 25565).map(|s| s.target),
            Some("192.168.1.20:25565".parse().unwrap())
        );

        assert_eq!(
            retargeted.insert(spec("udp/30005-30020=127.0.0.1:1")),
            Err(PortSpecError::OverlapsMapped {
                key: key("udp/30000-30009")
            })
        );
        assert!(
            retargeted
                .insert(spec("udp/30005-30020=127.0.0.1:1"))
                .unwrap_err()
                .to_string()
                .contains("overlaps udp/30000-30009, which is already mapped")
        );
        assert_eq!(
            retargeted
                .insert(spec("tcp/1=127.0.0.1:65535,max-conns=1"))
                .map(|m| m.generation()),
            Ok(4)
        );

        let removed = retargeted.remove(&key("tcp/25565")).unwrap();
        assert_eq!(removed.generation(), 4);
        assert_eq!(removed.lookup(Protocol::Tcp, 25565), None);
        assert!(removed.lookup(Protocol::Udp, 30009).is_some());
        assert_eq!(
            removed.remove(&key("tcp/25565")),
            Err(PortSpecError::NotMapped {
                key: key("tcp/25565")
            })
        );
        assert_eq!(
            removed.remove(&key("tcp/25565")).unwrap_err().to_string(),
            "tcp/25565 is not mapped"
        );
        assert_eq!(
            removed.remove(&key("udp/30003")).unwrap_err().to_string(),
            "udp/30003 is part of udp/30000-30009; remove udp/30000-30009 instead"
        );
        let mut invalid = spec("tcp/2=127.0.0.1:1");
        invalid.policy.max_conns = Some(0);
        assert_eq!(removed.insert(invalid), Err(PortSpecError::MaxConnsZero));
    }

    #[test]
    fn lookup_across_1000_entries() {
        let mut specs = Vec::new();
        for i in 0..1000u16 {
            let start = 2000 + i * 10;
            let protocol = if i % 2 == 0 { "tcp" } else { "udp" };
            specs.push(spec(&format!(
                "{protocol}/{start}-{}=127.0.0.1:{}",
                start + 4,
                20000 + i
            )));
        }
        let (map, refused) = PortMap::from_specs(1, specs.clone());
        assert!(refused.is_empty());
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for port in (1..=13000u16).chain([u16::MAX]) {
                let expected = specs
                    .iter()
                    .find(|s| s.protocol == protocol && s.ports.contains(port));
                assert_eq!(map.lookup(protocol, port), expected, "{protocol}/{port}");
            }
        }
        let found = map.lookup(Protocol::Udp, 2013).unwrap();
        assert_eq!(
            found.target_for(2013),
            Some("127.0.0.1:20004".parse().unwrap())
        );
    }

    #[test]
    fn serde_refuses_invalid_values() {
        let decode_range = |pair: (u16, u16)| {
            postcard::from_bytes::<PortRange>(&postcard::to_allocvec(&pair).unwrap())
        };
        assert!(decode_range((0, 5)).is_err());
        assert!(decode_range((80, 70)).is_err());
        assert!(decode_range((1, 2000)).is_err());
        assert_eq!(decode_range((80, 90)).unwrap(), range(80, 90));

        let bad_cidr = postcard::to_allocvec(&(ip("203.0.113.5"), 24u8)).unwrap();
        assert!(postcard::from_bytes::<Cidr>(&bad_cidr).is_err());
        let long_prefix = postcard::to_allocvec(&(ip("10.0.0.0"), 40u8)).unwrap();
        assert!(postcard::from_bytes::<Cidr>(&long_prefix).is_err());

        let zero = PortPolicy {
            allow: vec![],
            max_conns: Some(0),
        };
        let bytes = postcard::to_allocvec(&zero).unwrap();
        assert!(postcard::from_bytes::<PortPolicy>(&bytes).is_err());

        let s = spec("tcp/443=[::1]:8443,proxy=v2,max-conns=5");
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<PortSpec>(&bytes).unwrap(), s);
        let forged = postcard::to_allocvec("tcp/443=[::1]:0").unwrap();
        assert!(postcard::from_bytes::<PortSpec>(&forged).is_err());
    }

    fn arb_protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
    }

    fn arb_range() -> impl Strategy<Value = PortRange> {
        let extra = u16::try_from(MAX_RANGE_LEN - 1).unwrap();
        (1..=u16::MAX, 0..=extra)
            .prop_map(|(start, extra)| range(start, start.saturating_add(extra)))
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from_bits(b))),
            any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from_bits(b))),
            any::<u32>().prop_map(|b| IpAddr::V6(Ipv4Addr::from_bits(b).to_ipv6_mapped())),
        ]
    }

    fn arb_cidr() -> impl Strategy<Value = Cidr> {
        (arb_ip(), any::<u8>()).prop_map(|(addr, p)| {
            let prefix = p % (max_prefix(addr) + 1);
            Cidr::new(network(addr, prefix), prefix).unwrap()
        })
    }

    fn arb_policy() -> impl Strategy<Value = PortPolicy> {
        (
            proptest::collection::vec(arb_cidr(), 0..4),
            proptest::option::of(1..=u32::MAX),
        )
            .prop_map(|(allow, max_conns)| PortPolicy { allow, max_conns })
    }

    fn arb_spec() -> impl Strategy<Value = PortSpec> {
        (arb_protocol(), arb_range())
            .prop_flat_map(|(protocol, ports)| {
                let last_target = u16::try_from(65536 - ports.len()).unwrap();
                (
                    Just(protocol),
                    Just(ports),
                    arb_ip(),
                    1..=last_target,
                    prop_oneof![Just(0u32), any::<u32>()],
                    proptest::option::of(prop_oneof![
                        Just(ProxyProtocol::V1),
                        Just(ProxyProtocol::V2)
                    ]),
                    arb_policy(),
                )
            })
            .prop_map(|(protocol, ports, ip, port, scope, proxy, policy)| {
                // v1 is TCP-only; the parser refuses it on UDP.
                let proxy = match (protocol, proxy) {
                    (Protocol::Udp, Some(ProxyProtocol::V1)) => Some(ProxyProtocol::V2),
                    (_, p) => p,
                };
                let target = match ip {
                    IpAddr::V4(_) => SocketAddr::new(ip, port),
                    IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope)),
                };
                PortSpec {
                    protocol,
                    ports,
                    target,
                    proxy,
                    policy,
                }
            })
    }

    fn arb_public() -> impl Strategy<Value = PublicPort> {
        arb_spec().prop_map(|s| s.public())
    }

    fn assert_valid(port: &PublicPort) {
        let (start, end) = port.ports.into();
        assert_eq!(PortRange::new(start, end), Ok(port.ports));
        for c in &port.policy.allow {
            assert_eq!(Cidr::new(c.addr, c.prefix), Ok(*c));
        }
        assert_ne!(port.policy.max_conns, Some(0));
    }

    /// Text that is close to a spec, so the parser gets past its first checks.
    fn spec_like() -> impl Strategy<Value = String> {
        "[ a-z]{0,4}/[0-9-]{0,12}=[0-9a-f.:\\[\\]%]{0,24}(,[a-z-]{0,9}=?[0-9a-fv.:/]{0,24}){0,5}"
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_arbitrary_text(text in any::<String>()) {
            let _ = text.parse::<PortSpec>();
            let _ = text.parse::<Cidr>();
            let _ = text.parse::<PortKey>();
            let _ = text.parse::<PortRange>();
        }

        #[test]
        fn near_specs_never_panic_and_round_trip(text in spec_like()) {
            if let Ok(s) = text.parse::<PortSpec>() {
                prop_assert_eq!(s.to_string().parse::<PortSpec>(), Ok(s));
            }
            if let Ok(k) = text.parse::<PortKey>() {
                prop_assert_eq!(k.to_string().parse::<PortKey>(), Ok(k));
            }
        }

        #[test]
        fn valid_specs_round_trip_through_text(s in arb_spec()) {
            let text = s.to_string();
            prop_assert_eq!(text.parse::<PortSpec>(), Ok(s.clone()));
            prop_assert_eq!(s.key().to_string().parse::<PortKey>(), Ok(s.key()));
            for c in &s.policy.allow {
                prop_assert_eq!(c.to_string().parse::<Cidr>(), Ok(*c));
            }
        }

        #[test]
        fn public_port_round_trips_through_postcard(p in arb_public()) {
            let bytes = postcard::to_allocvec(&p).unwrap();
            prop_assert_eq!(postcard::from_bytes::<PublicPort>(&bytes).unwrap(), p);
        }

        #[test]
        fn arbitrary_bytes_never_decode_to_invalid_ports(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            if let Ok(ports) = postcard::from_bytes::<Vec<PublicPort>>(&bytes) {
                ports.iter().for_each(assert_valid);
            }
        }

        /// Valid encodings with a few bytes changed reach much deeper into
        /// the decoder than random bytes do.
        #[test]
        fn mutated_encodings_never_decode_to_invalid_ports(
            ports in proptest::collection::vec(arb_public(), 1..4),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = postcard::to_allocvec(&ports).unwrap();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(decoded) = postcard::from_bytes::<Vec<PublicPort>>(&bytes) {
                decoded.iter().for_each(assert_valid);
            }
        }
    }
}
