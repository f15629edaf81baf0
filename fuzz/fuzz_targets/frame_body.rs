//! Arbitrary frame bodies behind a valid header and CRC, so the parsers of every message a relay
//! reads from a peer (Hello, Batch, Heartbeat, Goodbye, and the rest) see hostile bodies rather
//! than bouncing off the checksum. First byte: frame type (1..=8, wrapping); the rest: body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let frame_type = 1 + kind.wrapping_sub(1) % 8;
    spoke_fuzz::check_stream(&spoke_fuzz::frame_with_body(frame_type, body));
});
