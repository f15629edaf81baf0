//! Frames over a QUIC stream: spoke-proto does the bytes, this does the awaiting.

use bytes::{Bytes, BytesMut};
use spoke_proto::{DecodeError, EncodeError, Frame, FrameHeader, Limits, HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode frame: {0}")]
    Encode(#[from] EncodeError),
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly between frames.
/// The length is checked against `limits` before the body is allocated.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    limits: &Limits,
) -> Result<Option<Frame>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let header = FrameHeader::decode(&header, limits)?;
    let mut body = BytesMut::zeroed(header.body_len as usize);
    recv.read_exact(&mut body).await?;
    Ok(Some(Frame::decode_body(&header, Bytes::from(body))?))
}

pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), WireError> {
    let bytes = frame.to_bytes()?;
    send.write_all(&bytes).await?;
    Ok(())
}
