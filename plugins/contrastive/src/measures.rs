//! The per-layer measures between two completions' hidden states, in f64.

/// a·b / (‖a‖‖b‖); `None` when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    (aa > 0.0 && bb > 0.0).then(|| dot / (aa.sqrt() * bb.sqrt()))
}

/// ‖a − b‖ / (½(‖a‖ + ‖b‖)): the gap relative to the mean norm, so layers
/// whose norms differ by orders of magnitude compare; `None` when both are zero.
pub fn relative_distance(a: &[f32], b: &[f32]) -> Option<f64> {
    let (mut diff, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        diff += (x - y) * (x - y);
        aa += x * x;
        bb += y * y;
    }
    let mean_norm = 0.5 * (aa.sqrt() + bb.sqrt());
    (mean_norm > 0.0).then(|| diff.sqrt() / mean_norm)
}

/// Linear CKA between `x` and `y`, each `n` rows of `width` values (the
/// same tokens' positions in two completions): with the columns centred,
/// ⟨K, L⟩_F / (‖K‖_F ‖L‖_F) for the Gram matrices K = XXᵀ and L = YYᵀ,
/// which equals ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F). `None` when fewer than
/// [`CKA_MIN_TOKENS`] rows (two centred rows are ± one vector, so the CKA
/// of any two pairs is 1) or a side does not vary.
pub fn linear_cka(x: &[f32], y: &[f32], n: usize, width: usize) -> Option<f64> {
    if n < CKA_MIN_TOKENS {
        return None;
    }
    let gram = |m: &[f32]| -> Vec<f64> {
        let centred = centre_columns(&m[..n * width], n, width);
        let mut k = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                let dot: f64 = centred[i * width..(i + 1) * width]
                    .iter()
                    .zip(&centred[j * width..(j + 1) * width])
                    .map(|(a, b)| a * b)
                    .sum();
                k[i * n + j] = dot;
                k[j * n + i] = dot;
            }
        }
        k
    };
    let (k, l) = (gram(x), gram(y));
    let frob = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    let (kl, kk, ll) = (frob(&k, &l), frob(&k, &k), frob(&l, &l));
    (kk > 0.0 && ll > 0.0).then(|| kl / (kk.sqrt() * ll.sqrt()))
}

/// CKA needs at least this many tokens in common.
pub const CKA_MIN_TOKENS: usize = 3;

fn centre_columns(m: &[f32], n: usize, width: usize) -> Vec<f64> {
    let mut mean = vec![0.0f64; width];
    for row in m.chunks_exact(width) {
        for (acc, &v) in mean.iter_mut().zip(row) {
            *acc += v as f64;
        }
    }
    mean.iter_mut().for_each(|v| *v /= n as f64);
    m.chunks_exact(width)
        .flat_map(|row| row.iter().zip(&mean).map(|(&v, &mu)| v as f64 - mu))
        .collect()
}

/// Mean and sample standard deviation (n − 1) of the values present.
pub fn mean_std(values: impl IntoIterator<Item = Option<f64>>) -> (Option<f64>, Option<f64>) {
    let present: Vec<f64> = values.into_iter().flatten().collect();
    if present.is_empty() {
        return (None, None);
    }
    let n = present.len() as f64;
    let mean = present.iter().sum::<f64>() / n;
    let std = (present.len() > 1)
        .then(|| (present.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (Some(mean), std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_distance_of_known_vectors() {
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), Some(0.0));
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        // ‖(3,4) − (0,0)‖ = 5 over ½(5 + 0).
        assert_eq!(relative_distance(&[3.0, 4.0], &[0.0, 0.0]), Some(2.0));
        // Opposite unit vectors: 2 / 1.
        assert_eq!(relative_distance(&[1.0, 0.0], &[-1.0, 0.0]), Some(2.0));
        assert_eq!(relative_distance(&[1.0, 0.0], &[1.0, 0.0]), Some(0.0));
    }

    #[test]
    fn cka_is_one_under_rotation_and_scale_and_needs_three_tokens() {
        let x = [1.0f32, 0.0, 0.0, 2.0, 3.0, 1.0, -1.0, 0.5];
        // y = 3·x rotated by 90°: (a, b) -> (−b, a).
        let y: Vec<f32> = x
            .chunks(2)
            .flat_map(|r| [-3.0 * r[1], 3.0 * r[0]])
            .collect();
        assert!((linear_cka(&x, &y, 4, 2).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(linear_cka(&x, &y, 2, 2), None);
        // Orthogonal one-dimensional signals: x varies on axis 0 as (1, −1, 0),
        // y as (1, 1, −2) — centred Gram matrices with ⟨K, L⟩ = (xᵀy)² = 0.
        let x = [1.0f32, 0.0, -1.0, 0.0, 0.0, 0.0];
        let y = [1.0f32, 0.0, 1.0, 0.0, -2.0, 0.0];
        assert!(linear_cka(&x, &y, 3, 2).unwrap().abs() < 1e-12);
    }

    #[test]
    fn mean_and_sample_std_skip_missing_values() {
        let (mean, std) = mean_std([Some(1.0), None, Some(3.0)]);
        assert_eq!(mean, Some(2.0));
        assert!((std.unwrap() - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(mean_std([Some(1.0)]), (Some(1.0), None));
        assert_eq!(mean_std([None]), (None, None));
    }
}
