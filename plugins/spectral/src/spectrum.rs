//! Spectral metrics of one matrix, exactly as `docs/metrics.md` defines
//! them ("Spectral structure"). σ are the singular values, sorted
//! descending; k = min(m, n); pᵢ = σᵢ² / Σσ².

use crate::weightwatcher;
/// Singular values below this fraction of σ₁ are numerically zero for
/// `sigma_min` and `condition`.
pub const SIGMA_MIN_RELATIVE: f64 = 1e-6;
/// `alpha_loglog` fits ln σᵢ over σᵢ above this (absolute) value.
pub const LOGLOG_FLOOR: f64 = 1e-6;
/// WeightWatcher drops eigenvalues at or below this before fitting
/// (its EVALS_THRESH) …
pub const WW_EVALS_THRESHOLD: f64 = 1e-5;
/// … and does not fit fewer than this many (its MIN_NUM_EVALS).
pub const WW_MIN_EVALS: usize = 10;

/// Every metric of the spectral table; `None` where undefined (a zero
/// matrix, too few eigenvalues for a fit, …), written as null.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub sigma_max: f64,
    pub sigma_min: Option<f64>,
    pub frobenius: f64,
    pub stable_rank: Option<f64>,
    pub stable_rank_ratio: Option<f64>,
    pub pr_rank: Option<f64>,
    pub pr_rank_ratio: Option<f64>,
    pub erank: Option<f64>,
    pub spectral_entropy: Option<f64>,
    pub r50: Option<u32>,
    pub r90: Option<u32>,
    pub r99: Option<u32>,
    pub condition: Option<f64>,
    pub alpha_loglog: Option<f64>,
    /// The power law bounded at λ_max ([`powerlaw_fit`]).
    pub alpha_truncated: Option<f64>,
    /// WeightWatcher 0.7.7's columns, its `alpha` among them.
    pub ww: Option<weightwatcher::Layer>,
}

/// Metrics from singular values (any order; any non-negative values) of a
/// matrix whose larger dimension is `largest_dim`.
pub fn metrics(sigma: &[f64], largest_dim: usize) -> Metrics {
    let mut sigma: Vec<f64> = sigma.iter().map(|s| s.abs()).collect();
    sigma.sort_by(|a, b| b.total_cmp(a));
    let k = sigma.len();
    let sigma_max = sigma.first().copied().unwrap_or(0.0);
    let energy: f64 = sigma.iter().map(|s| s * s).sum();
    let frobenius = energy.sqrt();
    let defined = k > 0 && sigma_max > 0.0 && energy > 0.0;
    if !defined {
        return Metrics {
            sigma_max,
            sigma_min: None,
            frobenius,
            stable_rank: None,
            stable_rank_ratio: None,
            pr_rank: None,
            pr_rank_ratio: None,
            erank: None,
            spectral_entropy: None,
            r50: None,
            r90: None,
            r99: None,
            condition: None,
            alpha_loglog: None,
            alpha_truncated: None,
            ww: None,
        };
    }
    let kf = k as f64;
    let sigma_min = sigma
        .iter()
        .rev()
        .find(|&&s| s > SIGMA_MIN_RELATIVE * sigma_max)
        .copied();
    let stable_rank = energy / (sigma_max * sigma_max);
    let p: Vec<f64> = sigma.iter().map(|s| s * s / energy).collect();
    let pr_rank = 1.0 / p.iter().map(|x| x * x).sum::<f64>();
    let sum_sigma: f64 = sigma.iter().sum();
    let erank = (-sigma
        .iter()
        .map(|s| s / sum_sigma)
        .filter(|&q| q > 0.0)
        .map(|q| q * q.ln())
        .sum::<f64>())
    .exp();
    let entropy = -p
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|x| x * x.ln())
        .sum::<f64>();
    let spectral_entropy = (k > 1).then(|| entropy / kf.ln());
    let rank_at = |share: f64| -> u32 {
        let mut cumulative = 0.0;
        for (i, x) in p.iter().enumerate() {
            cumulative += x;
            // A hair of tolerance, so that exactly-reached shares count.
            if cumulative >= share - 1e-12 {
                return i as u32 + 1;
            }
        }
        k as u32
    };
    let eigenvalues: Vec<f64> = sigma.iter().map(|s| s * s).collect();
    Metrics {
        sigma_max,
        sigma_min,
        frobenius,
        stable_rank: Some(stable_rank),
        stable_rank_ratio: Some(stable_rank / kf),
        pr_rank: Some(pr_rank),
        pr_rank_ratio: Some(pr_rank / kf),
        erank: Some(erank),
        spectral_entropy,
        r50: Some(rank_at(0.5)),
        r90: Some(rank_at(0.9)),
        r99: Some(rank_at(0.99)),
        condition: sigma_min.map(|s| sigma_max / s),
        alpha_loglog: loglog_slope(&sigma).map(|slope| -slope),
        alpha_truncated: powerlaw_fit(&eigenvalues).map(|fit| fit.alpha),
        ww: weightwatcher::layer(&sigma, largest_dim),
    }
}

/// Ordinary least-squares slope of ln σᵢ against ln i (i from 1), over σᵢ > 1e-6.
fn loglog_slope(sigma_desc: &[f64]) -> Option<f64> {
    let points: Vec<(f64, f64)> = sigma_desc
        .iter()
        .enumerate()
        .filter(|(_, &s)| s > LOGLOG_FLOOR)
        .map(|(i, s)| (((i + 1) as f64).ln(), s.ln()))
        .collect();
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let var: f64 = points
        .iter()
        .map(|(x, _)| (x - mean_x) * (x - mean_x))
        .sum();
    (var > 0.0).then(|| cov / var)
}

/// A power-law fit of a tail of eigenvalues.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PowerLawFit {
    pub alpha: f64,
    pub xmin: f64,
    pub xmax: f64,
    /// Kolmogorov–Smirnov distance of the fit at `xmin`.
    pub ks_distance: f64,
    pub n_tail: usize,
}

/// The heavy-tail fit bounded at λ_max (`alpha_truncated`): eigenvalues
/// above 1e-5, a power law on [x_min, λ_max] — the `powerlaw` package's
/// fit with xmax = λ_max, which WeightWatcher runs with `xmax='force',
/// pl_package='powerlaw'` — its exponent by maximum likelihood, and x_min
/// the candidate (every distinct eigenvalue but the largest) whose fit has
/// the smallest KS distance, among fits with alpha > 1 when there are any.
/// WeightWatcher's default fit is [`weightwatcher::fit`].
pub fn powerlaw_fit(eigenvalues: &[f64]) -> Option<PowerLawFit> {
    let mut x: Vec<f64> = eigenvalues
        .iter()
        .copied()
        .filter(|&v| v > WW_EVALS_THRESHOLD && v.is_finite())
        .collect();
    if x.len() < WW_MIN_EVALS {
        return None;
    }
    x.sort_by(f64::total_cmp);
    let logs: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    // suffix[i] = Σ_{j ≥ i} ln x_j
    let mut suffix = vec![0.0; x.len() + 1];
    for i in (0..x.len()).rev() {
        suffix[i] = suffix[i + 1] + logs[i];
    }
    let xmax = *x.last()?;
    let log_max = xmax.ln();
    let mut best: Option<(bool, PowerLawFit)> = None;
    let mut i = 0;
    while i < x.len() {
        let xmin = x[i];
        if xmin >= xmax {
            break; // the largest distinct value is no candidate
        }
        let n = x.len() - i;
        let log_min = logs[i];
        let span = log_max - log_min;
        let beta = solve_beta(suffix[i] / n as f64 - log_min, span);
        let in_range = beta > 0.0;
        // The distance this fit must get under to replace the best: none
        // when the best is out of range and this one is in, and no fit
        // can replace an in-range best from out of range. The distance
        // stops being summed once it reaches the bound (it could not win),
        // so the kept fit's distance is always whole.
        let bound = match &best {
            None => Some(f64::INFINITY),
            Some((best_in_range, best_fit)) => match (in_range, best_in_range) {
                (true, false) => Some(f64::INFINITY),
                (false, true) => None,
                _ => Some(best_fit.ks_distance),
            },
        };
        if let Some(bound) = bound {
            let ks = ks_distance(&logs[i..], log_min, span, beta, bound);
            if ks < bound {
                let fit = PowerLawFit {
                    alpha: 1.0 + beta,
                    xmin,
                    xmax,
                    ks_distance: ks,
                    n_tail: n,
                };
                best = Some((in_range, fit));
            }
        }
        // Next distinct value.
        while i < x.len() && x[i] == xmin {
            i += 1;
        }
    }
    best.map(|(_, fit)| fit)
}

/// E[ln x − ln x_min] under a power law with exponent 1 + β truncated to
/// [x_min, x_max] (span = ln x_max − ln x_min): in t = ln x the density is
/// a truncated exponential ∝ e^(−βt), whose mean is 1/β − L/(e^(βL) − 1).
fn mean_log_excess(beta: f64, span: f64) -> f64 {
    let z = beta * span;
    if z.abs() < 1e-6 {
        // Series around β = 0: L/2 − βL²/12.
        return span / 2.0 - beta * span * span / 12.0;
    }
    1.0 / beta - span / z.exp_m1()
}

/// The maximum-likelihood β: the truncated model's mean log-excess equals
/// the sample's (the likelihood is concave in β; its mean is monotone).
fn solve_beta(sample_mean_excess: f64, span: f64) -> f64 {
    let (mut lo, mut hi) = (-1e4 / span.max(1e-300), 1e4 / span.max(1e-300));
    lo = lo.max(-1e4);
    hi = hi.min(1e4);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        let before = (lo, hi);
        // mean_log_excess decreases in β.
        if mean_log_excess(mid, span) > sample_mean_excess {
            lo = mid;
        } else {
            hi = mid;
        }
        // Once the bracket stops moving every later step repeats this one:
        // stopping here gives the same β as all 200 (about 60 suffice).
        if (lo, hi) == before {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// KS distance between the tail (ln values, sorted ascending) and the
/// truncated power law, with the `powerlaw` package's empirical CDF: at each
/// distinct value, the share of the tail strictly below it. Returns as soon
/// as the distance reaches `bound` (a value ≥ `bound`, not the distance).
fn ks_distance(tail_logs: &[f64], log_min: f64, span: f64, beta: f64, bound: f64) -> f64 {
    let n = tail_logs.len() as f64;
    let model_cdf = |t: f64| {
        let u = t - log_min;
        if (beta * span).abs() < 1e-9 {
            u / span
        } else {
            (-beta * u).exp_m1() / (-beta * span).exp_m1()
        }
    };
    let mut distance: f64 = 0.0;
    let mut i = 0;
    while i < tail_logs.len() {
        let t = tail_logs[i];
        let empirical = i as f64 / n;
        distance = distance.max((model_cdf(t) - empirical).abs());
        if distance >= bound {
            return distance;
        }
        while i < tail_logs.len() && tail_logs[i] == t {
            i += 1;
        }
    }
    distance
}

/// σ₁ estimated by `iterations` steps of v ← WᵀWv / ‖WᵀWv‖ from v₀ = 1/√n,
/// and ‖W‖_F² exactly. `values` is row-major rows × cols.
pub fn power_estimate(values: &[f32], rows: usize, cols: usize, iterations: usize) -> (f64, f64) {
    let frobenius_sq: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    if rows == 0 || cols == 0 || frobenius_sq == 0.0 {
        return (0.0, frobenius_sq);
    }
    let mut v = vec![1.0 / (cols as f64).sqrt(); cols];
    let mut u = vec![0.0f64; rows];
    let mut sigma = 0.0;
    for _ in 0..iterations.max(1) {
        // u = W v
        for (r, out) in u.iter_mut().enumerate() {
            let row = &values[r * cols..(r + 1) * cols];
            *out = row.iter().zip(&v).map(|(&w, &x)| f64::from(w) * x).sum();
        }
        sigma = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        // v = Wᵀ u, normalised
        v.iter_mut().for_each(|x| *x = 0.0);
        for (r, &ur) in u.iter().enumerate() {
            let row = &values[r * cols..(r + 1) * cols];
            for (x, &w) in v.iter_mut().zip(row) {
                *x += f64::from(w) * ur;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            break;
        }
        v.iter_mut().for_each(|x| *x /= norm);
    }
    // ‖W v‖ for the final unit v.
    let last: f64 = (0..rows)
        .map(|r| {
            let row = &values[r * cols..(r + 1) * cols];
            let dot: f64 = row.iter().zip(&v).map(|(&w, &x)| f64::from(w) * x).sum();
            dot * dot
        })
        .sum::<f64>()
        .sqrt();
    (last.max(sigma), frobenius_sq)
}

/// clamp(⌈1.5 · stable_rank⌉, r_min, k).
pub fn recommended_rank(stable_rank: f64, r_min: usize, k: usize) -> usize {
    let wanted = (1.5 * stable_rank).ceil();
    let wanted = if wanted.is_finite() && wanted > 0.0 {
        wanted as usize
    } else {
        0
    };
    wanted.clamp(r_min.min(k), k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn identity_spectrum() {
        let m = metrics(&[1.0; 16], 16);
        assert_eq!(m.sigma_max, 1.0);
        assert_eq!(m.sigma_min, Some(1.0));
        assert!(close(m.frobenius, 4.0));
        assert!(close(m.stable_rank.unwrap(), 16.0));
        assert!(close(m.stable_rank_ratio.unwrap(), 1.0));
        assert!(close(m.pr_rank.unwrap(), 16.0));
        assert!(close(m.erank.unwrap(), 16.0));
        assert!(close(m.spectral_entropy.unwrap(), 1.0));
        assert_eq!((m.r50, m.r90, m.r99), (Some(8), Some(15), Some(16)));
        assert!(close(m.condition.unwrap(), 1.0));
        assert!(close(m.alpha_loglog.unwrap(), 0.0));
        // All eigenvalues equal: no tail to fit (only one distinct value).
        assert_eq!(m.alpha_truncated, None);
    }

    #[test]
    fn rank_one_spectrum() {
        let mut sigma = vec![0.0; 10];
        sigma[0] = 3.0;
        let m = metrics(&sigma, 10);
        assert_eq!(m.sigma_min, Some(3.0));
        assert!(close(m.stable_rank.unwrap(), 1.0));
        assert!(close(m.stable_rank_ratio.unwrap(), 0.1));
        assert!(close(m.pr_rank.unwrap(), 1.0));
        assert!(close(m.erank.unwrap(), 1.0));
        assert!(close(m.spectral_entropy.unwrap(), 0.0));
        assert_eq!((m.r50, m.r90, m.r99), (Some(1), Some(1), Some(1)));
        assert!(close(m.condition.unwrap(), 1.0));
        assert_eq!(m.alpha_loglog, None, "one point above the floor");
    }

    #[test]
    fn chosen_diagonal_spectrum() {
        // σ = 4, 2, 1, 1 — worked by hand: Σσ² = 22, Σσ⁴ = 274, Σσ = 8.
        let m = metrics(&[1.0, 4.0, 1.0, 2.0], 4);
        assert!(close(m.frobenius, 22f64.sqrt()));
        assert!(close(m.stable_rank.unwrap(), 22.0 / 16.0));
        assert!(close(m.pr_rank.unwrap(), 22.0 * 22.0 / 274.0));
        assert!(close(m.pr_rank_ratio.unwrap(), 22.0 * 22.0 / 274.0 / 4.0));
        let q = [0.5f64, 0.25, 0.125, 0.125];
        let erank = (-q.iter().map(|x| x * x.ln()).sum::<f64>()).exp();
        assert!(close(m.erank.unwrap(), erank));
        let p = [16.0 / 22.0, 4.0 / 22.0, 1.0 / 22.0, 1.0 / 22.0];
        let h = -p.iter().map(|x: &f64| x * x.ln()).sum::<f64>() / 4f64.ln();
        assert!(close(m.spectral_entropy.unwrap(), h));
        // cumulative energy: 0.727, 0.909, 0.955, 1.0
        assert_eq!((m.r50, m.r90, m.r99), (Some(1), Some(2), Some(4)));
        assert!(close(m.condition.unwrap(), 4.0));
        // ln σ against ln i for i = 1..4, by the normal equations.
        let xs: Vec<f64> = (1..=4).map(|i| (i as f64).ln()).collect();
        let ys = [4f64.ln(), 2f64.ln(), 0.0, 0.0];
        let (mx, my) = (xs.iter().sum::<f64>() / 4.0, ys.iter().sum::<f64>() / 4.0);
        let slope = xs
            .iter()
            .zip(&ys)
            .map(|(x, y)| (x - mx) * (y - my))
            .sum::<f64>()
            / xs.iter().map(|x| (x - mx) * (x - mx)).sum::<f64>();
        assert!(close(m.alpha_loglog.unwrap(), -slope));
    }

    #[test]
    fn sigma_min_ignores_numerical_zeros() {
        let m = metrics(&[10.0, 1.0, 1e-8], 3);
        assert_eq!(m.sigma_min, Some(1.0));
        assert!(close(m.condition.unwrap(), 10.0));
    }

    #[test]
    fn zero_matrix_has_no_ranks() {
        let m = metrics(&[0.0; 5], 5);
        assert_eq!(m.sigma_max, 0.0);
        assert_eq!(m.stable_rank, None);
        assert_eq!(m.alpha_truncated, None);
        assert_eq!(m.ww, None);
    }

    #[test]
    fn powerlaw_recovers_a_known_exponent() {
        // Deterministic quantiles of a Pareto with α = 2.5 on [1, ∞), cut at
        // a large x_max: the MLE must come back near 2.5 with x_min near 1.
        let n = 4000;
        let alpha: f64 = 2.5;
        let data: Vec<f64> = (0..n)
            .map(|i| {
                let u = (i as f64 + 0.5) / n as f64;
                (1.0 - u).powf(-1.0 / (alpha - 1.0))
            })
            .collect();
        let fit = powerlaw_fit(&data).unwrap();
        assert!((fit.alpha - 2.5).abs() < 0.05, "{fit:?}");
        assert!(fit.xmin < 1.5, "{fit:?}");
        assert!(fit.ks_distance < 0.02, "{fit:?}");
    }

    #[test]
    fn mle_matches_the_closed_form_without_truncation_effects() {
        // With x_max far away the truncated MLE approaches 1 + n / Σ ln(x/x_min).
        let beta = solve_beta(1.0 / 1.7, 200.0);
        assert!((beta - 1.7).abs() < 1e-9, "{beta}");
    }

    #[test]
    fn power_iteration_finds_sigma_max() {
        // diag(3, 1) embedded in a 2 × 3 matrix.
        let w = [3.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];
        let (sigma, fro_sq) = power_estimate(&w, 2, 3, 30);
        assert!((sigma - 3.0).abs() < 1e-9);
        assert!((fro_sq - 10.0).abs() < 1e-12);
        assert_eq!(recommended_rank(10.0 / 9.0, 1, 2), 2);
        assert_eq!(recommended_rank(1.0, 1, 100), 2);
        assert_eq!(recommended_rank(0.1, 4, 100), 4);
        assert_eq!(recommended_rank(500.0, 1, 100), 100);
    }
}
