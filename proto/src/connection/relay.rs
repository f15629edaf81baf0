//! The relay's side of a connection: the Hello's checks, what each inbound stream may carry,
//! and one stream per source partition.
//!
//! The relay reads each of a connection's streams in its own task, so the state is split the
//! same way: an [`InboundStream`] per stream, owned by its reader, and one [`PartitionStreams`]
//! per connection, shared by the readers.

use std::collections::HashMap;

use super::{within_version, ProtocolError, CONTROL_STREAM};
use crate::{
    Batch, Dictionaries, DictionaryLimits, Frame, Goodbye, Heartbeat, Hello, Negotiated,
    TopicConfig,
};

/// What the relay requires of a connection's `Hello`.
#[derive(Debug, Clone, Copy)]
pub struct HelloRules<'a> {
    /// The site the client certificate names.
    pub certified_site: &'a str,
    /// The most partitions one Hello may ask resume points for (each costs a hub scan).
    pub max_partitions: u32,
}

impl HelloRules<'_> {
    /// The connection's first frame, which must be a `Hello`.
    pub fn first_frame(frame: Option<Frame>) -> Result<Hello, ProtocolError> {
        match frame {
            Some(Frame::Hello(hello)) => Ok(hello),
            other => Err(ProtocolError::unexpected("Hello", other.as_ref())),
        }
    }

    /// The version the relay picks for `hello`, checked before any hub work: the site must be
    /// the certificate's, and the partitions within the cap.
    pub fn check(&self, hello: &Hello) -> Result<Negotiated, ProtocolError> {
        if hello.site != self.certified_site {
            return Err(ProtocolError::SiteMismatch {
                claimed: hello.site.clone(),
                certified: self.certified_site.to_owned(),
            });
        }
        if hello.partitions.len() > self.max_partitions as usize {
            return Err(ProtocolError::TooManyPartitions {
                count: hello.partitions.len(),
                max: self.max_partitions,
            });
        }
        Ok(Negotiated::from_hello(hello)?)
    }
}

/// A frame of an inbound stream that the relay acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Records for the hub.
    Batch(Batch),
    /// A dictionary, now kept for this stream's later batches.
    Dictionary {
        /// Its id.
        id: u32,
        /// Its size.
        bytes: usize,
    },
    /// The configuration a hub topic created for `topic` keeps.
    TopicConfig(TopicConfig),
    /// The agent is alive (control stream only).
    Heartbeat(Heartbeat),
    /// The agent leaves: no more batches come (control stream only). Ends the stream.
    Goodbye(Goodbye),
    /// The stream ended.
    End,
}

/// One inbound stream as the relay reads it: the connection's version, the dictionaries sent
/// on it (a relay keeps them per stream, for the connection only), and whether it ended.
#[derive(Debug)]
pub struct InboundStream {
    id: u64,
    version: Negotiated,
    dictionaries: Dictionaries,
    ended: bool,
}

impl InboundStream {
    /// The control stream, after its `Hello`.
    pub fn control(version: Negotiated, limits: DictionaryLimits) -> InboundStream {
        InboundStream {
            id: CONTROL_STREAM,
            version,
            dictionaries: Dictionaries::new(limits),
            ended: false,
        }
    }

    /// Data stream `id` (1, 2, ... in the order the agent opened them); only where the version
    /// has data streams.
    pub fn data(
        id: u64,
        version: Negotiated,
        limits: DictionaryLimits,
    ) -> Result<InboundStream, ProtocolError> {
        if !version.data_streams() || id == CONTROL_STREAM {
            return Err(ProtocolError::DataStreamNotAllowed {
                version: version.number(),
            });
        }
        Ok(InboundStream {
            id,
            version,
            dictionaries: Dictionaries::new(limits),
            ended: false,
        })
    }

    /// Which stream this is ([`CONTROL_STREAM`] or a data stream).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this is the control stream, whose silence means a lost agent.
    pub fn is_control(&self) -> bool {
        self.id == CONTROL_STREAM
    }

    /// Whether the stream ended (its end, or a `Goodbye` on the control stream).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The dictionaries sent on this stream, for decoding its batches.
    pub fn dictionaries(&self) -> &Dictionaries {
        &self.dictionaries
    }

    /// Takes the next frame read from the stream (`None`: its end).
    pub fn receive(&mut self, frame: Option<Frame>) -> Result<Inbound, ProtocolError> {
        if self.ended {
            return Err(ProtocolError::unexpected(
                "nothing after the stream's end",
                frame.as_ref(),
            ));
        }
        let control = self.is_control();
        match within_version(frame, self.version)? {
            None => {
                self.ended = true;
                Ok(Inbound::End)
            }
            Some(Frame::Batch(batch)) => {
                if let Some(id) = batch.codec.dictionary_id() {
                    if !self.dictionaries.contains(id) {
                        return Err(ProtocolError::UnknownDictionary {
                            seq: batch.seq,
                            topic: batch.topic,
                            partition: batch.partition,
                            id,
                            stream: self.id,
                        });
                    }
                }
                Ok(Inbound::Batch(batch))
            }
            Some(Frame::Dictionary(dictionary)) => {
                let id = dictionary.id;
                self.dictionaries
                    .insert(&dictionary)
                    .map_err(|source| ProtocolError::Dictionary { id, source })?;
                Ok(Inbound::Dictionary {
                    id,
                    bytes: dictionary.dictionary.len(),
                })
            }
            Some(Frame::TopicConfig(config)) => Ok(Inbound::TopicConfig(config)),
            Some(Frame::Heartbeat(heartbeat)) if control => Ok(Inbound::Heartbeat(heartbeat)),
            Some(Frame::Goodbye(goodbye)) if control => {
                self.ended = true;
                Ok(Inbound::Goodbye(goodbye))
            }
            other => Err(ProtocolError::unexpected(
                if control {
                    "Batch, Dictionary, TopicConfig, Heartbeat or Goodbye"
                } else {
                    "Batch, Dictionary or TopicConfig on a data stream"
                },
                other.as_ref(),
            )),
        }
    }
}

/// The stream each source partition's batches come on, for one connection: one, so that the
/// relay hands its records to the hub in the order they were sent.
#[derive(Debug, Default)]
pub struct PartitionStreams {
    by_topic: HashMap<String, HashMap<i32, u64>>,
}

impl PartitionStreams {
    /// Pins `batch`'s partition to `stream` at its first batch; refuses it on any other.
    pub fn pin(&mut self, batch: &Batch, stream: u64) -> Result<(), ProtocolError> {
        let pinned = match self.by_topic.get_mut(&batch.topic) {
            Some(partitions) => *partitions.entry(batch.partition).or_insert(stream),
            None => {
                self.by_topic
                    .entry(batch.topic.clone())
                    .or_default()
                    .insert(batch.partition, stream);
                stream
            }
        };
        if pinned != stream {
            return Err(ProtocolError::PartitionOnTwoStreams {
                seq: batch.seq,
                topic: batch.topic.clone(),
                partition: batch.partition,
                stream: pinned,
            });
        }
        Ok(())
    }

    /// Partitions pinned so far.
    pub fn len(&self) -> usize {
        self.by_topic.values().map(HashMap::len).sum()
    }

    /// Whether no partition is pinned yet.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{Codec, Dictionary, Heartbeat, TopicPartition};

    fn version(v: u8) -> Negotiated {
        let hello = Hello {
            site: "s".into(),
            min_version: v,
            max_version: v,
            software: "t".into(),
            partitions: vec![],
        };
        Negotiated::from_hello(&hello).expect("spoken")
    }

    fn batch(topic: &str, partition: i32, codec: Codec) -> Batch {
        Batch {
            seq: 1,
            topic: topic.into(),
            partition,
            partition_count: 4,
            first_offset: 0,
            last_offset: 0,
            next_offset: 1,
            record_count: 1,
            codec,
            uncompressed_len: 0,
            payload: Bytes::new(),
        }
    }

    fn dictionary(id: u32) -> Frame {
        Frame::Dictionary(Dictionary {
            id,
            dictionary: Bytes::from_static(b"a raw content dictionary"),
        })
    }

    #[test]
    fn the_hello_must_come_first_name_the_certified_site_and_stay_within_the_cap() {
        let rules = HelloRules {
            certified_site: "s",
            max_partitions: 1,
        };
        assert_eq!(
            HelloRules::first_frame(Some(Frame::Batch(batch("t", 0, Codec::None)))),
            Err(ProtocolError::Unexpected {
                expected: "Hello",
                got: "Batch"
            })
        );
        assert!(matches!(
            HelloRules::first_frame(None),
            Err(ProtocolError::Unexpected {
                got: "end of stream",
                ..
            })
        ));
        let mut hello = Hello {
            site: "other".into(),
            min_version: 1,
            max_version: 200,
            software: "t".into(),
            partitions: vec![],
        };
        assert!(matches!(
            rules.check(&hello),
            Err(ProtocolError::SiteMismatch { .. })
        ));
        hello.site = "s".into();
        assert_eq!(
            rules.check(&hello),
            Ok(version(crate::MAX_PROTOCOL_VERSION))
        );
        let partition = |p| TopicPartition {
            topic: "t".into(),
            partition: p,
        };
        hello.partitions = vec![partition(0), partition(1)];
        assert!(matches!(
            rules.check(&hello),
            Err(ProtocolError::TooManyPartitions { count: 2, max: 1 })
        ));
    }

    #[test]
    fn heartbeats_and_goodbye_only_on_the_control_stream_and_nothing_after_its_end() {
        let limits = DictionaryLimits::default();
        let mut control = InboundStream::control(version(5), limits);
        let heartbeat = || Some(Frame::Heartbeat(Heartbeat::default()));
        assert!(matches!(
            control.receive(heartbeat()),
            Ok(Inbound::Heartbeat(_))
        ));
        let goodbye = Goodbye {
            code: crate::GoodbyeCode::Shutdown,
            reason: "bye".into(),
        };
        assert!(matches!(
            control.receive(Some(Frame::Goodbye(goodbye.clone()))),
            Ok(Inbound::Goodbye(_))
        ));
        assert!(control.ended());
        assert!(control.receive(heartbeat()).is_err());

        let mut data = InboundStream::data(1, version(5), limits).expect("version 5");
        assert_eq!(
            data.receive(heartbeat()),
            Err(ProtocolError::Unexpected {
                expected: "Batch, Dictionary or TopicConfig on a data stream",
                got: "Heartbeat"
            })
        );
        let mut data = InboundStream::data(2, version(5), limits).expect("version 5");
        assert_eq!(data.receive(None), Ok(Inbound::End));
        assert!(data.receive(None).is_err());
    }

    #[test]
    fn data_streams_and_later_frames_only_from_their_version() {
        let limits = DictionaryLimits::default();
        assert_eq!(
            InboundStream::data(1, version(2), limits).map(|_| ()),
            Err(ProtocolError::DataStreamNotAllowed { version: 2 })
        );
        assert!(InboundStream::data(CONTROL_STREAM, version(5), limits).is_err());
        let mut control = InboundStream::control(version(1), limits);
        assert_eq!(
            control.receive(Some(dictionary(1))),
            Err(ProtocolError::AboveVersion {
                frame: "Dictionary",
                frame_version: 2,
                version: 1
            })
        );
        let config = Frame::TopicConfig(TopicConfig {
            topic: "t".into(),
            entries: vec![],
        });
        let mut control = InboundStream::control(version(4), limits);
        assert!(matches!(
            control.receive(Some(config.clone())),
            Err(ProtocolError::AboveVersion { .. })
        ));
        let mut control = InboundStream::control(version(5), limits);
        assert!(matches!(
            control.receive(Some(config)),
            Ok(Inbound::TopicConfig(_))
        ));
    }

    #[test]
    fn a_batch_needs_its_dictionary_sent_before_it_on_its_own_stream() {
        let limits = DictionaryLimits::default();
        let mut one = InboundStream::data(1, version(5), limits).expect("version 5");
        let mut two = InboundStream::data(2, version(5), limits).expect("version 5");
        let with_dictionary = || Some(Frame::Batch(batch("t", 0, Codec::ZstdDict(7))));
        assert!(matches!(
            one.receive(Some(dictionary(7))),
            Ok(Inbound::Dictionary { id: 7, .. })
        ));
        assert!(matches!(
            one.receive(with_dictionary()),
            Ok(Inbound::Batch(_))
        ));
        assert_eq!(
            two.receive(with_dictionary()),
            Err(ProtocolError::UnknownDictionary {
                seq: 1,
                topic: "t".into(),
                partition: 0,
                id: 7,
                stream: 2
            })
        );
    }

    #[test]
    fn a_partition_stays_on_the_stream_of_its_first_batch() {
        let mut pins = PartitionStreams::default();
        let b = |topic, partition| batch(topic, partition, Codec::None);
        assert_eq!(pins.pin(&b("t", 0), 1), Ok(()));
        assert_eq!(pins.pin(&b("t", 1), 2), Ok(()));
        assert_eq!(pins.pin(&b("u", 0), 2), Ok(()));
        assert_eq!(pins.pin(&b("t", 0), 1), Ok(()));
        let refused = pins.pin(&b("t", 0), 2).expect_err("second stream");
        assert!(refused.to_string().contains("already sent on stream 1"));
        assert_eq!(pins.len(), 3);
    }
}
