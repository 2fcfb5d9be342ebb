//! Every eigenvalue of a symmetric tridiagonal matrix, without eigenvectors:
//! the Pal–Walker–Kahan root-free variant of the implicit QL/QR algorithm
//! (the method of LAPACK's `dsterf`, which `dsyevd` runs when no vectors are
//! asked for).
//!
//! Why not faer's: its eigenvalues-only path runs the implicit QR with a
//! Givens rotation per step (a scaled square root each), and on SmolLM2 that
//! was a quarter of the whole `spectral` run, as long as reducing the Gram
//! matrices to tridiagonal form. The root-free variant works on the squared
//! off-diagonals and takes one division per step; its results agree with
//! faer's to rounding (tests below, and every spectral test against numpy
//! and WeightWatcher).

/// Convergence failed: this many off-diagonals were still not negligible
/// after 30·n QL/QR sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoConvergence(pub usize);

/// Overwrites `diag` (length n) with the eigenvalues of the tridiagonal
/// matrix with that diagonal and sub-diagonal `off` (length n − 1 or more;
/// destroyed), ascending.
pub fn eigenvalues(diag: &mut [f64], off: &mut [f64]) -> Result<(), NoConvergence> {
    let n = diag.len();
    if n <= 1 {
        return Ok(());
    }
    assert!(off.len() >= n - 1, "the sub-diagonal needs n − 1 entries");
    let e = &mut off[..n - 1];
    let d = diag;
    let eps = f64::EPSILON / 2.0;
    let eps2 = eps * eps;
    let safe_min = f64::MIN_POSITIVE;
    let safe_max = 1.0 / safe_min;
    // Blocks are scaled into [SCALED_MIN, SCALED_MAX] so that squaring the
    // off-diagonals neither overflows nor underflows.
    let scaled_max = safe_max.sqrt() / 3.0;
    let scaled_min = safe_min.sqrt() / eps2;
    let max_sweeps = 30 * n;
    let mut sweeps = 0;

    let mut start = 0;
    while start < n {
        if start > 0 {
            e[start - 1] = 0.0;
        }
        // The unreduced block [l, end]: up to the first negligible
        // off-diagonal.
        let mut end = n - 1;
        for m in start..n - 1 {
            let t = e[m].abs();
            if t == 0.0 || t <= d[m].abs().sqrt() * d[m + 1].abs().sqrt() * eps {
                e[m] = 0.0;
                end = m;
                break;
            }
        }
        let block = start..=end;
        start = end + 1;
        if block.start() == block.end() {
            continue;
        }
        let (first, last) = (*block.start(), *block.end());
        let norm = d[first..=last]
            .iter()
            .chain(&e[first..last])
            .fold(0.0f64, |a, v| a.max(v.abs()));
        if norm == 0.0 {
            continue;
        }
        let scale = if norm > scaled_max {
            scaled_max / norm
        } else if norm < scaled_min {
            scaled_min / norm
        } else {
            1.0
        };
        if scale != 1.0 {
            d[first..=last].iter_mut().for_each(|v| *v *= scale);
            e[first..last].iter_mut().for_each(|v| *v *= scale);
        }
        e[first..last].iter_mut().for_each(|v| *v *= *v);

        // QL when the bottom is the larger end, so that the shift chases the
        // smaller eigenvalues first; otherwise QR, which is QL on the block
        // turned upside down (the same operations on mirrored indices, and
        // the order of the eigenvalues is settled by the sort at the end).
        if d[last].abs() < d[first].abs() {
            d[first..=last].reverse();
            e[first..last].reverse();
        }
        ql(d, e, first, last, eps2, &mut sweeps, max_sweeps);
        if scale != 1.0 {
            d[first..=last].iter_mut().for_each(|v| *v /= scale);
        }
        if sweeps >= max_sweeps {
            return Err(NoConvergence(e.iter().filter(|&&v| v != 0.0).count()));
        }
    }
    d.sort_by(f64::total_cmp);
    Ok(())
}

/// QL sweeps over the block [l, last] (off-diagonals squared in `e`),
/// deflating eigenvalues at its top end.
fn ql(
    d: &mut [f64],
    e: &mut [f64],
    mut l: usize,
    last: usize,
    eps2: f64,
    sweeps: &mut usize,
    max_sweeps: usize,
) {
    while l <= last {
        let mut m = last;
        for j in l..last {
            if e[j].abs() <= eps2 * (d[j] * d[j + 1]).abs() {
                m = j;
                break;
            }
        }
        if m < last {
            e[m] = 0.0;
        }
        if m == l {
            l += 1;
            continue;
        }
        if m == l + 1 {
            let (rt1, rt2) = eigenvalues_2x2(d[l], e[l].sqrt(), d[l + 1]);
            d[l] = rt1;
            d[l + 1] = rt2;
            e[l] = 0.0;
            l += 2;
            continue;
        }
        if *sweeps == max_sweeps {
            return;
        }
        *sweeps += 1;
        let p = d[l];
        let shift = wilkinson_shift(p, e[l], d[l + 1]);
        let (mut c, mut s) = (1.0, 0.0);
        let mut gamma = d[m] - shift;
        let mut p = gamma * gamma;
        for i in (l..m).rev() {
            let bb = e[i];
            let r = p + bb;
            if i != m - 1 {
                e[i + 1] = s * r;
            }
            let old_c = c;
            c = p / r;
            s = bb / r;
            let old_gamma = gamma;
            let alpha = d[i];
            gamma = c * (alpha - shift) - s * old_gamma;
            d[i + 1] = old_gamma + (alpha - gamma);
            p = if c != 0.0 {
                gamma * gamma / c
            } else {
                old_c * bb
            };
        }
        e[l] = s * p;
        d[l] = shift + gamma;
    }
}

/// The eigenvalue of the 2 × 2 corner [[p, √e²], [√e², next]] nearer to `p`
/// (Wilkinson's shift), from the squared off-diagonal.
fn wilkinson_shift(p: f64, off_squared: f64, next: f64) -> f64 {
    let rte = off_squared.sqrt();
    let sigma = (next - p) / (2.0 * rte);
    let r = sigma.hypot(1.0);
    p - rte / (sigma + r.copysign(sigma))
}

/// Eigenvalues of [[a, b], [b, c]], the larger in absolute value first,
/// computed so that neither loses accuracy to cancellation.
fn eigenvalues_2x2(a: f64, b: f64, c: f64) -> (f64, f64) {
    let sum = a + c;
    let difference = (a - c).abs();
    let twice_b = (2.0 * b).abs();
    let (larger, smaller) = if a.abs() > c.abs() { (a, c) } else { (c, a) };
    let root = if difference > twice_b {
        difference * (1.0 + (twice_b / difference).powi(2)).sqrt()
    } else if difference < twice_b {
        twice_b * (1.0 + (difference / twice_b).powi(2)).sqrt()
    } else {
        twice_b * std::f64::consts::SQRT_2
    };
    if sum == 0.0 {
        return (0.5 * root, -0.5 * root);
    }
    let rt1 = if sum < 0.0 {
        0.5 * (sum - root)
    } else {
        0.5 * (sum + root)
    };
    // The other from the determinant: ac − b² = rt1 · rt2.
    let rt2 = (larger / rt1) * smaller - (b / rt1) * b;
    (rt1, rt2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// faer's eigenvalues of the same tridiagonal matrix, made dense.
    fn faer_eigenvalues(d: &[f64], e: &[f64]) -> Vec<f64> {
        let n = d.len();
        let m = faer::Mat::<f64>::from_fn(n, n, |i, j| {
            if i == j {
                d[i]
            } else if i == j + 1 {
                e[j]
            } else if j == i + 1 {
                e[i]
            } else {
                0.0
            }
        });
        m.self_adjoint_eigenvalues(faer::Side::Lower).unwrap()
    }

    fn ours(d: &[f64], e: &[f64]) -> Vec<f64> {
        let (mut d, mut e) = (d.to_vec(), e.to_vec());
        eigenvalues(&mut d, &mut e).unwrap();
        d
    }

    /// Largest difference relative to the largest eigenvalue's size.
    fn relative_gap(a: &[f64], b: &[f64]) -> f64 {
        let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f64::max)
    }

    /// A xorshift stream in [−1, 1), so the tests need no random crate.
    fn stream(seed: u64) -> impl FnMut() -> f64 {
        let mut state = seed.max(1);
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    #[test]
    fn the_second_difference_matrix_has_its_closed_form_spectrum() {
        // tridiag(−1, 2, −1): λ_k = 2 − 2 cos(kπ / (n + 1)), k = 1 … n.
        for n in [2, 3, 7, 64, 300] {
            let got = ours(&vec![2.0; n], &vec![-1.0; n - 1]);
            let mut want: Vec<f64> = (1..=n)
                .map(|k| 2.0 - 2.0 * (k as f64 * std::f64::consts::PI / (n + 1) as f64).cos())
                .collect();
            want.sort_by(f64::total_cmp);
            assert!(relative_gap(&want, &got) < 1e-14, "n = {n}");
        }
    }

    #[test]
    fn random_matrices_agree_with_faer() {
        for (seed, n) in [(1, 1usize), (2, 2), (3, 5), (4, 50), (5, 400), (6, 577)] {
            let mut next = stream(seed);
            let d: Vec<f64> = (0..n).map(|_| next()).collect();
            let e: Vec<f64> = (0..n.saturating_sub(1)).map(|_| next()).collect();
            let gap = relative_gap(&faer_eigenvalues(&d, &e), &ours(&d, &e));
            assert!(gap < 1e-13, "n = {n}: {gap:e}");
        }
    }

    #[test]
    fn split_blocks_graded_and_extreme_scales() {
        let mut next = stream(9);
        // Zero off-diagonals split the matrix into blocks of 1, 2 and more.
        let d: Vec<f64> = (0..12).map(|_| next()).collect();
        let mut e: Vec<f64> = (0..11).map(|_| next()).collect();
        for i in [0, 3, 4, 8] {
            e[i] = 0.0;
        }
        assert!(relative_gap(&faer_eigenvalues(&d, &e), &ours(&d, &e)) < 1e-14);
        // Graded: entries spanning 10⁻¹² … 1 (Gram matrices of trained
        // weights look like this).
        let d: Vec<f64> = (0..40).map(|i| 10f64.powf(-0.3 * i as f64)).collect();
        let e: Vec<f64> = (0..39)
            .map(|i| 0.1 * 10f64.powf(-0.3 * i as f64 - 0.15))
            .collect();
        let want = faer_eigenvalues(&d, &e);
        let got = ours(&d, &e);
        assert!(relative_gap(&want, &got) < 1e-14);
        // Norms near the ends of the range are scaled, not overflowed.
        for scale in [1e-300, 1e300] {
            let d: Vec<f64> = (0..30).map(|_| scale * next()).collect();
            let e: Vec<f64> = (0..29).map(|_| scale * next()).collect();
            let want: Vec<f64> = faer_eigenvalues(
                &d.iter().map(|v| v / scale).collect::<Vec<_>>(),
                &e.iter().map(|v| v / scale).collect::<Vec<_>>(),
            );
            let got: Vec<f64> = ours(&d, &e).iter().map(|v| v / scale).collect();
            assert!(relative_gap(&want, &got) < 1e-13, "scale {scale:e}");
        }
        // All zero, and one entry.
        assert_eq!(ours(&[0.0; 4], &[0.0; 3]), vec![0.0; 4]);
        assert_eq!(ours(&[3.0], &[]), vec![3.0]);
    }

    #[test]
    fn two_by_two_blocks_are_exact() {
        // [[a, b], [b, c]] against the closed form.
        for (a, b, c) in [
            (1.0, 1.0, 1.0),
            (2.0, 0.5, -3.0),
            (1e-8, 1.0, 1e8),
            (0.0, 2.0, 0.0),
        ] {
            let got = ours(&[a, c], &[b]);
            let mean = 0.5 * (a + c);
            let radius = (0.25 * (a - c) * (a - c) + b * b).sqrt();
            let want = [mean - radius, mean + radius];
            assert!(relative_gap(&want, &got) < 1e-15, "{a} {b} {c}: {got:?}");
        }
    }
}
