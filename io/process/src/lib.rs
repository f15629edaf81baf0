//! spoke-process: the plumbing around the work of a spoke process, shared by spoke-agent and
//! spoke-relay: configuration files (`config_file`), logging and its rate limit (`logging`),
//! the wall clock they stamp reports with (`clock`), the client of the local admin endpoint
//! (`admin_client`), certificates and keys from PEM files (`pem`) and named failpoints for
//! the test suite (`failpoint`).

pub mod admin_client;
pub mod clock;
pub mod config_file;
pub mod failpoint;
pub mod logging;
pub mod pem;
