//! `probe shuffle`: a copy of a checkpoint with its blocks permuted — every
//! tensor of a block renamed together — and the permutation recorded in the
//! safetensors metadata, so anyone can make a layer-order recovery case.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::arch::gemma3_layer_types;
use crate::schema::{self, Schema};
use crate::store::{Checkpoint, TensorEntry};
use crate::{Dtype, Family, Placement};

/// Metadata key: JSON array, entry `s` = the true depth of the block stored at index `s`.
pub const TRUE_POSITION_KEY: &str = "probe.shuffle.true_position";
pub const SEED_KEY: &str = "probe.shuffle.seed";
/// Metadata key, present when the shuffle kept the config as it was
/// (`kept`): its per-block settings describe positions.
pub const CONFIG_KEY: &str = "probe.shuffle.config";

#[derive(Debug, thiserror::Error)]
pub enum ShuffleError {
    #[error("{file}: {problem}")]
    Refused { file: PathBuf, problem: String },
    #[error("{file}: {cause}")]
    Io {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("{file}: cannot write the checkpoint: {cause}")]
    Write { file: PathBuf, cause: String },
}

/// A permutation of `n` blocks from `seed`: entry `s` is the original block
/// stored at index `s`. Never the identity when `n > 1` (a shuffle that
/// changes nothing is no test case).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    loop {
        order.shuffle(&mut rng);
        if n < 2 || order.iter().enumerate().any(|(i, &b)| i != b) {
            return order;
        }
    }
}

/// What a shuffle does with the config's per-block settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockConfig {
    /// They move with their blocks ([`permute_config`]): the config still
    /// describes each block.
    Moved,
    /// The config is copied as it is, so its per-block settings now
    /// describe positions: what renaming a checkpoint's tensors does.
    Kept,
}

/// Write `checkpoint` with its blocks permuted into `out_dir/model.safetensors`
/// (plus its config and tokenizer files); returns the true positions.
pub fn write_shuffled(
    checkpoint: &Checkpoint,
    seed: u64,
    config: BlockConfig,
    out_dir: &Path,
) -> Result<Vec<usize>, ShuffleError> {
    let n = Schema::of(checkpoint).num_layers;
    if n < 2 {
        return Err(ShuffleError::Refused {
            file: checkpoint.path.clone(),
            problem: format!("{n} blocks: nothing to shuffle"),
        });
    }
    let stored = permutation(n, seed);
    let mut new_index = vec![0; n];
    for (s, &original) in stored.iter().enumerate() {
        new_index[original] = s;
    }
    let mut metadata = checkpoint.user_metadata();
    // A shuffle of a shuffle records the truth relative to the original.
    let truth: Vec<usize> = match metadata
        .get(TRUE_POSITION_KEY)
        .and_then(|t| serde_json::from_str::<Vec<usize>>(t).ok())
        .filter(|t| t.len() == n)
    {
        Some(earlier) => stored.iter().map(|&b| earlier[b]).collect(),
        None => stored.clone(),
    };
    metadata.insert(
        TRUE_POSITION_KEY.into(),
        serde_json::to_string(&truth).unwrap_or_default(),
    );
    metadata.insert(SEED_KEY.into(), seed.to_string());
    if config == BlockConfig::Kept {
        metadata.insert(CONFIG_KEY.into(), "kept".into());
    }
    write_reordered(checkpoint, &new_index, config, metadata, out_dir)?;
    Ok(truth)
}

/// Write `checkpoint` into `out_dir` with every tensor of block `b` renamed
/// to block `new_index[b]` (a permutation of the blocks), the per-block
/// config entries moved with them (or kept, `config`), the tokenizer files copied and
/// `metadata` as the safetensors `__metadata__`. The weights are the
/// mapping's bytes, unconverted.
pub fn write_reordered(
    checkpoint: &Checkpoint,
    new_index: &[usize],
    config: BlockConfig,
    metadata: BTreeMap<String, String>,
    out_dir: &Path,
) -> Result<(), ShuffleError> {
    let refuse = |problem: String| ShuffleError::Refused {
        file: checkpoint.path.clone(),
        problem,
    };
    let schema = Schema::of(checkpoint);
    let n = schema.num_layers;
    let mut seen = vec![false; n];
    if new_index.len() != n
        || new_index
            .iter()
            .any(|&i| i >= n || std::mem::replace(&mut seen[i], true))
    {
        return Err(refuse(format!(
            "{new_index:?} is no permutation of the {n} blocks"
        )));
    }
    if let Some(entry) = schema
        .placed(checkpoint)
        .find(|(_, p)| p.role.is_bank())
        .map(|(e, _)| e)
    {
        return Err(refuse(format!(
            "`{}` stacks every block in one tensor; banked checkpoints cannot be shuffled yet",
            entry.name
        )));
    }
    // stored[j]: the block of `checkpoint` that becomes block j.
    let mut stored = vec![0; n];
    for (b, &j) in new_index.iter().enumerate() {
        stored[j] = b;
    }
    let config = checkpoint.config.as_ref().map(|c| match config {
        BlockConfig::Moved => permute_config(c, schema.family, &stored),
        BlockConfig::Kept => c.clone(),
    });
    write_checkpoint(
        checkpoint,
        &|entry, placement| match placement.layer {
            Some(layer) if layer < n => schema::with_layer(&entry.name, new_index[layer])
                .ok_or_else(|| refuse(format!("cannot rename `{}`", entry.name))),
            _ => Ok(entry.name.clone()),
        },
        metadata,
        config.as_ref(),
        None,
        out_dir,
    )
}

/// Write `checkpoint` into `out_dir` as one `model.safetensors` (whole or
/// not at all) with each tensor under the name `rename` gives it and
/// `metadata` as its `__metadata__`, `config` as `config.json`, and the
/// tokenizer files: copied from beside the weights, or, for a GGUF file
/// with its own vocabulary, the `tokenizer.json` rebuilt from it. Weights
/// are the mapping's bytes unless they must be converted (GGUF block types
/// and storage conventions: written as F32) or `cast` names a float type
/// for every float tensor (F32, BF16 or F16; rounded to nearest, ties to
/// even, as PyTorch's `.to(dtype)` does).
pub fn write_checkpoint(
    checkpoint: &Checkpoint,
    rename: &dyn Fn(&TensorEntry, &Placement) -> Result<String, ShuffleError>,
    metadata: BTreeMap<String, String>,
    config: Option<&serde_json::Value>,
    cast: Option<Dtype>,
    out_dir: &Path,
) -> Result<(), ShuffleError> {
    let refuse = |problem: String| ShuffleError::Refused {
        file: checkpoint.path.clone(),
        problem,
    };
    let schema = Schema::of(checkpoint);
    let mut values = Vec::new();
    for (entry, placement) in schema.placed(checkpoint) {
        let name = rename(entry, placement)?;
        let view = checkpoint.view(entry);
        let (dtype, bytes) = match cast.filter(|_| entry.dtype.is_float()) {
            Some(to) => {
                let values = view.to_f32().map_err(|e| refuse(e.to_string()))?;
                (to, std::borrow::Cow::Owned(cast_floats(&values, to)))
            }
            None => view
                .safetensors_bytes()
                .map_err(|e| refuse(e.to_string()))?,
        };
        values.push((name, entry, dtype, bytes));
    }
    let mut renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for (name, entry, dtype, bytes) in &values {
        let st_dtype = probe_store::store::dtype_to_safetensors(*dtype).ok_or_else(|| {
            refuse(format!(
                "`{}` has a dtype safetensors cannot write",
                entry.name
            ))
        })?;
        let tensor = safetensors::tensor::TensorView::new(st_dtype, entry.shape.clone(), bytes)
            .map_err(|e| refuse(format!("`{}`: {e}", entry.name)))?;
        renamed.push((name.clone(), tensor));
    }
    let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();

    std::fs::create_dir_all(out_dir).map_err(|cause| ShuffleError::Io {
        file: out_dir.to_path_buf(),
        cause,
    })?;
    let out = out_dir.join("model.safetensors");
    // Whole or not at all: into a temporary file beside it, then renamed.
    let temp = out_dir.join(".model.safetensors.tmp");
    safetensors::serialize_to_file(renamed, Some(metadata), &temp).map_err(|e| {
        ShuffleError::Write {
            file: out.clone(),
            cause: e.to_string(),
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644));
    }
    std::fs::rename(&temp, &out).map_err(|cause| ShuffleError::Io {
        file: out.clone(),
        cause,
    })?;
    let write = |name: &str, text: String| {
        std::fs::write(out_dir.join(name), text).map_err(|cause| ShuffleError::Io {
            file: out_dir.join(name),
            cause,
        })
    };
    if let Some(config) = config {
        write(
            "config.json",
            serde_json::to_string_pretty(config).unwrap_or_default(),
        )?;
    }
    if let Some(vocab) = checkpoint
        .gguf_metadata()
        .and_then(crate::codec::gguf_vocabulary)
    {
        let codec = crate::codec::open(checkpoint).map_err(|e| refuse(e.problem))?;
        write(
            "tokenizer.json",
            codec.tokenizer_json().map_err(|e| refuse(e.problem))?,
        )?;
        let token = |id: Option<u32>| id.and_then(|id| vocab.tokens.get(id as usize).cloned());
        let tokenizer_config = serde_json::json!({
            "bos_token": token(vocab.bos),
            "eos_token": token(vocab.eos),
            "add_bos_token": vocab.add_bos,
            "chat_template": vocab.chat_template,
        });
        write(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tokenizer_config).unwrap_or_default(),
        )?;
        return Ok(());
    }
    for side in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let from = checkpoint.dir.join(side);
        if from.is_file() {
            std::fs::copy(&from, out_dir.join(side)).map_err(|cause| ShuffleError::Io {
                file: from.clone(),
                cause,
            })?;
        }
    }
    Ok(())
}

/// f32 values as little-endian bytes of `to` (F32, BF16 or F16).
fn cast_floats(values: &[f32], to: Dtype) -> Vec<u8> {
    match to {
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => bytemuck::cast_slice(values).to_vec(),
    }
}

/// Per-block settings in config.json travel with their blocks: Gemma 3's
/// attention type per block (sliding or full, which a block was trained
/// with; see [`gemma3_layer_types`]) is written out as the explicit,
/// permuted `layer_types` list, and any other family's `layer_types` is
/// permuted like the weights.
pub fn permute_config(
    config: &serde_json::Value,
    family: Family,
    stored: &[usize],
) -> serde_json::Value {
    let mut config = config.clone();
    let n = stored.len();
    let types: Vec<serde_json::Value> = if family == Family::Gemma3 {
        gemma3_layer_types(&config, n)
            .into_iter()
            .map(serde_json::Value::from)
            .collect()
    } else {
        match config.get("layer_types").and_then(|t| t.as_array()) {
            Some(types) => types.clone(),
            None => return config,
        }
    };
    if let (true, Some(object)) = (types.len() >= n, config.as_object_mut()) {
        let permuted: Vec<serde_json::Value> = stored.iter().map(|&b| types[b].clone()).collect();
        object.insert("layer_types".into(), serde_json::Value::Array(permuted));
    }
    config
}
