//! Forward-pass methods: the block order read from what the blocks do to a
//! residual stream, not from what their weights look like.
//!
//! `flow` builds the chain greedily from the embedding: at each depth every
//! block not yet placed is run once on the current residual, and the one whose
//! update is smallest relative to the stream it reads (median over positions
//! after the first, which carries the attention sink's massive activation)
//! goes next. A block trained at that depth expects exactly this stream and
//! adjusts it; a block from further on over-writes it.
//!
//! `insert` refines an order by the language-model loss on the probe text:
//! each block is removed and put back up to `window` places away, a move kept
//! when the loss drops. The residual before every position is cached, so a
//! move re-runs only the blocks from its first changed position on.

use probe_sdk::prelude::*;

/// The text every forward method runs: the built-in prompts joined into one
/// sequence, or seeded random tokens when the checkpoint has no tokenizer.
pub struct ProbeText {
    pub tokens: Vec<u32>,
    /// Whether `tokens` came from the tokenizer (else random ids).
    pub is_text: bool,
}

impl ProbeText {
    pub fn new(host: &Host, prompts: &str, max_tokens: usize) -> Result<Self, PluginError> {
        let text: Vec<String> = prompts
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.replace("\\n", "\n"))
            .collect();
        match host.tokenize(&text.join("\n"), false) {
            Ok(mut tokens) if tokens.len() >= 2 => {
                tokens.truncate(max_tokens);
                Ok(Self {
                    tokens,
                    is_text: true,
                })
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "the prompts tokenize to fewer than 2 tokens".into(),
                };
                host.warn(&format!("{why}; probing with random token ids instead"));
                let vocab = host.model()?.vocab_size.unwrap_or(2).max(2) as u64;
                Ok(Self {
                    tokens: random_tokens(vocab, max_tokens.max(2)),
                    is_text: false,
                })
            }
        }
    }

    /// The first `n` tokens (all when shorter).
    pub fn head(&self, n: usize) -> &[u32] {
        &self.tokens[..n.min(self.tokens.len())]
    }
}

/// Seeded xorshift ids: the same probe on every run.
fn random_tokens(vocab: u64, count: usize) -> Vec<u32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab) as u32
        })
        .collect()
}

/// The residual after the embedding for `tokens`.
fn embedding(host: &Host, tokens: &[u32]) -> Result<Vec<f32>, PluginError> {
    Ok(host
        .forward(&ForwardRequest {
            tokens: tokens.to_vec(),
            blocks: Some(Vec::new()),
            ..ForwardRequest::default()
        })?
        .output)
}

/// Run `blocks` from the residual `start`; the residual after each block and,
/// when asked, the loss at the end.
fn run_from(
    host: &Host,
    tokens: &[u32],
    start: &[f32],
    blocks: &[usize],
    loss: bool,
) -> Result<(Vec<Vec<f32>>, Option<f64>), PluginError> {
    let out = host.forward(&ForwardRequest {
        tokens: tokens.to_vec(),
        blocks: Some(blocks.to_vec()),
        start: Some(start.to_vec()),
        residuals: true,
        loss,
        ..ForwardRequest::default()
    })?;
    // residuals[0] is `start` itself.
    Ok((out.residuals.into_iter().skip(1).collect(), out.loss))
}

/// Median over positions ≥ 1 of ‖after − before‖ / ‖before‖ per position.
pub fn relative_update(before: &[f32], after: &[f32], hidden: usize) -> f64 {
    let mut ratios: Vec<f64> = before
        .chunks(hidden)
        .zip(after.chunks(hidden))
        .skip(1)
        .map(|(b, a)| {
            let (mut du, mut nb) = (0.0f64, 0.0f64);
            for (&x, &y) in b.iter().zip(a) {
                du += ((y - x) as f64).powi(2);
                nb += (x as f64).powi(2);
            }
            (du / nb.max(1e-30)).sqrt()
        })
        .collect();
    if ratios.is_empty() {
        return 0.0;
    }
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// Greedy chain from the embedding, smallest relative update first. Returns
/// the path and, per depth, the margin of the chosen block over the next
/// best (relative), a measure of how sure each step was.
pub fn flow(host: &Host, tokens: &[u32], n: usize) -> Result<(Vec<usize>, Vec<f64>), PluginError> {
    let mut residual = embedding(host, tokens)?;
    let hidden = residual.len() / tokens.len().max(1);
    let mut remaining: Vec<usize> = (0..n).collect();
    let (mut path, mut margins) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while !remaining.is_empty() {
        host.check_cancelled()?;
        host.progress(path.len() as u64, n as u64, "flow: placing blocks");
        let mut scored: Vec<(f64, usize, Vec<f32>)> = Vec::with_capacity(remaining.len());
        for &block in &remaining {
            let (mut after, _) = run_from(host, tokens, &residual, &[block], false)?;
            let after = after.pop().ok_or("the engine returned no residual")?;
            scored.push((relative_update(&residual, &after, hidden), block, after));
        }
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        let margin = match scored.get(1) {
            Some(second) => (second.0 - scored[0].0) / scored[0].0.max(1e-30),
            None => f64::INFINITY,
        };
        let (_, block, after) = scored.swap_remove(0);
        remaining.retain(|&b| b != block);
        path.push(block);
        margins.push(margin);
        residual = after;
    }
    Ok((path, margins))
}

/// Remove-and-reinsert within `window` places, kept when the loss drops,
/// until a whole sweep keeps nothing. Returns the path and the loss.
pub fn insert(
    host: &Host,
    tokens: &[u32],
    mut path: Vec<usize>,
    window: usize,
) -> Result<(Vec<usize>, f64), PluginError> {
    let n = path.len();
    // cache[k]: the residual before position k of `path`.
    let mut cache = vec![embedding(host, tokens)?];
    let (after, loss) = run_from(host, tokens, &cache[0], &path, true)?;
    let mut best = loss.ok_or("insert: the model has no output head, so no loss")?;
    cache.extend(after);
    let mut improved = true;
    while improved {
        improved = false;
        for from in 0..n {
            for to in from.saturating_sub(window)..(from + window + 1).min(n) {
                if to == from {
                    continue;
                }
                host.check_cancelled()?;
                let mut candidate = path.clone();
                let block = candidate.remove(from);
                candidate.insert(to, block);
                let first = from.min(to);
                let (after, loss) =
                    run_from(host, tokens, &cache[first], &candidate[first..], true)?;
                let loss = loss.ok_or("insert: no loss")?;
                if loss < best {
                    best = loss;
                    path = candidate;
                    cache.truncate(first + 1);
                    cache.extend(after);
                    improved = true;
                }
            }
        }
    }
    Ok((path, best))
}
