//! spoke-io: the I/O half of the protocol and the plumbing both binaries share.
//! spoke-proto stays sans-IO; this crate awaits streams, reads files and sockets.

pub mod admin_client;
pub mod config_file;
pub mod congestion;
pub mod failpoint;
pub mod kafka_check;
pub mod kafka_security;
pub mod kafka_topics;
pub mod logging;
pub mod pem;
pub mod transport;
pub mod wire;
