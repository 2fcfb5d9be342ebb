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
        .filter(|_| matches!(model.family, Family::Gpt2 | Family::Bert))
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
enum Loss {
    None,
    /// Over the whole vocabulary: the model's loss.
    Full,
}

/// Run `blocks` from the residual `start`; the residual after each block and
/// the loss asked for at the end.
fn run_from(
    host: &Host,
    tokens: &[u32],
    (start, at): (&[f32], usize),
    blocks: &[usize],
    loss: Loss,
    reading: Reading,
) -> Result<(Vec<Vec<f32>>, Option<f64>), PluginError> {
    let out = host.forward(&ForwardRequest {
        tokens: tokens.to_vec(),
        blocks: Some(blocks.to_vec()),
        kinds: reading.kinds(at, blocks.len()),
        start: Some(start.to_vec()),
        residuals: !blocks.is_empty(),
        loss: !matches!(loss, Loss::None),
        ..ForwardRequest::default()
    })?;
    // residuals[0] is `start` itself.
    Ok((out.residuals.into_iter().skip(1).collect(), out.loss))
}

/// How a chain's blocks take their kind (attention pattern and rotary
/// table) where a config gives blocks different kinds (Gemma 3's sliding
/// and full attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// The config describes blocks: each runs as its own entry says
    /// (`probe shuffle`'s default, which moves the entries with the blocks).
    Blocks,
    /// The config describes positions: the block placed at position p runs
    /// as entry p says (a checkpoint whose tensors were renamed and whose
    /// config was kept).
    Positions,
}

impl Reading {
    /// The readings worth running for a config that gives the stored blocks
    /// `kinds` (`ModelInfo::block_kinds`), the likelier first.
    ///
    /// - One kind (or none): the readings are the same; only `Blocks` runs.
    /// - A list that repeats a period at least twice (Gemma 3's five
    ///   sliding blocks, then a full one): only `Positions` runs. Such a
    ///   list is a model's own pattern, and reading it as positions gives
    ///   every block its true kind at the true order whichever way the
    ///   checkpoint was made: a renamed checkpoint kept its config, and a
    ///   shuffle that moved the entries with the blocks left it as it was
    ///   only if every block took a place of its own kind. Such a shuffle
    ///   may also leave the period shifted (the full blocks at 0, 6, 12
    ///   where they belong at 5, 11, 17: 5 in 816 shuffles of Gemma 3
    ///   270M, seed 106 one of them); the positions reading then leaves the
    ///   loss at chance, and the pipeline tries the other one.
    /// - Any other list: `Blocks` (a config that moved with its blocks
    ///   leaves such a list), then `Positions` (a model whose own pattern
    ///   has no period).
    pub fn candidates(kinds: &[usize]) -> &'static [Reading] {
        if kinds.windows(2).all(|w| w[0] == w[1]) {
            &[Reading::Blocks]
        } else if repeats_a_period(kinds) {
            &[Reading::Positions]
        } else {
            &[Reading::Blocks, Reading::Positions]
        }
    }

    /// The `kinds` of a request that runs `len` blocks from position `first`.
    pub fn kinds(self, first: usize, len: usize) -> Option<Vec<usize>> {
        match self {
            Reading::Blocks => None,
            Reading::Positions => Some((first..first + len).collect()),
        }
    }
}

/// Whether `kinds` repeats a period of at most half its length (a last,
/// partial period included).
fn repeats_a_period(kinds: &[usize]) -> bool {
    (1..=kinds.len() / 2).any(|period| (period..kinds.len()).all(|p| kinds[p] == kinds[p - period]))
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

/// How far behind the best block at a depth `flow` still ranks a runner-up
/// (and `repair` still tries it there): a relative update up to twice the
/// winner's. On SmolLM2 the right block is within 1.1× of the winner at
/// three of the four depths where flow errs, and at 1.96× at the fourth.
pub const RUNNER_UP_RATIO: f64 = 2.0;

/// How many runner-ups per depth `flow` ranks and `repair` tries (with the
/// winner: the first three).
pub const RUNNER_UPS: usize = 2;

/// The first depths, where `flow` scores every block: the first blocks change
/// the stream's character (SmolLM2's block 0 writes 15× the embedding's
/// norm), so what a block wrote before predicts what it writes there badly
/// (a fifth of it at depths 1 and 2).
const SCORE_ALL_UNTIL: usize = 3;

/// Norm of every position's row of a `[T, hidden]` matrix.
fn row_norms(matrix: &[f32], hidden: usize) -> Vec<f64> {
    matrix
        .chunks(hidden)
        .map(|row| row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt())
        .collect()
}

/// Median over positions ≥ 1 of `update[p] / stream[p]`.
fn median_ratio(update: &[f64], stream: &[f64]) -> f64 {
    let mut ratios: Vec<f64> = update
        .iter()
        .zip(stream)
        .skip(1)
        .map(|(u, s)| u / s.max(1e-30))
        .collect();
    if ratios.is_empty() {
        return 0.0;
    }
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

/// Greedy chain from the embedding, smallest relative update first. Returns
/// the path and what each step saw.
///
/// A pre-norm block's update depends on the direction of the stream it
/// reads, not on its size, so the norm of what a block wrote when it was last
/// run, over the norm of the stream now, predicts its relative update here.
/// Blocks are scored in the order of that prediction, and once three are
/// scored a block predicted beyond [`RUNNER_UP_RATIO`] times the best score
/// so far is not run: it could neither win nor be a runner-up the repair
/// tries. On SmolLM2 this runs 220 blocks instead of 465 and gives the same
/// chain and the same runner-ups; `prune = false` scores every block.
pub fn flow(
    host: &Host,
    tokens: &[u32],
    n: usize,
    probe: Probe,
    prune: bool,
    reading: Reading,
) -> Result<(Vec<usize>, Vec<Step>), PluginError> {
    let mut residual = embedding(host, tokens)?;
    if probe == Probe::Gaussian {
        residual = gaussian_like(&residual);
    }
    let hidden = residual.len() / tokens.len().max(1);
    let mut remaining: Vec<usize> = (0..n).collect();
    // Per block: the norms of what it wrote, per position, when last run.
    let mut wrote: Vec<Option<Vec<f64>>> = vec![None; n];
    let (mut path, mut steps) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while !remaining.is_empty() {
        host.check_cancelled()?;
        host.progress(path.len() as u64, n as u64, "flow: placing blocks");
        let stream = row_norms(&residual, hidden);
        let mut order: Vec<(f64, usize)> = remaining
            .iter()
            .map(|&b| {
                (
                    wrote[b].as_ref().map_or(0.0, |u| median_ratio(u, &stream)),
                    b,
                )
            })
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut scored: Vec<(f64, usize, Vec<f32>)> = Vec::with_capacity(remaining.len());
        for (predicted, block) in order {
            let best = scored.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
            if prune
                && path.len() >= SCORE_ALL_UNTIL
                && scored.len() > RUNNER_UPS
                && predicted > RUNNER_UP_RATIO * best
            {
                break; // the rest are predicted further behind still
            }
            let (mut after, _) = run_from(
                host,
                tokens,
                (&residual, path.len()),
                &[block],
                Loss::None,
                reading,
            )?;
            let after = after.pop().ok_or("the engine returned no residual")?;
            let update: Vec<f32> = after.iter().zip(&residual).map(|(a, b)| a - b).collect();
            let update = row_norms(&update, hidden);
            scored.push((median_ratio(&update, &stream), block, after));
            wrote[block] = Some(update);
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
/// loss keeps (with the text's own tokens). The screen only orders and
/// filters moves; a move is kept on the full loss.
pub const SCREEN_TOP_K: usize = 32;

/// `repair` trusts the loss only when the chain's loss is below this share
/// of a uniform guess's (ln V): a model that does not predict the text (an
/// untrained one) gives every order about the same loss, and following its
/// noise would only undo what `flow` found.
pub const INFORMATIVE_LOSS: f64 = 0.8;

/// The least loss margin for which a block's place counts as sure: every
/// alternative tried (the block swapped with either neighbour) must raise
/// the loss on the repair text by 1 % or more. Chosen on SmolLM2, where
/// every swap of its true order costs at least 5.6 % on the default text.
pub const SURE_MARGIN: f64 = 0.01;

/// What `repair` did.
pub struct Repaired {
    pub path: Vec<usize>,
    /// How the chain's blocks took their kinds.
    pub reading: Reading,
    /// The full loss of `path` on the repair text.
    pub loss: f64,
    /// Whether the least loss the search reached is informative (below
    /// [`INFORMATIVE_LOSS`] of a uniform guess's); when it is not, `flow`'s
    /// chain stands.
    pub informative: bool,
    /// What to warn of when it is not (emitted only for the chain that
    /// stands: another reading of the config may still find the order).
    pub at_chance: Option<String>,
    /// Candidate chains whose loss was computed.
    pub tried: usize,
    /// Moves kept.
    pub kept: usize,
    /// Moves of the wide pass (0 when it did not run).
    pub wide_moves: usize,
    /// Rounds over the whole move list (the last one keeps nothing).
    pub rounds: usize,
}

/// What a repair's descents did so far.
#[derive(Default)]
struct Search {
    tried: usize,
    kept: usize,
    rounds: usize,
}

/// A repaired chain: what the repair says of it, and the chain itself
/// (its cached residuals spare [`place_margins`] a run).
pub struct RepairedChain {
    pub repaired: Repaired,
    chain: Chain,
}

/// The moves `repair` considers: at every depth, each of the first
/// [`RUNNER_UPS`] runner-ups that `flow` ranked there within
/// [`RUNNER_UP_RATIO`] of the winner, as (block, depth) — "put this block at
/// this depth".
pub fn runner_up_moves(steps: &[Step]) -> Vec<(usize, usize)> {
    let mut moves = Vec::new();
    for (depth, step) in steps.iter().enumerate() {
        let Some(&(_, winner)) = step.ranked.first() else {
            continue;
        };
        for &(block, update) in step.ranked.iter().skip(1).take(RUNNER_UPS) {
            if update <= winner * RUNNER_UP_RATIO {
                moves.push((block, depth));
            }
        }
    }
    moves
}

/// `path` with `block` moved to `depth`, and the first position that
/// changed; `None` when it already is there.
fn moved(path: &[usize], (block, depth): (usize, usize)) -> Option<(Vec<usize>, usize)> {
    let from = path.iter().position(|&b| b == block)?;
    if from == depth {
        return None;
    }
    let mut candidate = path.to_vec();
    candidate.remove(from);
    candidate.insert(depth, block);
    Some((candidate, from.min(depth)))
}

/// The chain being repaired: its blocks, the residual before each position
/// (so a candidate re-runs only what follows its first change), its full
/// loss, and the ids its screening loss is restricted to.
struct Chain {
    reading: Reading,
    path: Vec<usize>,
    cache: Vec<Vec<f32>>,
    loss: f64,
    likely: Vec<u32>,
    /// The screening loss of `path` itself.
    screen: f64,
}

/// A move tried on the chain: the order it gives, where that order first
/// differs, its screening gain, and the residuals after each of its blocks
/// from `first` on (so keeping it costs no second run).
struct Candidate {
    by: (usize, usize),
    path: Vec<usize>,
    first: usize,
    gain: f64,
    residuals: Vec<Vec<f32>>,
    /// Tried on an earlier chain: `path` and `residuals` are out of date,
    /// `gain` an estimate.
    stale: bool,
}

/// The likeliest `k` ids at any position of `logits` `[T, vocab]`, ascending.
fn likeliest(logits: &[f32], t: usize, k: usize) -> Vec<u32> {
    let vocab = logits.len() / t.max(1);
    let mut ids = Vec::with_capacity(t * k);
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
    ids
}

/// Mean next-token loss with the softmax over `ids` and the text's own
/// tokens only: what the engine's `loss_vocab` computes, here from full
/// logits the plugin already holds.
fn restricted_loss(logits: &[f32], tokens: &[u32], ids: &[u32]) -> f64 {
    let t = tokens.len();
    let vocab = logits.len() / t.max(1);
    let mut set: Vec<u32> = ids.iter().chain(tokens).copied().collect();
    set.sort_unstable();
    set.dedup();
    let total: f64 = (0..t.saturating_sub(1))
        .map(|p| {
            let row = &logits[p * vocab..(p + 1) * vocab];
            let max = set
                .iter()
                .map(|&i| row[i as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = set
                .iter()
                .map(|&i| f64::from((row[i as usize] - max).exp()))
                .sum();
            f64::from(max) + sum.ln() - f64::from(row[tokens[p + 1] as usize])
        })
        .sum();
    total / t.saturating_sub(1).max(1) as f64
}

/// What the head says of a chain that ended in `last`: its full loss, the
/// ids it finds likely, and its loss restricted to those (one head run).
fn judge(host: &Host, tokens: &[u32], last: &[f32]) -> Result<(f64, Vec<u32>, f64), PluginError> {
    let out = host.forward(&ForwardRequest {
        tokens: tokens.to_vec(),
        blocks: Some(Vec::new()),
        start: Some(last.to_vec()),
        logits: true,
        ..ForwardRequest::default()
    })?;
    let loss = out.loss.ok_or("the engine returned no loss")?;
    let logits = out.logits.ok_or("the engine returned no logits")?;
    let likely = likeliest(&logits, tokens.len(), SCREEN_TOP_K);
    let screen = restricted_loss(&logits, tokens, &likely);
    Ok((loss, likely, screen))
}

impl Chain {
    /// Run `path` on `tokens` and judge it.
    fn new(
        host: &Host,
        tokens: &[u32],
        path: Vec<usize>,
        reading: Reading,
    ) -> Result<Self, PluginError> {
        let out = host.forward(&ForwardRequest {
            tokens: tokens.to_vec(),
            blocks: Some(path.clone()),
            kinds: reading.kinds(0, path.len()),
            residuals: true,
            ..ForwardRequest::default()
        })?;
        let cache = out.residuals;
        let (loss, likely, screen) = judge(host, tokens, last(&cache))?;
        Ok(Chain {
            reading,
            path,
            cache,
            loss,
            likely,
            screen,
        })
    }

    /// Try every move that changes the chain, in one batch of forward passes
    /// scored by the screening loss.
    fn try_moves(
        &self,
        host: &Host,
        tokens: &[u32],
        moves: &[(usize, usize)],
    ) -> Result<Vec<Candidate>, PluginError> {
        // Two moves can give one order (a block moved one place is its
        // neighbour moved back): it runs once, as the first of them.
        let mut orders = std::collections::HashSet::new();
        let mut candidates: Vec<Candidate> = moves
            .iter()
            .filter_map(|&by| {
                moved(&self.path, by).map(|(path, first)| Candidate {
                    by,
                    path,
                    first,
                    gain: f64::NEG_INFINITY,
                    residuals: Vec::new(),
                    stale: false,
                })
            })
            .filter(|c| orders.insert(c.path.clone()))
            .collect();
        let requests: Vec<ForwardRequest> = candidates
            .iter()
            .map(|c| ForwardRequest {
                tokens: tokens.to_vec(),
                blocks: Some(c.path[c.first..].to_vec()),
                kinds: self.reading.kinds(c.first, c.path.len() - c.first),
                start: Some(self.cache[c.first].clone()),
                residuals: true,
                loss: true,
                loss_vocab: Some(self.likely.clone()),
                ..ForwardRequest::default()
            })
            .collect();
        for (candidate, out) in candidates.iter_mut().zip(host.forward_batch(&requests)?) {
            let loss = out.loss.ok_or("repair: the engine returned no loss")?;
            candidate.gain = 1.0 - loss / self.screen;
            // residuals[0] is the start, already cached.
            candidate.residuals = out.residuals.into_iter().skip(1).collect();
        }
        Ok(candidates)
    }

    /// Make `candidate` the chain, judged as `judged`.
    fn keep(&mut self, candidate: Candidate, (loss, likely, screen): (f64, Vec<u32>, f64)) {
        self.cache.truncate(candidate.first + 1);
        self.cache.extend(candidate.residuals);
        self.path = candidate.path;
        self.loss = loss;
        self.likely = likely;
        self.screen = screen;
    }
}

/// The residual a chain's last block left.
fn last(residuals: &[Vec<f32>]) -> &[f32] {
    residuals.last().map_or(&[], Vec::as_slice)
}

/// The positions a move changes on `path`: from where its block is to where
/// it goes.
fn reach(path: &[usize], (block, depth): (usize, usize)) -> Option<(usize, usize)> {
    let from = path.iter().position(|&b| b == block)?;
    Some((from.min(depth), from.max(depth)))
}

/// Loss-checked repair of a `flow` chain by best improvement over the
/// runner-up moves (`runner_up_moves`). A round tries moves on the current
/// chain in one batch, scored by the screening loss; the moves that lower it
/// are taken best first, each kept only if the full loss on `tokens` drops
/// by [`MIN_GAIN`], and after a move is kept the round's candidates that
/// touch it are tried again on the new chain (the others when one of them
/// comes up best). Rounds repeat until one keeps nothing. When a swap of
/// two neighbours would still lower the screening loss, the same descent
/// runs over every block within [`WIDE_WINDOW`] places (flow far from the
/// truth: Gemma 3 270M). Only then is the loss judged against chance: below
/// [`INFORMATIVE_LOSS`] of a uniform guess's the repaired chain stands, else
/// flow's. [`place_margins`] measures the places of the chain that stands.
///
/// The first round tries every move; a later one only the moves whose reach
/// touches a move kept since they were last tried (the "don't look" bits of
/// 2-opt): a move's gain is the loss difference its own positions make, and
/// a change elsewhere in the chain moves both sides of that difference alike.
///
/// Taking moves in the order of flow's depths (the first improvement of
/// earlier versions) keeps a wrong move whenever the chain's other mistakes
/// make it look good; the best move first is almost always a right one,
/// because the right moves gain the most (on SmolLM2 15–50 % on
/// `memorized.txt`, against at most 3 % for a wrong one from flow's chain).
pub fn repair(
    host: &Host,
    tokens: &[u32],
    path: Vec<usize>,
    moves: &[(usize, usize)],
    reading: Reading,
) -> Result<RepairedChain, PluginError> {
    // Callers check for a head first (`has_output_head`): without one, the
    // engine refuses the logits in one line.
    let flow_path = path.clone();
    let mut chain = Chain::new(host, tokens, path, reading)?;
    let vocab = host.model()?.vocab_size.unwrap_or(2).max(2) as f64;
    let mut search = Search::default();
    descend(host, tokens, &mut chain, moves, &mut search)?;
    // Runner-up moves can leave a chain some swap still improves (flow far
    // from the truth): then every block is tried within WIDE_WINDOW places.
    let screened = swap_margins(host, tokens, &chain, Measure::Screen)?;
    let mut wide_moves = 0;
    if screened.iter().any(|&m| m < -MIN_GAIN) {
        let wide = window_moves(&chain.path, WIDE_WINDOW);
        wide_moves = wide.len();
        descend(host, tokens, &mut chain, &wide, &mut search)?;
    }
    let informative = chain.loss <= INFORMATIVE_LOSS * vocab.ln();
    let mut at_chance = None;
    if !informative {
        at_chance = Some(format!(
            "repair: the model predicts the probe text no better than chance (loss {:.2} nats at best, uniform {:.2}); its loss cannot judge an order, so flow's chain stands and no block's place is sure",
            chain.loss,
            vocab.ln()
        ));
        chain = Chain::new(host, tokens, flow_path, reading)?;
    }
    Ok(RepairedChain {
        repaired: Repaired {
            path: chain.path.clone(),
            reading,
            loss: chain.loss,
            informative,
            at_chance,
            tried: search.tried,
            kept: search.kept,
            wide_moves,
            rounds: search.rounds,
        },
        chain,
    })
}

/// The full loss of `path` on `tokens`, its blocks taking their kinds as
/// `reading` says.
pub fn chain_loss(
    host: &Host,
    tokens: &[u32],
    path: &[usize],
    reading: Reading,
) -> Result<f64, PluginError> {
    let start = embedding(host, tokens)?;
    let (_, loss) = run_from(host, tokens, (&start, 0), path, Loss::Full, reading)?;
    loss.ok_or_else(|| "the engine returned no loss".into())
}

/// How far `repair`'s wide pass moves a block: up to this many places.
pub const WIDE_WINDOW: usize = 3;

/// Every (block, depth) with the block moved at most `window` places from
/// where `path` has it.
fn window_moves(path: &[usize], window: usize) -> Vec<(usize, usize)> {
    let n = path.len();
    let mut moves = Vec::new();
    for (from, &block) in path.iter().enumerate() {
        for depth in from.saturating_sub(window)..(from + window + 1).min(n) {
            if depth != from {
                moves.push((block, depth));
            }
        }
    }
    moves
}

/// Best-improvement rounds over `moves` on `chain` until a round keeps
/// nothing (see [`repair`]).
fn descend(
    host: &Host,
    tokens: &[u32],
    chain: &mut Chain,
    moves: &[(usize, usize)],
    search: &mut Search,
) -> Result<(), PluginError> {
    let mut look = vec![true; moves.len()];
    while look.iter().any(|&l| l) {
        host.check_cancelled()?;
        search.rounds += 1;
        let wanted: Vec<(usize, usize)> = moves
            .iter()
            .zip(&look)
            .filter(|(_, &l)| l)
            .map(|(m, _)| *m)
            .collect();
        host.progress(
            search.rounds as u64,
            0,
            &format!(
                "repair: round {} over {} moves",
                search.rounds,
                wanted.len()
            ),
        );
        look.iter_mut().for_each(|l| *l = false);
        let mut round = chain.try_moves(host, tokens, &wanted)?;
        search.tried += round.len();
        round.retain(passes);
        while let Some(best) = best_passing(host, tokens, chain, &mut round, search)? {
            host.check_cancelled()?;
            let candidate = round.swap_remove(best);
            let judged = judge(host, tokens, last(&candidate.residuals))?;
            if judged.0 >= chain.loss * (1.0 - MIN_GAIN) {
                continue;
            }
            let changed = reach(&chain.path, candidate.by).ok_or("repair: lost a block")?;
            chain.keep(candidate, judged);
            search.kept += 1;
            let touches = |path: &[usize], m: (usize, usize)| {
                reach(path, m).is_some_and(|(lo, hi)| lo <= changed.1 + 1 && changed.0 <= hi + 1)
            };
            // Moves that touch the change are looked at again next round.
            for (m, l) in moves.iter().zip(look.iter_mut()) {
                *l |= touches(&chain.path, *m);
            }
            // The round's other candidates were tried on the chain before
            // this move. Those that touch it may gain quite differently now
            // (a block put back makes room for its neighbour, so one that
            // stopped passing may pass again): they are tried again at
            // once, passing or not. The rest gain about what they did — a
            // move's gain is the loss difference its own positions make —
            // and are tried again only when one of them comes up best.
            let (near, far): (Vec<Candidate>, Vec<Candidate>) =
                round.into_iter().partition(|c| touches(&chain.path, c.by));
            let near: Vec<(usize, usize)> = near.iter().map(|c| c.by).collect();
            round = chain.try_moves(host, tokens, &near)?;
            search.tried += round.len();
            round.extend(far.into_iter().map(|c| Candidate { stale: true, ..c }));
        }
    }
    Ok(())
}

/// Whether a candidate's screening gain is worth a full judgement: the
/// restricted loss moves a little less than the full one, so the screen
/// passes half the gain the full loss must show.
fn passes(candidate: &Candidate) -> bool {
    candidate.gain > MIN_GAIN / 2.0
}

/// The round's candidate with the best screening gain among those that
/// pass, tried again on the current chain first when it is stale (until the
/// best is fresh).
fn best_passing(
    host: &Host,
    tokens: &[u32],
    chain: &Chain,
    round: &mut Vec<Candidate>,
    search: &mut Search,
) -> Result<Option<usize>, PluginError> {
    loop {
        let Some(best) = (0..round.len())
            .filter(|&i| passes(&round[i]))
            .max_by(|&a, &b| round[a].gain.total_cmp(&round[b].gain))
        else {
            return Ok(None);
        };
        if !round[best].stale {
            return Ok(Some(best));
        }
        let by = round.swap_remove(best).by;
        round.extend(chain.try_moves(host, tokens, &[by])?);
        search.tried += 1;
    }
}

/// The loss a chain is measured by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// The model's loss (the head over the whole vocabulary).
    Full,
    /// The screening loss: the softmax over the ids the chain finds likely
    /// and the text's own (a fraction of the head's cost; it moves less than
    /// the full loss, on Gemma 3 270M a swap of its last two blocks fifty
    /// times less).
    Screen,
}

/// Per position of the chain: how much the loss on `tokens` rises,
/// relative, when the block there trades places with a neighbour — the
/// smaller of its two swaps (one at either end). Negative when a swap
/// would lower the loss. Every swap runs in one batch from the cached
/// residual before it.
fn swap_margins(
    host: &Host,
    tokens: &[u32],
    chain: &Chain,
    measure: Measure,
) -> Result<Vec<f64>, PluginError> {
    let (vocab, base) = match measure {
        Measure::Full => (None, chain.loss),
        Measure::Screen => (Some(chain.likely.clone()), chain.screen),
    };
    let n = chain.path.len();
    let requests: Vec<ForwardRequest> = (0..n.saturating_sub(1))
        .map(|k| {
            let mut blocks = chain.path[k..].to_vec();
            blocks.swap(0, 1);
            ForwardRequest {
                tokens: tokens.to_vec(),
                kinds: chain.reading.kinds(k, blocks.len()),
                blocks: Some(blocks),
                start: Some(chain.cache[k].clone()),
                loss: true,
                loss_vocab: vocab.clone(),
                ..ForwardRequest::default()
            }
        })
        .collect();
    let swaps: Vec<f64> = host
        .forward_batch(&requests)?
        .into_iter()
        .map(|out| {
            let loss = out
                .loss
                .ok_or("swap margins: the engine returned no loss")?;
            Ok((loss - base) / base.max(1e-300))
        })
        .collect::<Result<_, PluginError>>()?;
    Ok(position_margins(&swaps, n))
}

/// Per position of a repaired chain: the least relative rise of the full
/// loss on `tokens` (the text it was repaired on) when the block there trades places
/// with a neighbour ([`swap_margins`]). Apart from [`repair`] because where
/// the pipeline runs under two readings only the chain that stands needs
/// them (1.1 s of Gemma 3 270M's run).
pub fn place_margins(
    host: &Host,
    tokens: &[u32],
    repaired: &RepairedChain,
) -> Result<Vec<f64>, PluginError> {
    swap_margins(host, tokens, &repaired.chain, Measure::Full)
}

/// A position's margin from the swaps it takes part in: swap `k` trades
/// positions `k` and `k + 1`.
fn position_margins(swaps: &[f64], n: usize) -> Vec<f64> {
    (0..n)
        .map(|p| {
            let left = p.checked_sub(1).and_then(|k| swaps.get(k));
            let right = swaps.get(p);
            left.into_iter()
                .chain(right)
                .copied()
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

/// How many tokens of the prompts `cross_check` judges a repaired chain on.
/// At 64 the true order of SmolLM2 has a neighbour swap 1.6 % *below* its
/// loss (prose that short is noise at that scale); at 128 (screening loss)
/// its least swap costs +0.5 %, Gemma 3 270M's +10.6 %, Qwen2.5-Coder
/// 1.5B's −0.4 % (a tie), while the wrong chain the repair text led that
/// model to has a swap 2.5 % below.
pub const CROSS_CHECK_TOKENS: usize = 128;

/// A repaired chain judged on text its search never saw.
pub struct CrossCheck {
    /// The chain's full loss on that text.
    pub loss: f64,
    /// Per position: the least relative rise of the screening loss on that
    /// text when the block there trades places with a neighbour
    /// ([`swap_margins`]).
    pub margins: Vec<f64>,
}

impl CrossCheck {
    /// Whether the text agrees with the chain: no swap of neighbours lowers
    /// its loss by [`SURE_MARGIN`] or more (a smaller gain is a tie either
    /// way, as it is for `sure`).
    pub fn agrees(&self) -> bool {
        self.margins.iter().all(|&m| m > -SURE_MARGIN)
    }
}

/// The loss of `path` on `tokens` and the margins of its neighbour swaps
/// there, in one chain run and one batch. `repair` minimises the loss on a
/// few dozen tokens; over the hundreds of orders it tries, a wrong one can
/// come out below the true one on a text that short (on Qwen2.5-Coder 1.5B
/// a chain with 21 blocks misplaced reaches 0.61 nats on the repair text,
/// the true order 0.73), and every swap of the chain it stops at then costs
/// something there. Text the search did not see has no such bias. The swaps
/// are judged by the screening loss: the full one, over a 49 k to 262 k
/// vocabulary at every position of every swap, would cost twice as much
/// (SmolLM2: 2.9 s against 1.6 s) and separates the cases above no better.
pub fn cross_check(
    host: &Host,
    tokens: &[u32],
    path: &[usize],
    reading: Reading,
) -> Result<CrossCheck, PluginError> {
    let chain = Chain::new(host, tokens, path.to_vec(), reading)?;
    let margins = swap_margins(host, tokens, &chain, Measure::Screen)?;
    Ok(CrossCheck {
        loss: chain.loss,
        margins,
    })
}

/// Per position of `flow`'s chain: how far the runner-up at that depth
/// stood behind the block placed there, as the runner-up's relative update
/// over the winner's, minus one (infinite where one block was left).
pub fn flow_margins(steps: &[Step]) -> Vec<f64> {
    steps
        .iter()
        .map(|step| match step.ranked.as_slice() {
            [(_, winner), (_, second), ..] => second / winner.max(1e-300) - 1.0,
            _ => f64::INFINITY,
        })
        .collect()
}

/// Remove-and-reinsert within `window` places, kept when the loss drops,
/// until a whole sweep keeps nothing. Returns the path and the loss.
pub fn insert(
    host: &Host,
    tokens: &[u32],
    mut path: Vec<usize>,
    window: usize,
    reading: Reading,
) -> Result<(Vec<usize>, f64), PluginError> {
    let n = path.len();
    // cache[k]: the residual before position k of `path`.
    let mut cache = vec![embedding(host, tokens)?];
    let (after, loss) = run_from(host, tokens, (&cache[0], 0), &path, Loss::Full, reading)?;
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
                let (after, loss) = run_from(
                    host,
                    tokens,
                    (&cache[first], first),
                    &candidate[first..],
                    Loss::Full,
                    reading,
                )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_periodic_config_is_read_as_positions_and_a_shuffled_one_both_ways() {
        // Gemma 3 270M's pattern (0 sliding, 1 full), and the same entries
        // moved with the blocks of `probe shuffle --seed 1`.
        let own = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        let moved = [0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(Reading::candidates(&own), [Reading::Positions]);
        // A last, partial period still repeats (Gemma 3 1B's 26 blocks).
        assert_eq!(Reading::candidates(&own[..14]), [Reading::Positions]);
        assert_eq!(
            Reading::candidates(&moved),
            [Reading::Blocks, Reading::Positions]
        );
        // One period is no pattern yet: full blocks first, then sliding.
        assert_eq!(
            Reading::candidates(&[1, 1, 0, 0, 0, 0]),
            [Reading::Blocks, Reading::Positions]
        );
        assert_eq!(Reading::candidates(&[0; 30]), [Reading::Blocks]);
        assert_eq!(Reading::candidates(&[]), [Reading::Blocks]);
    }

    #[test]
    fn the_prompts_agree_unless_a_swap_gains_them_the_sure_margin() {
        let check = |margins: Vec<f64>| CrossCheck { loss: 1.0, margins }.agrees();
        assert!(check(vec![0.2, 0.05, 0.001]));
        assert!(check(vec![0.2, -0.004, 0.3]), "a gain under 1 % is a tie");
        assert!(!check(vec![0.2, -SURE_MARGIN, 0.3]));
        assert!(!check(vec![-0.025, 0.5]));
    }

    #[test]
    fn a_position_takes_the_smaller_margin_of_its_two_swaps() {
        // Swaps (0,1), (1,2), (2,3) of a four-block chain.
        let swaps = [0.5, 0.02, -0.1];
        assert_eq!(position_margins(&swaps, 4), vec![0.5, 0.02, -0.1, -0.1]);
        assert_eq!(position_margins(&[], 1), vec![f64::INFINITY]);
        let steps = vec![
            Step {
                ranked: vec![(3, 0.1), (1, 0.15), (2, 0.9)],
            },
            Step {
                ranked: vec![(1, 0.2)],
            },
        ];
        let margins = flow_margins(&steps);
        assert!((margins[0] - 0.5).abs() < 1e-12);
        assert_eq!(margins[1], f64::INFINITY);
    }

    #[test]
    fn a_move_puts_one_block_at_one_depth_and_says_what_it_touched() {
        let path = [4, 0, 3, 1, 2];
        // Block 1 (at 3) to depth 0: everything before it shifts right.
        assert_eq!(moved(&path, (1, 0)), Some((vec![1, 4, 0, 3, 2], 0)));
        assert_eq!(reach(&path, (1, 0)), Some((0, 3)));
        // Block 4 (at 0) to depth 2.
        assert_eq!(moved(&path, (4, 2)), Some((vec![0, 3, 4, 1, 2], 0)));
        assert_eq!(reach(&path, (4, 2)), Some((0, 2)));
        // Already there, or not in the chain.
        assert_eq!(moved(&path, (3, 2)), None);
        assert_eq!(moved(&path, (9, 2)), None);
    }

    #[test]
    fn runner_ups_are_the_next_two_within_twice_the_winner() {
        let steps = vec![
            Step {
                ranked: vec![(3, 1.0), (5, 1.5), (7, 1.9), (8, 1.95)],
            },
            Step {
                ranked: vec![(5, 1.0), (7, 2.5), (8, 1.1)],
            },
            Step {
                ranked: vec![(7, 1.0)],
            },
        ];
        // Depth 0: 5 and 7 (8 is a third runner-up); depth 1: 7 is beyond
        // 2× the winner, 8 comes after it in the ranking and counts.
        assert_eq!(runner_up_moves(&steps), vec![(5, 0), (7, 0), (8, 1)]);
    }

    #[test]
    fn the_relative_update_is_a_median_over_positions_after_the_first() {
        // Position 0 (the attention sink) would dominate: it is left out.
        let update = [100.0, 1.0, 3.0, 2.0];
        let stream = [1.0, 1.0, 1.0, 4.0];
        // Ratios after position 0: 1.0, 3.0, 0.5 -> median 1.0.
        assert_eq!(median_ratio(&update, &stream), 1.0);
        assert_eq!(row_norms(&[3.0, 4.0, 0.0, 1.0], 2), vec![5.0, 1.0]);
    }

    #[test]
    fn the_screening_loss_is_the_softmax_over_the_likely_ids_and_the_text() {
        // Three positions over a vocabulary of five.
        let logits = [
            0.5, 2.0, -1.0, 0.0, 1.0, //
            1.5, -0.5, 0.25, 3.0, 0.0, //
            0.0, 0.0, 4.0, 1.0, -2.0,
        ];
        let tokens = [2u32, 4, 0];
        assert_eq!(likeliest(&logits, 3, 1), vec![1, 2, 3]);
        assert_eq!(likeliest(&logits, 3, 2), vec![0, 1, 2, 3, 4]);
        let ids = [1u32];
        // The set is {1} ∪ the text's {0, 2, 4}; next tokens 4 then 0.
        let set = [0usize, 1, 2, 4];
        let expected: f64 = [(0usize, 4usize), (1, 0)]
            .iter()
            .map(|&(p, next)| {
                let row = &logits[p * 5..(p + 1) * 5];
                let lse = set.iter().map(|&i| (row[i] as f64).exp()).sum::<f64>().ln();
                lse - row[next] as f64
            })
            .sum::<f64>()
            / 2.0;
        let got = restricted_loss(&logits, &tokens, &ids);
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        // Every id: the full softmax.
        let every = [0u32, 1, 2, 3, 4];
        let full = restricted_loss(&logits, &tokens, &every);
        assert!(full > got, "more ids, more mass: {full} vs {got}");
    }
}
