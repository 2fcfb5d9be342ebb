//! The per-layer columns WeightWatcher 0.7.7 writes (`analyze()` with its
//! defaults), computed as it computes them, so that a probe table and a
//! WeightWatcher frame can be diffed column by column.
//!
//! Its eigenvalues are λ = σ² of the matrix, all min(m, n) of them. The
//! heavy-tail fit is its own power-law fit (not the `powerlaw` package's):
//! over the eigenvalues above 1e-5, sorted, every one but the largest is a
//! candidate x_min (repeated values included); at each, alpha is the
//! untruncated maximum-likelihood estimate 1 + n / Σ ln(λ / x_min) over the
//! n eigenvalues from it on, and D the Kolmogorov–Smirnov distance
//! max |1 − (λ / x_min)^(1 − alpha) − k/n| (k = 0 … n−1), D = 1 where
//! alpha ≤ 1; the fit kept is the first with the smallest D. With fewer
//! than 20 eigenvalues it switches to a small-sample fit (bias-corrected
//! alpha 1 + (n − 1) / Σ ln(λ / x_min), at least 8 in the tail, x_min
//! minimising D − 0.868 / √n). Layers with fewer than 8 eigenvalues are not
//! analysed at all.

/// Eigenvalues at or below this are left out of the fit (EVALS_THRESH).
pub const EVALS_THRESH: f64 = 1e-5;
/// Layers with fewer eigenvalues are not analysed (DEFAULT_MIN_EVALS).
pub const MIN_EVALS: usize = 8;
/// Below this many eigenvalues the small-sample fit runs (SMALL_N_CUTOFF).
const SMALL_N: usize = 20;
/// The small-sample fit's least tail.
const SMALL_N_MIN_TAIL: usize = 8;
/// Added to probabilities and the rank in the matrix entropy (EPSILON).
const EPSILON: f64 = 1e-10;
/// alpha below this: "over-trained"; above the next: "under-trained".
pub const OVER_TRAINED_BELOW: f64 = 2.0;
pub const UNDER_TRAINED_ABOVE: f64 = 6.0;

/// WeightWatcher's power-law fit of one layer's eigenvalues.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    pub alpha: f64,
    pub xmin: f64,
    /// The largest eigenvalue fitted.
    pub xmax: f64,
    /// KS distance of the fit.
    pub d: f64,
    /// Standard error of alpha: (alpha − 1) / √(eigenvalues from x_min's
    /// index on, of all fitted).
    pub sigma: f64,
}

/// The fit over `eigenvalues` (any order); `None` with fewer than two above
/// [`EVALS_THRESH`].
pub fn fit(eigenvalues: &[f64]) -> Option<Fit> {
    let mut data: Vec<f64> = eigenvalues
        .iter()
        .copied()
        .filter(|&v| v > EVALS_THRESH)
        .collect();
    if data.len() < 2 {
        return None;
    }
    data.sort_by(f64::total_cmp);
    let logs: Vec<f64> = data.iter().map(|v| v.ln()).collect();
    // tail_log_sum[i] = Σ_{j ≥ i} ln λ_j
    let mut tail_log_sum = vec![0.0; data.len() + 1];
    for i in (0..data.len()).rev() {
        tail_log_sum[i] = tail_log_sum[i + 1] + logs[i];
    }
    let total = data.len();
    // (λ / x_min)^(1 − alpha) as exp((1 − alpha)(ln λ − ln x_min)): one
    // exponential per term from the logs at hand, not a power (the fit is
    // quadratic in the eigenvalues, and this is its inner loop).
    let ks = |i: usize, alpha: f64| -> f64 {
        let n = (total - i) as f64;
        let (log_min, exponent) = (logs[i], 1.0 - alpha);
        logs[i..]
            .iter()
            .enumerate()
            .map(|(k, &log_x)| (1.0 - (exponent * (log_x - log_min)).exp() - k as f64 / n).abs())
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let candidates = total - 1;
    let mut alphas = vec![0.0; candidates];
    let mut ds = vec![1.0; candidates];
    let chosen = if total < SMALL_N {
        // The small-sample objective, +∞ where a candidate is not fitted.
        let mut objective = vec![f64::INFINITY; candidates];
        for i in 0..candidates {
            let n_tail = total - i;
            if n_tail < SMALL_N_MIN_TAIL {
                continue;
            }
            let n = n_tail as f64;
            let s = tail_log_sum[i] - n * logs[i];
            if s <= 1e-12 {
                continue;
            }
            let alpha = 1.0 + (n - 1.0) / s;
            alphas[i] = alpha;
            if alpha <= 1.0 {
                continue;
            }
            ds[i] = ks(i, alpha);
            objective[i] = ds[i] - 0.868 / n.sqrt();
        }
        match first_min(&objective) {
            Some(i) if objective[i].is_finite() => i,
            _ => {
                // Nothing fitted: the whole sample from its smallest value.
                let n = total as f64;
                let s = tail_log_sum[0] - n * logs[0];
                if s <= 1e-12 {
                    return Some(Fit {
                        alpha: 1.0,
                        xmin: data[0],
                        xmax: data[total - 1],
                        d: 1.0,
                        sigma: 0.0,
                    });
                }
                alphas[0] = 1.0 + (n - 1.0) / s;
                ds[0] = ks(0, alphas[0]);
                0
            }
        }
    } else {
        for i in 0..candidates {
            let n = (total - i) as f64;
            let alpha = 1.0 + n / (tail_log_sum[i] - n * logs[i]);
            alphas[i] = alpha;
            if alpha > 1.0 {
                ds[i] = ks(i, alpha);
            }
        }
        first_min(&ds)?
    };
    let alpha = alphas[chosen];
    Some(Fit {
        alpha,
        xmin: data[chosen],
        xmax: data[total - 1],
        d: ds[chosen],
        sigma: (alpha - 1.0) / ((total - chosen) as f64).sqrt(),
    })
}

/// Index of the first smallest value (numpy's argmin; NaN never smallest).
fn first_min(values: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|b| *v < values[b]) {
            best = Some(i);
        }
    }
    best
}

/// Every column WeightWatcher writes for one layer that probe writes too.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub fit: Option<Fit>,
    /// alpha · log₁₀ λ_max.
    pub alpha_weighted: Option<f64>,
    /// Eigenvalues at or above x_min.
    pub num_pl_spikes: Option<u32>,
    pub num_evals: u32,
    /// log₁₀ Σλ.
    pub log_norm: f64,
    /// log₁₀ λ_max.
    pub log_spectral_norm: f64,
    /// log₁₀ Σ λ^alpha.
    pub log_alpha_norm: Option<f64>,
    /// Σλ / λ_max.
    pub stable_rank: f64,
    /// −Σ p ln p / ln(rank), p = λ / Σλ (+1e-10 each), rank the numerical rank.
    pub entropy: f64,
    /// Singular values at or below the numerical-rank tolerance.
    pub rank_loss: u32,
    /// "over-trained" (alpha < 2), "under-trained" (alpha > 6) or "".
    pub warning: Option<&'static str>,
}

/// The layer's columns from its singular values (any order) and its larger
/// dimension (the numerical rank's tolerance is σ_max · N · ε); `None` for
/// a layer WeightWatcher does not analyse (fewer than [`MIN_EVALS`]
/// eigenvalues, or a zero matrix).
pub fn layer(sigma: &[f64], largest_dim: usize) -> Option<Layer> {
    let sigma_max = sigma.iter().copied().fold(0.0, f64::max);
    if sigma.len() < MIN_EVALS || sigma_max <= 0.0 {
        return None;
    }
    let evals: Vec<f64> = sigma.iter().map(|s| s * s).collect();
    let norm: f64 = evals.iter().sum();
    let spectral_norm = sigma_max * sigma_max;
    let tolerance = sigma_max * largest_dim as f64 * f64::EPSILON;
    let rank = sigma.iter().filter(|&&s| s > tolerance).count();
    let entropy = -evals
        .iter()
        .map(|e| e / norm + EPSILON)
        .map(|p| p * p.ln())
        .sum::<f64>()
        / (rank as f64 + EPSILON).ln();
    let fit = fit(&evals);
    let alpha = fit.map(|f| f.alpha);
    Some(Layer {
        fit,
        alpha_weighted: alpha.map(|a| a * spectral_norm.log10()),
        num_pl_spikes: fit.map(|f| evals.iter().filter(|&&e| e >= f.xmin).count() as u32),
        num_evals: evals.len() as u32,
        log_norm: norm.log10(),
        log_spectral_norm: spectral_norm.log10(),
        log_alpha_norm: alpha.map(|a| evals.iter().map(|e| e.powf(a)).sum::<f64>().log10()),
        stable_rank: norm / spectral_norm,
        entropy,
        rank_loss: (sigma.len() - rank) as u32,
        warning: alpha.map(|a| {
            if a < OVER_TRAINED_BELOW {
                "over-trained"
            } else if a > UNDER_TRAINED_ABOVE {
                "under-trained"
            } else {
                ""
            }
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws of a Pareto law with exponent `alpha` above 1 (inverse CDF on
    /// an evenly spaced grid, so the test is deterministic).
    fn pareto(alpha: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let u = (i as f64 + 0.5) / n as f64;
                (1.0 - u).powf(-1.0 / (alpha - 1.0))
            })
            .collect()
    }

    #[test]
    fn a_pareto_sample_gives_its_exponent() {
        let fit = fit(&pareto(2.5, 400)).unwrap();
        assert!((fit.alpha - 2.5).abs() < 0.05, "{fit:?}");
        assert!(fit.d < 0.05);
        assert_eq!(fit.xmax, pareto(2.5, 400)[399]);
    }

    /// The estimate and the KS distance at one x_min, written out.
    #[test]
    fn alpha_and_d_are_the_formulas_at_the_chosen_xmin() {
        let data: Vec<f64> = (1..=30).map(|i| (i as f64).powf(1.7)).collect();
        let f = fit(&data).unwrap();
        let i = data.iter().position(|&x| x == f.xmin).unwrap();
        let n = (data.len() - i) as f64;
        let alpha = 1.0 + n / data[i..].iter().map(|x| (x / f.xmin).ln()).sum::<f64>();
        assert!((f.alpha - alpha).abs() < 1e-12);
        let d = data[i..]
            .iter()
            .enumerate()
            .map(|(k, x)| (1.0 - (x / f.xmin).powf(1.0 - alpha) - k as f64 / n).abs())
            .fold(0.0, f64::max);
        assert!((f.d - d).abs() < 1e-12);
        assert!((f.sigma - (alpha - 1.0) / n.sqrt()).abs() < 1e-12);
        // No other candidate has a smaller D.
        for j in 0..data.len() - 1 {
            let n = (data.len() - j) as f64;
            let a = 1.0 + n / data[j..].iter().map(|x| (x / data[j]).ln()).sum::<f64>();
            let dj = data[j..]
                .iter()
                .enumerate()
                .map(|(k, x)| (1.0 - (x / data[j]).powf(1.0 - a) - k as f64 / n).abs())
                .fold(0.0, f64::max);
            assert!(dj >= f.d - 1e-15, "candidate {j}: D {dj} < {}", f.d);
        }
    }

    #[test]
    fn small_samples_use_the_bias_corrected_estimate() {
        let data = pareto(3.0, 12);
        let f = fit(&data).unwrap();
        let i = data.iter().position(|&x| x == f.xmin).unwrap();
        assert!(data.len() - i >= SMALL_N_MIN_TAIL);
        let n = (data.len() - i) as f64;
        let alpha = 1.0 + (n - 1.0) / data[i..].iter().map(|x| (x / f.xmin).ln()).sum::<f64>();
        assert!((f.alpha - alpha).abs() < 1e-12);
    }

    #[test]
    fn layer_columns() {
        // σ = 4, 2, 1, 1, … : λ = 16, 4, 1, …
        let mut sigma = vec![4.0, 2.0];
        sigma.extend(std::iter::repeat_n(1.0, 10));
        let l = layer(&sigma, 100).unwrap();
        let norm = 16.0 + 4.0 + 10.0;
        assert_eq!(l.num_evals, 12);
        assert!((l.log_norm - f64::log10(norm)).abs() < 1e-12);
        assert!((l.log_spectral_norm - f64::log10(16.0)).abs() < 1e-12);
        assert!((l.stable_rank - norm / 16.0).abs() < 1e-12);
        assert_eq!(l.rank_loss, 0);
        let p: Vec<f64> = [16.0, 4.0]
            .into_iter()
            .chain(std::iter::repeat_n(1.0, 10))
            .map(|e| e / norm + 1e-10)
            .collect();
        let h = -p.iter().map(|p| p * p.ln()).sum::<f64>() / (12.0f64 + 1e-10).ln();
        assert!((l.entropy - h).abs() < 1e-12);
        let a = l.fit.unwrap().alpha;
        let weighted = a * 16f64.log10();
        assert!((l.alpha_weighted.unwrap() - weighted).abs() < 1e-12);
        // Numerically zero singular values are rank loss.
        let mut flat = sigma.clone();
        flat.extend([1e-20, 0.0]);
        assert_eq!(layer(&flat, 100).unwrap().rank_loss, 2);
        // Too few eigenvalues, or a zero matrix: not analysed.
        assert!(layer(&[1.0; 7], 10).is_none());
        assert!(layer(&[0.0; 9], 10).is_none());
    }

    #[test]
    fn warnings_follow_the_thresholds() {
        let over = layer(
            &pareto(1.6, 200)
                .iter()
                .map(|x| x.sqrt())
                .collect::<Vec<_>>(),
            300,
        )
        .unwrap();
        assert!(over.fit.unwrap().alpha < 2.0);
        assert_eq!(over.warning, Some("over-trained"));
        let fine = layer(
            &pareto(3.5, 200)
                .iter()
                .map(|x| x.sqrt())
                .collect::<Vec<_>>(),
            300,
        )
        .unwrap();
        assert_eq!(fine.warning, Some(""));
    }
}
