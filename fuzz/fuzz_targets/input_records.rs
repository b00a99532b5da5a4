//! Fuzz target `input_records`: see `firstkd::fuzzing::input_records`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(fx) = firstkd::fuzzing::Fixtures::get() {
        firstkd::fuzzing::input_records(fx, data);
    }
});
