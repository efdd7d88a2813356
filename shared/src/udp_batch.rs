//! Batched UDP I/O for every socket on the data path, through quinn-udp:
//! one `recvmmsg` takes what is queued, and with UDP GRO each buffer may
//! hold a run of equal-sized datagrams from one source; a run of datagrams
//! goes out in one GSO `sendmsg`.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// A GSO send is one UDP datagram to the kernel: the whole run stays under
/// 64 KiB.
pub const GSO_MAX_BYTES: usize = 65_000;

/// Readies `socket` for batched I/O (GRO on) and returns its quinn-udp
/// state. quinn-udp also asks for "probe" path-MTU discovery (DF set, path
/// MTU ignored); that is undone here (`sockopt::allow_fragmentation`).
pub fn socket_state(socket: &UdpSocket) -> io::Result<UdpSocketState> {
    let state = UdpSocketState::new(socket.into())?;
    crate::sockopt::allow_fragmentation(socket);
    Ok(state)
}

/// Sends `run` to `to`: datagrams of `segment` bytes (the last may be
/// shorter), cut by the kernel (GSO) when there is more than one. quinn-udp
/// logs failures, rate-limited, and turns GSO off for good on a path that
/// refuses it; only "would block" is waited out, other errors return.
pub async fn send_run(
    socket: &UdpSocket,
    state: &UdpSocketState,
    to: SocketAddr,
    run: &[u8],
    segment: usize,
) -> io::Result<()> {
    if run.is_empty() {
        return Ok(());
    }
    let transmit = Transmit {
        destination: to,
        ecn: None,
        contents: run,
        segment_size: (run.len() > segment).then_some(segment),
        src_ip: None,
    };
    socket
        .async_io(Interest::WRITABLE, || state.send(socket.into(), &transmit))
        .await
}

/// One GRO super-datagram is at most 64 KiB.
const SLOT_BYTES: usize = 65536;

/// `N` receive buffers of 64 KiB in one allocation. The allocation is
/// large enough to be mapped lazily, so a buffer costs memory only as far
/// as datagrams have filled it.
pub struct RecvBatch<const N: usize> {
    storage: Vec<u8>,
    metas: [RecvMeta; N],
    count: usize,
}

impl<const N: usize> std::fmt::Debug for RecvBatch<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &N)
            .field("count", &self.count)
            .finish()
    }
}

impl<const N: usize> Default for RecvBatch<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RecvBatch<N> {
    pub fn new() -> Self {
        RecvBatch {
            storage: vec![0u8; N * SLOT_BYTES],
            metas: [RecvMeta::default(); N],
            count: 0,
        }
    }

    /// Waits until `socket` is readable, then takes what is queued; returns
    /// how many buffers were filled.
    pub async fn recv(&mut self, socket: &UdpSocket, state: &UdpSocketState) -> io::Result<usize> {
        loop {
            // Neither `readable()` nor `try_io` counts against tokio's
            // budget, and a caller may drop everything it receives (a flood
            // the allow list refuses, junk at the WireGuard port): without
            // this, a socket that never drains would hold the agent's one
            // thread.
            tokio::task::consume_budget().await;
            socket.readable().await?;
            if let Some(count) = self.try_recv(socket, state)? {
                return Ok(count);
            }
        }
    }

    /// Takes what is queued on a socket tokio found readable, without
    /// waiting: how many buffers were filled, or `None` if there was
    /// nothing after all (tokio has cleared the readiness; wait again).
    /// Lets sockets that take turns with one batch wait for readiness
    /// without holding it.
    ///
    /// Fewer than `N` means the queue was drained, and tokio is told so
    /// (as a "would block"), which saves the next call's empty `recvmmsg`.
    /// A datagram that arrived meanwhile raised a newer readiness event,
    /// which that does not clear.
    pub fn try_recv(
        &mut self,
        socket: &UdpSocket,
        state: &UdpSocketState,
    ) -> io::Result<Option<usize>> {
        // Nothing from an earlier receive (another socket's, when sockets
        // share the batch) is left to read if this one fails.
        self.count = 0;
        let RecvBatch { storage, metas, .. } = self;
        let mut drained = None;
        let result = socket.try_io(Interest::READABLE, || {
            let mut chunks = storage.chunks_exact_mut(SLOT_BYTES);
            let mut slots: [IoSliceMut<'_>; N] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            let count = state.recv(socket.into(), &mut slots, metas)?;
            if count < N {
                drained = Some(count);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(count)
        });
        let count = match (result, drained) {
            (Ok(count), _) | (Err(_), Some(count)) => count,
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            (Err(e), None) => return Err(e),
        };
        self.count = count;
        Ok(Some(count))
    }

    /// Buffers filled by the last receive.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Buffer `i` of the last receive: where it came from, its datagrams'
    /// size (all but the last are exactly this long) and its bytes.
    pub fn buffer(&self, i: usize) -> Option<(SocketAddr, usize, &[u8])> {
        if i >= self.count {
            return None;
        }
        let meta = self.metas.get(i)?;
        let start = i * SLOT_BYTES;
        let bytes = self.storage.get(start..start + meta.len)?;
        Some((meta.addr, meta.stride.max(1), bytes))
    }

    /// Every datagram of the last receive with its source, in order.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        (0..self.count)
            .filter_map(|i| self.buffer(i))
            .flat_map(|(from, stride, bytes)| split(bytes, stride).map(move |d| (from, d)))
    }
}

/// The datagrams of one receive buffer of `stride`-byte datagrams (the last
/// may be shorter). An empty buffer is one empty datagram: a zero-length
/// datagram is a datagram too (some protocols' keepalive), and is never
/// part of a GRO run.
pub fn split(bytes: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    let empty = bytes.is_empty().then_some(bytes);
    bytes.chunks(stride.max(1)).chain(empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_buffer_splits_into_its_datagrams_and_an_empty_one_is_one_datagram() {
        fn split(bytes: &[u8], stride: usize) -> Vec<&[u8]> {
            super::split(bytes, stride).collect()
        }
        assert_eq!(split(b"aabbc", 2), [&b"aa"[..], b"bb", b"c"]);
        assert_eq!(split(b"abc", 3), [&b"abc"[..]]);
        assert_eq!(split(b"", 1), [&b""[..]]);
    }

    /// A zero-length datagram is received as one, not as nothing.
    #[tokio::test]
    async fn a_zero_length_datagram_is_received() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = socket.local_addr().expect("address");
        let state = socket_state(&socket).expect("socket state");
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        sender.send_to(b"", to).expect("send");
        sender.send_to(b"after", to).expect("send");
        let mut batch = RecvBatch::<4>::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            let receive = batch.recv(&socket, &state);
            tokio::time::timeout(std::time::Duration::from_secs(10), receive)
                .await
                .expect("both datagrams arrive")
                .expect("receive");
            got.extend(batch.datagrams().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got, [b"".to_vec(), b"after".to_vec()]);
    }

    /// The agents run on one thread, and a caller may drop all it receives:
    /// a socket that never drains must still let the other tasks run.
    #[tokio::test] // one thread, as the agents run
    async fn receiving_from_a_socket_that_never_drains_lets_other_tasks_run() {
        let test = async {
            let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            // Room for every datagram below (the default may be small).
            socket2::SockRef::from(&socket)
                .set_recv_buffer_size(1 << 20)
                .expect("receive buffer");
            let to = socket.local_addr().expect("address");
            let state = socket_state(&socket).expect("socket state");
            // More datagrams than the receives below take, so every one of
            // them finds its batch full and readiness stays set.
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            for i in 0..200u8 {
                sender.send_to(&[i], to).expect("send");
            }
            let mut batch = RecvBatch::<1>::new();
            // The first receive may wait for the driver's first event.
            batch.recv(&socket, &state).await.expect("receive");
            let ran = Arc::new(AtomicBool::new(false));
            tokio::spawn({
                let ran = ran.clone();
                async move { ran.store(true, Ordering::SeqCst) }
            });
            for _ in 0..150 {
                assert_eq!(batch.recv(&socket, &state).await.expect("receive"), 1);
                if ran.load(Ordering::SeqCst) {
                    return;
                }
            }
            panic!("150 receives in a row never let another task run");
        };
        // A receive that waits means the datagrams did not all arrive.
        tokio::time::timeout(std::time::Duration::from_secs(10), test)
            .await
            .expect("the datagrams sent were all received");
    }
}
