//! The 2-D weight matrices of a checkpoint as an analysis sees them: one per
//! (layer, role), whatever the storage.
//!
//! - Banked parameter-golf tensors (`qo_bank[2n, d, d]`, …) become one matrix
//!   per layer: `qo_bank[i]` is layer i's q, `qo_bank[n + i]` its o.
//! - Fused QKV (`qkv_proj`, GPT-2's `c_attn`) becomes q, k and v (GQA sizes
//!   from config.json).
//! - GPT-2's Conv1D weights are stored (in, out); their shape is reported in
//!   Linear's (out, in). Values are handed out in the stored orientation:
//!   singular values, norms and statistics do not depend on it.

use std::ops::{Deref, Range};

use crate::{F32Tensor, Host, PluginError, Role, TensorInfo};

/// Where a logical matrix's values come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// The whole tensor.
    Whole,
    /// A contiguous block of elements (a bank slab or a block of rows).
    Span(Range<usize>),
    /// Columns `start..start + len` of a stored row-major (rows × cols) tensor.
    Columns {
        /// First column.
        start: usize,
        /// Number of columns.
        len: usize,
    },
}

/// One logical weight matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Tensor name, with `[i]` for a bank slab or `[q]` for a fused part.
    pub name: String,
    /// The stored tensor it comes from.
    pub tensor: TensorInfo,
    /// Block index; `None` outside the blocks.
    pub layer: Option<usize>,
    /// q, k, v, o, gate, up, down, embed, lm_head, … (a bank slab or a fused
    /// part has the role of what it holds).
    pub role: Role,
    /// Shape in Linear's convention: (out features, in features).
    pub rows: usize,
    /// In features.
    pub cols: usize,
    /// Stored orientation of the values `Host::matrix_f32` hands out.
    pub stored_rows: usize,
    /// Columns of the values `matrix_f32` hands out.
    pub stored_cols: usize,
    /// Where the values come from inside the tensor.
    pub part: Part,
}

impl Matrix {
    /// min(rows, cols): the number of singular values.
    pub fn rank_bound(&self) -> usize {
        self.rows.min(self.cols)
    }
}

/// A matrix's values: lent by the host (possibly a sub-range), or copied.
pub enum MatrixValues<'a> {
    /// Borrowed from the host: the tensor and the range of it this matrix is.
    Lent(F32Tensor<'a>, Range<usize>),
    /// Copied out (a column block of a Conv1D tensor).
    Owned(Vec<f32>),
}

impl Deref for MatrixValues<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            MatrixValues::Lent(tensor, range) => &tensor[range.clone()],
            MatrixValues::Owned(values) => values,
        }
    }
}

/// Rows of q, k and v in a fused QKV projection with `total` rows.
fn qkv_split(config: Option<&serde_json::Value>, total: usize) -> Option<[usize; 3]> {
    let get = |key: &str| {
        config
            .and_then(|c| {
                c.get(key)
                    .or_else(|| c.get("text_config").and_then(|t| t.get(key)))
            })
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as usize)
    };
    let heads = get("num_attention_heads").or_else(|| get("n_head"));
    let kv_heads = get("num_key_value_heads").or(heads);
    let hidden = get("hidden_size").or_else(|| get("n_embd"));
    if let (Some(heads), Some(kv_heads)) = (heads, kv_heads) {
        let head_dim = get("head_dim").or_else(|| hidden.map(|h| h / heads.max(1)))?;
        let (q, kv) = (heads * head_dim, kv_heads * head_dim);
        if q + 2 * kv == total {
            return Some([q, kv, kv]);
        }
    }
    (total % 3 == 0).then_some([total / 3; 3])
}

impl Host<'_> {
    /// Every 2-D floating-point weight matrix, banks and fused projections
    /// split, in tensor-name order (bank slabs in layer order).
    pub fn matrices(&self) -> Result<Vec<Matrix>, PluginError> {
        let model = self.model()?;
        let conv1d = model.family.stores_transposed();
        let mut out = Vec::new();
        for tensor in self.tensors()? {
            if !tensor.dtype.is_float() || tensor.bias || !tensor.role.is_weight_matrix() {
                continue;
            }
            match (tensor.shape.as_slice(), tensor.role) {
                ([slabs, r, c], bank) if bank.is_bank() => {
                    let (slabs, r, c) = (*slabs, *r, *c);
                    let paired = matches!(bank, Role::QoBank | Role::KvBank);
                    let layers = if paired { slabs / 2 } else { slabs };
                    for slab in 0..slabs {
                        let first = slab < layers;
                        let (layer, role) = match bank {
                            Role::QoBank => {
                                (slab % layers.max(1), if first { Role::Q } else { Role::O })
                            }
                            Role::KvBank => {
                                (slab % layers.max(1), if first { Role::K } else { Role::V })
                            }
                            Role::MlpUpBank => (slab, Role::Up),
                            _ => (slab, Role::Down),
                        };
                        out.push(Matrix {
                            name: format!("{}[{slab}]", tensor.name),
                            layer: Some(layer),
                            role,
                            rows: r,
                            cols: c,
                            stored_rows: r,
                            stored_cols: c,
                            part: Part::Span(slab * r * c..(slab + 1) * r * c),
                            tensor: tensor.clone(),
                        });
                    }
                }
                ([r, c], Role::Qkv) => {
                    let (r, c) = (*r, *c);
                    // Conv1D stores (in, out): q/k/v are blocks of columns.
                    let total = if conv1d { c } else { r };
                    let Some(sizes) = qkv_split(model.config.as_ref(), total) else {
                        self.warn(&format!(
                            "{}: cannot split fused QKV of {total} rows; analysing it whole",
                            tensor.name
                        ));
                        out.push(whole(&tensor, conv1d));
                        continue;
                    };
                    let mut start = 0;
                    for (part_role, len) in [Role::Q, Role::K, Role::V].into_iter().zip(sizes) {
                        let (part, stored_rows, stored_cols) = if conv1d {
                            (Part::Columns { start, len }, r, len)
                        } else {
                            (Part::Span(start * c..(start + len) * c), len, c)
                        };
                        out.push(Matrix {
                            name: format!("{}[{part_role}]", tensor.name),
                            layer: tensor.layer,
                            role: part_role,
                            rows: len,
                            cols: if conv1d { r } else { c },
                            stored_rows,
                            stored_cols,
                            part,
                            tensor: tensor.clone(),
                        });
                        start += len;
                    }
                }
                ([_, _], _) => out.push(whole(&tensor, conv1d && tensor.layer.is_some())),
                _ => {}
            }
        }
        Ok(out)
    }

    /// A matrix's values, in its stored orientation (`stored_rows × stored_cols`, row-major).
    pub fn matrix_f32(&self, matrix: &Matrix) -> Result<MatrixValues<'_>, PluginError> {
        let tensor = self.tensor_f32(matrix.tensor.index)?;
        match &matrix.part {
            Part::Whole => {
                let len = tensor.len();
                Ok(MatrixValues::Lent(tensor, 0..len))
            }
            Part::Span(range) => {
                if range.end > tensor.len() {
                    return Err(format!("{}: slab outside the tensor", matrix.name).into());
                }
                Ok(MatrixValues::Lent(tensor, range.clone()))
            }
            Part::Columns { start, len } => {
                let width = matrix.tensor.shape.get(1).copied().unwrap_or(0);
                let mut values = Vec::with_capacity(matrix.stored_rows * len);
                for row in tensor.chunks_exact(width.max(1)) {
                    values.extend_from_slice(&row[*start..start + len]);
                }
                Ok(MatrixValues::Owned(values))
            }
        }
    }
}

fn whole(tensor: &TensorInfo, transposed: bool) -> Matrix {
    let (r, c) = (tensor.shape[0], tensor.shape[1]);
    Matrix {
        name: tensor.name.clone(),
        layer: tensor.layer,
        role: tensor.role,
        rows: if transposed { c } else { r },
        cols: if transposed { r } else { c },
        stored_rows: r,
        stored_cols: c,
        part: Part::Whole,
        tensor: tensor.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_fused_split_follows_config() {
        let config = serde_json::json!({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256});
        assert_eq!(qkv_split(Some(&config), 256 + 2 * 64), Some([256, 64, 64]));
        assert_eq!(qkv_split(None, 96), Some([32, 32, 32]));
        assert_eq!(qkv_split(None, 97), None);
    }
}
