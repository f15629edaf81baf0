//! Typed errors of the wire protocol.
//!
//! Every way a peer can send bytes we refuse has a variant here, so the session code can decide
//! what to do (close with `Goodbye{ProtocolError}`, `Nack{Malformed}`, ...) without parsing
//! strings. Decoding never panics; it returns one of these.

/// A frame (header or body) that cannot be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The first two bytes are not `SK`: the peer does not speak spoke, or the stream is out of
    /// sync.
    #[error("bad frame magic (not a spoke frame or stream out of sync)")]
    BadMagic,
    /// The header carries a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The header names a frame type this version does not define.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// The declared body length exceeds the configured cap; nothing was allocated.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Declared body length.
        len: u32,
        /// Configured cap ([`crate::Limits::max_frame_bytes`]).
        max: u32,
    },
    /// The CRC32 of the body does not match the header: corruption in transit or a buggy peer.
    #[error("frame body checksum mismatch")]
    ChecksumMismatch,
    /// The body ended in the middle of a field.
    #[error("frame truncated while reading {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// Bytes were left over after the last field of the body.
    #[error("{0} trailing bytes after frame body")]
    TrailingBytes(usize),
    /// A string field is not valid UTF-8.
    #[error("string field is not valid UTF-8")]
    InvalidUtf8,
    /// A batch names a compression codec this version does not define.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// A field holds a value the protocol does not allow.
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
    /// The header's version is not the one that defines the frame's layout (see
    /// [`crate::frame`]): e.g. a dictionary batch in a version 1 header.
    #[error("frame of layout version {frame} carries header version {header}")]
    VersionMismatch {
        /// Version in the header.
        header: u8,
        /// Version the decoded frame's layout belongs to.
        frame: u8,
    },
}

/// A frame that cannot be put on the wire.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A string field is longer than its u16 length prefix can express.
    #[error("string field {field} is {len} bytes, more than 65535")]
    StringTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The body (or a blob or list inside it) is longer than a u32 length can express.
    #[error("frame body or field of {0} bytes does not fit a u32 length")]
    FrameTooLarge(usize),
}

/// A record chunk that cannot be built or decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// A chunk needs at least one record: its first/last offsets would be meaningless otherwise.
    #[error("a batch must contain at least one record")]
    Empty,
    /// Offsets within a chunk must strictly increase.
    #[error("record offsets must strictly increase: {next} follows {prev}")]
    OffsetOrder {
        /// The previous record's offset.
        prev: i64,
        /// The offending offset.
        next: i64,
    },
    /// The uncompressed record section is (or claims to be) larger than allowed.
    #[error("uncompressed batch of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length (declared or actual).
        len: u64,
        /// The cap.
        max: u64,
    },
    /// More records than allowed.
    #[error("batch of {count} records exceeds the limit of {max}")]
    TooManyRecords {
        /// Count (declared or seen so far).
        count: u64,
        /// The cap.
        max: u32,
    },
    /// A record has more headers than allowed.
    #[error("record with {count} headers exceeds the limit of {max}")]
    TooManyHeaders {
        /// Declared header count.
        count: u64,
        /// The cap.
        max: u32,
    },
    /// A record's header keys and values together are larger than allowed.
    #[error("record headers of {len} bytes exceed the limit of {max} bytes")]
    HeadersTooLarge {
        /// Header bytes seen so far on the record (keys plus values).
        len: u64,
        /// The cap.
        max: u32,
    },
    /// zstd refused the payload (corrupt, window too large, truncated frame, ...).
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The payload decompressed to a different size than declared.
    #[error("payload declared {declared} uncompressed bytes but holds {actual}")]
    LengthMismatch {
        /// Declared `uncompressed_len`.
        declared: u32,
        /// Actual length; when the payload expands beyond the declaration this is
        /// `declared + 1` because decompression stops right there.
        actual: u64,
    },
    /// The payload holds a different number of records than declared.
    #[error("payload declared {declared} records but holds {actual}")]
    CountMismatch {
        /// Declared `record_count`.
        declared: u32,
        /// Records found.
        actual: u32,
    },
    /// The records' offsets disagree with the batch's first/last offset.
    #[error("record offsets disagree with the batch header: {0}")]
    OffsetMismatch(&'static str),
    /// The record section ended in the middle of a record.
    #[error("record section truncated")]
    Truncated,
    /// Bytes were left over after the compressed frame.
    #[error("{0} trailing bytes after the compressed payload")]
    TrailingBytes(usize),
    /// A header key is not valid UTF-8.
    #[error("record header key is not valid UTF-8")]
    InvalidUtf8,
    /// zstd could not compress (practically only on allocation failure or a bad level).
    #[error("compression failed: {0}")]
    Compress(String),
    /// A field of the record section holds a value the format does not allow (overlong varint,
    /// unknown flag, offset overflow).
    #[error("malformed record section: {0}")]
    Malformed(&'static str),
    /// The batch names a dictionary the receiver was not given (or not yet: a `Batch` before
    /// its `Dictionary`).
    #[error("batch names unknown dictionary {0}")]
    UnknownDictionary(u32),
}

/// A [`crate::Dictionary`] the receiver refuses to keep.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DictionaryError {
    /// More dictionaries on one connection than allowed.
    #[error("more than {max} dictionaries on one connection")]
    TooMany {
        /// The cap ([`crate::DictionaryLimits::max_dictionaries`]).
        max: u32,
    },
    /// The dictionary is larger than allowed.
    #[error("dictionary of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The cap ([`crate::DictionaryLimits::max_dictionary_bytes`]).
        max: u32,
    },
    /// An empty dictionary: zstd would treat it as none, which is never what a sender meant.
    #[error("empty dictionary {0}")]
    Empty(u32),
    /// The id was already given a different dictionary on this connection.
    #[error("dictionary {0} was already defined differently")]
    Conflict(u32),
    /// zstd could not load the dictionary.
    #[error("dictionary {id} cannot be loaded: {reason}")]
    Load {
        /// The dictionary id.
        id: u32,
        /// What zstd said.
        reason: String,
    },
}
