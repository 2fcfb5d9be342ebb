//! `swap`: what block order costs. The loss on the prompt set's scored
//! tokens with blocks i and j exchanged, for every pair i < j (or those at
//! most `max_gap` apart): Δloss and the ratio to the whole model's loss.
//!
//! A swap of i and j runs blocks < i once for all pairs: every request starts
//! from the whole model's residual before block i.

use probe_sdk::prelude::*;
use probe_sdk::prompts::{prompt_params, Baseline, PromptOptions, PromptSet};

struct Swap;

/// The block order from block `i` on with `i` and `j` (i < j) exchanged.
pub fn swapped_suffix(blocks: usize, i: usize, j: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (i..blocks).collect();
    order.swap(0, j - i);
    order
}

/// The pairs i < j of `blocks` blocks at most `max_gap` apart (0: all), in
/// row-major order: the plugin's work items.
fn pairs(blocks: usize, max_gap: usize) -> Vec<(usize, usize)> {
    (0..blocks)
        .flat_map(|i| (i + 1..blocks).map(move |j| (i, j)))
        .filter(|&(i, j)| max_gap == 0 || j - i <= max_gap)
        .collect()
}

fn max_gap(params: &Params) -> Result<usize, PluginError> {
    let gap = params.int("max_gap")?;
    usize::try_from(gap)
        .map_err(|_| format!("parameter `max_gap`: {gap} is negative (0 = every pair)").into())
}

impl Plugin for Swap {
    const NAME: &'static str = "swap";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "What order costs: the loss on the prompt set with each pair of blocks swapped";
    const DESCRIPTION: &'static str = "On the prompt set (probes/prompts.jsonl or prompts=FILE; the model's own greedy completion where a line has none), the mean cross-entropy over every scored token (token-weighted) of the whole model (base_loss) and of the model with blocks layer_i and layer_j exchanged (loss; every other block in place): delta = loss − base_loss, ratio = loss / base_loss. Every pair i < j, or with max_gap=K those at most K blocks apart (1: adjacent swaps only).";

    fn params() -> Vec<ParamSpec> {
        let mut params = prompt_params();
        params.push(ParamSpec::new(
            "max_gap",
            ParamKind::Int,
            Some("0"),
            "swap only blocks at most this far apart (1: neighbours; 0: every pair)",
        ));
        params
    }

    fn work_items(host: &Host, params: &Params) -> Result<usize, PluginError> {
        Ok(pairs(host.model()?.num_layers, max_gap(params)?).len())
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let model = host.model()?;
        if !model.family.is_decoder() {
            return Err(format!(
                "{} is an encoder ({}): it has no next-token loss to compare block orders by",
                model.label, model.family
            )
            .into());
        }
        let blocks = model.num_layers;
        let all = pairs(blocks, max_gap(params)?);
        let chosen: Vec<(usize, usize)> =
            items.iter().filter_map(|&k| all.get(k).copied()).collect();
        let set = PromptSet::from_params(params)?;
        let base = Baseline::compute(host, &set, &PromptOptions::from_params(params)?)?;
        host.info(&format!(
            "base loss {:.4} nats over the scored tokens",
            base.loss
        ));
        let mut losses = Vec::with_capacity(chosen.len());
        for (k, &(i, j)) in chosen.iter().enumerate() {
            host.check_cancelled()?;
            losses.push(base.loss_from(host, i, &swapped_suffix(blocks, i, j))?);
            host.progress((k + 1) as u64, chosen.len() as u64, "pairs");
        }
        Ok(df!(
            "layer_i" => chosen.iter().map(|p| p.0 as i64).collect::<Vec<_>>(),
            "layer_j" => chosen.iter().map(|p| p.1 as i64).collect::<Vec<_>>(),
            "loss" => losses.clone(),
            "base_loss" => vec![base.loss; chosen.len()],
            "delta" => losses.iter().map(|l| l - base.loss).collect::<Vec<_>>(),
            "ratio" => losses.iter().map(|l| l / base.loss).collect::<Vec<_>>(),
        )?)
    }
}

export_plugin!(Swap);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_exchanges_two_blocks_and_keeps_the_rest_in_place() {
        assert_eq!(swapped_suffix(5, 1, 3), vec![3, 2, 1, 4]);
        assert_eq!(swapped_suffix(3, 0, 1), vec![1, 0, 2]);
        assert_eq!(swapped_suffix(3, 1, 2), vec![2, 1]);
        assert_eq!(pairs(4, 0).len(), 6);
        assert_eq!(pairs(4, 1), vec![(0, 1), (1, 2), (2, 3)]);
    }
}
