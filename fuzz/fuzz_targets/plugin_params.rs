#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| probe_contract::params::fuzz_plugin_params(data));
