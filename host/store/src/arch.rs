//! What a checkpoint's forward pass computes, read from its config and tensor
//! names: the numbers (sizes, epsilons, RoPE bases) and, per block, which
//! weights exist. The graphs are built from this description alone.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::schema::{Family, Role, Schema};
use crate::store::Checkpoint;

/// Why a checkpoint cannot be run: an unsupported piece, a config that does
/// not describe the tensors, or a tensor the architecture needs.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("{file}: {what} is not supported", file = file.display())]
    Unsupported { file: PathBuf, what: String },
    #[error("{file}: {problem}", file = file.display())]
    Config { file: PathBuf, problem: String },
    #[error("{file}: missing {what}", file = file.display())]
    MissingTensor { file: PathBuf, what: String },
}

/// How a block arranges its norms around the two sublayers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `x += f(norm(x))` (Llama, Qwen, GPT-2).
    PreNorm,
    /// `x += post_norm(f(pre_norm(x)))` (Gemma 3: four norms per block).
    Sandwich,
    /// `x = norm(x + f(x))` (BERT).
    PostNorm,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    /// RMSNorm; `plus_one` multiplies by `(1 + weight)` (Gemma).
    Rms { eps: f32, plus_one: bool },
    /// LayerNorm with weight and bias.
    Layer { eps: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
    GeluErf,
}

/// RoPE frequencies after any scaling the config asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f64>,
}

/// The attention pattern of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attention {
    Causal,
    /// Causal, seeing only the last `window` positions (itself included).
    Sliding {
        window: usize,
    },
    Bidirectional,
}

/// Per block: its attention pattern and which RoPE table it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockKind {
    pub attention: Attention,
    /// Index into `Arch::ropes`; `None` without rotary embeddings.
    pub rope: Option<usize>,
}

/// Gemma 3's attention type per block (`sliding_attention` or
/// `full_attention`): the config's `layer_types` as listed, else every
/// `sliding_window_pattern`-th block (6 when the config does not say, as
/// in GGUF files, whose metadata has no pattern) full and the rest sliding.
pub fn gemma3_layer_types(config: &Value, layers: usize) -> Vec<String> {
    match config.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_string())
            .collect(),
        None => {
            let pattern = config_usize(config, &["sliding_window_pattern"]).unwrap_or(6);
            (0..layers)
                .map(|i| {
                    if (i + 1) % pattern.max(1) == 0 {
                        "full_attention".to_string()
                    } else {
                        "sliding_attention".to_string()
                    }
                })
                .collect()
        }
    }
}

/// The forward-pass description of a checkpoint.
#[derive(Clone, Debug)]
pub struct Arch {
    pub family: Family,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub layout: Layout,
    pub norm: Norm,
    pub activation: Activation,
    /// `down(act(gate(x)) * up(x))` rather than `down(act(up(x)))`.
    pub gated_mlp: bool,
    /// Multiplies q·k before the softmax.
    pub attention_scale: f32,
    /// Multiplies the token embedding (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// Learned absolute positions (GPT-2, BERT): the longest sequence.
    pub max_positions: Option<usize>,
    pub ropes: Vec<Rope>,
    pub blocks: Vec<BlockKind>,
    pub final_logit_softcap: Option<f32>,
    pub has_head: bool,
}

/// The tensors the graphs read, by the name each graph gives its input.
#[derive(Clone, Debug, Default)]
pub struct WeightMap {
    pub embed: BTreeMap<&'static str, String>,
    pub blocks: Vec<BTreeMap<&'static str, String>>,
    pub head: BTreeMap<&'static str, String>,
}

fn config_f64(config: &Value, keys: &[&str]) -> Option<f64> {
    keys.iter()
        .find_map(|k| config.get(*k).and_then(Value::as_f64))
}

fn config_usize(config: &Value, keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| config.get(*k).and_then(Value::as_u64))
        .map(|v| v as usize)
}

fn config_str<'a>(config: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| config.get(*k).and_then(Value::as_str))
}

impl Arch {
    /// Per block, an id of its kind (attention pattern and rotary table):
    /// blocks with the same id run alike; ids count from 0 in order of
    /// first appearance.
    pub fn block_kind_ids(&self) -> Vec<usize> {
        let mut seen: Vec<BlockKind> = Vec::new();
        self.blocks
            .iter()
            .map(|kind| match seen.iter().position(|k| k == kind) {
                Some(id) => id,
                None => {
                    seen.push(*kind);
                    seen.len() - 1
                }
            })
            .collect()
    }

    /// Read the architecture; every missing or unsupported piece is an error
    /// naming the checkpoint.
    pub fn of(checkpoint: &Checkpoint, schema: &Schema) -> Result<(Arch, WeightMap), ArchError> {
        let file = checkpoint.path.clone();
        let unsupported = |what: String| ArchError::Unsupported {
            file: file.clone(),
            what,
        };
        let family = schema.family;
        if !matches!(
            family,
            Family::Llama
                | Family::Qwen2
                | Family::Qwen3
                | Family::Gemma3
                | Family::Gpt2
                | Family::Bert
        ) {
            return Err(unsupported(format!(
                "forward passes for the {family} family (supported: llama, qwen2, qwen3, gemma3, gpt2, bert)"
            )));
        }
        let empty = Value::Object(Default::default());
        let config = checkpoint.config.as_ref().unwrap_or(&empty);
        let missing = |key: &str| ArchError::Config {
            file: checkpoint.config_source(),
            problem: format!("needs `{key}` for a forward pass"),
        };

        let hidden = schema.hidden_size.ok_or_else(|| missing("hidden_size"))?;
        let heads = config_usize(config, &["num_attention_heads", "n_head"])
            .ok_or_else(|| missing("num_attention_heads"))?;
        if heads == 0 || hidden % heads != 0 && config.get("head_dim").is_none() {
            return Err(ArchError::Config {
                file: checkpoint.config_source(),
                problem: format!("hidden size {hidden} is not a multiple of {heads} heads"),
            });
        }
        let kv_heads = config_usize(config, &["num_key_value_heads"]).unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(ArchError::Config {
                file: checkpoint.config_source(),
                problem: format!("{heads} attention heads cannot share {kv_heads} key/value heads"),
            });
        }
        let head_dim = config_usize(config, &["head_dim"]).unwrap_or(hidden / heads.max(1));
        let vocab = schema.vocab_size.ok_or_else(|| missing("vocab_size"))?;
        let layers = schema.num_layers;
        if layers == 0 {
            return Err(unsupported(
                "a checkpoint without transformer blocks".into(),
            ));
        }

        let weights = weight_map(checkpoint, schema, layers)?;
        // The config's head size must be the one the weights have: it sizes
        // the RoPE tables, so an absurd value must stop here.
        if let Some(q) = weights.blocks[0].get("q.weight") {
            let rows = checkpoint.entry(q).and_then(|e| e.shape.first().copied());
            if heads.checked_mul(head_dim) != rows {
                return Err(ArchError::Config {
                    file: checkpoint.config_source(),
                    problem: format!(
                        "{heads} heads of size {head_dim} do not match `{q}` ({} rows)",
                        rows.map_or("no".into(), |r| r.to_string())
                    ),
                });
            }
        }

        let rms_eps = config_f64(config, &["rms_norm_eps"]).unwrap_or(1e-6) as f32;
        let ln_eps =
            config_f64(config, &["layer_norm_eps", "layer_norm_epsilon"]).unwrap_or(1e-5) as f32;
        let act_name = config_str(
            config,
            &["hidden_activation", "hidden_act", "activation_function"],
        );
        let activation = |default: Activation| -> Result<Activation, ArchError> {
            Ok(match act_name {
                None => default,
                Some("silu" | "swish") => Activation::Silu,
                Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_tanh") => {
                    Activation::GeluTanh
                }
                Some("gelu" | "gelu_python") => Activation::GeluErf,
                Some(other) => return Err(unsupported(format!("the activation `{other}`"))),
            })
        };

        let rope_theta = config_f64(config, &["rope_theta"]).unwrap_or(10000.0);
        let causal_blocks = |rope: Option<usize>| {
            vec![
                BlockKind {
                    attention: Attention::Causal,
                    rope
                };
                layers
            ]
        };

        let arch = match family {
            Family::Llama | Family::Qwen2 | Family::Qwen3 => {
                let scaled = rope(config, rope_theta, head_dim, true).map_err(&unsupported)?;
                let mut blocks = causal_blocks(Some(0));
                // Mistral-style sliding window on every layer; Qwen2 only when asked.
                let sliding = config_usize(config, &["sliding_window"]).filter(|_| {
                    family != Family::Qwen2
                        || config.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
                });
                if let Some(window) = sliding {
                    for block in &mut blocks {
                        block.attention = Attention::Sliding { window };
                    }
                }
                Arch {
                    family,
                    hidden,
                    heads,
                    kv_heads,
                    head_dim,
                    vocab,
                    layout: Layout::PreNorm,
                    norm: Norm::Rms {
                        eps: rms_eps,
                        plus_one: false,
                    },
                    activation: activation(Activation::Silu)?,
                    gated_mlp: true,
                    attention_scale: (head_dim as f32).powf(-0.5),
                    embed_scale: None,
                    max_positions: None,
                    ropes: vec![scaled],
                    blocks,
                    final_logit_softcap: None,
                    has_head: true,
                }
            }
            Family::Gemma3 => {
                let global = rope(config, rope_theta, head_dim, true).map_err(&unsupported)?;
                let local_theta = config_f64(config, &["rope_local_base_freq"]).unwrap_or(10000.0);
                // The sliding layers use the local base without scaling.
                let local = rope(config, local_theta, head_dim, false).map_err(&unsupported)?;
                let window = config_usize(config, &["sliding_window"]).unwrap_or(4096);
                let types = gemma3_layer_types(config, layers);
                if types.len() < layers {
                    return Err(ArchError::Config {
                        file: checkpoint.config_source(),
                        problem: format!(
                            "`layer_types` lists {} layers, the weights have {layers}",
                            types.len()
                        ),
                    });
                }
                let blocks = types[..layers]
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(BlockKind {
                            attention: Attention::Sliding { window },
                            rope: Some(1),
                        }),
                        "full_attention" => Ok(BlockKind {
                            attention: Attention::Causal,
                            rope: Some(0),
                        }),
                        other => Err(unsupported(format!("the layer type `{other}`"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let scalar =
                    config_f64(config, &["query_pre_attn_scalar"]).unwrap_or(head_dim as f64);
                Arch {
                    family,
                    hidden,
                    heads,
                    kv_heads,
                    head_dim,
                    vocab,
                    layout: Layout::Sandwich,
                    norm: Norm::Rms {
                        eps: rms_eps,
                        plus_one: true,
                    },
                    activation: activation(Activation::GeluTanh)?,
                    gated_mlp: true,
                    attention_scale: scalar.powf(-0.5) as f32,
                    embed_scale: Some((hidden as f32).sqrt()),
                    max_positions: None,
                    ropes: vec![global, local],
                    blocks,
                    final_logit_softcap: config_f64(config, &["final_logit_softcapping"])
                        .map(|c| c as f32),
                    has_head: true,
                }
            }
            Family::Gpt2 | Family::Bert => {
                // Learned positions and LayerNorm; BERT is a bidirectional
                // post-norm encoder without an output head.
                let bert = family == Family::Bert;
                let attention = if bert {
                    Attention::Bidirectional
                } else {
                    Attention::Causal
                };
                let default_activation = if bert {
                    Activation::GeluErf
                } else {
                    Activation::GeluTanh
                };
                Arch {
                    family,
                    hidden,
                    heads,
                    kv_heads: heads,
                    head_dim,
                    vocab,
                    layout: if bert {
                        Layout::PostNorm
                    } else {
                        Layout::PreNorm
                    },
                    norm: Norm::Layer { eps: ln_eps },
                    activation: activation(default_activation)?,
                    gated_mlp: false,
                    attention_scale: (head_dim as f32).powf(-0.5),
                    embed_scale: None,
                    max_positions: Some(checkpoint_rows(
                        checkpoint,
                        &weights.embed,
                        "pos_embed.weight",
                    )?),
                    ropes: vec![],
                    blocks: vec![
                        BlockKind {
                            attention,
                            rope: None
                        };
                        layers
                    ],
                    final_logit_softcap: None,
                    has_head: !bert,
                }
            }
            _ => unreachable!("families filtered above"),
        };
        Ok((arch, weights))
    }
}

fn checkpoint_rows(
    checkpoint: &Checkpoint,
    names: &BTreeMap<&'static str, String>,
    key: &str,
) -> Result<usize, ArchError> {
    let name = names.get(key).ok_or_else(|| ArchError::MissingTensor {
        file: checkpoint.path.clone(),
        what: "the position embedding".into(),
    })?;
    Ok(checkpoint.entry(name).map_or(0, |e| e.shape[0]))
}

/// RoPE inverse frequencies, with `rope_scaling` applied when `scaled`.
fn rope(config: &Value, theta: f64, head_dim: usize, scaled: bool) -> Result<Rope, String> {
    let half = head_dim / 2;
    let dim = config
        .get("partial_rotary_factor")
        .and_then(Value::as_f64)
        .map_or(head_dim, |f| (head_dim as f64 * f) as usize);
    if dim != head_dim {
        return Err("partial rotary embeddings".into());
    }
    let mut inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let scaling = config.get("rope_scaling").filter(|s| !s.is_null());
    if let (true, Some(scaling)) = (scaled, scaling) {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = scaling.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
        match kind {
            "default" => {}
            "linear" => inv_freq.iter_mut().for_each(|f| *f /= factor),
            "llama3" => {
                let low = scaling
                    .get("low_freq_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(1.0);
                let high = scaling
                    .get("high_freq_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(4.0);
                let original = scaling
                    .get("original_max_position_embeddings")
                    .and_then(Value::as_f64)
                    .unwrap_or(8192.0);
                let low_wavelen = original / low;
                let high_wavelen = original / high;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            // Llama 3.1's scaling as GGUF stores it (`rope_freqs.weight`):
            // each frequency divided by its own factor.
            "frequency_factors" => {
                let factors: Vec<f64> = scaling
                    .get("factors")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                if factors.len() != inv_freq.len() || factors.iter().any(|f| *f <= 0.0) {
                    return Err(format!(
                        "RoPE frequency factors (`rope_freqs.weight`) of {} positive values for {} frequencies",
                        factors.len(),
                        inv_freq.len()
                    ));
                }
                inv_freq
                    .iter_mut()
                    .zip(factors)
                    .for_each(|(f, by)| *f /= by);
            }
            other => return Err(format!("rope_scaling of type `{other}`")),
        }
    }
    Ok(Rope { inv_freq })
}

/// Graph input name for a block tensor.
fn block_input(role: Role, bias: bool) -> Option<&'static str> {
    Some(match (role, bias) {
        (Role::Q, false) => "q.weight",
        (Role::Q, true) => "q.bias",
        (Role::K, false) => "k.weight",
        (Role::K, true) => "k.bias",
        (Role::V, false) => "v.weight",
        (Role::V, true) => "v.bias",
        (Role::Qkv, false) => "qkv.weight",
        (Role::Qkv, true) => "qkv.bias",
        (Role::O, false) => "o.weight",
        (Role::O, true) => "o.bias",
        (Role::Gate, false) => "gate.weight",
        (Role::Gate, true) => "gate.bias",
        (Role::Up, false) => "up.weight",
        (Role::Up, true) => "up.bias",
        (Role::Down, false) => "down.weight",
        (Role::Down, true) => "down.bias",
        (Role::AttnNorm, false) => "attn_norm.weight",
        (Role::AttnNorm, true) => "attn_norm.bias",
        (Role::MlpNorm, false) => "mlp_norm.weight",
        (Role::MlpNorm, true) => "mlp_norm.bias",
        (Role::PostAttnNorm, false) => "post_attn_norm.weight",
        (Role::PostAttnNorm, true) => "post_attn_norm.bias",
        (Role::PostMlpNorm, false) => "post_mlp_norm.weight",
        (Role::PostMlpNorm, true) => "post_mlp_norm.bias",
        (Role::QNorm, false) => "q_norm.weight",
        (Role::KNorm, false) => "k_norm.weight",
        _ => return None,
    })
}

fn global_input(role: Role, bias: bool) -> Option<(bool, &'static str)> {
    // (true = embedding graph, false = head graph)
    Some(match (role, bias) {
        (Role::Embed, false) => (true, "embed.weight"),
        (Role::PosEmbed, false) => (true, "pos_embed.weight"),
        (Role::TypeEmbed, false) => (true, "type_embed.weight"),
        (Role::EmbedNorm, false) => (true, "embed_norm.weight"),
        (Role::EmbedNorm, true) => (true, "embed_norm.bias"),
        (Role::FinalNorm, false) => (false, "final_norm.weight"),
        (Role::FinalNorm, true) => (false, "final_norm.bias"),
        (Role::LmHead, false) => (false, "lm_head.weight"),
        (Role::LmHead, true) => (false, "lm_head.bias"),
        _ => return None,
    })
}

/// Which stored tensor feeds each graph input; checks every block has what
/// its family needs.
fn weight_map(
    checkpoint: &Checkpoint,
    schema: &Schema,
    layers: usize,
) -> Result<WeightMap, ArchError> {
    // The block count comes from tensor names or, without them, from the
    // config: neither may size a table before the weights are found to be
    // there, so a gap is reported first.
    let present: std::collections::BTreeSet<usize> =
        schema.placements.iter().filter_map(|p| p.layer).collect();
    if let Some(gap) = (0..layers).find(|l| !present.contains(l)) {
        return Err(ArchError::MissingTensor {
            file: checkpoint.path.clone(),
            what: format!("every weight of block {gap} (the model has {layers} blocks)"),
        });
    }
    let mut map = WeightMap {
        blocks: vec![BTreeMap::new(); layers],
        ..Default::default()
    };
    for (entry, placement) in schema.placed(checkpoint) {
        match placement.layer {
            Some(layer) if layer < layers => {
                if let Some(input) = block_input(placement.role, placement.bias) {
                    map.blocks[layer].insert(input, entry.name.clone());
                }
            }
            Some(_) => {}
            None => {
                if let Some((embed, input)) = global_input(placement.role, placement.bias) {
                    let side = if embed { &mut map.embed } else { &mut map.head };
                    side.insert(input, entry.name.clone());
                }
            }
        }
    }
    let family = schema.family;
    let missing = |what: String| ArchError::MissingTensor {
        file: checkpoint.path.clone(),
        what,
    };
    if !map.embed.contains_key("embed.weight") {
        return Err(missing("the token embedding".into()));
    }
    if family.is_decoder() && !map.head.contains_key("lm_head.weight") {
        if schema.tied_embeddings || !schema.placements.iter().any(|p| p.role == Role::LmHead) {
            let embed = map.embed["embed.weight"].clone();
            map.head.insert("lm_head.weight", embed);
        } else {
            return Err(missing("the output embedding (lm_head)".into()));
        }
    }
    // What every block of the family must have, from its parts.
    const ATTENTION: [&str; 4] = ["q.weight", "k.weight", "v.weight", "o.weight"];
    const PRE_NORMS: [&str; 2] = ["attn_norm.weight", "mlp_norm.weight"];
    const POST_NORMS: [&str; 2] = ["post_attn_norm.weight", "post_mlp_norm.weight"];
    const MLP: [&str; 2] = ["up.weight", "down.weight"];
    let mut required: Vec<&str> = match family {
        // GPT-2 stores q, k and v fused.
        Family::Gpt2 => vec!["qkv.weight", "o.weight"],
        _ => ATTENTION.to_vec(),
    };
    if matches!(
        family,
        Family::Llama | Family::Qwen2 | Family::Qwen3 | Family::Gemma3
    ) {
        required.push("gate.weight");
    }
    required.extend(MLP);
    if family != Family::Bert {
        required.extend(PRE_NORMS);
    }
    if matches!(family, Family::Bert | Family::Gemma3) {
        required.extend(POST_NORMS);
    }
    for (layer, inputs) in map.blocks.iter().enumerate() {
        for name in &required {
            if !inputs.contains_key(name) {
                let role = name.trim_end_matches(".weight");
                return Err(missing(format!("block {layer}'s `{role}` weight")));
            }
        }
    }
    if family.is_decoder() && !map.head.contains_key("final_norm.weight") {
        return Err(missing("the final norm".into()));
    }
    if matches!(family, Family::Gpt2 | Family::Bert) && !map.embed.contains_key("pos_embed.weight")
    {
        return Err(missing("the position embedding".into()));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testing;

    /// A two-head llama GGUF with hidden size 4 whose blocks are named by
    /// `blocks`; `head_dim` goes into the metadata as `attention.key_length`.
    fn llama(blocks: &[u64], block_count: u32, head_dim: u32) -> Result<(Arch, WeightMap), String> {
        let u32_value = |v: u32| v.to_le_bytes().to_vec();
        let kv = [
            ("general.architecture", 8, testing::string("llama")),
            ("llama.block_count", 4, u32_value(block_count)),
            ("llama.embedding_length", 4, u32_value(4)),
            ("llama.feed_forward_length", 4, u32_value(8)),
            ("llama.attention.head_count", 4, u32_value(2)),
            ("llama.attention.key_length", 4, u32_value(head_dim)),
        ];
        let square = [0u8; 4 * 4 * 4];
        let wide = [0u8; 4 * 8 * 4];
        let norm = [0u8; 4 * 4];
        let mut names = vec![];
        for b in blocks {
            for (part, extents) in [
                ("attn_q", &[4u64, 4][..]),
                ("attn_k", &[4, 4]),
                ("attn_v", &[4, 4]),
                ("attn_output", &[4, 4]),
                ("ffn_gate", &[4, 8]),
                ("ffn_up", &[4, 8]),
                ("ffn_down", &[8, 4]),
                ("attn_norm", &[4]),
                ("ffn_norm", &[4]),
            ] {
                names.push((format!("blk.{b}.{part}.weight"), extents));
            }
        }
        let mut tensors: Vec<(&str, &[u64], u32, &[u8])> = vec![
            ("token_embd.weight", &[4, 16], 0, &[0u8; 4 * 16 * 4][..]),
            ("output_norm.weight", &[4], 0, &norm),
        ];
        for (name, extents) in &names {
            let data: &[u8] = match extents.len() {
                1 => &norm,
                _ if extents.contains(&8) => &wide,
                _ => &square,
            };
            tensors.push((name, extents, 0, data));
        }
        let checkpoint = Checkpoint::from_bytes("m.gguf", testing::file(&kv, &tensors), None)
            .map_err(|e| e.to_string())?;
        let schema = Schema::of(&checkpoint);
        Arch::of(&checkpoint, &schema).map_err(|e| e.to_string())
    }

    #[test]
    fn a_well_formed_model_builds() {
        let (arch, map) = llama(&[0, 1], 2, 2).unwrap();
        assert_eq!((arch.blocks.len(), arch.head_dim), (2, 2));
        assert_eq!(map.blocks[1]["q.weight"], "blk.1.attn_q.weight");
    }

    #[test]
    fn an_absurd_block_count_is_a_missing_block_not_an_allocation() {
        // Found by the gguf_file fuzzer: a file without block tensors whose
        // `block_count` said 10⁸ sized a table of 10⁸ blocks (2.4 GB) before
        // any check ran.
        let error = llama(&[], 100_000_000, 2).unwrap_err();
        assert!(
            error.contains("every weight of block 0 (the model has 100000000 blocks)"),
            "{error}"
        );
        // Names decide when there are any; a gap in them is the same error.
        let error = llama(&[0, 999_999], 2, 2).unwrap_err();
        assert!(
            error.contains("every weight of block 1 (the model has 1000000 blocks)"),
            "{error}"
        );
    }

    #[test]
    fn a_head_size_the_weights_do_not_have_is_refused() {
        let error = llama(&[0], 1, 1 << 30).unwrap_err();
        assert!(
            error
                .contains("2 heads of size 1073741824 do not match `blk.0.attn_q.weight` (4 rows)"),
            "{error}"
        );
    }
}
