//! Frame sequences through both sides' connection state machines: every verdict must be the
//! rules' (see `spoke_fuzz::connection`), whatever order, stream or cut the input picks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spoke_fuzz::connection::check_connection(data);
});
