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
        // Models with learned positions (GPT-2, BERT) read no further.
        let max_tokens = max_tokens.min(learned_positions(&host.model()?).unwrap_or(usize::MAX));
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

/// How many positions a model with learned position embeddings has.
fn learned_positions(model: &ModelInfo) -> Option<usize> {
    let config = model.config.as_ref()?;
    ["n_positions", "max_position_embeddings"]
        .iter()
        .filter(|_| matches!(model.family.as_str(), "gpt2" | "bert"))
        .find_map(|key| config.get(*key)?.as_u64())
        .map(|n| n as usize)
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

/// Which loss a run computes at its end.
#[derive(Clone, Copy)]
enum Loss<'a> {
    None,
    /// Over the whole vocabulary: the model's loss.
    Full,
    /// With the softmax over these token ids (and the text's) only.
    Over(&'a [u32]),
}

/// Run `blocks` from the residual `start`; the residual after each block and
/// the loss asked for at the end.
fn run_from(
    host: &Host,
    tokens: &[u32],
    start: &[f32],
    blocks: &[usize],
    loss: Loss<'_>,
) -> Result<(Vec<Vec<f32>>, Option<f64>), PluginError> {
    let out = host.forward(&ForwardRequest {
        tokens: tokens.to_vec(),
        blocks: Some(blocks.to_vec()),
        start: Some(start.to_vec()),
        residuals: !blocks.is_empty(),
        loss: !matches!(loss, Loss::None),
        loss_vocab: match loss {
            Loss::Over(ids) => Some(ids.to_vec()),
            _ => None,
        },
        ..ForwardRequest::default()
    })?;
    // residuals[0] is `start` itself.
    Ok((out.residuals.into_iter().skip(1).collect(), out.loss))
}

/// The loss of a chain whose last block left `last`: the head alone.
fn loss_at(host: &Host, tokens: &[u32], last: &[f32], loss: Loss<'_>) -> Result<f64, PluginError> {
    Ok(run_from(host, tokens, last, &[], loss)?
        .1
        .ok_or("the engine returned no loss")?)
}

/// The model's loss of a chain whose last block left `last`, and the token
/// ids it ranks among its `k` likeliest at any position of the text
/// (ascending): both from one run of the head.
fn judge(
    host: &Host,
    tokens: &[u32],
    last: &[f32],
    k: usize,
) -> Result<(f64, Vec<u32>), PluginError> {
    let out = host.forward(&ForwardRequest {
        tokens: tokens.to_vec(),
        blocks: Some(Vec::new()),
        start: Some(last.to_vec()),
        logits: true,
        ..ForwardRequest::default()
    })?;
    let loss = out.loss.ok_or("the engine returned no loss")?;
    let logits = out.logits.ok_or("the engine returned no logits")?;
    let vocab = logits.len() / tokens.len().max(1);
    let mut ids = Vec::with_capacity(tokens.len() * k);
    let mut order: Vec<u32> = Vec::with_capacity(vocab);
    for row in logits.chunks(vocab.max(1)) {
        order.clear();
        order.extend(0..row.len() as u32);
        let k = k.min(order.len());
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                row[b as usize].total_cmp(&row[a as usize])
            });
        }
        ids.extend_from_slice(&order[..k]);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok((loss, ids))
}

/// The residual a chain's last block left (`cache` or a run's residuals).
fn last(residuals: &[Vec<f32>]) -> &[f32] {
    residuals.last().map_or(&[], Vec::as_slice)
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

/// What `flow` runs the blocks on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The embedding of the probe text.
    Text,
    /// Random h ~ N(0, s²) with s the embedding's RMS (the published
    /// activation-flow probe); the tokens only fix positions.
    Gaussian,
}

/// Seeded N(0, s²) values, `s` the RMS of `like`, in `like`'s shape.
fn gaussian_like(like: &[f32]) -> Vec<f32> {
    let rms =
        (like.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / like.len().max(1) as f64).sqrt();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..like.len())
        .map(|_| {
            // Box-Muller: one normal from two uniforms.
            let (u, v) = (uniform(), uniform());
            (rms * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// What `flow` decided at one depth: the blocks it ran there, best first,
/// with their relative updates.
pub struct Step {
    pub ranked: Vec<(usize, f64)>,
}

/// Greedy chain from the embedding, smallest relative update first. Returns
/// the path and what each step saw.
pub fn flow(
    host: &Host,
    tokens: &[u32],
    n: usize,
    probe: Probe,
) -> Result<(Vec<usize>, Vec<Step>), PluginError> {
    let mut residual = embedding(host, tokens)?;
    if probe == Probe::Gaussian {
        residual = gaussian_like(&residual);
    }
    let hidden = residual.len() / tokens.len().max(1);
    let mut remaining: Vec<usize> = (0..n).collect();
    let (mut path, mut steps) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while !remaining.is_empty() {
        host.check_cancelled()?;
        host.progress(path.len() as u64, n as u64, "flow: placing blocks");
        let mut scored: Vec<(f64, usize, Vec<f32>)> = Vec::with_capacity(remaining.len());
        for &block in &remaining {
            let (mut after, _) = run_from(host, tokens, &residual, &[block], Loss::None)?;
            let after = after.pop().ok_or("the engine returned no residual")?;
            scored.push((relative_update(&residual, &after, hidden), block, after));
        }
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        steps.push(Step {
            ranked: scored.iter().map(|(r, b, _)| (*b, *r)).collect(),
        });
        let (_, block, after) = scored.swap_remove(0);
        remaining.retain(|&b| b != block);
        path.push(block);
        residual = after;
    }
    Ok((path, steps))
}

/// The least relative loss drop for which `repair` keeps a move.
pub const MIN_GAIN: f64 = 1e-3;

/// How many of its likeliest next tokens per position `repair`'s screening
/// loss keeps (with the text's own tokens): 2,457 ids of SmolLM2's 49,152 on
/// the probe text, where the restricted loss orders chains as the full one
/// does (flow's chain 3.30 against the true order's 2.65; full 3.41, 2.74).
pub const SCREEN_TOP_K: usize = 32;

/// `repair` trusts the loss only when the chain's loss is below this share
/// of a uniform guess's (ln V): a model that does not predict the text (an
/// untrained one) gives every order about the same loss, and following its
/// noise would only undo what `flow` found. SmolLM2 sits at 0.28.
pub const INFORMATIVE_LOSS: f64 = 0.8;

/// Loss-checked repair of a `flow` chain. At every depth, each runner-up
/// that `flow` ranked among the `top` and within `ratio` of the winner is
/// tried in that place (moved there from wherever it is now); a move is kept
/// when the loss on `tokens` drops by at least [`MIN_GAIN`]. Flow's mistakes are local (the true
/// block is among its first three at every depth on the models measured), so
/// this tries a few dozen moves where a full remove-and-reinsert sweep tries
/// hundreds. Returns the path, the loss and the number of moves tried.
pub fn repair(
    host: &Host,
    tokens: &[u32],
    mut path: Vec<usize>,
    steps: &[Step],
    top: usize,
    ratio: f64,
) -> Result<(Vec<usize>, f64, usize), PluginError> {
    // Callers check for a head first (`has_output_head`): without one, the
    // engine refuses the logits below in one line.
    let mut cache = vec![embedding(host, tokens)?];
    let (after, _) = run_from(host, tokens, &cache[0], &path, Loss::None)?;
    cache.extend(after);
    let (mut best, mut likely) = judge(host, tokens, last(&cache), SCREEN_TOP_K)?;
    let vocab = host.model()?.vocab_size.unwrap_or(2).max(2) as f64;
    if best > INFORMATIVE_LOSS * vocab.ln() {
        host.warn(&format!(
            "repair: the model predicts the probe text no better than chance (loss {best:.2} nats, uniform {:.2}); its loss cannot judge an order, so flow's chain stands",
            vocab.ln()
        ));
        return Ok((path, best, 0));
    }
    // Moves are screened by the loss over the tokens the current chain finds
    // likely (a twentieth of the head's product on SmolLM2), and only a move
    // that passes is judged by the full loss.
    let mut screen_best = loss_at(host, tokens, last(&cache), Loss::Over(&likely))?;
    let mut tried = 0;
    for (depth, step) in steps.iter().enumerate() {
        host.progress(
            depth as u64,
            steps.len() as u64,
            "repair: checking moves by loss",
        );
        let Some(&(_, winner)) = step.ranked.first() else {
            continue;
        };
        for &(block, update) in step.ranked.iter().skip(1).take(top.saturating_sub(1)) {
            if update > winner * ratio || path[depth] == block {
                continue;
            }
            let from = path
                .iter()
                .position(|&b| b == block)
                .ok_or("repair: lost a block")?;
            host.check_cancelled()?;
            let mut candidate = path.clone();
            candidate.remove(from);
            candidate.insert(depth, block);
            let first = from.min(depth);
            let (after, screened) = run_from(
                host,
                tokens,
                &cache[first],
                &candidate[first..],
                Loss::Over(&likely),
            )?;
            tried += 1;
            let screened = screened.ok_or("repair: no loss")?;
            // The restricted loss moves a little less than the full one, so
            // the screen passes half the gain the full loss must show.
            if screened >= screen_best * (1.0 - MIN_GAIN / 2.0) {
                continue;
            }
            let (loss, likely_after) = judge(host, tokens, last(&after), SCREEN_TOP_K)?;
            // A move must buy a visible share of the loss: on a trained model
            // the right moves gain percents (2-9 % on SmolLM2) and the wrong
            // ones cost as much, while an untrained model's loss moves by noise.
            if loss < best * (1.0 - MIN_GAIN) {
                best = loss;
                path = candidate;
                cache.truncate(first + 1);
                cache.extend(after);
                likely = likely_after;
                screen_best = loss_at(host, tokens, last(&cache), Loss::Over(&likely))?;
            }
        }
    }
    Ok((path, best, tried))
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
    let (after, loss) = run_from(host, tokens, &cache[0], &path, Loss::Full)?;
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
                    run_from(host, tokens, &cache[first], &candidate[first..], Loss::Full)?;
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
