//! The forward engine as a plugin sees it: tokenize, run the model block by
//! block with the residual stream handed back, intervene, and read the logit
//! lens. The host runs ONNX Runtime; these calls only move data.
//!
//! A request is a [`ForwardRequest`] (defined once in `probe-contract`, so
//! host and plugin cannot disagree on it). Interventions are [`Edit`]s of
//! the residual stream between blocks:
//!
//! ```ignore
//! // Activation patching: the clean run's residual after block 5 at the
//! // last position, put into the corrupted run.
//! let clean = host.forward(&ForwardRequest { tokens: clean_ids, residuals: true, ..Default::default() })?;
//! let row = clean.residual_row(6, last);           // stage 6 = after block 5
//! let patched = host.forward(&ForwardRequest {
//!     tokens: corrupt_ids,
//!     edits: vec![Edit::replace(6, last, row.to_vec())],
//!     logits: true,
//!     ..Default::default()
//! })?;
//! // Steering: add a direction to the residual after block 10 at every position.
//! let steer = (0..t).map(|p| Edit::add(11, p, direction.clone())).collect();
//! ```
//!
//! Edits also reach inside a block run (ABI 2.6): its attention output, its
//! MLP output, or one head's output before the output projection — the
//! hooks TransformerLens calls `hook_attn_out`, `hook_mlp_out` and
//! `attn.hook_z`. Capture them in the clean run (`updates: true` keeps the
//! sublayer outputs, `z: true` the heads'), then patch or steer:
//!
//! ```ignore
//! let clean = host.forward(&ForwardRequest { tokens: clean_ids, updates: true, z: true, ..Default::default() })?;
//! // Head 3 of block 9 at the last position, from the clean run.
//! let width = clean.heads * head_dim;
//! let z = clean.z[9][last * width + 3 * head_dim..last * width + 4 * head_dim].to_vec();
//! let patched = host.forward(&ForwardRequest {
//!     tokens: corrupt_ids,
//!     edits: vec![
//!         Edit::replace(9, last, z).at(Hook::Z { head: 3 }),
//!         // Steering inside a block: add a direction to block 12's MLP output.
//!         Edit::add(12, last, direction.clone()).at(Hook::MlpOut),
//!     ],
//!     logits: true,
//!     ..Default::default()
//! })?;
//! ```
//!
//! Send many patched runs in one [`Host::forward_batch`]: runs that share
//! their tokens, `start` and `blocks`, keep nothing but the output and touch
//! only rows from some position p on cost only those rows — the host runs
//! the unedited sequence once and each patched run's rows p … T−1 over its
//! cached keys and values (a causal model's earlier rows cannot change).
//! Patching at the last position is then one row per block, not the whole
//! prompt.
//!
//! [`Edit`]: crate::Edit

use probe_contract::{
    EncodeRequest, ForwardMeta, GenerateReply, GenerateRequest, LensReply, LensRequest, OutputKind,
    TextMode,
};

use crate::abi::{self, F32Buffer, ForwardResultC, StrRef};
use crate::{Host, PluginError};

pub use probe_contract::ForwardRequest;

/// What a forward pass produced, copied out of the host. Row-major.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
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
    /// Mean next-token cross-entropy (nats), with logits or `loss`.
    pub loss: Option<f64>,
    /// Per predicting position (`T − 1` values), with the loss.
    pub token_losses: Option<Vec<f64>>,
    /// `[T, hidden]` after the embedding (stage 0) and after every block run.
    pub residuals: Vec<Vec<f32>>,
    /// `[T, hidden]` per block run: what attention added.
    pub attn_updates: Vec<Vec<f32>>,
    /// `[T, hidden]` per block run: what the MLP added.
    pub mlp_updates: Vec<Vec<f32>>,
    /// `[heads, T, T]` per block run.
    pub attention: Vec<Vec<f32>>,
    /// `[T, heads × head_dim]` per block run: every head's output before the
    /// output projection (`z`, 2.6).
    pub z: Vec<Vec<f32>>,
    /// `[T, hidden]`: the residual after the last block run.
    pub output: Vec<f32>,
    /// `[T, vocab]`, when asked for.
    pub logits: Option<Vec<f32>>,
}

impl ForwardOutput {
    /// Row `position` of the residual at `stage` (0 = embedding output).
    /// Panics if the stage was not kept or the position is out of range.
    pub fn residual_row(&self, stage: usize, position: usize) -> &[f32] {
        &self.residuals[stage][position * self.hidden..(position + 1) * self.hidden]
    }
}

/// A tensor's values replaced in the requests that list [`id`](Self::id)
/// ([`Host::override_tensor`]); the host forgets them when this is dropped.
pub struct TensorOverride<'h> {
    host: &'h Host<'h>,
    id: u64,
}

impl TensorOverride<'_> {
    /// What a [`ForwardRequest`]'s `overrides` lists.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for TensorOverride<'_> {
    fn drop(&mut self) {
        // SAFETY: made only by `override_tensor`, which checked that the
        // host's table holds `release_override`; each id is released once.
        unsafe { (self.host.api.release_override)(self.host.api.ctx, self.id) }
    }
}

/// A prompt and its completion as one token sequence ([`Host::sequence`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// The prompt's tokens, then the completion's.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the prompt's (chat template included).
    pub prompt_len: usize,
}

impl Sequence {
    /// The completion's tokens.
    pub fn completion(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// The positions whose next-token prediction is a completion token:
    /// `prompt_len − 1 .. len − 1` (empty without a prompt or a completion).
    pub fn scored_positions(&self) -> std::ops::Range<usize> {
        if self.prompt_len == 0 {
            return 0..0;
        }
        self.prompt_len - 1..self.tokens.len() - 1
    }

    /// The rows up to the last scored position: the rows a causal model's
    /// scores depend on (`len − 1`, or 0 without a prompt).
    pub fn scored_rows(&self) -> usize {
        self.scored_positions().end
    }

    /// A pass over the whole sequence that keeps the residual after the
    /// embedding and after every block.
    pub fn residual_request(&self) -> ForwardRequest {
        ForwardRequest {
            tokens: self.tokens.clone(),
            residuals: true,
            ..Default::default()
        }
    }
}

impl Host<'_> {
    /// Token ids of `text` with the model's tokenizer; `chat` wraps it as a
    /// user message in the model's chat template.
    ///
    /// ```ignore
    /// let ids = host.tokenize("The capital of France is", false)?;
    /// ```
    pub fn tokenize(&self, text: &str, chat: bool) -> Result<Vec<u32>, PluginError> {
        let mut out = StrRef::empty();
        // SAFETY: a function of the host's table; `out` is a valid place to write.
        let status =
            unsafe { (self.api.tokenize)(self.api.ctx, StrRef::new(text), chat, &mut out) };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        serde_json::from_str(&self.host_json(out))
            .map_err(|e| PluginError::Host(format!("token ids: {e}")))
    }

    /// Token ids of `text`, framed as `mode` says: a text on its own (with
    /// the tokenizer's special tokens), a user message under the chat
    /// template, or a continuation without any special token.
    /// Needs a host of plugin ABI 2.2.
    ///
    /// ```ignore
    /// let completion = host.encode(" Paris.", TextMode::Continuation)?;
    /// ```
    pub fn encode(&self, text: &str, mode: TextMode) -> Result<Vec<u32>, PluginError> {
        self.api
            .require(abi::since::ENCODE)
            .map_err(PluginError::Host)?;
        let request = serde_json::to_string(&EncodeRequest {
            text: text.to_string(),
            mode,
        })
        .map_err(|e| PluginError::Other(e.to_string()))?;
        let mut out = StrRef::empty();
        // SAFETY: `require` checked that the host's table holds this field;
        // the JSON is read during the call and `out` is a valid place to write.
        let status = unsafe { (self.api.encode)(self.api.ctx, StrRef::new(&request), &mut out) };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        serde_json::from_str(&self.host_json(out))
            .map_err(|e| PluginError::Host(format!("token ids: {e}")))
    }

    /// A prompt and its completion as one token sequence, the way every
    /// forward-pass plugin builds it so their tables join:
    /// `encode(prompt) ++ encode(completion, Continuation)`, the prompt
    /// under the chat template when `chat` and the model has one.
    /// Needs a host of plugin ABI 2.2.
    ///
    /// ```ignore
    /// let seq = host.sequence("The capital of France is", " Paris.", false)?;
    /// for p in seq.scored_positions() { /* position p predicts seq.tokens[p + 1] */ }
    /// ```
    pub fn sequence(
        &self,
        prompt: &str,
        completion: &str,
        chat: bool,
    ) -> Result<Sequence, PluginError> {
        let mode = if chat && self.model()?.chat_template {
            TextMode::Chat
        } else {
            TextMode::Plain
        };
        let mut tokens = self.encode(prompt, mode)?;
        let prompt_len = tokens.len();
        tokens.extend(self.encode(completion, TextMode::Continuation)?);
        Ok(Sequence { tokens, prompt_len })
    }

    /// Run one forward pass (a batch of one).
    ///
    /// ```ignore
    /// let out = host.forward(&ForwardRequest { tokens: ids, residuals: true, loss: true, ..Default::default() })?;
    /// println!("loss {:?}, {} residual arrays", out.loss, out.residuals.len());
    /// ```
    pub fn forward(&self, request: &ForwardRequest) -> Result<ForwardOutput, PluginError> {
        let mut outputs = self.forward_batch(std::slice::from_ref(request))?;
        outputs
            .pop()
            .ok_or_else(|| PluginError::Host("forward: no result".into()))
    }

    /// Run several forward passes in one call. The host stacks sequences of
    /// one length that run the same block with as many blocks left into one
    /// session run, so they share one read of its weights: many short
    /// candidate chains that share their last blocks cost a fraction of
    /// running them one by one. Outputs come in request order. A request's
    /// `start` residual crosses as raw floats, never as JSON.
    ///
    /// ```ignore
    /// // Knock out each block in turn: the same tokens, every order but one block.
    /// let requests: Vec<ForwardRequest> = (0..n).map(|skip| ForwardRequest {
    ///     tokens: ids.clone(),
    ///     blocks: Some((0..n).filter(|&b| b != skip).collect()),
    ///     loss: true,
    ///     ..Default::default()
    /// }).collect();
    /// let losses: Vec<f64> = host.forward_batch(&requests)?.iter().map(|o| o.loss.unwrap()).collect();
    /// ```
    pub fn forward_batch(
        &self,
        requests: &[ForwardRequest],
    ) -> Result<Vec<ForwardOutput>, PluginError> {
        // `branches` came with 2.2 (with `encode`); an older host would
        // refuse the field without naming versions.
        if requests.iter().any(|r| r.branches.is_some()) && !self.api.provides(abi::since::ENCODE) {
            return Err(PluginError::Host(format!(
                "forward requests with `branches` need plugin ABI 2.2, which this probe (plugin ABI {}) lacks: update probe",
                self.api.abi
            )));
        }
        if requests.iter().any(|r| !r.overrides.is_empty()) {
            self.api
                .require(abi::since::OVERRIDE_TENSOR)
                .map_err(PluginError::Host)?;
        }
        // `sublayer` (2.5), edit hooks and `z` (2.6) came without a function:
        // the table's version says.
        if requests
            .iter()
            .any(|r| r.z || r.edits.iter().any(|e| !e.hook.is_resid()))
        {
            self.api
                .require_field(abi::since::HOOKS)
                .map_err(PluginError::Host)?;
        }
        if requests.iter().any(|r| r.sublayer.is_some()) {
            self.api
                .require_field(abi::since::SUBLAYER)
                .map_err(PluginError::Host)?;
        }
        if requests.iter().any(|r| r.kinds.is_some()) {
            self.api
                .require_field(abi::since::KINDS)
                .map_err(PluginError::Host)?;
        }
        let json =
            serde_json::to_string(requests).map_err(|e| PluginError::Other(e.to_string()))?;
        let starts: Vec<*const f32> = requests
            .iter()
            .map(|r| r.start.as_deref().map_or(std::ptr::null(), <[f32]>::as_ptr))
            .collect();
        let start_lens: Vec<usize> = requests
            .iter()
            .map(|r| r.start.as_deref().map_or(0, <[f32]>::len))
            .collect();
        let mut results: Vec<ForwardResultC> = (0..requests.len())
            .map(|_| ForwardResultC::empty())
            .collect();
        // SAFETY: a function of the host's table; `n` pointers, lengths and
        // result places, each start covering its length for the call.
        let status = unsafe {
            (self.api.forward_batch)(
                self.api.ctx,
                StrRef::new(&json),
                starts.as_ptr(),
                start_lens.as_ptr(),
                requests.len(),
                results.as_mut_ptr(),
            )
        };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        // Give every result back on every path out of here.
        struct Release<'h>(&'h Host<'h>, Vec<ForwardResultC>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                for result in &mut self.1 {
                    // SAFETY: each result came from this host and is released once.
                    unsafe { (self.0.api.release_forward)(self.0.api.ctx, result) }
                }
            }
        }
        let results = Release(self, results);
        results
            .1
            .iter()
            .map(|result| self.read_output(result))
            .collect()
    }

    /// Copy one forward result out of the host.
    fn read_output(&self, result: &ForwardResultC) -> Result<ForwardOutput, PluginError> {
        let meta: ForwardMeta = serde_json::from_str(&self.host_json(result.meta_json))
            .map_err(|e| PluginError::Host(format!("forward result: {e}")))?;
        let read = |kind: OutputKind, index: usize| -> Result<Vec<f32>, PluginError> {
            let mut buffer = F32Buffer::empty();
            // SAFETY: a function of the host's table, on a result it made and
            // has not released; `buffer` is a valid place to write.
            let status = unsafe {
                (self.api.forward_output)(self.api.ctx, result, kind.code(), index, &mut buffer)
            };
            if status != abi::STATUS_OK {
                return Err(self.last_error());
            }
            if buffer.data.is_null() || buffer.len == 0 {
                return Ok(Vec::new());
            }
            // SAFETY: the host lends `len` floats until the result is released.
            Ok(unsafe { std::slice::from_raw_parts(buffer.data, buffer.len) }.to_vec())
        };
        let many = |kind: OutputKind, n: usize| {
            (0..n).map(|i| read(kind, i)).collect::<Result<Vec<_>, _>>()
        };
        Ok(ForwardOutput {
            residuals: many(OutputKind::Residual, meta.stages)?,
            attn_updates: many(OutputKind::AttnUpdate, meta.updates)?,
            mlp_updates: many(OutputKind::MlpUpdate, meta.updates)?,
            attention: many(OutputKind::Attention, meta.attention)?,
            z: many(OutputKind::Z, meta.z)?,
            output: read(OutputKind::Final, 0)?,
            logits: if meta.has_logits {
                Some(read(OutputKind::Logits, 0)?)
            } else {
                None
            },
            tokens: meta.tokens,
            blocks: meta.blocks,
            hidden: meta.hidden,
            heads: meta.heads,
            vocab: meta.vocab,
            loss: meta.loss,
            token_losses: meta.token_losses,
        })
    }

    /// The logit lens over `t` residual rows (`residual.len() == t ×
    /// hidden`), reduced in the host as `request` asks: per row the entropy,
    /// the top-k tokens and a target's rank and probability, and KL between
    /// pairs of rows. The `[t, vocab]` logits never cross the boundary.
    /// Needs a host of plugin ABI 2.2.
    ///
    /// ```ignore
    /// // KL between the lens at two rows, both directions.
    /// let rows = [a.as_slice(), b.as_slice()].concat();
    /// let reply = host.lens_reduce(&rows, 2, &LensRequest { kl_pairs: vec![(0, 1), (1, 0)], ..Default::default() })?;
    /// ```
    pub fn lens_reduce(
        &self,
        residual: &[f32],
        t: usize,
        request: &LensRequest,
    ) -> Result<LensReply, PluginError> {
        self.api
            .require(abi::since::LENS_REDUCE)
            .map_err(PluginError::Host)?;
        let json = serde_json::to_string(request).map_err(|e| PluginError::Other(e.to_string()))?;
        let mut out = StrRef::empty();
        // SAFETY: `require` checked that the host's table holds this field;
        // the residual and the JSON are read during the call and `out` is a
        // valid place to write.
        let status = unsafe {
            (self.api.lens_reduce)(
                self.api.ctx,
                residual.as_ptr(),
                residual.len(),
                t,
                StrRef::new(&json),
                &mut out,
            )
        };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        serde_json::from_str(&self.host_json(out))
            .map_err(|e| PluginError::Host(format!("lens result: {e}")))
    }

    /// Greedy continuations of every prompt in `request`, made in the host
    /// with a key/value cache: the prompts run once, then each new token one
    /// row per block. The same tokens as running each whole sequence again
    /// and taking the top-1 token of its last row. Needs a host of plugin ABI 2.3.
    pub fn generate(&self, request: &GenerateRequest) -> Result<GenerateReply, PluginError> {
        self.api
            .require(abi::since::GENERATE)
            .map_err(PluginError::Host)?;
        request.check().map_err(PluginError::Other)?;
        let json = serde_json::to_string(request).map_err(|e| PluginError::Other(e.to_string()))?;
        let mut out = StrRef::empty();
        // SAFETY: `require` checked that the host's table holds this field;
        // the JSON is read during the call and `out` is a valid place to write.
        let status = unsafe { (self.api.generate)(self.api.ctx, StrRef::new(&json), &mut out) };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        let reply: GenerateReply = serde_json::from_str(&self.host_json(out))
            .map_err(|e| PluginError::Host(format!("generate result: {e}")))?;
        if reply.completions.len() != request.prompts.len() {
            return Err(PluginError::Host(format!(
                "generate: {} completions for {} prompts",
                reply.completions.len(),
                request.prompts.len()
            )));
        }
        Ok(reply)
    }

    /// Make stored tensor `name` read as `values` in the forward requests
    /// that list the returned override's [`TensorOverride::id`] in their
    /// `overrides` — for those requests only, the checkpoint untouched.
    /// `values` has the tensor's shape in its stored orientation (what
    /// [`Host::tensor_f32`] hands out); only the blocks' tensors can be
    /// overridden. The values cross the boundary once, here: a batch of any
    /// size, and any later batch, reuses them until the override is dropped.
    /// Requests that override a block alike share its session runs.
    /// Needs a host of plugin ABI 2.4.
    ///
    /// This is how a plugin studies what the weights themselves do:
    /// quantization (the `quant` plugin rounds a block's matrices and runs
    /// the set with them), and equally ablation or truncation:
    ///
    /// ```ignore
    /// // Zero-ablate attention head 3 of block 5: the o_proj columns it writes through.
    /// let name = "model.layers.5.self_attn.o_proj.weight";
    /// let index = host.tensors()?.iter().find(|t| t.name == name).unwrap().index;
    /// let mut o = host.tensor_f32(index)?.to_vec();            // [hidden, heads × head_dim]
    /// let (cols, dh) = (heads * head_dim, head_dim);
    /// for row in o.chunks_exact_mut(cols) { row[3 * dh..4 * dh].fill(0.0); }
    /// let ablated = host.override_tensor(name, &o)?;
    /// let out = host.forward(&ForwardRequest { tokens: ids, loss: true, overrides: vec![ablated.id()], ..Default::default() })?;
    /// ```
    pub fn override_tensor(
        &self,
        name: &str,
        values: &[f32],
    ) -> Result<TensorOverride<'_>, PluginError> {
        self.api
            .require(abi::since::OVERRIDE_TENSOR)
            .map_err(PluginError::Host)?;
        let mut id = 0u64;
        // SAFETY: `require` checked that the host's table holds this field;
        // the name and the values are read during the call, `id` is a valid
        // place to write.
        let status = unsafe {
            (self.api.override_tensor)(
                self.api.ctx,
                StrRef::new(name),
                values.as_ptr(),
                values.len(),
                &mut id,
            )
        };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        Ok(TensorOverride { host: self, id })
    }

    /// Write the checkpoint into `dir` with every tensor of block `b`
    /// renamed to block `new_index[b]`: the per-block config moves along,
    /// the tokenizer files are copied, `metadata` becomes the safetensors
    /// `__metadata__`. Whole or not at all.
    pub fn write_reordered(
        &self,
        dir: &std::path::Path,
        new_index: &[usize],
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), PluginError> {
        let request = probe_contract::WriteReordered {
            dir: dir.to_path_buf(),
            new_index: new_index.to_vec(),
            metadata: metadata.clone(),
        };
        let json =
            serde_json::to_string(&request).map_err(|e| PluginError::Other(e.to_string()))?;
        // SAFETY: a function of the host's table; the JSON is read during the call.
        let status = unsafe { (self.api.write_reordered)(self.api.ctx, StrRef::new(&json)) };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        Ok(())
    }

    /// Logits `[t, vocab]` of the final norm and unembedding applied to `t`
    /// residual rows (`residual.len() == t × hidden`): the logit lens.
    ///
    /// ```ignore
    /// let out = host.forward(&ForwardRequest { tokens: ids, residuals: true, ..Default::default() })?;
    /// let logits_after_block_3 = host.lens(&out.residuals[4], ids.len())?;
    /// ```
    pub fn lens(&self, residual: &[f32], t: usize) -> Result<Vec<f32>, PluginError> {
        let mut buffer = F32Buffer::empty();
        // SAFETY: a function of the host's table; the residual is read during
        // the call and `buffer` is a valid place to write.
        let status = unsafe {
            (self.api.lens)(
                self.api.ctx,
                residual.as_ptr(),
                residual.len(),
                t,
                &mut buffer,
            )
        };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        let values = if buffer.data.is_null() || buffer.len == 0 {
            Vec::new()
        } else {
            // SAFETY: the host lends `len` floats until release_f32 below.
            unsafe { std::slice::from_raw_parts(buffer.data, buffer.len) }.to_vec()
        };
        // SAFETY: gives back the buffer this host lent, once.
        unsafe { (self.api.release_f32)(self.api.ctx, &mut buffer) };
        Ok(values)
    }
}
