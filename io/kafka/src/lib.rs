//! spoke-kafka: what both binaries need of a Kafka client beyond rust-rdkafka: the security
//! settings of a cluster turned into librdkafka properties (`security`), `check` with
//! diagnoses an operator can act on (`check`), and what librdkafka's C API tells of topics
//! (`topics`: ids, permissions, configurations).

pub mod check;
pub mod security;
pub mod topics;
