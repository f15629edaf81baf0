//! Arbitrary bytes as a stream from a peer: one-shot and piecewise frame decoding agree, every
//! decoded frame re-encodes to its bytes, every decoded batch decodes its records within limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spoke_fuzz::check_stream(data));
