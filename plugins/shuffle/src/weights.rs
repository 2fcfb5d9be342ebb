//! Weight-only orderings beyond the statistics in `lib.rs`: the SVD
//! spectrum, the Fiedler vector of a similarity graph, and the ensemble of
//! ranks (the published comparison's weight-only methods; `docs/metrics.md`).

/// How many leading singular values describe a matrix in `svd_spectrum`.
pub const TOP_SINGULAR_VALUES: usize = 32;
/// The matrix roles whose spectra `svd_spectrum` compares, as published.
pub const SPECTRUM_ROLES: [&str; 4] = ["q", "k", "v", "gate"];

/// The leading singular values of a row-major matrix, descending.
pub fn top_singular_values(values: &[f32], rows: usize, cols: usize) -> Result<Vec<f64>, String> {
    let mut sigma: Vec<f64> = faer::MatRef::from_row_major_slice(values, rows, cols)
        .singular_values()
        .map_err(|e| format!("SVD did not converge ({e:?})"))?
        .into_iter()
        .map(f64::from)
        .collect();
    sigma.sort_by(|a, b| b.total_cmp(a));
    sigma.truncate(TOP_SINGULAR_VALUES);
    Ok(sigma)
}

/// Standardise each feature across blocks (zero mean, unit spread; a
/// constant feature becomes 0), then Euclidean distances between blocks.
pub fn standardized_distance(features: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = features.len();
    let width = features.first().map_or(0, Vec::len);
    let mut z = features.to_vec();
    for f in 0..width {
        let mean = (0..n).map(|b| features[b][f]).sum::<f64>() / n as f64;
        let sd = ((0..n).map(|b| (features[b][f] - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        for row in z.iter_mut() {
            row[f] = if sd > 0.0 { (row[f] - mean) / sd } else { 0.0 };
        }
    }
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    z[i].iter()
                        .zip(&z[j])
                        .map(|(a, b)| (a - b).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .collect()
        })
        .collect()
}

/// Blocks sorted by the Fiedler vector (eigenvector of the second-smallest
/// eigenvalue of the graph Laplacian L = D − W) of the similarity graph
/// W_ij = exp(−d_ij² / σ²), σ the median off-diagonal distance. The sort is
/// the spectral relaxation of "put similar blocks next to each other".
pub fn fiedler_order(distance: &[Vec<f64>]) -> Result<Vec<usize>, String> {
    let n = distance.len();
    if n < 3 {
        return Ok((0..n).collect());
    }
    let mut off: Vec<f64> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| distance[i][j])
        .collect();
    off.sort_by(f64::total_cmp);
    let sigma = off[off.len() / 2].max(1e-300);
    let laplacian = faer::Mat::<f64>::from_fn(n, n, |i, j| {
        let w = |a: usize, b: usize| (-(distance[a][b] / sigma).powi(2)).exp();
        if i == j {
            (0..n).filter(|&k| k != i).map(|k| w(i, k)).sum()
        } else {
            -w(i, j)
        }
    });
    let eigen = laplacian
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| format!("Laplacian eigenvectors did not converge ({e:?})"))?;
    // Eigenvalues ascend: column 0 is the constant vector, column 1 Fiedler's.
    let fiedler = eigen.U().col(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| fiedler[a].total_cmp(&fiedler[b]));
    Ok(order)
}

/// The ensemble: each block's mean position over the given orders, sorted.
pub fn ensemble_order(orders: &[Vec<usize>]) -> Vec<usize> {
    let n = orders.first().map_or(0, Vec::len);
    let mut mean = vec![0.0f64; n];
    for order in orders {
        for (position, &block) in order.iter().enumerate() {
            mean[block] += position as f64 / orders.len() as f64;
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| mean[a].total_cmp(&mean[b]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on a line, given out of order: the Fiedler vector of a path
    /// graph is monotone along the path, so the sort gives the line back
    /// (up to direction).
    #[test]
    fn fiedler_recovers_points_on_a_line() {
        let place = [3.0, 0.0, 5.0, 1.0, 4.0, 2.0];
        let distance: Vec<Vec<f64>> = place
            .iter()
            .map(|a| place.iter().map(|b| f64::abs(a - b)).collect())
            .collect();
        let order = fiedler_order(&distance).unwrap();
        let along: Vec<f64> = order.iter().map(|&i| place[i]).collect();
        let forward = along.windows(2).all(|w| w[0] < w[1]);
        let backward = along.windows(2).all(|w| w[0] > w[1]);
        assert!(forward || backward, "{along:?}");
    }

    #[test]
    fn ensemble_averages_positions() {
        // Mean positions: block 0 at 1.5, block 1 at 1.0, block 2 at 0.5.
        let orders = vec![vec![2, 0, 1], vec![1, 2, 0]];
        assert_eq!(ensemble_order(&orders), vec![2, 1, 0]);
    }

    #[test]
    fn standardized_distance_ignores_constant_features() {
        let d = standardized_distance(&[vec![1.0, 7.0], vec![3.0, 7.0]]);
        assert_eq!(d[0][1], 2.0); // (1, 3) standardise to (-1, 1)
        assert_eq!(d[0][0], 0.0);
    }
}
