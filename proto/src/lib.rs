//! The spoke wire protocol: versioned, checksummed frames ([`frame`]) and record batches
//! ([`batch`]), as pure encode/decode functions; the version negotiation ([`version`]); and the
//! rules of a connection, both sides' state machines that the binaries drive ([`connection`]).
//!
//! Sans-IO: nothing here touches a socket, a clock or a runtime. Callers pass bytes in and get
//! frames out (or typed [`error`]s; decoding never panics, whatever the peer sends).

#![warn(missing_docs)]

pub mod batch;
pub mod connection;
pub mod dictionary;
pub mod error;
pub mod frame;
pub mod version;

pub use batch::*;
pub use dictionary::*;
pub use error::*;
pub use frame::*;
pub use version::*;

/// TLS ALPN protocol id negotiated on the QUIC connection.
pub const ALPN: &[u8] = b"spoke/1";

/// The first protocol version: the layout version of every frame except those added by later
/// versions (see [`frame`]), and the lowest version a peer may offer in `Hello`.
pub const PROTOCOL_VERSION: u8 = 1;

/// The highest protocol version this build speaks. Version 2 adds the `Dictionary` frame and
/// the dictionary codec ([`Codec::ZstdDict`]); version 3 adds no frame but lets the agent send
/// `Batch` and `Dictionary` frames on data streams beside the first one (see [`frame`]);
/// version 4 adds the `Rejected` frame; version 5 the `TopicConfig` frame.
pub const MAX_PROTOCOL_VERSION: u8 = 5;

/// The topic configuration a `TopicConfig` carries from a source topic to the hub topic the
/// relay creates for it: what makes a compacted topic stay one. Nothing else: a site must not
/// set what the hub keeps beyond its own records' compaction (retention, sizes, replicas).
pub const CARRIED_TOPIC_CONFIGS: &[&str] = &[
    "cleanup.policy",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "delete.retention.ms",
];

/// Default UDP port of the relay.
pub const DEFAULT_PORT: u16 = 7000;
