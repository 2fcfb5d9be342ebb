//! `probe convert`: a checkpoint rewritten as one safetensors file in the
//! Hugging Face layout, with its `config.json` and tokenizer files — for a
//! GGUF file, every tensor dequantized to F32 with llama.cpp's storage
//! conventions undone and renamed to its Hugging Face name (llama, qwen2,
//! qwen3, gemma3; other architectures keep their GGUF names, which probe
//! reads as well).

use std::collections::BTreeMap;
use std::path::Path;

use probe_store::gguf_model;

use crate::shuffle::{write_checkpoint, ShuffleError};
use crate::store::Checkpoint;
use crate::Dtype;

/// Write `checkpoint` into `out_dir`, every float tensor as `cast` when
/// given (BF16 or F16 copies of a model, to study or to run under a memory
/// budget); returns how many tensors were written.
pub fn to_safetensors(
    checkpoint: &Checkpoint,
    cast: Option<Dtype>,
    out_dir: &Path,
) -> Result<usize, ShuffleError> {
    let arch = checkpoint
        .gguf_metadata()
        .and_then(|m| m.architecture())
        .map(str::to_string);
    // One key only: the safetensors crate writes `__metadata__` in hash
    // order, and a converted file must have the same bytes every time (its
    // sha256 is pinned by `cargo xtask models`). Where it came from goes
    // into config.json.
    let mut metadata: BTreeMap<String, String> = BTreeMap::new();
    metadata.insert("format".into(), "pt".into());
    let mut config = checkpoint.config.clone();
    if let (Some(serde_json::Value::Object(config)), Some(to)) = (&mut config, cast) {
        let name = match to {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            _ => "float32",
        };
        config.insert("torch_dtype".into(), name.into());
    }
    if let (Some(serde_json::Value::Object(config)), Some(_)) = (&mut config, &arch) {
        // GGUF tensors are written dequantized.
        if cast.is_none() {
            config.insert("torch_dtype".into(), "float32".into());
        }
        config.insert(
            "probe_converted_from".into(),
            checkpoint
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .into(),
        );
    }
    write_checkpoint(
        checkpoint,
        &|entry, _| {
            Ok(arch
                .as_deref()
                .and_then(|arch| gguf_model::hf_name(arch, &entry.name))
                .unwrap_or_else(|| entry.name.clone()))
        },
        metadata,
        config.as_ref(),
        cast,
        out_dir,
    )?;
    Ok(checkpoint.tensors().len())
}
