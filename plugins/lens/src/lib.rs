//! `lens`: where a prediction forms across depth. The logit lens (the final
//! norm and the unembedding applied to the residual stream after every
//! block) at every scored position of the prompt set: the rank and
//! probability of the token that comes next, the lens's own top-1, its
//! entropy and its KL to the model's output; then, per position, the layer
//! from which the next token stays in the top 10 (crystallization) and the
//! first layer where it is the top-1.
//!
//! The `[rows, vocab]` logits never reach the plugin: the host reduces them
//! (`Host::lens_reduce`) where they are made.

use probe_sdk::prelude::*;
use probe_sdk::prompts::{prompt_params, tokens_frame, PromptOptions, PromptSet};

/// A next token counts as formed from the layer where its rank drops below
/// this and stays there through the last layer (the published definition).
pub const CRYSTAL_RANK: u64 = 10;

/// Residual floats one forward batch keeps at once (128 MiB).
const BATCH_FLOATS: usize = 1 << 25;

struct Lens;

/// One (position, layer) of the main table.
#[derive(Default)]
struct Rows {
    category: Vec<String>,
    prompt_index: Vec<i64>,
    position: Vec<i64>,
    layer: Vec<i64>,
    target: Vec<i64>,
    target_rank: Vec<Option<i64>>,
    target_prob: Vec<Option<f64>>,
    top1: Vec<Option<i64>>,
    top1_prob: Vec<Option<f64>>,
    entropy: Vec<f64>,
    kl_to_final: Vec<f64>,
}

/// One scored position of the `positions` companion.
#[derive(Default)]
struct Positions {
    category: Vec<String>,
    prompt_index: Vec<i64>,
    position: Vec<i64>,
    target: Vec<i64>,
    final_rank: Vec<Option<i64>>,
    crystallization_layer: Vec<Option<i64>>,
    first_top1_layer: Vec<Option<i64>>,
}

/// The first layer from which every rank is below [`CRYSTAL_RANK`] through
/// the last, and the first layer of rank 0; `ranks[s]` is layer `s − 1`.
pub fn formation(ranks: &[u64]) -> (Option<i64>, Option<i64>) {
    let mut crystal = None;
    for (stage, &rank) in ranks.iter().enumerate().rev() {
        if rank >= CRYSTAL_RANK {
            break;
        }
        crystal = Some(stage as i64 - 1);
    }
    let first_top1 = ranks.iter().position(|&r| r == 0).map(|s| s as i64 - 1);
    (crystal, first_top1)
}

/// Mean of the present values; `None` when there are none.
fn mean(values: impl Iterator<Item = Option<i64>>) -> Option<f64> {
    let (sum, n) = values
        .flatten()
        .fold((0.0, 0usize), |(s, n), v| (s + v as f64, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Per category (then `all`): how many positions, how many crystallize, and
/// the mean crystallization and first top-1 layers over those that do.
fn summary(positions: &Positions, num_layers: usize) -> Result<DataFrame, PluginError> {
    let mut categories: Vec<&str> = Vec::new();
    for c in &positions.category {
        if !categories.contains(&c.as_str()) {
            categories.push(c);
        }
    }
    let mut groups: Vec<(String, Vec<usize>)> = categories
        .iter()
        .map(|&c| {
            let rows = (0..positions.category.len())
                .filter(|&i| positions.category[i] == c)
                .collect();
            (c.to_string(), rows)
        })
        .collect();
    groups.push(("all".into(), (0..positions.category.len()).collect()));
    let (mut name, mut count, mut crystallized, mut crystal, mut fraction, mut top1) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (category, rows) in groups {
        let layers = || rows.iter().map(|&i| positions.crystallization_layer[i]);
        let mean_crystal = mean(layers());
        name.push(category);
        count.push(rows.len() as i64);
        crystallized.push(layers().flatten().count() as i64);
        crystal.push(mean_crystal);
        fraction.push(mean_crystal.map(|m| (m + 1.0) / num_layers as f64));
        top1.push(mean(rows.iter().map(|&i| positions.first_top1_layer[i])));
    }
    Ok(df!(
        "category" => name,
        "positions" => count,
        "crystallized" => crystallized,
        "mean_crystallization_layer" => crystal,
        "crystallization_depth" => fraction,
        "mean_first_top1_layer" => top1,
    )?)
}

impl Plugin for Lens {
    const NAME: &'static str = "lens";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "Where predictions form: the logit lens at every layer and scored position of the prompt set";
    const DESCRIPTION: &'static str = "For every prompt of the prompt set (probes/prompts.jsonl or prompts=FILE; the model's own greedy completion where a line has none) and every scored position (one that predicts a completion token), per layer (−1 = the embedding, then every block): the final norm and the unembedding applied to that layer's residual (the logit lens) give a distribution over the vocabulary; target is the token that comes next, target_rank = #{v : z_v > z_target} (0 = the lens's top-1), target_prob its probability, top1 / top1_prob the lens's most probable token, entropy in nats, kl_to_final = KL(p_final ‖ p_layer) in nats (0 at the last block, whose lens is the model's output). Companion `positions`: per scored position, crystallization_layer (the first layer from which the target's rank stays below 10 through the last layer) and first_top1_layer (the first layer where it is the top-1), null when never reached. Companion `summary`: per category and for all, the mean of both over the positions that reach them, crystallization_depth = (mean crystallization layer + 1) / blocks. Companion `tokens`: every input token (prompt_index, position, token_id, scored), to re-run the exact sequences.";

    fn params() -> Vec<ParamSpec> {
        prompt_params()
    }

    fn work_items(_host: &Host, params: &Params) -> Result<usize, PluginError> {
        Ok(PromptSet::from_params(params)?.prompts.len())
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let mut set = PromptSet::from_params(params)?;
        let options = PromptOptions::from_params(params)?;
        let model = host.model()?;
        if !model.family.is_decoder() {
            return Err(format!(
                "{} is an encoder ({}): it has no unembedding, so no logit lens",
                model.label, model.family
            )
            .into());
        }
        if options.chat && !model.chat_template {
            host.info(&format!(
                "{} has no chat template: prompts are encoded as plain text",
                model.label
            ));
        }
        set.prompts = items
            .iter()
            .filter_map(|&i| set.prompts.get(i).cloned())
            .collect();
        let sequences = host.prompt_sequences(&set, &options)?;
        let hidden = model.hidden_size.unwrap_or(1);
        let stages = model.num_layers + 1;
        let mut rows = Rows::default();
        let mut positions = Positions::default();
        let mut start = 0;
        while start < sequences.len() {
            let mut end = start;
            let mut floats = 0;
            while end < sequences.len() {
                let need = sequences[end].tokens.len() * stages * hidden;
                if end > start && floats + need > BATCH_FLOATS {
                    break;
                }
                floats += need;
                end += 1;
            }
            let requests: Vec<ForwardRequest> = sequences[start..end]
                .iter()
                .map(Sequence::residual_request)
                .collect();
            let outputs = host.forward_batch(&requests)?;
            for (i, out) in (start..end).zip(&outputs) {
                host.check_cancelled()?;
                let prompt = &set.prompts[i];
                let sequence = &sequences[i];
                let scored: Vec<usize> = sequence.scored_positions().collect();
                // Rows in (position, stage) order; the last stage of each
                // position is the model's output, every stage's KL reference.
                let mut residual = Vec::with_capacity(scored.len() * stages * hidden);
                let mut targets = Vec::with_capacity(scored.len() * stages);
                let mut kl_pairs = Vec::with_capacity(scored.len() * stages);
                for (k, &p) in scored.iter().enumerate() {
                    for stage in 0..stages {
                        residual.extend_from_slice(out.residual_row(stage, p));
                        targets.push(sequence.tokens[p + 1]);
                        kl_pairs.push((k * stages + stages - 1, k * stages + stage));
                    }
                }
                let reply = host.lens_reduce(
                    &residual,
                    targets.len(),
                    &LensRequest {
                        top_k: 1,
                        targets: Some(targets),
                        kl_pairs,
                    },
                )?;
                for (k, &p) in scored.iter().enumerate() {
                    let lens = &reply.rows[k * stages..(k + 1) * stages];
                    let target = i64::from(sequence.tokens[p + 1]);
                    let mut ranks = Vec::with_capacity(stages);
                    for (stage, row) in lens.iter().enumerate() {
                        rows.category.push(prompt.category.clone());
                        rows.prompt_index.push(prompt.index as i64);
                        rows.position.push(p as i64);
                        rows.layer.push(stage as i64 - 1);
                        rows.target.push(target);
                        rows.target_rank.push(row.target_rank.map(|r| r as i64));
                        rows.target_prob.push(row.target_prob);
                        rows.top1.push(row.top_ids.first().map(|&id| i64::from(id)));
                        rows.top1_prob.push(row.top_probs.first().copied());
                        rows.entropy.push(row.entropy);
                        rows.kl_to_final.push(reply.kl[k * stages + stage]);
                        ranks.push(row.target_rank.unwrap_or(u64::MAX));
                    }
                    let (crystal, first_top1) = formation(&ranks);
                    positions.category.push(prompt.category.clone());
                    positions.prompt_index.push(prompt.index as i64);
                    positions.position.push(p as i64);
                    positions.target.push(target);
                    positions.final_rank.push(ranks.last().map(|&r| r as i64));
                    positions.crystallization_layer.push(crystal);
                    positions.first_top1_layer.push(first_top1);
                }
                host.progress((i + 1) as u64, sequences.len() as u64, "prompts");
            }
            start = end;
        }
        let summary = summary(&positions, model.num_layers)?;
        if let Some(all) = summary
            .column("crystallization_depth")?
            .f64()?
            .iter()
            .last()
            .flatten()
        {
            host.info(&format!(
                "mean crystallization at {:.0} % of depth ({} blocks), over the positions that crystallize",
                all * 100.0,
                model.num_layers
            ));
        }
        host.emit_table("summary", summary)?;
        host.emit_table(
            "positions",
            df!(
                "category" => positions.category,
                "prompt_index" => positions.prompt_index,
                "position" => positions.position,
                "target" => positions.target,
                "final_rank" => positions.final_rank,
                "crystallization_layer" => positions.crystallization_layer,
                "first_top1_layer" => positions.first_top1_layer,
            )?,
        )?;
        host.emit_table("tokens", tokens_frame(&set, &sequences)?)?;
        Ok(df!(
            "category" => rows.category,
            "prompt_index" => rows.prompt_index,
            "position" => rows.position,
            "layer" => rows.layer,
            "target" => rows.target,
            "target_rank" => rows.target_rank,
            "target_prob" => rows.target_prob,
            "top1" => rows.top1,
            "top1_prob" => rows.top1_prob,
            "entropy" => rows.entropy,
            "kl_to_final" => rows.kl_to_final,
        )?)
    }
}

export_plugin!(Lens);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formation_is_the_first_layer_that_stays_in_the_top_10_and_the_first_top_1() {
        // Layers −1, 0, 1, 2, 3.
        assert_eq!(formation(&[50, 3, 12, 4, 0]), (Some(2), Some(3)));
        assert_eq!(formation(&[0, 3, 2, 1, 0]), (Some(-1), Some(-1)));
        // Top-1 early, but the final rank is 10: never crystallizes.
        assert_eq!(formation(&[7, 0, 2, 9, 10]), (None, Some(0)));
        assert_eq!(formation(&[900, 40, 11, 12, 13]), (None, None));
    }
}
