//! Batch payload decompression and record decoding under fuzzed header fields and limits
//! (layout: `spoke_fuzz::BatchInput`): no bomb inflates past its declaration, every limit holds,
//! decoded records re-encode and decode back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spoke_fuzz::check_batch_input(data));
