//! `patch`: activation patching. For each pair of prompts of the same length
//! — a clean one and a corrupted one that the model answers differently —
//! copy one activation (the residual entering a block, a sublayer's output,
//! or one head's output, at one position) from one run into the other and
//! measure how much of the clean answer's logit difference comes back
//! (`denoise`) or goes (`noise`).
//!
//! A patch at block l leaves every block before it as it was, so each
//! patched run starts from the base run's residual before block l and runs
//! only blocks l … L−1; a patch whose value equals what is already there
//! (a position before the first token the prompts differ in, where a causal
//! model's activations are identical) is not run: its effect is exactly 0.
//! The runs of one pair and block share everything before the patched
//! position, and the engine runs only the rows from there on, over the keys
//! and values it caches from one unedited run (the engine's `suffix`).
//! Only each run's last residual row reaches the plugin's measures; logits
//! are reduced in the host (`lens_reduce`).

pub mod pairs;

use std::collections::BTreeMap;

use probe_sdk::prelude::*;

use pairs::{tokenize, PairSet, TokenPair};

/// Patched runs sent to the host in one forward batch.
const BATCH_REQUESTS: usize = 2048;

/// Pairs whose clean and corrupted runs are held at once; their patched
/// runs go to the host together, so runs of one length from several pairs
/// share session runs.
const PAIRS_PER_GROUP: usize = 16;

/// The last row `[hidden]` of a `[t, hidden]` residual.
fn last_row(residual: &[f32], t: usize, hidden: usize) -> Vec<f32> {
    residual[(t - 1) * hidden..t * hidden].to_vec()
}

/// A pair ready to patch: its two runs, its scores, its sites.
struct Prepared<'a> {
    pair: &'a pairs::Pair,
    tokens: &'a TokenPair,
    category: String,
    ld_clean: f64,
    ld_corrupt: f64,
    /// KL(p_clean ‖ p_corrupt) at the last position.
    kl_corrupt: f64,
    t: usize,
    shape: Shape,
    sites: Vec<Site>,
    /// The sites whose value differs between the runs (the others are no-ops).
    moved: Vec<usize>,
    clean: ForwardOutput,
    corrupt: ForwardOutput,
}

impl Prepared<'_> {
    /// The run that is patched, the run values come from, and the base
    /// run's tokens.
    fn base_and_source(&self, denoise: bool) -> (&ForwardOutput, &ForwardOutput, &[u32]) {
        if denoise {
            (&self.corrupt, &self.clean, &self.tokens.corrupt)
        } else {
            (&self.clean, &self.corrupt, &self.tokens.clean)
        }
    }
}

/// What is patched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Component {
    /// The residual entering block l (`resid_pre`).
    Resid,
    /// Block l's attention output (`attn_out`).
    Attn,
    /// Block l's MLP output (`mlp_out`).
    Mlp,
    /// One head's output in block l, before the output projection (`z`).
    Heads,
}

impl Component {
    const ALL: [Component; 4] = [
        Component::Resid,
        Component::Attn,
        Component::Mlp,
        Component::Heads,
    ];

    fn name(self) -> &'static str {
        match self {
            Component::Resid => "resid",
            Component::Attn => "attn",
            Component::Mlp => "mlp",
            Component::Heads => "heads",
        }
    }
}

/// What the user asked for.
struct Settings {
    components: Vec<Component>,
    denoise: bool,
    min_gap: f64,
    chat: bool,
    last_only: bool,
    layers: Option<Vec<usize>>,
}

impl Settings {
    fn from_params(params: &Params) -> Result<Self, PluginError> {
        let mut components = Vec::new();
        for word in params.list("components").unwrap_or_default() {
            let c = Component::ALL
                .into_iter()
                .find(|c| c.name() == word)
                .ok_or_else(|| {
                    PluginError::from(format!(
                        "parameter `components`: `{word}` is not one of resid, attn, mlp, heads"
                    ))
                })?;
            if !components.contains(&c) {
                components.push(c);
            }
        }
        if components.is_empty() {
            return Err(
                "parameter `components`: give at least one of resid, attn, mlp, heads".into(),
            );
        }
        components.sort_unstable();
        let min_gap = params.float("min_gap")?;
        if min_gap < 0.0 {
            return Err(format!("parameter `min_gap`: {min_gap}; give 0 or more logits").into());
        }
        Ok(Self {
            components,
            denoise: params.str("direction")? == "denoise",
            min_gap,
            chat: params.bool("chat")?,
            last_only: params.str("positions")? == "last",
            layers: params.layers("layers"),
        })
    }
}

/// One activation to patch.
#[derive(Clone, Copy, Debug)]
struct Site {
    component: Component,
    layer: usize,
    position: usize,
    head: Option<usize>,
}

/// Sizes of the model's activations.
#[derive(Clone, Copy)]
struct Shape {
    hidden: usize,
    heads: usize,
    head_dim: usize,
}

/// The activation at `site` in a run that kept residuals, updates and (for
/// heads) `z`.
fn activation(out: &ForwardOutput, site: Site, shape: Shape) -> &[f32] {
    let (d, p, l) = (shape.hidden, site.position, site.layer);
    match site.component {
        Component::Resid => &out.residuals[l][p * d..(p + 1) * d],
        Component::Attn => &out.attn_updates[l][p * d..(p + 1) * d],
        Component::Mlp => &out.mlp_updates[l][p * d..(p + 1) * d],
        Component::Heads => {
            let (width, dh) = (shape.heads * shape.head_dim, shape.head_dim);
            let start = p * width + site.head.unwrap_or(0) * dh;
            &out.z[l][start..start + dh]
        }
    }
}

/// The edit that puts `values` at `site` in a run starting at its block.
fn edit_at(site: Site, values: Vec<f32>) -> Edit {
    // The run starts from the residual before block `layer`: stage 0 is that
    // residual, run 0 that block.
    let edit = Edit::replace(0, site.position, values);
    match site.component {
        Component::Resid => edit,
        Component::Attn => edit.at(Hook::AttnOut),
        Component::Mlp => edit.at(Hook::MlpOut),
        Component::Heads => edit.at(Hook::Z {
            head: site.head.unwrap_or(0),
        }),
    }
}

/// Every site of a pair of `t` tokens.
fn sites(settings: &Settings, blocks: &[usize], t: usize, heads: usize) -> Vec<Site> {
    let positions: Vec<usize> = if settings.last_only {
        vec![t - 1]
    } else {
        (0..t).collect()
    };
    let mut out = Vec::new();
    for &component in &settings.components {
        for &layer in blocks {
            for &position in &positions {
                let head_range: Vec<Option<usize>> = if component == Component::Heads {
                    (0..heads).map(Some).collect()
                } else {
                    vec![None]
                };
                for head in head_range {
                    out.push(Site {
                        component,
                        layer,
                        position,
                        head,
                    });
                }
            }
        }
    }
    out
}

/// Logit difference and KL to the clean distribution at last rows.
struct Scores {
    /// z[answer] − z[wrong] per row.
    ld: Vec<f64>,
    /// KL(p_clean ‖ p_row) per row (row 0 is the clean run's).
    kl: Vec<f64>,
}

/// `rows` (`[n, hidden]`, row 0 the clean run's last row) scored in the host:
/// ln p(answer) − ln p(wrong) is z[answer] − z[wrong] (one normaliser).
fn score(host: &Host, rows: &[f32], n: usize, pair: &TokenPair) -> Result<Scores, PluginError> {
    let with = |target: u32, kl: bool| LensRequest {
        targets: Some(vec![target; n]),
        kl_pairs: if kl {
            (0..n).map(|i| (0, i)).collect()
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    let answer = host.lens_reduce(rows, n, &with(pair.answer, true))?;
    let wrong = host.lens_reduce(rows, n, &with(pair.wrong, false))?;
    let ln = |row: &LensRow| row.target_prob.unwrap_or(0.0).ln();
    Ok(Scores {
        ld: answer
            .rows
            .iter()
            .zip(&wrong.rows)
            .map(|(a, w)| ln(a) - ln(w))
            .collect(),
        kl: answer.kl,
    })
}

/// The rows of the main table, column by column.
#[derive(Default)]
struct Rows {
    pair: Vec<i64>,
    category: Vec<String>,
    component: Vec<&'static str>,
    layer: Vec<i64>,
    position: Vec<i64>,
    position_from_end: Vec<i64>,
    head: Vec<Option<i64>>,
    ld: Vec<f64>,
    effect: Vec<f64>,
    kl: Vec<f64>,
}

struct Patch;

impl Plugin for Patch {
    const NAME: &'static str = "patch";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "Activation patching over clean/corrupted prompt pairs: which (layer, position, component, head) carries the answer";
    const DESCRIPTION: &'static str = "For each pair of the pair file (probes/patching.jsonl or pairs=FILE: {\"clean\", \"corrupt\", \"answer\", \"wrong\", \"category\"?} a line, prompts of the same length in tokens; the first token of `answer` and of `wrong` is scored): the logit difference LD = z[answer] − z[wrong] at the last position of the clean and the corrupted run; pairs with |LD_clean − LD_corrupt| under `min_gap` are left out (companion `skipped`). Then, one at a time, an activation is copied from the clean run into the corrupted one (`direction=denoise`; `noise`: from the corrupted run into the clean one) — `resid`: the residual entering block `layer` (resid_pre); `attn`, `mlp`: what the block's attention or MLP adds (attn_out, mlp_out); `heads`: one head's output before the output projection (z) — at `position` (every position, or the last with positions=last), and the patched run's LD is measured: effect = (LD − LD_corrupt) / (LD_clean − LD_corrupt) for denoise (1: the clean answer fully restored), (LD_clean − LD) / (LD_clean − LD_corrupt) for noise (1: fully destroyed); kl = KL(p_clean ‖ p_patched) at the last position, nats. A patch whose value is already there (a position before the first token the prompts differ in) is not run: its effect is 0. Companion `summary`: mean effect and kl over pairs per (category, component, layer, position_from_end, head), and over all categories as `all`.";

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::new(
                "pairs",
                ParamKind::Str,
                Some(""),
                "JSONL of {\"clean\", \"corrupt\", \"answer\", \"wrong\", \"category\"?} (default: the built-in probes/patching.jsonl)",
            ),
            ParamSpec::new(
                "components",
                ParamKind::List,
                Some("resid,attn,mlp"),
                "what to patch: resid (entering a block), attn, mlp (a block's sublayer outputs), heads (every head's output before the output projection)",
            ),
            ParamSpec::choice(
                "direction",
                &["denoise", "noise"],
                "denoise",
                "denoise: clean activations into the corrupted run; noise: corrupted ones into the clean run",
            ),
            ParamSpec::choice(
                "positions",
                &["all", "last"],
                "all",
                "patch at every position, or at the last one only",
            ),
            ParamSpec::new(
                "min_gap",
                ParamKind::Float,
                Some("1.0"),
                "pairs whose |LD_clean − LD_corrupt| is under this many logits are left out (companion `skipped`)",
            ),
            ParamSpec::new(
                "chat",
                ParamKind::Bool,
                Some("false"),
                "encode the prompts as user messages under the model's chat template",
            ),
            ParamSpec::layers("layers", "blocks to patch (default: every block)"),
        ]
    }

    fn work_items(_host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(1)
    }

    fn run(host: &Host, params: &Params, _items: &[usize]) -> Result<DataFrame, PluginError> {
        let settings = Settings::from_params(params)?;
        let model = host.model()?;
        let set = PairSet::from_params(params)?;
        if !model.family.is_causal() {
            return Err(format!(
                "a {} model reads both ways and has no next-token answer to patch: patching needs a causal model",
                model.family
            )
            .into());
        }
        let tokens = tokenize(host, &set, settings.chat)?;
        let blocks: Vec<usize> = match &settings.layers {
            Some(layers) => layers.clone(),
            None => (0..model.num_layers).collect(),
        };
        let heads_wanted = settings.components.contains(&Component::Heads);
        let mut rows = Rows::default();
        let mut skipped: (Vec<i64>, Vec<String>, Vec<f64>, Vec<f64>) = Default::default();
        // Pairs of one length together: their runs stack as equal-length
        // sequences (packing different lengths costs more attention).
        let mut indexed: Vec<(usize, (&pairs::Pair, &TokenPair))> =
            set.pairs.iter().zip(&tokens).enumerate().collect();
        indexed.sort_by_key(|(k, (_, tp))| (tp.clean.len(), *k));
        let groups: Vec<&[(usize, (&pairs::Pair, &TokenPair))]> = indexed
            .chunk_by(|a, b| a.1 .1.clean.len() == b.1 .1.clean.len())
            .flat_map(|same| same.chunks(PAIRS_PER_GROUP))
            .collect();
        let mut done = 0;
        for group in groups {
            host.check_cancelled()?;
            host.progress(done as u64, set.pairs.len() as u64, "pairs");
            done += group.len();
            // Every pair's clean and corrupted runs, all activations kept.
            let base_request = |ids: &[u32]| ForwardRequest {
                tokens: ids.to_vec(),
                residuals: true,
                updates: true,
                z: heads_wanted,
                ..Default::default()
            };
            let requests: Vec<ForwardRequest> = group
                .iter()
                .flat_map(|(_, (_, tp))| [base_request(&tp.clean), base_request(&tp.corrupt)])
                .collect();
            let mut outputs = host.forward_batch(&requests)?.into_iter();
            let mut prepared: Vec<Prepared> = Vec::new();
            for &(_, (pair, tp)) in group {
                let (Some(clean), Some(corrupt)) = (outputs.next(), outputs.next()) else {
                    return Err("the host returned fewer runs than asked for".into());
                };
                let t = tp.clean.len();
                let shape = Shape {
                    hidden: clean.hidden,
                    heads: clean.heads,
                    head_dim: clean
                        .z
                        .first()
                        .map_or(0, |z| z.len() / (t * clean.heads.max(1))),
                };
                let d = shape.hidden;
                let rows = [
                    last_row(&clean.output, t, d),
                    last_row(&corrupt.output, t, d),
                ]
                .concat();
                let base_scores = score(host, &rows, 2, tp)?;
                let (ld_clean, ld_corrupt) = (base_scores.ld[0], base_scores.ld[1]);
                let category = pair.category.clone().unwrap_or_default();
                if (ld_clean - ld_corrupt).abs() < settings.min_gap {
                    skipped.0.push(pair.index as i64);
                    skipped.1.push(category);
                    skipped.2.push(ld_clean);
                    skipped.3.push(ld_corrupt);
                    continue;
                }
                let (base, source) = if settings.denoise {
                    (&corrupt, &clean)
                } else {
                    (&clean, &corrupt)
                };
                let all_sites = sites(&settings, &blocks, t, shape.heads);
                // Only sites whose value differs from the base run's run.
                let moved: Vec<usize> = (0..all_sites.len())
                    .filter(|&s| {
                        let site = all_sites[s];
                        activation(source, site, shape) != activation(base, site, shape)
                    })
                    .collect();
                prepared.push(Prepared {
                    pair,
                    tokens: tp,
                    category,
                    ld_clean,
                    ld_corrupt,
                    kl_corrupt: base_scores.kl[1],
                    t,
                    shape,
                    sites: all_sites,
                    moved,
                    clean,
                    corrupt,
                });
            }
            // The group's patched runs, in batches across its pairs (runs of
            // one length that have as many blocks left share session runs).
            let work: Vec<(usize, usize)> = prepared
                .iter()
                .enumerate()
                .flat_map(|(g, p)| p.moved.iter().map(move |&s| (g, s)))
                .collect();
            let mut finals: Vec<Vec<f32>> = prepared
                .iter()
                .map(|p| last_row(&p.clean.output, p.t, p.shape.hidden))
                .collect();
            for chunk in work.chunks(BATCH_REQUESTS) {
                let requests: Vec<ForwardRequest> = chunk
                    .iter()
                    .map(|&(g, s)| {
                        let p = &prepared[g];
                        let site = p.sites[s];
                        let (base, source, tokens) = p.base_and_source(settings.denoise);
                        ForwardRequest {
                            tokens: tokens.to_vec(),
                            blocks: Some((site.layer..model.num_layers).collect()),
                            start: Some(base.residuals[site.layer].clone()),
                            edits: vec![edit_at(site, activation(source, site, p.shape).to_vec())],
                            ..Default::default()
                        }
                    })
                    .collect();
                for (&(g, _), out) in chunk.iter().zip(host.forward_batch(&requests)?) {
                    let p = &prepared[g];
                    finals[g].extend_from_slice(&last_row(&out.output, p.t, p.shape.hidden));
                }
            }
            for (p, rows_of_pair) in prepared.iter().zip(&finals) {
                let scores = score(host, rows_of_pair, p.moved.len() + 1, p.tokens)?;
                let (ld_base, kl_base) = if settings.denoise {
                    (p.ld_corrupt, p.kl_corrupt)
                } else {
                    (p.ld_clean, 0.0)
                };
                let mut ld = vec![ld_base; p.sites.len()];
                let mut kl = vec![kl_base; p.sites.len()];
                for (j, &s) in p.moved.iter().enumerate() {
                    ld[s] = scores.ld[j + 1];
                    kl[s] = scores.kl[j + 1];
                }
                let span = p.ld_clean - p.ld_corrupt;
                for (s, site) in p.sites.iter().enumerate() {
                    rows.pair.push(p.pair.index as i64);
                    rows.category.push(p.category.clone());
                    rows.component.push(site.component.name());
                    rows.layer.push(site.layer as i64);
                    rows.position.push(site.position as i64);
                    rows.position_from_end
                        .push((p.t - 1 - site.position) as i64);
                    rows.head.push(site.head.map(|h| h as i64));
                    rows.ld.push(ld[s]);
                    rows.effect.push(if settings.denoise {
                        (ld[s] - p.ld_corrupt) / span
                    } else {
                        (p.ld_clean - ld[s]) / span
                    });
                    rows.kl.push(kl[s]);
                }
            }
        }
        host.progress(set.pairs.len() as u64, set.pairs.len() as u64, "pairs");
        if !skipped.0.is_empty() {
            host.warn(&format!(
                "{} of {} pairs left out: the model does not separate their clean and corrupted answers by {} logit(s) (companion `skipped`)",
                skipped.0.len(),
                set.pairs.len(),
                settings.min_gap
            ));
        }
        let gaps: Vec<f64> = skipped
            .2
            .iter()
            .zip(&skipped.3)
            .map(|(a, b)| a - b)
            .collect();
        host.emit_table(
            "skipped",
            df!(
                "pair" => skipped.0,
                "category" => skipped.1,
                "ld_clean" => skipped.2,
                "ld_corrupt" => skipped.3,
                "gap" => gaps,
            )?
            .sort(
                ["pair"],
                SortMultipleOptions::default().with_maintain_order(true),
            )?,
        )?;
        host.emit_table("summary", summary(&rows)?)?;
        let table = df!(
            "pair" => rows.pair,
            "category" => rows.category,
            "component" => rows.component,
            "layer" => rows.layer,
            "position" => rows.position,
            "position_from_end" => rows.position_from_end,
            "head" => rows.head,
            "ld" => rows.ld,
            "effect" => rows.effect,
            "kl" => rows.kl,
        )?;
        // Pairs ran grouped by length: rows go out in file order.
        Ok(table.sort(
            ["pair"],
            SortMultipleOptions::default().with_maintain_order(true),
        )?)
    }
}

/// Mean effect and kl over pairs per (category, component, layer,
/// position_from_end, head), and the same over every category as `all`.
fn summary(rows: &Rows) -> PolarsResult<DataFrame> {
    type Key = (String, &'static str, i64, i64, Option<i64>);
    let mut sums: BTreeMap<Key, (f64, f64, usize)> = BTreeMap::new();
    for r in 0..rows.pair.len() {
        for category in [rows.category[r].clone(), "all".to_string()] {
            let key = (
                category,
                rows.component[r],
                rows.layer[r],
                rows.position_from_end[r],
                rows.head[r],
            );
            let entry = sums.entry(key).or_default();
            entry.0 += rows.effect[r];
            entry.1 += rows.kl[r];
            entry.2 += 1;
        }
    }
    let (mut categories, mut components) = (Vec::new(), Vec::new());
    let (mut layers, mut from_ends, mut heads) = (Vec::new(), Vec::new(), Vec::new());
    let (mut effect, mut kl, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
    for ((category, component, layer, from_end, head), (e, k, n)) in sums {
        categories.push(category);
        components.push(component);
        layers.push(layer);
        from_ends.push(from_end);
        heads.push(head);
        effect.push(e / n as f64);
        kl.push(k / n as f64);
        pairs.push(n as i64);
    }
    df!(
        "category" => categories,
        "component" => components,
        "layer" => layers,
        "position_from_end" => from_ends,
        "head" => heads,
        "effect" => effect,
        "kl" => kl,
        "pairs" => pairs,
    )
}

export_plugin!(Patch);
