//! skerry's shared library: everything both agents agree on.
//!
//! | module | owns |
//! |---|---|
//! | [`portmap`] | port specs (`tcp/443=127.0.0.1:8443,proxy=v2`), the public view the edge sees, validation |
//! | [`frame`] | the control channel's framing: version, length, hard maximum, postcard body |
//! | [`protocol`] | the control messages and the two ends of a session, without I/O |
//! | [`control`] | reading and writing those messages on a stream |
//! | [`flow`] | the header that opens every tunneled TCP flow and every UDP datagram |
//! | [`pki`] | the private CA and the certificates of both agents (rcgen) |
//! | [`tls`] | rustls configurations for mutual TLS on the control channel |
//! | [`bootstrap`] | the one document an edge needs to start |
//! | [`paths`] | state, config and runtime locations; the lock that keeps one agent per edge |
//! | [`relay`] | a TCP flow's bytes between two connections, with splice(2) |
//! | [`tunnel`] | the WireGuard data plane: boringtun over a TUN device set up with rtnetlink |
//! | [`udp_batch`] | batched UDP receive (`recvmmsg`, GRO) for every data-path socket |
//! | [`netns`] | network namespaces: the embedded local edge and the tests |
//! | [`sockopt`] | socket options no crate wraps (fragmentation, `TCP_DEFER_ACCEPT`, unacknowledged bytes) |
//! | [`shutdown`] | SIGINT and SIGTERM to a cancellation token |
//! | [`log_budget`] | a cap on how often what strangers cause is logged |
//! | [`logging`] | the `RUST_LOG` filter both agents use |
//! | [`fd_limit`] | the open-file limit, raised to what the system allows |
//!
//! What it does not do: open public listeners (the edge-agent does) or
//! connect to targets (the home-agent does).
#![deny(unsafe_code)]

pub mod bootstrap;
pub mod control;
pub mod dead_peer;
pub mod fd_limit;
pub mod flow;
pub mod frame;
pub mod log_budget;
pub mod logging;
pub mod netns;
pub mod paths;
pub mod pki;
pub mod portmap;
pub mod protocol;
pub mod relay;
pub mod shutdown;
pub mod sockopt;
pub mod tls;
pub mod tunnel;
pub mod udp_batch;
