//! The agent's side of a connection: its Hello and the check of the relay's answer, then the
//! window of batches in flight over its lanes (the data streams, or the control stream alone),
//! what must go ahead of a batch on its lane, and the order the relay answers in.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{within_version, ProtocolError};
use crate::{
    Ack, Frame, Goodbye, Hello, Nack, Negotiated, Rejected, TopicPartition, Welcome,
    MAX_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// The agent's Hello, remembered until the relay answers it.
#[derive(Debug, Clone, Copy)]
pub struct Handshake {
    offered: (u8, u8),
}

/// The relay's answer to a Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The session is on, at `version`.
    Welcome {
        /// The relay's Welcome: its name and the resume points.
        welcome: Welcome,
        /// The version both sides now use.
        version: Negotiated,
    },
    /// The relay refused the session and said why.
    Refused(Goodbye),
}

impl Handshake {
    /// The Hello that opens a connection: every version this build speaks, and the partitions
    /// the agent wants resume points for.
    pub fn hello(site: String, software: String, partitions: Vec<TopicPartition>) -> (Hello, Self) {
        let hello = Hello {
            site,
            min_version: PROTOCOL_VERSION,
            max_version: MAX_PROTOCOL_VERSION,
            software,
            partitions,
        };
        let handshake = Handshake {
            offered: (hello.min_version, hello.max_version),
        };
        (hello, handshake)
    }

    /// Takes the relay's first frame: a Welcome at a version the agent offered, or a Goodbye.
    pub fn answer(&self, frame: Option<Frame>) -> Result<Answer, ProtocolError> {
        match frame {
            Some(Frame::Welcome(welcome)) => {
                let version = Negotiated::from_welcome(self.offered, &welcome)?;
                Ok(Answer::Welcome { welcome, version })
            }
            Some(Frame::Goodbye(goodbye)) => Ok(Answer::Refused(goodbye)),
            other => Err(ProtocolError::unexpected("Welcome", other.as_ref())),
        }
    }
}

/// A batch sent and not yet answered, with what the agent keeps of it (`T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight<T> {
    /// Its `Batch::seq`.
    pub seq: u64,
    /// Its frame's bytes on the wire.
    pub bytes: u64,
    /// Its source topic.
    pub topic: String,
    /// Its source partition.
    pub partition: i32,
    /// What the agent needs once it is answered.
    pub batch: T,
}

/// What must go on a lane ahead of a batch, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ahead {
    /// The source topic's configuration, if the agent knows it: the topic's first batch on
    /// this lane (the relay may create the hub topic at it).
    pub topic_config: bool,
    /// The dictionary the batch names: its first batch on this lane (a relay keeps
    /// dictionaries per stream).
    pub dictionary: Option<u32>,
    /// The connection's version has no dictionaries: the batch must go compressed without.
    pub without_dictionary: bool,
}

/// What the relay said about the batches in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<T> {
    /// The hub holds `batch`.
    Acked {
        /// The batch, out of the window.
        batch: InFlight<T>,
        /// The relay's frame.
        ack: Ack,
    },
    /// The relay refused `batch`.
    Nacked {
        /// The batch, out of the window.
        batch: InFlight<T>,
        /// The relay's frame.
        nack: Nack,
    },
    /// Records of the next batch to be acknowledged that the hub refuses (its `Ack` follows).
    Rejected(Rejected),
    /// The relay ends the session.
    Goodbye(Goodbye),
    /// The relay ended its stream.
    End,
}

#[derive(Debug)]
struct Lane<T> {
    dictionaries_sent: HashSet<u32>,
    topic_configs_sent: HashSet<String>,
    /// In the order sent, which is the order the relay answers them in.
    in_flight: VecDeque<InFlight<T>>,
}

/// The batches in flight of one connection, over its lanes, within the window.
#[derive(Debug)]
pub struct Window<T> {
    version: Negotiated,
    lanes: Vec<Lane<T>>,
    /// Each partition's lane, dealt in turn as partitions first ship in this connection, so that
    /// a few partitions spread over all lanes.
    assigned: HashMap<String, HashMap<i32, usize>>,
    assigned_count: usize,
    max_batches: usize,
    max_bytes: u64,
    batches: usize,
    bytes: u64,
    last_seq: u64,
}

impl<T> Window<T> {
    /// A window over `lanes` lanes (at least one) of at most `max_batches` batches and, but for
    /// a first batch of any size, `max_bytes` bytes.
    pub fn new(version: Negotiated, lanes: usize, max_batches: usize, max_bytes: u64) -> Self {
        Window {
            version,
            lanes: (0..lanes.max(1))
                .map(|_| Lane {
                    dictionaries_sent: HashSet::new(),
                    topic_configs_sent: HashSet::new(),
                    in_flight: VecDeque::new(),
                })
                .collect(),
            assigned: HashMap::new(),
            assigned_count: 0,
            max_batches,
            max_bytes,
            batches: 0,
            bytes: 0,
            last_seq: 0,
        }
    }

    /// The connection's version.
    pub fn version(&self) -> Negotiated {
        self.version
    }

    /// Whether another batch may go: at least one whatever its size, so that a batch larger
    /// than the byte window still ships.
    pub fn has_room(&self) -> bool {
        self.batches < self.max_batches && (self.batches == 0 || self.bytes < self.max_bytes)
    }

    /// Batches in flight.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Their bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }

    /// The lane of a partition: the one it was dealt at its first batch.
    pub fn lane_of(&mut self, topic: &str, partition: i32) -> usize {
        if let Some(&lane) = self.assigned.get(topic).and_then(|p| p.get(&partition)) {
            return lane;
        }
        let lane = self.assigned_count % self.lanes.len();
        self.assigned_count += 1;
        self.assigned
            .entry(topic.to_owned())
            .or_default()
            .insert(partition, lane);
        lane
    }

    /// What goes on `lane` ahead of a batch of `topic` compressed with `dictionary`; counted
    /// as sent from now on.
    pub fn ahead(&mut self, lane: usize, topic: &str, dictionary: Option<u32>) -> Ahead {
        let version = self.version;
        let Some(lane) = self.lanes.get_mut(lane) else {
            return Ahead::default();
        };
        let topic_config = version.topic_configs() && !lane.topic_configs_sent.contains(topic);
        if topic_config {
            lane.topic_configs_sent.insert(topic.to_owned());
        }
        let (dictionary, without_dictionary) = match dictionary {
            Some(_) if !version.dictionaries() => (None, true),
            Some(id) if lane.dictionaries_sent.insert(id) => (Some(id), false),
            _ => (None, false),
        };
        Ahead {
            topic_config,
            dictionary,
            without_dictionary,
        }
    }

    /// The seq the next batch carries.
    pub fn next_seq(&self) -> u64 {
        self.last_seq + 1
    }

    /// Takes a batch of `bytes` on `lane` into the window, with seq [`Window::next_seq`].
    pub fn sent(&mut self, lane: usize, bytes: u64, topic: &str, partition: i32, batch: T) -> u64 {
        self.last_seq += 1;
        let lanes = self.lanes.len();
        self.lanes[lane.min(lanes - 1)]
            .in_flight
            .push_back(InFlight {
                seq: self.last_seq,
                bytes,
                topic: topic.to_owned(),
                partition,
                batch,
            });
        self.batches += 1;
        self.bytes += bytes;
        self.last_seq
    }

    /// Takes a frame from the relay (`None`: its stream's end). Answers come in the order the
    /// batches went out on each lane, and frames only as the version defines them.
    pub fn receive(&mut self, frame: Option<Frame>) -> Result<Reply<T>, ProtocolError> {
        match within_version(frame, self.version)? {
            Some(Frame::Ack(ack)) => Ok(Reply::Acked {
                batch: self.answered(ack.seq)?,
                ack,
            }),
            Some(Frame::Nack(nack)) => Ok(Reply::Nacked {
                batch: self.answered(nack.seq)?,
                nack,
            }),
            Some(Frame::Rejected(rejected)) => {
                let next = self.oldest(rejected.seq).is_some_and(|f| {
                    f.topic == rejected.topic && f.partition == rejected.partition
                });
                if !next {
                    return Err(ProtocolError::RejectedOutOfOrder {
                        seq: rejected.seq,
                        topic: rejected.topic,
                        partition: rejected.partition,
                    });
                }
                Ok(Reply::Rejected(rejected))
            }
            Some(Frame::Goodbye(goodbye)) => Ok(Reply::Goodbye(goodbye)),
            None => Ok(Reply::End),
            Some(other) => Err(ProtocolError::unexpected(
                "Ack, Nack, Rejected or Goodbye",
                Some(&other),
            )),
        }
    }

    /// The batch `seq` if it is the oldest in flight on its lane.
    fn oldest(&self, seq: u64) -> Option<&InFlight<T>> {
        self.lanes
            .iter()
            .filter_map(|lane| lane.in_flight.front())
            .find(|f| f.seq == seq)
    }

    fn answered(&mut self, seq: u64) -> Result<InFlight<T>, ProtocolError> {
        let lane = self
            .lanes
            .iter_mut()
            .find(|lane| lane.in_flight.front().is_some_and(|f| f.seq == seq));
        let Some(batch) = lane.and_then(|lane| lane.in_flight.pop_front()) else {
            let expected = self
                .lanes
                .iter()
                .filter_map(|lane| lane.in_flight.front().map(|f| f.seq))
                .min()
                .unwrap_or(0);
            return Err(ProtocolError::AckOrder { expected, got: seq });
        };
        self.batches -= 1;
        self.bytes -= batch.bytes;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GoodbyeCode, NackCode, RejectedRange, ResumePoint};

    fn version(v: u8) -> Negotiated {
        let welcome = Welcome {
            version: v,
            relay: "r".into(),
            resume: vec![],
        };
        Negotiated::from_welcome((1, 255), &welcome).expect("offered")
    }

    fn ack(seq: u64) -> Option<Frame> {
        Some(Frame::Ack(Ack {
            seq,
            next_offset: 0,
        }))
    }

    #[test]
    fn the_welcome_must_pick_an_offered_version_and_a_goodbye_is_a_refusal() {
        let (hello, handshake) = Handshake::hello("s".into(), "t".into(), vec![]);
        assert_eq!(
            (hello.min_version, hello.max_version),
            (PROTOCOL_VERSION, MAX_PROTOCOL_VERSION)
        );
        let welcome = |version| {
            Some(Frame::Welcome(Welcome {
                version,
                relay: "r".into(),
                resume: vec![ResumePoint {
                    topic: "t".into(),
                    partition: 0,
                    next_offset: 5,
                }],
            }))
        };
        assert!(matches!(
            handshake.answer(welcome(3)),
            Ok(Answer::Welcome { version, .. }) if version.number() == 3
        ));
        assert!(matches!(
            handshake.answer(welcome(MAX_PROTOCOL_VERSION + 1)),
            Err(ProtocolError::Version(_))
        ));
        let goodbye = Goodbye {
            code: GoodbyeCode::NotAuthorized,
            reason: "no".into(),
        };
        assert_eq!(
            handshake.answer(Some(Frame::Goodbye(goodbye.clone()))),
            Ok(Answer::Refused(goodbye))
        );
        assert!(matches!(
            handshake.answer(None),
            Err(ProtocolError::Unexpected {
                expected: "Welcome",
                got: "end of stream"
            })
        ));
    }

    #[test]
    fn the_window_holds_a_first_batch_of_any_size_then_counts_batches_and_bytes() {
        let mut window = Window::new(version(5), 1, 3, 100);
        assert!(window.has_room());
        window.sent(0, 1_000, "t", 0, ());
        assert!(!window.has_room(), "over the byte window");
        window.receive(ack(1)).expect("in order");
        assert!(window.is_empty() && window.has_room());
        for _ in 0..3 {
            window.sent(0, 1, "t", 0, ());
        }
        assert_eq!((window.batches(), window.bytes()), (3, 3));
        assert!(!window.has_room(), "batch window full");
    }

    #[test]
    fn partitions_are_dealt_over_the_lanes_and_keep_theirs() {
        let mut window: Window<()> = Window::new(version(5), 3, 10, 1 << 20);
        let lanes: Vec<usize> = (0..5).map(|p| window.lane_of("t", p)).collect();
        assert_eq!(lanes, [0, 1, 2, 0, 1]);
        assert_eq!(window.lane_of("t", 2), 2);
        assert_eq!(window.lane_of("u", 0), 2);
    }

    #[test]
    fn acks_come_in_order_per_lane_and_in_any_order_across_lanes() {
        let mut window = Window::new(version(5), 2, 10, 1 << 20);
        let first = window.sent(0, 10, "t", 0, "a");
        let second = window.sent(1, 10, "t", 1, "b");
        let third = window.sent(0, 10, "t", 0, "c");
        assert_eq!(
            window.receive(ack(third)),
            Err(ProtocolError::AckOrder {
                expected: first,
                got: third
            })
        );
        let batch = |reply| match reply {
            Ok(Reply::Acked { batch, .. }) => batch.batch,
            other => panic!("{other:?}"),
        };
        assert_eq!(batch(window.receive(ack(second))), "b");
        assert_eq!(batch(window.receive(ack(first))), "a");
        let nack = Some(Frame::Nack(Nack {
            seq: third,
            code: NackCode::NotAllowed,
            message: "no".into(),
        }));
        assert!(matches!(window.receive(nack), Ok(Reply::Nacked { .. })));
        assert!(window.is_empty());
        assert!(matches!(
            window.receive(ack(99)),
            Err(ProtocolError::AckOrder {
                expected: 0,
                got: 99
            })
        ));
    }

    #[test]
    fn rejected_must_describe_the_next_batch_acknowledged_and_needs_version_4() {
        let rejected = |seq, partition| {
            Some(Frame::Rejected(Rejected {
                seq,
                topic: "t".into(),
                partition,
                reason: "too_large".into(),
                ranges: vec![RejectedRange {
                    first_offset: 0,
                    last_offset: 0,
                    records: 1,
                }],
            }))
        };
        let mut window = Window::new(version(5), 1, 10, 1 << 20);
        let first = window.sent(0, 10, "t", 0, ());
        let second = window.sent(0, 10, "t", 0, ());
        assert!(matches!(
            window.receive(rejected(second, 0)),
            Err(ProtocolError::RejectedOutOfOrder { .. })
        ));
        assert!(matches!(
            window.receive(rejected(first, 1)),
            Err(ProtocolError::RejectedOutOfOrder { .. })
        ));
        assert!(matches!(
            window.receive(rejected(first, 0)),
            Ok(Reply::Rejected(_))
        ));
        let mut old = Window::new(version(3), 1, 10, 1 << 20);
        let seq = old.sent(0, 10, "t", 0, ());
        assert!(matches!(
            old.receive(rejected(seq, 0)),
            Err(ProtocolError::AboveVersion { .. })
        ));
    }

    #[test]
    fn configs_and_dictionaries_go_ahead_once_per_lane_as_the_version_allows() {
        let mut window: Window<()> = Window::new(version(5), 2, 10, 1 << 20);
        let first = window.ahead(0, "t", Some(7));
        assert_eq!(
            first,
            Ahead {
                topic_config: true,
                dictionary: Some(7),
                without_dictionary: false
            }
        );
        assert_eq!(window.ahead(0, "t", Some(7)), Ahead::default());
        assert_eq!(
            window.ahead(1, "t", Some(7)),
            first,
            "another lane is another stream"
        );
        let mut v4: Window<()> = Window::new(version(4), 1, 10, 1 << 20);
        assert!(!v4.ahead(0, "t", None).topic_config);
        let mut v1: Window<()> = Window::new(version(1), 1, 10, 1 << 20);
        assert_eq!(
            v1.ahead(0, "t", Some(7)),
            Ahead {
                topic_config: false,
                dictionary: None,
                without_dictionary: true
            }
        );
    }

    #[test]
    fn frames_the_relay_never_sends_after_welcome_are_refused() {
        let mut window: Window<()> = Window::new(version(5), 1, 10, 1 << 20);
        let welcome = Some(Frame::Welcome(Welcome {
            version: 5,
            relay: "r".into(),
            resume: vec![],
        }));
        assert!(matches!(
            window.receive(welcome),
            Err(ProtocolError::Unexpected { got: "Welcome", .. })
        ));
        assert_eq!(window.receive(None), Ok(Reply::End));
    }
}
