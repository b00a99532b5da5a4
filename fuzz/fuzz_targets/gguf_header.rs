//! Fuzz target `gguf_header`: see `firstkd::fuzzing::gguf_header`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(fx) = firstkd::fuzzing::Fixtures::get() {
        firstkd::fuzzing::gguf_header(fx, data);
    }
});
