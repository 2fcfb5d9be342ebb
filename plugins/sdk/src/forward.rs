//! The forward engine as a plugin sees it: tokenize, run the model block by
//! block with the residual stream handed back, intervene, and read the logit
//! lens. The host runs ONNX Runtime; these calls only move data.

use serde::{Deserialize, Serialize};

use crate::abi::{self, F32Buffer, ForwardResultC, StrRef};
use crate::{Host, PluginError};

/// A change to the residual stream at one (stage, position).
#[derive(Clone, Debug, Serialize)]
pub struct Edit {
    /// 0 = the embedding output, s = after the s-th block run.
    pub stage: usize,
    pub position: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add: Option<Vec<f32>>,
}

/// One forward pass to run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ForwardRequest {
    pub tokens: Vec<u32>,
    /// Blocks to run in this order (skip by leaving out); `None` = all.
    pub blocks: Option<Vec<usize>>,
    pub edits: Vec<Edit>,
    /// Keep the residual after the embedding and after every block.
    pub residuals: bool,
    /// Keep each block's attention and MLP updates.
    pub updates: bool,
    /// Keep attention probabilities `[heads, T, T]` per block.
    pub attention: bool,
    /// Compute logits `[T, vocab]` (and the loss) from the final residual.
    pub logits: bool,
    /// Compute the loss without handing the logits back (they are large).
    pub loss: bool,
    /// Start from this residual `[T, hidden]` instead of the embedding's
    /// output: cache a prefix of blocks and run only what follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<Vec<f32>>,
    /// With `loss` (and not `logits`): the softmax runs over these token ids
    /// and the text's own tokens only. That loss is below the model's, but it
    /// costs a fraction of the head's product: a screen for comparing many
    /// runs of one text, to be confirmed with the full loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_vocab: Option<Vec<u32>>,
}

/// What crosses as JSON: a [`ForwardRequest`] less its start residual.
#[derive(Serialize)]
struct WireRequest<'a> {
    tokens: &'a [u32],
    blocks: Option<&'a [usize]>,
    edits: &'a [Edit],
    residuals: bool,
    updates: bool,
    attention: bool,
    logits: bool,
    loss: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss_vocab: Option<&'a [u32]>,
}

#[derive(Debug, Deserialize)]
struct Meta {
    tokens: Vec<u32>,
    blocks: Vec<usize>,
    hidden: usize,
    heads: usize,
    vocab: usize,
    loss: Option<f64>,
    token_losses: Option<Vec<f64>>,
    stages: usize,
    updates: usize,
    attention: usize,
    has_logits: bool,
}

/// What a forward pass produced, copied out of the host. Row-major.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    pub tokens: Vec<u32>,
    pub blocks: Vec<usize>,
    pub hidden: usize,
    pub heads: usize,
    pub vocab: usize,
    /// Mean next-token cross-entropy (nats), with logits.
    pub loss: Option<f64>,
    pub token_losses: Option<Vec<f64>>,
    pub residuals: Vec<Vec<f32>>,
    pub attn_updates: Vec<Vec<f32>>,
    pub mlp_updates: Vec<Vec<f32>>,
    pub attention: Vec<Vec<f32>>,
    pub output: Vec<f32>,
    pub logits: Option<Vec<f32>>,
}

impl Host<'_> {
    fn json_string(&self, value: StrRef) -> String {
        unsafe { value.as_str() }.into_owned()
    }

    /// Token ids of `text` with the model's tokenizer; `chat` wraps it as a
    /// user message in the model's chat template.
    pub fn tokenize(&self, text: &str, chat: bool) -> Result<Vec<u32>, PluginError> {
        let mut out = StrRef::empty();
        let status =
            unsafe { (self.api.tokenize)(self.api.ctx, StrRef::new(text), chat, &mut out) };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        serde_json::from_str(&self.json_string(out))
            .map_err(|e| PluginError::Host(format!("token ids: {e}")))
    }

    /// Run one forward pass.
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
    /// running them one by one. Outputs come in request order.
    pub fn forward_batch(
        &self,
        requests: &[ForwardRequest],
    ) -> Result<Vec<ForwardOutput>, PluginError> {
        // Start residuals go across as raw floats, the rest as JSON.
        let wire: Vec<WireRequest<'_>> = requests
            .iter()
            .map(|r| WireRequest {
                tokens: &r.tokens,
                blocks: r.blocks.as_deref(),
                edits: &r.edits,
                residuals: r.residuals,
                updates: r.updates,
                attention: r.attention,
                logits: r.logits,
                loss: r.loss,
                loss_vocab: r.loss_vocab.as_deref(),
            })
            .collect();
        let json = serde_json::to_string(&wire).map_err(|e| PluginError::Other(e.to_string()))?;
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
        struct Guard<'h>(&'h Host<'h>, Vec<ForwardResultC>);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                for result in &mut self.1 {
                    unsafe { (self.0.api.release_forward)(self.0.api.ctx, result) }
                }
            }
        }
        let guard = Guard(self, results);
        guard
            .1
            .iter()
            .map(|result| self.read_output(result))
            .collect()
    }

    /// Copy one forward result out of the host.
    fn read_output(&self, result: &ForwardResultC) -> Result<ForwardOutput, PluginError> {
        let meta: Meta = serde_json::from_str(&self.json_string(result.meta_json))
            .map_err(|e| PluginError::Host(format!("forward result: {e}")))?;
        let read = |kind: u32, index: usize| -> Result<Vec<f32>, PluginError> {
            let mut buffer = F32Buffer::empty();
            let status = unsafe {
                (self.api.forward_output)(self.api.ctx, result, kind, index, &mut buffer)
            };
            if status != abi::STATUS_OK {
                return Err(self.last_error());
            }
            if buffer.data.is_null() || buffer.len == 0 {
                return Ok(Vec::new());
            }
            Ok(unsafe { std::slice::from_raw_parts(buffer.data, buffer.len) }.to_vec())
        };
        let many =
            |kind: u32, n: usize| (0..n).map(|i| read(kind, i)).collect::<Result<Vec<_>, _>>();
        Ok(ForwardOutput {
            residuals: many(abi::OUTPUT_RESIDUAL, meta.stages)?,
            attn_updates: many(abi::OUTPUT_ATTN_UPDATE, meta.updates)?,
            mlp_updates: many(abi::OUTPUT_MLP_UPDATE, meta.updates)?,
            attention: many(abi::OUTPUT_ATTENTION, meta.attention)?,
            output: read(abi::OUTPUT_FINAL, 0)?,
            logits: if meta.has_logits {
                Some(read(abi::OUTPUT_LOGITS, 0)?)
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

    /// Logits `[t, vocab]` of the final norm and unembedding applied to
    /// `t` residual rows: the logit lens.
    /// Write the checkpoint into `dir` with every tensor of block `b`
    /// renamed to block `new_index[b]` (see `HostApi::write_reordered`).
    pub fn write_reordered(
        &self,
        dir: &std::path::Path,
        new_index: &[usize],
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), PluginError> {
        let json = serde_json::json!({ "dir": dir, "new_index": new_index, "metadata": metadata })
            .to_string();
        let status = unsafe { (self.api.write_reordered)(self.api.ctx, StrRef::new(&json)) };
        if status != abi::STATUS_OK {
            return Err(self.last_error());
        }
        Ok(())
    }

    pub fn lens(&self, residual: &[f32], t: usize) -> Result<Vec<f32>, PluginError> {
        let mut buffer = F32Buffer::empty();
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
            unsafe { std::slice::from_raw_parts(buffer.data, buffer.len) }.to_vec()
        };
        unsafe { (self.api.release_f32)(self.api.ctx, &mut buffer) };
        Ok(values)
    }
}
