//! The geometry of one pool of hidden states `H` (`n` rows of width `d`),
//! in f64.
//!
//! Mean cosines are exact over every pair of distinct rows at any `n`: with
//! unit rows uᵢ and S = Σuᵢ, Σ_{i≠j} uᵢ·uⱼ = ‖S‖² − Σ‖uᵢ‖², so no pair is
//! sampled and the pool is read once.

/// Eigenvalues below this share of the largest count as zero.
pub const ZERO_EIGENVALUE: f64 = 1e-10;

/// What `geometry` reports for one layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Geometry {
    pub participation_ratio: f64,
    pub isotropy_raw: f64,
    pub isotropy_centred: f64,
    pub mean_norm: f64,
    pub spectral_flatness: f64,
    /// `None` with one category, or with no pair inside any category.
    pub category_separation: Option<f64>,
    pub erank: f64,
}

/// Rows scaled to unit length (a zero row stays zero: it has no direction,
/// and its pairs count with cosine 0).
fn unit_rows(rows: &[f64], d: usize) -> Vec<f64> {
    let mut out = rows.to_vec();
    for row in out.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    out
}

fn squared_norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum()
}

/// Mean cosine over all pairs of distinct rows, and the category
/// separation (c̄_intra − c̄_inter) / |c̄_inter| over pairs inside one
/// category and across two.
fn cosines(rows: &[f64], d: usize, categories: &[usize]) -> (f64, Option<f64>) {
    let n = categories.len();
    let units = unit_rows(rows, d);
    let kinds = categories.iter().max().map_or(0, |m| m + 1);
    let mut sum = vec![0.0f64; d];
    let mut by_kind = vec![vec![0.0f64; d]; kinds];
    let mut self_dots = vec![0.0f64; kinds];
    let mut counts = vec![0usize; kinds];
    for (u, &c) in units.chunks_exact(d).zip(categories) {
        for ((s, k), x) in sum.iter_mut().zip(by_kind[c].iter_mut()).zip(u) {
            *s += x;
            *k += x;
        }
        self_dots[c] += squared_norm(u);
        counts[c] += 1;
    }
    let all_self: f64 = self_dots.iter().sum();
    let pairs = (n * (n - 1)) as f64;
    let isotropy = (squared_norm(&sum) - all_self) / pairs;

    let kind_norms: Vec<f64> = by_kind.iter().map(|s| squared_norm(s)).collect();
    let intra_pairs: usize = counts.iter().map(|&m| m * m.saturating_sub(1)).sum();
    let inter_pairs = n * n - counts.iter().map(|&m| m * m).sum::<usize>();
    let separation = (intra_pairs > 0 && inter_pairs > 0)
        .then(|| {
            let intra = (kind_norms.iter().sum::<f64>() - all_self) / intra_pairs as f64;
            let inter = (squared_norm(&sum) - kind_norms.iter().sum::<f64>()) / inter_pairs as f64;
            (inter != 0.0).then(|| (intra - inter) / inter.abs())
        })
        .flatten();
    (isotropy, separation)
}

/// Eigenvalues of XᵀX (or of XXᵀ, whichever is smaller: the same nonzero
/// ones), largest first, clamped at 0.
fn gram_eigenvalues(x: &[f64], n: usize, d: usize) -> Result<Vec<f64>, String> {
    let m = faer::MatRef::from_row_major_slice(x, n, d);
    let gram = if n >= d {
        m.transpose() * m
    } else {
        m * m.transpose()
    };
    let mut values: Vec<f64> = gram
        .self_adjoint_eigenvalues(faer::Side::Lower)
        .map_err(|e| format!("eigenvalues did not converge ({e:?})"))?
        .into_iter()
        .map(|l| l.max(0.0))
        .collect();
    values.sort_by(|a, b| b.total_cmp(a));
    Ok(values)
}

/// Every metric of one pool: `pool` is `n × d` row-major (f32, as the
/// engine hands residuals out), `categories[i]` row i's category index.
pub fn pool_geometry(pool: &[f32], d: usize, categories: &[usize]) -> Result<Geometry, String> {
    let n = categories.len();
    if n < 2 || d == 0 || pool.len() != n * d {
        return Err(format!(
            "a pool of {} values is not {n} rows (at least 2) of {d}",
            pool.len()
        ));
    }
    if let Some(i) = pool.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "hidden state of scored token {} holds a non-finite value",
            i / d
        ));
    }
    let raw: Vec<f64> = pool.iter().map(|&v| f64::from(v)).collect();
    let mut mean = vec![0.0f64; d];
    for row in raw.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let centred: Vec<f64> = raw
        .chunks_exact(d)
        .flat_map(|row| row.iter().zip(&mean).map(|(v, m)| v - m))
        .collect();

    let mean_norm = raw
        .chunks_exact(d)
        .map(|row| squared_norm(row).sqrt())
        .sum::<f64>()
        / n as f64;
    let (isotropy_raw, category_separation) = cosines(&raw, d, categories);
    let (isotropy_centred, _) = cosines(&centred, d, categories);

    // Covariance eigenvalues λ = eig(XcᵀXc) / n: the scale cancels in both
    // ratios below.
    let lambda = gram_eigenvalues(&centred, n, d)?;
    let total: f64 = lambda.iter().sum();
    let squares: f64 = lambda.iter().map(|l| l * l).sum();
    let participation_ratio = if squares > 0.0 {
        total * total / squares
    } else {
        0.0
    };
    // A pool of n centred states spans at most n − 1 directions: flatness
    // is taken over the min(n − 1, d) eigenvalues it can hold, and is 0
    // when one of them is zero — under 10⁻¹⁰ λ_max, the solver's rounding,
    // as when the pool repeats a state (the same token embedded twice).
    let held = &lambda[..(n - 1).min(d).min(lambda.len())];
    let floor = ZERO_EIGENVALUE * lambda.first().copied().unwrap_or(0.0);
    let spectral_flatness = if held.iter().all(|&l| l > floor) && !held.is_empty() {
        let log_mean = held.iter().map(|l| l.ln()).sum::<f64>() / held.len() as f64;
        log_mean.exp() / (held.iter().sum::<f64>() / held.len() as f64)
    } else {
        0.0
    };

    let sigma: Vec<f64> = gram_eigenvalues(&raw, n, d)?
        .into_iter()
        .map(f64::sqrt)
        .collect();
    let sigma_total: f64 = sigma.iter().sum();
    let erank = if sigma_total > 0.0 {
        let entropy: f64 = sigma
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|&s| {
                let q = s / sigma_total;
                -q * q.ln()
            })
            .sum();
        entropy.exp()
    } else {
        0.0
    };

    Ok(Geometry {
        participation_ratio,
        isotropy_raw,
        isotropy_centred,
        mean_norm,
        spectral_flatness,
        category_separation,
        erank,
    })
}
