//! The JSON messages besides forward passes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `HostApi::write_reordered`: write the checkpoint into `dir` with every
/// tensor of block `b` renamed to block `new_index[b]`; the per-block config
/// moves along, the tokenizer files are copied, `metadata` becomes the
/// safetensors `__metadata__`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteReordered {
    /// The folder to write (created; must not hold a checkpoint already).
    pub dir: PathBuf,
    /// For each stored block `b`, the block it becomes.
    pub new_index: Vec<usize>,
    #[serde(default)]
    /// Key-value pairs for the safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// `HostApi::run_info` (ABI 2.1): how this run's forward passes execute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `cpu` or `cuda`.
    pub device: String,
    /// ONNX Runtime's intra-op threads; 0 = every core.
    pub threads: usize,
}

/// How `HostApi::encode` (ABI 2.2) turns text into token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextMode {
    /// With the tokenizer's own special tokens as its post-processor adds
    /// them (BOS, or BERT's `[CLS] … [SEP]`): a text on its own.
    Plain,
    /// As one user message under the model's chat template, with the prompt
    /// for the assistant's answer.
    Chat,
    /// Without any special token: a continuation appended to an encoded
    /// prompt (a completion to force-decode).
    Continuation,
}

/// `HostApi::encode` (ABI 2.2): a text to encode, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeRequest {
    /// The text.
    pub text: String,
    /// How its tokens are framed.
    pub mode: TextMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_modes_cross_as_lowercase_words() {
        let json = serde_json::to_string(&EncodeRequest {
            text: "hi".into(),
            mode: TextMode::Continuation,
        })
        .unwrap();
        assert_eq!(json, r#"{"text":"hi","mode":"continuation"}"#);
        assert!(serde_json::from_str::<EncodeRequest>(r#"{"text":"a","mode":"raw"}"#).is_err());
    }
}
