//! A spooled chunk as the frames that carry it: its `Batch`, exactly as spooled (compressed
//! once, at the edge), and ahead of it on the same stream what the relay must know first.

use bytes::Bytes;
use spoke_proto::connection::agent::Ahead;
use spoke_proto::{
    decompress_section, Batch, BatchLimits, Codec, Dictionaries, Dictionary, DictionaryLimits,
    Frame, TopicConfig,
};
use spoke_transport::wire::WireError;

use super::ShipError;
use crate::spool::{Chunk, Spool};

/// The frames that carry `chunk`: `ahead` of it (as the protocol's window says for its lane)
/// the source topic's configuration, which the relay uses if it creates the hub topic at this
/// batch, and the dictionary the batch names; then the batch itself, which a relay without
/// dictionaries gets compressed without one.
pub(super) fn frames_for(
    spool: &dyn Spool,
    chunk: &Chunk,
    seq: u64,
    partition_count: i32,
    ahead: Ahead,
    zstd_level: i32,
) -> Result<(Vec<Bytes>, Bytes), ShipError> {
    let mut frames = Vec::new();
    let topic = &chunk.partition.topic;
    if ahead.topic_config {
        if let Some(entries) = spool.topic_config(topic)? {
            frames.push(frame_bytes(&Frame::TopicConfig(TopicConfig {
                topic: topic.clone(),
                entries,
            }))?);
        }
    }
    let mut batch = batch(seq, partition_count, chunk)?;
    if let Some(id) = chunk.dictionary {
        let stored = spool
            .dictionary(id)?
            .ok_or_else(|| ShipError::MissingDictionary {
                partition: chunk.partition.to_string(),
                id,
            })?;
        if ahead.without_dictionary {
            batch = without_dictionary(batch, chunk, stored.bytes, zstd_level)?;
        } else if ahead.dictionary == Some(id) {
            frames.push(frame_bytes(&Frame::Dictionary(Dictionary {
                id,
                dictionary: stored.bytes,
            }))?);
        }
    }
    Ok((frames, frame_bytes(&Frame::Batch(batch))?))
}

/// A version 1 relay knows no dictionaries: the chunk is decompressed with its dictionary and
/// compressed again without (the only case where the agent re-encodes what it spooled; it ends
/// once the relays are upgraded).
fn without_dictionary(
    mut batch: Batch,
    chunk: &Chunk,
    dictionary: Bytes,
    zstd_level: i32,
) -> Result<Batch, ShipError> {
    let failed = |reason: String| ShipError::Transcode {
        partition: chunk.partition.to_string(),
        reason,
    };
    let mut known = Dictionaries::new(DictionaryLimits {
        max_dictionaries: 1,
        max_dictionary_bytes: u32::MAX,
    });
    let id = batch.codec.dictionary_id().unwrap_or_default();
    known
        .insert(&Dictionary { id, dictionary })
        .map_err(|e| failed(e.to_string()))?;
    let section = decompress_section(
        batch.codec,
        batch.uncompressed_len,
        &batch.payload,
        &BatchLimits::default(),
        &known,
    )
    .map_err(|e| failed(e.to_string()))?;
    let payload = zstd::bulk::compress(&section, zstd_level).map_err(|e| failed(e.to_string()))?;
    batch.codec = Codec::Zstd;
    batch.payload = Bytes::from(payload);
    Ok(batch)
}

fn batch(seq: u64, partition_count: i32, chunk: &Chunk) -> Result<Batch, ShipError> {
    let unknown = || ShipError::Codec {
        partition: format!("{}/{}", chunk.partition.topic, chunk.partition.partition),
        codec: chunk.codec,
    };
    let codec = Codec::from_wire(chunk.codec, chunk.dictionary.unwrap_or_default())
        .map_err(|_| unknown())?;
    // The codec and the dictionary reference must agree.
    if codec.dictionary_id() != chunk.dictionary {
        return Err(unknown());
    }
    Ok(Batch {
        seq,
        topic: chunk.partition.topic.clone(),
        partition: chunk.partition.partition,
        partition_count,
        first_offset: chunk.first_offset,
        last_offset: chunk.last_offset,
        next_offset: chunk.next_offset,
        record_count: chunk.record_count,
        codec,
        uncompressed_len: chunk.uncompressed_len,
        // Shipped exactly as spooled: compressed once, at the edge.
        payload: chunk.payload.clone(),
    })
}

pub(super) fn frame_bytes(frame: &Frame) -> Result<Bytes, ShipError> {
    frame
        .to_bytes()
        .map_err(|e| ShipError::Wire(WireError::Encode(e)))
}
