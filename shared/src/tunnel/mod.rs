//! The WireGuard data plane: boringtun's `noise::Tunn` over a TUN device.
//!
//! | module | owns |
//! |---|---|
//! | [`addrs`] | the private addresses of the two tunnel ends |

pub mod addrs;

pub use addrs::TunnelAddrs;
