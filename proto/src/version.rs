//! Protocol versions: the range a peer speaks, how the relay picks one from an agent's
//! `Hello`, how the agent checks the relay's pick in `Welcome`, and what each version enables.
//! Both binaries ask [`Negotiated`] what they may send, never a bare number.

use crate::{Hello, Welcome, MAX_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// The version that adds the `Dictionary` frame and the dictionary codec.
pub const DICTIONARY_VERSION: u8 = 2;

/// The version from which the agent may send batches on data streams.
pub const DATA_STREAMS_VERSION: u8 = 3;

/// The version from which the relay tells the agent which records the hub refused
/// (`Rejected`).
pub const REJECTED_VERSION: u8 = 4;

/// The version from which the agent tells the relay the source topic's configuration that a
/// hub topic must keep (`TopicConfig`).
pub const TOPIC_CONFIG_VERSION: u8 = 5;

/// Why two peers cannot talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The agent's `Hello` offers no version this build speaks (or an empty range).
    #[error("no common protocol version (agent speaks {min}..={max}, this build {PROTOCOL_VERSION}..={MAX_PROTOCOL_VERSION})")]
    NoCommonVersion {
        /// The lowest version the agent offered.
        min: u8,
        /// The highest version the agent offered.
        max: u8,
    },
    /// The relay's `Welcome` picked a version the agent did not offer.
    #[error(
        "the relay chose protocol version {chosen}, outside the {min}..={max} this agent offered"
    )]
    NotOffered {
        /// What `Welcome` says.
        chosen: u8,
        /// The lowest version the agent offered.
        min: u8,
        /// The highest version the agent offered.
        max: u8,
    },
}

/// The protocol version a connection uses, and what it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Negotiated(u8);

impl Negotiated {
    /// The relay's pick: the highest version both speak.
    pub fn from_hello(hello: &Hello) -> Result<Negotiated, VersionError> {
        let refused = VersionError::NoCommonVersion {
            min: hello.min_version,
            max: hello.max_version,
        };
        if hello.min_version > hello.max_version
            || hello.min_version > MAX_PROTOCOL_VERSION
            || hello.max_version < PROTOCOL_VERSION
        {
            return Err(refused);
        }
        Ok(Negotiated(hello.max_version.min(MAX_PROTOCOL_VERSION)))
    }

    /// The agent's check of the relay's pick: it must lie in the range `(min, max)` the agent
    /// offered in its `Hello`, or the relay may send frames the agent cannot read (and expect
    /// ones it never sends).
    pub fn from_welcome(offered: (u8, u8), welcome: &Welcome) -> Result<Negotiated, VersionError> {
        let (min, max) = offered;
        if !(min..=max).contains(&welcome.version) {
            return Err(VersionError::NotOffered {
                chosen: welcome.version,
                min,
                max,
            });
        }
        Ok(Negotiated(welcome.version))
    }

    /// The version number, as `Welcome` carries it.
    pub fn number(self) -> u8 {
        self.0
    }

    /// Whether a frame of layout version `frame_version` may be sent on this connection.
    pub fn allows(self, frame_version: u8) -> bool {
        frame_version <= self.0
    }

    /// `Dictionary` frames and batches compressed with one.
    pub fn dictionaries(self) -> bool {
        self.0 >= DICTIONARY_VERSION
    }

    /// Batches on data streams beside the control stream.
    pub fn data_streams(self) -> bool {
        self.0 >= DATA_STREAMS_VERSION
    }

    /// `Rejected` frames before a batch's `Ack`.
    pub fn rejected(self) -> bool {
        self.0 >= REJECTED_VERSION
    }

    /// `TopicConfig` frames ahead of a topic's first batch on a stream.
    pub fn topic_configs(self) -> bool {
        self.0 >= TOPIC_CONFIG_VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u8, max: u8) -> Hello {
        Hello {
            site: "s".into(),
            min_version: min,
            max_version: max,
            software: "test".into(),
            partitions: vec![],
        }
    }

    fn welcome(version: u8) -> Welcome {
        Welcome {
            version,
            relay: "r".into(),
            resume: vec![],
        }
    }

    #[test]
    fn the_relay_picks_the_highest_common_version() {
        let picked = |min, max| Negotiated::from_hello(&hello(min, max)).map(Negotiated::number);
        assert_eq!(picked(1, 1), Ok(1));
        assert_eq!(picked(1, 2), Ok(2));
        assert_eq!(picked(1, MAX_PROTOCOL_VERSION), Ok(MAX_PROTOCOL_VERSION));
        assert_eq!(picked(2, 200), Ok(MAX_PROTOCOL_VERSION));
        for (min, max) in [(MAX_PROTOCOL_VERSION + 1, 200), (0, 0), (2, 1)] {
            assert_eq!(
                picked(min, max),
                Err(VersionError::NoCommonVersion { min, max })
            );
        }
    }

    #[test]
    fn the_agent_refuses_a_version_it_did_not_offer() {
        let offered = (1, 3);
        for chosen in 1..=3 {
            assert_eq!(
                Negotiated::from_welcome(offered, &welcome(chosen)).map(Negotiated::number),
                Ok(chosen)
            );
        }
        for chosen in [0, 4, 255] {
            assert_eq!(
                Negotiated::from_welcome(offered, &welcome(chosen)),
                Err(VersionError::NotOffered {
                    chosen,
                    min: 1,
                    max: 3
                })
            );
        }
    }

    #[test]
    fn each_version_enables_its_own_features_and_those_before() {
        let at = |v| Negotiated::from_hello(&hello(v, v)).expect("spoken");
        let features = |n: Negotiated| {
            [
                n.dictionaries(),
                n.data_streams(),
                n.rejected(),
                n.topic_configs(),
            ]
        };
        assert_eq!(features(at(1)), [false, false, false, false]);
        assert_eq!(features(at(2)), [true, false, false, false]);
        assert_eq!(features(at(3)), [true, true, false, false]);
        assert_eq!(features(at(4)), [true, true, true, false]);
        assert_eq!(features(at(5)), [true, true, true, true]);
        assert!(at(2).allows(2) && !at(2).allows(3));
    }
}
