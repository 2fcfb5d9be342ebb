//! Symmetric per-group round-to-nearest, the quantizer of the published
//! sensitivity study: in each group of `group` consecutive weights along a
//! row's input axis, scale = max|w| / (2^(b−1) − 1),
//! q = clamp(round(w / scale), −2^(b−1), 2^(b−1) − 1), and the weight
//! becomes q × scale. The last group of a row is shorter when the row's
//! length is not a multiple of `group`.
//!
//! Arithmetic is f32 and ties round to even, as `torch.round` and
//! `numpy.round` do on the f32 weights such studies hold — so the values
//! here are those a PyTorch simulation of the recipe produces, bit for bit.
//! A group of zeros has no scale; it stays zero.

use probe_sdk::matrices::{Matrix, Part};

/// The bit widths the definition covers.
pub const BITS: std::ops::RangeInclusive<u32> = 2..=8;

/// Round one row in place, group by group.
pub fn quantize_row(row: &mut [f32], bits: u32, group: usize) {
    debug_assert!(BITS.contains(&bits) && group > 0);
    let levels = (1i32 << (bits - 1)) as f32;
    let (qmin, qmax) = (-levels, levels - 1.0);
    for chunk in row.chunks_mut(group) {
        let max = chunk.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        if max == 0.0 {
            continue;
        }
        let scale = max / qmax;
        for w in chunk {
            *w = (*w / scale).round_ties_even().clamp(qmin, qmax) * scale;
        }
    }
}

/// Squared Frobenius norms of what quantization changed and of the
/// original, summed over the matrices quantized: their ratio's square root
/// is the relative error.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ErrorSums {
    pub changed: f64,
    pub original: f64,
}

impl ErrorSums {
    pub fn add(&mut self, other: ErrorSums) {
        self.changed += other.changed;
        self.original += other.original;
    }

    /// ‖Q(W) − W‖_F / ‖W‖_F (0 for all-zero weights).
    pub fn relative(&self) -> f64 {
        if self.original == 0.0 {
            0.0
        } else {
            (self.changed / self.original).sqrt()
        }
    }
}

/// Where logical element (`row`, `col`) of `matrix` — Linear's (out, in)
/// convention — sits in its stored tensor's flat values. `transposed`:
/// the tensor is stored (in, out), as GPT-2's Conv1D weights are.
fn stored_index(matrix: &Matrix, transposed: bool, row: usize, col: usize) -> usize {
    match (&matrix.part, transposed) {
        (Part::Whole, false) => row * matrix.cols + col,
        (Part::Span(range), false) => range.start + row * matrix.cols + col,
        (Part::Whole, true) => col * matrix.rows + row,
        (Part::Columns { start, .. }, _) => {
            let width = matrix.tensor.shape.get(1).copied().unwrap_or(0);
            col * width + start + row
        }
        (Part::Span(range), true) => range.start + col * matrix.rows + row,
    }
}

/// Quantize `matrix`'s weights inside its stored tensor's values (`stored`,
/// the whole tensor), every row of the matrix in its input order; the rest
/// of the tensor is left as it is.
pub fn quantize_matrix(
    stored: &mut [f32],
    matrix: &Matrix,
    transposed: bool,
    bits: u32,
    group: usize,
) -> ErrorSums {
    let mut sums = ErrorSums::default();
    let mut add = |rounded: &[f32], original: &[f32]| {
        for (&q, &w) in rounded.iter().zip(original) {
            let (q, w) = (f64::from(q), f64::from(w));
            sums.changed += (q - w) * (q - w);
            sums.original += w * w;
        }
    };
    // Rows stored one after another (every Linear weight, a fused QKV's
    // parts, a bank's slabs): round them where they lie.
    let contiguous = match (&matrix.part, transposed) {
        (Part::Whole, false) => Some(0..matrix.rows * matrix.cols),
        (Part::Span(range), false) => Some(range.clone()),
        _ => None,
    };
    if let Some(range) = contiguous {
        let mut original = vec![0.0f32; matrix.cols];
        for row in stored[range].chunks_exact_mut(matrix.cols.max(1)) {
            original.copy_from_slice(row);
            quantize_row(row, bits, group);
            add(row, &original);
        }
        return sums;
    }
    let mut row = vec![0.0f32; matrix.cols];
    for r in 0..matrix.rows {
        for (c, w) in row.iter_mut().enumerate() {
            *w = stored[stored_index(matrix, transposed, r, c)];
        }
        let original = row.clone();
        quantize_row(&mut row, bits, group);
        add(&row, &original);
        for (c, &q) in row.iter().enumerate() {
            stored[stored_index(matrix, transposed, r, c)] = q;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition written out value by value, in f32 as PyTorch would
    /// run it, independent of [`quantize_row`]'s loop structure.
    fn direct(row: &[f32], bits: u32, group: usize) -> Vec<f32> {
        let qmax = 2f32.powi(bits as i32 - 1) - 1.0;
        let qmin = -(2f32.powi(bits as i32 - 1));
        let mut out = Vec::with_capacity(row.len());
        let mut start = 0;
        while start < row.len() {
            let end = (start + group).min(row.len());
            let mut max = 0.0f32;
            for w in &row[start..end] {
                if w.abs() > max {
                    max = w.abs();
                }
            }
            for &w in &row[start..end] {
                if max == 0.0 {
                    out.push(0.0);
                    continue;
                }
                let scale = max / qmax;
                let x = w / scale;
                // Ties to even, written out.
                let floor = x.floor();
                let q = match (x - floor).partial_cmp(&0.5).unwrap() {
                    std::cmp::Ordering::Less => floor,
                    std::cmp::Ordering::Greater => floor + 1.0,
                    std::cmp::Ordering::Equal if floor % 2.0 == 0.0 => floor,
                    std::cmp::Ordering::Equal => floor + 1.0,
                };
                // Rounding keeps the sign of a zero (−0.3 → −0), as numpy and torch do.
                let q = if q == 0.0 { q.copysign(x) } else { q };
                out.push(q.max(qmin).min(qmax) * scale);
            }
            start = end;
        }
        out
    }

    /// A seeded row with every case: a group of zeros, exact ties at the
    /// scale's half steps, a short last group.
    fn awkward_row(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut row: Vec<f32> = (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        row[4..8].fill(0.0);
        row[8..12].copy_from_slice(&[1.0, 0.5, -0.5, 0.25]);
        row
    }

    #[test]
    fn rows_match_the_definition_bit_for_bit() {
        for bits in BITS {
            for group in [4, 5, 128] {
                for len in [13, 576, 577] {
                    let original = awkward_row(len, u64::from(bits) * 1000 + len as u64);
                    let mut row = original.clone();
                    quantize_row(&mut row, bits, group);
                    let want = direct(&original, bits, group);
                    for (i, (got, want)) in row.iter().zip(&want).enumerate() {
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "bits {bits} group {group} len {len} index {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn two_bits_is_minus_one_zero_one_times_the_group_max_with_ties_to_even() {
        // Group [1.0, 0.5, −0.5, 0.25]: scale 1, 0.5 rounds to 0 (even),
        // not to 1 as rounding half away from zero would.
        let mut row = vec![0.0, 0.0, 1.0, 0.5, -0.5, 0.25, 0.75, -1.0];
        quantize_row(&mut row, 2, 4);
        assert_eq!(row, vec![0.0, 0.0, 1.0, 0.0, -0.0, 0.0, 1.0, -1.0]);
        // A short last group of one value is its own max: kept exactly.
        let mut short = vec![0.3, -0.6, 0.9, 0.1, 0.37];
        quantize_row(&mut short, 3, 4);
        assert_eq!(short[4], 0.37);
        // 3 bits: scale 0.9 / 3, levels −3 … 3 times it (−4 unused: symmetric).
        let scale = 0.9f32 / 3.0;
        assert_eq!(&short[..4], &[scale, -2.0 * scale, 3.0 * scale, 0.0]);
    }

    /// numpy's float32 arithmetic (the reference script's committed output)
    /// gives the same bits.
    #[test]
    fn numpy_gives_the_same_bits() {
        let reference: serde_json::Value =
            serde_json::from_str(include_str!("../reference/quantize_reference.json")).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert!(cases.len() >= 6);
        for case in cases {
            let floats = |key: &str| -> Vec<f32> {
                case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| f32::from_bits(v.as_u64().unwrap() as u32))
                    .collect()
            };
            let (bits, group) = (
                case["bits"].as_u64().unwrap() as u32,
                case["group"].as_u64().unwrap() as usize,
            );
            let mut row = floats("row");
            quantize_row(&mut row, bits, group);
            let want = floats("quantized");
            assert_eq!(row.len(), want.len());
            for (i, (got, want)) in row.iter().zip(&want).enumerate() {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "bits {bits} group {group} index {i}: {got} vs numpy {want}"
                );
            }
        }
    }
}
