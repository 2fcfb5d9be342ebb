#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/data/llama-tied-f32");
    probe_store::fuzzing::config_json(data, std::path::Path::new(fixture))
});
