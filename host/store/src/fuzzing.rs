//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz, libFuzzer) and
//! for the test that replays their corpus on every `cargo test`. Each takes
//! arbitrary bytes, feeds them to one reader of untrusted input the way probe
//! would — in memory, no file written — and must return (with an error or a
//! result) without panicking, hanging or allocating in proportion to what
//! the bytes claim.

use std::path::Path;
use std::sync::OnceLock;

use crate::arch::Arch;
use crate::schema::Schema;
use crate::store::Checkpoint;

/// Bytes as a `.safetensors` file: open it, place its tensors, and convert
/// every float tensor (touching only what the file really holds).
pub fn safetensors_file(bytes: &[u8]) {
    if let Ok(checkpoint) = Checkpoint::from_bytes("model.safetensors", bytes.to_vec(), None) {
        let schema = Schema::of(&checkpoint);
        for entry in checkpoint.tensors() {
            let _ = checkpoint.view(entry).to_f32();
        }
        let _ = (schema.num_layers, schema.family);
    }
}

/// Bytes as a `.gguf` file: parse its header, place its tensors, read its
/// architecture and config, and dequantize every tensor (what the file
/// holds, never what it claims).
pub fn gguf_file(bytes: &[u8]) {
    if let Ok(checkpoint) = Checkpoint::from_bytes("model.gguf", bytes.to_vec(), None) {
        let schema = Schema::of(&checkpoint);
        let _ = Arch::of(&checkpoint, &schema);
        for entry in checkpoint.tensors() {
            let _ = checkpoint.view(entry).to_f32();
        }
    }
}

/// Bytes as `model.safetensors.index.json`.
pub fn shard_index(bytes: &[u8]) {
    let _ = crate::source::parse_index(Path::new("model.safetensors.index.json"), bytes);
}

/// The committed llama fixture's weights with these bytes as its
/// `config.json`: the schema and the architecture read it.
pub fn config_json(bytes: &[u8], fixture: &Path) {
    static WEIGHTS: OnceLock<Vec<u8>> = OnceLock::new();
    let weights = WEIGHTS
        .get_or_init(|| std::fs::read(fixture.join("model.safetensors")).unwrap_or_default());
    if let Ok(checkpoint) =
        Checkpoint::from_bytes("model.safetensors", weights.clone(), Some(bytes))
    {
        let schema = Schema::of(&checkpoint);
        let _ = Arch::of(&checkpoint, &schema);
    }
}
