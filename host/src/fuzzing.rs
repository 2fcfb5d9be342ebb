//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz, libFuzzer) and
//! for the test that replays their corpus on every `cargo test`. Each takes
//! arbitrary bytes, feeds them to one reader of untrusted input the way probe
//! would, and must return (with an error or a result) without panicking,
//! hanging or allocating in proportion to what the bytes claim.

use std::path::{Path, PathBuf};

use crate::schema::Schema;
use crate::store::Checkpoint;

/// A scratch folder per process (the fuzzers run one input at a time per
/// process; tests replay sequentially within one call).
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("probe-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Bytes as a `.safetensors` file: open it, place its tensors, and convert
/// every float tensor (touching only what the file really holds).
pub fn safetensors_file(bytes: &[u8]) {
    let path = scratch().join("model.safetensors");
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    if let Ok(checkpoint) = Checkpoint::open(&path) {
        let schema = Schema::of(&checkpoint);
        for entry in checkpoint.tensors() {
            let _ = checkpoint.view(entry).to_f32();
        }
        let _ = (schema.num_layers, schema.family);
    }
}

/// Bytes as `model.safetensors.index.json` beside one real shard.
pub fn shard_index(bytes: &[u8]) {
    let dir = scratch().join("sharded");
    let _ = std::fs::create_dir_all(&dir);
    let index = dir.join("model.safetensors.index.json");
    if std::fs::write(&index, bytes).is_err() {
        return;
    }
    let _ = crate::source::read_index(&index);
    let _ = Checkpoint::open(&index);
}

/// The committed llama fixture with these bytes as its `config.json`: the
/// schema and the forward engine's architecture read it.
pub fn config_json(bytes: &[u8], fixture: &Path) {
    let dir = scratch().join("config");
    let _ = std::fs::create_dir_all(&dir);
    let weights = dir.join("model.safetensors");
    if !weights.exists() {
        let _ = std::fs::copy(fixture.join("model.safetensors"), &weights);
    }
    if std::fs::write(dir.join("config.json"), bytes).is_err() {
        return;
    }
    if let Ok(checkpoint) = Checkpoint::open(&dir) {
        let schema = Schema::of(&checkpoint);
        let _ = crate::forward::arch::Arch::of(&checkpoint, &schema);
    }
}

/// Bytes as `tokenizer.json` (and the same as `tokenizer_config.json`'s
/// chat template source): load, encode a text, apply the template.
pub fn tokenizer_json(bytes: &[u8]) {
    // Panics contained by `guard::catch` must not reach libFuzzer's hook.
    crate::guard::install_quiet_hook();
    let dir = scratch().join("tokenizer");
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("tokenizer.json"), bytes).is_err() {
        return;
    }
    if let Ok(codec) = crate::forward::text::TextCodec::open(&dir) {
        let _ = codec.encode("The capital of France is Paris.");
        let _ = codec.render_chat(&String::from_utf8_lossy(bytes), "hi");
    }
}

/// Bytes as `--param` lines against a plugin's parameter specs (spectral's
/// kinds: bool, int, float, choice, list, range).
pub fn plugin_params(bytes: &[u8]) {
    use probe_sdk::params::{resolve, ParamKind, ParamSpec};
    let specs = [
        ParamSpec::new("flag", ParamKind::Bool, Some("false"), ""),
        ParamSpec::new("count", ParamKind::Int, Some("1"), ""),
        ParamSpec::new("scale", ParamKind::Float, Some("1.0"), ""),
        ParamSpec::choice("method", &["svd", "power"], "svd", ""),
        ParamSpec::new("roles", ParamKind::List, Some(""), ""),
        ParamSpec::new("layers", ParamKind::Range, Some(""), ""),
        ParamSpec::new("path", ParamKind::Str, Some(""), ""),
    ];
    let text = String::from_utf8_lossy(bytes);
    let given: Vec<String> = text.lines().map(str::to_string).collect();
    if let Ok(values) = resolve(&specs, &given) {
        let params = probe_sdk::Params::from_map(values);
        let _ = params.range("layers");
        let _ = params.list("roles");
    }
}
