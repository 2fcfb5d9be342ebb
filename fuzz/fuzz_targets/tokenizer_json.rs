#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe::fuzzing::tokenizer_json(data));
