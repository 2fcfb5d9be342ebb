#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe_store::fuzzing::safetensors_file(data));
