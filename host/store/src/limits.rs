//! Limits that keep a hostile or corrupt file from exhausting memory.
//!
//! The safetensors crate already caps the header at 100 MB and validates
//! offsets with checked arithmetic; these add what it does not check.

use std::path::Path;

use crate::error::StoreError;

/// More tensors than any real checkpoint holds (a 405B model has ~1,300).
pub const MAX_TENSORS: usize = 1_000_000;
/// Tensors of higher rank are not weights of any model probe knows.
pub const MAX_RANK: usize = 8;

pub(crate) fn check_tensor_count(file: &Path, count: usize) -> Result<(), StoreError> {
    if count > MAX_TENSORS {
        return Err(StoreError::Limit {
            file: file.to_path_buf(),
            problem: format!("holds {count} tensors, more than the limit of {MAX_TENSORS}"),
        });
    }
    Ok(())
}

pub(crate) fn check_shape(file: &Path, tensor: &str, shape: &[usize]) -> Result<(), StoreError> {
    if shape.len() > MAX_RANK {
        return Err(StoreError::Limit {
            file: file.to_path_buf(),
            problem: format!(
                "tensor `{tensor}` has rank {}, more than the limit of {MAX_RANK}",
                shape.len()
            ),
        });
    }
    if shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_none()
    {
        return Err(StoreError::Limit {
            file: file.to_path_buf(),
            problem: format!("tensor `{tensor}` has a shape {shape:?} whose size overflows"),
        });
    }
    Ok(())
}
