//! `linearity`: how nonlinear each block, and each of its two sublayers, is
//! on the residuals real text gives it — the linearization gap of the
//! block's update at ε, its slope over ε (the order of the nonlinearity)
//! and how much the update amplifies a perturbation ([`measure`]).
//!
//! Every perturbed run starts from a residual the base pass cached, and
//! runs one block (or one sublayer, `ForwardRequest::sublayer`) only; the
//! MLP sublayer acts on each token alone, so its runs carry the scored rows
//! only. Outputs are reduced to a few sums per (block, part, ε) as each
//! batch arrives.

pub mod measure;

use std::collections::BTreeMap;

use probe_sdk::prelude::*;
use probe_sdk::prompts::prompt_params;

use measure::{directions, order, perturbed, stream, update_ratio, GapSums, Rows};

/// Prompts a default run measures (two of each built-in category), chosen
/// round-robin over the categories in file order: every (block, part, ε,
/// direction, sign) is one run, so the cost is ~60 block runs per token.
pub const DEFAULT_SAMPLE: i64 = 10;

/// The part of a block whose update is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Block,
    Attention,
    Mlp,
}

impl Part {
    const ALL: [Part; 3] = [Part::Block, Part::Attention, Part::Mlp];

    fn name(self) -> &'static str {
        match self {
            Part::Block => "block",
            Part::Attention => "attention",
            Part::Mlp => "mlp",
        }
    }

    fn sublayer(self) -> Option<Sublayer> {
        match self {
            Part::Block => None,
            Part::Attention => Some(Sublayer::Attention),
            Part::Mlp => Some(Sublayer::Mlp),
        }
    }
}

/// What the user asked for.
struct Settings {
    /// The ε of the `gap` column.
    epsilon: f64,
    /// Every ε measured (the sweep and `epsilon`), ascending.
    sweep: Vec<f64>,
    directions: usize,
    /// Directions of the sweep at every ε (the first of the same ones).
    sweep_directions: usize,
    seed: u64,
    parts: Vec<Part>,
    sample: usize,
    layers: Option<Vec<usize>>,
}

impl Settings {
    fn from_params(params: &Params) -> Result<Self, PluginError> {
        let positive = |name: &str, v: f64| -> Result<f64, PluginError> {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(format!("parameter `{name}`: {v} is not a positive perturbation size").into())
            }
        };
        let epsilon = positive("epsilon", params.float("epsilon")?)?;
        let mut sweep = vec![epsilon];
        for word in params.list("eps").unwrap_or_default() {
            let v: f64 = word.parse().map_err(|_| {
                PluginError::from(format!("parameter `eps`: `{word}` is not a number"))
            })?;
            sweep.push(positive("eps", v)?);
        }
        sweep.sort_by(f64::total_cmp);
        sweep.dedup();
        let count = |name: &str| -> Result<usize, PluginError> {
            let n = params.int(name)?;
            if !(1..=4096).contains(&n) {
                return Err(
                    format!("parameter `{name}`: {n}; give 1 to 4096 random directions").into(),
                );
            }
            Ok(n as usize)
        };
        let directions = count("directions")?;
        let sweep_directions = count("sweep_directions")?;
        let mut parts = Vec::new();
        for word in params.list("parts").unwrap_or_default() {
            let part = Part::ALL
                .into_iter()
                .find(|p| p.name() == word)
                .ok_or_else(|| {
                    PluginError::from(format!(
                        "parameter `parts`: `{word}` is not one of block, attention, mlp"
                    ))
                })?;
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        if parts.is_empty() {
            return Err("parameter `parts`: give at least one of block, attention, mlp".into());
        }
        parts.sort_unstable();
        let sample = params.int("sample")?;
        if sample < 0 {
            return Err(
                format!("parameter `sample`: {sample} prompts; give 0 (all) or more").into(),
            );
        }
        Ok(Self {
            epsilon,
            sweep,
            directions,
            sweep_directions,
            seed: params.int("seed")? as u64,
            parts,
            sample: sample as usize,
            layers: params.layers("layers"),
        })
    }
}

/// `n` prompts of `set` (all when `n` is 0 or the set is smaller), taken in
/// turn from each category in the order categories first appear, each
/// category's in file order.
fn sample(set: &PromptSet, n: usize) -> PromptSet {
    if n == 0 || n >= set.prompts.len() {
        return set.clone();
    }
    let mut by_category: Vec<(&str, Vec<&Prompt>)> = Vec::new();
    for p in &set.prompts {
        match by_category.iter_mut().find(|(c, _)| *c == p.category) {
            Some((_, list)) => list.push(p),
            None => by_category.push((&p.category, vec![p])),
        }
    }
    let mut chosen: Vec<Prompt> = Vec::with_capacity(n);
    for round in 0.. {
        for (_, list) in &by_category {
            if let Some(p) = list.get(round) {
                if chosen.len() < n {
                    chosen.push((*p).clone());
                }
            }
        }
        if chosen.len() == n {
            break;
        }
    }
    chosen.sort_by_key(|p| p.index);
    PromptSet {
        name: set.name.clone(),
        prompts: chosen,
    }
}

/// One sequence as the measurement runs it: tokens up to the last scored
/// position (a causal model's last row never matters to a scored one), the
/// scored rows, and the residual before every block.
struct Measured {
    prompt_index: usize,
    tokens: Vec<u32>,
    scored: std::ops::Range<usize>,
    /// `[T, hidden]` before block l (stage l), for l = 0 … blocks.
    residuals: Vec<Vec<f32>>,
}

/// What one block's measurement reduces to.
#[derive(Default)]
struct BlockSums {
    /// Per part: the first `directions` directions at `epsilon`.
    gap: BTreeMap<Part, GapSums>,
    /// Per (part, index into the sweep): the first `sweep_directions`.
    sweep: BTreeMap<(Part, usize), GapSums>,
    /// Per part: mean ‖g(x)‖ / ‖x‖ over the scored tokens.
    update_ratio: BTreeMap<Part, f64>,
}

struct Linearity;

impl Plugin for Linearity {
    const NAME: &'static str = "linearity";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "How nonlinear each block, its attention and its MLP are on real inputs: linearization gap, its order in ε, amplification";
    const DESCRIPTION: &'static str = "For each block (`layer`) and part (`block`: the whole block; `attention`, `mlp`: one sublayer with its norms, the MLP at the block's midpoint), with g(x) the update the part adds to the residual x it sees on the prompt set's sequences (probes/prompts.jsonl or prompts=FILE, `sample` prompts of it, the model's own greedy completion where a line has none): every position of a sequence is perturbed at once, δ_t = ε‖x_t‖·d_t with d_t a random unit direction per position (`directions` of them, seeded by `seed`; the same for every block, part and ε), and at each scored position gap = ‖g(x+δ) − g(x) − J·δ‖ / ‖g(x+δ) − g(x)‖ with J·δ = [g(x+δ) − g(x−δ)] / 2 (the central difference), amplification = ‖g(x+δ) − g(x)‖ / ‖δ‖. Columns: gap, gap_std and amplification at ε = `epsilon` (mean over scored tokens and directions); order = the least-squares slope of ln(mean gap) over ln ε across `eps` and `epsilon` (1 for a smooth map at small ε); update_ratio = mean ‖g(x)‖ / ‖x‖ (how large the update is beside the residual). Companion `sweep`: gap, gap_std, amplification at every ε over the first `sweep_directions` directions (what `order` is fitted to).";

    fn params() -> Vec<ParamSpec> {
        let mut params = prompt_params();
        params.extend([
            ParamSpec::new(
                "epsilon",
                ParamKind::Float,
                Some("0.05"),
                "the perturbation size of the `gap` column, as a fraction of each token's residual norm",
            ),
            ParamSpec::new(
                "eps",
                ParamKind::List,
                Some("0.01,0.02,0.05,0.1,0.2"),
                "the perturbation sizes of the sweep (companion `sweep`) and of the fitted `order`",
            ),
            ParamSpec::new(
                "directions",
                ParamKind::Int,
                Some("16"),
                "random directions per sequence for the `gap` at `epsilon` (each run twice, +δ and −δ)",
            ),
            ParamSpec::new(
                "sweep_directions",
                ParamKind::Int,
                Some("4"),
                "directions of the sweep at every ε and of `order` (the first of the same directions)",
            ),
            ParamSpec::new("seed", ParamKind::Int, Some("0"), "seed of the random directions"),
            ParamSpec::new(
                "parts",
                ParamKind::List,
                Some("block,attention,mlp"),
                "what to measure: the whole block, its attention sublayer, its MLP sublayer",
            ),
            ParamSpec::new(
                "sample",
                ParamKind::Int,
                Some(&DEFAULT_SAMPLE.to_string()),
                "prompts to measure, taken in turn from each category (0: every prompt of the set)",
            ),
            ParamSpec::layers("layers", "blocks to measure (default: every block)"),
        ]);
        params
    }

    fn work_items(_host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(1)
    }

    fn run(host: &Host, params: &Params, _items: &[usize]) -> Result<DataFrame, PluginError> {
        let settings = Settings::from_params(params)?;
        let model = host.model()?;
        let full = PromptSet::from_params(params)?;
        let set = sample(&full, settings.sample);
        let sequences = host.prompt_sequences(&set, &PromptOptions::from_params(params)?)?;
        let causal = model.family.is_causal();
        let mut measured = Vec::with_capacity(sequences.len());
        for (sequence, prompt) in sequences.iter().zip(&set.prompts) {
            let scored = sequence.scored_positions();
            if scored.is_empty() {
                continue;
            }
            let len = if causal {
                scored.end
            } else {
                sequence.tokens.len()
            };
            measured.push(Measured {
                prompt_index: prompt.index,
                tokens: sequence.tokens[..len].to_vec(),
                scored,
                residuals: Vec::new(),
            });
        }
        if measured.is_empty() {
            return Err(format!("{}: no scored token in the prompts measured", set.name).into());
        }
        let requests: Vec<ForwardRequest> = measured
            .iter()
            .map(|m| ForwardRequest {
                tokens: m.tokens.clone(),
                residuals: true,
                ..Default::default()
            })
            .collect();
        let mut hidden = 0;
        for (m, output) in measured.iter_mut().zip(host.forward_batch(&requests)?) {
            hidden = output.hidden;
            m.residuals = output.residuals;
        }
        let blocks: Vec<usize> = match &settings.layers {
            Some(layers) => layers.clone(),
            None => (0..model.num_layers).collect(),
        };
        let tokens: usize = measured.iter().map(|m| m.scored.len()).sum();
        let mut sums: Vec<BlockSums> = Vec::with_capacity(blocks.len());
        for (done, &layer) in blocks.iter().enumerate() {
            host.check_cancelled()?;
            host.progress(done as u64, blocks.len() as u64, "blocks");
            sums.push(measure_block(host, &settings, &measured, layer, hidden)?);
        }
        host.progress(blocks.len() as u64, blocks.len() as u64, "blocks");

        let mut sweep_rows = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut rows = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for (&layer, block) in blocks.iter().zip(&sums) {
            for &part in &settings.parts {
                let curve: Vec<(f64, f64)> = settings
                    .sweep
                    .iter()
                    .enumerate()
                    .map(|(e, &eps)| (eps, block.sweep[&(part, e)].mean_gap()))
                    .collect();
                for (e, &eps) in settings.sweep.iter().enumerate() {
                    let s = &block.sweep[&(part, e)];
                    sweep_rows.0.push(layer as i64);
                    sweep_rows.1.push(part.name());
                    sweep_rows.2.push(eps);
                    sweep_rows.3.push(s.mean_gap());
                    sweep_rows.4.push(s.std_gap());
                    sweep_rows.5.push(s.mean_amplification());
                }
                let s = &block.gap[&part];
                rows.0.push(layer as i64);
                rows.1.push(part.name());
                rows.2.push(s.mean_gap());
                rows.3.push(s.std_gap());
                rows.4.push(s.mean_amplification());
                rows.5.push(order(&curve));
                rows.6.push(block.update_ratio[&part]);
            }
        }
        host.emit_table(
            "sweep",
            df!(
                "layer" => sweep_rows.0,
                "part" => sweep_rows.1,
                "eps" => sweep_rows.2,
                "gap" => sweep_rows.3,
                "gap_std" => sweep_rows.4,
                "amplification" => sweep_rows.5,
            )?,
        )?;
        let n = rows.0.len();
        Ok(df!(
            "layer" => rows.0,
            "part" => rows.1,
            "gap" => rows.2,
            "gap_std" => rows.3,
            "amplification" => rows.4,
            "order" => rows.5,
            "update_ratio" => rows.6,
            "epsilon" => vec![settings.epsilon; n],
            "directions" => vec![settings.directions as i64; n],
            "sweep_directions" => vec![settings.sweep_directions as i64; n],
            "tokens" => vec![tokens as i64; n],
        )?)
    }
}

/// The input one part of block `layer` sees for one sequence, and the rows
/// of it that are measured.
struct PartInput {
    tokens: Vec<u32>,
    x: Vec<f32>,
    /// Rows of `x` that are scored positions.
    scored: std::ops::Range<usize>,
    /// Which sequence of `measured`.
    sequence: usize,
}

/// Every (part, ε) sum and every part's update ratio of block `layer`.
fn measure_block(
    host: &Host,
    settings: &Settings,
    measured: &[Measured],
    layer: usize,
    hidden: usize,
) -> Result<BlockSums, PluginError> {
    let run = |part: Part, tokens: &[u32], start: Vec<f32>| ForwardRequest {
        tokens: tokens.to_vec(),
        blocks: Some(vec![layer]),
        start: Some(start),
        sublayer: part.sublayer(),
        ..Default::default()
    };
    // The block's midpoint, which the MLP sublayer sees: the attention
    // sublayer's output on the block's input.
    let midpoints: Vec<Vec<f32>> = if settings.parts.contains(&Part::Mlp) {
        let requests: Vec<ForwardRequest> = measured
            .iter()
            .map(|m| run(Part::Attention, &m.tokens, m.residuals[layer].clone()))
            .collect();
        host.forward_batch(&requests)?
            .into_iter()
            .map(|o| o.output)
            .collect()
    } else {
        Vec::new()
    };
    let mut sums = BlockSums::default();
    for &part in &settings.parts {
        let inputs: Vec<PartInput> = measured
            .iter()
            .enumerate()
            .map(|(i, m)| match part {
                // Pointwise: the scored rows alone.
                Part::Mlp => PartInput {
                    tokens: m.tokens[m.scored.clone()].to_vec(),
                    x: midpoints[i][m.scored.start * hidden..m.scored.end * hidden].to_vec(),
                    scored: 0..m.scored.len(),
                    sequence: i,
                },
                _ => PartInput {
                    tokens: m.tokens.clone(),
                    x: m.residuals[layer].clone(),
                    scored: m.scored.clone(),
                    sequence: i,
                },
            })
            .collect();
        let base: Vec<Vec<f32>> = host
            .forward_batch(
                &inputs
                    .iter()
                    .map(|p| run(part, &p.tokens, p.x.clone()))
                    .collect::<Vec<_>>(),
            )?
            .into_iter()
            .map(|o| o.output)
            .collect();
        let (mut ratio_sum, mut ratio_count) = (0.0, 0.0);
        for (p, out) in inputs.iter().zip(&base) {
            for t in p.scored.clone() {
                let rows = t * hidden..(t + 1) * hidden;
                ratio_sum += update_ratio(&p.x[rows.clone()], &out[rows]);
                ratio_count += 1.0;
            }
        }
        sums.update_ratio.insert(part, ratio_sum / ratio_count);
        // Each sequence's directions, the same at every ε.
        let dirs: Vec<Vec<Vec<f32>>> = inputs
            .iter()
            .map(|p| {
                let m = &measured[p.sequence];
                (0..settings.directions.max(settings.sweep_directions))
                    .map(|k| {
                        let all = directions(
                            settings.seed,
                            stream(m.prompt_index, k),
                            m.tokens.len(),
                            hidden,
                        );
                        match part {
                            Part::Mlp => {
                                all[m.scored.start * hidden..m.scored.end * hidden].to_vec()
                            }
                            _ => all,
                        }
                    })
                    .collect()
            })
            .collect();
        for (e, &eps) in settings.sweep.iter().enumerate() {
            host.check_cancelled()?;
            let at_epsilon = eps == settings.epsilon;
            let used = if at_epsilon {
                settings.directions.max(settings.sweep_directions)
            } else {
                settings.sweep_directions
            };
            // Per (sequence, direction): the run at x + δ, then at x − δ.
            let mut owners: Vec<(usize, usize)> = Vec::new();
            let mut requests: Vec<ForwardRequest> = Vec::new();
            for (i, p) in inputs.iter().enumerate() {
                for (k, dir) in dirs[i].iter().take(used).enumerate() {
                    for start in perturbed(&p.x, dir, hidden, eps) {
                        requests.push(run(part, &p.tokens, start));
                    }
                    owners.push((i, k));
                }
            }
            let outputs = host.forward_batch(&requests)?;
            let mut sweep = GapSums::default();
            let mut gap = GapSums::default();
            for ((&(i, k), pair), runs) in owners
                .iter()
                .zip(outputs.chunks_exact(2))
                .zip(requests.chunks_exact(2))
            {
                let p = &inputs[i];
                let plus = runs[0].start.as_deref().unwrap_or_default();
                for t in p.scored.clone() {
                    let rows = t * hidden..(t + 1) * hidden;
                    let row = Rows {
                        x: &p.x[rows.clone()],
                        x_plus: &plus[rows.clone()],
                        out: &base[i][rows.clone()],
                        out_plus: &pair[0].output[rows.clone()],
                        out_minus: &pair[1].output[rows],
                    };
                    if k < settings.sweep_directions {
                        sweep.add(row);
                    }
                    if at_epsilon && k < settings.directions {
                        gap.add(row);
                    }
                }
            }
            sums.sweep.insert((part, e), sweep);
            if at_epsilon {
                sums.gap.insert(part, gap);
            }
        }
    }
    Ok(sums)
}

export_plugin!(Linearity);
