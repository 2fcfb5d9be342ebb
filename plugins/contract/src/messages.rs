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
