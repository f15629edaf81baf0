//! The local broker's topic ids (KIP-516): a topic deleted and created anew under the same
//! name gets a new one. It is the only sign of a recreated topic that was refilled past the
//! agent's position while the agent was away, where offsets show nothing (see
//! [`crate::spool::Incarnation`]).
//!
//! rust-rdkafka's consumer API does not give topic ids, so this asks librdkafka's
//! DescribeTopics (a Metadata request) through its C API, on the tailer's own client.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fmt;
use std::time::Duration;

use base64::Engine;
use rdkafka::bindings as rd;
use rdkafka::client::NativeClient;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;

/// A topic's id as the broker gave it; never the all-zero id that brokers without topic ids
/// (and tansu, for a topic it does not know) answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(pub [u8; 16]);

impl TopicId {
    pub fn new(bytes: [u8; 16]) -> Option<TopicId> {
        (bytes != [0; 16]).then_some(TopicId(bytes))
    }
}

impl fmt::Display for TopicId {
    /// As Kafka's tools print it: URL-safe base64 without padding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0))
    }
}

/// The ids of those of `topics` that exist and have one; a topic missing from the answer is
/// unknown to the broker or has no id. Blocks for up to `timeout`.
pub fn describe(
    client: &NativeClient,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, TopicId>, KafkaError> {
    let names = topics
        .iter()
        .map(|t| CString::new(*t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| KafkaError::AdminOpCreation("a topic name holds a NUL byte".into()))?;
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let failed = |code: RDKafkaRespErr| KafkaError::AdminOp(RDKafkaErrorCode::from(code));
    // SAFETY: every pointer passed is either from librdkafka for this call or points into
    // `names`, which outlives the calls that read it (the collection and the request copy
    // the strings). Each object created here is destroyed exactly once below, the event
    // after the last read of the descriptions it owns.
    #[allow(unsafe_code)]
    unsafe {
        let rk = client.ptr();
        let mut pointers: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let collection =
            rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        // The request times out with the wait, so nothing is left pending behind a timeout.
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let queue = rd::rd_kafka_queue_new(rk);
        rd::rd_kafka_DescribeTopics(rk, collection, options, queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(collection);
        // One more second than the request's own timeout, which answers with an event.
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1000));
        rd::rd_kafka_queue_destroy(queue);
        if event.is_null() {
            return Err(failed(RDKafkaRespErr::RD_KAFKA_RESP_ERR__TIMED_OUT));
        }
        let answer = read_answer(event);
        rd::rd_kafka_event_destroy(event);
        answer.map_err(failed)
    }
}

/// # Safety
/// `event` is a live event from a DescribeTopics request.
#[allow(unsafe_code)]
unsafe fn read_answer(
    event: *mut rd::rd_kafka_event_t,
) -> Result<HashMap<String, TopicId>, RDKafkaRespErr> {
    // SAFETY: the caller's; the descriptions and their fields live as long as the event.
    unsafe {
        let code = rd::rd_kafka_event_error(event);
        if code != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(code);
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event);
        if result.is_null() {
            return Err(RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG);
        }
        let mut count = 0usize;
        let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        let mut ids = HashMap::new();
        if descriptions.is_null() {
            return Ok(ids);
        }
        for &description in std::slice::from_raw_parts(descriptions, count) {
            if description.is_null() || !rd::rd_kafka_TopicDescription_error(description).is_null()
            {
                continue;
            }
            let name = rd::rd_kafka_TopicDescription_name(description);
            let uuid = rd::rd_kafka_TopicDescription_topic_id(description);
            if name.is_null() || uuid.is_null() {
                continue;
            }
            let mut bytes = [0u8; 16];
            bytes[..8]
                .copy_from_slice(&rd::rd_kafka_Uuid_most_significant_bits(uuid).to_be_bytes());
            bytes[8..]
                .copy_from_slice(&rd::rd_kafka_Uuid_least_significant_bits(uuid).to_be_bytes());
            if let Some(id) = TopicId::new(bytes) {
                ids.insert(CStr::from_ptr(name).to_string_lossy().into_owned(), id);
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_id_is_no_id_and_ids_print_as_kafka_prints_them() {
        assert_eq!(TopicId::new([0; 16]), None);
        let id = TopicId::new([
            0x47, 0x76, 0x69, 0x47, 0x4f, 0x9d, 0x45, 0x6c, 0x8e, 0x0a, 0xdd, 0x51, 0x7f, 0x23,
            0xc4, 0x8e,
        ])
        .expect("not zero");
        assert_eq!(id.to_string(), "R3ZpR0-dRWyOCt1RfyPEjg");
    }
}
