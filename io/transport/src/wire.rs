//! Frames over a QUIC stream: spoke-proto does the bytes, this does the awaiting.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use spoke_proto::{DecodeError, EncodeError, Frame, FrameHeader, Limits, HEADER_LEN};

/// A frame body buffer starts at most this large and grows with the bytes that arrive, so a
/// peer that declares a large frame and stalls holds little memory.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream read: {}", with_causes(.0))]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write: {}", with_causes(.0))]
    Write(#[from] quinn::WriteError),
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode frame: {0}")]
    Encode(#[from] EncodeError),
    #[error("peer sent nothing for {0:?}")]
    Stalled(Duration),
}

/// `error` and what caused it: quinn's "connection lost" alone does not say whether the peer
/// closed it (and why), reset it, or went silent, which is what an operator needs to know.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

impl From<quinn::ReadError> for WireError {
    fn from(error: quinn::ReadError) -> Self {
        WireError::Read(quinn::ReadExactError::ReadError(error))
    }
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly between frames.
/// The length is checked against `limits` before the body is allocated.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
) -> Result<Option<Frame>, WireError> {
    read(recv, limits, None, None).await
}

/// As [`read_frame`], but each wait for more bytes, between frames or inside one, ends after
/// `stall` with [`WireError::Stalled`].
pub async fn read_frame_within(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
    stall: Duration,
) -> Result<Option<Frame>, WireError> {
    read(recv, limits, Some(stall), Some(stall)).await
}

/// As [`read_frame_within`], but the wait for a frame to begin is unbounded: for a stream that
/// may rightly stay quiet (a data stream whose partitions have nothing to send) while the
/// connection's liveness is watched elsewhere. Once a frame has begun, each wait for more of
/// it ends after `stall`.
pub async fn read_frame_when_it_comes(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
    stall: Duration,
) -> Result<Option<Frame>, WireError> {
    read(recv, limits, None, Some(stall)).await
}

async fn read(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
    between_frames: Option<Duration>,
    inside_frame: Option<Duration>,
) -> Result<Option<Frame>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let stall = if filled == 0 {
            between_frames
        } else {
            inside_frame
        };
        let Some(chunk) = next_chunk(recv, HEADER_LEN - filled, stall).await? else {
            if filled == 0 {
                return Ok(None);
            }
            return Err(quinn::ReadExactError::FinishedEarly(filled).into());
        };
        header[filled..filled + chunk.len()].copy_from_slice(&chunk);
        filled += chunk.len();
    }
    let header = FrameHeader::decode(&header, limits)?;
    let len = header.body_len as usize;
    let mut body = BytesMut::with_capacity(len.min(INITIAL_BODY_CAPACITY));
    while body.len() < len {
        let Some(chunk) = next_chunk(recv, len - body.len(), inside_frame).await? else {
            return Err(quinn::ReadExactError::FinishedEarly(body.len()).into());
        };
        body.extend_from_slice(&chunk);
    }
    Ok(Some(Frame::decode_body(&header, body.freeze())?))
}

/// At most `max` bytes in order; `None` once the stream is finished.
async fn next_chunk(
    recv: &mut quinn::RecvStream,
    max: usize,
    stall: Option<Duration>,
) -> Result<Option<Bytes>, WireError> {
    let read = recv.read_chunk(max, true);
    let chunk = match stall {
        Some(stall) => tokio::time::timeout(stall, read)
            .await
            .map_err(|_| WireError::Stalled(stall))??,
        None => read.await?,
    };
    Ok(chunk.map(|chunk| chunk.bytes))
}

pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), WireError> {
    let bytes = frame.to_bytes()?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// As [`write_frame`], but a peer that takes none of it for `stall` (flow control) is
/// [`WireError::Stalled`]; the frame may then be partly sent, so the stream is done for.
pub async fn write_frame_within(
    send: &mut quinn::SendStream,
    frame: Frame,
    stall: Duration,
) -> Result<(), WireError> {
    tokio::time::timeout(stall, write_frame(send, &frame))
        .await
        .map_err(|_| WireError::Stalled(stall))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_says_how_it_was_lost() {
        let reset = WireError::from(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::Reset,
        ));
        assert_eq!(
            reset.to_string(),
            "stream read: connection lost: reset by peer"
        );
        let silent = WireError::Write(quinn::WriteError::ConnectionLost(
            quinn::ConnectionError::TimedOut,
        ));
        assert_eq!(
            silent.to_string(),
            "stream write: connection lost: timed out"
        );
    }
}
