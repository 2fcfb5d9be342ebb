//! `quant`: how much precision each block can lose. Symmetric per-group
//! round-to-nearest ([`quantize`]) applied to one block's matrices (or one
//! matrix) at a time, and the loss on the prompt set's scored tokens with
//! them, against the unquantized model's; then whole-model recipes (every
//! block at b bits, with the ends or the most sensitive blocks kept at 8).
//!
//! The rounded weights reach the engine as tensor overrides
//! (`Host::override_tensor`): the checkpoint is never copied, and a block's
//! quantization runs from the unquantized residual before it, so blocks
//! before it never run again. Recipes stream the model a few blocks at a
//! time, so the rounded copies held at once stay a few blocks' worth.

pub mod quantize;

use std::collections::BTreeMap;

use probe_sdk::matrices::Matrix;
use probe_sdk::prelude::*;
use probe_sdk::prompts::{prompt_params, Baseline, PromptOptions, PromptSet};

use quantize::{quantize_matrix, ErrorSums, BITS};

/// The width a recipe keeps its protected blocks at.
pub const PROTECTED_BITS: u32 = 8;

/// Blocks a recipe pass quantizes and runs at a time: the rounded copies
/// the host holds at once.
const RECIPE_CHUNK: usize = 4;

struct Quant;

/// What the user asked for.
struct Settings {
    bits: Vec<u32>,
    group: usize,
    by_block: bool,
    by_matrix: bool,
    protect: usize,
}

impl Settings {
    fn from_params(params: &Params) -> Result<Self, PluginError> {
        let bits = params.range("bits").unwrap_or_default();
        let mut bits: Vec<u32> = bits.into_iter().map(|b| b as u32).collect();
        bits.sort_unstable();
        bits.dedup();
        if bits.is_empty() {
            return Err("parameter `bits`: give at least one bit width (2 to 8)".into());
        }
        if let Some(b) = bits.iter().find(|b| !BITS.contains(b)) {
            return Err(format!(
                "parameter `bits`: {b} is outside the {}–{} bits the round-to-nearest definition covers",
                BITS.start(),
                BITS.end()
            )
            .into());
        }
        let group = params.int("group")?;
        if group < 1 {
            return Err(
                format!("parameter `group`: {group} weights per group; give at least 1").into(),
            );
        }
        let scope = params.str("scope")?;
        let protect = params.int("protect")?;
        if protect < 0 {
            return Err(format!("parameter `protect`: {protect} blocks; give 0 or more").into());
        }
        Ok(Self {
            bits,
            group: group as usize,
            by_block: matches!(scope, "block" | "both"),
            by_matrix: matches!(scope, "matrix" | "both"),
            protect: protect as usize,
        })
    }
}

/// Stored tensors by name with the values they are to read as.
type RoundedTensors = Vec<(String, Vec<f32>)>;

/// The rounded values of every stored tensor that holds some of `matrices`,
/// at `bits`, with the error they add; the matrices' other parts (a fused
/// tensor's other projections) keep their values.
fn rounded_tensors(
    host: &Host,
    matrices: &[&Matrix],
    transposed: bool,
    bits: u32,
    group: usize,
) -> Result<(RoundedTensors, ErrorSums), PluginError> {
    let mut by_tensor: BTreeMap<usize, Vec<&Matrix>> = BTreeMap::new();
    for &m in matrices {
        by_tensor.entry(m.tensor.index).or_default().push(m);
    }
    let mut sums = ErrorSums::default();
    let mut out = Vec::with_capacity(by_tensor.len());
    for parts in by_tensor.values() {
        let tensor = &parts[0].tensor;
        let mut values = host.tensor_f32(tensor.index)?.to_vec();
        for m in parts {
            sums.add(quantize_matrix(&mut values, m, transposed, bits, group));
        }
        out.push((tensor.name.clone(), values));
    }
    Ok((out, sums))
}

/// Register rounded tensors with the host for the requests that list them.
fn register<'h>(
    host: &'h Host<'h>,
    tensors: &[(String, Vec<f32>)],
) -> Result<Vec<TensorOverride<'h>>, PluginError> {
    tensors
        .iter()
        .map(|(name, values)| host.override_tensor(name, values))
        .collect()
}

/// The set's loss with block `layer`'s `matrices` rounded to `bits`, run
/// from the unquantized residual before the block; and the weights' error.
fn loss_with_block_rounded<'h>(
    host: &'h Host<'h>,
    base: &Baseline,
    layer: usize,
    matrices: &[&Matrix],
    transposed: bool,
    bits: u32,
    group: usize,
) -> Result<(f64, ErrorSums), PluginError> {
    let (tensors, sums) = rounded_tensors(host, matrices, transposed, bits, group)?;
    let overrides = register(host, &tensors)?;
    drop(tensors);
    let ids: Vec<u64> = overrides.iter().map(TensorOverride::id).collect();
    let blocks = base.residuals.first().map_or(0, |r| r.len() - 1);
    let rest: Vec<usize> = (layer..blocks).collect();
    let loss = base.loss_from_overridden(host, layer, &rest, &ids)?;
    Ok((loss, sums))
}

/// The set's loss with every block rounded to `widths[block]` bits (`None`
/// keeps it unquantized), streamed [`RECIPE_CHUNK`] blocks at a time from
/// the embedding's output; and the weights' error over every block rounded.
fn recipe_loss<'h>(
    host: &'h Host<'h>,
    base: &Baseline,
    by_layer: &BTreeMap<usize, Vec<&Matrix>>,
    transposed: bool,
    widths: &[Option<u32>],
    group: usize,
) -> Result<(f64, ErrorSums), PluginError> {
    let mut residuals: Vec<Vec<f32>> = (0..base.sequences.len())
        .map(|i| base.start(i, 0))
        .collect::<Result<_, _>>()?;
    let mut sums = ErrorSums::default();
    let layers: Vec<usize> = (0..widths.len()).collect();
    for chunk in layers.chunks(RECIPE_CHUNK) {
        host.check_cancelled()?;
        let mut overrides = Vec::new();
        for &layer in chunk {
            let (Some(bits), Some(matrices)) = (widths[layer], by_layer.get(&layer)) else {
                continue;
            };
            let (tensors, block_sums) = rounded_tensors(host, matrices, transposed, bits, group)?;
            sums.add(block_sums);
            overrides.extend(register(host, &tensors)?);
        }
        let ids: Vec<u64> = overrides.iter().map(TensorOverride::id).collect();
        let requests: Vec<ForwardRequest> = residuals
            .iter()
            .enumerate()
            .map(|(i, start)| ForwardRequest {
                tokens: base.tokens(i).to_vec(),
                blocks: Some(chunk.to_vec()),
                start: Some(start.clone()),
                overrides: ids.clone(),
                ..Default::default()
            })
            .collect();
        residuals = host
            .forward_batch(&requests)?
            .into_iter()
            .map(|o| o.output)
            .collect();
    }
    let finals: Vec<&[f32]> = residuals.iter().map(Vec::as_slice).collect();
    Ok((
        host.scored_loss(&base.sequences, &finals, base.hidden)?,
        sums,
    ))
}

/// Rows of the main table.
#[derive(Default)]
struct Rows {
    scope: Vec<&'static str>,
    layer: Vec<i64>,
    role: Vec<String>,
    bits: Vec<i64>,
    loss: Vec<f64>,
    weight_error: Vec<f64>,
}

/// Perplexity, its change and the loss ratio of each loss against the base.
fn against_base(losses: &[f64], base: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let ppl: Vec<f64> = losses.iter().map(|l| l.exp()).collect();
    let delta = ppl.iter().map(|p| p - base.exp()).collect();
    let ratio = losses.iter().map(|l| l / base).collect();
    (ppl, delta, ratio)
}

impl Plugin for Quant {
    const NAME: &'static str = "quant";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str =
        "How much precision each block can lose: the loss with one block or one matrix rounded to b bits";
    const DESCRIPTION: &'static str = "Symmetric per-group round-to-nearest (groups of `group` consecutive weights along each row's input axis; scale = max|w| / (2^(b−1) − 1); q = clamp(round(w/scale), −2^(b−1), 2^(b−1) − 1), ties to even) applied to one block's weight matrices (scope=block, role `all`) or one matrix (scope=matrix) at a time, at each width of `bits`. On the prompt set (probes/prompts.jsonl or prompts=FILE; the model's own greedy completion where a line has none): loss (mean cross-entropy over every scored token, token-weighted), perplexity = exp(loss), delta_ppl = perplexity − base perplexity, ratio = loss / base_loss (as knockout's R), weight_error = ‖Q(W) − W‖_F / ‖W‖_F over the matrices rounded. Norms, biases, the embedding and the head stay unquantized. Companion `recipes`: the whole model at b bits (`all`), with the first and last blocks kept at 8 bits (`protect_ends`), and with the `protect` blocks of highest delta_ppl at b bits kept at 8 (`protect_sensitive`, from scope=block over every block).";

    fn params() -> Vec<ParamSpec> {
        let mut params = prompt_params();
        params.extend([
            ParamSpec::new(
                "bits",
                ParamKind::Range,
                Some("2,3,4,8"),
                "bit widths to round to (2 to 8)",
            ),
            ParamSpec::new(
                "group",
                ParamKind::Int,
                Some("128"),
                "consecutive weights of a row that share one scale",
            ),
            ParamSpec::choice(
                "scope",
                &["block", "matrix", "both"],
                "block",
                "round one block's matrices together, one matrix at a time, or both",
            ),
            ParamSpec::new(
                "protect",
                ParamKind::Int,
                Some("2"),
                "how many of the most sensitive blocks the `protect_sensitive` recipe keeps at 8 bits",
            ),
            ParamSpec::new(
                "recipes",
                ParamKind::Bool,
                Some("true"),
                "also run the whole-model recipes (companion `recipes`)",
            ),
        ]);
        params
    }

    fn work_items(host: &Host, _params: &Params) -> Result<usize, PluginError> {
        Ok(host.model()?.num_layers)
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let model = host.model()?;
        if !model.family.is_decoder() {
            return Err(format!(
                "{} is an encoder ({}): it has no next-token loss to measure quantization against",
                model.label, model.family
            )
            .into());
        }
        let settings = Settings::from_params(params)?;
        let blocks = model.num_layers;
        let transposed = model.family.stores_transposed();
        let all_matrices = host.matrices()?;
        let mut by_layer: BTreeMap<usize, Vec<&Matrix>> = BTreeMap::new();
        for m in &all_matrices {
            if let Some(layer) = m.layer {
                by_layer.entry(layer).or_default().push(m);
            }
        }
        let chosen: Vec<usize> = items.iter().copied().filter(|&b| b < blocks).collect();

        let set = PromptSet::from_params(params)?;
        let base = Baseline::compute(host, &set, &PromptOptions::from_params(params)?)?;
        host.info(&format!(
            "base loss {:.4} nats (perplexity {:.3}) over the scored tokens",
            base.loss,
            base.loss.exp()
        ));

        let per_block_units = usize::from(settings.by_block)
            + if settings.by_matrix {
                by_layer.values().map(Vec::len).max().unwrap_or(0)
            } else {
                0
            };
        let total = (chosen.len() * per_block_units * settings.bits.len()) as u64;
        let mut rows = Rows::default();
        let mut push =
            |scope, layer: usize, role: String, bits: u32, (loss, sums): (f64, ErrorSums)| {
                rows.scope.push(scope);
                rows.layer.push(layer as i64);
                rows.role.push(role);
                rows.bits.push(i64::from(bits));
                rows.loss.push(loss);
                rows.weight_error.push(sums.relative());
                host.progress(rows.loss.len() as u64, total, "quantized runs");
            };
        for &layer in &chosen {
            let Some(matrices) = by_layer.get(&layer) else {
                continue;
            };
            for &bits in &settings.bits {
                if settings.by_block {
                    host.check_cancelled()?;
                    let measured = loss_with_block_rounded(
                        host,
                        &base,
                        layer,
                        matrices,
                        transposed,
                        bits,
                        settings.group,
                    )?;
                    push("block", layer, "all".into(), bits, measured);
                }
                if settings.by_matrix {
                    for &m in matrices {
                        host.check_cancelled()?;
                        let measured = loss_with_block_rounded(
                            host,
                            &base,
                            layer,
                            &[m],
                            transposed,
                            bits,
                            settings.group,
                        )?;
                        push("matrix", layer, m.role.to_string(), bits, measured);
                    }
                }
            }
        }

        if params.bool("recipes")? {
            if chosen.len() == blocks {
                let recipes = run_recipes(host, &base, &by_layer, transposed, &settings, &rows)?;
                host.emit_table("recipes", recipes)?;
            } else {
                host.info("recipes are whole-model runs: skipped on a selection of blocks");
            }
        }

        let (ppl, delta_ppl, ratio) = against_base(&rows.loss, base.loss);
        let n = rows.loss.len();
        Ok(df!(
            "scope" => rows.scope,
            "layer" => rows.layer,
            "role" => rows.role,
            "bits" => rows.bits,
            "loss" => rows.loss,
            "perplexity" => ppl,
            "delta_ppl" => delta_ppl,
            "ratio" => ratio,
            "weight_error" => rows.weight_error,
            "base_loss" => vec![base.loss; n],
        )?)
    }
}

/// The whole-model recipes at every width below [`PROTECTED_BITS`] (and
/// `all` at every width): which blocks each keeps at 8 bits, and its loss.
fn run_recipes<'h>(
    host: &'h Host<'h>,
    base: &Baseline,
    by_layer: &BTreeMap<usize, Vec<&Matrix>>,
    transposed: bool,
    settings: &Settings,
    rows: &Rows,
) -> Result<DataFrame, PluginError> {
    let blocks = base.residuals.first().map_or(0, |r| r.len() - 1);
    let (mut bits_col, mut recipe, mut protected, mut losses, mut errors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &bits in &settings.bits {
        let mut plans: Vec<(&str, Vec<usize>)> = vec![("all", Vec::new())];
        if bits < PROTECTED_BITS && blocks > 0 {
            let mut ends = vec![0, blocks - 1];
            ends.dedup();
            plans.push(("protect_ends", ends));
            if settings.by_block && settings.protect > 0 {
                // Highest Δloss first; ties to the lower block.
                let mut ranked: Vec<(usize, f64)> = (0..rows.loss.len())
                    .filter(|&r| rows.scope[r] == "block" && rows.bits[r] == i64::from(bits))
                    .map(|r| (rows.layer[r] as usize, rows.loss[r]))
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut most: Vec<usize> = ranked
                    .iter()
                    .take(settings.protect)
                    .map(|&(l, _)| l)
                    .collect();
                most.sort_unstable();
                plans.push(("protect_sensitive", most));
            }
        }
        let mut measured: Vec<(Vec<usize>, f64, ErrorSums)> = Vec::new();
        for (name, kept) in plans {
            // protect_sensitive often names the ends: one run serves both.
            if let Some((_, loss, sums)) = measured.iter().find(|m| m.0 == kept) {
                bits_col.push(i64::from(bits));
                recipe.push(name);
                protected.push(join(&kept));
                losses.push(*loss);
                errors.push(sums.relative());
                continue;
            }
            let widths: Vec<Option<u32>> = (0..blocks)
                .map(|b| {
                    Some(if kept.contains(&b) {
                        PROTECTED_BITS
                    } else {
                        bits
                    })
                })
                .collect();
            let (loss, sums) =
                recipe_loss(host, base, by_layer, transposed, &widths, settings.group)?;
            host.info(&format!(
                "recipe {name} at {bits} bits{}: loss {loss:.4}",
                if kept.is_empty() {
                    String::new()
                } else {
                    format!(" (blocks {kept:?} at {PROTECTED_BITS})")
                }
            ));
            bits_col.push(i64::from(bits));
            recipe.push(name);
            protected.push(join(&kept));
            losses.push(loss);
            errors.push(sums.relative());
            measured.push((kept, loss, sums));
        }
    }
    let (ppl, delta_ppl, ratio) = against_base(&losses, base.loss);
    Ok(df!(
        "bits" => bits_col,
        "recipe" => recipe,
        "protected" => protected,
        "loss" => losses,
        "perplexity" => ppl,
        "delta_ppl" => delta_ppl,
        "ratio" => ratio,
        "weight_error" => errors,
    )?)
}

/// Blocks as the `protected` column writes them: `0,29`.
fn join(blocks: &[usize]) -> String {
    blocks
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

export_plugin!(Quant);
