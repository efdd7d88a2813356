//! The few socket options and queries that neither socket2 nor nix wraps.
//! The data plane's `unsafe` calls live here, behind safe functions.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::libc;

/// Sets an integer socket option.
#[allow(unsafe_code)]
fn set_int<F: AsFd>(
    socket: &F,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the descriptor is borrowed from a live socket for the length
    // of the call, and the value is a c_int on the stack that outlives it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lets the kernel fragment outer datagrams, as kernel WireGuard and
/// wireguard-go do (no DF bit). quinn-udp asks for "probe" path-MTU
/// discovery, which sends with DF and ignores the path MTU: behind a home
/// link below 1480 bytes (DS-Lite, some mobile links) full-sized packets
/// would vanish once the handshake is up. Applied by
/// [`udp_batch::socket_state`](crate::udp_batch::socket_state).
pub(crate) fn allow_fragmentation<F: AsFd>(socket: &F) {
    // An IPv4 socket refuses the IPv6 options, which is harmless.
    let _ = set_int(
        socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    );
    let _ = set_int(
        socket,
        libc::IPPROTO_IPV6,
        libc::IPV6_MTU_DISCOVER,
        libc::IPV6_PMTUDISC_DONT,
    );
    let _ = set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
}

/// `TCP_DEFER_ACCEPT`. On a listener, `accept` returns a connection only
/// once its first data has arrived (or after `secs`). On a socket about to
/// connect, the handshake's last ACK waits for the first data and rides on
/// it: one packet less through the tunnel for every flow.
pub fn defer_accept<F: AsFd>(socket: &F, secs: u16) -> io::Result<()> {
    set_int(
        socket,
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        libc::c_int::from(secs),
    )
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet
/// (`TIOCOUTQ`, sent or not).
#[allow(unsafe_code)]
pub(crate) fn unacknowledged<F: AsFd>(socket: &F) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: the descriptor is borrowed from a live socket for the length
    // of the call; TIOCOUTQ writes one c_int, to a local that outlives it.
    let rc = unsafe {
        libc::ioctl(
            socket.as_fd().as_raw_fd(),
            libc::TIOCOUTQ,
            std::ptr::from_mut(&mut queued),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(queued).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}
