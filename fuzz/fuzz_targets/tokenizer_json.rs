#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe_text::fuzz_tokenizer_json(data));
