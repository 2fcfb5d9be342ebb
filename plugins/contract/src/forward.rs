//! A forward pass as it crosses the boundary: the request a plugin sends
//! (JSON, its start residual as raw floats beside it) and the description of
//! the result the host keeps (JSON; the arrays are read one by one).

use serde::{Deserialize, Serialize};

/// How an edit changes the residual row at its (stage, position).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum EditChange {
    /// Put these `hidden` values in place of the row (activation patching).
    Replace(Vec<f32>),
    /// Add these `hidden` values to the row (steering).
    Add(Vec<f32>),
}

/// Where an edit applies (2.6), named as TransformerLens names its hooks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Hook {
    /// The residual stream between blocks: the edit's `stage` s is the
    /// residual before the s-th block run (`blocks.{l}.hook_resid_pre`), or
    /// after the last one; `hidden` values.
    #[default]
    Resid,
    /// What the attention sublayer of block run `stage` adds to the residual
    /// (`hook_attn_out`: after the output projection and any post-norm);
    /// `hidden` values.
    AttnOut,
    /// What the MLP sublayer of block run `stage` adds (`hook_mlp_out`);
    /// `hidden` values.
    MlpOut,
    /// Head `head`'s output in block run `stage` before the output
    /// projection — its slice of the attention-weighted values
    /// (`attn.hook_z`); `head_dim` values. Its contribution to the residual
    /// is that slice times its columns of the output projection.
    Z {
        /// The head (0-based).
        head: usize,
    },
}

impl Hook {
    /// Whether this is the residual between blocks (the default).
    pub fn is_resid(&self) -> bool {
        *self == Hook::Resid
    }
}

/// A change to the model's activations at one (stage, position): the
/// residual stream between blocks by default, or (2.6) a sublayer's output
/// or one head's output inside a block run ([`Hook`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// For [`Hook::Resid`]: 0 = the embedding output, s = after the s-th
    /// block run. For the others: the block run (0 = the first the request
    /// runs).
    pub stage: usize,
    /// Token position (0-based) of the row to change.
    pub position: usize,
    /// What happens to that row.
    pub change: EditChange,
    /// Where (2.6; absent: the residual between blocks).
    #[serde(default, skip_serializing_if = "Hook::is_resid")]
    pub hook: Hook,
}

impl Edit {
    /// The same change at another hook: `Edit::replace(l, p, clean).at(Hook::AttnOut)`
    /// patches block run `l`'s attention output at position `p`.
    pub fn at(self, hook: Hook) -> Self {
        Self { hook, ..self }
    }

    /// Put `values` in place of the row at (stage, position): activation patching.
    pub fn replace(stage: usize, position: usize, values: Vec<f32>) -> Self {
        Self {
            stage,
            position,
            change: EditChange::Replace(values),
            hook: Hook::Resid,
        }
    }

    /// Add `values` to the row at (stage, position): steering.
    pub fn add(stage: usize, position: usize, values: Vec<f32>) -> Self {
        Self {
            stage,
            position,
            change: EditChange::Add(values),
            hook: Hook::Resid,
        }
    }
}

/// Several continuations of one prefix in one sequence (2.2): the tokens
/// are the prefix, then each branch's tokens in turn. A branch's rows attend
/// to the prefix and to their own branch only, and its positions continue
/// from the prefix's end, so every branch's rows are what a separate pass
/// over `prefix ++ branch` gives — with the prefix computed once. Causal
/// models only.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branches {
    /// Tokens shared by every branch, at the start of the sequence.
    pub prefix: usize,
    /// Each branch's length in tokens; they add up to the rest of the sequence.
    pub lengths: Vec<usize>,
}

impl Branches {
    /// The position (for rotary and learned position embeddings) of every
    /// row of a sequence laid out this way.
    pub fn positions(&self) -> Vec<usize> {
        let mut positions: Vec<usize> = (0..self.prefix).collect();
        for &len in &self.lengths {
            positions.extend(self.prefix..self.prefix + len);
        }
        positions
    }

    /// Which part of the sequence each row belongs to: `None` for the
    /// prefix, `Some(b)` for branch `b`.
    pub fn owners(&self) -> Vec<Option<usize>> {
        let mut owners = vec![None; self.prefix];
        for (b, &len) in self.lengths.iter().enumerate() {
            owners.extend(std::iter::repeat_n(Some(b), len));
        }
        owners
    }

    /// The first row of branch `b`.
    pub fn start(&self, b: usize) -> usize {
        self.prefix + self.lengths[..b].iter().sum::<usize>()
    }

    /// Whether this layout fits a sequence of `tokens` tokens.
    pub fn check(&self, tokens: usize) -> Result<(), String> {
        if self.prefix == 0 || self.lengths.is_empty() || self.lengths.contains(&0) {
            return Err(
                "`branches`: a prefix of at least one token and branches of at least one".into(),
            );
        }
        let total = self
            .lengths
            .iter()
            .try_fold(self.prefix, |a, &b| a.checked_add(b));
        if total != Some(tokens) {
            return Err(format!(
                "`branches`: the prefix ({}) and the branches ({:?}) do not add up to the {tokens} tokens",
                self.prefix, self.lengths
            ));
        }
        Ok(())
    }
}

/// One sublayer of a block (2.5), run alone on a residual the caller gives:
/// what a study of each part of a block (its linearity, say) perturbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sublayer {
    /// Attention with its norms: the residual `x` goes to the block's
    /// midpoint `x + attention(x)` (`norm(x + attention(x))` for post-norm
    /// models such as BERT).
    Attention,
    /// The MLP with its norms, on a residual taken as the block's midpoint
    /// `h`: `h + mlp(h)` (post-norm: `norm(h + mlp(h))`).
    Mlp,
}

/// One forward pass to run. The host refuses fields it does not know, so a
/// plugin never asks for something an older host would silently ignore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardRequest {
    /// The token ids to run.
    pub tokens: Vec<u32>,
    /// Blocks to run in this order (skip by leaving out); `None` = all.
    #[serde(default)]
    pub blocks: Option<Vec<usize>>,
    #[serde(default)]
    /// Changes to the residual stream between blocks.
    pub edits: Vec<Edit>,
    /// Keep the residual after the embedding and after every block.
    #[serde(default)]
    pub residuals: bool,
    /// Keep each block's attention and MLP updates.
    #[serde(default)]
    pub updates: bool,
    /// Keep attention probabilities `[heads, T, T]` per block.
    #[serde(default)]
    pub attention: bool,
    /// Compute logits `[T, vocab]` (and the loss) from the final residual.
    #[serde(default)]
    pub logits: bool,
    /// Compute the loss without handing the logits back (they are large).
    #[serde(default)]
    pub loss: bool,
    /// With `loss` (and not `logits`): the softmax runs over these token ids
    /// and the text's own tokens only. That loss is below the model's, but it
    /// costs a fraction of the head's product: a screen for comparing many
    /// runs of one text, to be confirmed with the full loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_vocab: Option<Vec<u32>>,
    /// Start from this residual `[T, hidden]` instead of the embedding's
    /// output: cache a prefix of blocks and run only what follows. It never
    /// travels in the JSON: `forward_batch` passes it as raw floats.
    #[serde(skip)]
    pub start: Option<Vec<f32>>,
    /// The tokens are a prefix and several continuations of it, each
    /// attending to the prefix and itself only (2.2; causal models only; no
    /// loss, whose next tokens would be ambiguous).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branches: Option<Branches>,
    /// 2.4: ids from `HostApi::override_tensor`: for this request only, each
    /// named stored tensor reads as the values registered under its id
    /// (quantized, ablated, truncated weights). At most one per tensor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<u64>,
    /// 2.5: every block run is only this sublayer (with its norms): the
    /// residual after a run is the sublayer's output, the other sublayer's
    /// update reads as zeros, and `attention` maps exist only for
    /// [`Sublayer::Attention`]. Start from the residual the sublayer should
    /// see (`start`): the block's input for attention, its midpoint for the
    /// MLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sublayer: Option<Sublayer>,
    /// 2.6: keep every block run's head outputs before the output projection
    /// `[T, heads × head_dim]` ([`Hook::Z`]; [`OutputKind::Z`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub z: bool,
    /// 2.7: per block run, the block index whose attention pattern and
    /// rotary table it runs with — the config's per-block entry at that
    /// index ([`crate::ModelInfo::block_kinds`]); default: each block its
    /// own. A checkpoint whose config describes positions, not blocks (its
    /// tensors renamed, the config kept), runs the block placed at
    /// position p with entry p.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<usize>>,
}

impl ForwardRequest {
    /// The request's own consistency, before any model is involved.
    pub fn check(&self) -> Result<(), String> {
        if self.tokens.is_empty() {
            return Err("no tokens".into());
        }
        if self.loss_vocab.is_some() && (self.logits || !self.loss) {
            return Err("`loss_vocab` restricts the loss: ask for `loss` and not `logits`".into());
        }
        if let Some(branches) = &self.branches {
            branches.check(self.tokens.len())?;
            if self.loss || self.logits {
                return Err("`branches` has no next token for the prefix's last row: ask for no loss or logits".into());
            }
        }
        if self.sublayer.is_some() && self.edits.iter().any(|e| !e.hook.is_resid()) {
            return Err(
                "edits inside a block (attn_out, mlp_out, z) need the whole block: no `sublayer`"
                    .into(),
            );
        }
        if self.sublayer == Some(Sublayer::Mlp) && (self.attention || self.z) {
            return Err(
                "a run of the MLP sublayer alone has no attention probabilities or head outputs"
                    .into(),
            );
        }
        let mut ids = self.overrides.clone();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("override {} is listed twice", pair[0]));
        }
        Ok(())
    }
}

/// What the host says about a finished forward pass; the arrays themselves
/// are read with `HostApi::forward_output`. Readers ignore fields they do
/// not know, so a newer host can say more.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForwardMeta {
    /// The token ids that ran.
    pub tokens: Vec<u32>,
    /// The blocks run, in order.
    pub blocks: Vec<usize>,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Vocabulary size (columns of the logits).
    pub vocab: usize,
    /// Mean next-token cross-entropy (nats), when logits or the loss were asked for.
    pub loss: Option<f64>,
    /// Per predicting position (`T − 1` values).
    pub token_losses: Option<Vec<f64>>,
    /// Residual arrays kept (embedding output + one per block run).
    pub stages: usize,
    /// Block runs with attention and MLP updates kept.
    pub updates: usize,
    /// Block runs with attention probabilities kept.
    pub attention: usize,
    /// Whether logits were kept (`OutputKind::Logits`).
    pub has_logits: bool,
    /// Block runs with head outputs kept (`OutputKind::Z`, 2.6).
    #[serde(default)]
    pub z: usize,
}

/// The arrays of a forward result, for `HostApi::forward_output`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// The residual `[T, hidden]` at stage `index` (0 = embedding output).
    Residual = 1,
    /// What block run `index` added through attention `[T, hidden]`.
    AttnUpdate = 2,
    /// What block run `index` added through its MLP `[T, hidden]`.
    MlpUpdate = 3,
    /// Attention probabilities of block run `index` `[heads, T, T]`.
    Attention = 4,
    /// The residual after the last block run `[T, hidden]`.
    Final = 5,
    /// Logits from the final residual `[T, vocab]`.
    Logits = 6,
    /// Head outputs before the output projection of block run `index`
    /// `[T, heads × head_dim]` (2.6).
    Z = 7,
}

impl OutputKind {
    /// Every kind.
    pub const ALL: [OutputKind; 7] = [
        OutputKind::Residual,
        OutputKind::AttnUpdate,
        OutputKind::MlpUpdate,
        OutputKind::Attention,
        OutputKind::Final,
        OutputKind::Logits,
        OutputKind::Z,
    ];

    /// The number that crosses the ABI.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The kind of a number that crossed the ABI.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// 2.3: greedy continuations of prompts, made in the host with a key/value
/// cache (each new token runs one row through every block instead of its
/// whole sequence again).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Token ids of each prompt (none empty).
    pub prompts: Vec<Vec<u32>>,
    /// The most tokens added to each prompt.
    pub max_new_tokens: usize,
    /// Tokens that end a continuation; the one that ended it is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<u32>,
}

impl GenerateRequest {
    /// The request's own consistency, before any model is involved.
    pub fn check(&self) -> Result<(), String> {
        if let Some(i) = self.prompts.iter().position(Vec::is_empty) {
            return Err(format!("prompt {i} has no tokens to continue"));
        }
        Ok(())
    }
}

/// The host's answer to a [`GenerateRequest`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerateReply {
    /// Per prompt, in order: the tokens added (each the most probable next
    /// token, equal logits going to the lower id), at most
    /// `max_new_tokens`, ending at the first stop token.
    pub completions: Vec<Vec<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_residual_never_travels_in_the_json() {
        let request = ForwardRequest {
            tokens: vec![1, 2],
            edits: vec![Edit::add(1, 0, vec![0.5])],
            start: Some(vec![1.0; 4]),
            ..Default::default()
        };
        let json = serde_json::to_string(&request).unwrap();
        assert!(!json.contains("start"), "{json}");
        assert!(json.contains(r#""change":{"add":[0.5]}"#), "{json}");
        let back: ForwardRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.start, None);
        assert_eq!(back.edits, request.edits);
    }

    #[test]
    fn unknown_request_fields_are_refused() {
        let err = serde_json::from_str::<ForwardRequest>(r#"{"tokens":[1],"logit":true}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `logit`"), "{err}");
        let bad = ForwardRequest {
            tokens: vec![1],
            loss_vocab: Some(vec![3]),
            logits: true,
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("loss_vocab"));
    }

    #[test]
    fn output_kinds_round_trip() {
        for kind in OutputKind::ALL {
            assert_eq!(OutputKind::from_code(kind.code()), Some(kind));
        }
        assert_eq!(OutputKind::from_code(0), None);
    }
}
