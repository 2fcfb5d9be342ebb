//! What a plugin learns about the model: its family, every tensor's role and
//! dtype, and the model-level facts. The enums cross the boundary as the
//! strings users see in tables (`llama`, `q`, `BF16`); their predicates live
//! here so host and plugins answer "is this a norm?" the same way.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Strings in, enums out, for the three enums below.
macro_rules! string_serde {
    ($ty:ty, $what:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                <$ty>::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", $what, " `{}`"), text))
                })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Architecture families probe knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Llama, Mistral, SmolLM and other `model.layers.{i}.self_attn.q_proj` models.
    Llama,
    /// Llama layout with q/k/v biases.
    Qwen2,
    /// Llama layout with q/k norms.
    Qwen3,
    /// Four norms per block, q/k norms, scaled embeddings.
    Gemma3,
    /// `h.{i}.attn.c_attn`: fused QKV stored transposed (Conv1D).
    Gpt2,
    /// BERT encoders (MiniLM).
    Bert,
    /// The small GPTs of the parameter-golf challenge (`blocks.{i}.attn.c_q`, banks).
    ParamGolf,
    /// Anything else: 2-D tensors are still analysable, layers parsed from names.
    Unknown,
}

impl Family {
    /// Every family, in declaration order.
    pub const ALL: [Family; 8] = [
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma3,
        Family::Gpt2,
        Family::Bert,
        Family::ParamGolf,
        Family::Unknown,
    ];

    /// The name users see (`llama`, `gemma3`, …).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Gpt2 => "gpt2",
            Self::Bert => "bert",
            Self::ParamGolf => "paramgolf",
            Self::Unknown => "unknown",
        }
    }

    /// The family of a name `as_str` gives; `None` for any other text.
    pub fn parse(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// Decoder-only models predict tokens, so they have an output embedding.
    pub fn is_decoder(&self) -> bool {
        !matches!(self, Self::Bert)
    }

    /// Whether a position attends only to itself and earlier positions, so
    /// tokens appended to a sequence never change the rows before them and
    /// forward requests may carry `branches` (every family but the BERT
    /// encoders).
    pub fn is_causal(&self) -> bool {
        !matches!(self, Self::Bert)
    }

    /// Whether 2-D weights are stored (in, out) — GPT-2's Conv1D — rather
    /// than Linear's (out, in).
    pub fn stores_transposed(&self) -> bool {
        matches!(self, Self::Gpt2)
    }
}

string_serde!(Family, "family");

/// What a tensor does in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Token embedding (input).
    Embed,
    /// Learned position embedding (GPT-2, BERT).
    PosEmbed,
    /// Token-type embedding (BERT).
    TypeEmbed,
    /// Norm right after the embeddings (BERT).
    EmbedNorm,
    /// Output embedding (unembedding); absent when tied to `Embed`.
    LmHead,
    /// Norm before the output head.
    FinalNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Fused query/key/value projection (GPT-2 `c_attn`, `qkv_proj`).
    Qkv,
    /// Attention output projection.
    O,
    /// Gate projection of a gated MLP.
    Gate,
    /// Up (first) projection of the MLP.
    Up,
    /// Down (output) projection of the MLP.
    Down,
    /// Norm before attention (after it in BERT, see `PostAttnNorm`).
    AttnNorm,
    /// Norm before the MLP.
    MlpNorm,
    /// Norm of attention's output (Gemma 3) or of the sum after attention (BERT).
    PostAttnNorm,
    /// Norm of the MLP's output (Gemma 3) or of the sum after the MLP (BERT).
    PostMlpNorm,
    /// Per-head norm of the queries (Qwen 3, Gemma 3).
    QNorm,
    /// Per-head norm of the keys.
    KNorm,
    /// Learned scale of attention's output (parameter-golf models).
    AttnScale,
    /// Learned scale of the MLP's output.
    MlpScale,
    /// Mixing weights of the residual with the embedding output.
    ResidMix,
    /// Per-head query gain.
    QGain,
    /// Weights of U-Net style skip connections between blocks.
    SkipWeights,
    /// Gates of those skip connections.
    SkipGates,
    /// Several blocks' q and o matrices stacked in one tensor.
    QoBank,
    /// Several blocks' k and v matrices stacked in one tensor.
    KvBank,
    /// Several blocks' MLP up matrices stacked.
    MlpUpBank,
    /// Several blocks' MLP down matrices stacked.
    MlpDownBank,
    /// BERT's pooler.
    Pooler,
    /// Non-parameter buffers some checkpoints carry (GPT-2's causal mask).
    Buffer,
    /// A tensor whose role probe does not recognise (still listed).
    Other,
}

impl Role {
    /// Every role, in declaration order.
    pub const ALL: [Role; 33] = [
        Role::Embed,
        Role::PosEmbed,
        Role::TypeEmbed,
        Role::EmbedNorm,
        Role::LmHead,
        Role::FinalNorm,
        Role::Q,
        Role::K,
        Role::V,
        Role::Qkv,
        Role::O,
        Role::Gate,
        Role::Up,
        Role::Down,
        Role::AttnNorm,
        Role::MlpNorm,
        Role::PostAttnNorm,
        Role::PostMlpNorm,
        Role::QNorm,
        Role::KNorm,
        Role::AttnScale,
        Role::MlpScale,
        Role::ResidMix,
        Role::QGain,
        Role::SkipWeights,
        Role::SkipGates,
        Role::QoBank,
        Role::KvBank,
        Role::MlpUpBank,
        Role::MlpDownBank,
        Role::Pooler,
        Role::Buffer,
        Role::Other,
    ];

    /// The name used in tables and parameters (`q`, `attn_norm`, …).
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Embed => "embed",
            Role::PosEmbed => "pos_embed",
            Role::TypeEmbed => "type_embed",
            Role::EmbedNorm => "embed_norm",
            Role::LmHead => "lm_head",
            Role::FinalNorm => "final_norm",
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::Qkv => "qkv",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::Down => "down",
            Role::AttnNorm => "attn_norm",
            Role::MlpNorm => "mlp_norm",
            Role::PostAttnNorm => "post_attn_norm",
            Role::PostMlpNorm => "post_mlp_norm",
            Role::QNorm => "q_norm",
            Role::KNorm => "k_norm",
            Role::AttnScale => "attn_scale",
            Role::MlpScale => "mlp_scale",
            Role::ResidMix => "resid_mix",
            Role::QGain => "q_gain",
            Role::SkipWeights => "skip_weights",
            Role::SkipGates => "skip_gates",
            Role::QoBank => "qo_bank",
            Role::KvBank => "kv_bank",
            Role::MlpUpBank => "mlp_up_bank",
            Role::MlpDownBank => "mlp_down_bank",
            Role::Pooler => "pooler",
            Role::Buffer => "buffer",
            Role::Other => "other",
        }
    }

    /// The role of a name `as_str` gives; `None` for any other text.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Every kind of normalisation gain.
    pub fn is_norm(&self) -> bool {
        matches!(
            self,
            Role::EmbedNorm
                | Role::FinalNorm
                | Role::AttnNorm
                | Role::MlpNorm
                | Role::PostAttnNorm
                | Role::PostMlpNorm
                | Role::QNorm
                | Role::KNorm
        )
    }

    /// Several layers' matrices stacked in one tensor.
    pub fn is_bank(&self) -> bool {
        matches!(
            self,
            Role::QoBank | Role::KvBank | Role::MlpUpBank | Role::MlpDownBank
        )
    }

    /// A role whose weight is a matrix an analysis of weights looks at (when
    /// it is 2-D): not a norm gain, a scale, a mixing vector or a buffer.
    pub fn is_weight_matrix(&self) -> bool {
        !self.is_norm()
            && !matches!(
                self,
                Role::Buffer
                    | Role::ResidMix
                    | Role::SkipWeights
                    | Role::SkipGates
                    | Role::AttnScale
                    | Role::MlpScale
                    | Role::QGain
            )
    }

    /// The role as written in tables: `q`, or `q_bias` for a bias.
    pub fn table_name(&self, bias: bool) -> String {
        if bias {
            format!("{}_bias", self.as_str())
        } else {
            self.as_str().to_string()
        }
    }
}

string_serde!(Role, "role");

/// A stored element type, named as safetensors (or, for block-quantized
/// GGUF tensors, llama.cpp) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 64-bit unsigned integer.
    U64,
    /// 32-bit unsigned integer.
    U32,
    /// 16-bit unsigned integer.
    U16,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
    /// A llama.cpp block-quantized type (GGUF files): values are read
    /// dequantized to f32.
    Quant(Quant),
    /// FP8, FP6, FP4 and complex types: listed, never analysed.
    Other(&'static str),
}

/// llama.cpp's block-quantized weight types (`ggml_type`), as GGUF files
/// store them: `block` weights packed into `bytes` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum Quant {
    /// 4-bit, one f16 scale per 32 weights.
    Q4_0,
    /// 4-bit, an f16 scale and minimum per 32 weights.
    Q4_1,
    /// 5-bit, one f16 scale per 32 weights.
    Q5_0,
    /// 5-bit, an f16 scale and minimum per 32 weights.
    Q5_1,
    /// 8-bit, one f16 scale per 32 weights.
    Q8_0,
    /// 8-bit, an f16 scale and sum per 32 weights.
    Q8_1,
    /// 2-bit k-quant: 256-weight super-blocks of 16-weight blocks.
    Q2_K,
    /// 3-bit k-quant.
    Q3_K,
    /// 4-bit k-quant (8 blocks of 32 with 6-bit scales and minimums).
    Q4_K,
    /// 5-bit k-quant.
    Q5_K,
    /// 6-bit k-quant (16 blocks of 16 with 8-bit scales).
    Q6_K,
    /// 8-bit k-quant (llama.cpp's intermediate type).
    Q8_K,
    /// 2.06-bit i-quant (lattice codebook).
    IQ2_XXS,
    /// 2.31-bit i-quant.
    IQ2_XS,
    /// 3.06-bit i-quant.
    IQ3_XXS,
    /// 1.56-bit i-quant.
    IQ1_S,
    /// 4-bit non-linear i-quant, blocks of 32.
    IQ4_NL,
    /// 3.44-bit i-quant.
    IQ3_S,
    /// 2.56-bit i-quant.
    IQ2_S,
    /// 4.25-bit non-linear i-quant.
    IQ4_XS,
    /// 1.75-bit i-quant.
    IQ1_M,
    /// Ternary, 1.69 bits.
    TQ1_0,
    /// Ternary, 2.06 bits.
    TQ2_0,
    /// OCP microscaling FP4 (4-bit e2m1, a shared 8-bit exponent per 32).
    MXFP4,
    /// NVIDIA's FP4 (e2m1 with FP8 scales per 16, blocks of 64).
    NVFP4,
    /// 1-bit, blocks of 128.
    Q1_0,
}

impl Quant {
    /// Every type, with its `ggml_type` id, its name, the weights in one
    /// block and the bytes that block takes (llama.cpp's `ggml.h` and the
    /// `gguf` Python package's `GGML_QUANT_SIZES`).
    pub const ALL: [(Quant, u32, &'static str, usize, usize); 26] = [
        (Quant::Q4_0, 2, "Q4_0", 32, 18),
        (Quant::Q4_1, 3, "Q4_1", 32, 20),
        (Quant::Q5_0, 6, "Q5_0", 32, 22),
        (Quant::Q5_1, 7, "Q5_1", 32, 24),
        (Quant::Q8_0, 8, "Q8_0", 32, 34),
        (Quant::Q8_1, 9, "Q8_1", 32, 36),
        (Quant::Q2_K, 10, "Q2_K", 256, 84),
        (Quant::Q3_K, 11, "Q3_K", 256, 110),
        (Quant::Q4_K, 12, "Q4_K", 256, 144),
        (Quant::Q5_K, 13, "Q5_K", 256, 176),
        (Quant::Q6_K, 14, "Q6_K", 256, 210),
        (Quant::Q8_K, 15, "Q8_K", 256, 292),
        (Quant::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
        (Quant::IQ2_XS, 17, "IQ2_XS", 256, 74),
        (Quant::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
        (Quant::IQ1_S, 19, "IQ1_S", 256, 50),
        (Quant::IQ4_NL, 20, "IQ4_NL", 32, 18),
        (Quant::IQ3_S, 21, "IQ3_S", 256, 110),
        (Quant::IQ2_S, 22, "IQ2_S", 256, 82),
        (Quant::IQ4_XS, 23, "IQ4_XS", 256, 136),
        (Quant::IQ1_M, 29, "IQ1_M", 256, 56),
        (Quant::TQ1_0, 34, "TQ1_0", 256, 54),
        (Quant::TQ2_0, 35, "TQ2_0", 256, 66),
        (Quant::MXFP4, 39, "MXFP4", 32, 17),
        (Quant::NVFP4, 40, "NVFP4", 64, 36),
        (Quant::Q1_0, 41, "Q1_0", 128, 18),
    ];

    fn row(&self) -> (Quant, u32, &'static str, usize, usize) {
        Self::ALL
            .into_iter()
            .find(|row| row.0 == *self)
            .expect("every Quant has a row in ALL")
    }

    /// llama.cpp's name: `Q4_K`, `IQ2_XS`, …
    pub fn as_str(&self) -> &'static str {
        self.row().2
    }

    /// Its `ggml_type` id in a GGUF tensor header.
    pub fn ggml_id(&self) -> u32 {
        self.row().1
    }

    /// The type of a `ggml_type` id; `None` for ids that are not block types.
    pub fn from_ggml_id(id: u32) -> Option<Quant> {
        Self::ALL
            .into_iter()
            .find(|row| row.1 == id)
            .map(|row| row.0)
    }

    /// Weights per block (a row's length must be a multiple).
    pub fn block_weights(&self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        self.row().4
    }
}

/// Names of the types probe lists but never reads.
const OTHER_DTYPES: [&str; 10] = [
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "F6_E2M3",
    "F6_E3M2",
    "F4",
    "C64",
    "unknown",
];

impl Dtype {
    const NAMED: [Dtype; 13] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U64,
        Dtype::U32,
        Dtype::U16,
        Dtype::U8,
        Dtype::Bool,
    ];

    /// The name safetensors uses for this dtype.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::F64 => "F64",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U64 => "U64",
            Self::U32 => "U32",
            Self::U16 => "U16",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
            Self::Quant(quant) => quant.as_str(),
            Self::Other(name) => name,
        }
    }

    /// Storage bits per weight: 32 for F32, 4.5 for Q4_K (its block scales
    /// included), 1 byte for BOOL; `None` for the unknown.
    pub fn bits_per_weight(&self) -> Option<f64> {
        Some(match self {
            Self::F64 | Self::I64 | Self::U64 => 64.0,
            Self::F32 | Self::I32 | Self::U32 => 32.0,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 16.0,
            Self::I8 | Self::U8 | Self::Bool => 8.0,
            Self::Quant(q) => (q.block_bytes() * 8) as f64 / q.block_weights() as f64,
            Self::Other(name) => match *name {
                "C64" => 64.0,
                "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8.0,
                "F6_E2M3" | "F6_E3M2" => 6.0,
                "F4" => 4.0,
                _ => return None,
            },
        })
    }

    /// The dtype of a safetensors name (`F32`, `BF16`, `F8_E4M3`, …); `None` for unknown text.
    pub fn parse(name: &str) -> Option<Dtype> {
        Self::NAMED
            .into_iter()
            .find(|d| d.as_str() == name)
            .or_else(|| {
                OTHER_DTYPES
                    .iter()
                    .find(|other| **other == name)
                    .map(|other| Dtype::Other(other))
            })
            .or_else(|| {
                Quant::ALL
                    .into_iter()
                    .find(|row| row.2 == name)
                    .map(|row| Dtype::Quant(row.0))
            })
    }

    /// Dtypes the analyses read, as f32 on request: the floating-point
    /// types and the GGUF block-quantized ones (a type the store cannot
    /// dequantize is refused when its values are asked for, naming it).
    pub fn is_float(&self) -> bool {
        matches!(
            self,
            Self::F64 | Self::F32 | Self::F16 | Self::BF16 | Self::Quant(_)
        )
    }
}

string_serde!(Dtype, "dtype");

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Model facts the host knows about one checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The checkpoint's name (its file or folder).
    pub label: String,
    /// Its architecture family.
    pub family: Family,
    /// Blocks, from the tensor names.
    pub num_layers: usize,
    /// Width of the residual stream, when known.
    pub hidden_size: Option<usize>,
    /// Rows of the token embedding, when known.
    pub vocab_size: Option<usize>,
    /// Whether the output head reuses the token embedding.
    pub tied_embeddings: bool,
    /// `config.json`, when the checkpoint has one.
    pub config: Option<serde_json::Value>,
    /// The safetensors `__metadata__` of the checkpoint's files (e.g. the
    /// permutation `probe shuffle` records).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Whether the tokenizer has a chat template (`tokenizer_config.json`),
    /// so [`crate::TextMode::Chat`] can be used (ABI 2.2; false from older hosts).
    #[serde(default)]
    pub chat_template: bool,
    /// Per block, which kind of block it runs as: blocks with the same id
    /// share their attention pattern (causal, sliding window, both ways)
    /// and rotary table, as the config assigns them (Gemma 3: sliding or
    /// full attention). Ids count from 0 in order of first appearance;
    /// empty where the host cannot run the model (and from hosts older
    /// than 2.7).
    #[serde(default)]
    pub block_kinds: Vec<usize>,
}

/// One tensor as the host places it (read from a [`crate::abi::TensorInfoC`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Its place in the checkpoint's name-sorted tensor list; pass it back to
    /// the host to read the values.
    pub index: usize,
    /// The stored tensor name.
    pub name: String,
    /// What it does in the model.
    pub role: Role,
    /// A bias vector of `role` rather than its weight.
    pub bias: bool,
    /// How it is stored (values reach a plugin as f32 whatever this is).
    pub dtype: Dtype,
    /// Block index; `None` outside the blocks.
    pub layer: Option<usize>,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// The role as written in tables (`q`, `q_bias`).
    pub fn role_name(&self) -> String {
        self.role.table_name(self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_cross_as_the_strings_in_tables() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
        for family in Family::ALL {
            assert_eq!(Family::parse(family.as_str()), Some(family));
        }
        for name in [
            "F32", "BF16", "BOOL", "F8_E4M3", "unknown", "Q4_K", "IQ2_XS",
        ] {
            assert_eq!(Dtype::parse(name).unwrap().as_str(), name);
        }
        assert_eq!(Dtype::parse("F12"), None);
        let err = serde_json::from_str::<Role>("\"gatee\"").unwrap_err();
        assert!(err.to_string().contains("unknown role `gatee`"), "{err}");
    }

    #[test]
    fn predicates() {
        assert!(Role::QNorm.is_norm() && !Role::QNorm.is_weight_matrix());
        assert!(Role::Q.is_weight_matrix() && Role::QoBank.is_weight_matrix());
        assert!(!Role::Buffer.is_weight_matrix() && !Role::ResidMix.is_weight_matrix());
        assert_eq!(Role::Q.table_name(true), "q_bias");
        assert!(Dtype::BF16.is_float() && !Dtype::I8.is_float());
        assert!(Dtype::Quant(Quant::Q4_1).is_float());
        assert_eq!(Dtype::Quant(Quant::Q4_K).bits_per_weight(), Some(4.5));
        assert_eq!(Dtype::Quant(Quant::Q4_1).bits_per_weight(), Some(5.0));
        assert_eq!(Dtype::Quant(Quant::Q6_K).bits_per_weight(), Some(6.5625));
        assert_eq!(Dtype::BF16.bits_per_weight(), Some(16.0));
        for (quant, id, ..) in Quant::ALL {
            assert_eq!(Quant::from_ggml_id(id), Some(quant));
            assert_eq!(quant.ggml_id(), id);
        }
        assert!(!Family::Bert.is_decoder() && Family::Gpt2.stores_transposed());
        assert!(!Family::Bert.is_causal() && Family::Gemma3.is_causal());
    }
}
