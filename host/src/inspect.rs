//! `probe inspect`: what a checkpoint is, from its headers alone.

use polars::prelude::*;
use serde::Serialize;

use crate::schema::Schema;
use crate::store::Checkpoint;

/// One tensor as `probe inspect` lists it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TensorRow {
    pub name: String,
    pub layer: Option<usize>,
    pub role: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub params: usize,
    /// Storage bits per weight: 16 for BF16, 5 for GGUF's Q4_1 (its block
    /// scales included); `None` for types probe cannot size.
    pub bits_per_weight: Option<f64>,
}

/// Everything `probe inspect` says about one checkpoint.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Inspection {
    /// Present only when several checkpoints are inspected together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    pub family: String,
    pub num_layers: usize,
    pub hidden_size: Option<usize>,
    pub vocab_size: Option<usize>,
    pub tied_embeddings: bool,
    pub params: usize,
    /// `safetensors` or `gguf`.
    pub format: String,
    /// Bytes the tensors take on disk.
    pub stored_bytes: usize,
    pub tensors: Vec<TensorRow>,
}

impl Inspection {
    pub fn of(checkpoint: &Checkpoint) -> Self {
        let schema = Schema::of(checkpoint);
        let mut tensors: Vec<TensorRow> = schema
            .placed(checkpoint)
            .map(|(entry, placement)| TensorRow {
                name: entry.name.clone(),
                layer: placement.layer,
                role: placement.role_name(),
                dtype: entry.dtype.to_string(),
                shape: entry.shape.clone(),
                params: entry.numel(),
                bits_per_weight: entry.dtype.bits_per_weight(),
            })
            .collect();
        // Globals first, then block by block in numeric order, names within.
        tensors.sort_by(|a, b| {
            (a.layer.map(|l| l + 1), &a.name).cmp(&(b.layer.map(|l| l + 1), &b.name))
        });
        Inspection {
            checkpoint: None,
            family: schema.family.to_string(),
            num_layers: schema.num_layers,
            hidden_size: schema.hidden_size,
            vocab_size: schema.vocab_size,
            tied_embeddings: schema.tied_embeddings,
            params: tensors.iter().map(|t| t.params).sum(),
            format: if checkpoint.gguf_metadata().is_some() {
                "gguf"
            } else {
                "safetensors"
            }
            .to_string(),
            stored_bytes: checkpoint.tensors().iter().map(|t| t.stored_bytes()).sum(),
            tensors,
        }
    }

    /// The summary lines printed above the terminal table.
    pub fn summary(&self) -> String {
        let opt = |v: Option<usize>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        let bits = 8.0 * self.stored_bytes as f64 / self.params.max(1) as f64;
        format!(
            "{}family {} · {} layers · hidden {} · vocab {} · tied embeddings: {} · {} tensors · {} parameters · {} at {bits:.2} bits/weight",
            self.checkpoint.as_ref().map(|c| format!("{c}: ")).unwrap_or_default(),
            self.family,
            self.num_layers,
            opt(self.hidden_size),
            opt(self.vocab_size),
            if self.tied_embeddings { "yes" } else { "no" },
            self.tensors.len(),
            self.params,
            self.format,
        )
    }
}

/// The tensor listing of one or more checkpoints as one frame; a
/// `checkpoint` column leads when there are several.
pub fn tensor_frame(inspections: &[Inspection]) -> PolarsResult<DataFrame> {
    let rows = inspections
        .iter()
        .flat_map(|i| i.tensors.iter().map(move |t| (i, t)));
    let mut checkpoint = Vec::new();
    let mut name = Vec::new();
    let mut layer = Vec::new();
    let mut role = Vec::new();
    let mut dtype = Vec::new();
    let mut shape = Vec::new();
    let mut params = Vec::new();
    let mut bits = Vec::new();
    for (inspection, t) in rows {
        checkpoint.push(inspection.checkpoint.clone().unwrap_or_default());
        name.push(t.name.as_str());
        layer.push(t.layer.map(|l| l as i64));
        role.push(t.role.as_str());
        dtype.push(t.dtype.as_str());
        shape.push(Series::new(
            "".into(),
            t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
        ));
        params.push(t.params as i64);
        bits.push(t.bits_per_weight);
    }
    let mut columns = Vec::new();
    if inspections.len() > 1 {
        columns.push(Column::new("checkpoint".into(), checkpoint));
    }
    let height = name.len();
    columns.extend([
        Column::new("name".into(), name),
        Column::new("layer".into(), layer),
        Column::new("role".into(), role),
        Column::new("dtype".into(), dtype),
        Column::new("shape".into(), shape),
        Column::new("params".into(), params),
        Column::new("bits_per_weight".into(), bits),
    ]);
    DataFrame::new(height, columns)
}
