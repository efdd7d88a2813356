//! The WireGuard data plane: boringtun's `noise::Tunn` over a TUN device.
//!
//! | module | owns |
//! |---|---|
//! | [`addrs`] | the private addresses of the two tunnel ends |
//! | [`device`] | creating and configuring the TUN device (rtnetlink) |
//! | [`driver`] | the task that moves packets between TUN, `Tunn` and UDP |
//! | [`inbound`] | which decrypted packets an end hands its kernel |
//! | `tun_buf` | TUN buffers' layout; write buffers sized by what GRO coalesces |
//! | [`keys`] | WireGuard keys, kept in a type that never prints |
//!
//! The tunnel carries IPv4 between two addresses only; public clients of
//! either family are served by the edge, whose flows then cross the tunnel.

pub mod addrs;
pub mod device;
pub mod driver;
pub mod inbound;
pub mod keys;
pub(crate) mod tun_buf;

pub use addrs::TunnelAddrs;
pub use driver::{Endpoint, TunnelHandle, TunnelSpec, TunnelStats};
pub use inbound::Inbound;
pub use keys::WireguardKey;
