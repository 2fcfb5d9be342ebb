//! Greedy generation with a key/value cache.
//!
//! The prompts run once, whole, through [`Engine::run_batch`]'s packing, and
//! every block hands back its keys (rotated) and values. From then on each
//! new token runs through every block alone — one row per sequence — on the
//! block's step graph ([`BlockGraphKind::Step`]), attending to the cached
//! keys and values of every earlier position. A step costs one row per
//! sequence instead of the whole sequence again: for 16 tokens after 40-token
//! prompts, about 1/30 of re-running them, and the result is the same as the
//! whole pass (the cached keys and values are the ones the whole pass makes).
//!
//! The sequences of a batch step together: their caches are one padded
//! tensor `[B, kv_heads, S, head_dim]` per block, each sequence's prompt
//! left-aligned and the new tokens' columns appended for all, and every
//! sequence's mask hides the padding between its prompt and its new tokens.

use std::borrow::Cow;

use ort::session::SessionInputValue;
use ort::value::TensorRef;

use probe_store::arch::Attention;

use crate::engine::{ort_error, rope_table, Engine, KeysValues, Request, WeightOverride};
use crate::graph::{io, BlockGraphKind};
use crate::lens::top_ids;
use crate::ForwardError;

/// The batch's cache: per block, keys and values `[B, kv_heads, S, head_dim]`,
/// and for every sequence the position each of the `S` columns holds (`None`
/// for padding).
/// New rows of `B` sequences, `T` each, to run through one block on top of
/// cached keys and values.
pub(crate) struct StepRows<'a> {
    pub block: usize,
    /// The new rows `[B·T, hidden]`, sequence by sequence.
    pub rows: &'a [f32],
    /// The position of each new row, `B·T` of them.
    pub positions: &'a [usize],
    /// Per sequence, the position each of its `P + T` key columns holds —
    /// the cached ones, then the new rows' own (`None`: padding, never seen).
    pub columns: &'a [Vec<Option<usize>>],
    /// Cached keys (rotated) and values `[B, kv_heads, P, head_dim]`.
    pub past_keys: &'a [f32],
    pub past_values: &'a [f32],
    /// The hooks' keep/add inputs per new row (`hook_inputs`), for an edit
    /// inside the block.
    pub hooks: Option<&'a [Vec<f32>; 6]>,
    pub overrides: &'a [WeightOverride<'a>],
    /// Hand back every column's keys and values.
    pub keep_cache: bool,
}

struct Cache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    columns: Vec<Vec<Option<usize>>>,
}

impl Cache {
    fn width(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    /// Keep the sequences `kept` (indices into the batch, ascending).
    fn retain(&mut self, kept: &[usize], kv_heads: usize, head_dim: usize) {
        let size = kv_heads * self.width() * head_dim;
        let gather = |all: &Vec<f32>| -> Vec<f32> {
            kept.iter()
                .flat_map(|&s| all[s * size..(s + 1) * size].iter().copied())
                .collect()
        };
        self.keys = self.keys.iter().map(gather).collect();
        self.values = self.values.iter().map(gather).collect();
        self.columns = kept.iter().map(|&s| self.columns[s].clone()).collect();
    }
}

impl Engine<'_> {
    /// The greedy continuation of each prompt: up to `max_new` tokens, each
    /// the most probable next token (equal logits: the lower id), ending
    /// early after a token in `stop` (which is kept). Gives what running the
    /// whole sequence again for every new token gives, at the cost of one row
    /// per token.
    pub fn generate(
        &mut self,
        prompts: &[&[u32]],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>, ForwardError> {
        let bad = |problem: String| ForwardError::Request {
            file: self.checkpoint.path.clone(),
            problem,
        };
        if !self.has_head() {
            return Err(bad(format!(
                "a {} checkpoint has no output embedding, so it cannot generate",
                self.arch.family
            )));
        }
        if self
            .arch
            .blocks
            .iter()
            .any(|b| b.attention == Attention::Bidirectional)
        {
            return Err(bad(format!(
                "a {} model attends both ways, so it cannot generate",
                self.arch.family
            )));
        }
        let mut completions = vec![Vec::new(); prompts.len()];
        if max_new == 0 || prompts.is_empty() {
            return Ok(completions);
        }
        let (hidden, kv_heads, head_dim) =
            (self.arch.hidden, self.arch.kv_heads, self.arch.head_dim);

        // The prompts, whole, keeping every block's keys and values.
        let requests: Vec<Request<'_>> = prompts
            .iter()
            .map(|tokens| Request {
                tokens,
                ..Default::default()
            })
            .collect();
        let prompt_pass = self.run_batch_keeping(&requests, true)?;
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let blocks = self.num_blocks();
        let size = kv_heads * width * head_dim;
        let mut cache = Cache {
            keys: vec![vec![0.0; prompts.len() * size]; blocks],
            values: vec![vec![0.0; prompts.len() * size]; blocks],
            columns: prompts
                .iter()
                .map(|p| (0..width).map(|j| (j < p.len()).then_some(j)).collect())
                .collect(),
        };
        let mut last_rows = Vec::with_capacity(prompts.len() * hidden);
        for (s, (trace, blocks_cache)) in prompt_pass.iter().enumerate() {
            let len = prompts[s].len();
            for (block, (keys, values)) in blocks_cache.iter().enumerate() {
                for h in 0..kv_heads {
                    let from = h * len * head_dim..(h + 1) * len * head_dim;
                    let to = (s * kv_heads + h) * width * head_dim;
                    cache.keys[block][to..to + len * head_dim].copy_from_slice(&keys[from.clone()]);
                    cache.values[block][to..to + len * head_dim].copy_from_slice(&values[from]);
                }
            }
            last_rows.extend_from_slice(&trace.output[trace.output.len() - hidden..]);
        }
        drop(prompt_pass);

        // Which sequences are still growing, and the position of each one's
        // next token.
        let mut open: Vec<usize> = (0..prompts.len()).collect();
        let mut positions: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let longest = width + max_new;
        let tables: Vec<(Vec<f32>, Vec<f32>)> = self
            .arch
            .ropes
            .iter()
            .map(|r| rope_table(&r.inv_freq, longest))
            .collect();
        let mut next = self.greedy(&last_rows, open.len())?;
        loop {
            let mut kept = Vec::with_capacity(open.len());
            for (row, (&s, &id)) in open.iter().zip(&next).enumerate() {
                completions[s].push(id);
                if !stop.contains(&id) && completions[s].len() < max_new {
                    kept.push(row);
                }
            }
            if kept.is_empty() {
                break;
            }
            if kept.len() < open.len() {
                cache.retain(&kept, kv_heads, head_dim);
                open = kept.iter().map(|&row| open[row]).collect();
                next = kept.iter().map(|&row| next[row]).collect();
                positions = kept.iter().map(|&row| positions[row]).collect();
            }
            if let Some(max) = self.arch.max_positions {
                if let Some(&p) = positions.iter().find(|&&p| p >= max) {
                    return Err(bad(format!(
                        "generating position {p} exceeds the {max} learned positions"
                    )));
                }
            }
            for (columns, &p) in cache.columns.iter_mut().zip(&positions) {
                columns.push(Some(p));
            }
            let mut x = self.embed(&next, &positions)?;
            for block in 0..blocks {
                x = self.step_block(block, &x, &mut cache, &positions, &tables)?;
            }
            next = self.greedy(&x, open.len())?;
            for p in &mut positions {
                *p += 1;
            }
        }
        Ok(completions)
    }

    /// The most probable next token of each of `n` final-residual rows.
    fn greedy(&mut self, rows: &[f32], n: usize) -> Result<Vec<u32>, ForwardError> {
        let logits = self.lens(rows, n)?;
        let vocab = logits.len() / n.max(1);
        Ok(logits
            .chunks_exact(vocab.max(1))
            .map(|row| top_ids(row, 1)[0])
            .collect())
    }

    /// One new row per sequence through `block`, on top of the cache (whose
    /// columns already include the new rows' own); the cache grows by them.
    fn step_block(
        &mut self,
        block: usize,
        x: &[f32],
        cache: &mut Cache,
        positions: &[usize],
        tables: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<Vec<f32>, ForwardError> {
        let step = StepRows {
            block,
            rows: x,
            positions,
            columns: &cache.columns,
            past_keys: &cache.keys[block],
            past_values: &cache.values[block],
            hooks: None,
            overrides: &[],
            keep_cache: true,
        };
        let (out, keys_values) = self.step_rows(&step, tables)?;
        if let Some((keys, values)) = keys_values {
            cache.keys[block] = keys;
            cache.values[block] = values;
        }
        Ok(out)
    }

    /// New rows of `B` sequences through `block` on its step graph, each
    /// attending to its cached keys and values and to its own new rows; the
    /// residual after the block `[B·T, hidden]` and, with `keep_cache`, the
    /// keys and values of every column `[B, kv_heads, P + T, head_dim]`.
    pub(crate) fn step_rows(
        &mut self,
        step: &StepRows<'_>,
        tables: &[(Vec<f32>, Vec<f32>)],
    ) -> Result<(Vec<f32>, Option<KeysValues>), ForwardError> {
        let (hidden, kv_heads, dh) = (self.arch.hidden, self.arch.kv_heads, self.arch.head_dim);
        let block = step.block;
        let b = step.columns.len();
        let rows = step.positions.len();
        let t = rows / b.max(1);
        let width = step.columns.first().map_or(0, Vec::len);
        let past = width - t;
        let kind = self.arch.blocks[block];
        let variant = if step.hooks.is_some() {
            BlockGraphKind::PatchedStep
        } else {
            BlockGraphKind::Step
        };
        // A block whose weights do not fit the memory budget at once steps
        // as its attention, then its MLP on the midpoint.
        let split = variant == BlockGraphKind::Step && !self.block_fits(block, step.overrides);
        let first = if split {
            self.build_variant(block, BlockGraphKind::Mlp)?;
            BlockGraphKind::AttentionStep
        } else {
            variant
        };
        self.build_variant(block, first)?;
        let fail = ort_error(
            self.checkpoint,
            &format!("running block {block} after cached rows"),
        );

        // Row i of sequence s (at position p) sees the columns at positions
        // up to p (within the window of a sliding layer).
        let mut mask = vec![f32::NEG_INFINITY; rows * width];
        for (s, columns) in step.columns.iter().enumerate() {
            for i in 0..t {
                let p = step.positions[s * t + i];
                let row = &mut mask[(s * t + i) * width..(s * t + i + 1) * width];
                for (cell, column) in row.iter_mut().zip(columns) {
                    let allowed = column.is_some_and(|q| {
                        q <= p
                            && match kind.attention {
                                Attention::Sliding { window } => p - q < window,
                                Attention::Causal | Attention::Bidirectional => true,
                            }
                    });
                    if allowed {
                        *cell = 0.0;
                    }
                }
            }
        }
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)> = Vec::new();
        inputs.push((
            io::RESIDUAL.into(),
            TensorRef::from_array_view(([rows, hidden], step.rows))
                .map_err(&fail)?
                .into(),
        ));
        let rotations: (Vec<f32>, Vec<f32>);
        if let Some(rope) = kind.rope {
            let (cos, sin) = &tables[rope];
            let gather = |table: &[f32]| -> Vec<f32> {
                step.positions
                    .iter()
                    .flat_map(|&p| table[p * dh..(p + 1) * dh].iter().copied())
                    .collect()
            };
            rotations = (gather(cos), gather(sin));
            for (name, table) in [(io::COS, &rotations.0), (io::SIN, &rotations.1)] {
                inputs.push((
                    name.into(),
                    TensorRef::from_array_view(([b, 1, t, dh], &table[..]))
                        .map_err(&fail)?
                        .into(),
                ));
            }
        }
        inputs.push((
            io::MASK.into(),
            TensorRef::from_array_view(([b, 1, t, width], &mask[..]))
                .map_err(&fail)?
                .into(),
        ));
        let past_shape = [b, kv_heads, past, dh];
        for (name, cached) in [
            (io::PAST_KEYS, step.past_keys),
            (io::PAST_VALUES, step.past_values),
        ] {
            inputs.push((
                name.into(),
                TensorRef::from_array_view((past_shape, cached))
                    .map_err(&fail)?
                    .into(),
            ));
        }
        if let Some(hooks) = step.hooks {
            let z_width = self.arch.heads * dh;
            for ((name, width), array) in io::HOOKS
                .into_iter()
                .zip([z_width, z_width, hidden, hidden, hidden, hidden])
                .zip(hooks)
            {
                inputs.push((
                    name.into(),
                    TensorRef::from_array_view(([rows, width], &array[..]))
                        .map_err(&fail)?
                        .into(),
                ));
            }
        }
        let mut wanted = vec![io::OUT];
        if step.keep_cache {
            wanted.extend([io::KEYS, io::VALUES]);
        }
        let mut arrays =
            self.run_block_graph(block, first, inputs, step.overrides, &wanted, &fail)?;
        let mut take = |name: &str| {
            arrays
                .remove(name)
                .ok_or_else(|| ForwardError::Runtime(format!("block {block} gave no `{name}`")))
        };
        let mut out = take(io::OUT)?;
        let keys_values = if step.keep_cache {
            Some((take(io::KEYS)?, take(io::VALUES)?))
        } else {
            None
        };
        if split {
            let residual = TensorRef::from_array_view(([rows, hidden], &out[..])).map_err(&fail)?;
            let inputs = vec![(io::RESIDUAL.into(), residual.into())];
            let mut arrays = self.run_block_graph(
                block,
                BlockGraphKind::Mlp,
                inputs,
                step.overrides,
                &[io::OUT],
                &fail,
            )?;
            out = arrays.remove(io::OUT).ok_or_else(|| {
                ForwardError::Runtime(format!("block {block} gave no `{}`", io::OUT))
            })?;
        }
        Ok((out, keys_values))
    }
}
