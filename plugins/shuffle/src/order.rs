//! Orders from distances, and how close an order is to the truth.

/// Kendall τ between two rankings of the same items (τ-a: no ties).
pub fn kendall_tau(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len();
    if n < 2 {
        return 1.0;
    }
    let mut score = 0i64;
    for i in 0..n {
        for j in i + 1..n {
            let x = (a[i] as i64 - a[j] as i64).signum();
            let y = (b[i] as i64 - b[j] as i64).signum();
            score += x * y;
        }
    }
    score as f64 / (n * (n - 1) / 2) as f64
}

/// Share of items at their true position.
pub fn accuracy(recovered: &[usize], truth: &[usize]) -> f64 {
    let right = recovered.iter().zip(truth).filter(|(a, b)| a == b).count();
    right as f64 / recovered.len().max(1) as f64
}

/// Mean |recovered − true| position.
pub fn mean_displacement(recovered: &[usize], truth: &[usize]) -> f64 {
    let total: usize = recovered
        .iter()
        .zip(truth)
        .map(|(&a, &b)| a.abs_diff(b))
        .sum();
    total as f64 / recovered.len().max(1) as f64
}

/// Length of a path through `order` under `distance`.
fn path_cost(order: &[usize], distance: &[Vec<f64>]) -> f64 {
    order.windows(2).map(|w| distance[w[0]][w[1]]).sum()
}

/// Shortest open path found by nearest neighbour from every start, then
/// 2-opt until no reversal shortens it. Returns the items in path order.
pub fn tsp_path(distance: &[Vec<f64>]) -> Vec<usize> {
    let n = distance.len();
    let mut best: Option<(f64, Vec<usize>)> = None;
    for start in 0..n {
        let mut path = vec![start];
        let mut used = vec![false; n];
        used[start] = true;
        while path.len() < n {
            let last = *path.last().expect("non-empty");
            let next = (0..n)
                .filter(|&j| !used[j])
                .min_by(|&a, &b| distance[last][a].total_cmp(&distance[last][b]))
                .expect("an unused item remains");
            used[next] = true;
            path.push(next);
        }
        let path = two_opt(path, distance);
        let cost = path_cost(&path, distance);
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((cost, path));
        }
    }
    best.map(|(_, p)| p).unwrap_or_default()
}

fn two_opt(mut path: Vec<usize>, distance: &[Vec<f64>]) -> Vec<usize> {
    let n = path.len();
    let mut improved = true;
    while improved {
        improved = false;
        for i in 0..n.saturating_sub(1) {
            for j in i + 1..n {
                // Reverse path[i..=j]; open path: the ends have one neighbour.
                let before = |k: usize| if k == 0 { None } else { Some(path[k - 1]) };
                let after = |k: usize| if k + 1 >= n { None } else { Some(path[k + 1]) };
                let old = before(i).map_or(0.0, |b| distance[b][path[i]])
                    + after(j).map_or(0.0, |a| distance[path[j]][a]);
                let new = before(i).map_or(0.0, |b| distance[b][path[j]])
                    + after(j).map_or(0.0, |a| distance[path[i]][a]);
                if new + 1e-12 < old {
                    path[i..=j].reverse();
                    improved = true;
                }
            }
        }
    }
    path
}

/// Position of each item from a path (`path[p]` = item at position p).
pub fn positions(path: &[usize]) -> Vec<usize> {
    let mut position = vec![0; path.len()];
    for (p, &item) in path.iter().enumerate() {
        position[item] = p;
    }
    position
}

/// Reverse the path if `trend` (e.g. each block's total weight norm) falls
/// along it: blocks grow with depth in the models studied.
pub fn orient(mut path: Vec<usize>, trend: &[f64]) -> Vec<usize> {
    let n = path.len() as f64;
    let mean_p = (n - 1.0) / 2.0;
    let mean_t = trend.iter().sum::<f64>() / n.max(1.0);
    let slope: f64 = path
        .iter()
        .enumerate()
        .map(|(p, &b)| (p as f64 - mean_p) * (trend[b] - mean_t))
        .sum();
    if slope < 0.0 {
        path.reverse();
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_known_orders() {
        let truth = [0, 1, 2, 3];
        assert_eq!(kendall_tau(&truth, &truth), 1.0);
        assert_eq!(kendall_tau(&[3, 2, 1, 0], &truth), -1.0);
        // One adjacent swap: 5 of 6 pairs agree → (5 − 1)/6.
        assert!((kendall_tau(&[1, 0, 2, 3], &truth) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(accuracy(&[1, 0, 2, 3], &truth), 0.5);
        assert_eq!(mean_displacement(&[1, 0, 2, 3], &truth), 0.5);
    }

    #[test]
    fn points_on_a_line_are_ordered() {
        let xs = [3.0, 0.0, 4.0, 1.0, 2.0];
        let distance: Vec<Vec<f64>> = xs
            .iter()
            .map(|a: &f64| xs.iter().map(|b| (a - b).abs()).collect())
            .collect();
        let path = orient(tsp_path(&distance), &xs);
        assert_eq!(path, vec![1, 3, 4, 0, 2]);
        assert_eq!(positions(&path), vec![3, 0, 4, 1, 2]);
    }
}
