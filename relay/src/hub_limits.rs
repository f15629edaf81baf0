//! What a hub topic takes, as the hub describes it: the largest record
//! (`max.message.bytes`) and the window of timestamps it accepts
//! (`message.timestamp.before.max.ms` / `after.max.ms`, or the older
//! `message.timestamp.difference.max.ms`, under `message.timestamp.type = CreateTime`); and
//! the names Kafka takes for a topic at all.
//!
//! The relay judges every record against these before the producer sees it, because a broker
//! that refuses one record fails the whole session (see [`crate::dead_letter`]). Clocks differ
//! and a record reaches the broker a while after it was judged, so the timestamp window is
//! narrowed by margins: a record near its edge is dead-lettered (counted, kept) rather than
//! risked (a stall).

use std::time::Duration;

/// How far the hub's clock may be from the relay's before the timestamp judgement errs
/// toward a stall; NTP-disciplined clocks stay far inside it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Kafka's value for "no limit" (`Long.MAX_VALUE`), and what a topic without the keys means.
const UNLIMITED: i64 = i64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// The topic's `max.message.bytes`; `None` when the hub did not say.
    pub max_message_bytes: Option<usize>,
    pub timestamps: TimestampWindow,
}

/// How far a record's CreateTime may lie before and after the broker's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampWindow {
    pub before_ms: i64,
    pub after_ms: i64,
}

impl TimestampWindow {
    /// Any timestamp: LogAppendTime topics, and hubs that do not describe their topics.
    pub const ANY: TimestampWindow = TimestampWindow {
        before_ms: UNLIMITED,
        after_ms: UNLIMITED,
    };

    /// Whether the hub would refuse a record stamped `timestamp_ms` that reaches it within
    /// `in_flight` of `now_ms` (both on the relay's clock).
    pub fn refuses(&self, timestamp_ms: i64, now_ms: i64, in_flight: Duration) -> bool {
        // A broker judges a record by its clock when the record arrives: a later arrival
        // makes old records older, so the in-flight time narrows only the past side.
        let before = narrowed(self.before_ms, CLOCK_SKEW + in_flight);
        let after = narrowed(self.after_ms, CLOCK_SKEW);
        let age = i128::from(now_ms) - i128::from(timestamp_ms);
        age > i128::from(before) || -age > i128::from(after)
    }
}

/// `limit` less `margin`, but never below half of it: a topic that takes a minute's skew
/// is not made to refuse everything.
fn narrowed(limit: i64, margin: Duration) -> i64 {
    if limit == UNLIMITED {
        return UNLIMITED;
    }
    let margin = i64::try_from(margin.as_millis()).unwrap_or(UNLIMITED);
    limit.saturating_sub(margin.min(limit / 2)).max(0)
}

impl TopicLimits {
    /// What the hub says of a topic that it does not describe.
    pub const UNKNOWN: TopicLimits = TopicLimits {
        max_message_bytes: None,
        timestamps: TimestampWindow::ANY,
    };

    /// Reads the limits from a topic's described configuration (`name` → value); keys it
    /// lacks, or cannot be read, limit nothing.
    pub fn from_configs<'a>(get: impl Fn(&str) -> Option<&'a str>) -> TopicLimits {
        let millis = |key: &str| get(key).and_then(|v| v.trim().parse::<i64>().ok());
        let log_append_time = get("message.timestamp.type")
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("LogAppendTime"));
        let timestamps = if log_append_time {
            // The broker stamps the record itself and judges nothing.
            TimestampWindow::ANY
        } else {
            // Kafka 3.6 split `difference.max.ms` in two; a hub may report either or both,
            // and the newer keys win.
            let difference = millis("message.timestamp.difference.max.ms");
            let limit = |key: &str| {
                millis(key)
                    .or(difference)
                    .filter(|&ms| ms >= 0)
                    .unwrap_or(UNLIMITED)
            };
            TimestampWindow {
                before_ms: limit("message.timestamp.before.max.ms"),
                after_ms: limit("message.timestamp.after.max.ms"),
            }
        };
        TopicLimits {
            max_message_bytes: get("max.message.bytes").and_then(|v| v.trim().parse().ok()),
            timestamps,
        }
    }
}

/// Kafka's longest topic name.
pub const MAX_TOPIC_NAME: usize = 249;

/// What Kafka refuses in a topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("empty, '.' or '..'")]
    Empty,
    #[error("over {MAX_TOPIC_NAME} characters")]
    TooLong,
    #[error("characters other than ASCII letters, digits, '.', '_' and '-'")]
    Characters,
}

/// Kafka's rule for topic names.
pub fn check_topic_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(TopicNameError::Empty);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(TopicNameError::Characters);
    }
    if name.len() > MAX_TOPIC_NAME {
        return Err(TopicNameError::TooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn limits(configs: &[(&str, &str)]) -> TopicLimits {
        let map: HashMap<&str, &str> = configs.iter().copied().collect();
        TopicLimits::from_configs(|key| map.get(key).copied())
    }

    const HOUR: i64 = 3_600_000;
    const NOW: i64 = 1_800_000_000_000;
    const IN_FLIGHT: Duration = Duration::from_secs(10);

    #[test]
    fn a_topic_without_timestamp_limits_takes_any_timestamp() {
        let described = limits(&[("max.message.bytes", "1048588")]);
        assert_eq!(described.max_message_bytes, Some(1_048_588));
        for timestamp in [0, NOW - 10 * 365 * 24 * HOUR, NOW + 10 * HOUR, i64::MAX] {
            assert!(!described.timestamps.refuses(timestamp, NOW, IN_FLIGHT));
        }
        // Kafka's own "unlimited" is the same.
        let unlimited = limits(&[("message.timestamp.before.max.ms", "9223372036854775807")]);
        assert!(!unlimited.timestamps.refuses(0, NOW, IN_FLIGHT));
    }

    #[test]
    fn before_and_after_limits_are_judged_with_margins() {
        let window = limits(&[
            ("message.timestamp.before.max.ms", &HOUR.to_string()),
            ("message.timestamp.after.max.ms", &HOUR.to_string()),
        ])
        .timestamps;
        assert!(!window.refuses(NOW, NOW, IN_FLIGHT));
        assert!(!window.refuses(NOW - HOUR + 60_000, NOW, IN_FLIGHT));
        // Inside the hour on the relay's clock, but not by the skew and the in-flight time.
        assert!(window.refuses(NOW - HOUR + 30_000, NOW, IN_FLIGHT));
        assert!(window.refuses(NOW - 2 * HOUR, NOW, IN_FLIGHT));
        assert!(!window.refuses(NOW + HOUR - 60_000, NOW, IN_FLIGHT));
        assert!(window.refuses(NOW + HOUR - 10_000, NOW, IN_FLIGHT));
        assert!(window.refuses(i64::MAX, NOW, IN_FLIGHT));
        assert!(window.refuses(i64::MIN, NOW, IN_FLIGHT));
    }

    #[test]
    fn the_older_difference_key_limits_both_sides_unless_a_newer_key_says_otherwise() {
        let window = limits(&[
            ("message.timestamp.difference.max.ms", &HOUR.to_string()),
            ("message.timestamp.after.max.ms", "9223372036854775807"),
        ])
        .timestamps;
        assert!(window.refuses(NOW - 2 * HOUR, NOW, IN_FLIGHT));
        assert!(!window.refuses(NOW + 2 * HOUR, NOW, IN_FLIGHT));
    }

    #[test]
    fn log_append_time_topics_judge_no_timestamp() {
        let window = limits(&[
            ("message.timestamp.type", "LogAppendTime"),
            ("message.timestamp.before.max.ms", "1000"),
        ])
        .timestamps;
        assert!(!window.refuses(0, NOW, IN_FLIGHT));
    }

    #[test]
    fn a_small_limit_keeps_half_of_itself() {
        let window = limits(&[("message.timestamp.before.max.ms", "20000")]).timestamps;
        assert!(!window.refuses(NOW - 9_000, NOW, IN_FLIGHT));
        assert!(window.refuses(NOW - 11_000, NOW, IN_FLIGHT));
        // Unreadable or negative values limit nothing rather than everything.
        let odd = limits(&[
            ("message.timestamp.before.max.ms", "-5"),
            ("message.timestamp.after.max.ms", "soon"),
        ]);
        assert_eq!(odd.timestamps, TimestampWindow::ANY);
    }
}
