//! The linearization gap of a map `g` (a block's or a sublayer's update) at
//! a residual `x`, from the map run at `x`, `x + δ` and `x − δ`, and the
//! random directions `δ` is made of.
//!
//! With `F(x) = x + g(x)` the residual a block (or sublayer) hands on:
//! - `Δ = g(x+δ) − g(x) = F(x+δ) − F(x) − δ`, what the perturbation changed;
//! - `J·δ ≈ [g(x+δ) − g(x−δ)] / 2`, the central difference;
//! - `Δ − J·δ = [F(x+δ) + F(x−δ)] / 2 − F(x)`, what a linear map would not
//!   have done;
//! - gap = ‖Δ − J·δ‖ / ‖Δ‖ and amplification = ‖Δ‖ / ‖δ‖, per token.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The ChaCha stream of direction `k` of the prompt on line `prompt_index`:
/// the same directions for every block, part and ε.
pub fn stream(prompt_index: usize, k: usize) -> u64 {
    ((prompt_index as u64) << 20) | k as u64
}

/// Random unit directions, one per row of a `[rows, hidden]` residual:
/// standard normal components (Box–Muller over ChaCha8 uniforms, seeded by
/// `seed`, stream [`stream`]), each row scaled to length 1.
pub fn directions(seed: u64, stream: u64, rows: usize, hidden: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut out = Vec::with_capacity(rows * hidden);
    for _ in 0..rows {
        let mut row: Vec<f64> = Vec::with_capacity(hidden + 1);
        while row.len() < hidden {
            // u1 in (0, 1], so its logarithm is finite.
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f64::consts::TAU * u2;
            row.push(radius * angle.cos());
            row.push(radius * angle.sin());
        }
        row.truncate(hidden);
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        out.extend(row.iter().map(|v| (v / norm) as f32));
    }
    out
}

/// `x ± ε‖x_t‖·d_t` for every row `t`: the perturbed residuals.
pub fn perturbed(x: &[f32], direction: &[f32], hidden: usize, eps: f64) -> [Vec<f32>; 2] {
    let mut plus = Vec::with_capacity(x.len());
    let mut minus = Vec::with_capacity(x.len());
    for (row, dir) in x.chunks_exact(hidden).zip(direction.chunks_exact(hidden)) {
        let size = eps * norm(row);
        for (&v, &d) in row.iter().zip(dir) {
            let step = size * f64::from(d);
            plus.push((f64::from(v) + step) as f32);
            minus.push((f64::from(v) - step) as f32);
        }
    }
    [plus, minus]
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Sums over (token, direction) of one (block, part, ε).
#[derive(Clone, Copy, Debug, Default)]
pub struct GapSums {
    pub gap: f64,
    pub gap_squares: f64,
    pub amplification: f64,
    pub count: f64,
}

impl GapSums {
    /// Add one token's row: the map's outputs at `x`, `x + δ`, `x − δ`,
    /// and the perturbed inputs (`δ = x_plus − x`, as the map saw it).
    pub fn add(&mut self, row: Rows<'_>) {
        let mut delta_sq = 0.0;
        let mut change_sq = 0.0;
        let mut residual_sq = 0.0;
        for i in 0..row.out.len() {
            let (f, fp, fm) = (
                f64::from(row.out[i]),
                f64::from(row.out_plus[i]),
                f64::from(row.out_minus[i]),
            );
            let delta = f64::from(row.x_plus[i]) - f64::from(row.x[i]);
            let change = fp - f - delta;
            let nonlinear = 0.5 * (fp + fm) - f;
            delta_sq += delta * delta;
            change_sq += change * change;
            residual_sq += nonlinear * nonlinear;
        }
        let gap = if change_sq > 0.0 {
            (residual_sq / change_sq).sqrt()
        } else {
            0.0
        };
        self.gap += gap;
        self.gap_squares += gap * gap;
        self.amplification += if delta_sq > 0.0 {
            (change_sq / delta_sq).sqrt()
        } else {
            0.0
        };
        self.count += 1.0;
    }

    pub fn merge(&mut self, other: &GapSums) {
        self.gap += other.gap;
        self.gap_squares += other.gap_squares;
        self.amplification += other.amplification;
        self.count += other.count;
    }

    pub fn mean_gap(&self) -> f64 {
        self.gap / self.count
    }

    /// Population standard deviation of the per-(token, direction) gaps.
    pub fn std_gap(&self) -> f64 {
        (self.gap_squares / self.count - self.mean_gap().powi(2))
            .max(0.0)
            .sqrt()
    }

    pub fn mean_amplification(&self) -> f64 {
        self.amplification / self.count
    }
}

/// One token's rows, `hidden` values each.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub x: &'a [f32],
    pub x_plus: &'a [f32],
    pub out: &'a [f32],
    pub out_plus: &'a [f32],
    pub out_minus: &'a [f32],
}

/// ‖g(x)‖ / ‖x‖ of one token's row: how large the update is next to the
/// residual it is added to.
pub fn update_ratio(x: &[f32], out: &[f32]) -> f64 {
    let update: f64 = x
        .iter()
        .zip(out)
        .map(|(&a, &b)| (f64::from(b) - f64::from(a)).powi(2))
        .sum::<f64>()
        .sqrt();
    update / norm(x)
}

/// The least-squares slope of ln(gap) over ln(ε): the order of the
/// nonlinearity (1 for a smooth map, whose second-order term dominates the
/// gap of a central difference). `None` with fewer than two ε or a gap ≤ 0.
pub fn order(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 || points.iter().any(|&(e, g)| e <= 0.0 || g <= 0.0) {
        return None;
    }
    let n = points.len() as f64;
    let xs: Vec<f64> = points.iter().map(|p| p.0.ln()).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.1.ln()).collect();
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_are_unit_rows_fixed_by_seed_and_stream() {
        let a = directions(7, stream(3, 1), 4, 9);
        assert_eq!(a, directions(7, stream(3, 1), 4, 9));
        assert_ne!(a, directions(7, stream(3, 2), 4, 9));
        assert_ne!(a, directions(8, stream(3, 1), 4, 9));
        for row in a.chunks_exact(9) {
            assert!((norm(row) - 1.0).abs() < 1e-6);
        }
        // Isotropic: over many draws each component's mean square is 1/d.
        let many = directions(1, 0, 4000, 8);
        for c in 0..8 {
            let ms: f64 = many
                .chunks_exact(8)
                .map(|r| f64::from(r[c]).powi(2))
                .sum::<f64>()
                / 4000.0;
            assert!((ms - 0.125).abs() < 0.01, "component {c}: {ms}");
        }
    }

    /// For F(x) = x + A x + c (x ⊙ x) the gap is exact: Δ − Jδ = c δ⊙δ,
    /// Δ = Aδ + c(2x⊙δ + δ⊙δ).
    #[test]
    fn a_quadratic_map_has_the_gap_its_algebra_gives() {
        let x = [1.0f32, -2.0, 0.5];
        let d = [0.6f32, 0.0, -0.8];
        let eps = 0.1;
        let c = 0.3;
        let a = |v: &[f64]| [2.0 * v[0], v[1] - v[2], 0.5 * v[2]];
        let f = |v: &[f32]| -> Vec<f32> {
            let v: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
            let av = a(&v);
            (0..3)
                .map(|i| (v[i] + av[i] + c * v[i] * v[i]) as f32)
                .collect()
        };
        let [plus, minus] = perturbed(&x, &d, 3, eps);
        let mut sums = GapSums::default();
        let (out, out_plus, out_minus) = (f(&x), f(&plus), f(&minus));
        sums.add(Rows {
            x: &x,
            x_plus: &plus,
            out: &out,
            out_plus: &out_plus,
            out_minus: &out_minus,
        });
        let size = eps * norm(&x);
        let delta: Vec<f64> = d.iter().map(|&v| size * f64::from(v)).collect();
        let ad = a(&delta);
        let change: Vec<f64> = (0..3)
            .map(|i| ad[i] + c * (2.0 * f64::from(x[i]) * delta[i] + delta[i] * delta[i]))
            .collect();
        let nonlinear: Vec<f64> = delta.iter().map(|v| c * v * v).collect();
        let l2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let want = l2(&nonlinear) / l2(&change);
        assert!(
            (sums.mean_gap() - want).abs() < 1e-5,
            "{} vs {want}",
            sums.mean_gap()
        );
        let amp = l2(&change) / size;
        assert!((sums.mean_amplification() - amp).abs() < 1e-5);
    }

    #[test]
    fn order_is_the_slope_of_a_power_law() {
        let points: Vec<(f64, f64)> = [0.01, 0.02, 0.05, 0.1, 0.2]
            .iter()
            .map(|&e: &f64| (e, 3.0 * e.powf(0.7)))
            .collect();
        assert!((order(&points).unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(order(&points[..1]), None);
        assert_eq!(order(&[(0.1, 0.0), (0.2, 1.0)]), None);
    }
}
