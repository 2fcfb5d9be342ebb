//! What a GGUF file says, in the terms the rest of probe reads: a
//! Hugging Face style `config.json` made from its metadata, and for each
//! tensor the change that turns llama.cpp's storage convention back into
//! the Hugging Face layout the schema and the engine expect.
//!
//! Tensor names stay as the file has them (`blk.7.attn_q.weight`); the
//! schema places them. Three conventions of llama.cpp's converter
//! (`convert_hf_to_gguf.py`) are undone on read:
//! - **llama**: the rows of Q and K are permuted so that each head's two
//!   rotary halves interleave (llama.cpp's RoPE rotates adjacent pairs).
//!   Read as stored, every forward pass would be silently wrong.
//! - **gemma, gemma2, gemma3**: RMSNorm weights are stored with the one
//!   Gemma adds at run time already added (`w + 1`).
//! - **gpt2**: the Conv1D matrices are stored transposed, as `nn.Linear`.

use serde_json::{json, Map, Value as Json};

use crate::gguf::{Metadata, TensorInfo};
use probe_contract::Dtype;

/// How a tensor's stored values become the Hugging Face layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Read as stored.
    None,
    /// Undo llama.cpp's Q/K row permutation over `heads` heads.
    UnpermuteRows { heads: usize },
    /// Subtract the one llama.cpp's Gemma converter added to a norm weight.
    MinusOne,
    /// Transpose a matrix (GPT-2's Conv1D weights).
    Transpose,
}

impl Transform {
    /// Apply to `values` of the stored (row-major, slowest extent first)
    /// `stored_shape`.
    pub fn apply(self, values: &mut Vec<f32>, stored_shape: &[usize]) {
        match self {
            Transform::None => {}
            Transform::MinusOne => values.iter_mut().for_each(|v| *v -= 1.0),
            Transform::Transpose => {
                let (rows, cols) = (stored_shape[0], stored_shape[1]);
                let mut out = vec![0f32; values.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        out[c * rows + r] = values[r * cols + c];
                    }
                }
                *values = out;
            }
            Transform::UnpermuteRows { heads } => {
                // Stored row (h, j, i) of shape (heads, half, 2) holds HF row
                // (h, i, j) of shape (heads, 2, half).
                let rows = stored_shape[0];
                let cols = values.len() / rows.max(1);
                let half = rows / heads / 2;
                let mut out = vec![0f32; values.len()];
                for h in 0..heads {
                    for j in 0..half {
                        for i in 0..2 {
                            let stored = (h * half + j) * 2 + i;
                            let hf = (h * 2 + i) * half + j;
                            out[hf * cols..(hf + 1) * cols]
                                .copy_from_slice(&values[stored * cols..(stored + 1) * cols]);
                        }
                    }
                }
                *values = out;
            }
        }
    }

    /// The shape after the transform, from the stored one.
    pub fn shape(self, stored: &[usize]) -> Vec<usize> {
        match (self, stored) {
            (Transform::Transpose, [rows, cols]) => vec![*cols, *rows],
            _ => stored.to_vec(),
        }
    }
}

/// The Hugging Face name of a GGUF tensor of the Llama-style families
/// (llama, qwen2, qwen3, gemma3), for writing a converted checkpoint;
/// `None` for names (and architectures) without one.
pub fn hf_name(arch: &str, name: &str) -> Option<String> {
    if !matches!(arch, "llama" | "qwen2" | "qwen3" | "gemma3") {
        return None;
    }
    let global = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(global) = global {
        return Some(global.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let gemma = arch == "gemma3";
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The Hugging Face `architectures` entry of a GGUF architecture.
pub fn hf_architecture(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "gemma3" => "Gemma3ForCausalLM",
        "gpt2" => "GPT2LMHeadModel",
        "bert" => "BertModel",
        _ => return None,
    })
}

/// The Hugging Face `model_type` of a GGUF architecture.
fn model_type(arch: &str) -> &str {
    match arch {
        "gemma3" => "gemma3_text",
        other => other,
    }
}

/// The transform llama.cpp's converter calls for on this tensor.
pub fn transform(meta: &Metadata, name: &str, stored_shape: &[usize]) -> Result<Transform, String> {
    let arch = meta.architecture().unwrap_or_default();
    let (local, is_weight) = match name.strip_suffix(".weight") {
        Some(stem) => (stem.rsplit('.').next().unwrap_or(stem), true),
        None => ("", false),
    };
    if !is_weight {
        return Ok(Transform::None);
    }
    Ok(match arch {
        "llama" if matches!(local, "attn_q" | "attn_k") => {
            let key = if local == "attn_q" {
                "llama.attention.head_count"
            } else {
                "llama.attention.head_count_kv"
            };
            let heads = meta
                .u64(key)
                .or_else(|| meta.u64("llama.attention.head_count"))
                .ok_or_else(|| {
                    format!("`{name}` needs `{key}` to undo llama.cpp's Q/K row permutation")
                })? as usize;
            let rows = stored_shape.first().copied().unwrap_or(0);
            if heads == 0 || rows % (2 * heads) != 0 {
                return Err(format!(
                    "`{name}` has {rows} rows, which {heads} heads of two rotary halves cannot split"
                ));
            }
            Transform::UnpermuteRows { heads }
        }
        "gemma" | "gemma2" | "gemma3" if local.ends_with("norm") => Transform::MinusOne,
        "gpt2"
            if matches!(local, "attn_qkv" | "attn_output" | "ffn_up" | "ffn_down")
                && stored_shape.len() == 2 =>
        {
            Transform::Transpose
        }
        _ => Transform::None,
    })
}

/// A `config.json` equivalent of the metadata, under the keys the schema
/// and the architecture read. `frequency_factors` are the values of
/// `rope_freqs.weight` when the file has that tensor (Llama 3.1's RoPE
/// scaling, which llama.cpp stores as per-frequency divisors).
pub fn hf_config(
    meta: &Metadata,
    tensors: &[TensorInfo],
    frequency_factors: Option<Vec<f32>>,
) -> Json {
    let arch = meta.architecture().unwrap_or("unknown");
    let key = |k: &str| format!("{arch}.{k}");
    let mut config = Map::new();
    config.insert("model_type".into(), json!(model_type(arch)));
    if let Some(architecture) = hf_architecture(arch) {
        config.insert("architectures".into(), json!([architecture]));
    }
    config.insert("gguf_architecture".into(), json!(arch));
    let put_u64 = |config: &mut Map<String, Json>, hf: &str, gguf: &str| {
        if let Some(v) = meta.u64(&key(gguf)) {
            config.insert(hf.into(), json!(v));
        }
    };
    for (hf, gguf) in [
        ("num_hidden_layers", "block_count"),
        ("hidden_size", "embedding_length"),
        ("intermediate_size", "feed_forward_length"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
        ("head_dim", "attention.key_length"),
        ("max_position_embeddings", "context_length"),
    ] {
        put_u64(&mut config, hf, gguf);
    }
    for (hf, gguf) in [
        ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
        ("layer_norm_eps", "attention.layer_norm_epsilon"),
        ("rope_theta", "rope.freq_base"),
        ("final_logit_softcapping", "final_logit_softcapping"),
    ] {
        if let Some(v) = meta.f64(&key(gguf)) {
            // f32 in the file: print the shortest decimal that reads back
            // as that f32 (1e-5, not 9.999999747378752e-6).
            let v = (v as f32).to_string().parse::<f64>().unwrap_or(v);
            config.insert(hf.into(), json!(v));
        }
    }
    if arch == "gemma3" {
        if let Some(window) = meta.u64(&key("attention.sliding_window")) {
            config.insert("sliding_window".into(), json!(window));
        }
        if let Some(base) = meta.f64(&key("rope.freq_base_swa")) {
            config.insert("rope_local_base_freq".into(), json!(base));
        }
        // A period (every n-th block global), or one flag per block.
        match meta.get(&key("attention.sliding_window_pattern")) {
            Some(crate::gguf::Value::Array(crate::gguf::Array::Bool(sliding))) => {
                let types: Vec<&str> = sliding
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                config.insert("layer_types".into(), json!(types));
            }
            Some(period) => {
                if let Some(period) = period.as_u64() {
                    config.insert("sliding_window_pattern".into(), json!(period));
                }
            }
            None => {}
        }
        // llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim), except for
        // the 27B model (62 blocks), where it uses 1/sqrt(hidden / heads).
        if let (Some(62), Some(hidden), Some(heads)) = (
            meta.u64(&key("block_count")),
            meta.u64(&key("embedding_length")),
            meta.u64(&key("attention.head_count")),
        ) {
            config.insert("query_pre_attn_scalar".into(), json!(hidden / heads.max(1)));
        }
    }
    match meta.str(&key("rope.scaling.type")) {
        None | Some("none") => {}
        Some(kind) => {
            let mut scaling = Map::new();
            scaling.insert("rope_type".into(), json!(kind));
            if let Some(factor) = meta.f64(&key("rope.scaling.factor")) {
                scaling.insert("factor".into(), json!(factor));
            }
            config.insert("rope_scaling".into(), Json::Object(scaling));
        }
    }
    if let Some(factors) = frequency_factors {
        config.insert(
            "rope_scaling".into(),
            json!({ "rope_type": "frequency_factors", "factors": factors }),
        );
    }
    let embed = tensors.iter().find(|t| t.name == "token_embd.weight");
    if let Some(rows) = embed.and_then(|t| t.extents.get(1)) {
        config.insert("vocab_size".into(), json!(rows));
    } else if let Some(tokens) = meta.strings("tokenizer.ggml.tokens") {
        config.insert("vocab_size".into(), json!(tokens.len()));
    }
    let has_output = tensors.iter().any(|t| t.name == "output.weight");
    config.insert("tie_word_embeddings".into(), json!(!has_output));
    for (hf, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(id) = meta.u64(gguf) {
            config.insert(hf.into(), json!(id));
        }
    }
    let dtypes: std::collections::BTreeSet<&str> =
        tensors.iter().map(|t| t.dtype.as_str()).collect();
    config.insert(
        "gguf_tensor_types".into(),
        json!(dtypes.into_iter().collect::<Vec<_>>()),
    );
    if let Some(file_type) = meta.u64("general.file_type") {
        config.insert("gguf_file_type".into(), json!(file_type));
    }
    Json::Object(config)
}

/// Values of a small F32 tensor straight from the file (`rope_freqs.weight`).
pub fn f32_values(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    (dtype == Dtype::F32).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, half, cols).swapaxes(1, 2).
        let (heads, half, cols) = (2, 3, 2);
        let rows = heads * 2 * half;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut stored = vec![0f32; hf.len()];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..half {
                    let from = (h * 2 + i) * half + j;
                    let to = (h * half + j) * 2 + i;
                    stored[to * cols..(to + 1) * cols]
                        .copy_from_slice(&hf[from * cols..(from + 1) * cols]);
                }
            }
        }
        assert_ne!(stored, hf);
        Transform::UnpermuteRows { heads }.apply(&mut stored, &[rows, cols]);
        assert_eq!(stored, hf);
    }

    #[test]
    fn transpose_swaps_the_shape() {
        let mut v = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        Transform::Transpose.apply(&mut v, &[2, 3]);
        assert_eq!(v, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(Transform::Transpose.shape(&[2, 3]), [3, 2]);
    }
}
