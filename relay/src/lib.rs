//! spoke-relay: terminates agents' QUIC sessions in the central region and produces their
//! records into the hub Kafka cluster, keeping all progress in the hub itself.
//!
//! Data path: [`server`] accepts connections → [`session`] authenticates the site and decodes
//! batches → [`handoff`] hands them to the producer a request at a time → [`producer`] (shared
//! by sites, or a site's own transactional one) produces them into the [`hub`]; [`resume`]
//! finds resume points; [`hub_limits`] says which records a hub topic refuses and
//! [`dead_letter`] takes them instead. [`tls`], [`deny`] and [`pki`] handle identities, [`config`] the
//! relay.toml contract, [`check`] what `spoke-relay check` asks the hub.

pub mod admin;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod dead_letter;
pub mod deny;
pub mod fleet;
pub mod handoff;
pub mod hub;
pub mod hub_limits;
pub mod pki;
pub mod producer;
pub mod resume;
pub mod server;
pub mod session;
pub mod tls;
