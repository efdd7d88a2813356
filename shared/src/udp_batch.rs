//! Batched UDP receive for every socket on the data path: one `recvmmsg`
//! takes what is queued, and with UDP GRO (quinn-udp turns it on) each
//! buffer may hold a run of equal-sized datagrams from one source.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

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
        let RecvBatch { storage, metas, .. } = self;
        let count = socket
            .async_io(Interest::READABLE, || {
                let mut chunks = storage.chunks_exact_mut(SLOT_BYTES);
                let mut slots: [IoSliceMut<'_>; N] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                state.recv(socket.into(), &mut slots, metas)
            })
            .await?;
        self.count = count;
        Ok(count)
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
            .flat_map(|(from, stride, bytes)| bytes.chunks(stride).map(move |d| (from, d)))
    }
}
