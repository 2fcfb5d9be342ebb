#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe_store::fuzzing::gguf_file(data));
