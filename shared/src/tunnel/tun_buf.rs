//! The layout every TUN buffer shares, and the buffers decrypted packets
//! are written to the TUN from.
//!
//! tun-rs's GRO coalesces a batch's packets of one flow into the buffer of
//! the first, up to that buffer's capacity, and will not grow it. Giving
//! every buffer 64 KiB up front made the receive pipeline's resident memory
//! the whole batch's (64 × 64 KiB = 4 MiB) once each buffer had been some
//! flow's head in turn. A [`GroBuf`] holds one packet and reports the
//! coalescing bound as its capacity; when GRO first appends past one
//! packet's room, it takes a 64 KiB head from a [`HeadPool`], and gives it
//! back after the write. So memory follows the flows in one batch, not the
//! batch size, and the heads are reused rather than allocated per write
//! (musl's allocator maps and unmaps a 64 KiB block on every allocation
//! and free).

use std::sync::{Arc, Mutex};

use tun_rs::ExpandBuffer;

/// Room before each packet in a TUN buffer: the 10-byte virtio header the
/// offload path writes in front, with spare for alignment.
pub const OFFSET: usize = 16;

/// One packet of the largest MTU we would run (2048; the tunnel's is
/// 1420) behind its offset.
pub const PACKET_BUF: usize = OFFSET + 2048;

/// The capacity a [`GroBuf`] reports to tun-rs, which coalesces while
/// twice the offset plus the coalesced packet fit in it: so a coalesced IP
/// packet reaches 65535 bytes and no more. That is tun-rs's only bound on
/// UDP; one byte more and the IP length wraps and the kernel cuts the
/// packet into garbage.
pub const COALESCE_CAP: usize = 65535 + 2 * OFFSET;

/// Heads kept between writes (512 KiB, resident once used): enough for a
/// batch of 8 busy flows. A batch with more takes new ones, freed after it;
/// so does one whose TCP segments arrive in reverse order, where each
/// prepend moves the flow to a new head.
const SPARE_HEADS: usize = 8;

/// Coalescing heads between writes, shared by one pipeline's buffers. A
/// lock, never contended, because tun-rs hands each buffer only `&mut`
/// itself and the pipeline's task must stay `Send`.
#[derive(Debug, Default)]
pub struct HeadPool(Mutex<Vec<Vec<u8>>>);

impl HeadPool {
    fn take(&self) -> Vec<u8> {
        let spare = self.lock().pop();
        spare.unwrap_or_else(|| Vec::with_capacity(COALESCE_CAP))
    }

    fn give_back(&self, mut head: Vec<u8>) {
        let mut spare = self.lock();
        if spare.len() < SPARE_HEADS {
            head.clear();
            spare.push(head);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A TUN write buffer: one packet, or a GRO head of up to [`COALESCE_CAP`].
#[derive(Debug)]
pub struct GroBuf {
    packet: Vec<u8>,
    /// Set while GRO coalesces into this buffer; holds the packet and what
    /// was appended to it.
    head: Option<Vec<u8>>,
    pool: Arc<HeadPool>,
}

impl GroBuf {
    /// An empty buffer whose heads come from `pool`.
    pub fn new(pool: Arc<HeadPool>) -> Self {
        Self {
            packet: Vec::with_capacity(PACKET_BUF),
            head: None,
            pool,
        }
    }

    /// The packet's bytes, for writing one packet behind [`OFFSET`]. Only
    /// between a [`release`](Self::release) and the next GRO pass.
    pub fn packet_mut(&mut self) -> &mut Vec<u8> {
        debug_assert!(self.head.is_none(), "packet written while a head is held");
        &mut self.packet
    }

    /// Gives the head back to the pool, and shrinks a packet buffer that an
    /// outsized datagram grew back to one packet's size. Called after each
    /// write.
    pub fn release(&mut self) {
        if let Some(head) = self.head.take() {
            self.pool.give_back(head);
        }
        if self.packet.capacity() > PACKET_BUF {
            self.packet = Vec::with_capacity(PACKET_BUF);
        }
    }

    fn active(&mut self) -> &mut Vec<u8> {
        self.head.as_mut().unwrap_or(&mut self.packet)
    }

    /// The first append past one packet's room moves the packet into a head.
    fn make_room(&mut self, len: usize) {
        if self.head.is_none() && len > self.packet.capacity() {
            let mut head = self.pool.take();
            head.extend_from_slice(&self.packet);
            self.head = Some(head);
        }
    }
}

impl AsRef<[u8]> for GroBuf {
    fn as_ref(&self) -> &[u8] {
        self.head.as_deref().unwrap_or(&self.packet)
    }
}

impl AsMut<[u8]> for GroBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.active()
    }
}

impl ExpandBuffer for GroBuf {
    /// The bound tun-rs coalesces up to, not the allocation: tun-rs 2.8
    /// reads it only in its "room to coalesce?" checks (UDP append, TCP
    /// append and prepend), and grows the buffer through the two methods
    /// below.
    fn buf_capacity(&self) -> usize {
        COALESCE_CAP
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.make_room(new_len);
        self.active().resize(new_len, value);
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let len = self.as_ref().len() + src.len();
        self.make_room(len);
        self.active().extend_from_slice(src);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// Internet checksum (RFC 1071) of `data`, continuing from `sum`.
    fn csum(data: &[u8], mut sum: u32) -> u16 {
        for pair in data.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).map_or(0, |&b| u32::from(b));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 packet 10.77.0.1 → 10.77.0.2 carrying `transport` (its
    /// checksum field, at `sum_at`, zero), behind `OFFSET` bytes of room as
    /// the receive pipeline hands packets to the TUN; both checksums set.
    fn ipv4_packet(
        protocol: u8,
        id: u16,
        mut transport: Vec<u8>,
        sum_at: usize,
        pool: &Arc<HeadPool>,
    ) -> GroBuf {
        let (src, dst) = ([10, 77, 0, 1], [10, 77, 0, 2]);
        let pseudo: u32 = [src, dst]
            .iter()
            .map(|a| {
                u32::from(u16::from_be_bytes([a[0], a[1]]))
                    + u32::from(u16::from_be_bytes([a[2], a[3]]))
            })
            .sum::<u32>()
            + u32::from(protocol)
            + transport.len() as u32;
        let sum = csum(&transport, pseudo);
        transport[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
        let mut p = Vec::with_capacity(PACKET_BUF);
        p.resize(OFFSET, 0);
        p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0]);
        p[OFFSET + 2..OFFSET + 4].copy_from_slice(&((20 + transport.len()) as u16).to_be_bytes());
        p[OFFSET + 4..OFFSET + 6].copy_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let ip_sum = csum(&p[OFFSET..OFFSET + 20], 0);
        p[OFFSET + 10..OFFSET + 12].copy_from_slice(&ip_sum.to_be_bytes());
        p.extend_from_slice(&transport);
        GroBuf {
            packet: p,
            head: None,
            pool: pool.clone(),
        }
    }

    /// A UDP datagram 51820 → 7002 with a payload of `payload_len` bytes.
    fn udp_packet(id: u16, payload_len: usize, pool: &Arc<HeadPool>) -> GroBuf {
        let mut udp = Vec::new();
        udp.extend_from_slice(&51820u16.to_be_bytes());
        udp.extend_from_slice(&7002u16.to_be_bytes());
        udp.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend((0..payload_len).map(|i| (i as u8) ^ (id as u8)));
        ipv4_packet(17, id, udp, 6, pool)
    }

    fn gro_pass(bufs: &mut [GroBuf]) -> Vec<usize> {
        let mut to_write = Vec::new();
        tun_rs::handle_gro(
            bufs,
            OFFSET,
            &mut Default::default(),
            &mut Default::default(),
            true,
            &mut to_write,
        )
        .expect("GRO pass");
        to_write
    }

    /// 64 equal UDP packets of one flow: more than 64 KiB together. What
    /// GRO hands to the TUN must stay within an IP packet's 65535 bytes.
    #[test]
    fn coalesced_udp_stays_within_an_ip_packet() {
        let pool = Arc::new(HeadPool::default());
        let mut bufs: Vec<GroBuf> = (0..64).map(|i| udp_packet(i, 1214, &pool)).collect();
        let to_write = gro_pass(&mut bufs);
        assert!(to_write.len() >= 2, "64 × 1242 bytes cannot be one packet");
        for &i in &to_write {
            let packet = &bufs[i].as_ref()[OFFSET..];
            let ip_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            assert!(
                packet.len() <= 65535,
                "coalesced packet of {} bytes",
                packet.len()
            );
            assert_eq!(
                ip_len,
                packet.len(),
                "IP length field of a coalesced packet"
            );
        }
    }

    /// Only the buffers GRO coalesced into hold a head, only until the
    /// write, and the next batch's heads are the same allocations.
    #[test]
    fn heads_are_taken_only_for_coalescing_and_reused() {
        let pool = Arc::new(HeadPool::default());
        let batch = |pool: &Arc<HeadPool>| -> Vec<GroBuf> {
            (0..8).map(|i| udp_packet(i, 1214, pool)).collect()
        };
        let mut bufs = batch(&pool);
        let to_write = gro_pass(&mut bufs);
        assert_eq!(to_write, vec![0], "8 packets of one flow, one head");
        assert_eq!(bufs[0].as_ref().len(), OFFSET + 20 + 8 + 8 * 1214);
        let head = bufs[0].head.as_ref().map(Vec::as_ptr).expect("a head");
        assert!(
            bufs[1..].iter().all(|b| b.head.is_none()),
            "a merged packet took a head"
        );
        for b in &mut bufs {
            b.release();
            assert!(b.head.is_none() && b.packet.capacity() <= PACKET_BUF);
        }
        assert_eq!(pool.lock().len(), 1);

        let mut bufs = batch(&pool);
        gro_pass(&mut bufs);
        assert_eq!(
            bufs[0].head.as_ref().map(Vec::as_ptr),
            Some(head),
            "head not reused"
        );
        assert!(pool.lock().is_empty());
    }

    /// A TCP segment 5000 → 80 (ACK only) with `payload_len` bytes from
    /// sequence number `seq`.
    fn tcp_segment(seq: u32, payload_len: usize, pool: &Arc<HeadPool>) -> GroBuf {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&5000u16.to_be_bytes());
        tcp.extend_from_slice(&80u16.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&1u32.to_be_bytes());
        tcp.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend((0..payload_len).map(|i| (seq as usize + i) as u8));
        ipv4_packet(6, 0, tcp, 16, pool)
    }

    /// A segment that arrives before the one it precedes: tun-rs grows the
    /// later-arriving buffer, copies the first segment behind it and swaps
    /// the two. The result is one segment in order, in a head.
    #[test]
    fn a_tcp_segment_prepended_lands_whole_in_a_head() {
        let pool = Arc::new(HeadPool::default());
        let mut bufs = vec![
            tcp_segment(2380, 1380, &pool),
            tcp_segment(1000, 1380, &pool),
        ];
        let to_write = gro_pass(&mut bufs);
        assert_eq!(to_write, vec![0]);
        assert!(
            bufs[0].head.is_some(),
            "the coalesced segment is not in a head"
        );
        let packet = &bufs[0].as_ref()[OFFSET..];
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[2], packet[3]])),
            2800
        );
        assert_eq!(packet.len(), 2800);
        assert_eq!(
            u32::from_be_bytes([packet[24], packet[25], packet[26], packet[27]]),
            1000
        );
        let payload = &packet[40..];
        assert!(
            payload
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (1000 + i) as u8),
            "payload out of order"
        );
        for b in &mut bufs {
            b.release();
        }
        assert_eq!(pool.lock().len(), 1, "a head was not given back");
    }
}
