//! spoke-transport: the QUIC transport both binaries speak. spoke-proto stays sans-IO; this
//! crate awaits frames on QUIC streams (`wire`), holds the transport settings both ends agree
//! on (`transport`) and spoke's congestion controller (`congestion`). It knows nothing of
//! Kafka, configuration files or command lines.

pub mod congestion;
pub mod transport;
pub mod wire;
