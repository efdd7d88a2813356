//! Moving a flow's bytes between two TCP connections: the public one and
//! its tunnel flow at the edge, the tunnel flow and the target at home.
//!
//! Bulk goes through a pipe with splice(2): the kernel hands socket pages
//! to the pipe and the pipe's pages to the other socket, so the bytes are
//! never copied into this process and back. That is two copies less per
//! byte and relay, where copying is most of what a relay costs. Small
//! messages (requests, replies, keystrokes) are copied: fewer and cheaper
//! system calls per message. A half-close is passed on: the end of one
//! side's stream becomes a write shutdown of the other. So is an abnormal
//! end: when the relay fails (a reset, a peer gone, a broken flow), both
//! connections are closed with a reset once what they hold has been
//! delivered, not with a clean end of stream that would pass a cut-off
//! answer off as whole.
//!
//! A framed flow (flow version 2, see [`crate::flow`]) is relayed by
//! [`relay_framed`]: the same copies and splices, with a length prefix
//! before each chunk that enters the tunnel and the prefixes taken out of
//! what leaves it. There the end of a stream is a frame, not a half-close
//! of the in-tunnel flow, which stays open for the next connection.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::sys::socket::{self, MsgFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::flow::{END_OF_STREAM, FINISHED, FrameDecoder, FrameEvent, MAX_FRAME, frame_header};

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
    let (a_to_b, b_to_a) = two_pipes();
    let moved = both_ways(
        one_way(a, b, a_to_b.as_ref()),
        one_way(b, a, b_to_a.as_ref()),
        [a, b],
    )
    .await;
    if moved.is_ok() {
        give_back([a_to_b, b_to_a]);
    }
    moved
}

/// Which end of a framed flow a relay runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSide {
    Edge,
    /// Sends [`FINISHED`] once both directions have ended.
    Home,
}

/// How a framed flow's connection ended: both directions cleanly.
#[derive(Debug)]
pub struct FramedEnd {
    /// Payload bytes plain → tunnel and tunnel → plain.
    pub sent: u64,
    pub received: u64,
    /// Tunnel bytes read past the peer's end-of-stream frame: the start of
    /// whatever the flow carries next.
    pub after_end: Vec<u8>,
}

/// Relays one connection over a framed flow until both directions have
/// ended: what `plain` sends goes into `tunnel` as frames, ended by an
/// end-of-stream frame when `plain` ends; frames from `tunnel` go to
/// `plain`, whose write side is shut down at the peer's end-of-stream frame.
/// `pending` holds tunnel bytes already read (those after the flow header).
/// At home, [`FINISHED`] follows once both directions have ended: with the
/// end-of-stream frame if the edge's came first (a client that closes
/// first, the usual case), else on its own.
///
/// A tunnel that ends before its end-of-stream frame is an error: the peer
/// gave up on the connection.
pub async fn relay_framed(
    plain: &TcpStream,
    tunnel: &TcpStream,
    pending: Vec<u8>,
    side: FlowSide,
) -> io::Result<FramedEnd> {
    let (out_pipe, in_pipe) = two_pipes();
    let inbound_ended = AtomicBool::new(false);
    let finish = (side == FlowSide::Home).then_some(&inbound_ended);
    let moved = both_ways(
        frame_out(plain, tunnel, out_pipe.as_ref(), finish),
        async {
            let r = unframe_in(tunnel, plain, in_pipe.as_ref(), pending).await;
            if r.is_ok() {
                inbound_ended.store(true, Ordering::Release);
            }
            r
        },
        [plain, tunnel],
    )
    .await;
    if moved.is_ok() {
        give_back([out_pipe, in_pipe]);
    }
    let ((sent, finished), (received, after_end)) = moved?;
    if side == FlowSide::Home && !finished {
        send_all(tunnel, &FINISHED, MsgFlags::empty()).await?;
    }
    Ok(FramedEnd {
        sent,
        received,
        after_end,
    })
}

/// How long the direction that outlives a failed write may take to deliver
/// the peer's last bytes: a client that does not read them (it is stuck
/// writing an upload no one reads any more) must not hold the relay. A
/// flat limit, as those bytes are usually a short answer (the refusal of
/// the upload).
const AFTER_WRITE_FAILURE: Duration = Duration::from_secs(5);

/// A failed relay resets a connection once its peer has acknowledged
/// everything written to it, or once that has made no progress for
/// [`DELIVERY_STALLED`], or after [`DELIVERY_AT_MOST`] in all: a slow
/// client still gets a whole answer, one that reads nothing does not hold
/// the relay.
const DELIVERY_STALLED: Duration = Duration::from_secs(5);
const DELIVERY_AT_MOST: Duration = Duration::from_secs(60);
/// How often a failed relay looks at what is still unacknowledged: every
/// 5 ms at first (the usual case, a peer that has it all within a round
/// trip, is reset at once), backing off to 100 ms.
const DELIVERY_POLL_FIRST: Duration = Duration::from_millis(5);
const DELIVERY_POLL_MAX: Duration = Duration::from_millis(100);

/// Runs a relay's two directions over the connections `ends` (the sources
/// of `a` and of `b`); the first error is the result, and then both
/// connections end with a reset (also when the other direction had already
/// ended well: a request, a half-close, then an answer cut off by the
/// target's abort).
///
/// A direction that cannot read its source ends the relay at once: the
/// other one might wait for that source forever. One that cannot write to
/// its peer leaves the other direction, which reads from that peer, to
/// deliver what the peer sent before it went: a server that refuses an
/// upload answers, then closes with the upload unread (a reset), and the
/// answer is queued ahead of the reset, as a direct client would get it.
async fn both_ways<A, B>(
    a: impl Future<Output = io::Result<A>>,
    b: impl Future<Output = io::Result<B>>,
    ends: [&TcpStream; 2],
) -> io::Result<(A, B)> {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let first = tokio::select! {
        r = &mut a => Ended::A(r),
        r = &mut b => Ended::B(r),
    };
    let [x, y] = ends;
    let failed = match first {
        Ended::A(Ok(a)) => match unless_fails(x, b).await {
            Ok(b) => return Ok((a, b)),
            Err(e) => e,
        },
        Ended::B(Ok(b)) => match unless_fails(y, a).await {
            Ok(a) => return Ok((a, b)),
            Err(e) => e,
        },
        Ended::A(Err(e)) => outlive(e, b).await,
        Ended::B(Err(e)) => outlive(e, a).await,
    };
    tokio::join!(reset_once_delivered(x), reset_once_delivered(y));
    Err(failed)
}

/// Runs `rest`, the direction still going after the other ended well, until
/// `quiet` fails: the ended direction's source, now only written to when
/// `rest` has something. A peer that half-closed and then went (reset, or
/// given up by keepalive: see [`crate::dead_peer`]) is noticed on its
/// socket, not at a next write that may never come, while the other side
/// is silent.
async fn unless_fails<T>(
    quiet: &TcpStream,
    rest: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let failure = quiet.async_io(Interest::ERROR, || match quiet.take_error() {
        Ok(Some(e)) | Err(e) => Ok(e),
        // Taken already (by a write of `rest`, which fails on its own).
        Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
    });
    tokio::select! {
        // A relay that has just ended well is not failed by a reset that
        // came in the same turn.
        biased;
        r = rest => r,
        e = failure => Err(e.unwrap_or_else(|e| e)),
    }
}

/// The direction that ended first in [`both_ways`].
enum Ended<A, B> {
    A(io::Result<A>),
    B(io::Result<B>),
}

/// After one direction failed with `first`: a failed write leaves `other`
/// up to [`AFTER_WRITE_FAILURE`] to deliver the peer's last bytes (it ends
/// with the peer's reset); anything else ends it at once.
async fn outlive<T>(first: io::Error, other: impl Future<Output = io::Result<T>>) -> io::Error {
    if is_write_failure(&first) {
        let _ = tokio::time::timeout(AFTER_WRITE_FAILURE, other).await;
    }
    first
}

/// Makes `stream` end with a reset when it is closed, once its peer has
/// acknowledged what was written to it (or that has stalled for
/// [`DELIVERY_STALLED`], or [`DELIVERY_AT_MOST`] has passed): the bytes a
/// service sent before it aborted still arrive ahead of the reset, as they
/// would with nothing between.
async fn reset_once_delivered(stream: &TcpStream) {
    let started = tokio::time::Instant::now();
    // The least seen unacknowledged (nothing is written any more, so it
    // only goes down), and when.
    let mut progress = (usize::MAX, started);
    let mut poll = DELIVERY_POLL_FIRST;
    // A connection already reset or closed acknowledges nothing more.
    while stream.peer_addr().is_ok() {
        let Ok(left) = crate::sockopt::unacknowledged(stream) else {
            break;
        };
        let now = tokio::time::Instant::now();
        if left < progress.0 {
            progress = (left, now);
        }
        if left == 0 || now - progress.1 >= DELIVERY_STALLED || now - started >= DELIVERY_AT_MOST {
            break;
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(DELIVERY_POLL_MAX);
    }
    reset_on_close(stream);
}

/// Makes closing `stream` send a reset (`SO_LINGER` 0) instead of a clean
/// end of stream: for a connection that ended abnormally, so that its peer
/// can tell. Whatever the peer has not acknowledged is dropped.
pub fn reset_on_close(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot make a connection's close a reset");
    }
}

/// A write that failed: the peer written to is gone (reset, timed out).
/// Marked so that [`both_ways`] can tell it from a failed read.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct WriteFailed(io::Error);

/// Marks a write's error (same kind, same message).
fn write_failed(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), WriteFailed(e))
}

fn is_write_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<WriteFailed>())
}

/// A pipe per direction, or none at all (out of descriptors): then both
/// directions copy.
fn two_pipes() -> (Option<Pipe>, Option<Pipe>) {
    match (Pipe::take(), Pipe::take()) {
        (Ok(x), Ok(y)) => (Some(x), Some(y)),
        (one, other) => {
            tracing::debug!("no pipe for splice; relaying by copy");
            for pipe in [one, other].into_iter().flatten() {
                pipe.give_back();
            }
            (None, None)
        }
    }
}

/// Both directions ran to their end, so both pipes are empty. After an
/// error a pipe may still hold bytes, and it is closed instead.
fn give_back(pipes: [Option<Pipe>; 2]) {
    for pipe in pipes.into_iter().flatten() {
        pipe.give_back();
    }
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

/// `from` → `to` until `from` ends, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Option<&Pipe>) -> io::Result<u64> {
    let total = pump(from, to, pipe, false).await?;
    // The other side sees end-of-stream after everything sent before it.
    shutdown_write(to)?;
    Ok(total)
}

fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(write_failed(e)),
    }
}

/// `from` → `to` as frames until `from` ends, then the end-of-stream frame;
/// `to` stays open. With `finish_if`, [`FINISHED`] goes with the
/// end-of-stream frame if the other direction has ended by then; says
/// whether it did.
async fn frame_out(
    from: &TcpStream,
    to: &TcpStream,
    pipe: Option<&Pipe>,
    finish_if: Option<&AtomicBool>,
) -> io::Result<(u64, bool)> {
    const END_AND_FINISHED: [u8; 4] =
        [END_OF_STREAM[0], END_OF_STREAM[1], FINISHED[0], FINISHED[1]];
    let total = pump(from, to, pipe, true).await?;
    let finished = finish_if.is_some_and(|ended| ended.load(Ordering::Acquire));
    let end: &[u8] = if finished {
        &END_AND_FINISHED
    } else {
        &END_OF_STREAM
    };
    send_all(to, end, MsgFlags::empty()).await?;
    Ok((total, finished))
}

/// `from` → `to` until `from` ends (behind frame prefixes if `framed`):
/// small reads by copy, and once a read fills the copy buffer, through the
/// pipe (if there is one) until a read comes back small again. Returns the
/// bytes moved.
///
/// The pipe is empty whenever `from` is read, so "would block" there means
/// `from` has nothing; while the pipe holds bytes only `to` is written, so
/// "would block" there means `to` is full. tokio's readiness covers both.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: Option<&Pipe>,
    framed: bool,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut copying = true;
    loop {
        // Readiness waits and `try_io` do not count against tokio's
        // cooperative budget: without this a busy flow whose reads and
        // writes never block would hold the agent's one thread (every other
        // flow, the tunnel, the other direction) for as long as its bytes
        // keep coming.
        tokio::task::consume_budget().await;
        let n = match pipe {
            Some(pipe) if !copying => splice_through(from, to, pipe, framed).await?,
            _ => copy_once(from, to, framed).await?,
        };
        if n == 0 {
            return Ok(total);
        }
        copying = n < COPY_CHUNK;
        total += n as u64;
    }
}

/// Waits for home's [`FINISHED`] after its end-of-stream frame; `after_end`
/// holds what was read past that frame. Anything else from home is an
/// error: the flow is not to be reused.
pub async fn await_finished(tunnel: &TcpStream, after_end: &[u8]) -> io::Result<()> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "home sent bytes after its end of stream",
        )
    };
    if after_end.len() > FINISHED.len() || after_end != &FINISHED[..after_end.len()] {
        return Err(bad());
    }
    let mut have = after_end.len();
    while have < FINISHED.len() {
        tunnel.readable().await?;
        let mut buf = [0u8; FINISHED.len()];
        let Some(n) = recv_ready(tunnel, &mut buf[..FINISHED.len() - have])? else {
            continue;
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "home closed the flow",
            ));
        }
        if buf[..n] != FINISHED[have..have + n] {
            return Err(bad());
        }
        have += n;
    }
    Ok(())
}

/// Frames from `from` → their payload to `to`, until the end-of-stream
/// frame; then half-closes `to` and returns the bytes read past that frame.
/// `pending` is decoded first.
///
/// Small frames are read [`COPY_CHUNK`] at a time and copied. The rest of
/// a long frame's payload is spliced, exactly as much as the frame has
/// left, so the splice never takes the next prefix; after a long frame
/// only the next prefix is read, so that its payload can be spliced too.
async fn unframe_in(
    from: &TcpStream,
    to: &TcpStream,
    pipe: Option<&Pipe>,
    mut pending: Vec<u8>,
) -> io::Result<(u64, Vec<u8>)> {
    let mut decoder = FrameDecoder::default();
    let mut total = 0u64;
    let mut unsent = Vec::new();
    let mut ended = deliver(&mut decoder, &mut pending, to, &mut unsent, &mut total)?;
    loop {
        send_all(to, &unsent, MsgFlags::empty()).await?;
        unsent.clear();
        if let Some(after_end) = ended {
            shutdown_write(to)?;
            return Ok((total, after_end));
        }
        tokio::task::consume_budget().await;
        let left = decoder.payload_left();
        if let Some(pipe) = pipe
            && left >= COPY_CHUNK
        {
            let n = splice_in(from, pipe, left.min(SPLICE_CHUNK)).await?;
            if n == 0 {
                return Err(ended_inside_frame());
            }
            splice_out(pipe, to, n).await?;
            decoder.take_payload(n);
            total += n as u64;
            continue;
        }
        let want = match decoder.prefix_missing() {
            m if m > 0 && pipe.is_some() && decoder.last_frame_len() >= COPY_CHUNK => m,
            _ => COPY_CHUNK,
        };
        ended = read_frames(from, to, want, &mut decoder, &mut unsent, &mut total).await?;
    }
}

/// One read of at most `want` bytes from `from`, decoded; payload written
/// to `to` as far as it takes it at once, the rest left in `unsent`.
/// The bytes after an end-of-stream frame, if one was read.
async fn read_frames(
    from: &TcpStream,
    to: &TcpStream,
    want: usize,
    decoder: &mut FrameDecoder,
    unsent: &mut Vec<u8>,
    total: &mut u64,
) -> io::Result<Option<Vec<u8>>> {
    loop {
        from.readable().await?;
        let mut buf = [0u8; COPY_CHUNK];
        let want = want.min(COPY_CHUNK);
        let Some(n) = recv_ready(from, &mut buf[..want])? else {
            continue;
        };
        if n == 0 {
            return Err(ended_inside_frame());
        }
        return deliver(decoder, &mut buf[..n], to, unsent, total);
    }
}

/// Decodes `bytes`: the payload, gathered in place over the prefixes so
/// that a read of many small frames is one write, goes to `to` (what it
/// does not take at once into `unsent`, behind anything already there).
/// The bytes after an end-of-stream frame, if `bytes` completes one.
fn deliver(
    decoder: &mut FrameDecoder,
    bytes: &mut [u8],
    to: &TcpStream,
    unsent: &mut Vec<u8>,
    total: &mut u64,
) -> io::Result<Option<Vec<u8>>> {
    let (mut read, mut payload) = (0, 0);
    let mut after_end = None;
    while read < bytes.len() {
        match decoder.decode(&bytes[read..]) {
            FrameEvent::Payload(n) => {
                bytes.copy_within(read..read + n, payload);
                payload += n;
                read += n;
            }
            FrameEvent::Prefix(n) => read += n,
            FrameEvent::End(n) => {
                after_end = Some(bytes[read + n..].to_vec());
                break;
            }
            FrameEvent::Empty => break,
        }
    }
    let payload = &bytes[..payload];
    *total += payload.len() as u64;
    let mut sent = 0;
    while unsent.is_empty() && sent < payload.len() {
        match to.try_write(&payload[sent..]) {
            Ok(m) => sent += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(write_failed(e)),
        }
    }
    unsent.extend_from_slice(&payload[sent..]);
    Ok(after_end)
}

fn frame_too_long() -> io::Error {
    io::Error::other("a chunk too long for one frame")
}

fn ended_inside_frame() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the tunnel flow ended before its end-of-stream frame",
    )
}

/// Writes all of `bytes` to `to`, waiting for room as needed.
async fn send_all(to: &TcpStream, bytes: &[u8], flags: MsgFlags) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        let m = to
            .async_io(Interest::WRITABLE, || send_flags(to, &bytes[sent..], flags))
            .await
            .map_err(write_failed)?;
        if m == 0 {
            return Err(write_failed(io::ErrorKind::WriteZero.into()));
        }
        sent += m;
    }
    Ok(())
}

/// One read of at most [`COPY_CHUNK`] bytes from `from`, all of it written
/// to `to` (behind a frame's length prefix if `framed`); the bytes read
/// (0 at end of stream, and nothing written).
///
/// The copy buffer is on the stack and never held across an `.await`, so a
/// waiting flow (most flows, most of the time) keeps no buffer: a relay's
/// state is a few hundred bytes, not 8 KiB. Only what `to` cannot take at
/// once is kept, in a heap copy, until it can.
async fn copy_once(from: &TcpStream, to: &TcpStream, framed: bool) -> io::Result<usize> {
    let at = if framed { END_OF_STREAM.len() } else { 0 };
    let (n, unsent) = loop {
        from.readable().await?;
        let mut buf = [0u8; END_OF_STREAM.len() + COPY_CHUNK];
        let Some(n) = recv_ready(from, &mut buf[at..at + COPY_CHUNK])? else {
            continue;
        };
        if n == 0 {
            return Ok(0);
        }
        if framed {
            buf[..at].copy_from_slice(&frame_header(n).ok_or_else(frame_too_long)?);
        }
        let out = &buf[..at + n];
        let mut sent = 0;
        while sent < out.len() {
            match to.try_write(&out[sent..]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(write_failed(e)),
            }
        }
        break (n, out[sent..].to_vec());
    };
    send_all(to, &unsent, MsgFlags::empty()).await?;
    Ok(n)
}

/// One `recv` into `buf` on a socket tokio found readable: the bytes read
/// (0 at end of stream), or `None` if there were none after all (tokio has
/// cleared the readiness; wait again).
fn recv_ready(from: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut n = 0;
    let read = from.try_io(Interest::READABLE, || {
        n = recv(from, buf)?;
        // A short read drained the socket. Saying "would block" makes
        // tokio clear the readiness, as its own `read` does, so the next
        // wait sleeps instead of calling `recv` to find nothing; `n`
        // keeps what was read.
        if n > 0 && n < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match read {
        Ok(()) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn recv(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    socket::recv(from.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)
}

fn send_flags(to: &TcpStream, buf: &[u8], flags: MsgFlags) -> io::Result<usize> {
    socket::send(to.as_raw_fd(), buf, flags | MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

/// One read from `from` into the pipe, and all of it on to `to`; if
/// `framed`, behind a frame's length prefix, sent with MSG_MORE so that it
/// leaves in the same segment as the payload.
async fn splice_through(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    framed: bool,
) -> io::Result<usize> {
    let n = splice_in(from, pipe, if framed { MAX_FRAME } else { SPLICE_CHUNK }).await?;
    if n > 0 && framed {
        // nix's MsgFlags does not name MSG_MORE.
        let more = MsgFlags::from_bits_retain(nix::libc::MSG_MORE);
        let prefix = frame_header(n).ok_or_else(frame_too_long)?;
        send_all(to, &prefix, more).await?;
    }
    splice_out(pipe, to, n).await?;
    Ok(n)
}

/// One splice of at most `len` bytes from `from` into the empty pipe.
async fn splice_in(from: &TcpStream, pipe: &Pipe, len: usize) -> io::Result<usize> {
    from.async_io(Interest::READABLE, || {
        splice_nonblocking(from, &pipe.write, len)
    })
    .await
}

/// All `n` bytes in the pipe on to `to`.
async fn splice_out(pipe: &Pipe, to: &TcpStream, n: usize) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        let m = to
            .async_io(Interest::WRITABLE, || {
                splice_nonblocking(&pipe.read, to, left)
            })
            .await
            .map_err(write_failed)?;
        if m == 0 {
            return Err(write_failed(io::ErrorKind::WriteZero.into()));
        }
        left -= m;
    }
    Ok(())
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

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Two connected pairs over loopback: (outer client, relay end a) and
    /// (relay end b, outer server).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        (pair().await, pair().await)
    }

    /// One connection across a framed flow, as edge and home relay it:
    /// client → [relay_framed] → tunnel → [relay_framed] → server. `up` goes
    /// to the server, which answers with `down` after the client's
    /// half-close. Both relays must end cleanly with nothing after the end.
    async fn across_framed_flow(
        tunnel: (&TcpStream, &TcpStream),
        up: Vec<u8>,
        down: Vec<u8>,
    ) -> (FramedEnd, FramedEnd) {
        let (mut client, edge_plain) = pair().await;
        let (home_plain, mut server) = pair().await;
        let client_side = async {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert!(
                got == down,
                "server → client: {} of {} bytes, or differing",
                got.len(),
                down.len()
            );
        };
        let server_side = async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert!(
                got == up,
                "client → server: {} of {} bytes, or differing",
                got.len(),
                up.len()
            );
            server.write_all(&down).await.unwrap();
            server.shutdown().await.unwrap();
        };
        let (edge, home, (), ()) = tokio::join!(
            relay_framed(&edge_plain, tunnel.0, Vec::new(), FlowSide::Edge),
            relay_framed(&home_plain, tunnel.1, Vec::new(), FlowSide::Home),
            client_side,
            server_side
        );
        let (edge, home) = (edge.unwrap(), home.unwrap());
        await_finished(tunnel.0, &edge.after_end)
            .await
            .expect("home finished the connection");
        (edge, home)
    }

    /// Connections one after the other over one in-tunnel flow, with sizes
    /// that make both ends copy, splice and switch between them.
    #[tokio::test]
    async fn a_framed_flow_carries_one_connection_after_another() {
        let (t_edge, t_home) = pair().await;
        let cases = [
            (0usize, 0usize),
            (64, 64),
            (1, 3_000_000),
            (2_500_000, 10),
            (70_000, 65_535),
            (4096, 4097),
        ];
        for (i, (up_len, down_len)) in cases.into_iter().enumerate() {
            let up: Vec<u8> = (0..up_len).map(|j| ((i * 31 + j) % 251) as u8).collect();
            let down: Vec<u8> = (0..down_len).map(|j| ((i * 17 + j) % 241) as u8).collect();
            let (edge, home) = across_framed_flow((&t_edge, &t_home), up, down).await;
            assert_eq!(
                (edge.sent, edge.received),
                (up_len as u64, down_len as u64),
                "connection {i} at the edge"
            );
            assert_eq!(
                (home.sent, home.received),
                (down_len as u64, up_len as u64),
                "connection {i} at home"
            );
            assert!(
                home.after_end.is_empty(),
                "connection {i}: bytes after the edge's end"
            );
        }
    }

    /// Small frames to a server that stops reading: home's writes would
    /// block part way, and every byte still arrives in order.
    #[tokio::test]
    async fn small_frames_to_a_stalled_reader_arrive_whole() {
        let (t_edge, t_home) = pair().await;
        let (mut client, edge_plain) = pair().await;
        let (home_plain, mut server) = pair().await;
        recv_buffer(&server, 4096);
        send_buffer(&home_plain, 4096);
        let messages: Vec<Vec<u8>> = (0..60u32)
            .map(|i| (0..3000u32).map(|j| ((i * 7 + j) % 253) as u8).collect())
            .collect();
        let expected: Vec<u8> = messages.concat();
        let writer = async {
            for m in &messages {
                client.write_all(m).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        };
        let reader = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert!(
                got == expected,
                "{} of {} bytes, or differing",
                got.len(),
                expected.len()
            );
            server.shutdown().await.unwrap();
        };
        let (edge, home, (), ()) = tokio::join!(
            relay_framed(&edge_plain, &t_edge, Vec::new(), FlowSide::Edge),
            relay_framed(&home_plain, &t_home, Vec::new(), FlowSide::Home),
            writer,
            reader
        );
        assert_eq!(edge.unwrap().sent, expected.len() as u64);
        assert_eq!(home.unwrap().received, expected.len() as u64);
    }

    /// A target that answers and closes its side first, then reads the
    /// upload slowly: home's end-of-stream frame comes early, but its
    /// FINISHED only once home has handed the target every byte (all but
    /// what the two socket buffers hold has been read). Until then
    /// the edge must not put the next connection on the flow.
    #[tokio::test]
    async fn home_finishes_only_when_the_target_has_everything() {
        use std::sync::atomic::AtomicUsize;
        let (t_edge, t_home) = pair().await;
        let (mut client, edge_plain) = pair().await;
        let (home_plain, mut server) = pair().await;
        recv_buffer(&server, 64 * 1024);
        send_buffer(&home_plain, 64 * 1024);
        const SLACK: usize = 1024 * 1024;
        let up: Vec<u8> = (0..4_000_000u32).map(|i| (i % 249) as u8).collect();
        let taken = AtomicUsize::new(0);
        let client_side = async {
            client.write_all(&up).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"early answer");
        };
        let server_side = async {
            server.write_all(b"early answer").await.unwrap();
            server.shutdown().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                taken.store(got.len(), Ordering::Release);
            }
            assert!(
                got == up,
                "{} of {} bytes, or differing",
                got.len(),
                up.len()
            );
        };
        let edge_side = async {
            let end = relay_framed(&edge_plain, &t_edge, Vec::new(), FlowSide::Edge)
                .await
                .unwrap();
            await_finished(&t_edge, &end.after_end).await.unwrap();
            let taken = taken.load(Ordering::Acquire);
            assert!(
                taken + SLACK >= up.len(),
                "home said FINISHED when the target had read {taken} of {} bytes",
                up.len()
            );
        };
        let (home, (), (), ()) = tokio::join!(
            relay_framed(&home_plain, &t_home, Vec::new(), FlowSide::Home),
            edge_side,
            client_side,
            server_side
        );
        assert_eq!(home.unwrap().received, up.len() as u64);
    }

    /// Many small frames read at once (gathered into one write) reach the
    /// target whole and in order; home's end and FINISHED follow.
    #[tokio::test]
    async fn many_small_frames_cross_in_order() {
        let (plain, mut server) = pair().await;
        let (tunnel, mut peer) = pair().await;
        let mut wire = Vec::new();
        for i in 0..200u8 {
            wire.extend_from_slice(&frame_header(1).unwrap());
            wire.push(i);
        }
        wire.extend_from_slice(&END_OF_STREAM);
        peer.write_all(&wire).await.unwrap();
        server.shutdown().await.unwrap();
        let end = relay_framed(&plain, &tunnel, Vec::new(), FlowSide::Home)
            .await
            .unwrap();
        assert_eq!(end.received, 200);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, (0..200u8).collect::<Vec<_>>());
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [END_OF_STREAM, FINISHED].concat()[..]);
    }

    /// Anything from home after its end but FINISHED, or a closed flow,
    /// keeps the flow from being reused.
    #[tokio::test]
    async fn only_finished_may_follow_home_s_end() {
        let (tunnel, mut peer) = pair().await;
        assert!(await_finished(&tunnel, &[0, 0, 1]).await.is_err());
        assert!(await_finished(&tunnel, &[1]).await.is_err());
        peer.write_all(&[0, 7]).await.unwrap();
        assert!(await_finished(&tunnel, &[]).await.is_err());
        let (tunnel, mut peer) = pair().await;
        peer.write_all(&[0]).await.unwrap();
        await_finished(&tunnel, &[0])
            .await
            .expect("the rest of FINISHED");
        drop(peer);
        assert!(await_finished(&tunnel, &[]).await.is_err(), "closed");
    }

    /// What follows the peer's end of stream (the next connection's header)
    /// is handed back, not delivered.
    #[tokio::test]
    async fn bytes_after_the_end_are_handed_back() {
        let (plain, mut server) = pair().await;
        let (tunnel, mut peer) = pair().await;
        let mut wire = frame_header(5).unwrap().to_vec();
        wire.extend_from_slice(b"hello");
        wire.extend_from_slice(&END_OF_STREAM);
        wire.extend_from_slice(b"next");
        peer.write_all(&wire).await.unwrap();
        server.shutdown().await.unwrap();
        let end = relay_framed(&plain, &tunnel, b"".to_vec(), FlowSide::Edge)
            .await
            .unwrap();
        assert_eq!(end.received, 5);
        assert_eq!(end.after_end, b"next");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        let mut back = [0u8; 2];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(
            back, END_OF_STREAM,
            "the server's end went into the tunnel as a frame"
        );
    }

    /// The peer closing the flow before its end-of-stream frame means it
    /// gave up: an error, so the flow is not reused.
    #[tokio::test]
    async fn a_flow_closed_inside_a_frame_is_an_error() {
        for cut in [0usize, 1, 4] {
            let (plain, _server) = pair().await;
            let (tunnel, mut peer) = pair().await;
            let mut wire = frame_header(100).unwrap().to_vec();
            wire.extend_from_slice(&[7; 100]);
            peer.write_all(&wire[..cut]).await.unwrap();
            drop(peer);
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                relay_framed(&plain, &tunnel, Vec::new(), FlowSide::Home),
            )
            .await
            .expect("the relay ends when the flow does");
            let err = r.expect_err("a flow without its end is an error");
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "cut at {cut}: {err}"
            );
        }
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
        let framed = relay_framed(&a, &b, Vec::new(), FlowSide::Home);
        let size = std::mem::size_of_val(&framed);
        assert!(
            size < COPY_CHUNK,
            "a framed relay's state is {size} bytes: a copy buffer is held across an await"
        );
    }

    /// Small messages to a reader that stops reading: the relay's writes
    /// would block part way, the rest waits in its own copy, and every byte
    /// arrives in order once the reader reads again.
    #[tokio::test]
    async fn small_messages_to_a_stalled_reader_arrive_whole() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        // Small buffers at the far end fill after a few messages.
        recv_buffer(&server, 4096);
        send_buffer(&b, 4096);
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

    /// A server that refuses an upload: it answers, then resets (closes with
    /// the upload unread). The relay meets the reset first when it passes the
    /// upload on, before it has read the answer; the answer must still reach
    /// the client, as it would with nothing between them.
    async fn answer_then_reset() -> (TcpStream, TcpStream, TcpStream) {
        let (mut client, near) = pair().await;
        let (far, mut server) = pair().await;
        client.write_all(b"an upload").await.unwrap();
        server.write_all(b"refused").await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        (client, near, far)
    }

    /// Asks for a socket buffer of about `bytes` (the kernel doubles it).
    fn recv_buffer(s: &TcpStream, bytes: usize) {
        socket2::SockRef::from(s)
            .set_recv_buffer_size(bytes)
            .unwrap();
    }

    fn send_buffer(s: &TcpStream, bytes: usize) {
        socket2::SockRef::from(s)
            .set_send_buffer_size(bytes)
            .unwrap();
    }

    #[tokio::test]
    async fn an_answer_sent_before_a_reset_is_delivered() {
        let (mut client, near, far) = answer_then_reset().await;
        let result = tokio::time::timeout(Duration::from_secs(10), relay_tcp(&near, &far))
            .await
            .expect("the relay ends");
        assert!(result.is_err(), "the reset is an error: {result:?}");
        drop(near);
        assert_eq!(read_to_the_end(&mut client).await.0, b"refused");
    }

    #[tokio::test]
    async fn an_answer_sent_before_a_reset_is_delivered_across_a_framed_flow() {
        let (mut client, edge_plain, home_plain) = answer_then_reset().await;
        let (t_edge, t_home) = pair().await;
        let home = async {
            let result = relay_framed(&home_plain, &t_home, Vec::new(), FlowSide::Home).await;
            // As home does after an error: the flow is not reused.
            drop(t_home);
            result
        };
        let edge = async {
            let result = relay_framed(&edge_plain, &t_edge, Vec::new(), FlowSide::Edge).await;
            drop(edge_plain);
            result
        };
        // The client reads until the end, then closes, which ends the edge's
        // relay if home's end-of-stream frame came first.
        let client_side = async {
            let got = read_to_the_end(&mut client).await.0;
            drop(client);
            got
        };
        let (_, home, got) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(edge, home, client_side)
        })
        .await
        .expect("both relays end");
        assert!(home.is_err(), "the reset is an error at home: {home:?}");
        assert_eq!(got, b"refused");
    }

    /// The same, with a client that reads nothing (stuck writing its
    /// upload) and more answer than the sockets between hold: the relay gives
    /// up on delivering it rather than wait for the client forever (its
    /// grace for the other direction, then as long as delivery may stall).
    #[tokio::test]
    async fn an_answer_no_one_reads_does_not_hold_the_relay() {
        let (mut client, near) = pair().await;
        let (far, server) = pair().await;
        recv_buffer(&client, 4096);
        send_buffer(&near, 4096);
        client.write_all(b"an upload").await.unwrap();
        // As much answer as the server's socket takes, then the reset.
        let answer = vec![7u8; 64 * 1024];
        let mut queued = 0;
        loop {
            match server.try_write(&answer) {
                Ok(n) => queued += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("writing the answer: {e}"),
            }
        }
        // More than the client's receive buffer and the relay's send buffer
        // hold (the kernel doubles the 4 KiB asked for: about 8 KiB each).
        assert!(queued > 32 * 1024, "only {queued} bytes of answer queued");
        server.set_zero_linger().unwrap();
        drop(server);
        let started = tokio::time::Instant::now();
        let limit = AFTER_WRITE_FAILURE + DELIVERY_STALLED + Duration::from_secs(5);
        let result = tokio::time::timeout(limit, relay_tcp(&near, &far))
            .await
            .expect("the relay gives up within its grace");
        assert!(
            result.is_err(),
            "an answer not delivered is an error: {result:?}"
        );
        // It was stuck (the answer did not fit) and waited out its grace.
        assert!(
            started.elapsed() >= AFTER_WRITE_FAILURE,
            "the relay ended before its grace: the answer fit after all"
        );
    }

    /// A spawned relay's result, once it has ended (its own limits end it
    /// within about a minute).
    async fn ended<T>(relay: tokio::task::JoinHandle<T>) -> T {
        tokio::time::timeout(Duration::from_secs(90), relay)
            .await
            .expect("the relay did not end")
            .unwrap()
    }

    /// Reads until the end of the stream or an error: what was read, and
    /// how it ended.
    async fn read_to_the_end(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Err(_) => return (got, Err(io::ErrorKind::TimedOut.into())),
                Ok(Ok(0)) => return (got, Ok(())),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return (got, Err(e)),
            }
        }
    }

    fn assert_reset(end: &io::Result<()>, what: &str) {
        assert!(
            matches!(end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{what}: {end:?}, not a reset"
        );
    }

    /// A server that sends part of an answer, then aborts (a reset, with
    /// nothing of the client's unread).
    async fn part_then_abort() -> (TcpStream, TcpStream, TcpStream) {
        let (client, near) = pair().await;
        let (far, mut server) = pair().await;
        server.write_all(b"part of an answer").await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        (client, near, far)
    }

    /// The client gets the part, then the reset: a clean end of stream
    /// would pass the part off as the whole answer.
    #[tokio::test]
    async fn an_abort_is_passed_on_as_a_reset() {
        let (mut client, near, far) = part_then_abort().await;
        let result = tokio::time::timeout(Duration::from_secs(10), relay_tcp(&near, &far))
            .await
            .expect("the relay ends");
        assert!(result.is_err(), "the abort is an error: {result:?}");
        drop((near, far));
        let (got, end) = read_to_the_end(&mut client).await;
        assert_eq!(got, b"part of an answer");
        assert_reset(&end, "the client sees the abort");
    }

    #[tokio::test]
    async fn an_abort_is_passed_on_as_a_reset_across_a_framed_flow() {
        let (mut client, edge_plain, home_plain) = part_then_abort().await;
        let (t_edge, t_home) = pair().await;
        let home = async move {
            let r = relay_framed(&home_plain, &t_home, Vec::new(), FlowSide::Home).await;
            drop((home_plain, t_home));
            r
        };
        let edge = async move {
            let r = relay_framed(&edge_plain, &t_edge, Vec::new(), FlowSide::Edge).await;
            drop((edge_plain, t_edge));
            r
        };
        let (edge, home, (got, end)) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(edge, home, read_to_the_end(&mut client))
        })
        .await
        .expect("both relays end");
        assert!(home.is_err(), "the abort is an error at home: {home:?}");
        assert!(edge.is_err(), "and at the edge: {edge:?}");
        assert_eq!(got, b"part of an answer");
        assert_reset(&end, "the client sees the abort");
    }

    /// The server sends `answer`, then aborts once the relay's socket has
    /// all of it (an abort drops what the server has not sent yet).
    async fn answer_then_abort(mut server: TcpStream, answer: &[u8]) {
        server.write_all(answer).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while crate::sockopt::unacknowledged(&server).unwrap() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the relay's socket took the whole answer");
        server.set_zero_linger().unwrap();
    }

    /// An answer larger than what a slow client has room for: the reset
    /// waits until the client has all of it, as it would have had all of it
    /// before the reset with nothing between.
    #[tokio::test]
    async fn a_slow_client_gets_the_whole_answer_before_the_reset() {
        let (mut client, near) = pair().await;
        let (far, server) = pair().await;
        recv_buffer(&client, 4096);
        let answer: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        answer_then_abort(server, &answer).await;
        let relay = tokio::spawn(async move { relay_tcp(&near, &far).await });
        // Most of the answer waits in the relay's socket, unacknowledged.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (got, end) = read_to_the_end(&mut client).await;
        assert!(
            got == answer,
            "{} of {} bytes arrived",
            got.len(),
            answer.len()
        );
        assert_reset(&end, "the client sees the abort");
        assert!(ended(relay).await.is_err());
    }

    /// A client that reads slowly but steadily, for longer than delivery
    /// may stall: it still gets the whole answer before the reset.
    #[tokio::test]
    async fn a_reader_slower_than_the_stall_limit_gets_everything() {
        let (mut client, near) = pair_with_link_segments().await;
        let (far, server) = pair().await;
        recv_buffer(&client, 4096);
        // Room for the whole answer in the relay's socket: the relay meets
        // the abort at once, and the slow reading is all delivery wait.
        send_buffer(&near, 256 * 1024);
        let answer: Vec<u8> = (0..48 * 1024u32).map(|i| (i % 253) as u8).collect();
        answer_then_abort(server, &answer).await;
        let relay = tokio::spawn(async move { relay_tcp(&near, &far).await });
        let started = tokio::time::Instant::now();
        let mut got = Vec::new();
        let end = loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut buf = [0u8; 2048];
            let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf));
            match read.await.expect("the relay stopped delivering") {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        assert!(
            started.elapsed() > DELIVERY_STALLED,
            "the client read faster than the test means"
        );
        assert!(
            got == answer,
            "{} of {} bytes arrived",
            got.len(),
            answer.len()
        );
        assert_reset(&end, "the client sees the abort");
        assert!(ended(relay).await.is_err());
    }

    /// A connection with the segments of a real link (MSS 1400, not
    /// loopback's 64 KiB): a reader that frees a little of a small buffer
    /// then opens the window at once, instead of leaving the sender to
    /// probe a closed one at ever longer intervals.
    async fn pair_with_link_segments() -> (TcpStream, TcpStream) {
        let link = |s: &tokio::net::TcpSocket| socket2::SockRef::from(s).set_tcp_mss(1400).unwrap();
        let l = tokio::net::TcpSocket::new_v4().unwrap();
        link(&l);
        l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = l.listen(1).unwrap();
        let c = tokio::net::TcpSocket::new_v4().unwrap();
        link(&c);
        let c = c.connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Relays `near` (the client's end) to `far` (the server's end) as the
    /// agents do, each relay dropping its connections when it ends: `Raw`,
    /// one relay; `Framed`, an edge and a home relay over a framed flow.
    /// Whether every relay ended well.
    async fn relayed(framed: bool, near: TcpStream, far: TcpStream) -> bool {
        if !framed {
            return relay_tcp(&near, &far).await.is_ok();
        }
        let (t_edge, t_home) = pair().await;
        let edge = async move {
            let r = relay_framed(&near, &t_edge, Vec::new(), FlowSide::Edge).await;
            drop((near, t_edge));
            r
        };
        let home = async move {
            let r = relay_framed(&far, &t_home, Vec::new(), FlowSide::Home).await;
            drop((far, t_home));
            r
        };
        let (edge, home) = tokio::join!(edge, home);
        edge.is_ok() && home.is_ok()
    }

    /// A request, the client's half-close, an answer, the server's abort:
    /// the direction that ended well does not keep the other's abort from
    /// reaching the client, after the answer.
    #[tokio::test]
    async fn an_abort_after_a_half_close_is_passed_on() {
        for framed in [false, true] {
            let ((mut client, near), (far, mut server)) = pairs().await;
            let relay = tokio::spawn(relayed(framed, near, far));
            client.write_all(b"a request").await.unwrap();
            client.shutdown().await.unwrap();
            let (request, end) = read_to_the_end(&mut server).await;
            assert_eq!(request, b"a request");
            end.expect("the half-close arrives as one");
            server.write_all(b"an answer, cut").await.unwrap();
            server.set_zero_linger().unwrap();
            drop(server);
            let (got, end) = read_to_the_end(&mut client).await;
            assert_eq!(got, b"an answer, cut", "framed: {framed}");
            assert_reset(
                &end,
                &format!("framed: {framed}: the client sees the abort"),
            );
            assert!(!ended(relay).await, "framed: {framed}: the relay failed");
        }
    }

    /// The other order: the server has said all and half-closed, then the
    /// client aborts; the server sees the reset.
    #[tokio::test]
    async fn a_client_s_abort_after_the_server_s_half_close_reaches_it() {
        for framed in [false, true] {
            let ((mut client, near), (far, mut server)) = pairs().await;
            let relay = tokio::spawn(relayed(framed, near, far));
            server.write_all(b"all I had").await.unwrap();
            server.shutdown().await.unwrap();
            let (got, end) = read_to_the_end(&mut client).await;
            assert_eq!(got, b"all I had");
            end.expect("the half-close arrives as one");
            client.set_zero_linger().unwrap();
            drop(client);
            let (_, end) = read_to_the_end(&mut server).await;
            assert_reset(
                &end,
                &format!("framed: {framed}: the server sees the abort"),
            );
            assert!(!ended(relay).await, "framed: {framed}: the relay failed");
        }
    }

    /// A client that half-closes and then goes (an abort here; a client
    /// given up by keepalive is the same error on its socket) while the
    /// server says nothing: the relay notices on the client's socket, not
    /// at a next write that may never come, and resets the server.
    #[tokio::test]
    async fn a_half_closed_peer_that_goes_is_noticed_while_the_other_is_silent() {
        for framed in [false, true] {
            let ((mut client, near), (far, mut server)) = pairs().await;
            let relay = tokio::spawn(relayed(framed, near, far));
            client.write_all(b"a request").await.unwrap();
            client.shutdown().await.unwrap();
            let (request, end) = read_to_the_end(&mut server).await;
            assert_eq!(request, b"a request");
            end.expect("the half-close arrives as one");
            client.set_zero_linger().unwrap();
            drop(client);
            let relay_ok = tokio::time::timeout(Duration::from_secs(10), relay)
                .await
                .unwrap_or_else(|_| panic!("framed: {framed}: the relay waited on a silent server"))
                .unwrap();
            assert!(!relay_ok, "framed: {framed}: the relay failed");
            // After its half-close the server's reads say no more; a reset
            // shows as the connection being gone.
            let mut waited = Duration::ZERO;
            while server.peer_addr().is_ok() && waited < Duration::from_secs(2) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                waited += Duration::from_millis(20);
            }
            assert!(
                server.peer_addr().is_err(),
                "framed: {framed}: the server's connection was not reset"
            );
        }
    }

    /// The other way: a client's abort reaches the server as one, after the
    /// request it sent before it.
    #[tokio::test]
    async fn a_client_s_abort_reaches_the_server() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        let relay = tokio::spawn(async move { relay_tcp(&a, &b).await });
        client.write_all(b"a request").await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        let (got, end) = read_to_the_end(&mut server).await;
        assert_eq!(got, b"a request");
        assert_reset(&end, "the server sees the abort");
        assert!(ended(relay).await.is_err());
    }

    /// A clean close stays one: the relay resets nothing that ended well.
    #[tokio::test]
    async fn a_clean_close_is_not_a_reset() {
        let ((mut client, a), (b, mut server)) = pairs().await;
        let relay = tokio::spawn(async move { relay_tcp(&a, &b).await });
        server.write_all(b"the whole answer").await.unwrap();
        drop(server);
        let (got, end) = read_to_the_end(&mut client).await;
        assert_eq!(got, b"the whole answer");
        assert!(end.is_ok(), "a clean end of stream: {end:?}");
        drop(client);
        ended(relay).await.expect("a clean relay");
    }
}
