//! The reduced logit lens (ABI 2.2): what a plugin learns about the head's
//! distribution over the vocabulary at given residual rows, computed in the
//! host so that `[rows, vocab]` logits never cross the boundary (Gemma 3's
//! vocabulary is 262 k entries: one row is a megabyte).
//!
//! For each row the host applies the final norm and the unembedding (the
//! logit lens), takes the softmax `p`, and reports the entropy, the top-k
//! entries and, when asked, one target's rank and probability. For each
//! requested pair `(i, j)` of rows it reports `KL(p_i ‖ p_j)`.

use serde::{Deserialize, Serialize};

/// What to compute over `t` residual rows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LensRequest {
    /// How many of the most probable tokens to report per row (0 = none).
    #[serde(default)]
    pub top_k: usize,
    /// One target token id per row (`t` of them), or none: its rank
    /// (#{v : z_v > z_target}) and probability per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<u32>>,
    /// Row pairs `(i, j)`: `KL(p_i ‖ p_j)` in nats, one per pair, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kl_pairs: Vec<(usize, usize)>,
}

impl LensRequest {
    /// The request's own consistency against `t` rows, before any model is involved.
    pub fn check(&self, t: usize) -> Result<(), String> {
        if let Some(targets) = &self.targets {
            if targets.len() != t {
                return Err(format!(
                    "{} target ids for {t} residual rows: give one per row",
                    targets.len()
                ));
            }
        }
        if let Some(&(i, j)) = self.kl_pairs.iter().find(|&&(i, j)| i >= t || j >= t) {
            return Err(format!(
                "KL pair ({i}, {j}) names a row outside the {t} residual rows"
            ));
        }
        Ok(())
    }
}

/// The lens at one residual row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LensRow {
    /// −Σ p ln p over the whole vocabulary, nats.
    pub entropy: f64,
    /// The `top_k` most probable token ids, most probable first (ties: lower id first).
    pub top_ids: Vec<u32>,
    /// Their probabilities.
    pub top_probs: Vec<f64>,
    /// #{v : z_v > z_target}: 0 when the target is the top-1 token.
    pub target_rank: Option<u64>,
    /// p(target).
    pub target_prob: Option<f64>,
}

/// The host's answer to a [`LensRequest`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LensReply {
    /// One per residual row, in order.
    pub rows: Vec<LensRow>,
    /// `KL(p_i ‖ p_j)` per requested pair, in order, nats.
    pub kl: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_checked_against_its_rows() {
        let request = LensRequest {
            top_k: 3,
            targets: Some(vec![1, 2]),
            kl_pairs: vec![(0, 1)],
        };
        assert!(request.check(2).is_ok());
        assert!(request.check(3).unwrap_err().contains("2 target ids for 3"));
        let outside = LensRequest {
            kl_pairs: vec![(0, 2)],
            ..Default::default()
        };
        assert!(outside.check(2).unwrap_err().contains("(0, 2)"));
    }
}
