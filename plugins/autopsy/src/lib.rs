//! `autopsy`: a block-by-block health check of a model (or of every
//! checkpoint of a training run): how spread its attention is, how large
//! its activations and updates are, how many directions its hidden states
//! use, how fast the residual grows, and how much of it sits on the first
//! position (attention sinks).
//!
//! Everything is reduced as the passes arrive: per block a few sums, one
//! `hidden × hidden` Gram matrix for the erank, and per head an entropy
//! sum. Attention maps `[heads, T, T]` are read a batch at a time, and a
//! prompt whose maps over every block would pass [`ATTENTION_BYTES`] is
//! re-run from its cached residuals a few blocks at a time.

use probe_sdk::prelude::*;
use probe_sdk::prompts::prompt_params;

/// Attention probabilities one forward batch may hold (256 MiB).
pub const ATTENTION_BYTES: usize = 256 << 20;

/// Prompt tokens one forward batch carries at most.
const BATCH_TOKENS: usize = 4096;

struct Autopsy;

/// Sums of one array's elements.
#[derive(Clone, Copy, Default)]
struct Moments {
    sum: f64,
    squares: f64,
    count: f64,
}

impl Moments {
    fn add(&mut self, values: &[f32]) {
        for &v in values {
            let v = f64::from(v);
            self.sum += v;
            self.squares += v * v;
        }
        self.count += values.len() as f64;
    }

    fn mean(&self) -> f64 {
        self.sum / self.count
    }

    /// Population standard deviation.
    fn std(&self) -> f64 {
        (self.squares / self.count - self.mean().powi(2))
            .max(0.0)
            .sqrt()
    }

    fn rms(&self) -> f64 {
        (self.squares / self.count).sqrt()
    }
}

/// What one block accumulates over the set.
struct BlockSums {
    entropy: Vec<f64>,
    queries: f64,
    residual: Moments,
    attn: Moments,
    mlp: Moments,
    gram: faer::Mat<f64>,
    growth: f64,
    tokens: f64,
    first_norms: f64,
    all_norms: f64,
    firsts: f64,
}

impl BlockSums {
    fn new(heads: usize, hidden: usize) -> Self {
        Self {
            entropy: vec![0.0; heads],
            queries: 0.0,
            residual: Moments::default(),
            attn: Moments::default(),
            mlp: Moments::default(),
            gram: faer::Mat::zeros(hidden, hidden),
            growth: 0.0,
            tokens: 0.0,
            first_norms: 0.0,
            all_norms: 0.0,
            firsts: 0.0,
        }
    }

    /// One sequence's attention map of this block, `[heads, t, t]`: each
    /// query row's entropy −Σ a ln a, summed per head.
    fn add_attention(&mut self, map: &[f32], t: usize) {
        for (h, head) in map.chunks_exact(t * t).enumerate() {
            for row in head.chunks_exact(t) {
                self.entropy[h] -= row
                    .iter()
                    .filter(|&&a| a > 0.0)
                    .map(|&a| f64::from(a) * f64::from(a).ln())
                    .sum::<f64>();
            }
        }
        self.queries += t as f64;
    }

    /// One sequence's residual before (`input`) and after (`output`) the
    /// block and the two updates, each `[t, hidden]`.
    fn add_pass(
        &mut self,
        input: &[f32],
        output: &[f32],
        attn: &[f32],
        mlp: &[f32],
        hidden: usize,
    ) {
        use faer::linalg::matmul::matmul;
        self.residual.add(output);
        self.attn.add(attn);
        self.mlp.add(mlp);
        let norm = |row: &[f32]| {
            row.iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        for (p, (before, after)) in input
            .chunks_exact(hidden)
            .zip(output.chunks_exact(hidden))
            .enumerate()
        {
            let (a, b) = (norm(before), norm(after));
            if a > 0.0 {
                self.growth += b / a;
            }
            self.tokens += 1.0;
            self.all_norms += b;
            if p == 0 {
                self.first_norms += b;
                self.firsts += 1.0;
            }
        }
        let rows = output.len() / hidden;
        let x: Vec<f64> = output.iter().map(|&v| f64::from(v)).collect();
        let x = faer::MatRef::from_row_major_slice(&x, rows, hidden);
        matmul(
            self.gram.as_mut(),
            faer::Accum::Add,
            x.transpose(),
            x,
            1.0,
            faer::Par::Seq,
        );
    }

    /// Roy and Vetterli's effective rank of the pooled states, from their Gram matrix.
    fn erank(&self) -> Result<f64, String> {
        let sigma: Vec<f64> = self
            .gram
            .self_adjoint_eigenvalues(faer::Side::Lower)
            .map_err(|e| format!("eigenvalues did not converge ({e:?})"))?
            .into_iter()
            .map(|l| l.max(0.0).sqrt())
            .collect();
        let total: f64 = sigma.iter().sum();
        if total == 0.0 {
            return Ok(0.0);
        }
        let entropy: f64 = sigma
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|&s| -(s / total) * (s / total).ln())
            .sum();
        Ok(entropy.exp())
    }
}

/// The prompt set's token sequences: prompt and completion (the model's own
/// greedy one where a line has none, for a causal model; an encoder reads
/// the prompt and any given completion).
fn token_sequences(host: &Host, params: &Params) -> Result<Vec<Sequence>, PluginError> {
    let set = PromptSet::from_params(params)?;
    let options = PromptOptions::from_params(params)?;
    if host.model()?.family.is_causal() {
        return host.prompt_sequences(&set, &options);
    }
    set.prompts
        .iter()
        .map(|p| {
            host.sequence(
                &p.prompt,
                p.completion.as_deref().unwrap_or(""),
                options.chat,
            )
        })
        .collect()
}

impl Plugin for Autopsy {
    const NAME: &'static str = "autopsy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "A block-by-block health check: attention entropy, activation statistics, erank, norm growth, attention sinks";
    const DESCRIPTION: &'static str = "Over every position of every prompt of the prompt set (probes/prompts.jsonl or prompts=FILE, with the model's own greedy completion where a line has none; an encoder reads prompts and given completions), per block (`layer`): attention_entropy = −Σⱼ aᵢⱼ ln aᵢⱼ averaged over every query row and head (companion `heads`: per head); residual_mean/std/rms over every element of the residual after the block, and the same of what its attention (attn_update_*) and its MLP (mlp_update_*) added; erank = exp(−Σ qᵢ ln qᵢ), qᵢ = σᵢ / Σσⱼ over the singular values of the hidden states after the block, every position pooled; norm_growth = mean over tokens of ‖x_after‖ / ‖x_before‖; first_position_share = Σ ‖x at position 0‖ / Σ ‖x‖ over all positions (1 / mean length when nothing stands out); first_position_norm_ratio = mean ‖x‖ at position 0 / mean ‖x‖ elsewhere (≫ 1: an attention sink). Token-weighted over the whole set. Over a folder of checkpoints, one table with a `checkpoint` column.";

    fn params() -> Vec<ParamSpec> {
        prompt_params()
    }

    fn work_items(_host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(1)
    }

    fn run(host: &Host, params: &Params, _items: &[usize]) -> Result<DataFrame, PluginError> {
        let model = host.model()?;
        let blocks = model.num_layers;
        let sequences = token_sequences(host, params)?;
        let mut sums: Vec<BlockSums> = Vec::new();
        let mut batch: Vec<&Sequence> = Vec::new();
        let mut batches: Vec<Vec<&Sequence>> = Vec::new();
        let mut tokens = 0;
        for sequence in &sequences {
            if tokens + sequence.tokens.len() > BATCH_TOKENS && !batch.is_empty() {
                batches.push(std::mem::take(&mut batch));
                tokens = 0;
            }
            tokens += sequence.tokens.len();
            batch.push(sequence);
        }
        batches.push(batch);
        // Heads per block, from a one-token pass (the map sizes depend on it).
        let heads = match sequences.first().and_then(|s| s.tokens.first()) {
            Some(&id) => host
                .forward(&ForwardRequest {
                    tokens: vec![id],
                    ..Default::default()
                })?
                .heads
                .max(1),
            None => return Err("the prompt set gave no sequence to run".into()),
        };
        let mut done = 0;
        for batch in batches {
            host.check_cancelled()?;
            // Maps of every block for the batch's short prompts; a long one
            // gets its maps a few blocks at a time below.
            let map_bytes = |t: usize| 4 * t * t * blocks.max(1);
            let mut budget = ATTENTION_BYTES;
            let requests: Vec<ForwardRequest> = batch
                .iter()
                .map(|s| {
                    let bytes = map_bytes(s.tokens.len());
                    let fits = bytes * heads <= budget;
                    if fits {
                        budget -= bytes * heads;
                    }
                    ForwardRequest {
                        updates: true,
                        attention: fits,
                        ..s.residual_request()
                    }
                })
                .collect();
            let outputs = host.forward_batch(&requests)?;
            for (request, output) in requests.iter().zip(outputs) {
                let (t, hidden, heads) = (output.tokens.len(), output.hidden, output.heads);
                if sums.is_empty() {
                    sums = (0..blocks).map(|_| BlockSums::new(heads, hidden)).collect();
                }
                for (l, block) in sums.iter_mut().enumerate() {
                    block.add_pass(
                        &output.residuals[l],
                        &output.residuals[l + 1],
                        &output.attn_updates[l],
                        &output.mlp_updates[l],
                        hidden,
                    );
                }
                if request.attention {
                    for (block, map) in sums.iter_mut().zip(&output.attention) {
                        block.add_attention(map, t);
                    }
                } else {
                    let per_block = (4 * heads * t * t).max(1);
                    let chunk = (ATTENTION_BYTES / per_block).max(1);
                    for first in (0..blocks).step_by(chunk) {
                        let last = (first + chunk).min(blocks);
                        let part = host.forward(&ForwardRequest {
                            tokens: output.tokens.clone(),
                            blocks: Some((first..last).collect()),
                            start: Some(output.residuals[first].clone()),
                            attention: true,
                            ..Default::default()
                        })?;
                        for (block, map) in sums[first..last].iter_mut().zip(&part.attention) {
                            block.add_attention(map, t);
                        }
                    }
                }
                done += 1;
                host.progress(done, sequences.len() as u64, "prompts");
            }
        }
        if sums.is_empty() {
            return Err("the prompt set gave no sequence to run".into());
        }

        let (mut head_layer, mut head_index, mut head_entropy) =
            (Vec::new(), Vec::new(), Vec::new());
        for (l, block) in sums.iter().enumerate() {
            for (h, &e) in block.entropy.iter().enumerate() {
                head_layer.push(l as i64);
                head_index.push(h as i64);
                head_entropy.push(e / block.queries);
            }
        }
        host.emit_table(
            "heads",
            df!(
                "layer" => head_layer,
                "head" => head_index,
                "attention_entropy" => head_entropy,
            )?,
        )?;
        let column = |f: &dyn Fn(&BlockSums) -> f64| sums.iter().map(f).collect::<Vec<f64>>();
        let eranks = sums
            .iter()
            .enumerate()
            .map(|(l, b)| b.erank().map_err(|e| format!("block {l}: {e}")))
            .collect::<Result<Vec<f64>, String>>()?;
        Ok(df!(
            "layer" => (0..blocks as i64).collect::<Vec<_>>(),
            "attention_entropy" => column(&|b| b.entropy.iter().sum::<f64>() / (b.queries * heads as f64)),
            "residual_mean" => column(&|b| b.residual.mean()),
            "residual_std" => column(&|b| b.residual.std()),
            "residual_rms" => column(&|b| b.residual.rms()),
            "attn_update_mean" => column(&|b| b.attn.mean()),
            "attn_update_std" => column(&|b| b.attn.std()),
            "attn_update_rms" => column(&|b| b.attn.rms()),
            "mlp_update_mean" => column(&|b| b.mlp.mean()),
            "mlp_update_std" => column(&|b| b.mlp.std()),
            "mlp_update_rms" => column(&|b| b.mlp.rms()),
            "erank" => eranks,
            "norm_growth" => column(&|b| b.growth / b.tokens),
            "first_position_share" => column(&|b| b.first_norms / b.all_norms),
            "first_position_norm_ratio" => column(&|b| {
                let others = b.tokens - b.firsts;
                (b.first_norms / b.firsts) / ((b.all_norms - b.first_norms) / others)
            }),
            "tokens" => vec![sums[0].tokens as i64; blocks],
        )?)
    }
}

export_plugin!(Autopsy);
