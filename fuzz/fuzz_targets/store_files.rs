//! Fuzz target `store_files`: see `firstkd::fuzzing::store_files`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(fx) = firstkd::fuzzing::Fixtures::get() {
        firstkd::fuzzing::store_files(fx, data);
    }
});
