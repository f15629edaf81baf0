//! Frame *sequences* through both sides' connection machines (`spoke_proto::connection`), for
//! the `connection` target: the fuzzer picks the version, opens streams, and sends frames that
//! are mostly plausible (so that deep states are reached) and sometimes arbitrary, in any order,
//! cut anywhere. Every verdict is compared with a plain statement of the rules below, written
//! independently of the machines, and the machines' counters with the model's.

use std::collections::{HashMap, HashSet, VecDeque};

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use spoke_proto::connection::agent::{Reply, Window};
use spoke_proto::connection::relay::{Inbound, InboundStream, PartitionStreams};
use spoke_proto::connection::{ProtocolError, CONTROL_STREAM};
use spoke_proto::{
    Ack, Batch, Codec, Dictionary, DictionaryError, DictionaryLimits, Frame, Goodbye, GoodbyeCode,
    Heartbeat, Hello, Nack, NackCode, Negotiated, Rejected, RejectedRange, TopicConfig,
    MAX_PROTOCOL_VERSION,
};

const TOPICS: [&str; 3] = ["orders", "metrics", "logs"];

/// Small caps, so that sequences reach them.
const LIMITS: DictionaryLimits = DictionaryLimits {
    max_dictionaries: 2,
    max_dictionary_bytes: 48,
};

/// The first input byte picks the side.
pub fn check_connection(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    if u.arbitrary()? {
        check_relay(&mut u)
    } else {
        check_agent(&mut u)
    }
}

fn version(u: &mut Unstructured) -> Result<Negotiated> {
    let max = u.int_in_range(1..=MAX_PROTOCOL_VERSION)?;
    let hello = Hello {
        site: "s".into(),
        min_version: 1,
        max_version: max,
        software: "fuzz".into(),
        partitions: vec![],
    };
    Ok(Negotiated::from_hello(&hello).expect("a version this build speaks"))
}

fn dictionary_frame(u: &mut Unstructured) -> Result<Frame> {
    let id = u.int_in_range(1..=3)?;
    // Two contents per id (a conflict), empty, and one over the cap.
    let dictionary = match u.int_in_range(0..=3)? {
        0 => Bytes::from(format!("dictionary {id} a")),
        1 => Bytes::from(format!("dictionary {id} b")),
        2 => Bytes::new(),
        _ => Bytes::from(vec![b'x'; LIMITS.max_dictionary_bytes as usize + 1]),
    };
    Ok(Frame::Dictionary(Dictionary { id, dictionary }))
}

fn batch(u: &mut Unstructured, seq: u64) -> Result<Batch> {
    let codec = match u.int_in_range(0..=3)? {
        0 => Codec::Zstd,
        1 => Codec::None,
        id => Codec::ZstdDict(id - 1),
    };
    Ok(Batch {
        seq,
        topic: TOPICS[u.choose_index(TOPICS.len())?].into(),
        partition: u.int_in_range(0..=2)?,
        partition_count: 3,
        first_offset: 0,
        last_offset: 0,
        next_offset: 1,
        record_count: 1,
        codec,
        uncompressed_len: 0,
        payload: Bytes::new(),
    })
}

/// A frame an agent could send, or (rarely) anything at all.
fn agent_frame(u: &mut Unstructured) -> Result<Option<Frame>> {
    Ok(Some(match u.int_in_range(0..=9)? {
        0 | 1 => dictionary_frame(u)?,
        2..=4 => Frame::Batch(batch(u, 1)?),
        5 => Frame::Heartbeat(Heartbeat::default()),
        6 => Frame::Goodbye(Goodbye {
            code: GoodbyeCode::Shutdown,
            reason: String::new(),
        }),
        7 => Frame::TopicConfig(TopicConfig {
            topic: TOPICS[u.choose_index(TOPICS.len())?].into(),
            entries: vec![],
        }),
        8 => crate::structured::frame(u)?,
        _ => return Ok(None),
    }))
}

/// The relay's rules for its inbound streams, stated plainly.
#[derive(Default)]
struct RelayRules {
    /// Per stream, the dictionaries it defined, with their bytes.
    dictionaries: HashMap<u64, HashMap<u32, Bytes>>,
    pinned: HashMap<(String, i32), u64>,
    ended: HashSet<u64>,
}

/// What the rules say of one frame.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Take,
    Refuse,
    /// Only zstd can say whether it loads this dictionary.
    TakeUnlessZstdRefuses,
}

impl RelayRules {
    fn judge(&mut self, version: Negotiated, stream: u64, frame: Option<&Frame>) -> Verdict {
        let control = stream == CONTROL_STREAM;
        if self.ended.contains(&stream) {
            return Verdict::Refuse;
        }
        let Some(frame) = frame else {
            self.ended.insert(stream);
            return Verdict::Take;
        };
        if frame.version() > version.number() {
            return Verdict::Refuse;
        }
        match frame {
            Frame::Dictionary(d) => {
                let known = self.dictionaries.entry(stream).or_default();
                if d.dictionary.is_empty()
                    || d.dictionary.len() > LIMITS.max_dictionary_bytes as usize
                {
                    return Verdict::Refuse;
                }
                match known.get(&d.id) {
                    Some(bytes) if *bytes == d.dictionary => Verdict::Take,
                    Some(_) => Verdict::Refuse,
                    None if known.len() >= LIMITS.max_dictionaries as usize => Verdict::Refuse,
                    None => {
                        known.insert(d.id, d.dictionary.clone());
                        Verdict::TakeUnlessZstdRefuses
                    }
                }
            }
            Frame::Batch(b) => {
                if let Some(id) = b.codec.dictionary_id() {
                    let defined = self.dictionaries.get(&stream);
                    if !defined.is_some_and(|d| d.contains_key(&id)) {
                        return Verdict::Refuse;
                    }
                }
                let key = (b.topic.clone(), b.partition);
                if *self.pinned.entry(key).or_insert(stream) == stream {
                    Verdict::Take
                } else {
                    Verdict::Refuse
                }
            }
            Frame::TopicConfig(_) => Verdict::Take,
            Frame::Heartbeat(_) if control => Verdict::Take,
            Frame::Goodbye(_) if control => {
                self.ended.insert(stream);
                Verdict::Take
            }
            _ => Verdict::Refuse,
        }
    }
}

fn check_relay(u: &mut Unstructured) -> Result<()> {
    let version = version(u)?;
    let mut streams = vec![InboundStream::control(version, LIMITS)];
    let mut pins = PartitionStreams::default();
    let mut rules = RelayRules::default();
    while !u.is_empty() {
        if u.ratio(1, 8)? {
            let id = streams.len() as u64;
            match InboundStream::data(id, version, LIMITS) {
                Ok(stream) => {
                    assert!(
                        version.data_streams(),
                        "a data stream at version {version:?}"
                    );
                    streams.push(stream);
                }
                Err(error) => assert!(!version.data_streams(), "{error}"),
            }
            continue;
        }
        let at = u.choose_index(streams.len())?;
        let stream = &mut streams[at];
        let id = stream.id();
        let frame = agent_frame(u)?;
        let expected = rules.judge(version, id, frame.as_ref());
        let verdict = stream
            .receive(frame.clone())
            .and_then(|inbound| match inbound {
                Inbound::Batch(b) => pins.pin(&b, id),
                _ => Ok(()),
            });
        let agrees = match (&expected, &verdict) {
            (Verdict::Take, Ok(())) | (Verdict::Refuse, Err(_)) => true,
            (Verdict::TakeUnlessZstdRefuses, Ok(())) => true,
            (
                Verdict::TakeUnlessZstdRefuses,
                Err(ProtocolError::Dictionary {
                    source: DictionaryError::Load { .. },
                    ..
                }),
            ) => {
                // Refused after all: the rules forget it again.
                if let Some(Frame::Dictionary(d)) = &frame {
                    rules.dictionaries.entry(id).or_default().remove(&d.id);
                }
                true
            }
            _ => false,
        };
        assert!(
            agrees,
            "stream {id}, {frame:?}: rules say {expected:?}, machine {verdict:?}"
        );
        if verdict.is_err() {
            // The connection ends at the first refusal.
            return Ok(());
        }
    }
    Ok(())
}

/// A batch in flight, as the rules keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    seq: u64,
    bytes: u64,
    topic: String,
    partition: i32,
}

fn check_agent(u: &mut Unstructured) -> Result<()> {
    let version = version(u)?;
    let lanes = if version.data_streams() {
        u.int_in_range(1..=4)?
    } else {
        1
    };
    let max_batches = u.int_in_range(1..=8)?;
    let max_bytes = u.int_in_range(1..=1000)?;
    let mut window: Window<u64> = Window::new(version, lanes, max_batches, max_bytes);
    // The rules' own bookkeeping.
    let mut in_flight: Vec<VecDeque<Sent>> = vec![VecDeque::new(); lanes];
    let mut lane_of: HashMap<(String, i32), usize> = HashMap::new();
    let mut configs_sent: HashSet<(usize, String)> = HashSet::new();
    let mut dictionaries_sent: HashSet<(usize, u32)> = HashSet::new();
    let mut last_seq = 0;
    while !u.is_empty() {
        let (batches, bytes) = in_flight
            .iter()
            .flatten()
            .fold((0, 0), |(n, b), s| (n + 1, b + s.bytes));
        assert_eq!((window.batches(), window.bytes()), (batches, bytes));
        let room = batches < max_batches && (batches == 0 || bytes < max_bytes);
        assert_eq!(window.has_room(), room);
        if room && u.ratio(1, 2)? {
            let topic = TOPICS[u.choose_index(TOPICS.len())?];
            let partition = u.int_in_range(0..=2)?;
            let dictionary = if u.arbitrary()? {
                Some(u.int_in_range(1..=3)?)
            } else {
                None
            };
            let dealt = lane_of.len() % lanes;
            let lane = *lane_of.entry((topic.into(), partition)).or_insert(dealt);
            assert_eq!(window.lane_of(topic, partition), lane);
            let ahead = window.ahead(lane, topic, dictionary);
            let first_config = configs_sent.insert((lane, topic.into()));
            assert_eq!(ahead.topic_config, version.topic_configs() && first_config);
            if !version.topic_configs() {
                configs_sent.remove(&(lane, topic.into()));
            }
            match dictionary {
                Some(_) if !version.dictionaries() => {
                    assert!(ahead.without_dictionary && ahead.dictionary.is_none())
                }
                Some(id) => {
                    let first = dictionaries_sent.insert((lane, id));
                    assert_eq!(ahead.dictionary, first.then_some(id));
                    assert!(!ahead.without_dictionary);
                }
                None => assert!(ahead.dictionary.is_none() && !ahead.without_dictionary),
            }
            let size = u.int_in_range(1..=400)?;
            assert_eq!(window.next_seq(), last_seq + 1);
            last_seq = window.sent(lane, size, topic, partition, last_seq + 1);
            in_flight[lane].push_back(Sent {
                seq: last_seq,
                bytes: size,
                topic: topic.into(),
                partition,
            });
            continue;
        }
        let frame = relay_frame(u, &in_flight, last_seq)?;
        let front = |seq: u64| {
            in_flight
                .iter()
                .position(|lane| lane.front().is_some_and(|s| s.seq == seq))
        };
        let expected_ok = match &frame {
            Some(f) if f.version() > version.number() => false,
            Some(Frame::Ack(Ack { seq, .. })) | Some(Frame::Nack(Nack { seq, .. })) => {
                front(*seq).is_some()
            }
            Some(Frame::Rejected(r)) => front(r.seq).is_some_and(|lane| {
                in_flight[lane]
                    .front()
                    .is_some_and(|s| s.topic == r.topic && s.partition == r.partition)
            }),
            Some(Frame::Goodbye(_)) | None => true,
            Some(_) => false,
        };
        let reply = window.receive(frame.clone());
        assert_eq!(
            reply.is_ok(),
            expected_ok,
            "{frame:?}: machine says {reply:?}"
        );
        match reply {
            Ok(Reply::Acked { batch, .. }) | Ok(Reply::Nacked { batch, .. }) => {
                let lane = front(batch.seq).expect("answered from a lane's front");
                let sent = in_flight[lane].pop_front().expect("front");
                assert_eq!(
                    (sent.seq, sent.bytes, sent.topic, sent.partition, sent.seq),
                    (
                        batch.seq,
                        batch.bytes,
                        batch.topic,
                        batch.partition,
                        batch.batch
                    )
                );
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// A frame a relay could send about the batches in flight, or (rarely) anything at all.
fn relay_frame(
    u: &mut Unstructured,
    in_flight: &[VecDeque<Sent>],
    last_seq: u64,
) -> Result<Option<Frame>> {
    let sent: Vec<&Sent> = in_flight.iter().flatten().collect();
    let seq = if !sent.is_empty() && u.ratio(7, 8)? {
        sent[u.choose_index(sent.len())?].seq
    } else {
        u.int_in_range(0..=last_seq + 1)?
    };
    let named = sent.iter().find(|s| s.seq == seq);
    Ok(Some(match u.int_in_range(0..=7)? {
        0..=2 => Frame::Ack(Ack {
            seq,
            next_offset: 1,
        }),
        3 => Frame::Nack(Nack {
            seq,
            code: NackCode::NotAllowed,
            message: String::new(),
        }),
        4 => Frame::Rejected(Rejected {
            seq,
            topic: named.map_or_else(|| "elsewhere".into(), |s| s.topic.clone()),
            partition: named.map_or(0, |s| s.partition) + i32::from(u.ratio(1, 8)?),
            reason: "too_large".into(),
            ranges: vec![RejectedRange {
                first_offset: 0,
                last_offset: 0,
                records: 1,
            }],
        }),
        5 => Frame::Goodbye(Goodbye {
            code: GoodbyeCode::Shutdown,
            reason: String::new(),
        }),
        6 => crate::structured::frame(u)?,
        _ => return Ok(None),
    }))
}
