//! The connection state machines driven with whole frame sequences, both sides: an honest
//! agent's transcript (from the agent's own window) read by the relay in any interleaving of
//! its streams, then cut short, reordered and moved between streams; and the relay's answers
//! cut short and reordered. Each frame's verdict is compared with a small model of the rules,
//! so a machine that lets through what the rules forbid (or refuses what they allow) fails.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use proptest::prelude::*;
use spoke_proto::connection::agent::{Reply, Window};
use spoke_proto::connection::relay::{Inbound, InboundStream, PartitionStreams};
use spoke_proto::connection::{ProtocolError, CONTROL_STREAM};
use spoke_proto::*;

const TOPICS: [&str; 2] = ["orders", "metrics"];

/// What an agent ships: (topic, partition, dictionary) per batch.
#[derive(Debug, Clone)]
struct Plan {
    version: u8,
    lanes: usize,
    batches: Vec<(usize, i32, Option<u32>)>,
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        1..=MAX_PROTOCOL_VERSION,
        1usize..=4,
        prop::collection::vec((0usize..2, 0i32..4, prop::option::of(1u32..=3)), 1..24),
    )
        .prop_map(|(version, lanes, batches)| Plan {
            version,
            // As the agent opens them: data streams only from their version.
            lanes: if version >= DATA_STREAMS_VERSION {
                lanes
            } else {
                1
            },
            batches,
        })
}

fn negotiated(version: u8) -> Negotiated {
    let welcome = Welcome {
        version,
        relay: "r".into(),
        resume: vec![],
    };
    Negotiated::from_welcome((PROTOCOL_VERSION, MAX_PROTOCOL_VERSION), &welcome).expect("offered")
}

/// The stream a lane writes to, as the agent's lanes map them.
fn stream_of(version: u8, lane: usize) -> u64 {
    if version >= DATA_STREAMS_VERSION {
        lane as u64 + 1
    } else {
        CONTROL_STREAM
    }
}

fn dictionary(id: u32) -> Frame {
    Frame::Dictionary(Dictionary {
        id,
        dictionary: Bytes::from(format!("raw content dictionary {id}")),
    })
}

fn batch(seq: u64, topic: &str, partition: i32, codec: Codec) -> Frame {
    Frame::Batch(Batch {
        seq,
        topic: topic.into(),
        partition,
        partition_count: 4,
        first_offset: seq as i64,
        last_offset: seq as i64,
        next_offset: seq as i64 + 1,
        record_count: 1,
        codec,
        uncompressed_len: 0,
        payload: Bytes::new(),
    })
}

/// The frames the agent's window puts on each stream for `plan`, in order, and the agent's
/// window with all of them in flight.
fn transcript(plan: &Plan) -> (HashMap<u64, Vec<Frame>>, Window<u64>) {
    let mut window = Window::new(negotiated(plan.version), plan.lanes, usize::MAX, u64::MAX);
    let mut streams: HashMap<u64, Vec<Frame>> = HashMap::new();
    for &(topic, partition, dict) in &plan.batches {
        let topic = TOPICS[topic];
        let lane = window.lane_of(topic, partition);
        let ahead = window.ahead(lane, topic, dict);
        let frames = streams.entry(stream_of(plan.version, lane)).or_default();
        if ahead.topic_config {
            frames.push(Frame::TopicConfig(TopicConfig {
                topic: topic.into(),
                entries: vec![("cleanup.policy".into(), "compact".into())],
            }));
        }
        if let Some(id) = ahead.dictionary {
            frames.push(dictionary(id));
        }
        let codec = match dict {
            Some(id) if !ahead.without_dictionary => Codec::ZstdDict(id),
            _ => Codec::Zstd,
        };
        let seq = window.next_seq();
        frames.push(batch(seq, topic, partition, codec));
        window.sent(lane, 10, topic, partition, seq);
    }
    (streams, window)
}

/// The relay's rules, written as plainly as possible: the verdict on each frame.
#[derive(Default)]
struct RelayModel {
    dictionaries: HashMap<u64, HashSet<u32>>,
    pinned: HashMap<(String, i32), u64>,
    ended: HashSet<u64>,
}

impl RelayModel {
    fn allows(&mut self, version: u8, stream: u64, frame: Option<&Frame>) -> bool {
        if self.ended.contains(&stream) {
            return false;
        }
        let Some(frame) = frame else {
            self.ended.insert(stream);
            return true;
        };
        if frame.version() > version {
            return false;
        }
        match frame {
            Frame::Dictionary(d) => {
                self.dictionaries.entry(stream).or_default().insert(d.id);
                true
            }
            Frame::Batch(b) => {
                if let Some(id) = b.codec.dictionary_id() {
                    if !self
                        .dictionaries
                        .get(&stream)
                        .is_some_and(|d| d.contains(&id))
                    {
                        return false;
                    }
                }
                let pinned = *self
                    .pinned
                    .entry((b.topic.clone(), b.partition))
                    .or_insert(stream);
                pinned == stream
            }
            Frame::TopicConfig(_) => true,
            Frame::Heartbeat(_) => stream == CONTROL_STREAM,
            Frame::Goodbye(_) if stream == CONTROL_STREAM => {
                self.ended.insert(stream);
                true
            }
            _ => false,
        }
    }
}

/// The relay's side of one connection: its streams' machines and the partitions' pins.
struct Relay {
    version: u8,
    streams: HashMap<u64, InboundStream>,
    pins: PartitionStreams,
    model: RelayModel,
    /// Batches accepted, in arrival order: what the acker answers.
    accepted: Vec<Batch>,
}

impl Relay {
    fn new(version: u8) -> Self {
        Relay {
            version,
            streams: HashMap::new(),
            pins: PartitionStreams::default(),
            model: RelayModel::default(),
            accepted: Vec::new(),
        }
    }

    /// Feeds one frame (`None`: the stream's end) to stream `id`; whether the machine took it.
    /// Panics where the machine and the model disagree.
    fn feed(&mut self, id: u64, frame: Option<Frame>) -> bool {
        let version = negotiated(self.version);
        let limits = DictionaryLimits::default();
        let stream = self.streams.entry(id).or_insert_with(|| {
            if id == CONTROL_STREAM {
                InboundStream::control(version, limits)
            } else {
                InboundStream::data(id, version, limits).expect("data streams at this version")
            }
        });
        let expected = self.model.allows(self.version, id, frame.as_ref());
        let verdict = match stream.receive(frame.clone()) {
            Ok(Inbound::Batch(b)) => self.pins.pin(&b, id).map(|()| Some(b)),
            Ok(_) => Ok(None),
            Err(error) => Err(error),
        };
        assert_eq!(
            verdict.is_ok(),
            expected,
            "stream {id}, frame {frame:?}: machine says {verdict:?}"
        );
        if let Ok(Some(b)) = verdict {
            self.accepted.push(b);
        }
        expected
    }
}

/// Reads the streams in the interleaving `order` picks (an index into the streams that still
/// have frames), ending each stream after its last frame; stops at the first refusal.
fn read_interleaved(
    relay: &mut Relay,
    mut streams: Vec<(u64, Vec<Frame>)>,
    order: &[usize],
) -> bool {
    for (_, frames) in &mut streams {
        frames.reverse();
    }
    let mut picks = order.iter().cycle();
    while !streams.is_empty() {
        let at = picks.next().copied().unwrap_or(0) % streams.len();
        let (id, frames) = &mut streams[at];
        let frame = frames.pop();
        let ended = frame.is_none();
        if !relay.feed(*id, frame) {
            return false;
        }
        if ended {
            streams.remove(at);
        }
    }
    true
}

fn sorted(streams: HashMap<u64, Vec<Frame>>) -> Vec<(u64, Vec<Frame>)> {
    let mut streams: Vec<_> = streams.into_iter().collect();
    streams.sort_by_key(|(id, _)| *id);
    streams
}

/// The relay's acknowledgements of `accepted`, in arrival order.
fn acks(accepted: &[Batch]) -> Vec<Frame> {
    accepted
        .iter()
        .map(|b| {
            Frame::Ack(Ack {
                seq: b.seq,
                next_offset: b.next_offset,
            })
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever order the relay reads an honest agent's streams in, it takes every frame, and
    /// the agent takes every acknowledgement given in the order the relay read the batches.
    #[test]
    fn an_honest_transcript_passes_in_any_interleaving(plan in plan(), order in prop::collection::vec(0usize..8, 1..64)) {
        let (streams, mut window) = transcript(&plan);
        let mut relay = Relay::new(plan.version);
        prop_assert!(read_interleaved(&mut relay, sorted(streams), &order));
        prop_assert_eq!(relay.accepted.len(), plan.batches.len());
        for ack in acks(&relay.accepted) {
            let reply = window.receive(Some(ack));
            prop_assert!(matches!(reply, Ok(Reply::Acked { .. })), "{:?}", reply);
        }
        prop_assert!(window.is_empty());
    }

    /// A connection cut short anywhere: the relay takes every frame before the cut, and the
    /// agent keeps exactly the batches the relay did not read in its window.
    #[test]
    fn a_transcript_cut_short_is_taken_up_to_the_cut(plan in plan(), cuts in prop::collection::vec(0usize..40, 5)) {
        let (streams, mut window) = transcript(&plan);
        let cut: Vec<(u64, Vec<Frame>)> = sorted(streams)
            .into_iter()
            .enumerate()
            .map(|(i, (id, mut frames))| {
                frames.truncate(cuts[i % cuts.len()]);
                (id, frames)
            })
            .collect();
        let mut relay = Relay::new(plan.version);
        prop_assert!(read_interleaved(&mut relay, cut, &[0]));
        let read = relay.accepted.len();
        for ack in acks(&relay.accepted) {
            prop_assert!(window.receive(Some(ack)).is_ok());
        }
        prop_assert_eq!(window.batches(), plan.batches.len() - read);
    }

    /// Two frames of one stream swapped, or a frame moved to another stream: the machine's
    /// verdict on every frame is the model's (a batch before its dictionary, or a partition on
    /// a second stream, is refused; anything the rules allow still passes).
    #[test]
    fn reordered_and_moved_frames_get_the_rules_verdict(
        plan in plan(),
        pick in (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<prop::sample::Index>()),
        swap in any::<bool>(),
        order in prop::collection::vec(0usize..8, 1..64),
    ) {
        let (streams, _) = transcript(&plan);
        let mut streams = sorted(streams);
        let (from, a, b) = pick;
        let from = from.index(streams.len());
        let len = streams[from].1.len();
        if swap {
            streams[from].1.swap(a.index(len), b.index(len));
        } else if streams.len() > 1 {
            let frame = streams[from].1.remove(a.index(len));
            let to = (from + 1 + b.index(streams.len() - 1)) % streams.len();
            let at = b.index(streams[to].1.len() + 1);
            streams[to].1.insert(at, frame);
        }
        let mut relay = Relay::new(plan.version);
        // `feed` asserts machine and model agree on each frame.
        read_interleaved(&mut relay, streams, &order);
    }

    /// The relay's acknowledgements with two swapped: refused as out of order exactly where an
    /// answer overtakes an older batch of its own lane (lanes are independent streams).
    #[test]
    fn swapped_acknowledgements_are_refused_only_within_a_lane(
        plan in plan(),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
    ) {
        let (streams, mut window) = transcript(&plan);
        let mut relay = Relay::new(plan.version);
        prop_assert!(read_interleaved(&mut relay, sorted(streams), &[0]));
        let mut answers = acks(&relay.accepted);
        let (a, b) = (a.index(answers.len()), b.index(answers.len()));
        let (first, second) = (a.min(b), a.max(b));
        answers.swap(first, second);
        // The model: per lane, the seqs in the order sent; an answer must be its lane's oldest.
        let mut lanes: HashMap<usize, std::collections::VecDeque<u64>> = HashMap::new();
        let mut lane_of_seq = HashMap::new();
        for b in &relay.accepted {
            let lane = window.lane_of(&b.topic, b.partition);
            lanes.entry(lane).or_default().push_back(b.seq);
            lane_of_seq.insert(b.seq, lane);
        }
        let mut overtaken = false;
        for answer in &answers {
            let Frame::Ack(ack) = answer else { continue };
            let queue = lanes.get_mut(&lane_of_seq[&ack.seq]).expect("lane");
            if queue.front() != Some(&ack.seq) {
                overtaken = true;
                break;
            }
            queue.pop_front();
        }
        let mut refused = false;
        for answer in answers {
            match window.receive(Some(answer)) {
                Ok(_) => {}
                Err(ProtocolError::AckOrder { .. }) => { refused = true; break; }
                Err(other) => prop_assert!(false, "{}", other),
            }
        }
        prop_assert_eq!(refused, overtaken);
        if !refused {
            prop_assert!(window.is_empty());
        }
    }

    /// Any frame, on any stream, at any version: the relay's verdict is the model's, and it
    /// never panics.
    #[test]
    fn arbitrary_frames_get_the_rules_verdict(
        version in 1..=MAX_PROTOCOL_VERSION,
        frames in prop::collection::vec((0u64..3, 0u8..8, 1u32..=3, 0usize..2, 0i32..3), 1..40),
    ) {
        let mut relay = Relay::new(version);
        let data_streams = version >= DATA_STREAMS_VERSION;
        for (stream, kind, id, topic, partition) in frames {
            let stream = if data_streams { stream } else { CONTROL_STREAM };
            let frame = match kind {
                0 => Some(dictionary(id)),
                1 => Some(batch(1, TOPICS[topic], partition, Codec::ZstdDict(id))),
                2 => Some(batch(1, TOPICS[topic], partition, Codec::Zstd)),
                3 => Some(Frame::Heartbeat(Heartbeat::default())),
                4 => Some(Frame::Goodbye(Goodbye { code: GoodbyeCode::Shutdown, reason: String::new() })),
                5 => Some(Frame::TopicConfig(TopicConfig { topic: TOPICS[topic].into(), entries: vec![] })),
                6 => Some(Frame::Ack(Ack { seq: 1, next_offset: 1 })),
                _ => None,
            };
            if !relay.feed(stream, frame) {
                break;
            }
        }
    }
}
