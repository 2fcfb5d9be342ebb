//! The logit lens reduced where it is made: per row the entropy, the top-k
//! tokens and a target's rank and probability, and KL between rows, from
//! logits `[rows, vocab]` that never leave the engine.
//!
//! Rows are grouped so that both rows of every KL pair sit in one chunk of
//! logits; a chunk holds at most [`CHUNK_FLOATS`] logits (or one group, when
//! a group alone is larger), so memory stays bounded for any number of rows.

use probe_contract::{LensReply, LensRequest, LensRow};
use rayon::prelude::*;

/// Logits held at once: 64 MiB of f32 (341 rows of SmolLM2's 49 k
/// vocabulary, 64 rows of Gemma 3's 262 k).
pub const CHUNK_FLOATS: usize = 1 << 24;

/// Entropy, top-k and the target's rank and probability of one row, and
/// the row's log-normaliser (log Σ exp z). One exponential per logit: with
/// e = exp(z − max), S = Σ e and U = Σ e (z − max), log Σ exp z = max + ln S
/// and H = −Σ p ln p = ln S − U / S.
pub fn row_stats(logits: &[f32], top_k: usize, target: Option<u32>) -> (LensRow, f64) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
    let (sum, weighted) = logits.iter().fold((0.0f64, 0.0f64), |(s, u), &z| {
        let shifted = z as f64 - max;
        let e = shifted.exp();
        (s + e, u + e * shifted)
    });
    let lse = max + sum.ln();
    let entropy = (sum.ln() - weighted / sum).max(0.0);
    let ids = top_ids(logits, top_k);
    let top_probs = ids
        .iter()
        .map(|&id| (logits[id as usize] as f64 - lse).exp())
        .collect();
    let (target_rank, target_prob) = match target {
        Some(id) => {
            let z = logits[id as usize];
            let rank = logits.iter().filter(|&&v| v > z).count() as u64;
            (Some(rank), Some((z as f64 - lse).exp()))
        }
        None => (None, None),
    };
    let row = LensRow {
        entropy,
        top_ids: ids,
        top_probs,
        target_rank,
        target_prob,
    };
    (row, lse)
}

/// The `k` most probable ids, most probable first; equal logits by lower
/// id, so the order is total. One scan for k = 1 (the common case), a
/// selection for more.
pub(crate) fn top_ids(logits: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(logits.len());
    if k == 1 {
        let best =
            (1..logits.len()).fold(0, |best, v| if logits[v] > logits[best] { v } else { best });
        return vec![best as u32];
    }
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_unstable_by(order);
    ids
}

/// p = softmax(z) of one row, from its log-normaliser.
pub fn probabilities(logits: &[f32], lse: f64) -> Vec<f64> {
    logits.iter().map(|&z| (z as f64 - lse).exp()).collect()
}

/// KL(p ‖ q) in nats from p's probabilities and both rows' logits and
/// log-normalisers: Σ p (ln p − ln q) = Σ p (z_p − z_q) + (lse_q − lse_p),
/// with no exponential (p is computed once per row however many pairs it is
/// the first of).
pub fn kl_divergence(p: &[f64], p_logits: &[f32], p_lse: f64, q: &[f32], q_lse: f64) -> f64 {
    let dot: f64 = p
        .iter()
        .zip(p_logits.iter().zip(q))
        .map(|(&pi, (&zp, &zq))| pi * (zp as f64 - zq as f64))
        .sum();
    (dot + q_lse - p_lse).max(0.0)
}

/// Rows in chunks: each KL pair's two rows in one chunk, at most
/// `max_rows` rows a chunk unless one connected group alone has more.
pub fn chunks(t: usize, pairs: &[(usize, usize)], max_rows: usize) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..t).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for &(i, j) in pairs {
        let (a, b) = (root(&mut parent, i), root(&mut parent, j));
        parent[a.max(b)] = a.min(b);
    }
    // Groups in order of their first row, rows ascending within a group.
    let mut group_of_root = vec![usize::MAX; t];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for row in 0..t {
        let r = root(&mut parent, row);
        if group_of_root[r] == usize::MAX {
            group_of_root[r] = groups.len();
            groups.push(Vec::new());
        }
        groups[group_of_root[r]].push(row);
    }
    let mut out: Vec<Vec<usize>> = Vec::new();
    for group in groups {
        match out.last_mut() {
            Some(last) if last.len() + group.len() <= max_rows.max(1) => last.extend(group),
            _ => out.push(group),
        }
    }
    out
}

/// Reduce the lens over `t` rows: `head(rows)` computes the logits of the
/// given residual rows (`[rows.len(), vocab]`).
pub fn reduce<E>(
    t: usize,
    vocab: usize,
    request: &LensRequest,
    mut head: impl FnMut(&[usize]) -> Result<Vec<f32>, E>,
) -> Result<LensReply, E> {
    let max_rows = (CHUNK_FLOATS / vocab.max(1)).max(1);
    let mut rows: Vec<Option<LensRow>> = vec![None; t];
    let mut kl = vec![0.0; request.kl_pairs.len()];
    // Which pairs each row's chunk must answer.
    let mut chunk_of_row = vec![0; t];
    let chunked = chunks(t, &request.kl_pairs, max_rows);
    for (c, chunk) in chunked.iter().enumerate() {
        for &row in chunk {
            chunk_of_row[row] = c;
        }
    }
    for (c, chunk) in chunked.iter().enumerate() {
        let logits = head(chunk)?;
        let stats: Vec<(LensRow, f64)> = logits
            .par_chunks(vocab)
            .zip(chunk.par_iter())
            .map(|(z, &row)| {
                let target = request.targets.as_ref().map(|t| t[row]);
                row_stats(z, request.top_k, target)
            })
            .collect();
        let local = |row: usize| chunk.iter().position(|&r| r == row).unwrap_or(0);
        let pairs: Vec<(usize, usize, usize)> = request
            .kl_pairs
            .iter()
            .enumerate()
            .filter(|(_, &(i, _))| chunk_of_row[i] == c)
            .map(|(p, &(i, j))| (p, local(i), local(j)))
            .collect();
        // The probabilities of every row that is a pair's first, once.
        let mut firsts: Vec<usize> = pairs.iter().map(|&(_, a, _)| a).collect();
        firsts.sort_unstable();
        firsts.dedup();
        let probs: Vec<Vec<f64>> = firsts
            .par_iter()
            .map(|&a| probabilities(&logits[a * vocab..(a + 1) * vocab], stats[a].1))
            .collect();
        let answers: Vec<(usize, f64)> = pairs
            .par_iter()
            .map(|&(p, a, b)| {
                let value = kl_divergence(
                    &probs[firsts.binary_search(&a).unwrap_or(0)],
                    &logits[a * vocab..(a + 1) * vocab],
                    stats[a].1,
                    &logits[b * vocab..(b + 1) * vocab],
                    stats[b].1,
                );
                (p, value)
            })
            .collect();
        for (p, value) in answers {
            kl[p] = value;
        }
        for (&row, (stat, _)) in chunk.iter().zip(stats) {
            rows[row] = Some(stat);
        }
    }
    Ok(LensReply {
        rows: rows.into_iter().map(Option::unwrap_or_default).collect(),
        kl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uniform_row_has_the_log_of_the_vocabulary_as_entropy() {
        let (row, lse) = row_stats(&[2.0; 8], 3, Some(5));
        assert!((row.entropy - 8f64.ln()).abs() < 1e-12);
        assert!((lse - (2.0 + 8f64.ln())).abs() < 1e-12);
        assert_eq!(row.top_ids, vec![0, 1, 2], "ties by lower id");
        assert_eq!(row.target_rank, Some(0));
        assert!((row.target_prob.unwrap() - 0.125).abs() < 1e-12);
    }

    #[test]
    fn known_logits_give_known_statistics() {
        // p = softmax([ln 1, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4].
        let z: Vec<f32> = [1f32, 2.0, 3.0, 4.0].iter().map(|v| v.ln()).collect();
        let (row, lse) = row_stats(&z, 2, Some(1));
        let p = [0.1, 0.2, 0.3, 0.4];
        let h: f64 = -p.iter().map(|&v: &f64| v * v.ln()).sum::<f64>();
        assert!((row.entropy - h).abs() < 1e-6);
        assert_eq!(row.top_ids, vec![3, 2]);
        assert!((row.top_probs[0] - 0.4).abs() < 1e-6);
        assert_eq!(row.target_rank, Some(2));
        assert!((row.target_prob.unwrap() - 0.2).abs() < 1e-6);
        // KL(p ‖ uniform) = ln 4 − H(p).
        let (_, u_lse) = row_stats(&[0.0; 4], 0, None);
        let p_z = probabilities(&z, lse);
        let kl = kl_divergence(&p_z, &z, lse, &[0.0; 4], u_lse);
        assert!((kl - (4f64.ln() - h)).abs() < 1e-6);
        assert!(kl_divergence(&p_z, &z, lse, &z, lse).abs() < 1e-12);
        // KL(uniform ‖ p) = Σ ¼ ln(¼ / p_i).
        let uniform = probabilities(&[0.0; 4], u_lse);
        let want: f64 = p.iter().map(|&pi: &f64| 0.25 * (0.25 / pi).ln()).sum();
        let kl = kl_divergence(&uniform, &[0.0; 4], u_lse, &z, lse);
        assert!((kl - want).abs() < 1e-6, "{kl} vs {want}");
        // Top-k beyond 1 and ties: most probable first, equal ones by id.
        let (row, _) = row_stats(&[1.0, 3.0, 3.0, 0.5, 2.0], 3, None);
        assert_eq!(row.top_ids, vec![1, 2, 4]);
        let (row, _) = row_stats(&[1.0, 3.0, 3.0, 0.5, 2.0], 1, None);
        assert_eq!(row.top_ids, vec![1]);
    }

    #[test]
    fn pairs_share_a_chunk_and_chunks_stay_small() {
        let chunks = chunks(6, &[(0, 5), (2, 3)], 2);
        assert_eq!(chunks, vec![vec![0, 5], vec![1], vec![2, 3], vec![4]]);
        let chunks = super::chunks(6, &[(0, 5), (2, 3)], 4);
        assert_eq!(chunks, vec![vec![0, 5, 1], vec![2, 3, 4]]);
        // A group larger than the limit stays whole.
        assert_eq!(super::chunks(3, &[(0, 1), (1, 2)], 1), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn reduce_answers_every_row_and_pair_in_order() {
        let vocab = 3;
        let logits: Vec<Vec<f32>> = vec![vec![0.0, 1.0, 2.0], vec![2.0, 1.0, 0.0], vec![0.0; 3]];
        let request = LensRequest {
            top_k: 1,
            targets: Some(vec![2, 2, 2]),
            kl_pairs: vec![(1, 0), (0, 1), (2, 2)],
        };
        let reply = reduce(3, vocab, &request, |rows| {
            Ok::<_, ()>(rows.iter().flat_map(|&r| logits[r].clone()).collect())
        })
        .unwrap();
        assert_eq!(reply.rows[0].top_ids, vec![2]);
        assert_eq!(reply.rows[1].target_rank, Some(2));
        assert_eq!(reply.rows[2].target_rank, Some(0));
        let (_, l0) = row_stats(&logits[0], 0, None);
        let (_, l1) = row_stats(&logits[1], 0, None);
        let p1 = probabilities(&logits[1], l1);
        let kl_10 = kl_divergence(&p1, &logits[1], l1, &logits[0], l0);
        assert!((reply.kl[0] - kl_10).abs() < 1e-12);
        assert!(reply.kl[1] > 0.0 && reply.kl[2] == 0.0);
    }
}
