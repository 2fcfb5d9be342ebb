//! The `spectral` plugin: the singular-value spectrum of every weight matrix
//! and the metrics of `docs/metrics.md` ("Weight spectra"), one row per matrix.
//!
//! Speed: singular values only (no U/V) with faer, f32 by default; matrices
//! run in parallel on a bounded rayon pool, each converted to f32 on its
//! own, so memory stays near (largest matrix × workers).

pub mod spectrum;
mod tridiagonal;
pub mod weightwatcher;

use probe_sdk::prelude::*;
use rayon::prelude::*;

use spectrum::{metrics, power_estimate, recommended_rank, Metrics};

struct Spectral;

/// One analysed matrix.
struct Row {
    name: String,
    layer: Option<usize>,
    role: String,
    rows: usize,
    cols: usize,
    dtype: String,
    metrics: Option<Metrics>,
    frobenius_power: f64,
    sigma_max_power: f64,
    stable_rank_power: Option<f64>,
    recommended_rank: usize,
    sigma: Option<Vec<f64>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Precision {
    F32,
    F64,
}

/// Singular values of a row-major matrix, descending.
pub fn singular_values(
    values: &[f32],
    rows: usize,
    cols: usize,
    f64_precision: bool,
) -> Result<Vec<f64>, String> {
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err("holds NaN or infinite values".into());
    }
    let result = if f64_precision {
        let wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        faer::MatRef::from_row_major_slice(&wide, rows, cols).singular_values()
    } else {
        faer::MatRef::from_row_major_slice(values, rows, cols)
            .singular_values()
            .map(|s| s.into_iter().map(f64::from).collect())
    };
    result.map_err(|e| format!("SVD did not converge ({e:?})"))
}

/// Rows converted to f64 at a time when forming a Gram matrix, so a tall
/// embedding never exists in f64 all at once (4096 × 576 × 8 B = 19 MB).
const GRAM_BLOCK_ROWS: usize = 4096;

/// Singular values as √eig(G), G the k × k Gram matrix (WᵀW or WWᵀ,
/// whichever is smaller) accumulated in f64 — a matrix product and a small
/// symmetric eigenproblem, far cheaper than bidiagonalising W. f32 inputs
/// are exact in f64, so σᵢ is off by about eps₆₄·σ₁²/σᵢ: better than an f32
/// SVD (eps₃₂·σ₁) for every σᵢ above ~10⁻⁸·σ₁.
pub fn gram_singular_values(values: &[f32], rows: usize, cols: usize) -> Result<Vec<f64>, String> {
    gram_spectrum(values, rows, cols).map(|(sigma, _)| sigma)
}

/// The Gram matrix (whole, symmetric) and the singular values from it.
fn gram_spectrum(
    values: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(Vec<f64>, faer::Mat<f64>), String> {
    use faer::linalg::matmul::triangular::{matmul, BlockStructure};
    if rows == 0 || cols == 0 {
        return Ok((Vec::new(), faer::Mat::zeros(0, 0)));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err("holds NaN or infinite values".into());
    }
    let tall = rows >= cols;
    let k = rows.min(cols);
    let mut gram = faer::Mat::<f64>::zeros(k, k);
    let mut block = Vec::new();
    let step = if tall { GRAM_BLOCK_ROWS } else { rows };
    for start in (0..rows).step_by(step) {
        let end = (start + step).min(rows);
        block.clear();
        block.extend(
            values[start * cols..end * cols]
                .iter()
                .map(|&v| f64::from(v)),
        );
        let b = faer::MatRef::from_row_major_slice(&block, end - start, cols);
        // Lower triangle of G += BᵀB (tall) or G = BBᵀ (wide, one block).
        let (lhs, rhs) = if tall {
            (b.transpose(), b)
        } else {
            (b, b.transpose())
        };
        matmul(
            gram.as_mut(),
            BlockStructure::TriangularLower,
            faer::Accum::Add,
            lhs,
            BlockStructure::Rectangular,
            rhs,
            BlockStructure::Rectangular,
            1.0,
            faer::Par::Seq,
        );
    }
    let eigenvalues = self_adjoint_eigenvalues(&gram)?;
    let mut sigma: Vec<f64> = eigenvalues.into_iter().map(|l| l.max(0.0).sqrt()).collect();
    sigma.sort_by(|a, b| b.total_cmp(a));
    // The upper triangle mirrored, for the power iteration's products on
    // the whole matrix (contiguous columns, faer's vectorised kernels).
    let k = gram.nrows();
    for j in 0..k {
        for i in 0..j {
            gram[(i, j)] = gram[(j, i)];
        }
    }
    Ok((sigma, gram))
}

/// Eigenvalues of a symmetric matrix given by its lower triangle: faer's
/// blocked Householder reduction to tridiagonal form, then the root-free
/// QL/QR of [`tridiagonal::eigenvalues`] (faer's own eigenvalues-only path
/// ends in Givens rotations, twice as slow on these matrices).
fn self_adjoint_eigenvalues(lower: &faer::Mat<f64>) -> Result<Vec<f64>, String> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::evd::tridiag;
    let n = lower.nrows();
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut reduced = lower.clone();
    let block = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let mut householder = faer::Mat::<f64>::zeros(block, n - 1);
    let mut scratch = MemBuffer::new(tridiag::tridiag_in_place_scratch::<f64>(
        n,
        faer::Par::Seq,
        Default::default(),
    ));
    tridiag::tridiag_in_place(
        reduced.as_mut(),
        householder.as_mut(),
        faer::Par::Seq,
        MemStack::new(&mut scratch),
        Default::default(),
    );
    let mut diag: Vec<f64> = (0..n).map(|i| reduced[(i, i)]).collect();
    let mut off: Vec<f64> = (0..n - 1).map(|i| reduced[(i + 1, i)]).collect();
    tridiagonal::eigenvalues(&mut diag, &mut off).map_err(|tridiagonal::NoConvergence(left)| {
        format!("eigenvalues did not converge ({left} off-diagonals left)")
    })?;
    Ok(diag)
}

/// The power-iteration σ₁ of `spectrum::power_estimate` (v ← WᵀWv/‖·‖ from
/// v₀ = 1/√n, then ‖Wv‖), run on the Gram matrix instead of W: k² work per
/// step instead of 2mn. For wide W (G = WWᵀ) the same iterates follow from
/// z = G^(T−1)·Wv₀, since v_T ∝ Wᵀz and ‖Wv_T‖² = ‖Gz‖² / zᵀGz.
fn power_sigma_from_gram(
    gram: &faer::Mat<f64>,
    values: &[f32],
    rows: usize,
    cols: usize,
    iterations: usize,
) -> f64 {
    // G whole through faer's product: a scalar walk over its lower
    // triangle was a sixth of the whole run.
    let multiply = |x: &[f64]| -> Vec<f64> {
        let product = gram * faer::ColRef::from_slice(x);
        product.iter().copied().collect()
    };
    let normalise = |x: &mut Vec<f64>| {
        let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 0.0 {
            x.iter_mut().for_each(|a| *a /= norm);
        }
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let iterations = iterations.max(1);
    if rows >= cols {
        let mut v = vec![1.0 / (cols as f64).sqrt(); cols];
        for _ in 0..iterations {
            v = multiply(&v);
            normalise(&mut v);
        }
        dot(&v, &multiply(&v)).max(0.0).sqrt()
    } else {
        let v0 = 1.0 / (cols as f64).sqrt();
        let mut z: Vec<f64> = (0..rows)
            .map(|r| {
                values[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|&w| f64::from(w) * v0)
                    .sum()
            })
            .collect();
        for _ in 1..iterations {
            z = multiply(&z);
            normalise(&mut z);
        }
        let gz = multiply(&z);
        let denominator = dot(&z, &gz);
        if denominator > 0.0 {
            (dot(&gz, &gz) / denominator).sqrt()
        } else {
            0.0
        }
    }
}

/// The roles of the matrices `Host::matrices` hands out (banks come out
/// split into the roles of their slabs).
fn matrix_roles() -> Vec<Role> {
    Role::ALL
        .into_iter()
        .filter(|r| r.is_weight_matrix() && !r.is_bank())
        .collect()
}

fn selected(host: &Host, params: &Params) -> Result<Vec<Matrix>, PluginError> {
    let roles = params.roles("roles");
    let layers = params.layers("layers");
    let skip_embeddings = params.bool("skip_embeddings")?;
    Ok(host
        .matrices()?
        .into_iter()
        .filter(|m| roles.as_ref().is_none_or(|r| r.contains(&m.role)))
        .filter(|m| match (&layers, m.layer) {
            (None, _) => true,
            (Some(wanted), Some(layer)) => wanted.contains(&layer),
            (Some(_), None) => false,
        })
        .filter(|m| {
            !(skip_embeddings
                && matches!(
                    m.role,
                    Role::Embed | Role::LmHead | Role::PosEmbed | Role::TypeEmbed
                ))
        })
        .collect())
}

fn analyse(
    host: &Host,
    matrix: &Matrix,
    params: &Params,
    precision: Precision,
) -> Result<Row, PluginError> {
    let values = host.matrix_f32(matrix)?;
    let (rows, cols) = (matrix.stored_rows, matrix.stored_cols);
    let iterations = params.int("power_iterations")?.max(1) as usize;
    let r_min = params.int("r_min")?.max(0) as usize;
    let k = matrix.rank_bound();
    let failed = |e: String| PluginError::Other(format!("{}: {e}", matrix.name));
    let frobenius_sq: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let (sigma, sigma_max_power) = match (params.str("method")?, params.str("algorithm")?) {
        ("power", _) => (None, power_estimate(&values, rows, cols, iterations).0),
        (_, "gram") => {
            let (sigma, gram) = gram_spectrum(&values, rows, cols).map_err(failed)?;
            let power = power_sigma_from_gram(&gram, &values, rows, cols, iterations);
            (Some(sigma), power)
        }
        _ => {
            let sigma = singular_values(&values, rows, cols, precision == Precision::F64)
                .map_err(failed)?;
            (
                Some(sigma),
                power_estimate(&values, rows, cols, iterations).0,
            )
        }
    };
    let stable_rank_power =
        (sigma_max_power > 0.0).then(|| frobenius_sq / (sigma_max_power * sigma_max_power));
    let largest_dim = matrix.rows.max(matrix.cols);
    let metrics = sigma.as_deref().map(|s| metrics(s, largest_dim));
    let sigma = if params.bool("singular_values")? {
        sigma
    } else {
        None
    };
    Ok(Row {
        name: matrix.name.clone(),
        layer: matrix.layer,
        role: matrix.role.as_str().to_string(),
        rows: matrix.rows,
        cols: matrix.cols,
        dtype: matrix.tensor.dtype.as_str().to_string(),
        metrics,
        frobenius_power: frobenius_sq.sqrt(),
        sigma_max_power,
        stable_rank_power,
        recommended_rank: recommended_rank(stable_rank_power.unwrap_or(0.0), r_min, k),
        sigma,
    })
}

impl Plugin for Spectral {
    const NAME: &'static str = "spectral";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const SUMMARY: &'static str = "Singular-value spectra of every weight matrix: stable/effective ranks, entropy, heavy-tail alpha";
    const DESCRIPTION: &'static str =
        "One row per 2-D weight matrix (banks and fused QKV split per layer and role) with
sigma_max, sigma_min, frobenius, stable_rank(_ratio), pr_rank(_ratio), erank,
spectral_entropy, r50/r90/r99, condition, alpha_loglog, alpha_truncated (the power
law bounded at the largest eigenvalue), WeightWatcher 0.7.7's columns under its
names (alpha, alpha_weighted, xmin, xmax, D, sigma, num_pl_spikes, num_evals,
log_norm, log_spectral_norm, log_alpha_norm, entropy, rank_loss, warning), and
stable_rank_power and recommended_rank, as defined in docs/metrics.md of the probe
repository. method=power skips the SVD and gives the power-iteration
stable rank alone, for models too big to decompose.";

    fn params() -> Vec<ParamSpec> {
        vec![
            ParamSpec::roles(
                "roles",
                &matrix_roles(),
                "only these roles, e.g. q,k,v (default: all)",
            ),
            ParamSpec::layers("layers", "only these layers, e.g. 0-5,8 (default: all)"),
            ParamSpec::new(
                "skip_embeddings",
                ParamKind::Bool,
                Some("false"),
                "leave out embed, lm_head and position embeddings",
            ),
            ParamSpec::choice(
                "method",
                &["svd", "power"],
                "svd",
                "svd: every metric; power: the cheap stable-rank estimate alone",
            ),
            ParamSpec::choice("precision", &["f32", "f64"], "f32", "precision of the SVD"),
            ParamSpec::choice(
                "algorithm",
                &["gram", "svd"],
                "gram",
                "svd: faer's SVD in `precision`; gram: √eig(WᵀW) accumulated in f64",
            ),
            ParamSpec::new(
                "singular_values",
                ParamKind::Bool,
                Some("false"),
                "also write the long table (tensor, layer, role, index, sigma) as OUT_STEM.singular_values.EXT",
            ),
            ParamSpec::new(
                "power_iterations",
                ParamKind::Int,
                Some("20"),
                "power-iteration steps for stable_rank_power",
            ),
            ParamSpec::new(
                "r_min",
                ParamKind::Int,
                Some("1"),
                "lower clamp of recommended_rank",
            ),
            ParamSpec::new(
                "threads",
                ParamKind::Int,
                Some("0"),
                "worker threads (0: one per core)",
            ),
        ]
    }

    fn work_items(host: &Host, params: &Params) -> Result<usize, PluginError> {
        Ok(selected(host, params)?.len())
    }

    fn run(host: &Host, params: &Params, items: &[usize]) -> Result<DataFrame, PluginError> {
        let matrices = selected(host, params)?;
        let precision = if params.str("precision")? == "f64" {
            Precision::F64
        } else {
            Precision::F32
        };
        let threads = params.int("threads")?.max(0) as usize;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| PluginError::Other(format!("thread pool: {e}")))?;
        // Parallelism is across matrices; faer itself runs each one sequentially.
        faer::set_global_parallelism(faer::Par::Seq);
        let done = std::sync::atomic::AtomicU64::new(0);
        let total = items.len() as u64;
        let rows: Vec<Row> = pool.install(|| {
            items
                .par_iter()
                .map(|&item| {
                    host.check_cancelled()?;
                    let matrix = matrices.get(item).ok_or("work item out of range")?;
                    let row = analyse(host, matrix, params, precision)?;
                    let finished = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    host.progress(finished, total, &matrix.name);
                    Ok(row)
                })
                .collect::<Result<Vec<Row>, PluginError>>()
        })?;
        if params.str("method")? == "svd" && !rows.is_empty() {
            for line in role_summary(&rows) {
                host.info(&line);
            }
            if let Some(line) = weightwatcher_summary(&rows) {
                host.info(&line);
            }
        }
        if params.bool("singular_values")? && params.str("method")? == "svd" {
            host.emit_table("singular_values", singular_value_table(&rows)?)?;
        }
        frame(&rows, params.str("method")? == "power")
    }
}

/// One row per (matrix, singular value): index 1 is σ₁, the largest.
fn singular_value_table(rows: &[Row]) -> Result<DataFrame, PluginError> {
    let (mut tensor, mut layer, mut role, mut index, mut sigma) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        for (i, s) in row.sigma.iter().flatten().enumerate() {
            tensor.push(row.name.as_str());
            layer.push(row.layer.map(|l| l as i64));
            role.push(row.role.as_str());
            index.push(i as i64 + 1);
            sigma.push(*s);
        }
    }
    Ok(
        df!("tensor" => tensor, "layer" => layer, "role" => role, "index" => index, "sigma" => sigma)?,
    )
}

fn frame(rows: &[Row], power_only: bool) -> Result<DataFrame, PluginError> {
    let m = |f: fn(&Metrics) -> Option<f64>| -> Vec<Option<f64>> {
        rows.iter()
            .map(|r| r.metrics.as_ref().and_then(f))
            .collect()
    };
    let mr = |f: fn(&Metrics) -> Option<u32>| -> Vec<Option<u32>> {
        rows.iter()
            .map(|r| r.metrics.as_ref().and_then(f))
            .collect()
    };
    let mut columns = vec![
        Column::new(
            "tensor".into(),
            rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "layer".into(),
            rows.iter()
                .map(|r| r.layer.map(|l| l as i64))
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "role".into(),
            rows.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "rows".into(),
            rows.iter().map(|r| r.rows as i64).collect::<Vec<_>>(),
        ),
        Column::new(
            "cols".into(),
            rows.iter().map(|r| r.cols as i64).collect::<Vec<_>>(),
        ),
        Column::new(
            "dtype".into(),
            rows.iter().map(|r| r.dtype.as_str()).collect::<Vec<_>>(),
        ),
    ];
    if power_only {
        columns.extend([
            Column::new(
                "frobenius".into(),
                rows.iter().map(|r| r.frobenius_power).collect::<Vec<_>>(),
            ),
            Column::new(
                "sigma_max_power".into(),
                rows.iter().map(|r| r.sigma_max_power).collect::<Vec<_>>(),
            ),
        ]);
    } else {
        columns.extend([
            Column::new("sigma_max".into(), m(|x| Some(x.sigma_max))),
            Column::new("sigma_min".into(), m(|x| x.sigma_min)),
            Column::new("frobenius".into(), m(|x| Some(x.frobenius))),
            Column::new("stable_rank".into(), m(|x| x.stable_rank)),
            Column::new("stable_rank_ratio".into(), m(|x| x.stable_rank_ratio)),
            Column::new("pr_rank".into(), m(|x| x.pr_rank)),
            Column::new("pr_rank_ratio".into(), m(|x| x.pr_rank_ratio)),
            Column::new("erank".into(), m(|x| x.erank)),
            Column::new("spectral_entropy".into(), m(|x| x.spectral_entropy)),
            Column::new("r50".into(), mr(|x| x.r50)),
            Column::new("r90".into(), mr(|x| x.r90)),
            Column::new("r99".into(), mr(|x| x.r99)),
            Column::new("condition".into(), m(|x| x.condition)),
            Column::new("alpha_loglog".into(), m(|x| x.alpha_loglog)),
            Column::new("alpha_truncated".into(), m(|x| x.alpha_truncated)),
        ]);
        // WeightWatcher 0.7.7's columns, under its names.
        let ww = |f: fn(&weightwatcher::Layer) -> Option<f64>| -> Vec<Option<f64>> {
            rows.iter()
                .map(|r| r.metrics.as_ref().and_then(|m| m.ww.as_ref()).and_then(f))
                .collect()
        };
        let ww_count = |f: fn(&weightwatcher::Layer) -> Option<u32>| -> Vec<Option<u32>> {
            rows.iter()
                .map(|r| r.metrics.as_ref().and_then(|m| m.ww.as_ref()).and_then(f))
                .collect()
        };
        let fit = |f: fn(&weightwatcher::Fit) -> f64| -> Vec<Option<f64>> {
            rows.iter()
                .map(|r| {
                    r.metrics
                        .as_ref()
                        .and_then(|m| m.ww.as_ref())
                        .and_then(|l| l.fit.as_ref())
                        .map(f)
                })
                .collect()
        };
        columns.extend([
            Column::new("alpha".into(), fit(|f| f.alpha)),
            Column::new("alpha_weighted".into(), ww(|l| l.alpha_weighted)),
            Column::new("xmin".into(), fit(|f| f.xmin)),
            Column::new("xmax".into(), fit(|f| f.xmax)),
            Column::new("D".into(), fit(|f| f.d)),
            Column::new("sigma".into(), fit(|f| f.sigma)),
            Column::new("num_pl_spikes".into(), ww_count(|l| l.num_pl_spikes)),
            Column::new("num_evals".into(), ww_count(|l| Some(l.num_evals))),
            Column::new("log_norm".into(), ww(|l| Some(l.log_norm))),
            Column::new(
                "log_spectral_norm".into(),
                ww(|l| Some(l.log_spectral_norm)),
            ),
            Column::new("log_alpha_norm".into(), ww(|l| l.log_alpha_norm)),
            Column::new("entropy".into(), ww(|l| Some(l.entropy))),
            Column::new("rank_loss".into(), ww_count(|l| Some(l.rank_loss))),
            Column::new(
                "warning".into(),
                rows.iter()
                    .map(|r| {
                        r.metrics
                            .as_ref()
                            .and_then(|m| m.ww.as_ref())
                            .and_then(|l| l.warning)
                    })
                    .collect::<Vec<_>>(),
            ),
        ]);
    }
    columns.extend([
        Column::new(
            "stable_rank_power".into(),
            rows.iter().map(|r| r.stable_rank_power).collect::<Vec<_>>(),
        ),
        Column::new(
            "recommended_rank".into(),
            rows.iter()
                .map(|r| r.recommended_rank as i64)
                .collect::<Vec<_>>(),
        ),
    ]);
    Ok(DataFrame::new(rows.len(), columns)?)
}

/// WeightWatcher's `get_summary()`: the means of its summary metrics over
/// the layers it analyses, with how many it flags.
fn weightwatcher_summary(rows: &[Row]) -> Option<String> {
    let layers: Vec<&weightwatcher::Layer> = rows
        .iter()
        .filter_map(|r| r.metrics.as_ref()?.ww.as_ref())
        .collect();
    let fitted: Vec<&weightwatcher::Layer> =
        layers.iter().copied().filter(|l| l.fit.is_some()).collect();
    if fitted.is_empty() {
        return None;
    }
    let mean = |f: &dyn Fn(&weightwatcher::Layer) -> Option<f64>| -> f64 {
        let values: Vec<f64> = layers.iter().filter_map(|l| f(l)).collect();
        values.iter().sum::<f64>() / values.len() as f64
    };
    let flagged = |w: &str| fitted.iter().filter(|l| l.warning == Some(w)).count();
    Some(format!(
        "WeightWatcher summary over {} matrices: log_norm {:.4}, alpha {:.4}, alpha_weighted {:.4}, log_alpha_norm {:.4}, log_spectral_norm {:.4}, stable_rank {:.4}; {} under-trained (alpha > {}), {} over-trained (alpha < {})",
        layers.len(),
        mean(&|l| Some(l.log_norm)),
        mean(&|l| l.fit.map(|f| f.alpha)),
        mean(&|l| l.alpha_weighted),
        mean(&|l| l.log_alpha_norm),
        mean(&|l| Some(l.log_spectral_norm)),
        mean(&|l| Some(l.stable_rank)),
        flagged("under-trained"),
        weightwatcher::UNDER_TRAINED_ABOVE,
        flagged("over-trained"),
        weightwatcher::OVER_TRAINED_BELOW,
    ))
}

/// Mean ratios by role, lowest-rank first: the "Q/K lower-rank than V/O and
/// MLP" view, with a verdict on whether it holds for this checkpoint.
fn role_summary(rows: &[Row]) -> Vec<String> {
    let mut by_role: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for row in rows {
        let Some(metrics) = &row.metrics else {
            continue;
        };
        let (Some(pr), Some(stable)) = (metrics.pr_rank_ratio, metrics.stable_rank_ratio) else {
            continue;
        };
        match by_role.iter_mut().find(|(role, ..)| *role == row.role) {
            Some((_, prs, stables)) => {
                prs.push(pr);
                stables.push(stable);
            }
            None => by_role.push((row.role.clone(), vec![pr], vec![stable])),
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut means: Vec<(String, f64, f64, usize)> = by_role
        .iter()
        .map(|(role, prs, stables)| (role.clone(), mean(prs), mean(stables), prs.len()))
        .collect();
    means.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut lines = vec!["mean rank ratios by role, lowest pr_rank_ratio first:".to_string()];
    for (role, pr, stable, n) in &means {
        lines.push(format!(
            "  {role:<10} pr_rank_ratio {pr:.3}  stable_rank_ratio {stable:.4}  ({n} matrices)"
        ));
    }
    let get = |role: &str| means.iter().find(|m| m.0 == role).map(|m| m.1);
    let routing: Vec<f64> = ["q", "k"].iter().filter_map(|r| get(r)).collect();
    let others: Vec<f64> = ["v", "o", "gate", "up", "down"]
        .iter()
        .filter_map(|r| get(r))
        .collect();
    if let (Some(max_routing), Some(min_other)) = (
        routing.iter().copied().reduce(f64::max),
        others.iter().copied().reduce(f64::min),
    ) {
        let verdict = if max_routing < min_other {
            "holds"
        } else {
            "does not hold"
        };
        lines.push(format!(
            "Q/K lower-rank than V/O and MLP (by pr_rank_ratio): {verdict} (q/k at most {max_routing:.3}, v/o/mlp at least {min_other:.3})"
        ));
    }
    lines
}

export_plugin!(Spectral);

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic m × n matrix U·diag(σ)·Vᵀ with orthogonal U, V built
    /// from Householder reflections, so its singular values are known.
    fn with_spectrum(m: usize, n: usize, sigma: &[f64]) -> Vec<f32> {
        let reflect = |dim: usize, seed: f64| -> Vec<Vec<f64>> {
            let v: Vec<f64> = (0..dim).map(|i| ((i as f64 + 1.0) * seed).sin()).collect();
            let norm_sq: f64 = v.iter().map(|x| x * x).sum();
            (0..dim)
                .map(|i| {
                    (0..dim)
                        .map(|j| f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / norm_sq)
                        .collect()
                })
                .collect()
        };
        let (u, v) = (reflect(m, 0.7), reflect(n, 1.3));
        let mut w = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = sigma
                    .iter()
                    .enumerate()
                    .map(|(r, s)| u[i][r] * s * v[j][r])
                    .sum();
                w[i * n + j] = s as f32;
            }
        }
        w
    }

    #[test]
    fn svd_recovers_known_singular_values() {
        let sigma = [9.0, 5.0, 2.0, 1.0, 0.5];
        let w = with_spectrum(7, 5, &sigma);
        for f64_precision in [false, true] {
            let got = singular_values(&w, 7, 5, f64_precision).unwrap();
            for (g, s) in got.iter().zip(sigma) {
                assert!((g - s).abs() < 1e-5 * s.max(1.0), "{got:?}");
            }
        }
        // Orientation does not matter.
        let wt: Vec<f32> = (0..5)
            .flat_map(|j| (0..7).map(move |i| (i, j)))
            .map(|(i, j)| w[i * 5 + j])
            .collect();
        let got = singular_values(&wt, 5, 7, true).unwrap();
        assert!((got[0] - 9.0).abs() < 1e-5 && (got[4] - 0.5).abs() < 1e-5);
    }

    #[test]
    fn identity_and_orthogonal_matrices() {
        let n = 6;
        let identity: Vec<f32> = (0..n * n)
            .map(|i| f32::from(u8::from(i % (n + 1) == 0)))
            .collect();
        let m = metrics(&singular_values(&identity, n, n, false).unwrap(), n);
        assert!((m.stable_rank.unwrap() - 6.0).abs() < 1e-5);
        assert!((m.erank.unwrap() - 6.0).abs() < 1e-5);
        let orthogonal = with_spectrum(n, n, &[1.0; 6]);
        let m = metrics(&singular_values(&orthogonal, n, n, true).unwrap(), n);
        assert!((m.pr_rank.unwrap() - 6.0).abs() < 1e-6);
        assert!((m.condition.unwrap() - 1.0).abs() < 1e-6);
        assert_eq!((m.r50, m.r90, m.r99), (Some(3), Some(6), Some(6)));
    }

    #[test]
    fn gram_route_matches_the_svd() {
        let sigma = [9.0, 5.0, 2.0, 1.0, 0.5];
        for (m, n) in [(7, 5), (5, 7), (9000, 5)] {
            let (rows, cols) = (m.max(n), m.min(n));
            let w = with_spectrum(rows, cols, &sigma);
            let w = if m < n {
                (0..cols)
                    .flat_map(|j| (0..rows).map(move |i| (i, j)))
                    .map(|(i, j)| w[i * cols + j])
                    .collect()
            } else {
                w
            };
            let got = gram_singular_values(&w, m, n).unwrap();
            assert_eq!(got.len(), 5);
            for (g, s) in got.iter().zip(sigma) {
                assert!((g - s).abs() < 1e-5 * s.max(1.0), "{m}×{n}: {got:?}");
            }
        }
    }

    #[test]
    fn non_finite_values_are_an_error() {
        assert!(singular_values(&[1.0, f32::NAN, 0.0, 1.0], 2, 2, false).is_err());
    }
}
