//! Which charts a table gets, keyed by the plugin that produced it.

use std::collections::BTreeMap;

use polars::prelude::*;

use crate::{ChartSpec, Options, ReportError, Table};

type ChartsFn = fn(&Table, &Options) -> Result<Vec<ChartSpec>, ReportError>;
/// One named line of a [`ChartSpec::Lines`]: its `(x, y)` points.
type Series = (String, Vec<(f64, f64)>);

/// Plugin name → its charts. A new plugin adds one line here.
pub const REGISTRY: &[(&str, ChartsFn)] = &[
    ("spectral", spectral),
    ("vshape", vshape),
    ("shuffle", shuffle),
    ("contrastive", contrastive),
    ("lens", lens),
    ("knockout", knockout),
    ("swap", swap),
    ("quant", quant),
    ("geometry", geometry),
    ("autopsy", autopsy),
    ("linearity", linearity),
    ("patch", patch),
];

/// The charts for one table: its plugin's, else a metric by layer.
pub fn charts_for(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let by_plugin = table
        .plugin
        .as_deref()
        .and_then(|p| REGISTRY.iter().find(|(name, _)| *name == p))
        .map(|(_, f)| *f);
    match by_plugin {
        Some(charts) => charts(table, options),
        None => default(table, options),
    }
}

fn problem(table: &Table, problem: impl Into<String>) -> ReportError {
    ReportError::Table {
        table: table.name.clone(),
        problem: problem.into(),
    }
}

fn floats(table: &Table, frame: &DataFrame, name: &str) -> Result<Vec<Option<f64>>, ReportError> {
    let column = frame
        .column(name)
        .map_err(|_| problem(table, format!("has no column `{name}`")))?;
    let cast = column
        .cast(&DataType::Float64)
        .map_err(|_| problem(table, format!("column `{name}` is not numeric")))?;
    Ok(cast
        .f64()
        .map_err(|e| problem(table, e.to_string()))?
        .iter()
        .collect())
}

fn ints(table: &Table, frame: &DataFrame, name: &str) -> Result<Vec<Option<i64>>, ReportError> {
    let column = frame
        .column(name)
        .map_err(|_| problem(table, format!("has no column `{name}`")))?;
    let cast = column
        .cast(&DataType::Int64)
        .map_err(|_| problem(table, format!("column `{name}` is not an integer")))?;
    Ok(cast
        .i64()
        .map_err(|e| problem(table, e.to_string()))?
        .iter()
        .collect())
}

fn strings(frame: &DataFrame, name: &str) -> Option<Vec<String>> {
    let column = frame.column(name).ok()?;
    let cast = column.cast(&DataType::String).ok()?;
    Some(
        cast.str()
            .ok()?
            .iter()
            .map(|s| s.unwrap_or("").to_string())
            .collect(),
    )
}

/// Checkpoint labels in order of appearance (one `""` without the column).
fn checkpoints(frame: &DataFrame) -> (Vec<String>, Vec<String>) {
    let column =
        strings(frame, "checkpoint").unwrap_or_else(|| vec![String::new(); frame.height()]);
    let mut order: Vec<String> = Vec::new();
    for c in &column {
        if !order.contains(c) {
            order.push(c.clone());
        }
    }
    (column, order)
}

/// Roles in the order a reader expects, others after.
fn role_order(roles: impl IntoIterator<Item = String>) -> Vec<String> {
    const ORDER: [&str; 10] = [
        "q", "k", "v", "qkv", "o", "gate", "up", "down", "embed", "lm_head",
    ];
    let mut set: Vec<String> = Vec::new();
    for r in roles {
        if !set.contains(&r) {
            set.push(r);
        }
    }
    set.sort_by_key(|r| {
        (
            ORDER.iter().position(|o| o == r).unwrap_or(ORDER.len()),
            r.clone(),
        )
    });
    set
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// spectral: heat map layer × role of a metric (pr_rank_ratio), the mean per
/// role, singular-value curves (companion table), and the metric over a
/// run's checkpoints.
fn spectral(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let metric = options
        .metric
        .clone()
        .unwrap_or_else(|| "pr_rank_ratio".into());
    let frame = &table.frame;
    let values = floats(table, frame, &metric)?;
    let layers = ints(table, frame, "layer")?;
    let roles = strings(frame, "role").ok_or_else(|| problem(table, "has no column `role`"))?;
    let (checkpoint_of, order) = checkpoints(frame);
    let last = order.last().cloned().unwrap_or_default();
    let mut charts = Vec::new();

    // Heat map of the last checkpoint: block matrices only.
    let mut cells: BTreeMap<(i64, String), f64> = BTreeMap::new();
    for i in 0..frame.height() {
        if let (Some(layer), Some(v)) = (layers[i], values[i]) {
            if checkpoint_of[i] == last {
                cells.insert((layer, roles[i].clone()), v);
            }
        }
    }
    let columns = role_order(cells.keys().map(|(_, r)| r.clone()));
    let mut rows: Vec<i64> = cells.keys().map(|(l, _)| *l).collect();
    rows.dedup();
    if !cells.is_empty() {
        let suffix = if order.len() > 1 {
            format!(" ({last})")
        } else {
            String::new()
        };
        charts.push(ChartSpec::Heatmap {
            title: format!("{metric} by layer and role{suffix}"),
            x_label: "role".into(),
            y_label: "layer".into(),
            values: rows
                .iter()
                .map(|l| {
                    columns
                        .iter()
                        .map(|r| cells.get(&(*l, r.clone())).copied())
                        .collect()
                })
                .collect(),
            columns,
            rows: rows.iter().map(|l| l.to_string()).collect(),
        });
    }

    // Mean per role (last checkpoint).
    let mut per_role: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..frame.height() {
        if let Some(v) = values[i].filter(|v| v.is_finite()) {
            if checkpoint_of[i] == last {
                per_role.entry(roles[i].clone()).or_default().push(v);
            }
        }
    }
    let role_names = role_order(per_role.keys().cloned());
    if !role_names.is_empty() {
        charts.push(ChartSpec::Bars {
            title: format!("mean {metric} per role"),
            x_label: "role".into(),
            y_label: metric.clone(),
            stacks: vec![(
                format!("mean {metric}"),
                role_names.iter().map(|r| mean(&per_role[r])).collect(),
            )],
            categories: role_names,
        });
    }

    // Singular-value curves: σᵢ/σ₁ of each role's matrix in the middle block.
    if let Some((_, sv)) = table
        .companions
        .iter()
        .find(|(n, _)| n == "singular_values")
    {
        let sv_layers = ints(table, sv, "layer")?;
        let sv_roles = strings(sv, "role").unwrap_or_default();
        let index = ints(table, sv, "index")?;
        let sigma = floats(table, sv, "sigma")?;
        let (sv_checkpoint, sv_order) = checkpoints(sv);
        let sv_last = sv_order.last().cloned().unwrap_or_default();
        let block_layers: Vec<i64> = sv_layers.iter().flatten().copied().collect();
        if let (Some(lo), Some(hi)) = (block_layers.iter().min(), block_layers.iter().max()) {
            let middle = lo + (hi - lo) / 2;
            let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for i in 0..sv.height() {
                if sv_layers[i] == Some(middle) && sv_checkpoint[i] == sv_last {
                    if let (Some(k), Some(s)) = (index[i], sigma[i]) {
                        curves
                            .entry(sv_roles[i].clone())
                            .or_default()
                            .push((k as f64, s));
                    }
                }
            }
            let series: Vec<Series> = role_order(curves.keys().cloned())
                .into_iter()
                .map(|role| {
                    let mut points = curves[&role].clone();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let top = points
                        .iter()
                        .map(|p| p.1)
                        .fold(0.0, f64::max)
                        .max(f64::MIN_POSITIVE);
                    (
                        role,
                        points.into_iter().map(|(k, s)| (k, s / top)).collect(),
                    )
                })
                .collect();
            if !series.is_empty() {
                charts.push(ChartSpec::Lines {
                    title: format!("singular values σᵢ/σ₁, layer {middle}"),
                    x_label: "index i".into(),
                    y_label: "σᵢ / σ₁ (log)".into(),
                    series,
                    log_y: true,
                    points_only: false,
                });
            }
        }
    }

    // Over training: mean metric per role across checkpoints.
    if order.len() > 1 {
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (c, name) in order.iter().enumerate() {
            let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for i in 0..frame.height() {
                if checkpoint_of[i] == *name {
                    if let Some(v) = values[i].filter(|v| v.is_finite()) {
                        per.entry(roles[i].clone()).or_default().push(v);
                    }
                }
            }
            for (role, vs) in per {
                series.entry(role).or_default().push((c as f64, mean(&vs)));
            }
        }
        charts.push(ChartSpec::Lines {
            title: format!(
                "mean {metric} per role over {} checkpoints ({} … {})",
                order.len(),
                order[0],
                last
            ),
            x_label: "checkpoint (in run order)".into(),
            y_label: metric,
            series: role_order(series.keys().cloned())
                .into_iter()
                .map(|r| {
                    let points = series[&r].clone();
                    (r, points)
                })
                .collect(),
            log_y: false,
            points_only: false,
        });
    }
    Ok(charts)
}

/// vshape: the contribution per block (attention and MLP stacked), the
/// activation ratios when measured, and totals per checkpoint for a run.
fn vshape(table: &Table, _options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    let layers = ints(table, frame, "layer")?;
    let attn = floats(table, frame, "eff_attn")?;
    let mlp = floats(table, frame, "eff_mlp")?;
    let (checkpoint_of, order) = checkpoints(frame);
    let last = order.last().cloned().unwrap_or_default();
    let rows: Vec<usize> = (0..frame.height())
        .filter(|&i| checkpoint_of[i] == last)
        .collect();
    let suffix = if order.len() > 1 {
        format!(" ({last})")
    } else {
        String::new()
    };
    let mut charts = vec![ChartSpec::Bars {
        title: format!("effective contribution per block{suffix}"),
        x_label: "block".into(),
        y_label: "scale · ‖W‖_F".into(),
        categories: rows
            .iter()
            .map(|&i| layers[i].map_or(String::new(), |l| l.to_string()))
            .collect(),
        stacks: vec![
            (
                "attention (eff_attn)".into(),
                rows.iter().map(|&i| attn[i].unwrap_or(0.0)).collect(),
            ),
            (
                "MLP (eff_mlp)".into(),
                rows.iter().map(|&i| mlp[i].unwrap_or(0.0)).collect(),
            ),
        ],
    }];
    if frame.column("update_ratio_attn").is_ok() {
        let ra = floats(table, frame, "update_ratio_attn")?;
        let rm = floats(table, frame, "update_ratio_mlp")?;
        let points = |v: &[Option<f64>]| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|&i| Some((layers[i]? as f64, v[i]?)))
                .collect()
        };
        charts.push(ChartSpec::Lines {
            title: format!("update ratio ‖f(x)‖/‖x‖ per block, from activations{suffix}"),
            x_label: "block".into(),
            y_label: "mean ‖f(x)‖ / ‖x‖ (log)".into(),
            series: vec![
                ("attention".into(), points(&ra)),
                ("MLP".into(), points(&rm)),
            ],
            log_y: true,
            points_only: false,
        });
    }
    if order.len() > 1 {
        let total: Vec<f64> = attn
            .iter()
            .zip(&mlp)
            .map(|(a, m)| a.unwrap_or(0.0) + m.unwrap_or(0.0))
            .collect();
        charts.push(ChartSpec::Lines {
            title: format!("eff_total per block over {} checkpoints", order.len()),
            x_label: "block".into(),
            y_label: "eff_total".into(),
            series: order
                .iter()
                .map(|c| {
                    let points = (0..frame.height())
                        .filter(|&i| checkpoint_of[i] == *c)
                        .filter_map(|i| Some((layers[i]? as f64, total[i])))
                        .collect();
                    (c.clone(), points)
                })
                .collect(),
            log_y: false,
            points_only: false,
        });
    }
    Ok(charts)
}

/// shuffle: recovered against true position, one series per method.
fn shuffle(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    if frame.column("true_position").is_err() {
        return default(table, options);
    }
    let recovered = floats(table, frame, "recovered_position")?;
    let truth = floats(table, frame, "true_position")?;
    let methods =
        strings(frame, "method").unwrap_or_else(|| vec!["recovered".into(); frame.height()]);
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for i in 0..frame.height() {
        if let (Some(t), Some(r)) = (truth[i], recovered[i]) {
            series.entry(methods[i].clone()).or_default().push((t, r));
        }
    }
    Ok(vec![ChartSpec::Lines {
        title: "recovered against true block position".into(),
        x_label: "true position".into(),
        y_label: "recovered position".into(),
        series: series.into_iter().collect(),
        log_y: false,
        points_only: true,
    }])
}

/// contrastive: the mean of each measure per layer, one line per
/// relationship; the cosine chart marks the layers where the synonym and
/// antonym curves cross (the `crossover` companion) with a vertical line.
fn contrastive(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    if frame.column("relationship").is_err() {
        return default(table, options);
    }
    let layers = ints(table, frame, "layer")?;
    let relationships = strings(frame, "relationship").unwrap_or_default();
    let order = ["synonym", "antonym", "style", "unrelated"];
    let curves = |name: &str| -> Result<Vec<Series>, ReportError> {
        let values = floats(table, frame, name)?;
        let mut per: BTreeMap<(usize, String), BTreeMap<i64, Vec<f64>>> = BTreeMap::new();
        for i in 0..frame.height() {
            if let (Some(l), Some(v)) = (layers[i], values[i]) {
                let rank = order
                    .iter()
                    .position(|r| *r == relationships[i])
                    .unwrap_or(order.len());
                per.entry((rank, relationships[i].clone()))
                    .or_default()
                    .entry(l)
                    .or_default()
                    .push(v);
            }
        }
        Ok(per
            .into_iter()
            .map(|((_, name), by_layer)| {
                let points = by_layer
                    .into_iter()
                    .map(|(l, v)| (l as f64, mean(&v)))
                    .collect();
                (name, points)
            })
            .collect())
    };
    let mut cosine = curves("cosine")?;
    let (lo, hi) = cosine
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
    if let Some((_, crossover)) = table.companions.iter().find(|(n, _)| n == "crossover") {
        for layer in ints(table, crossover, "layer")?.into_iter().flatten() {
            cosine.push((
                format!("crossover at layer {layer}"),
                vec![(layer as f64, lo), (layer as f64, hi)],
            ));
        }
    }
    let mut charts = vec![ChartSpec::Lines {
        title: "mean cosine at the first differing token, per relationship".into(),
        x_label: "layer (−1 = embedding)".into(),
        y_label: "cosine".into(),
        series: cosine,
        log_y: false,
        points_only: false,
    }];
    for (name, title, log_y) in [
        (
            "kl_sym",
            "mean logit-lens KL (symmetric), per relationship",
            true,
        ),
        (
            "cka",
            "mean linear CKA over the completion tokens, per relationship",
            false,
        ),
    ] {
        let series = curves(name)?;
        if series.iter().any(|(_, p)| !p.is_empty()) {
            charts.push(ChartSpec::Lines {
                title: title.into(),
                x_label: "layer (−1 = embedding)".into(),
                y_label: format!("{name}{}", if log_y { " (log)" } else { "" }),
                series,
                log_y,
                points_only: false,
            });
        }
    }
    Ok(charts)
}

/// Any other table: its first numeric metric by layer (mean per layer), or
/// by row without a layer column.
fn default(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    let skip = ["layer", "index", "position", "stage", "checkpoint"];
    let metric = match &options.metric {
        Some(m) => Some(m.clone()),
        None => frame
            .columns()
            .iter()
            .find(|c| c.dtype().is_primitive_numeric() && !skip.contains(&c.name().as_str()))
            .map(|c| c.name().to_string()),
    };
    let Some(metric) = metric else {
        return Ok(Vec::new());
    };
    let values = floats(table, frame, &metric)?;
    let (points, x_label) = if frame.column("layer").is_ok() {
        let layers = ints(table, frame, "layer")?;
        let mut per: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for (l, v) in layers.iter().zip(&values) {
            if let (Some(l), Some(v)) = (l, v) {
                per.entry(*l).or_default().push(*v);
            }
        }
        (
            per.into_iter()
                .map(|(l, v)| (l as f64, mean(&v)))
                .collect::<Vec<_>>(),
            "layer",
        )
    } else {
        (
            values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| Some((i as f64, (*v)?)))
                .collect(),
            "row",
        )
    };
    Ok(vec![ChartSpec::Lines {
        title: format!("{metric} by {x_label}"),
        x_label: x_label.into(),
        y_label: metric.clone(),
        series: vec![(metric, points)],
        log_y: false,
        points_only: false,
    }])
}

/// lens: for the first prompt, the target's lens probability as a heat map
/// (layer × scored position); the crystallization layers of every position
/// as a histogram stacked by category (the `positions` companion); the mean
/// KL to the output and the share of positions whose target is the lens's
/// top-1, per layer.
fn lens(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    if frame.column("kl_to_final").is_err() {
        return default(table, options);
    }
    let index = ints(table, frame, "prompt_index")?;
    let positions = ints(table, frame, "position")?;
    let layers = ints(table, frame, "layer")?;
    let prob = floats(table, frame, "target_prob")?;
    let rank = ints(table, frame, "target_rank")?;
    let kl = floats(table, frame, "kl_to_final")?;
    let Some(first) = index.iter().flatten().min().copied() else {
        return Ok(Vec::new());
    };
    // Heat map of the first prompt: rows are layers from the top block down.
    let mut cells: BTreeMap<(i64, i64), f64> = BTreeMap::new();
    for i in 0..frame.height() {
        if let (Some(ix), Some(p), Some(l), Some(v)) = (index[i], positions[i], layers[i], prob[i])
        {
            if ix == first {
                cells.insert((l, p), v);
            }
        }
    }
    let mut row_layers: Vec<i64> = cells.keys().map(|k| k.0).collect();
    row_layers.sort_unstable();
    row_layers.dedup();
    row_layers.reverse();
    let mut columns: Vec<i64> = cells.keys().map(|k| k.1).collect();
    columns.sort_unstable();
    columns.dedup();
    let mut charts = vec![ChartSpec::Heatmap {
        title: format!("lens probability of the next token, prompt {first}"),
        x_label: "position".into(),
        y_label: "layer (−1 = embedding)".into(),
        columns: columns.iter().map(i64::to_string).collect(),
        rows: row_layers.iter().map(i64::to_string).collect(),
        values: row_layers
            .iter()
            .map(|&l| {
                columns
                    .iter()
                    .map(|&p| cells.get(&(l, p)).copied())
                    .collect()
            })
            .collect(),
    }];
    if let Some((_, companion)) = table.companions.iter().find(|(n, _)| n == "positions") {
        let crystal = ints(table, companion, "crystallization_layer")?;
        let categories = strings(companion, "category").unwrap_or_default();
        let (lo, hi) = layers
            .iter()
            .flatten()
            .fold((i64::MAX, i64::MIN), |(lo, hi), &l| (lo.min(l), hi.max(l)));
        if lo <= hi {
            let bins: Vec<i64> = (lo..=hi).collect();
            let mut names: Vec<String> = Vec::new();
            for c in &categories {
                if !names.contains(c) {
                    names.push(c.clone());
                }
            }
            let stacks = names
                .iter()
                .map(|name| {
                    let mut counts = vec![0.0; bins.len()];
                    for (c, l) in categories.iter().zip(&crystal) {
                        if let (true, Some(l)) = (c == name, l) {
                            counts[(l - lo) as usize] += 1.0;
                        }
                    }
                    (name.clone(), counts)
                })
                .collect();
            charts.push(ChartSpec::Bars {
                title: "crystallization layer: where each next token enters the top 10 for good"
                    .into(),
                x_label: "layer (−1 = embedding)".into(),
                y_label: "positions".into(),
                categories: bins.iter().map(i64::to_string).collect(),
                stacks,
            });
        }
    }
    // Per layer: the KLs, and 1 or 0 for "the target is the top-1".
    let mut kls: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let mut top1: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for i in 0..frame.height() {
        if let (Some(l), Some(k), Some(r)) = (layers[i], kl[i], rank[i]) {
            kls.entry(l).or_default().push(k);
            top1.entry(l)
                .or_default()
                .push(if r == 0 { 1.0 } else { 0.0 });
        }
    }
    let curve = |by_layer: &BTreeMap<i64, Vec<f64>>| -> Vec<(f64, f64)> {
        by_layer.iter().map(|(&l, v)| (l as f64, mean(v))).collect()
    };
    // The last layer's KL is 0, which a log axis cannot show: leave it out.
    let kl_points: Vec<(f64, f64)> = curve(&kls).into_iter().filter(|p| p.1 > 0.0).collect();
    charts.push(ChartSpec::Lines {
        title: "mean KL of the lens to the model's output".into(),
        x_label: "layer (−1 = embedding)".into(),
        y_label: "KL(output ‖ lens), nats".into(),
        series: vec![("all positions".into(), kl_points)],
        log_y: true,
        points_only: false,
    });
    charts.push(ChartSpec::Lines {
        title: "share of positions whose next token is the lens's top-1".into(),
        x_label: "layer (−1 = embedding)".into(),
        y_label: "share".into(),
        series: vec![("all positions".into(), curve(&top1))],
        log_y: false,
        points_only: false,
    });
    Ok(charts)
}

/// knockout: the loss ratio R_i = L_i / L_base per skipped block (log
/// scale, 1 = no effect); with the `pairs` companion, the synergy of every
/// pair as a heat map.
fn knockout(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    if frame.column("ratio").is_err() {
        return default(table, options);
    }
    let layers = ints(table, frame, "layer")?;
    let ratio = floats(table, frame, "ratio")?;
    let points: Vec<(f64, f64)> = layers
        .iter()
        .zip(&ratio)
        .filter_map(|(l, r)| Some((l.as_ref().copied()? as f64, r.filter(|v| *v > 0.0)?)))
        .collect();
    let mut charts = vec![ChartSpec::Lines {
        title: "loss with the block skipped, relative to the whole model".into(),
        x_label: "skipped block".into(),
        y_label: "R = L_skipped / L_base".into(),
        series: vec![("ratio".into(), points)],
        log_y: true,
        points_only: false,
    }];
    if let Some((_, pairs)) = table.companions.iter().find(|(n, _)| n == "pairs") {
        charts.push(pair_heatmap(
            table,
            pairs,
            "synergy",
            "pair synergy S(i, j) = ΔL_ij − ΔL_i − ΔL_j",
        )?);
    }
    Ok(charts)
}

/// A value per block pair (`layer_i` < `layer_j`) as the upper triangle of
/// a block × block heat map.
fn pair_heatmap(
    table: &Table,
    frame: &DataFrame,
    value: &str,
    title: &str,
) -> Result<ChartSpec, ReportError> {
    let (i, j) = (
        ints(table, frame, "layer_i")?,
        ints(table, frame, "layer_j")?,
    );
    let values = floats(table, frame, value)?;
    let mut cells: BTreeMap<(i64, i64), f64> = BTreeMap::new();
    for r in 0..frame.height() {
        if let (Some(a), Some(b), Some(v)) = (i[r], j[r], values[r]) {
            cells.insert((a, b), v);
        }
    }
    let mut blocks: Vec<i64> = cells.keys().flat_map(|&(a, b)| [a, b]).collect();
    blocks.sort_unstable();
    blocks.dedup();
    Ok(ChartSpec::Heatmap {
        title: title.into(),
        x_label: "block j".into(),
        y_label: "block i".into(),
        columns: blocks.iter().map(i64::to_string).collect(),
        rows: blocks.iter().map(i64::to_string).collect(),
        values: blocks
            .iter()
            .map(|&a| {
                blocks
                    .iter()
                    .map(|&b| cells.get(&(a, b)).copied())
                    .collect()
            })
            .collect(),
    })
}

/// swap: Δloss of every swapped pair as a triangle heat map.
fn swap(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    if table.frame.column("delta").is_err() || table.frame.column("layer_j").is_err() {
        return default(table, options);
    }
    Ok(vec![pair_heatmap(
        table,
        &table.frame,
        "delta",
        "loss increase with blocks i and j swapped (nats)",
    )?])
}

/// Δppl as log10, floored at 10⁻³ (a change below that, or a perplexity
/// that fell, shows as the floor): one block at 2 bits can cost thousands
/// while most cost hundredths.
fn log_delta(delta: f64) -> f64 {
    delta.max(1e-3).log10()
}

/// quant: Δppl with one block rounded as a block × bits heat map; with
/// `scope=matrix` rows, role × block at one width (the narrowest of 3 bits
/// or more, where single matrices still leave a model to compare).
fn quant(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    if frame.column("delta_ppl").is_err() || frame.column("scope").is_err() {
        return default(table, options);
    }
    let scope = strings(frame, "scope").unwrap_or_default();
    let roles = strings(frame, "role").unwrap_or_default();
    let (layers, bits) = (ints(table, frame, "layer")?, ints(table, frame, "bits")?);
    let delta = floats(table, frame, "delta_ppl")?;
    let cells = |keep: &dyn Fn(usize) -> Option<(String, i64)>| {
        let mut cells: BTreeMap<(String, i64), f64> = BTreeMap::new();
        for (r, value) in delta.iter().enumerate() {
            if let (Some(key), Some(v)) = (keep(r), value) {
                cells.insert(key, log_delta(*v));
            }
        }
        cells
    };
    let mut charts = Vec::new();
    let by_block =
        cells(&|r| (scope[r] == "block").then_some((format!("{:>2} bits", bits[r]?), layers[r]?)));
    if !by_block.is_empty() {
        charts.push(block_heat_map(
            by_block,
            "log10 Δperplexity with one block rounded to b bits".into(),
            "bits",
        ));
    }
    let widths: Vec<i64> = (0..frame.height())
        .filter(|&r| scope[r] == "matrix")
        .filter_map(|r| bits[r])
        .collect();
    let width = widths
        .iter()
        .copied()
        .filter(|&b| b >= 3)
        .min()
        .or_else(|| widths.iter().copied().max());
    if let Some(width) = width {
        let by_role = cells(&|r| {
            (scope[r] == "matrix" && bits[r] == Some(width))
                .then_some((roles[r].clone(), layers[r]?))
        });
        charts.push(block_heat_map(
            by_role,
            format!("log10 Δperplexity with one matrix rounded to {width} bits"),
            "matrix",
        ));
    }
    if charts.is_empty() {
        return default(table, options);
    }
    Ok(charts)
}

/// One line per checkpoint (or one for a single model) of `column` by layer.
fn layer_series(table: &Table, column: &str) -> Result<Vec<Series>, ReportError> {
    let frame = &table.frame;
    let layers = ints(table, frame, "layer")?;
    let values = floats(table, frame, column)?;
    let checkpoints = strings(frame, "checkpoint");
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in 0..frame.height() {
        if let (Some(l), Some(v)) = (layers[r], values[r]) {
            let name = checkpoints
                .as_ref()
                .map_or_else(|| column.to_string(), |c| c[r].clone());
            series.entry(name).or_default().push((l as f64, v));
        }
    }
    Ok(series.into_iter().collect())
}

/// One chart per metric present, by layer (a line per checkpoint over a run).
fn metric_lines(
    table: &Table,
    x_label: &str,
    metrics: &[(&str, &str, bool)],
) -> Result<Vec<ChartSpec>, ReportError> {
    let mut charts = Vec::new();
    for &(column, title, log_y) in metrics {
        if table.frame.column(column).is_ok() {
            charts.push(ChartSpec::Lines {
                title: title.into(),
                x_label: x_label.into(),
                y_label: column.into(),
                series: layer_series(table, column)?,
                log_y,
                points_only: false,
            });
        }
    }
    Ok(charts)
}

/// geometry: each metric by layer (a line per checkpoint over a run); the
/// raw and centred isotropy on one chart.
fn geometry(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    if frame.column("participation_ratio").is_err() || frame.column("layer").is_err() {
        return default(table, options);
    }
    let x_label = "layer (−1 = embedding)";
    let mut charts = metric_lines(
        table,
        x_label,
        &[
            (
                "participation_ratio",
                "participation ratio of the centred states",
                false,
            ),
            ("mean_norm", "mean norm of the hidden states", true),
            (
                "erank",
                "effective rank (erank) of the hidden states",
                false,
            ),
            (
                "spectral_flatness",
                "spectral flatness of the centred states",
                false,
            ),
            (
                "category_separation",
                "category separation (c̄_intra − c̄_inter) / |c̄_inter|",
                false,
            ),
        ],
    )?;
    if frame.column("isotropy_centred").is_ok() && strings(frame, "checkpoint").is_none() {
        let mut series = layer_series(table, "isotropy_raw")?;
        series.extend(layer_series(table, "isotropy_centred")?);
        charts.push(ChartSpec::Lines {
            title: "mean cosine between tokens: raw and mean-centred".into(),
            x_label: x_label.into(),
            y_label: "mean cosine".into(),
            series,
            log_y: false,
            points_only: false,
        });
    }
    Ok(charts)
}

/// autopsy: each health metric by block (a line per checkpoint over a run).
fn autopsy(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    if table.frame.column("attention_entropy").is_err() || table.frame.column("layer").is_err() {
        return default(table, options);
    }
    metric_lines(
        table,
        "block",
        &[
            (
                "attention_entropy",
                "attention entropy (nats, mean over queries and heads)",
                false,
            ),
            ("residual_rms", "RMS of the residual after the block", true),
            ("attn_update_rms", "RMS of what attention adds", true),
            ("mlp_update_rms", "RMS of what the MLP adds", true),
            (
                "erank",
                "effective rank (erank) of the hidden states after the block",
                false,
            ),
            (
                "norm_growth",
                "residual norm growth ‖x_after‖ / ‖x_before‖",
                true,
            ),
            (
                "first_position_norm_ratio",
                "norm at the first position / elsewhere (attention sink ≫ 1)",
                true,
            ),
        ],
    )
}

/// linearity: the gap profile by block with a line per part (block,
/// attention, MLP), and the same of the order, amplification and update
/// ratio; over a run, a line per (checkpoint, part).
fn linearity(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let frame = &table.frame;
    let Some(parts) = strings(frame, "part") else {
        return default(table, options);
    };
    if frame.column("gap").is_err() || frame.column("layer").is_err() {
        return default(table, options);
    }
    let layers = ints(table, frame, "layer")?;
    let checkpoints = strings(frame, "checkpoint");
    let epsilon = floats(table, frame, "epsilon")
        .ok()
        .and_then(|e| e.first().copied().flatten());
    let mut charts = Vec::new();
    for (column, title, log_y) in [
        (
            "gap",
            "linearization gap ‖Δ − J·δ‖ / ‖Δ‖".to_string(),
            false,
        ),
        (
            "order",
            "nonlinearity order: slope of ln gap over ln ε".into(),
            false,
        ),
        ("amplification", "amplification ‖Δ‖ / ‖δ‖".into(), true),
        ("update_ratio", "update size ‖g(x)‖ / ‖x‖".into(), true),
    ] {
        if frame.column(column).is_err() {
            continue;
        }
        let values = floats(table, frame, column)?;
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in 0..frame.height() {
            if let (Some(l), Some(v)) = (layers[r], values[r]) {
                let name = match &checkpoints {
                    Some(c) => format!("{} {}", c[r], parts[r]),
                    None => parts[r].clone(),
                };
                series.entry(name).or_default().push((l as f64, v));
            }
        }
        let title = match (column, epsilon) {
            ("gap" | "amplification", Some(e)) => format!("{title} at ε = {e}"),
            _ => title,
        };
        charts.push(ChartSpec::Lines {
            title,
            x_label: "block".into(),
            y_label: column.into(),
            series: series.into_iter().collect(),
            log_y,
            points_only: false,
        });
    }
    Ok(charts)
}

/// patch: from the `summary` companion (every pair, category `all`), the
/// mean effect as a heat map of block × position from the end for each
/// component patched at positions, and of block × head for heads at the
/// last position.
fn patch(table: &Table, options: &Options) -> Result<Vec<ChartSpec>, ReportError> {
    let Some((_, summary)) = table.companions.iter().find(|(n, _)| n == "summary") else {
        return default(table, options);
    };
    let (Some(category), Some(component)) =
        (strings(summary, "category"), strings(summary, "component"))
    else {
        return default(table, options);
    };
    let layers = ints(table, summary, "layer")?;
    let from_end = ints(table, summary, "position_from_end")?;
    let heads = ints(table, summary, "head")?;
    let effect = floats(table, summary, "effect")?;
    let mut charts = Vec::new();
    for name in ["resid", "attn", "mlp", "heads"] {
        let mut cells: BTreeMap<(String, i64), f64> = BTreeMap::new();
        for r in 0..summary.height() {
            if category[r] != "all" || component[r] != name {
                continue;
            }
            let row = match (name, heads[r], from_end[r]) {
                ("heads", Some(h), Some(0)) => format!("head {h:>3}"),
                ("heads", _, _) => continue,
                (_, _, Some(k)) => format!("last − {k:>2}"),
                _ => continue,
            };
            if let (Some(l), Some(e)) = (layers[r], effect[r]) {
                cells.insert((row, l), e);
            }
        }
        if cells.is_empty() {
            continue;
        }
        let (title, y_label) = if name == "heads" {
            (
                "mean effect of patching one head's output at the last position".to_string(),
                "head",
            )
        } else {
            (
                format!("mean effect of patching {name} (1 = the clean answer restored)"),
                "position",
            )
        };
        charts.push(block_heat_map(cells, title, y_label));
    }
    if charts.is_empty() {
        return default(table, options);
    }
    Ok(charts)
}

/// A heat map of values keyed by (row label, block): rows in label order,
/// one column per block present, empty cells where a pair is missing.
fn block_heat_map(cells: BTreeMap<(String, i64), f64>, title: String, y_label: &str) -> ChartSpec {
    let mut rows: Vec<String> = cells.keys().map(|k| k.0.clone()).collect();
    rows.dedup();
    let mut columns: Vec<i64> = cells.keys().map(|k| k.1).collect();
    columns.sort_unstable();
    columns.dedup();
    ChartSpec::Heatmap {
        title,
        x_label: "block".into(),
        y_label: y_label.into(),
        columns: columns.iter().map(i64::to_string).collect(),
        values: rows
            .iter()
            .map(|row| {
                columns
                    .iter()
                    .map(|c| cells.get(&(row.clone(), *c)).copied())
                    .collect()
            })
            .collect(),
        rows,
    }
}
