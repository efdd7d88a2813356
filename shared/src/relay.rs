//! Moving a flow's bytes between two TCP connections: the public one and
//! its tunnel flow at the edge, the tunnel flow and the target at home.
//!
//! Bulk goes through a pipe with splice(2): the kernel hands socket pages
//! to the pipe and the pipe's pages to the other socket, so the bytes are
//! never copied into this process and back. That is two copies less per
//! byte and relay, where copying is most of what a relay costs. Small
//! messages (requests, replies, keystrokes) are copied: fewer and cheaper
//! system calls per message. A half-close is passed on: the end of one
//! side's stream becomes a write shutdown of the other.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::sys::socket::{self, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked for per splice: a pipe's default capacity (16 pages).
const SPLICE_CHUNK: usize = 64 * 1024;

/// Relays both directions until both have ended; returns the bytes moved
/// a → b and b → a. Copies everything when no pipe can be had (out of
/// descriptors): the flow still works, only slower.
///
/// The streams are shared, not borrowed mutably: the caller may act on
/// the sockets meanwhile (the edge lifts a flow's open timeout) without a
/// second descriptor per flow.
pub async fn relay_tcp(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    let (a_to_b, b_to_a) = match (Pipe::take(), Pipe::take()) {
        (Ok(x), Ok(y)) => (Some(x), Some(y)),
        (one, other) => {
            tracing::debug!("no pipe for splice; relaying by copy");
            for pipe in [one, other].into_iter().flatten() {
                pipe.give_back();
            }
            (None, None)
        }
    };
    let moved = tokio::try_join!(
        one_way(a, b, a_to_b.as_ref()),
        one_way(b, a, b_to_a.as_ref())
    );
    // Both directions ran to their end, so both pipes are empty. After an
    // error a pipe may still hold bytes, and it is closed instead.
    if moved.is_ok() {
        for pipe in [a_to_b, b_to_a].into_iter().flatten() {
            pipe.give_back();
        }
    }
    moved
}

/// Empty pipes kept for the next flows: short-lived connections would
/// otherwise pay for creating and closing two pipes each.
static SPARE_PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
/// At most this many spare pipes (two descriptors each).
const SPARE_PIPES_MAX: usize = 32;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = spare_pipes().pop() {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Pipe { read, write })
    }

    /// Only for a pipe known to be empty.
    fn give_back(self) {
        let mut spare = spare_pipes();
        if spare.len() < SPARE_PIPES_MAX {
            spare.push(self);
        }
    }
}

fn spare_pipes() -> std::sync::MutexGuard<'static, Vec<Pipe>> {
    SPARE_PIPES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads of at most this many bytes are copied through the process, not
/// spliced. For small messages `recv` and `send` cost less than two splices
/// and a pipe, and a short `recv` shows the socket was drained, so tokio
/// clears its readiness without the extra call that finds it empty. A short
/// splice shows no such thing: 16 small segments fill a pipe's 16 slots.
const COPY_CHUNK: usize = 4096;

/// `from` → `to` until `from` ends, then half-closes `to`: small reads by
/// copy, and once a read fills the copy buffer, through the pipe (if there
/// is one) until a read comes back small again.
///
/// The pipe is empty whenever `from` is read, so "would block" there means
/// `from` has nothing; while the pipe holds bytes only `to` is written, so
/// "would block" there means `to` is full. tokio's readiness covers both.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Option<&Pipe>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut copying = true;
    loop {
        // Readiness waits and `try_io` do not count against tokio's
        // cooperative budget: without this a busy flow whose reads and
        // writes never block would hold its worker thread (and the other
        // direction, and whoever selects over the relay) for as long as
        // its bytes keep coming.
        tokio::task::consume_budget().await;
        let n = match pipe {
            Some(pipe) if !copying => splice_through(from, to, pipe).await?,
            _ => copy_once(from, to).await?,
        };
        if n == 0 {
            // The other side sees end-of-stream after everything sent before it.
            match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
            return Ok(total);
        }
        copying = n < COPY_CHUNK;
        total += n as u64;
    }
}

/// One read of at most [`COPY_CHUNK`] bytes from `from`, all of it written
/// to `to`; the bytes read (0 at end of stream).
///
/// The copy buffer is on the stack and never held across an `.await`, so a
/// waiting flow (most flows, most of the time) keeps no buffer: a relay's
/// state is a few hundred bytes, not 8 KiB. Only what `to` cannot take at
/// once is kept, in a heap copy, until it can.
async fn copy_once(from: &TcpStream, to: &TcpStream) -> io::Result<usize> {
    let (n, unsent) = loop {
        from.readable().await?;
        let mut buf = [0u8; COPY_CHUNK];
        let mut n = 0;
        let read = from.try_io(Interest::READABLE, || {
            n = recv(from, &mut buf)?;
            // A short read drained the socket. Saying "would block" makes
            // tokio clear the readiness, as its own `read` does, so the next
            // wait sleeps instead of calling `recv` to find nothing; `n`
            // keeps what was read.
            if n > 0 && n < COPY_CHUNK {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match read {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let mut sent = 0;
        while sent < n {
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        break (n, buf[sent..n].to_vec());
    };
    let mut sent = 0;
    while sent < unsent.len() {
        let m = to
            .async_io(Interest::WRITABLE, || send(to, &unsent[sent..]))
            .await?;
        if m == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += m;
    }
    Ok(n)
}

fn recv(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    socket::recv(from.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)
}

fn send(to: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    socket::send(to.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

/// One read from `from` into the pipe, and all of it on to `to`.
async fn splice_through(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    let n = from
        .async_io(Interest::READABLE, || {
            splice_nonblocking(from, &pipe.write, SPLICE_CHUNK)
        })
        .await?;
    let mut left = n;
    while left > 0 {
        let m = to
            .async_io(Interest::WRITABLE, || {
                splice_nonblocking(&pipe.read, to, left)
            })
            .await?;
        if m == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        left -= m;
    }
    Ok(n)
}

fn splice_nonblocking(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected pairs over loopback: (outer client, relay end a) and
    /// (relay end b, outer server).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            (c, s)
        }
        (pair().await, pair().await)
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_passes_half_close_on() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        let relay = tokio::spawn(async move { relay_tcp(&a, &b).await });
        // More than a pipe holds, so the relay has to wait for the reader.
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up, "client → server bytes");
        // The server still writes after the client's half-close.
        server.write_all(&down2).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(client_side.await.unwrap(), down, "server → client bytes");
        let (n_up, n_down) = relay.await.unwrap().unwrap();
        assert_eq!((n_up, n_down), (up.len() as u64, down.len() as u64));
    }

    /// Request and answer, sizes that switch the relay between copying and
    /// splicing both ways: every message arrives whole and in order.
    #[tokio::test]
    async fn messages_of_every_size_cross_in_order() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        let relay = tokio::spawn(async move { relay_tcp(&a, &b).await });
        let sizes = [1usize, 4096, 64, 200_000, 3, 4095, 70_000, 10, 4097, 1];
        let echo = tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate() {
                let mut got = vec![0u8; n];
                server.read_exact(&mut got).await.unwrap();
                assert!(got.iter().all(|&x| x == i as u8), "message {i} ({n} B)");
                // The answer: twice as long, so the other way switches too.
                server.write_all(&vec![!(i as u8); 2 * n]).await.unwrap();
            }
        });
        for (i, &n) in sizes.iter().enumerate() {
            client.write_all(&vec![i as u8; n]).await.unwrap();
            let mut got = vec![0u8; 2 * n];
            client.read_exact(&mut got).await.unwrap();
            assert!(got.iter().all(|&x| x == !(i as u8)), "answer {i} ({n} B)");
        }
        echo.await.unwrap();
        client.shutdown().await.unwrap();
        drop(client);
        let (up, down) = relay.await.unwrap().unwrap();
        let sent: usize = sizes.iter().sum();
        assert_eq!((up, down), (sent as u64, 2 * sent as u64));
    }

    /// Most flows wait most of the time: what a waiting relay keeps is its
    /// future's state, and that holds no copy buffer.
    #[tokio::test]
    async fn a_relay_keeps_no_copy_buffer_while_it_waits() {
        let ((_client, a), (b, _server)) = pairs().await;
        let relay = relay_tcp(&a, &b);
        let size = std::mem::size_of_val(&relay);
        assert!(
            size < COPY_CHUNK,
            "a relay's state is {size} bytes: a copy buffer is held across an await"
        );
    }

    /// Small messages to a reader that stops reading: the relay's writes
    /// would block part way, the rest waits in its own copy, and every byte
    /// arrives in order once the reader reads again.
    #[tokio::test]
    async fn small_messages_to_a_stalled_reader_arrive_whole() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        // Small buffers at the far end fill after a few messages.
        socket2::SockRef::from(&server)
            .set_recv_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&b)
            .set_send_buffer_size(4096)
            .unwrap();
        let relay = tokio::spawn(async move { relay_tcp(&a, &b).await });
        // 3000-byte messages: each read is short, so the relay copies.
        let messages: Vec<Vec<u8>> = (0..60u32)
            .map(|i| (0..3000u32).map(|j| ((i * 7 + j) % 253) as u8).collect())
            .collect();
        let expected: Vec<u8> = messages.concat();
        let writer = tokio::spawn(async move {
            for m in &messages {
                client.write_all(m).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            client
        });
        // Nobody reads for a while: the relay meets a full socket.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), expected.len(), "bytes through");
        assert!(got == expected, "bytes differ from what was sent");
        drop(server);
        drop(writer.await.unwrap());
        let (up, _) = relay.await.unwrap().unwrap();
        assert_eq!(up, expected.len() as u64);
    }

    /// Without pipes (out of descriptors) each direction copies: bulk and
    /// the half-close still cross.
    #[tokio::test]
    async fn without_a_pipe_bytes_are_copied() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        let relay = tokio::spawn(async move { one_way(&a, &b, None).await });
        let up: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == up, "bytes differ from what was sent");
        assert_eq!(relay.await.unwrap().unwrap(), up.len() as u64);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let ((client, a), (b, _server)) = pairs().await;
        let relay = tokio::spawn(async move { relay_tcp(&a, &b).await });
        client.set_zero_linger().unwrap();
        drop(client);
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("the relay ends after a reset")
            .unwrap();
        assert!(
            result.is_err(),
            "a reset is an error, not a clean close: {result:?}"
        );
    }
}
