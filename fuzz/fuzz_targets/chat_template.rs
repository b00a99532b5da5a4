//! Fuzz target `chat_template`: see `firstkd::fuzzing::chat_template`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(fx) = firstkd::fuzzing::Fixtures::get() {
        firstkd::fuzzing::chat_template(fx, data);
    }
});
