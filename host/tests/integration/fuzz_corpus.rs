//! Replays the fuzzers' corpus (fuzz/corpus/<target>/) and every input a
//! fuzzer ever crashed on (fuzz/regressions/<target>/) through the same entry
//! points `cargo fuzz` drives. Each must return without panicking.

use std::path::Path;

fn inputs(target: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for folder in ["corpus", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) {
            files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    files
}

fn replay(target: &str, run: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&bytes)));
        assert!(outcome.is_ok(), "{target} panicked on {}", file.display());
    }
}

#[test]
fn fuzz_corpus_replays_without_panics() {
    use probe::fuzzing;
    replay("safetensors_file", fuzzing::safetensors_file);
    replay("gguf_file", fuzzing::gguf_file);
    replay("shard_index", fuzzing::shard_index);
    let fixture = crate::util::fixture("llama-tied-f32");
    replay("config_json", |b| fuzzing::config_json(b, &fixture));
    replay("tokenizer_json", fuzzing::tokenizer_json);
    replay("plugin_params", fuzzing::plugin_params);
}
