//! The rules of a connection as state, without I/O, the way quinn-proto stands beside quinn:
//! what each side may send, on which stream and when. The binaries read and write the bytes and
//! hand every frame they read to these machines before acting on it; a frame the rules refuse
//! is a [`ProtocolError`], which ends the connection.
//!
//! - [`relay`]: the relay's side. The Hello's checks and the version it picks, what each
//!   inbound stream may carry (the control stream's heartbeats and goodbye, dictionaries kept
//!   per stream, nothing after a stream's end), and one stream per source partition.
//! - [`agent`]: the agent's side. Its Hello and the check of the relay's Welcome (a version it
//!   offered), the window of batches in flight over its lanes, what must go ahead of a batch
//!   on its stream, and the order in which the relay answers.

pub mod agent;
pub mod relay;

use crate::{DictionaryError, VersionError};

/// The stream a connection opens first (bidirectional): `Hello` and `Welcome`, heartbeats,
/// acknowledgements and `Goodbye`, and batches where the version has no data streams.
pub const CONTROL_STREAM: u64 = 0;

/// The peer broke the protocol: the connection ends, and the peer is told why where it can be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A frame the rules do not allow here (or the end of a stream where a frame must come).
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What may come here.
        expected: &'static str,
        /// The frame's name, or `"end of stream"`.
        got: &'static str,
    },
    /// The Hello names another site than the client certificate.
    #[error("Hello claims site {claimed} but the certificate is for {certified}")]
    SiteMismatch {
        /// The site in the Hello.
        claimed: String,
        /// The site of the certificate.
        certified: String,
    },
    /// The Hello asks for more resume points than the relay computes for one connection.
    #[error("Hello lists {count} partitions; this relay accepts at most {max} (limits.max_partitions_per_hello)")]
    TooManyPartitions {
        /// Partitions listed.
        count: usize,
        /// The relay's cap.
        max: u32,
    },
    /// No version both sides speak, or a Welcome with a version the agent did not offer.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// A frame whose layout belongs to a later version than the connection's.
    #[error("{frame} frame of protocol version {frame_version} in a session of version {version}")]
    AboveVersion {
        /// The frame's name.
        frame: &'static str,
        /// The version that defines its layout.
        frame_version: u8,
        /// The connection's version.
        version: u8,
    },
    /// A `Dictionary` frame the relay does not keep (too many, too large, a conflicting id).
    #[error("dictionary {id}: {source}")]
    Dictionary {
        /// Its id.
        id: u32,
        /// Why it is refused.
        source: DictionaryError,
    },
    /// A batch compressed with a dictionary that was not sent on its stream before it.
    #[error("batch {seq} for {topic}/{partition}: dictionary {id} was not sent on stream {stream} before it")]
    UnknownDictionary {
        /// The batch.
        seq: u64,
        /// Its source topic.
        topic: String,
        /// Its source partition.
        partition: i32,
        /// The dictionary it names.
        id: u32,
        /// The stream it came on.
        stream: u64,
    },
    /// A source partition's batch on another stream than its earlier ones: the relay could not
    /// hand its records to the hub in order.
    #[error("batch {seq} for {topic}/{partition}: partition already sent on stream {stream} of this connection")]
    PartitionOnTwoStreams {
        /// The batch.
        seq: u64,
        /// Its source topic.
        topic: String,
        /// Its source partition.
        partition: i32,
        /// The stream that carries the partition.
        stream: u64,
    },
    /// A data stream in a connection whose version has none.
    #[error("a data stream in a session of version {version}, which has none")]
    DataStreamNotAllowed {
        /// The connection's version.
        version: u8,
    },
    /// An acknowledgement (`Ack` or `Nack`) for another batch than the oldest in flight on
    /// each stream.
    #[error("relay acknowledged batch {got} but batch {expected} was the oldest in flight")]
    AckOrder {
        /// The oldest batch in flight (0 if none is).
        expected: u64,
        /// The batch acknowledged.
        got: u64,
    },
    /// A `Rejected` frame that does not describe the next batch to be acknowledged on its
    /// stream.
    #[error("Rejected for batch {seq} ({topic}/{partition}), which is not the next batch acknowledged on its stream")]
    RejectedOutOfOrder {
        /// The batch it names.
        seq: u64,
        /// The topic it names.
        topic: String,
        /// The partition it names.
        partition: i32,
    },
}

impl ProtocolError {
    fn unexpected(expected: &'static str, got: Option<&crate::Frame>) -> ProtocolError {
        ProtocolError::Unexpected {
            expected,
            got: got.map_or(END_OF_STREAM, crate::Frame::name),
        }
    }
}

/// How [`ProtocolError::Unexpected`] names a stream's end.
pub const END_OF_STREAM: &str = "end of stream";

/// The frame, if the connection's version defines its layout.
fn within_version(
    frame: Option<crate::Frame>,
    version: crate::Negotiated,
) -> Result<Option<crate::Frame>, ProtocolError> {
    match &frame {
        Some(f) if !version.allows(f.version()) => Err(ProtocolError::AboveVersion {
            frame: f.name(),
            frame_version: f.version(),
            version: version.number(),
        }),
        _ => Ok(frame),
    }
}
