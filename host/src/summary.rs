//! What `probe forward` prints: per position the top-K next-token
//! predictions, the loss on the text, and the residual norm after every block.

use serde::Serialize;

use probe_engine::{Trace, WeightStats};
use probe_text::TextCodec;

#[derive(Debug, Serialize)]
pub struct Prediction {
    pub id: u32,
    pub text: String,
    pub logit: f32,
}

#[derive(Debug, Serialize)]
pub struct PositionSummary {
    pub position: usize,
    pub token: u32,
    pub text: String,
    /// The token that follows in the input, and its cross-entropy (nats).
    pub next_token: Option<u32>,
    pub next_token_loss: Option<f64>,
    pub top: Vec<Prediction>,
}

#[derive(Debug, Serialize)]
pub struct StageNorms {
    /// 0 = the embedding output, s = after the s-th block run.
    pub stage: usize,
    /// `embedding` or `block N`.
    pub after: String,
    /// ‖residual‖₂ at each position.
    pub norms: Vec<f32>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub model: String,
    pub family: String,
    pub device: String,
    pub tokens: Vec<u32>,
    /// Mean next-token cross-entropy (nats) and its exponential.
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
    pub positions: Vec<PositionSummary>,
    pub residual_norms: Vec<StageNorms>,
    /// Encoders: the mean over positions of the final hidden states, L2-normalised
    /// (the sentence embedding of sentence-transformers models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_pooled: Option<Vec<f32>>,
    /// What the weight cache held for this pass: the memory budget, the
    /// peak bytes of converted weights, what was converted (again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightStats>,
}

/// The `k` largest logits of a row, largest first (ties by lower id).
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < ids.len() && k > 0 {
        ids.select_nth_unstable_by(k - 1, by_logit);
    }
    ids.truncate(k);
    ids.sort_by(by_logit);
    ids.into_iter().map(|id| (id, row[id as usize])).collect()
}

/// Mean over positions, L2-normalised.
pub fn mean_pooled(hidden_states: &[f32], hidden: usize) -> Vec<f32> {
    let t = hidden_states.len() / hidden.max(1);
    let mut mean = vec![0.0f64; hidden];
    for row in hidden_states.chunks_exact(hidden) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= t.max(1) as f64);
    let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
    mean.iter().map(|m| (m / norm) as f32).collect()
}

fn row_norms(matrix: &[f32], hidden: usize) -> Vec<f32> {
    matrix
        .chunks_exact(hidden)
        .map(|row| {
            row.iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect()
}

impl Summary {
    pub fn new(
        model: String,
        family: String,
        device: String,
        trace: &Trace,
        codec: Option<&TextCodec>,
        k: usize,
    ) -> Summary {
        let text = |id: u32| codec.map(|c| c.token_text(id)).unwrap_or_default();
        let (losses, loss) = trace.losses();
        let positions = (0..trace.len())
            .map(|p| {
                let top = trace
                    .logits
                    .as_ref()
                    .map(|l| top_k(&l[p * trace.vocab..(p + 1) * trace.vocab], k))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(id, logit)| Prediction {
                        id,
                        text: text(id),
                        logit,
                    })
                    .collect();
                PositionSummary {
                    position: p,
                    token: trace.tokens[p],
                    text: text(trace.tokens[p]),
                    next_token: trace.tokens.get(p + 1).copied(),
                    next_token_loss: losses.as_ref().and_then(|l| l.get(p).copied()),
                    top,
                }
            })
            .collect();
        let residual_norms = trace
            .residuals
            .iter()
            .enumerate()
            .map(|(stage, residual)| StageNorms {
                stage,
                after: if stage == 0 {
                    "embedding".into()
                } else {
                    format!("block {}", trace.blocks[stage - 1])
                },
                norms: row_norms(residual, trace.hidden),
            })
            .collect();
        Summary {
            model,
            family,
            device,
            tokens: trace.tokens.clone(),
            loss,
            perplexity: loss.map(f64::exp),
            positions,
            residual_norms,
            mean_pooled: trace
                .logits
                .is_none()
                .then(|| mean_pooled(&trace.output, trace.hidden)),
            weights: None,
        }
    }

    /// Terminal tables: predictions per position, then residual norms.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{} ({}, {}) · {} tokens",
            self.model,
            self.family,
            self.device,
            self.tokens.len()
        ));
        if let (Some(loss), Some(ppl)) = (self.loss, self.perplexity) {
            out.push_str(&format!(" · loss {loss:.4} nats · perplexity {ppl:.3}"));
        }
        out.push('\n');
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        let has_top = self.positions.iter().any(|p| !p.top.is_empty());
        let mut header = vec!["pos", "token", "text"];
        if has_top {
            header.extend(["next", "loss", "top predictions (id text logit)"]);
        }
        table.set_header(header);
        for p in &self.positions {
            let mut row = vec![
                p.position.to_string(),
                p.token.to_string(),
                format!("{:?}", p.text),
            ];
            if has_top {
                row.push(p.next_token.map(|t| t.to_string()).unwrap_or_default());
                row.push(
                    p.next_token_loss
                        .map(|l| format!("{l:.3}"))
                        .unwrap_or_default(),
                );
                row.push(
                    p.top
                        .iter()
                        .map(|t| format!("{} {:?} {:.2}", t.id, t.text, t.logit))
                        .collect::<Vec<_>>()
                        .join(" · "),
                );
            }
            table.add_row(row);
        }
        out.push_str(&table.to_string());
        out.push('\n');
        let mut norms = comfy_table::Table::new();
        norms.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        norms.set_header(vec![
            "residual after",
            "mean ‖x‖",
            "min",
            "max",
            "last position",
        ]);
        for stage in &self.residual_norms {
            let n = &stage.norms;
            let mean = n.iter().map(|&v| v as f64).sum::<f64>() / n.len().max(1) as f64;
            let min = n.iter().copied().fold(f32::INFINITY, f32::min);
            let max = n.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            norms.add_row(vec![
                stage.after.clone(),
                format!("{mean:.3}"),
                format!("{min:.3}"),
                format!("{max:.3}"),
                format!("{:.3}", n.last().copied().unwrap_or_default()),
            ]);
        }
        out.push_str(&norms.to_string());
        out.push('\n');
        if let Some(weights) = &self.weights {
            let size = |bytes: usize| bytesize::ByteSize(bytes as u64).to_string();
            out.push_str(&format!(
                "converted weights: peak {} (budget {}) · {} converted in {} tensors or row ranges · {} read in place from the file\n",
                size(weights.peak_converted_bytes),
                weights.budget_bytes.map_or("none".into(), size),
                size(weights.total_converted_bytes),
                weights.conversions,
                size(weights.borrowed_bytes),
            ));
            if weights.host_to_device_bytes > 0 {
                out.push_str(&format!(
                    "weights copied to the device: {}\n",
                    size(weights.host_to_device_bytes)
                ));
            }
        }
        out
    }
}
