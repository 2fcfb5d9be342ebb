//! `shuffle`: recover the order of a checkpoint's blocks when their names
//! no longer say it (`docs/metrics.md`, "Layer order").
//!
//! Weight-only methods (the published comparison's): `norm_gain`, `weight_stats`,
//! `cosine`, `svd_spectrum`, `fiedler`, `ensemble_rank`; chains are open-path
//! TSP (nearest neighbour from every start, 2-opt) oriented so the total
//! weight norm grows with depth. Forward-pass methods (`flow.rs`): `flow`,
//! `flow_random`, `loss_bubble`, `flow_insert` and the default `flow_repair`.
//! README.md says which signal carries the order and why.

pub mod flow;
use flow::{Probe, Reading};
pub mod order;
pub mod weights;

use std::collections::BTreeMap;
use std::time::Instant;

use probe_sdk::prelude::*;

const PROMPTS: &str = include_str!("../../../probes/prompts.txt");
/// Text trained models have memorised: the repair's loss is sharpest there.
const MEMORIZED: &str = include_str!("../../../probes/memorized.txt");
/// The methods that read weights only (they share one read of every matrix).
const WEIGHT_ONLY: [&str; 6] = [
    "norm_gain",
    "weight_stats",
    "cosine",
    "svd_spectrum",
    "fiedler",
    "ensemble_rank",
];
/// The methods that run forward passes through the host's engine.
const FORWARD: [&str; 5] = [
    "flow",
    "flow_random",
    "loss_bubble",
    "flow_insert",
    "flow_repair",
];
/// What `methods` runs unless told: the pipeline that recovers the order.
const DEFAULT_METHODS: &str = "flow_repair";

struct Shuffle;

fn all_methods() -> impl Iterator<Item = &'static str> {
    WEIGHT_ONLY.iter().chain(FORWARD.iter()).copied()
}

/// Whether the engine can compute a next-token loss for this model: an
/// encoder checkpoint (BERT) carries no language-model head.
fn has_output_head(model: &ModelInfo) -> bool {
    model.family.is_decoder()
}

/// What the weights say about each block.
struct Blocks {
    n: usize,
    /// Per block: [‖W‖_F, mean, std, max|W|] of each matrix role, in role order.
    stats: Vec<Vec<f64>>,
    /// Pairwise dot products and squared norms of the blocks' concatenated matrices.
    dots: Vec<Vec<f64>>,
    /// Mean input-norm gain per block, where the family has one.
    gain: Vec<Option<f64>>,
    /// Total Frobenius norm of each block's matrices (the orientation trend).
    total_norm: Vec<f64>,
    /// Per block: the top singular values of each of `SPECTRUM_ROLES` it has,
    /// when asked for.
    spectra: Vec<Vec<f64>>,
}

fn read_blocks(host: &Host, n: usize, spectra: bool) -> Result<Blocks, PluginError> {
    let mut by_role: BTreeMap<Role, Vec<Option<Matrix>>> = BTreeMap::new();
    for matrix in host.matrices()? {
        if let Some(layer) = matrix.layer.filter(|&l| l < n) {
            let slot = by_role.entry(matrix.role).or_insert_with(|| vec![None; n]);
            slot[layer] = Some(matrix);
        }
    }
    let mut stats = vec![Vec::new(); n];
    let mut dots = vec![vec![0.0; n]; n];
    let mut total_sq = vec![0.0; n];
    let mut spectrum = vec![Vec::new(); n];
    for (role, matrices) in &by_role {
        if matrices.iter().any(Option::is_none) {
            continue; // a role not in every block says nothing about order
        }
        host.check_cancelled()?;
        let values: Vec<MatrixValues> = matrices
            .iter()
            .map(|m| host.matrix_f32(m.as_ref().expect("checked")))
            .collect::<Result<_, _>>()?;
        if values.iter().any(|v| v.len() != values[0].len()) {
            host.warn(&format!("role {role}: blocks differ in shape; left out"));
            continue;
        }
        for (b, v) in values.iter().enumerate() {
            let len = v.len().max(1) as f64;
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            let sq: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
            let mean = sum / len;
            let max = v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
            stats[b].extend([
                sq.sqrt(),
                mean,
                (sq / len - mean * mean).max(0.0).sqrt(),
                max,
            ]);
            total_sq[b] += sq;
        }
        if spectra && weights::SPECTRUM_ROLES.contains(&role.as_str()) {
            for (b, (v, m)) in values.iter().zip(matrices).enumerate() {
                let m = m.as_ref().expect("checked");
                let sigma = weights::top_singular_values(v, m.stored_rows, m.stored_cols)
                    .map_err(|e| format!("{}: {e}", m.name))?;
                spectrum[b].extend(sigma);
            }
        }
        for i in 0..n {
            for j in i..n {
                let d: f64 = values[i]
                    .iter()
                    .zip(values[j].iter())
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                dots[i][j] += d;
                dots[j][i] = dots[i][j];
            }
        }
    }
    let mut gain = vec![None; n];
    for tensor in host.tensors()? {
        if let (Some(layer), Role::AttnNorm, false) = (tensor.layer, tensor.role, tensor.bias) {
            if layer < n {
                let v = host.tensor_f32(tensor.index)?;
                gain[layer] =
                    Some(v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64);
            }
        }
    }
    Ok(Blocks {
        n,
        stats,
        dots,
        gain,
        total_norm: total_sq.iter().map(|s| s.sqrt()).collect(),
        spectra: spectrum,
    })
}

fn cosine_distance(blocks: &Blocks) -> Vec<Vec<f64>> {
    let d = &blocks.dots;
    (0..blocks.n)
        .map(|i| {
            (0..blocks.n)
                .map(|j| 1.0 - d[i][j] / (d[i][i] * d[j][j]).sqrt().max(1e-300))
                .collect()
        })
        .collect()
}

fn norm_gain_order(blocks: &Blocks) -> Option<Vec<usize>> {
    let gain: Vec<f64> = blocks.gain.iter().copied().collect::<Option<_>>()?;
    let mut path: Vec<usize> = (0..blocks.n).collect();
    path.sort_by(|&a, &b| gain[a].total_cmp(&gain[b]));
    Some(order::orient(path, &blocks.total_norm))
}

fn weight_stats_order(blocks: &Blocks) -> Vec<usize> {
    let distance = weights::standardized_distance(&blocks.stats);
    order::orient(order::tsp_path(&distance), &blocks.total_norm)
}

fn cosine_order(blocks: &Blocks) -> Vec<usize> {
    order::orient(
        order::tsp_path(&cosine_distance(blocks)),
        &blocks.total_norm,
    )
}

fn svd_spectrum_order(blocks: &Blocks) -> Vec<usize> {
    let distance = weights::standardized_distance(&blocks.spectra);
    order::orient(order::tsp_path(&distance), &blocks.total_norm)
}

fn fiedler_order(blocks: &Blocks) -> Result<Vec<usize>, PluginError> {
    let distance = weights::standardized_distance(&blocks.stats);
    Ok(order::orient(
        weights::fiedler_order(&distance)?,
        &blocks.total_norm,
    ))
}

/// What a method measured of each block's place, by position of its chain
/// (or by stored block, after [`Measured::by_block`]).
struct Measured {
    /// The margin of the block's place (the `confidence` column).
    margins: Vec<f64>,
    /// Whether the place counts as sure; `None`: not judged.
    sure: Vec<Option<bool>>,
    /// The margin of the block's place on text the search did not see
    /// (`flow::cross_check`); `None`: not measured.
    held_out: Vec<Option<f64>>,
    /// What the run should warn of these places (the loss at chance, or the
    /// prompts disagree).
    warning: Option<String>,
}

impl Measured {
    /// Margins nothing judges.
    fn unjudged(margins: Vec<f64>) -> Self {
        let (sure, held_out) = (vec![None; margins.len()], vec![None; margins.len()]);
        Self {
            margins,
            sure,
            held_out,
            warning: None,
        }
    }

    /// The same, by stored block: `path[p]` is the block at position p.
    fn by_block(self, path: &[usize]) -> Self {
        let n = path.len();
        let mut by_block = Self {
            margins: vec![0.0; n],
            sure: vec![None; n],
            held_out: vec![None; n],
            warning: self.warning,
        };
        for (p, &b) in path.iter().enumerate() {
            by_block.margins[b] = self.margins[p];
            by_block.sure[b] = self.sure[p];
            by_block.held_out[b] = self.held_out[p];
        }
        by_block
    }
}

/// The places of the chain `flow_repair` chose, measured: their margins on
/// the repair text, the prompts' cross-check (`check_text`; moot when the
/// loss is at chance: then flow's chain stands and nothing is sure), and
/// whether each place is sure, and the warning when the loss is at chance or
/// the prompts disagree.
fn measure_places(
    host: &Host,
    (repair_text, check_text): (&[u32], &[u32]),
    repaired_chain: &flow::RepairedChain,
) -> Result<Measured, PluginError> {
    let repaired = &repaired_chain.repaired;
    let check = if repaired.informative {
        Some(flow::cross_check(
            host,
            check_text,
            &repaired.path,
            repaired.reading,
        )?)
    } else {
        None
    };
    let agrees = check.as_ref().is_some_and(flow::CrossCheck::agrees);
    let disagree = check.as_ref().filter(|c| !c.agrees()).map(|check| {
        let (p, m) = check
            .margins
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        format!(
            "flow_repair: the prompts disagree with the repair text: a swap of stored block {} (position {p}) with a neighbour lowers their loss by {:.1} % (the chain's loss on {} tokens of them: {:.4}). The repair text's loss has its least value away from this model's true order, so no block's place is sure",
            repaired.path[p],
            -m * 100.0,
            check_text.len(),
            check.loss
        )
    });
    let warning = repaired.at_chance.clone().or(disagree);
    let margins = flow::place_margins(host, repair_text, repaired_chain)?;
    let sure = margins
        .iter()
        .map(|&m| Some(repaired.informative && agrees && m >= flow::SURE_MARGIN))
        .collect();
    let held_out = match check {
        Some(check) => check.margins.into_iter().map(Some).collect(),
        None => vec![None; margins.len()],
    };
    Ok(Measured {
        margins,
        sure,
        held_out,
        warning,
    })
}

/// How a reading is named in the log.
fn reading_name(reading: Reading) -> &'static str {
    match reading {
        Reading::Blocks => "the config read as describing blocks",
        Reading::Positions => "the config read as describing positions",
    }
}

/// The log's prefix for a step run under `reading`: the reading named only
/// where the config gives blocks different kinds.
fn step_name(reading: Reading, kinds_differ: bool) -> String {
    match kinds_differ {
        true => format!("flow_repair ({})", reading_name(reading)),
        false => "flow_repair".into(),
    }
}

/// What a repair did, for the log.
fn repair_summary(repaired: &flow::Repaired) -> String {
    let wide = match repaired.wide_moves {
        0 => String::new(),
        w => format!(", then {w} moves within {} places", flow::WIDE_WINDOW),
    };
    format!(
        "kept {} moves{wide} in {} rounds ({} candidate orders scored, loss {:.4})",
        repaired.kept, repaired.rounds, repaired.tried, repaired.loss
    )
}

/// `flow`'s chain repaired by the loss (`flow::repair`), the blocks
/// taking their kinds as `reading` says; logs what it did.
fn flow_repair(
    host: &Host,
    (text, repair_text): (&[u32], &[u32]),
    n: usize,
    prune: bool,
    (reading, kinds_differ): (Reading, bool),
) -> Result<flow::RepairedChain, PluginError> {
    let start = Instant::now();
    let (seed, steps) = flow::flow(host, text, n, Probe::Text, prune, reading)?;
    let flow_seconds = start.elapsed().as_secs_f64();
    let moves = flow::runner_up_moves(&steps);
    let repaired = flow::repair(host, repair_text, seed, &moves, reading)?;
    host.info(&format!(
        "{}: flow {flow_seconds:.2} s; repair over {} runner-up moves {} in {:.2} s",
        step_name(reading, kinds_differ),
        moves.len(),
        repair_summary(&repaired.repaired),
        start.elapsed().as_secs_f64() - flow_seconds
    ));
    Ok(repaired)
}

/// `first`'s chain repaired again with the blocks taking their kinds as
/// `reading` says: the pipeline under another reading of the config,
/// started where the first reading ended rather than from a `flow` of its
/// own. At texts shorter than Gemma 3's sliding window the readings differ
/// only in the rotary table, so the first reading's chain is most of the
/// way; on Gemma 3 270M this costs 0.3 s against 5.5 s for a repair from
/// flow (where the first reading is the right one it keeps nothing).
fn repair_again(
    host: &Host,
    repair_text: &[u32],
    first: &flow::RepairedChain,
    reading: Reading,
) -> Result<flow::RepairedChain, PluginError> {
    let start = Instant::now();
    let repaired = flow::repair(host, repair_text, first.repaired.path.clone(), &[], reading)?;
    host.info(&format!(
        "flow_repair ({}): from the chain with {}, repair {} in {:.2} s",
        reading_name(reading),
        reading_name(first.repaired.reading),
        repair_summary(&repaired.repaired),
        start.elapsed().as_secs_f64()
    ));
    Ok(repaired)
}

/// The default pipeline under each reading of the config worth running
/// (`Reading::candidates`), and the places of the chain that stands.
/// `texts`: `flow`'s tokens of the prompts, the repair text, and the
/// prompts' tokens of the cross-check.
///
/// The first reading runs from `flow`; each other one first repairs the
/// chain it ended at (`repair_again`), and the prompts (text neither search
/// was judged on) decide between the two chains. When the first chain wins
/// and every place of it is sure, it stands. Otherwise the other reading
/// also runs from a `flow` of its own, and the lowest loss on the prompts
/// of the three stands: a repair from a chain the wrong reading found can
/// end at a wrong chain of its own (Gemma 3 270M, config kept, read first as
/// describing blocks: on seeds 7 and 10 it ended with 6 and 7 blocks
/// wrong). When the chain that stands leaves the loss at chance, the
/// `fallback` reading (the one `Reading::candidates` left out) runs from
/// its own `flow`, and stands if its loss is informative and lower on the
/// prompts.
fn repair_under_readings(
    host: &Host,
    (text, repair_text, check_text): (&[u32], &[u32], &[u32]),
    n: usize,
    prune: bool,
    (readings, fallback): (&[Reading], Option<Reading>),
    kinds_differ: bool,
) -> Result<(flow::RepairedChain, Measured), PluginError> {
    let held_out = |r: &flow::RepairedChain| -> Result<f64, PluginError> {
        flow::chain_loss(host, text, &r.repaired.path, r.repaired.reading)
    };
    let measure = |r: &flow::RepairedChain| measure_places(host, (repair_text, check_text), r);
    let mut best = flow_repair(
        host,
        (text, repair_text),
        n,
        prune,
        (readings[0], kinds_differ),
    )?;
    let mut places = None;
    for &reading in &readings[1..] {
        let again = repair_again(host, repair_text, &best, reading)?;
        let mut candidates = vec![(held_out(&best)?, best), (held_out(&again)?, again)];
        // The first chain's places, when it won and was measured for that.
        let mut first_places = None;
        if candidates[0].0 <= candidates[1].0 {
            let first = measure(&candidates[0].1)?;
            if first.sure.iter().all(|&s| s == Some(true)) {
                log_losses(host, &candidates);
                places = Some(first);
                best = candidates.swap_remove(0).1;
                continue;
            }
            first_places = Some(first);
        }
        let own = flow_repair(host, (text, repair_text), n, prune, (reading, kinds_differ))?;
        candidates.push((held_out(&own)?, own));
        log_losses(host, &candidates);
        let winner = (0..candidates.len())
            .min_by(|&a, &b| candidates[a].0.total_cmp(&candidates[b].0))
            .unwrap_or(0);
        places = first_places.filter(|_| winner == 0);
        best = candidates.swap_remove(winner).1;
    }
    if let (false, Some(reading)) = (best.repaired.informative, fallback) {
        // The reading the config's list suggested leaves the loss at chance:
        // the list may be one a shuffle moved with its blocks that happens
        // to repeat a period shifted from the model's own (Gemma 3 270M,
        // seed 106: the global blocks listed at 0, 6, 12).
        let own = flow_repair(host, (text, repair_text), n, prune, (reading, kinds_differ))?;
        let mut candidates = vec![(held_out(&best)?, best), (held_out(&own)?, own)];
        log_losses(host, &candidates);
        if candidates[1].0 < candidates[0].0 && candidates[1].1.repaired.informative {
            places = None;
            best = candidates.swap_remove(1).1;
        } else {
            best = candidates.swap_remove(0).1;
        }
    }
    let places = match places {
        Some(places) => places,
        None => measure(&best)?,
    };
    Ok((best, places))
}

/// Logs the candidate chains' losses on the prompts.
fn log_losses(host: &Host, candidates: &[(f64, flow::RepairedChain)]) {
    let losses: Vec<String> = candidates
        .iter()
        .map(|(loss, r)| format!("{loss:.4} ({})", reading_name(r.repaired.reading)))
        .collect();
    host.info(&format!(
        "flow_repair: the chains' losses on the prompts: {}",
        losses.join(", ")
    ));
}

impl Plugin for Shuffle {
    const NAME: &'static str = "shuffle";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "Recover the order of shuffled blocks (weight-only and forward-pass methods)";
    const DESCRIPTION: &'static str = "One row per (method, stored block): recovered_position; confidence, the block's measured margin (flow_repair: the least relative rise of the repair text's loss when the block trades places with a neighbour; flow, or a model without a head: how far the runner-up at its depth stood behind it); sure, whether flow_repair's loss is informative, that margin at least 1 % and the prompts agree; held_out_margin, the same margin on 128 tokens of the prompts, which the search never saw (the prompts agree when no swap lowers their loss by 1 % or more); agreement, the share of the methods run that put it at the same position; true_position when the checkpoint records its permutation (probe shuffle). The companion table `methods` holds Kendall tau, accuracy, mean |displacement| and seconds per method.";

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::new(
                "methods",
                ParamKind::List,
                Some(DEFAULT_METHODS),
                "methods to run (`all` for every one): norm_gain, weight_stats, cosine, svd_spectrum, fiedler, ensemble_rank, flow, flow_random, loss_bubble, flow_insert, flow_repair",
            ),
            ParamSpec::new(
                "flow_tokens",
                ParamKind::Int,
                Some("64"),
                "probe-text tokens each block is run on while `flow` builds the chain",
            ),
            ParamSpec::new(
                "flow_prune",
                ParamKind::Bool,
                Some("true"),
                "flow: skip a block predicted beyond 2x the best relative update at a depth (false: score every block at every depth)",
            ),
            ParamSpec::new(
                "loss_tokens",
                ParamKind::Int,
                Some("256"),
                "probe-text tokens whose next-token loss scores an order (loss_bubble, flow_insert)",
            ),
            ParamSpec::choice(
                "repair_text",
                &["memorized", "prompts"],
                "memorized",
                "flow_repair: the built-in text whose loss judges a move (probes/memorized.txt or probes/prompts.txt)",
            ),
            ParamSpec::new(
                "repair_tokens",
                ParamKind::Int,
                Some("24"),
                "flow_repair: how many tokens of the repair text the loss is taken on",
            ),
            ParamSpec::choice(
                "config_reading",
                &["auto", "blocks", "positions", "both"],
                "auto",
                "flow_repair, where the config gives blocks different kinds (Gemma 3's sliding and full attention): whether its entries describe the stored blocks (a config moved with them), the positions (a config kept when the tensors were renamed), or both to be tried; auto: positions when the kinds repeat a period, else both",
            ),
            ParamSpec::new(
                "write",
                ParamKind::Str,
                Some(""),
                "write the checkpoint with its blocks put in the order of the first method run into this folder",
            ),
            ParamSpec::new(
                "window",
                ParamKind::Int,
                Some("4"),
                "flow_insert: how many places a block may move in one step",
            ),
        ]
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        if items.is_empty() {
            return Ok(DataFrame::empty());
        }
        let model = host.model()?;
        let n = model.num_layers;
        if n < 2 {
            return Err(format!("{n} blocks: there is no order to recover").into());
        }
        let truth: Option<Vec<usize>> = model
            .metadata
            .get("probe.shuffle.true_position")
            .and_then(|t| serde_json::from_str(t).ok())
            .filter(|t: &Vec<usize>| t.len() == n);
        let mut methods = params.list("methods").unwrap_or_default();
        if methods.iter().any(|m| m == "all") {
            methods = all_methods().map(String::from).collect();
        }
        if let Some(unknown) = methods
            .iter()
            .find(|m| !all_methods().any(|known| known == m.as_str()))
        {
            return Err(format!(
                "unknown method `{unknown}` (methods: {})",
                all_methods().collect::<Vec<_>>().join(", ")
            )
            .into());
        }
        let flow_tokens = params.int("flow_tokens")?.max(2) as usize;
        let loss_tokens = params.int("loss_tokens")?.max(2) as usize;
        let window = params.int("window")?.max(1) as usize;
        let prune = params.bool("flow_prune")?;
        let repair_tokens = params.int("repair_tokens")?.max(2) as usize;
        let repair_source = match params.str("repair_text")? {
            "prompts" => PROMPTS,
            _ => MEMORIZED,
        };
        let text_cell: std::cell::OnceCell<flow::ProbeText> = std::cell::OnceCell::new();
        let probe_text = || -> Result<&flow::ProbeText, PluginError> {
            if let Some(text) = text_cell.get() {
                return Ok(text);
            }
            let longest = flow_tokens.max(loss_tokens).max(flow::CROSS_CHECK_TOKENS);
            let text = flow::ProbeText::new(host, PROMPTS, longest)?;
            Ok(text_cell.get_or_init(|| text))
        };
        let repair_cell: std::cell::OnceCell<flow::ProbeText> = std::cell::OnceCell::new();
        let repair_text = || -> Result<&flow::ProbeText, PluginError> {
            if let Some(text) = repair_cell.get() {
                return Ok(text);
            }
            let text = flow::ProbeText::new(host, repair_source, repair_tokens)?;
            Ok(repair_cell.get_or_init(|| text))
        };
        // The weight-only methods share one read of every matrix.
        let needs_weights = methods.iter().any(|m| WEIGHT_ONLY.contains(&m.as_str()));
        let needs_spectra = methods
            .iter()
            .any(|m| m == "svd_spectrum" || m == "ensemble_rank");
        let started = Instant::now();
        let blocks = if needs_weights {
            Some(read_blocks(host, n, needs_spectra)?)
        } else {
            None
        };
        let read_seconds = started.elapsed().as_secs_f64();

        // Blocks of different kinds (Gemma 3's sliding and full attention)
        // make the config's reading matter.
        let kinds_differ = model.block_kinds.windows(2).any(|w| w[0] != w[1]);
        // The reading tried as well when the ones chosen leave the loss at
        // chance (`auto` only: a reading the user named is theirs).
        let (readings, fallback) = match params.str("config_reading")? {
            _ if !kinds_differ => (&[Reading::Blocks][..], None),
            "blocks" => (&[Reading::Blocks][..], None),
            "positions" => (&[Reading::Positions][..], None),
            "both" => (&[Reading::Blocks, Reading::Positions][..], None),
            _ => {
                let readings = Reading::candidates(&model.block_kinds);
                let fallback = [Reading::Blocks, Reading::Positions]
                    .into_iter()
                    .find(|r| !readings.contains(r));
                (readings, fallback)
            }
        };
        let mut results: Vec<(String, Vec<usize>, f64)> = Vec::new();
        // Per method run, by position of its chain: the measured margin of
        // the block there, and whether it counts as sure (`None`: not
        // judged).
        let mut margins: Vec<Option<Measured>> = Vec::new();
        for method in &methods {
            let mut measured: Option<Measured> = None;
            let start = Instant::now();
            let weights = || blocks.as_ref().ok_or("the weights were not read");
            let path = match method.as_str() {
                "norm_gain" => match norm_gain_order(weights()?) {
                    Some(path) => path,
                    None => {
                        host.warn("norm_gain: no input-norm gain in every block; skipped");
                        continue;
                    }
                },
                "weight_stats" => weight_stats_order(weights()?),
                "cosine" => cosine_order(weights()?),
                "svd_spectrum" => svd_spectrum_order(weights()?),
                "fiedler" => fiedler_order(weights()?)?,
                "ensemble_rank" => {
                    let blocks = weights()?;
                    let mut orders = vec![
                        weight_stats_order(blocks),
                        cosine_order(blocks),
                        svd_spectrum_order(blocks),
                        fiedler_order(blocks)?,
                    ];
                    orders.extend(norm_gain_order(blocks));
                    weights::ensemble_order(&orders)
                }
                "flow" => {
                    let (path, steps) = flow::flow(
                        host,
                        probe_text()?.head(flow_tokens),
                        n,
                        Probe::Text,
                        prune,
                        Reading::Blocks,
                    )?;
                    measured = Some(Measured::unjudged(flow::flow_margins(&steps)));
                    path
                }
                "flow_random" => {
                    flow::flow(
                        host,
                        probe_text()?.head(flow_tokens),
                        n,
                        Probe::Gaussian,
                        prune,
                        Reading::Blocks,
                    )?
                    .0
                }
                "flow_repair" => {
                    let text = probe_text()?.head(flow_tokens);
                    if has_output_head(&model) {
                        let texts = (
                            text,
                            repair_text()?.head(repair_tokens),
                            probe_text()?.head(flow::CROSS_CHECK_TOKENS),
                        );
                        let (repaired, places) = repair_under_readings(
                            host,
                            texts,
                            n,
                            prune,
                            (readings, fallback),
                            kinds_differ,
                        )?;
                        if let Some(warning) = &places.warning {
                            host.warn(warning);
                        }
                        measured = Some(places);
                        repaired.repaired.path
                    } else {
                        // No loss to check moves by, nor to measure a place
                        // with: flow's own margins, judged by nothing.
                        let (seed, steps) =
                            flow::flow(host, text, n, Probe::Text, prune, Reading::Blocks)?;
                        measured = Some(Measured::unjudged(flow::flow_margins(&steps)));
                        seed
                    }
                }
                "loss_bubble" | "flow_insert" if !has_output_head(&model) => {
                    host.warn(&format!(
                        "{method}: a {} checkpoint has no language-model head to score orders by; skipped",
                        model.family
                    ));
                    continue;
                }
                "loss_bubble" | "flow_insert" => {
                    let text = probe_text()?;
                    let (seed, _) = flow::flow(
                        host,
                        text.head(flow_tokens),
                        n,
                        Probe::Text,
                        prune,
                        Reading::Blocks,
                    )?;
                    let window = if method == "loss_bubble" { 1 } else { window };
                    flow::insert(host, text.head(loss_tokens), seed, window, Reading::Blocks)?.0
                }
                other => return Err(format!("unknown method `{other}`").into()),
            };
            let weight_only = WEIGHT_ONLY.contains(&method.as_str());
            let seconds =
                start.elapsed().as_secs_f64() + if weight_only { read_seconds } else { 0.0 };
            if let Some(Measured { sure, .. }) = &measured {
                let unsure: Vec<usize> = (0..n).filter(|&p| sure[p] == Some(false)).collect();
                if !unsure.is_empty() {
                    host.warn(&format!(
                        "{method}: {} of {n} blocks are not sure of their place (stored blocks {:?} at positions {unsure:?}): a swap with a neighbour costs under {:.0} % of the loss, the loss cannot judge an order, or the prompts disagree with the chain",
                        unsure.len(),
                        unsure.iter().map(|&p| path[p]).collect::<Vec<_>>(),
                        flow::SURE_MARGIN * 100.0
                    ));
                }
            }
            margins.push(measured.map(|m| m.by_block(&path)));
            results.push((method.clone(), order::positions(&path), seconds));
        }

        let (mut method_col, mut stored_col, mut recovered_col, mut truth_col) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut confidence_col, mut sure_col, mut held_out_col, mut agreement_col) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((method, positions, _), measured) in results.iter().zip(&margins) {
            for s in 0..n {
                let agree = results
                    .iter()
                    .filter(|(_, p, _)| p[s] == positions[s])
                    .count();
                method_col.push(method.clone());
                stored_col.push(s as i64);
                recovered_col.push(positions[s] as i64);
                // An infinite margin (no alternative) is written as null.
                confidence_col.push(
                    measured
                        .as_ref()
                        .map(|m| m.margins[s])
                        .filter(|m| m.is_finite()),
                );
                sure_col.push(measured.as_ref().and_then(|m| m.sure[s]));
                held_out_col.push(
                    measured
                        .as_ref()
                        .and_then(|m| m.held_out[s])
                        .filter(|m| m.is_finite()),
                );
                agreement_col.push(agree as f64 / results.len() as f64);
                truth_col.push(truth.as_ref().map(|t| t[s] as i64));
            }
        }
        let summary = df!(
            "method" => results.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            "kendall_tau" => results.iter().map(|r| truth.as_ref().map(|t| order::kendall_tau(&r.1, t))).collect::<Vec<_>>(),
            "accuracy" => results.iter().map(|r| truth.as_ref().map(|t| order::accuracy(&r.1, t))).collect::<Vec<_>>(),
            "mean_displacement" => results.iter().map(|r| truth.as_ref().map(|t| order::mean_displacement(&r.1, t))).collect::<Vec<_>>(),
            "seconds" => results.iter().map(|r| r.2).collect::<Vec<_>>()
        )?;
        host.emit_table("methods", summary)?;
        let write = params.str("write")?;
        if let (false, Some((method, positions, _))) = (write.is_empty(), results.first()) {
            // The truth travels only while the written copy still holds a
            // shuffle: relative to the repaired order, block b's true
            // position is truth[b].
            let mut metadata = model.metadata.clone();
            metadata.remove("probe.shuffle.true_position");
            metadata.remove("probe.shuffle.seed");
            if let Some(truth) = &truth {
                let mut relative = vec![0; n];
                for (b, &p) in positions.iter().enumerate() {
                    relative[p] = truth[b];
                }
                if relative.iter().enumerate().any(|(i, &t)| i != t) {
                    metadata.insert(
                        "probe.shuffle.true_position".into(),
                        serde_json::to_string(&relative).unwrap_or_default(),
                    );
                }
            }
            metadata.insert("probe.shuffle.repaired_by".into(), method.clone());
            host.write_reordered(std::path::Path::new(write), positions, &metadata)?;
            host.info(&format!(
                "wrote {write} with the blocks in `{method}`'s order"
            ));
        }
        Ok(df!(
            "method" => method_col,
            "stored_index" => stored_col,
            "recovered_position" => recovered_col,
            "confidence" => confidence_col,
            "sure" => sure_col,
            "held_out_margin" => held_out_col,
            "agreement" => agreement_col,
            "true_position" => truth_col
        )?)
    }
}

export_plugin!(Shuffle);
