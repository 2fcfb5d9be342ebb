//! `vshape`: how much each block contributes to the residual stream, from the
//! weights (and, on request, from forward passes), and the tied-embedding
//! bottleneck — definitions in `docs/metrics.md`.
//!
//! Weight-based: eff_attn = mean(attn_scale) · ‖W_O‖_F and
//! eff_mlp = mean(mlp_scale) · ‖W_down‖_F where the checkpoint has learned
//! output scales (parameter golf); otherwise the norms alone, times the mean
//! gain of a norm that multiplies the sublayer's output (Gemma 3's
//! post-attention and post-feedforward norms, `1 + w`). BERT's post-norms
//! act on the sum with the residual, not on the sublayer's output, so they
//! do not scale it.
//!
//! Activation-based (`activations=true`): per block, the mean over prompt
//! tokens of ‖attn(x)‖ / ‖x‖ (x: the residual entering the block) and of
//! ‖mlp(x′)‖ / ‖x′‖ (x′ = x + attn(x), the residual the MLP's update joins).

use probe_sdk::prelude::*;

/// The prompt set in `probes/prompts.txt`, built in.
const PROMPTS: &str = include_str!("../../../probes/prompts.txt");

struct VShape;

/// One block's weight-based numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockRow {
    pub layer: usize,
    pub o_norm: f64,
    pub down_norm: f64,
    /// The factor on ‖W_O‖ (mean attn_scale, or the post-attention norm gain; 1 without).
    pub attn_scale: f64,
    pub mlp_scale: f64,
    pub params: usize,
    pub x0_mix: Option<f64>,
    pub q_gain_mean: Option<f64>,
    pub q_gain_std: Option<f64>,
}

impl BlockRow {
    pub fn eff_attn(&self) -> f64 {
        self.attn_scale * self.o_norm
    }
    pub fn eff_mlp(&self) -> f64 {
        self.mlp_scale * self.down_norm
    }
    pub fn eff_total(&self) -> f64 {
        self.eff_attn() + self.eff_mlp()
    }
}

/// Model-level view of the profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub min_max_ratio: f64,
    pub peak_block: usize,
    /// Share of the total contribution held by the first and the last block.
    pub boundary_share: f64,
    /// Their share of the blocks' parameters.
    pub boundary_param_share: f64,
}

pub fn profile(rows: &[BlockRow]) -> Option<Profile> {
    let totals: Vec<f64> = rows.iter().map(BlockRow::eff_total).collect();
    let sum: f64 = totals.iter().sum();
    let params: usize = rows.iter().map(|r| r.params).sum();
    let (first, last) = (totals.first()?, totals.last()?);
    let max = totals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = totals.iter().copied().fold(f64::INFINITY, f64::min);
    let peak_block = rows[totals.iter().position(|&t| t == max)?].layer;
    let boundary = if rows.len() > 1 { first + last } else { *first };
    let boundary_params = if rows.len() > 1 {
        rows[0].params + rows[rows.len() - 1].params
    } else {
        rows[0].params
    };
    Some(Profile {
        min_max_ratio: min / max,
        peak_block,
        boundary_share: boundary / sum,
        boundary_param_share: boundary_params as f64 / params.max(1) as f64,
    })
}

fn mean(values: &[f32]) -> f64 {
    values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64
}

fn std(values: &[f32]) -> f64 {
    let m = mean(values);
    (values.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / values.len().max(1) as f64)
        .sqrt()
}

fn frobenius(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| (v as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Mean cosine between matching rows of two equally shaped matrices.
pub fn row_cosine(a: &[f32], b: &[f32], cols: usize) -> f64 {
    let rows = a.len() / cols.max(1);
    let mut total = 0.0;
    for (ra, rb) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
        let dot: f64 = ra.iter().zip(rb).map(|(&x, &y)| x as f64 * y as f64).sum();
        let na = frobenius(ra);
        let nb = frobenius(rb);
        total += if na > 0.0 && nb > 0.0 {
            dot / (na * nb)
        } else {
            0.0
        };
    }
    total / rows.max(1) as f64
}

fn prompts(params: &Params) -> Result<Vec<String>, PluginError> {
    let path = params.str("prompts")?;
    let text = if path.is_empty() {
        PROMPTS.to_string()
    } else {
        std::fs::read_to_string(path).map_err(|e| PluginError::from(format!("{path}: {e}")))?
    };
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.replace("\\n", "\n"))
        .collect();
    if list.is_empty() {
        return Err(format!(
            "{}: no prompts",
            if path.is_empty() {
                "probes/prompts.txt"
            } else {
                path
            }
        )
        .into());
    }
    Ok(list)
}

/// Mean over every prompt token of ‖attn(x)‖/‖x‖ and ‖mlp(x′)‖/‖x′‖ per block.
fn activation_ratios(
    host: &Host,
    params: &Params,
    blocks: usize,
) -> Result<(Vec<f64>, Vec<f64>), PluginError> {
    let max_tokens = params.int("max_tokens")?.max(1) as usize;
    let from = params.int("from_position")?.max(0) as usize;
    let list = prompts(params)?;
    let mut attn = vec![0.0; blocks];
    let mut mlp = vec![0.0; blocks];
    let mut count = 0usize;
    for (done, prompt) in list.iter().enumerate() {
        host.check_cancelled()?;
        let mut tokens = host.tokenize(prompt, false)?;
        tokens.truncate(max_tokens);
        let out = host.forward(&ForwardRequest {
            tokens,
            residuals: true,
            updates: true,
            ..ForwardRequest::default()
        })?;
        let d = out.hidden;
        for b in 0..out.blocks.len().min(blocks) {
            let x = &out.residuals[b];
            let (a, m) = (&out.attn_updates[b], &out.mlp_updates[b]);
            for t in from.min(out.tokens.len())..out.tokens.len() {
                let row = t * d..(t + 1) * d;
                let xr = &x[row.clone()];
                let ar = &a[row.clone()];
                let mid: Vec<f32> = xr.iter().zip(ar).map(|(x, a)| x + a).collect();
                attn[b] += frobenius(ar) / frobenius(xr).max(1e-30);
                mlp[b] += frobenius(&m[row]) / frobenius(&mid).max(1e-30);
            }
        }
        count += out.tokens.len().saturating_sub(from);
        host.progress(done as u64 + 1, list.len() as u64, "prompts");
    }
    let n = count.max(1) as f64;
    Ok((
        attn.iter().map(|v| v / n).collect(),
        mlp.iter().map(|v| v / n).collect(),
    ))
}

impl Plugin for VShape {
    const NAME: &'static str = "vshape";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str = "Per-block effective contribution and the tied-embedding V-shape";
    const DESCRIPTION: &'static str = "One row per block: eff_attn = mean(attn_scale)·‖W_O‖_F, eff_mlp = mean(mlp_scale)·‖W_down‖_F (norms alone, times output-norm gains, without learned scales), eff_total, share of the total, share of parameters; x0 mixing weight and q_gain where present. With activations=true, update_ratio_attn/mlp = mean ‖f(x)‖/‖x‖ over the prompt set's tokens. The companion table `summary` holds tied_embeddings, min/max ratio, peak block, boundary shares, embedding/lm_head row cosine and the skip effective weight.";

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::new(
                "activations",
                ParamKind::Bool,
                Some("false"),
                "also measure ‖f(x)‖/‖x‖ per block from forward passes",
            ),
            ParamSpec::new(
                "prompts",
                ParamKind::Str,
                Some(""),
                "prompt file (default: probes/prompts.txt, built in)",
            ),
            ParamSpec::new(
                "max_tokens",
                ParamKind::Int,
                Some("64"),
                "tokens kept per prompt",
            ),
            ParamSpec::new(
                "from_position",
                ParamKind::Int,
                Some("0"),
                "leave tokens before this position out of the activation means (1 drops the first token, often an attention sink)",
            ),
        ]
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        if items.is_empty() {
            return Ok(DataFrame::empty());
        }
        let model = host.model()?;
        let n = model.num_layers;
        let gemma = model.family == Family::Gemma3;
        let mut rows: Vec<BlockRow> = (0..n)
            .map(|layer| BlockRow {
                layer,
                attn_scale: 1.0,
                mlp_scale: 1.0,
                ..BlockRow::default()
            })
            .collect();
        let (mut has_o, mut has_down) = (vec![false; n], vec![false; n]);
        let (mut embed, mut lm_head) = (None, None);
        for matrix in host.matrices()? {
            match matrix.layer {
                Some(layer) if layer < n => {
                    rows[layer].params += matrix.rows * matrix.cols;
                    match matrix.role {
                        Role::O => {
                            rows[layer].o_norm = frobenius(&host.matrix_f32(&matrix)?);
                            has_o[layer] = true;
                        }
                        Role::Down => {
                            rows[layer].down_norm = frobenius(&host.matrix_f32(&matrix)?);
                            has_down[layer] = true;
                        }
                        _ => {}
                    }
                }
                None if matrix.role == Role::Embed => embed = Some(matrix),
                None if matrix.role == Role::LmHead => lm_head = Some(matrix),
                _ => {}
            }
        }
        let mut skip_weights = None;
        let mut skip_gates = None;
        for tensor in host.tensors()? {
            let is_vector = tensor.shape.len() == 1 || tensor.role == Role::ResidMix;
            if tensor.bias {
                continue;
            }
            match (tensor.layer, tensor.role) {
                (Some(layer), role) if layer < n && is_vector => {
                    let values = host.tensor_f32(tensor.index)?;
                    rows[layer].params += values.len();
                    let row = &mut rows[layer];
                    match role {
                        Role::AttnScale => row.attn_scale = mean(&values),
                        Role::MlpScale => row.mlp_scale = mean(&values),
                        Role::PostAttnNorm if gemma => row.attn_scale = 1.0 + mean(&values),
                        Role::PostMlpNorm if gemma => row.mlp_scale = 1.0 + mean(&values),
                        Role::ResidMix if tensor.shape.len() == 2 && tensor.shape[0] == 2 => {
                            // Row 1 mixes in x0, the embedding output.
                            let width = tensor.shape[1];
                            row.x0_mix = Some(mean(&values[width..2 * width]));
                        }
                        Role::QGain => {
                            row.q_gain_mean = Some(mean(&values));
                            row.q_gain_std = Some(std(&values));
                        }
                        _ => {}
                    }
                }
                (None, Role::SkipWeights) => {
                    skip_weights = Some(mean(&host.tensor_f32(tensor.index)?))
                }
                (None, Role::SkipGates) => {
                    let gates = host.tensor_f32(tensor.index)?;
                    skip_gates = Some(
                        gates.iter().map(|&g| sigmoid(g as f64)).sum::<f64>()
                            / gates.len().max(1) as f64,
                    );
                }
                _ => {}
            }
        }
        if let Some(layer) = (0..n).find(|&l| !has_o[l] || !has_down[l]) {
            let what = if has_o[layer] {
                "MLP output projection (down)"
            } else {
                "attention output projection (o)"
            };
            return Err(
                format!("block {layer} has no {what}: cannot measure its contribution").into(),
            );
        }

        // Tied: no lm_head, or one identical to the embedding.
        let mut tied = model.tied_embeddings;
        let mut row_cos = None;
        if let (Some(e), Some(h)) = (&embed, &lm_head) {
            if e.rows == h.rows && e.cols == h.cols {
                let (ev, hv) = (host.matrix_f32(e)?, host.matrix_f32(h)?);
                if *ev == *hv {
                    tied = true;
                } else {
                    row_cos = Some(row_cosine(&ev, &hv, e.cols));
                }
            }
        } else if embed.is_some() && lm_head.is_none() && model.family.is_decoder() {
            tied = true;
        }

        let ratios = if params.bool("activations")? {
            Some(activation_ratios(host, params, n)?)
        } else {
            None
        };

        let total: f64 = rows.iter().map(BlockRow::eff_total).sum();
        let params_total: usize = rows.iter().map(|r| r.params).sum();
        let col = |f: &dyn Fn(&BlockRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
        let opt =
            |f: &dyn Fn(&BlockRow) -> Option<f64>| rows.iter().map(f).collect::<Vec<Option<f64>>>();
        let mut frame = df!(
            "layer" => rows.iter().map(|r| r.layer as i64).collect::<Vec<_>>(),
            "eff_attn" => col(&|r| r.eff_attn()),
            "eff_mlp" => col(&|r| r.eff_mlp()),
            "eff_total" => col(&|r| r.eff_total()),
            "share" => col(&|r| r.eff_total() / total),
            "param_share" => col(&|r| r.params as f64 / params_total.max(1) as f64),
            "o_norm" => col(&|r| r.o_norm),
            "down_norm" => col(&|r| r.down_norm),
            "attn_scale" => col(&|r| r.attn_scale),
            "mlp_scale" => col(&|r| r.mlp_scale),
            "x0_mix" => opt(&|r| r.x0_mix),
            "q_gain_mean" => opt(&|r| r.q_gain_mean),
            "q_gain_std" => opt(&|r| r.q_gain_std)
        )?;
        if let Some((attn, mlp)) = &ratios {
            frame.with_column(Column::new("update_ratio_attn".into(), attn.clone()))?;
            frame.with_column(Column::new("update_ratio_mlp".into(), mlp.clone()))?;
        }

        let shape = profile(&rows).ok_or("no blocks")?;
        let skip_effective = match (skip_weights, skip_gates) {
            (Some(w), Some(g)) => Some(w * (1.0 - g)),
            (Some(w), None) => Some(w),
            _ => None,
        };
        let x0: Vec<f64> = rows.iter().filter_map(|r| r.x0_mix).collect();
        let ratio_min_max = ratios.as_ref().map(|(a, m)| {
            let totals: Vec<f64> = a.iter().zip(m).map(|(a, m)| a + m).collect();
            let max = totals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            totals.iter().copied().fold(f64::INFINITY, f64::min) / max
        });
        let summary = df!(
            "tied_embeddings" => [tied],
            "blocks" => [n as i64],
            "min_max_ratio" => [shape.min_max_ratio],
            "peak_block" => [shape.peak_block as i64],
            "boundary_share" => [shape.boundary_share],
            "boundary_param_share" => [shape.boundary_param_share],
            "embed_lm_head_row_cosine" => [row_cos],
            "skip_effective_weight" => [skip_effective],
            "x0_mix_mean" => [(!x0.is_empty()).then(|| x0.iter().sum::<f64>() / x0.len() as f64)],
            "activation_min_max_ratio" => [ratio_min_max]
        )?;
        host.emit_table("summary", summary)?;
        host.info(&format!(
            "{}: {} blocks, tied {}, min/max {:.2}, peak block {}, first+last blocks {:.1} % of the contribution for {:.1} % of the parameters",
            model.label,
            n,
            tied,
            shape.min_max_ratio,
            shape.peak_block,
            100.0 * shape.boundary_share,
            100.0 * shape.boundary_param_share
        ));
        Ok(frame)
    }
}

export_plugin!(VShape);

#[cfg(test)]
mod tests {
    use super::*;

    fn row(layer: usize, total: f64, params: usize) -> BlockRow {
        BlockRow {
            layer,
            o_norm: total,
            down_norm: 0.0,
            attn_scale: 1.0,
            mlp_scale: 1.0,
            params,
            ..BlockRow::default()
        }
    }

    #[test]
    fn the_published_v_has_the_published_summary() {
        // The published totals of an 11-block tied model; min/max 0.27.
        let totals = [
            20.8, 27.1, 31.6, 35.2, 39.6, 44.1, 41.5, 33.1, 27.9, 23.7, 12.1,
        ];
        let rows: Vec<BlockRow> = totals
            .iter()
            .enumerate()
            .map(|(i, &t)| row(i, t, 10))
            .collect();
        let p = profile(&rows).unwrap();
        assert!((p.min_max_ratio - 12.1 / 44.1).abs() < 1e-12);
        assert_eq!(format!("{:.2}", p.min_max_ratio), "0.27");
        assert_eq!(p.peak_block, 5);
        assert!((p.boundary_share - (20.8 + 12.1) / totals.iter().sum::<f64>()).abs() < 1e-12);
        assert!((p.boundary_param_share - 2.0 / 11.0).abs() < 1e-12);
    }

    #[test]
    fn row_cosine_of_known_rows() {
        let a = [1.0, 0.0, 0.0, 1.0];
        let b = [1.0, 0.0, 1.0, 1.0];
        // rows: cos 1 and cos 1/√2
        assert!((row_cosine(&a, &b, 2) - (1.0 + 0.5f64.sqrt()) / 2.0).abs() < 1e-12);
    }
}
