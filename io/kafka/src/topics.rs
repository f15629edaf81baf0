//! What a broker says of its topics and of the cluster beyond what rust-rdkafka's metadata
//! gives: topic ids (KIP-516), the operations this client's principal may perform (KIP-430,
//! "authorized operations") and topic configurations, asked with librdkafka's DescribeTopics,
//! DescribeCluster and DescribeConfigs through its C API, synchronously on a client the
//! caller already has (the agent's tailer is a thread of its own, not async).
//!
//! Topic ids are how the agent tells a recreated edge topic from the old one where offsets
//! show nothing (a topic deleted and refilled past the agent's position while it was away);
//! permissions are how `spoke-relay check` finds a missing ACL before a session does.

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

/// A Kafka ACL operation, named as Kafka's ACL tools name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Read,
    Write,
    Create,
    Describe,
    DescribeConfigs,
    IdempotentWrite,
}

impl Operation {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Read => "Read",
            Operation::Write => "Write",
            Operation::Create => "Create",
            Operation::Describe => "Describe",
            Operation::DescribeConfigs => "DescribeConfigs",
            Operation::IdempotentWrite => "IdempotentWrite",
        })
    }
}

/// The operations the broker says this client may perform on a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions(u16);

impl Permissions {
    pub fn of(operations: &[Operation]) -> Permissions {
        Permissions(operations.iter().fold(0, |bits, op| bits | op.bit()))
    }

    pub fn allows(self, operation: Operation) -> bool {
        self.0 & operation.bit() != 0
    }

    /// Those of `needed` that are not allowed, in `needed`'s order.
    pub fn missing(self, needed: &[Operation]) -> Vec<Operation> {
        needed
            .iter()
            .copied()
            .filter(|op| !self.allows(*op))
            .collect()
    }

    fn from_raw(operations: &[rd::rd_kafka_AclOperation_t]) -> Permissions {
        use rd::rd_kafka_AclOperation_t as Acl;
        let every = [
            Operation::Read,
            Operation::Write,
            Operation::Create,
            Operation::Describe,
            Operation::DescribeConfigs,
            Operation::IdempotentWrite,
        ];
        let ops: Vec<Operation> = operations
            .iter()
            .flat_map(|raw| match raw {
                Acl::RD_KAFKA_ACL_OPERATION_ALL => every.to_vec(),
                Acl::RD_KAFKA_ACL_OPERATION_READ => vec![Operation::Read],
                Acl::RD_KAFKA_ACL_OPERATION_WRITE => vec![Operation::Write],
                Acl::RD_KAFKA_ACL_OPERATION_CREATE => vec![Operation::Create],
                Acl::RD_KAFKA_ACL_OPERATION_DESCRIBE => vec![Operation::Describe],
                Acl::RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS => vec![Operation::DescribeConfigs],
                Acl::RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE => vec![Operation::IdempotentWrite],
                _ => Vec::new(),
            })
            .collect();
        Permissions::of(&ops)
    }
}

/// One topic as the broker described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    /// Why the broker did not describe it, e.g. `UnknownTopicOrPartition`,
    /// `TopicAuthorizationFailed`; the other fields are empty then.
    pub error: Option<RDKafkaErrorCode>,
    pub id: Option<TopicId>,
    /// `None`: not asked for, or the broker does not report them.
    pub permissions: Option<Permissions>,
}

/// Describes `topics`, with this client's permissions on each if `with_permissions`.
/// Blocks for up to `timeout` (plus a second).
pub fn describe_topics(
    client: &NativeClient,
    topics: &[&str],
    with_permissions: bool,
    timeout: Duration,
) -> Result<HashMap<String, TopicDescription>, KafkaError> {
    let names = c_names(topics)?;
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let mut pointers: Vec<*const std::ffi::c_char> = names.iter().map(|n| n.as_ptr()).collect();
    // SAFETY: `pointers` point into `names`, which outlive the request (librdkafka copies
    // the strings into the collection, and the collection into the request); the collection
    // is destroyed once, after the request took its copy.
    #[allow(unsafe_code)]
    let event = unsafe {
        let collection =
            rd::rd_kafka_TopicCollection_of_topic_names(pointers.as_mut_ptr(), pointers.len());
        let event = request(
            client,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
            with_permissions,
            timeout,
            |rk, options, queue| rd::rd_kafka_DescribeTopics(rk, collection, options, queue),
        );
        rd::rd_kafka_TopicCollection_destroy(collection);
        event?
    };
    // SAFETY: `event` answers a DescribeTopics request; the descriptions and their fields
    // live as long as it, and nothing read here outlives this block.
    #[allow(unsafe_code)]
    unsafe {
        let result = rd::rd_kafka_event_DescribeTopics_result(event.0);
        if result.is_null() {
            return Err(failed(RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG));
        }
        let mut count = 0usize;
        let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        let mut described = HashMap::new();
        if descriptions.is_null() {
            return Ok(described);
        }
        for &description in std::slice::from_raw_parts(descriptions, count) {
            if description.is_null() {
                continue;
            }
            let name = rd::rd_kafka_TopicDescription_name(description);
            if name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(name).to_string_lossy().into_owned();
            let error = rd::rd_kafka_TopicDescription_error(description);
            if !error.is_null() {
                let code = RDKafkaErrorCode::from(rd::rd_kafka_error_code(error));
                described.insert(
                    name,
                    TopicDescription {
                        error: Some(code),
                        id: None,
                        permissions: None,
                    },
                );
                continue;
            }
            let uuid = rd::rd_kafka_TopicDescription_topic_id(description);
            let id = if uuid.is_null() {
                None
            } else {
                let mut bytes = [0u8; 16];
                bytes[..8]
                    .copy_from_slice(&rd::rd_kafka_Uuid_most_significant_bits(uuid).to_be_bytes());
                bytes[8..]
                    .copy_from_slice(&rd::rd_kafka_Uuid_least_significant_bits(uuid).to_be_bytes());
                TopicId::new(bytes)
            };
            let mut ops = 0usize;
            let raw = rd::rd_kafka_TopicDescription_authorized_operations(description, &mut ops);
            let permissions = (!raw.is_null())
                .then(|| Permissions::from_raw(std::slice::from_raw_parts(raw, ops)));
            described.insert(
                name,
                TopicDescription {
                    error: None,
                    id,
                    permissions,
                },
            );
        }
        Ok(described)
    }
}

/// The ids of those of `topics` that exist and have one; a topic missing from the answer is
/// unknown to the broker or has no id.
pub fn topic_ids(
    client: &NativeClient,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, TopicId>, KafkaError> {
    Ok(describe_topics(client, topics, false, timeout)?
        .into_iter()
        .filter_map(|(name, description)| Some((name, description.id?)))
        .collect())
}

/// One configuration entry of a topic, as the broker described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    pub name: String,
    /// `None` for a sensitive or unset value.
    pub value: Option<String>,
}

/// The configuration of each of `topics` that the broker describes (a topic it refuses or
/// does not know is missing from the answer). Blocks for up to `timeout` (plus a second).
pub fn topic_configs(
    client: &NativeClient,
    topics: &[&str],
    timeout: Duration,
) -> Result<HashMap<String, Vec<ConfigEntry>>, KafkaError> {
    let names = c_names(topics)?;
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    // SAFETY: each resource is created here from a live C string, handed to the request
    // (which copies it) and destroyed once, with the array, after the request is made.
    #[allow(unsafe_code)]
    let event = unsafe {
        let mut resources: Vec<*mut rd::rd_kafka_ConfigResource_t> = names
            .iter()
            .map(|name| {
                rd::rd_kafka_ConfigResource_new(
                    rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                    name.as_ptr(),
                )
            })
            .collect();
        let event = request(
            client,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS,
            false,
            timeout,
            |rk, options, queue| {
                rd::rd_kafka_DescribeConfigs(
                    rk,
                    resources.as_mut_ptr(),
                    resources.len(),
                    options,
                    queue,
                )
            },
        );
        rd::rd_kafka_ConfigResource_destroy_array(resources.as_mut_ptr(), resources.len());
        event?
    };
    // SAFETY: `event` answers a DescribeConfigs request; the resources, entries and their
    // strings live as long as it and are copied out within this block.
    #[allow(unsafe_code)]
    unsafe {
        let result = rd::rd_kafka_event_DescribeConfigs_result(event.0);
        if result.is_null() {
            return Err(failed(RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG));
        }
        let text = |p: *const std::ffi::c_char| {
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let mut count = 0usize;
        let resources = rd::rd_kafka_DescribeConfigs_result_resources(result, &mut count);
        let mut described = HashMap::new();
        if resources.is_null() {
            return Ok(described);
        }
        for &resource in std::slice::from_raw_parts(resources, count) {
            if resource.is_null()
                || rd::rd_kafka_ConfigResource_error(resource)
                    != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                continue;
            }
            let Some(topic) = text(rd::rd_kafka_ConfigResource_name(resource)) else {
                continue;
            };
            let mut entries_count = 0usize;
            let entries = rd::rd_kafka_ConfigResource_configs(resource, &mut entries_count);
            let mut config = Vec::new();
            if !entries.is_null() {
                for &entry in std::slice::from_raw_parts(entries, entries_count) {
                    if entry.is_null() {
                        continue;
                    }
                    let Some(name) = text(rd::rd_kafka_ConfigEntry_name(entry)) else {
                        continue;
                    };
                    config.push(ConfigEntry {
                        name,
                        value: text(rd::rd_kafka_ConfigEntry_value(entry)),
                    });
                }
            }
            described.insert(topic, config);
        }
        Ok(described)
    }
}

/// This client's permissions on the cluster (`Create` for topics, `IdempotentWrite`);
/// `None` where the broker does not report them.
pub fn cluster_permissions(
    client: &NativeClient,
    timeout: Duration,
) -> Result<Option<Permissions>, KafkaError> {
    // SAFETY: the event answers a DescribeCluster request, and the operations array lives as
    // long as it; it is copied out before the event is dropped.
    #[allow(unsafe_code)]
    unsafe {
        let event = request(
            client,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECLUSTER,
            true,
            timeout,
            |rk, options, queue| rd::rd_kafka_DescribeCluster(rk, options, queue),
        )?;
        let result = rd::rd_kafka_event_DescribeCluster_result(event.0);
        if result.is_null() {
            return Err(failed(RDKafkaRespErr::RD_KAFKA_RESP_ERR__BAD_MSG));
        }
        let mut ops = 0usize;
        let raw = rd::rd_kafka_DescribeCluster_result_authorized_operations(result, &mut ops);
        Ok((!raw.is_null()).then(|| Permissions::from_raw(std::slice::from_raw_parts(raw, ops))))
    }
}

fn c_names(topics: &[&str]) -> Result<Vec<CString>, KafkaError> {
    topics
        .iter()
        .map(|t| CString::new(*t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| KafkaError::AdminOpCreation("a topic name holds a NUL byte".into()))
}

fn failed(code: RDKafkaRespErr) -> KafkaError {
    KafkaError::AdminOp(RDKafkaErrorCode::from(code))
}

/// An answered admin request; destroyed once, when dropped.
struct Event(*mut rd::rd_kafka_event_t);

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `rd_kafka_queue_poll`, not null, and is owned here.
        #[allow(unsafe_code)]
        unsafe {
            rd::rd_kafka_event_destroy(self.0)
        }
    }
}

/// Sends one admin request with `submit` and waits for its answer on a queue of its own.
///
/// # Safety
/// `submit` must enqueue exactly one admin request of `kind` on the queue it is given.
#[allow(unsafe_code)]
unsafe fn request(
    client: &NativeClient,
    kind: rd::rd_kafka_admin_op_t,
    with_permissions: bool,
    timeout: Duration,
    submit: impl FnOnce(
        *mut rd::rd_kafka_t,
        *const rd::rd_kafka_AdminOptions_t,
        *mut rd::rd_kafka_queue_t,
    ),
) -> Result<Event, KafkaError> {
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `rk` is the live client's handle; options and queue are created here and
    // destroyed once each (options after the request copied them, the queue after its one
    // event was taken or the wait gave up, which librdkafka allows: the late answer is
    // dropped with the queue).
    unsafe {
        let rk = client.ptr();
        let options = rd::rd_kafka_AdminOptions_new(rk, kind);
        // The request times out with the wait, so nothing is left pending behind a timeout.
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if with_permissions {
            let error = rd::rd_kafka_AdminOptions_set_include_authorized_operations(options, 1);
            if !error.is_null() {
                rd::rd_kafka_error_destroy(error);
            }
        }
        let queue = rd::rd_kafka_queue_new(rk);
        submit(rk, options, queue);
        rd::rd_kafka_AdminOptions_destroy(options);
        // One more second than the request's own timeout, which answers with an event.
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms.saturating_add(1000));
        rd::rd_kafka_queue_destroy(queue);
        if event.is_null() {
            return Err(failed(RDKafkaRespErr::RD_KAFKA_RESP_ERR__TIMED_OUT));
        }
        let event = Event(event);
        let code = rd::rd_kafka_event_error(event.0);
        if code != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(failed(code));
        }
        Ok(event)
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

    #[test]
    fn all_grants_every_operation_and_missing_keeps_the_order_asked() {
        use rd::rd_kafka_AclOperation_t as Acl;
        let all = Permissions::from_raw(&[Acl::RD_KAFKA_ACL_OPERATION_ALL]);
        assert!(all
            .missing(&[Operation::Write, Operation::IdempotentWrite])
            .is_empty());
        let read_only = Permissions::from_raw(&[
            Acl::RD_KAFKA_ACL_OPERATION_READ,
            Acl::RD_KAFKA_ACL_OPERATION_DESCRIBE,
            Acl::RD_KAFKA_ACL_OPERATION_ALTER,
        ]);
        assert_eq!(
            read_only.missing(&[Operation::Write, Operation::Read, Operation::Create]),
            [Operation::Write, Operation::Create]
        );
    }
}
