//! Structured frames and records built from the input: decode(encode(x)) == x, and tight batch
//! limits refuse exactly what exceeds them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spoke_fuzz::structured::check_roundtrip(data);
});
