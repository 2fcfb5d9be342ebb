//! `knockout`: which blocks matter. The loss on the prompt set's scored
//! tokens with one block skipped, against the whole model's: R_i = L_i /
//! L_base; with `pairs=true` also every pair skipped together and its
//! synergy S(i, j) = ΔL_ij − ΔL_i − ΔL_j.
//!
//! A knockout of block i runs blocks < i once for all i: every request
//! starts from the whole model's residual after block i − 1 and runs only
//! what follows.

use probe_sdk::prelude::*;
use probe_sdk::prompts::{prompt_params, Baseline, PromptOptions, PromptSet};

struct Knockout;

/// The set's loss with the blocks in `skipped` (ascending, at least one)
/// left out: from the residual before the first of them, the rest in order.
fn loss_without(
    host: &Host,
    base: &Baseline,
    blocks: usize,
    skipped: &[usize],
) -> Result<f64, PluginError> {
    let first = skipped[0];
    let rest: Vec<usize> = (first + 1..blocks)
        .filter(|b| !skipped.contains(b))
        .collect();
    base.loss_from(host, first, &rest)
}

impl Plugin for Knockout {
    const NAME: &'static str = "knockout";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "Which blocks matter: the loss on the prompt set with each block (or pair of blocks) skipped";
    const DESCRIPTION: &'static str = "On the prompt set (probes/prompts.jsonl or prompts=FILE; the model's own greedy completion where a line has none), the mean cross-entropy over every scored token (token-weighted) of the whole model (base_loss) and of the model with block `layer` skipped (loss: the residual after the block before it goes straight to the next): delta = loss − base_loss, ratio R_i = loss / base_loss. With pairs=true, a companion `pairs`: for every pair i < j skipped together, loss and synergy S(i,j) = ΔL_ij − ΔL_i − ΔL_j (positive: the two blocks cover for each other less than their single knockouts suggest).";

    fn params() -> Vec<ParamSpec> {
        let mut params = prompt_params();
        params.push(ParamSpec::new(
            "pairs",
            ParamKind::Bool,
            Some("false"),
            "also skip every pair of blocks together (companion `pairs`, with synergy)",
        ));
        params
    }

    fn work_items(host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(host.model()?.num_layers)
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let model = host.model()?;
        if !model.family.is_decoder() {
            return Err(format!(
                "{} is an encoder ({}): it has no next-token loss to knock blocks out against",
                model.label, model.family
            )
            .into());
        }
        let blocks = model.num_layers;
        let set = PromptSet::from_params(params)?;
        let base = Baseline::compute(host, &set, &PromptOptions::from_params(params)?)?;
        host.info(&format!(
            "base loss {:.4} nats over the scored tokens",
            base.loss
        ));
        let pairs = params.bool("pairs")?;
        let chosen: Vec<usize> = items.iter().copied().filter(|&b| b < blocks).collect();
        // Single knockouts: the selected blocks, or every block when pairs
        // need them all for their synergy.
        let singles_needed: Vec<usize> = if pairs {
            (0..blocks).collect()
        } else {
            chosen.clone()
        };
        let mut single = vec![f64::NAN; blocks];
        for (k, &b) in singles_needed.iter().enumerate() {
            host.check_cancelled()?;
            single[b] = loss_without(host, &base, blocks, &[b])?;
            host.progress((k + 1) as u64, singles_needed.len() as u64, "blocks");
        }
        if pairs {
            let (mut layer_i, mut layer_j, mut loss, mut synergy) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let total = chosen.iter().map(|&i| blocks - 1 - i).sum::<usize>() as u64;
            for &i in &chosen {
                for j in i + 1..blocks {
                    host.check_cancelled()?;
                    let both = loss_without(host, &base, blocks, &[i, j])?;
                    layer_i.push(i as i64);
                    layer_j.push(j as i64);
                    loss.push(both);
                    synergy.push(
                        (both - base.loss) - (single[i] - base.loss) - (single[j] - base.loss),
                    );
                    host.progress(layer_i.len() as u64, total, "pairs");
                }
            }
            host.emit_table(
                "pairs",
                df!(
                    "layer_i" => layer_i,
                    "layer_j" => layer_j,
                    "loss" => loss,
                    "synergy" => synergy,
                )?,
            )?;
        }
        let losses: Vec<f64> = chosen.iter().map(|&b| single[b]).collect();
        Ok(df!(
            "layer" => chosen.iter().map(|&b| b as i64).collect::<Vec<_>>(),
            "loss" => losses.clone(),
            "base_loss" => vec![base.loss; chosen.len()],
            "delta" => losses.iter().map(|l| l - base.loss).collect::<Vec<_>>(),
            "ratio" => losses.iter().map(|l| l / base.loss).collect::<Vec<_>>(),
        )?)
    }
}

export_plugin!(Knockout);
