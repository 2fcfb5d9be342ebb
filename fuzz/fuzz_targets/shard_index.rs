#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe::fuzzing::shard_index(data));
