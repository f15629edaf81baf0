//! Frames: the unit of the spoke wire protocol, and their byte layout.
//!
//! # Layout
//!
//! Every frame is a 12-byte header followed by a body:
//!
//! ```text
//! +------+------+---------+------+-----------------+-----------------+----------+
//! | 'S'  | 'K'  | version | type | body_len (u32)  | crc32(body) u32 | body ... |
//! +------+------+---------+------+-----------------+-----------------+----------+
//! ```
//!
//! All integers are big-endian, in the header and in bodies. Inside a body a string is a u16
//! byte length followed by UTF-8, a byte blob is a u32 length followed by the bytes, and a list
//! is a u32 element count followed by the elements. Frame type ids:
//!
//! | id | frame       | body                                                                 |
//! |----|-------------|----------------------------------------------------------------------|
//! | 1  | `Hello`     | site str, min_version u8, max_version u8, software str, list of (topic str, partition i32) |
//! | 2  | `Welcome`   | version u8, relay str, list of (topic str, partition i32, next_offset i64) |
//! | 3  | `Batch`     | seq u64, topic str, partition i32, partition_count i32, first_offset i64, last_offset i64, next_offset i64, record_count u32, codec u8, [dictionary_id u32, only when codec = 2], uncompressed_len u32, payload blob |
//! | 4  | `Ack`       | seq u64, next_offset i64                                             |
//! | 5  | `Nack`      | seq u64, code u16, message str                                       |
//! | 6  | `Heartbeat` | sent_at_ms, spool_bytes, spool_max_bytes, oldest_unacked_ms, lost_records, records_per_s (u64 each), list of (topic str, partition i32, lag_records u64) |
//! | 7  | `Goodbye`   | code u16, reason str                                                 |
//! | 8  | `Dictionary`| id u32, dictionary blob (version 2)                                  |
//! | 9  | `Rejected`  | seq u64, topic str, partition i32, reason str, list of (first_offset i64, last_offset i64, records u32) (version 4) |
//! | 10 | `TopicConfig` | topic str, list of (name str, value str) (version 5)               |
//!
//! Codecs (`Batch.codec`): 0 = none, 1 = zstd, 2 = zstd with the dictionary `dictionary_id`
//! (version 2).
//!
//! # Versions
//!
//! The header's version is the *layout* version of that frame: the lowest protocol version
//! that defines it. That is 2 for `Dictionary` and for a `Batch` with codec 2, 4 for
//! `Rejected`, 5 for `TopicConfig`, and 1 for every other frame; encoding picks it and
//! decoding insists on exactly it, so each frame has one encoding. `Hello` (always version 1, so any relay can read it) offers a range of versions,
//! `Welcome.version` picks one, and a sender must not send frames of a higher version than
//! that: a version 1 relay would refuse them as [`DecodeError::UnsupportedVersion`]. A relay
//! that negotiated 4 tells the agent, in a `Rejected` before a batch's `Ack`, which of its
//! records the hub refused (they went to the dead-letter topic instead). A relay
//! that negotiated 2 learns dictionaries in-band: the agent sends `Dictionary{id}` on the
//! stream before the first `Batch` that names `id` there, once per stream; the relay keeps them
//! per stream, in memory, for that connection only (see [`crate::dictionary`]). A relay that negotiated 5
//! learns the source topic's configuration that a hub topic must keep (`cleanup.policy`, the
//! compaction settings): the agent sends `TopicConfig{topic}` on a stream before the first
//! `Batch` of that topic there, once per stream, and the relay creates a missing hub topic
//! with it.
//!
//! # Streams
//!
//! The agent opens the connection's first bidirectional stream, the *control stream*, for
//! `Hello` and `Welcome`, `Heartbeat`s, `Goodbye`s and the relay's `Ack`s and `Nack`s. Up to
//! version 2 its `Batch` and `Dictionary` frames go there too. From version 3 the agent may also
//! open unidirectional *data streams* after `Welcome` and send `Batch` and `Dictionary` frames
//! on them, so that a lost packet stalls only the partitions of one stream. Each source
//! partition stays on one stream for the whole connection, so its batches keep their order; a
//! dictionary is sent on each stream before the first batch there that names it, and is known
//! on that stream only. Acknowledgements still come back on the control stream: in order for
//! the batches of one stream, in no promised order across streams.
//!
//! Decoding is *check, then parse*: [`Frame::decode`] returns `Ok(None)` until a whole frame is
//! buffered, and the body length is checked against [`Limits`] before anything is allocated.
//! This layer checks syntax only (lengths, UTF-8, enums, checksum); whether a batch's offsets
//! agree with its records is [`crate::batch`]'s job.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::{MAX_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// The two bytes every frame starts with; a cheap out-of-sync detector.
const MAGIC: [u8; 2] = *b"SK";

// Frame type ids on the wire. Never renumber: a peer of another build relies on them.
const TYPE_HELLO: u8 = 1;
const TYPE_WELCOME: u8 = 2;
const TYPE_BATCH: u8 = 3;
const TYPE_ACK: u8 = 4;
const TYPE_NACK: u8 = 5;
const TYPE_HEARTBEAT: u8 = 6;
const TYPE_GOODBYE: u8 = 7;
const TYPE_DICTIONARY: u8 = 8;
const TYPE_REJECTED: u8 = 9;
const TYPE_TOPIC_CONFIG: u8 = 10;

/// Caps applied while decoding frames from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted body length in bytes; checked against the header before the body is
    /// buffered or allocated.
    pub max_frame_bytes: u32,
}

impl Default for Limits {
    /// 16 MiB: several compressed chunks' worth, small enough that a hostile peer cannot make
    /// us buffer much.
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The decoded, validated 12-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Layout version of the frame (see the module docs); within
    /// [`PROTOCOL_VERSION`]`..=`[`MAX_PROTOCOL_VERSION`] after [`FrameHeader::decode`].
    pub version: u8,
    /// Frame type id (see the module docs).
    pub frame_type: u8,
    /// Length of the body that follows the header.
    pub body_len: u32,
    /// CRC32 (IEEE) of the body.
    pub checksum: u32,
}

impl FrameHeader {
    /// Decodes and validates a header: magic, version (within
    /// [`PROTOCOL_VERSION`]`..=`[`MAX_PROTOCOL_VERSION`], else
    /// [`DecodeError::UnsupportedVersion`]), a frame type that version defines, and `body_len`
    /// within `limits`.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<FrameHeader, DecodeError> {
        let [m0, m1, version, frame_type, l0, l1, l2, l3, c0, c1, c2, c3] = *bytes;
        if [m0, m1] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if !(PROTOCOL_VERSION..=MAX_PROTOCOL_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let last_type = match version {
            1 => TYPE_GOODBYE,
            2 | 3 => TYPE_DICTIONARY,
            4 => TYPE_REJECTED,
            _ => TYPE_TOPIC_CONFIG,
        };
        if !(TYPE_HELLO..=last_type).contains(&frame_type) {
            return Err(DecodeError::UnknownFrameType(frame_type));
        }
        let body_len = u32::from_be_bytes([l0, l1, l2, l3]);
        if body_len > limits.max_frame_bytes {
            return Err(DecodeError::FrameTooLarge {
                len: body_len,
                max: limits.max_frame_bytes,
            });
        }
        Ok(FrameHeader {
            version,
            frame_type,
            body_len,
            checksum: u32::from_be_bytes([c0, c1, c2, c3]),
        })
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = &mut out[..];
        w.put_slice(&MAGIC);
        w.put_u8(self.version);
        w.put_u8(self.frame_type);
        w.put_u32(self.body_len);
        w.put_u32(self.checksum);
        out
    }
}

/// A Kafka topic partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

/// First frame of a connection, agent → relay: who is speaking and what it ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The edge site's name.
    pub site: String,
    /// Lowest protocol version the agent speaks.
    pub min_version: u8,
    /// Highest protocol version the agent speaks.
    pub max_version: u8,
    /// Agent software name and version, for logs.
    pub software: String,
    /// Partitions the agent wants resume points for.
    pub partitions: Vec<TopicPartition>,
}

/// Where the hub's copy of one partition ends.
///
/// `next_offset`: the first source offset the hub does NOT hold for that partition (0 when it
/// holds nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// First source offset the hub does not hold.
    pub next_offset: i64,
}

/// Reply to [`Hello`], relay → agent: the chosen version and where to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version chosen for this connection.
    pub version: u8,
    /// Relay name, for logs.
    pub relay: String,
    /// One resume point per partition asked for in [`Hello::partitions`].
    pub resume: Vec<ResumePoint>,
}

/// Compression of a batch payload. Wire: u8 0 = none, 1 = zstd, 2 = zstd with a dictionary
/// (followed by the dictionary id, u32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Payload is the uncompressed record section.
    None,
    /// Payload is one zstd frame holding the record section.
    Zstd,
    /// Payload is one zstd frame holding the record section, compressed with the dictionary
    /// this id names; the sender must have sent that [`Dictionary`] earlier on the connection.
    /// Protocol version 2.
    ZstdDict(u32),
}

impl Codec {
    /// The codec's id byte on the wire (and in the agent's spool).
    pub fn wire_id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
            Codec::ZstdDict(_) => 2,
        }
    }

    /// The dictionary id, for [`Codec::ZstdDict`].
    pub fn dictionary_id(self) -> Option<u32> {
        match self {
            Codec::ZstdDict(id) => Some(id),
            Codec::None | Codec::Zstd => None,
        }
    }

    /// The codec from its id byte and, for id 2, its dictionary id (ignored otherwise).
    pub fn from_wire(id: u8, dictionary_id: u32) -> Result<Codec, DecodeError> {
        match id {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Zstd),
            2 => Ok(Codec::ZstdDict(dictionary_id)),
            other => Err(DecodeError::UnknownCodec(other)),
        }
    }
}

/// A chunk of consecutive records of one partition, agent → relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Sender-chosen sequence number, echoed by [`Ack`]/[`Nack`].
    pub seq: u64,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Partition count of the source topic, so the hub can create a matching topic; 0 when the
    /// agent does not know it yet (its local broker has not answered since it started).
    pub partition_count: i32,
    /// Offset of the first record in the payload.
    pub first_offset: i64,
    /// Offset of the last record in the payload.
    pub last_offset: i64,
    /// Source position after this batch (may exceed `last_offset + 1` when the source skipped
    /// offsets, e.g. transaction markers or compaction).
    pub next_offset: i64,
    /// Number of records in the payload.
    pub record_count: u32,
    /// Compression of `payload`.
    pub codec: Codec,
    /// Length of the record section after decompression.
    pub uncompressed_len: u32,
    /// The (compressed) record section; see [`crate::batch`].
    pub payload: Bytes,
}

/// The hub durably holds a batch, relay → agent.
///
/// `next_offset`: the source position after everything acked on that partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// [`Batch::seq`] being acknowledged.
    pub seq: u64,
    /// Source position after everything acked on the batch's partition.
    pub next_offset: i64,
}

/// Records of a batch that the hub refuses, relay → agent (version 4), sent before the batch's
/// [`Ack`]: they went to the relay's dead-letter topic, not to their hub topic, and the agent
/// counts them as lost with `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// [`Batch::seq`] of the batch they came in.
    pub seq: u64,
    /// The batch's source topic.
    pub topic: String,
    /// The batch's source partition.
    pub partition: i32,
    /// Why the hub refuses them (`too_large`, `hub_topic_invalid`).
    pub reason: String,
    /// The refused records, as runs of consecutive records of the batch.
    pub ranges: Vec<RejectedRange>,
}

/// A run of refused records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectedRange {
    /// Source offset of the run's first record.
    pub first_offset: i64,
    /// Source offset of the run's last record.
    pub last_offset: i64,
    /// Records in the run: fewer than the offsets where the source log has holes.
    pub records: u32,
}

/// The source topic's configuration that its hub topic must keep, agent → relay (version 5):
/// a compacted edge topic must not become a hub topic that deletes by age. Sent on a stream
/// before the first [`Batch`] of `topic` there; the relay uses it if it creates the hub topic,
/// and never changes a hub topic that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// The source topic.
    pub topic: String,
    /// Kafka topic configuration entries (name, value), e.g. `("cleanup.policy", "compact")`.
    pub entries: Vec<(String, String)>,
}

/// A zstd dictionary for later batches of this connection, agent → relay (version 2).
///
/// Sent once per stream, before the first [`Batch`] on that stream whose codec names `id`. The
/// receiver keeps it for that stream, only for the connection, within its limits ([`crate::DictionaryLimits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dictionary {
    /// Sender-chosen id, unique among the dictionaries of the connection.
    pub id: u32,
    /// The zstd dictionary (as `zstd::dict::from_samples` makes it).
    pub dictionary: Bytes,
}

/// Why a batch was refused. Wire u16: 1..=4; any other value decodes as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackCode {
    /// The site may not write this topic.
    NotAllowed,
    /// The batch failed validation; resending it unchanged will fail again.
    Malformed,
    /// The hub cluster is unreachable or refused the write; retry later.
    HubUnavailable,
    /// A relay bug or unexpected failure.
    Internal,
    /// A code from a newer peer; treat like a retryable failure.
    Unknown(u16),
}

impl NackCode {
    fn to_wire(self) -> u16 {
        match self {
            NackCode::NotAllowed => 1,
            NackCode::Malformed => 2,
            NackCode::HubUnavailable => 3,
            NackCode::Internal => 4,
            NackCode::Unknown(v) => v,
        }
    }

    fn from_wire(v: u16) -> NackCode {
        match v {
            1 => NackCode::NotAllowed,
            2 => NackCode::Malformed,
            3 => NackCode::HubUnavailable,
            4 => NackCode::Internal,
            other => NackCode::Unknown(other),
        }
    }
}

/// A batch was refused, relay → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// [`Batch::seq`] being refused.
    pub seq: u64,
    /// Why.
    pub code: NackCode,
    /// Human-readable detail, for logs.
    pub message: String,
}

/// Replication lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Records at the source not yet acknowledged by the hub.
    pub lag_records: u64,
}

/// Periodic agent status, agent → relay, so the hub side sees edge health.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// Agent wall clock at sending, Unix milliseconds.
    pub sent_at_ms: u64,
    /// Bytes currently in the spool.
    pub spool_bytes: u64,
    /// Spool capacity in bytes.
    pub spool_max_bytes: u64,
    /// Age of the oldest unacknowledged record in milliseconds (0 when none).
    pub oldest_unacked_ms: u64,
    /// Records dropped since start (spool full with a dropping policy).
    pub lost_records: u64,
    /// Recent shipping rate.
    pub records_per_s: u64,
    /// Per-partition lag.
    pub lag: Vec<PartitionLag>,
}

/// Why a connection is being closed. Wire u16: 1..=3; any other value decodes as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoodbyeCode {
    /// Orderly shutdown of the sender.
    Shutdown,
    /// The peer is not authorized (e.g. unknown site).
    NotAuthorized,
    /// The peer violated the protocol.
    ProtocolError,
    /// A code from a newer peer.
    Unknown(u16),
}

impl GoodbyeCode {
    fn to_wire(self) -> u16 {
        match self {
            GoodbyeCode::Shutdown => 1,
            GoodbyeCode::NotAuthorized => 2,
            GoodbyeCode::ProtocolError => 3,
            GoodbyeCode::Unknown(v) => v,
        }
    }

    fn from_wire(v: u16) -> GoodbyeCode {
        match v {
            1 => GoodbyeCode::Shutdown,
            2 => GoodbyeCode::NotAuthorized,
            3 => GoodbyeCode::ProtocolError,
            other => GoodbyeCode::Unknown(other),
        }
    }
}

/// Last frame of a connection, either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    /// Why.
    pub code: GoodbyeCode,
    /// Human-readable detail, for logs.
    pub reason: String,
}

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Batch`].
    Batch(Batch),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Nack`].
    Nack(Nack),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
    /// See [`Dictionary`].
    Dictionary(Dictionary),
    /// See [`Rejected`].
    Rejected(Rejected),
    /// See [`TopicConfig`].
    TopicConfig(TopicConfig),
}

impl Frame {
    /// Appends header and body to `dst`.
    ///
    /// Fails with [`EncodeError`] if a string exceeds `u16::MAX` bytes or the body (or a blob or
    /// list in it) exceeds `u32::MAX`; `dst` is then left as it was.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let start = dst.len();
        // Reserve the header in place and fill it in once the body length and CRC are known,
        // so the body is written once, straight into `dst`.
        dst.put_bytes(0, HEADER_LEN);
        let result = self.encode_body(dst).and_then(|()| {
            let body_start = start + HEADER_LEN;
            let body = dst.get(body_start..).unwrap_or_default();
            let body_len =
                u32::try_from(body.len()).map_err(|_| EncodeError::FrameTooLarge(body.len()))?;
            let header = FrameHeader {
                version: self.version(),
                frame_type: self.type_id(),
                body_len,
                checksum: crc32fast::hash(body),
            };
            if let Some(slot) = dst.get_mut(start..body_start) {
                slot.copy_from_slice(&header.encode());
            }
            Ok(())
        });
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }

    /// Encodes the frame into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut dst = BytesMut::new();
        self.encode(&mut dst)?;
        Ok(dst.freeze())
    }

    /// Decodes the body for an already-validated header.
    ///
    /// Verifies the exact length (short = [`DecodeError::Truncated`], long or unread bytes =
    /// [`DecodeError::TrailingBytes`]) and the checksum. Takes [`Bytes`] so that
    /// [`Batch::payload`] is a zero-copy slice of `body`.
    pub fn decode_body(header: &FrameHeader, body: Bytes) -> Result<Frame, DecodeError> {
        let declared = header.body_len as usize;
        if body.len() < declared {
            return Err(DecodeError::Truncated { what: "frame body" });
        }
        if body.len() > declared {
            return Err(DecodeError::TrailingBytes(body.len() - declared));
        }
        // The checksum comes before parsing: a corrupted body must not be half-interpreted.
        if crc32fast::hash(&body) != header.checksum {
            return Err(DecodeError::ChecksumMismatch);
        }
        let mut r = Reader { buf: body };
        let frame = match header.frame_type {
            TYPE_HELLO => Frame::Hello(Hello {
                site: r.string("hello.site")?,
                min_version: r.u8("hello.min_version")?,
                max_version: r.u8("hello.max_version")?,
                software: r.string("hello.software")?,
                partitions: r.list("hello.partitions", 2 + 4, |r| {
                    Ok(TopicPartition {
                        topic: r.string("hello.partitions.topic")?,
                        partition: r.i32("hello.partitions.partition")?,
                    })
                })?,
            }),
            TYPE_WELCOME => Frame::Welcome(Welcome {
                version: r.u8("welcome.version")?,
                relay: r.string("welcome.relay")?,
                resume: r.list("welcome.resume", 2 + 4 + 8, |r| {
                    Ok(ResumePoint {
                        topic: r.string("welcome.resume.topic")?,
                        partition: r.i32("welcome.resume.partition")?,
                        next_offset: r.i64("welcome.resume.next_offset")?,
                    })
                })?,
            }),
            TYPE_BATCH => Frame::Batch(Batch {
                seq: r.u64("batch.seq")?,
                topic: r.string("batch.topic")?,
                partition: r.i32("batch.partition")?,
                partition_count: r.i32("batch.partition_count")?,
                first_offset: r.i64("batch.first_offset")?,
                last_offset: r.i64("batch.last_offset")?,
                next_offset: r.i64("batch.next_offset")?,
                record_count: r.u32("batch.record_count")?,
                codec: match r.u8("batch.codec")? {
                    2 => Codec::ZstdDict(r.u32("batch.dictionary_id")?),
                    other => Codec::from_wire(other, 0)?,
                },
                uncompressed_len: r.u32("batch.uncompressed_len")?,
                payload: r.blob("batch.payload")?,
            }),
            TYPE_ACK => Frame::Ack(Ack {
                seq: r.u64("ack.seq")?,
                next_offset: r.i64("ack.next_offset")?,
            }),
            TYPE_NACK => Frame::Nack(Nack {
                seq: r.u64("nack.seq")?,
                code: NackCode::from_wire(r.u16("nack.code")?),
                message: r.string("nack.message")?,
            }),
            TYPE_HEARTBEAT => Frame::Heartbeat(Heartbeat {
                sent_at_ms: r.u64("heartbeat.sent_at_ms")?,
                spool_bytes: r.u64("heartbeat.spool_bytes")?,
                spool_max_bytes: r.u64("heartbeat.spool_max_bytes")?,
                oldest_unacked_ms: r.u64("heartbeat.oldest_unacked_ms")?,
                lost_records: r.u64("heartbeat.lost_records")?,
                records_per_s: r.u64("heartbeat.records_per_s")?,
                lag: r.list("heartbeat.lag", 2 + 4 + 8, |r| {
                    Ok(PartitionLag {
                        topic: r.string("heartbeat.lag.topic")?,
                        partition: r.i32("heartbeat.lag.partition")?,
                        lag_records: r.u64("heartbeat.lag.lag_records")?,
                    })
                })?,
            }),
            TYPE_GOODBYE => Frame::Goodbye(Goodbye {
                code: GoodbyeCode::from_wire(r.u16("goodbye.code")?),
                reason: r.string("goodbye.reason")?,
            }),
            TYPE_DICTIONARY => Frame::Dictionary(Dictionary {
                id: r.u32("dictionary.id")?,
                dictionary: r.blob("dictionary.dictionary")?,
            }),
            TYPE_REJECTED => Frame::Rejected(Rejected {
                seq: r.u64("rejected.seq")?,
                topic: r.string("rejected.topic")?,
                partition: r.i32("rejected.partition")?,
                reason: r.string("rejected.reason")?,
                ranges: r.list("rejected.ranges", 8 + 8 + 4, |r| {
                    Ok(RejectedRange {
                        first_offset: r.i64("rejected.ranges.first_offset")?,
                        last_offset: r.i64("rejected.ranges.last_offset")?,
                        records: r.u32("rejected.ranges.records")?,
                    })
                })?,
            }),
            TYPE_TOPIC_CONFIG => Frame::TopicConfig(TopicConfig {
                topic: r.string("topic_config.topic")?,
                entries: r.list("topic_config.entries", 2 + 2, |r| {
                    Ok((
                        r.string("topic_config.entries.name")?,
                        r.string("topic_config.entries.value")?,
                    ))
                })?,
            }),
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::TrailingBytes(r.buf.len()));
        }
        // One encoding per frame: a version 2 layout must say so (a version 1 peer would
        // misread it), and a version 1 frame must not claim more.
        let version = frame.version();
        if header.version != version {
            return Err(DecodeError::VersionMismatch {
                header: header.version,
                frame: version,
            });
        }
        Ok(frame)
    }

    /// Check, then parse, one frame at the start of `buf`.
    ///
    /// `Ok(None)`: `buf` does not yet hold a whole frame (read more and call again).
    /// `Ok(Some((frame, consumed)))`: a frame, and how many bytes of `buf` it took.
    /// The header is validated as soon as its 12 bytes are present, so an oversized or foreign
    /// frame fails before its body is waited for or allocated.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, DecodeError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = FrameHeader::decode(head, limits)?;
        let total = HEADER_LEN.saturating_add(header.body_len as usize);
        let Some(body) = buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let frame = Frame::decode_body(&header, Bytes::copy_from_slice(body))?;
        Ok(Some((frame, total)))
    }

    /// The frame's type name (`"Hello"`, `"Batch"`, ...), for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Batch(_) => "Batch",
            Frame::Ack(_) => "Ack",
            Frame::Nack(_) => "Nack",
            Frame::Heartbeat(_) => "Heartbeat",
            Frame::Goodbye(_) => "Goodbye",
            Frame::Dictionary(_) => "Dictionary",
            Frame::Rejected(_) => "Rejected",
            Frame::TopicConfig(_) => "TopicConfig",
        }
    }

    /// The protocol version that defines this frame's layout, written in its header: 2 for
    /// [`Dictionary`] and for a [`Batch`] with [`Codec::ZstdDict`], else 1.
    pub fn version(&self) -> u8 {
        match self {
            Frame::Dictionary(_)
            | Frame::Batch(Batch {
                codec: Codec::ZstdDict(_),
                ..
            }) => crate::DICTIONARY_VERSION,
            Frame::Rejected(_) => crate::REJECTED_VERSION,
            Frame::TopicConfig(_) => crate::TOPIC_CONFIG_VERSION,
            _ => PROTOCOL_VERSION,
        }
    }

    fn type_id(&self) -> u8 {
        match self {
            Frame::Hello(_) => TYPE_HELLO,
            Frame::Welcome(_) => TYPE_WELCOME,
            Frame::Batch(_) => TYPE_BATCH,
            Frame::Ack(_) => TYPE_ACK,
            Frame::Nack(_) => TYPE_NACK,
            Frame::Heartbeat(_) => TYPE_HEARTBEAT,
            Frame::Goodbye(_) => TYPE_GOODBYE,
            Frame::Dictionary(_) => TYPE_DICTIONARY,
            Frame::Rejected(_) => TYPE_REJECTED,
            Frame::TopicConfig(_) => TYPE_TOPIC_CONFIG,
        }
    }

    fn encode_body(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Frame::Hello(h) => {
                put_string(dst, "hello.site", &h.site)?;
                dst.put_u8(h.min_version);
                dst.put_u8(h.max_version);
                put_string(dst, "hello.software", &h.software)?;
                put_list(dst, &h.partitions, |dst, p| {
                    put_string(dst, "hello.partitions.topic", &p.topic)?;
                    dst.put_i32(p.partition);
                    Ok(())
                })
            }
            Frame::Welcome(w) => {
                dst.put_u8(w.version);
                put_string(dst, "welcome.relay", &w.relay)?;
                put_list(dst, &w.resume, |dst, p| {
                    put_string(dst, "welcome.resume.topic", &p.topic)?;
                    dst.put_i32(p.partition);
                    dst.put_i64(p.next_offset);
                    Ok(())
                })
            }
            Frame::Batch(b) => {
                dst.put_u64(b.seq);
                put_string(dst, "batch.topic", &b.topic)?;
                dst.put_i32(b.partition);
                dst.put_i32(b.partition_count);
                dst.put_i64(b.first_offset);
                dst.put_i64(b.last_offset);
                dst.put_i64(b.next_offset);
                dst.put_u32(b.record_count);
                dst.put_u8(b.codec.wire_id());
                if let Codec::ZstdDict(id) = b.codec {
                    dst.put_u32(id);
                }
                dst.put_u32(b.uncompressed_len);
                let len = u32::try_from(b.payload.len())
                    .map_err(|_| EncodeError::FrameTooLarge(b.payload.len()))?;
                dst.put_u32(len);
                dst.put_slice(&b.payload);
                Ok(())
            }
            Frame::Ack(a) => {
                dst.put_u64(a.seq);
                dst.put_i64(a.next_offset);
                Ok(())
            }
            Frame::Nack(n) => {
                dst.put_u64(n.seq);
                dst.put_u16(n.code.to_wire());
                put_string(dst, "nack.message", &n.message)
            }
            Frame::Heartbeat(h) => {
                dst.put_u64(h.sent_at_ms);
                dst.put_u64(h.spool_bytes);
                dst.put_u64(h.spool_max_bytes);
                dst.put_u64(h.oldest_unacked_ms);
                dst.put_u64(h.lost_records);
                dst.put_u64(h.records_per_s);
                put_list(dst, &h.lag, |dst, l| {
                    put_string(dst, "heartbeat.lag.topic", &l.topic)?;
                    dst.put_i32(l.partition);
                    dst.put_u64(l.lag_records);
                    Ok(())
                })
            }
            Frame::Goodbye(g) => {
                dst.put_u16(g.code.to_wire());
                put_string(dst, "goodbye.reason", &g.reason)
            }
            Frame::Dictionary(d) => {
                dst.put_u32(d.id);
                let len = u32::try_from(d.dictionary.len())
                    .map_err(|_| EncodeError::FrameTooLarge(d.dictionary.len()))?;
                dst.put_u32(len);
                dst.put_slice(&d.dictionary);
                Ok(())
            }
            Frame::Rejected(rejected) => {
                dst.put_u64(rejected.seq);
                put_string(dst, "rejected.topic", &rejected.topic)?;
                dst.put_i32(rejected.partition);
                put_string(dst, "rejected.reason", &rejected.reason)?;
                let count = u32::try_from(rejected.ranges.len())
                    .map_err(|_| EncodeError::FrameTooLarge(rejected.ranges.len()))?;
                dst.put_u32(count);
                for range in &rejected.ranges {
                    dst.put_i64(range.first_offset);
                    dst.put_i64(range.last_offset);
                    dst.put_u32(range.records);
                }
                Ok(())
            }
            Frame::TopicConfig(config) => {
                put_string(dst, "topic_config.topic", &config.topic)?;
                put_list(dst, &config.entries, |dst, (name, value)| {
                    put_string(dst, "topic_config.entries.name", name)?;
                    put_string(dst, "topic_config.entries.value", value)
                })
            }
        }
    }
}

fn put_string(dst: &mut BytesMut, field: &'static str, s: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::StringTooLong {
        field,
        len: s.len(),
    })?;
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn put_list<T>(
    dst: &mut BytesMut,
    items: &[T],
    mut put: impl FnMut(&mut BytesMut, &T) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let count = u32::try_from(items.len()).map_err(|_| EncodeError::FrameTooLarge(items.len()))?;
    dst.put_u32(count);
    items.iter().try_for_each(|item| put(dst, item))
}

/// Cursor over a frame body; every read is length-checked first, so a short body is a
/// [`DecodeError::Truncated`] naming the field, never a panic.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { what });
        }
        Ok(self.buf.split_to(n))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let out = *self
            .buf
            .first_chunk::<N>()
            .ok_or(DecodeError::Truncated { what })?;
        self.buf.advance(N);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(what)?;
        let bytes = self.take(usize::from(len), what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8)
    }

    fn blob(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u32(what)?;
        self.take(len as usize, what)
    }

    /// Reads a u32 count then that many elements. The count is checked against the bytes left
    /// (each element needs at least `min_elem` bytes) before the Vec is allocated, so a count of
    /// 4 billion in a 10-byte body costs nothing.
    fn list<T>(
        &mut self,
        what: &'static str,
        min_elem: usize,
        mut elem: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.u32(what)? as usize;
        if count.saturating_mul(min_elem) > self.buf.len() {
            return Err(DecodeError::Truncated { what });
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(elem(self)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limit_is_16_mib() {
        assert_eq!(Limits::default().max_frame_bytes, 16 << 20);
    }

    #[test]
    fn header_encode_decode_round_trip() {
        let header = FrameHeader {
            version: PROTOCOL_VERSION,
            frame_type: TYPE_HEARTBEAT,
            body_len: 99,
            checksum: 0xdead_beef,
        };
        assert_eq!(
            FrameHeader::decode(&header.encode(), &Limits::default()),
            Ok(header)
        );
    }
}
