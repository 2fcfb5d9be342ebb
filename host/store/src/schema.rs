//! The model schema: which family a checkpoint belongs to, and for every
//! tensor its block (layer) index and role.
//!
//! Layer indices come from tensor names (`model.layers.7.…` is block 7),
//! never from the order tensors appear in a file.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::store::{Checkpoint, TensorEntry};

pub use probe_contract::{Family, Role};

/// The family a Hugging Face `model_type` belongs to.
pub fn family_from_model_type(model_type: &str) -> Option<Family> {
    Some(match model_type {
        "llama" | "mistral" | "smollm" | "smollm2" | "smollm3" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma3" | "gemma3_text" => Family::Gemma3,
        "gpt2" => Family::Gpt2,
        "bert" => Family::Bert,
        "paramgolf" | "parameter-golf" | "parameter_golf" => Family::ParamGolf,
        _ => return None,
    })
}

/// Where a tensor sits in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Block index from the name; `None` outside the blocks.
    pub layer: Option<usize>,
    pub role: Role,
    /// A bias vector rather than a weight.
    pub bias: bool,
}

impl Placement {
    /// The role as written in tables: `q`, or `q_bias` for q_proj's bias.
    pub fn role_name(&self) -> String {
        self.role.table_name(self.bias)
    }
}

/// Segments after which a number is a block index.
const BLOCK_CONTAINERS: [&str; 6] = ["layers", "h", "layer", "blocks", "block", "blk"];

/// Split `model.layers.7.self_attn.q_proj.weight` into (Some(7), "self_attn.q_proj", false).
/// Returns the layer, the local name without its `.weight`/`.bias` suffix, and
/// whether it was a bias.
fn split_name(name: &str) -> (Option<usize>, String, bool) {
    let segments: Vec<&str> = name.split('.').collect();
    let mut layer = None;
    let mut start = 0;
    // Prefer a number after a known container (`layers.7`); otherwise the
    // first all-digit segment (`encoder.7.…` in unknown families).
    let known = segments
        .windows(2)
        .position(|w| BLOCK_CONTAINERS.contains(&w[0]) && is_index(w[1]))
        .map(|p| p + 1);
    let any = segments.iter().position(|s| is_index(s));
    if let Some(pos) = known.or(any) {
        layer = segments[pos].parse().ok();
        start = pos + 1;
    }
    let mut local: Vec<&str> = segments[start..].to_vec();
    let mut bias = false;
    match local.last() {
        Some(&"weight") | Some(&"gamma") => {
            local.pop();
        }
        Some(&"bias") | Some(&"beta") if local.len() > 1 => {
            local.pop();
            bias = true;
        }
        _ => {}
    }
    (layer, local.join("."), bias)
}

fn is_index(segment: &str) -> bool {
    !segment.is_empty() && segment.len() <= 6 && segment.bytes().all(|b| b.is_ascii_digit())
}

/// Role of a tensor inside a block, from its local name.
fn block_role(family: Family, local: &str) -> Role {
    let last = local.rsplit('.').next().unwrap_or(local);
    match local {
        // Llama family and relatives.
        "self_attn.q_proj" | "attn.q_proj" | "attention.self.query" | "attn.c_q" => Role::Q,
        "self_attn.k_proj" | "attn.k_proj" | "attention.self.key" | "attn.c_k" => Role::K,
        "self_attn.v_proj" | "attn.v_proj" | "attention.self.value" | "attn.c_v" => Role::V,
        "self_attn.o_proj" | "attn.o_proj" | "attention.output.dense" | "attn.proj" => Role::O,
        "self_attn.qkv_proj" | "attn.c_attn" | "attn.qkv" => Role::Qkv,
        "self_attn.q_norm" | "attn.q_norm" => Role::QNorm,
        "self_attn.k_norm" | "attn.k_norm" => Role::KNorm,
        "mlp.gate_proj" | "mlp.w1" => Role::Gate,
        "mlp.up_proj" | "mlp.w3" | "mlp.c_fc" | "mlp.fc" | "intermediate.dense" => Role::Up,
        "mlp.down_proj" | "mlp.w2" | "mlp.c_proj" | "mlp.proj" | "output.dense" => Role::Down,
        "attn.c_proj" => Role::O,
        "input_layernorm" | "ln_1" | "attn_norm" => Role::AttnNorm,
        // Gemma3 has a norm after attention and a separate one before the MLP;
        // in Llama/Qwen this name is the norm before the MLP.
        "post_attention_layernorm" if family == Family::Gemma3 => Role::PostAttnNorm,
        "post_attention_layernorm" | "ln_2" | "mlp_norm" | "pre_feedforward_layernorm" => {
            Role::MlpNorm
        }
        "post_feedforward_layernorm" => Role::PostMlpNorm,
        "attention.output.LayerNorm" => Role::PostAttnNorm,
        "output.LayerNorm" => Role::PostMlpNorm,
        "attn.q_gain" | "q_gain" => Role::QGain,
        // GGUF (llama.cpp) names.
        "attn_q" => Role::Q,
        "attn_k" => Role::K,
        "attn_v" => Role::V,
        "attn_output" => Role::O,
        "attn_qkv" => Role::Qkv,
        "attn_q_norm" => Role::QNorm,
        "attn_k_norm" => Role::KNorm,
        "ffn_gate" => Role::Gate,
        "ffn_up" => Role::Up,
        "ffn_down" => Role::Down,
        "ffn_norm" => Role::MlpNorm,
        "post_attention_norm" | "attn_output_norm" => Role::PostAttnNorm,
        "post_ffw_norm" | "layer_output_norm" => Role::PostMlpNorm,
        _ => match last {
            "attn_scale" => Role::AttnScale,
            "mlp_scale" => Role::MlpScale,
            "resid_mix" => Role::ResidMix,
            "q_gain" => Role::QGain,
            _ => Role::Other,
        },
    }
}

/// Role of a tensor outside the blocks.
fn global_role(local: &str) -> Role {
    let last = local.rsplit('.').next().unwrap_or(local);
    if local.ends_with("embeddings.LayerNorm") {
        return Role::EmbedNorm;
    }
    match last {
        "embed_tokens" | "wte" | "word_embeddings" | "tok_emb" | "tok_embeddings"
        | "token_embd" => Role::Embed,
        "wpe" | "position_embeddings" | "pos_emb" | "position_embd" => Role::PosEmbed,
        "token_type_embeddings" | "token_types" => Role::TypeEmbed,
        "token_embd_norm" => Role::EmbedNorm,
        "lm_head" | "output" => Role::LmHead,
        "norm" | "ln_f" | "final_norm" | "final_layernorm" | "output_norm" => Role::FinalNorm,
        "skip_weights" => Role::SkipWeights,
        "skip_gates" => Role::SkipGates,
        "qo_bank" => Role::QoBank,
        "kv_bank" => Role::KvBank,
        "mlp_up_bank" => Role::MlpUpBank,
        "mlp_down_bank" => Role::MlpDownBank,
        _ if local.starts_with("pooler") => Role::Pooler,
        _ => Role::Other,
    }
}

/// The same tensor name with its block index replaced: the segment
/// `split_name` reads the layer from. `None` for names outside the blocks.
pub fn with_layer(name: &str, layer: usize) -> Option<String> {
    let mut segments: Vec<String> = name.split('.').map(str::to_string).collect();
    let known = segments
        .windows(2)
        .position(|w| BLOCK_CONTAINERS.contains(&w[0].as_str()) && is_index(&w[1]))
        .map(|p| p + 1);
    let pos = known.or_else(|| segments.iter().position(|s| is_index(s)))?;
    segments[pos] = layer.to_string();
    Some(segments.join("."))
}

/// Place one tensor name.
pub fn place(family: Family, name: &str) -> Placement {
    let (layer, local, bias) = split_name(name);
    // GPT-2 checkpoints carry the causal mask as `h.{i}.attn.bias`: a buffer,
    // not the bias of a layer called `attn`.
    if layer.is_some() && (local == "attn" && bias || local == "attn.masked_bias") {
        return Placement {
            layer,
            role: Role::Buffer,
            bias: false,
        };
    }
    let role = match layer {
        Some(_) => block_role(family, &local),
        None => global_role(&local),
    };
    // Layer-like numbers in names we do not recognise still give the layer
    // (unknown families), but a number inside a global tensor's name does not.
    Placement { layer, role, bias }
}

/// Recognise a family from tensor names alone.
pub fn family_from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Family {
    let mut seen = BTreeSet::new();
    for name in names {
        let (layer, local, bias) = split_name(name);
        let tag = match (layer.is_some(), local.as_str(), bias) {
            (_, l, _) if l.ends_with("qo_bank") => "paramgolf",
            (true, "attn.c_q", _) => "paramgolf",
            (true, "attn.c_attn", _) => "gpt2",
            (true, "attention.self.query", _) => "bert",
            (true, "pre_feedforward_layernorm", _) => "gemma3",
            (true, "self_attn.q_norm", _) => "qwen3",
            (true, "self_attn.q_proj", true) => "qwen2",
            (true, "self_attn.q_proj", false) => "llama",
            _ => continue,
        };
        seen.insert(tag);
    }
    // Most specific first: gemma3 and qwen3 also carry q_proj.
    for (tag, family) in [
        ("paramgolf", Family::ParamGolf),
        ("gpt2", Family::Gpt2),
        ("bert", Family::Bert),
        ("gemma3", Family::Gemma3),
        ("qwen3", Family::Qwen3),
        ("qwen2", Family::Qwen2),
        ("llama", Family::Llama),
    ] {
        if seen.contains(tag) {
            return family;
        }
    }
    Family::Unknown
}

/// A checkpoint's model-level facts and every tensor's placement.
#[derive(Clone, Debug)]
pub struct Schema {
    pub family: Family,
    /// The `model_type` of config.json, when there is one.
    pub model_type: Option<String>,
    pub num_layers: usize,
    pub hidden_size: Option<usize>,
    pub vocab_size: Option<usize>,
    pub tied_embeddings: bool,
    /// Same order as `Checkpoint::tensors()` (sorted by name).
    pub placements: Vec<Placement>,
}

impl Schema {
    pub fn of(checkpoint: &Checkpoint) -> Schema {
        let tensors = checkpoint.tensors();
        let config = checkpoint.config.as_ref();
        let model_type = config
            .and_then(|c| c.get("model_type"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let by_names = family_from_names(tensors.iter().map(|t| t.name.as_str()));
        // Names win over config when the config's type is unknown to us.
        let family = model_type
            .as_deref()
            .and_then(family_from_model_type)
            .unwrap_or(by_names);
        let placements: Vec<Placement> = tensors.iter().map(|t| place(family, &t.name)).collect();

        let find = |role: Role| {
            tensors
                .iter()
                .zip(&placements)
                .find(|(_, p)| p.role == role && !p.bias && p.layer.is_none())
                .map(|(t, _)| t)
        };
        let embed = find(Role::Embed);
        let lm_head = find(Role::LmHead);

        let layers_from_names = placements
            .iter()
            .filter_map(|p| p.layer)
            .collect::<BTreeSet<_>>();
        let layers_from_banks = tensors
            .iter()
            .zip(&placements)
            .find(|(_, p)| p.role == Role::MlpUpBank || p.role == Role::QoBank)
            .map(|(t, p)| {
                let stacked = t.shape.first().copied().unwrap_or(0);
                if p.role == Role::QoBank {
                    stacked / 2
                } else {
                    stacked
                }
            });
        let num_layers = if !layers_from_names.is_empty() {
            layers_from_names.last().map_or(0, |&l| l + 1)
        } else if let Some(n) = layers_from_banks {
            n
        } else {
            config_usize(config, &["num_hidden_layers", "n_layer", "num_layers"]).unwrap_or(0)
        };

        let hidden_size = config_usize(config, &["hidden_size", "n_embd", "d_model", "model_dim"])
            .or_else(|| embed.and_then(|t| matrix_dims(t).map(|(_, cols)| cols)));
        let vocab_size = config_usize(config, &["vocab_size"])
            .or_else(|| embed.and_then(|t| matrix_dims(t).map(|(rows, _)| rows)));

        let tied_embeddings = match (embed, lm_head) {
            // No output matrix of its own: a decoder must reuse the embedding.
            (Some(_), None) => family.is_decoder(),
            // A stored lm_head that config says is tied is a saved copy.
            (Some(_), Some(_)) => config
                .and_then(|c| c.get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            _ => false,
        };

        Schema {
            family,
            model_type,
            num_layers,
            hidden_size,
            vocab_size,
            tied_embeddings,
            placements,
        }
    }

    /// Tensors with their placements, in name order.
    pub fn placed<'a>(
        &'a self,
        checkpoint: &'a Checkpoint,
    ) -> impl Iterator<Item = (&'a TensorEntry, &'a Placement)> {
        checkpoint.tensors().iter().zip(&self.placements)
    }
}

fn config_usize(config: Option<&Value>, keys: &[&str]) -> Option<usize> {
    let config = config?;
    // Multimodal configs (gemma3) keep the language model's under text_config.
    let scopes = [Some(config), config.get("text_config")];
    for scope in scopes.into_iter().flatten() {
        for key in keys {
            if let Some(v) = scope.get(*key).and_then(Value::as_u64) {
                return usize::try_from(v).ok();
            }
        }
    }
    None
}

fn matrix_dims(t: &TensorEntry) -> Option<(usize, usize)> {
    match t.shape.as_slice() {
        [rows, cols] => Some((*rows, *cols)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(family: Family, name: &str) -> (Option<usize>, String) {
        let p = place(family, name);
        (p.layer, p.role_name())
    }

    #[test]
    fn llama_names() {
        let f = Family::Llama;
        assert_eq!(
            placed(f, "model.layers.12.self_attn.q_proj.weight"),
            (Some(12), "q".into())
        );
        assert_eq!(
            placed(f, "model.layers.0.mlp.down_proj.weight"),
            (Some(0), "down".into())
        );
        assert_eq!(
            placed(f, "model.layers.3.post_attention_layernorm.weight"),
            (Some(3), "mlp_norm".into())
        );
        assert_eq!(
            placed(f, "model.embed_tokens.weight"),
            (None, "embed".into())
        );
        assert_eq!(placed(f, "model.norm.weight"), (None, "final_norm".into()));
        assert_eq!(placed(f, "lm_head.weight"), (None, "lm_head".into()));
        assert_eq!(
            placed(Family::Qwen2, "model.layers.1.self_attn.k_proj.bias"),
            (Some(1), "k_bias".into())
        );
    }

    #[test]
    fn gemma3_has_four_norms() {
        let f = Family::Gemma3;
        let roles: Vec<String> = [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
        .iter()
        .map(|n| placed(f, &format!("model.layers.2.{n}.weight")).1)
        .collect();
        assert_eq!(
            roles,
            ["attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"]
        );
    }

    #[test]
    fn gpt2_bert_paramgolf_names() {
        assert_eq!(
            placed(Family::Gpt2, "h.4.attn.c_attn.weight"),
            (Some(4), "qkv".into())
        );
        assert_eq!(
            placed(Family::Gpt2, "transformer.h.4.attn.c_proj.bias"),
            (Some(4), "o_bias".into())
        );
        assert_eq!(
            placed(Family::Gpt2, "h.4.mlp.c_proj.weight"),
            (Some(4), "down".into())
        );
        assert_eq!(
            placed(Family::Gpt2, "h.0.attn.bias"),
            (Some(0), "buffer".into())
        );
        assert_eq!(
            placed(Family::Gpt2, "wpe.weight"),
            (None, "pos_embed".into())
        );
        assert_eq!(
            placed(Family::Bert, "encoder.layer.5.attention.self.value.weight"),
            (Some(5), "v".into())
        );
        assert_eq!(
            placed(Family::Bert, "encoder.layer.5.output.dense.weight"),
            (Some(5), "down".into())
        );
        assert_eq!(
            placed(Family::Bert, "embeddings.LayerNorm.weight"),
            (None, "embed_norm".into())
        );
        assert_eq!(
            placed(Family::ParamGolf, "blocks.10.attn.proj.weight"),
            (Some(10), "o".into())
        );
        assert_eq!(
            placed(Family::ParamGolf, "blocks.10.attn_scale"),
            (Some(10), "attn_scale".into())
        );
        assert_eq!(
            placed(Family::ParamGolf, "blocks.3.attn.q_gain"),
            (Some(3), "q_gain".into())
        );
        assert_eq!(
            placed(Family::ParamGolf, "qo_bank"),
            (None, "qo_bank".into())
        );
        assert_eq!(
            placed(Family::ParamGolf, "skip_weights"),
            (None, "skip_weights".into())
        );
    }

    #[test]
    fn gguf_names() {
        let f = Family::Llama;
        assert_eq!(placed(f, "blk.12.attn_q.weight"), (Some(12), "q".into()));
        assert_eq!(
            placed(f, "blk.0.ffn_norm.weight"),
            (Some(0), "mlp_norm".into())
        );
        assert_eq!(placed(f, "blk.3.attn_output.weight"), (Some(3), "o".into()));
        assert_eq!(
            placed(Family::Qwen2, "blk.1.attn_k.bias"),
            (Some(1), "k_bias".into())
        );
        assert_eq!(placed(f, "token_embd.weight"), (None, "embed".into()));
        assert_eq!(placed(f, "output.weight"), (None, "lm_head".into()));
        assert_eq!(placed(f, "output_norm.weight"), (None, "final_norm".into()));
        assert_eq!(
            placed(Family::Gemma3, "blk.2.post_ffw_norm.weight"),
            (Some(2), "post_mlp_norm".into())
        );
        assert_eq!(
            with_layer("blk.2.attn_q.weight", 5).unwrap(),
            "blk.5.attn_q.weight"
        );
    }

    #[test]
    fn unknown_names_still_get_layers() {
        assert_eq!(
            placed(Family::Unknown, "encoder.7.ff.w_in.weight"),
            (Some(7), "other".into())
        );
        assert_eq!(placed(Family::Unknown, "stem.conv"), (None, "other".into()));
    }

    #[test]
    fn family_from_names_prefers_the_specific() {
        let qwen3 = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_norm.weight",
        ];
        assert_eq!(family_from_names(qwen3), Family::Qwen3);
        let qwen2 = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
        ];
        assert_eq!(family_from_names(qwen2), Family::Qwen2);
        assert_eq!(
            family_from_names(["model.layers.0.self_attn.q_proj.weight"]),
            Family::Llama
        );
        assert_eq!(family_from_names(["a.b"]), Family::Unknown);
    }
}
