//! The control channel's async shell: messages over any byte stream.
//!
//! The control session runs over a QUIC bidirectional stream today; the
//! WebSocket fallback will hand the same reader and writer a different
//! stream. Protocol decisions live in [`crate::protocol`], not here.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::FrameDecoder;
use crate::protocol::{Message, ProtocolError};

/// QUIC application close codes of the control connection, sent and read
/// by both agents: part of the wire contract.
pub mod close_code {
    /// The edge is shutting down (also a home-agent's probe, closing).
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the protocol; the reason says how.
    pub const PROTOCOL: u32 = 1;
    /// Another home-agent session took over the edge.
    pub const SUPERSEDED: u32 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads whole messages from a stream.
#[derive(Debug)]
pub struct MessageReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(inner: R) -> Self {
        MessageReader {
            inner,
            decoder: FrameDecoder::new(),
            buf: vec![0u8; 16 * 1024].into_boxed_slice(),
        }
    }

    /// The next message, or `None` when the peer closed the stream cleanly
    /// between messages. A stream closed inside a frame is an error.
    pub async fn next(&mut self) -> Result<Option<Message>, ControlError> {
        loop {
            if let Some(body) = self.decoder.next_frame().map_err(ProtocolError::from)? {
                return Ok(Some(Message::decode(&body)?));
            }
            let n = self.inner.read(&mut self.buf).await?;
            if n == 0 {
                if self.decoder.buffered() == 0 {
                    return Ok(None);
                }
                return Err(ControlError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "stream closed inside a frame",
                )));
            }
            self.decoder
                .feed(&self.buf[..n])
                .map_err(ProtocolError::from)?;
        }
    }
}

/// Writes one message as one frame.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), ControlError> {
    let mut bytes = Vec::new();
    msg.encode(&mut bytes)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}
