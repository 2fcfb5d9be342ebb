#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe::fuzzing::plugin_params(data));
