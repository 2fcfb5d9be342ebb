//! The weight cache: the f32 values every graph reads, under a byte budget.
//!
//! ONNX Runtime's CPU kernels read f32, so an F16, BF16 or quantized tensor
//! is converted before a graph can read it. Those converted copies are what
//! a forward pass holds beyond the mapping; this cache holds them and keeps
//! their total under a budget:
//!
//! - F32 tensors aligned in the mapping are borrowed and cost nothing.
//! - Other tensors are converted when a run first needs them and kept while
//!   the budget allows; when it does not, the least recently used are
//!   dropped first. A model larger than the budget therefore streams: each
//!   block's weights are converted, run and dropped in turn.
//! - Converting a tensor gives its file pages back (`Checkpoint::f32_values`),
//!   so a streamed pass does not keep every page it read either.
//! - Short-lived conversions (an embedding's rows, a tile of the head) are
//!   reserved against the same budget while they live.
//!
//! The cache counts what it holds, its peak and every conversion
//! ([`WeightStats`]): a caller can check the budget without a profiler.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;

use probe_store::store::Checkpoint;

use crate::ForwardError;

/// Bytes of f32 values for `numel` elements.
pub(crate) fn f32_bytes(numel: usize) -> usize {
    numel.saturating_mul(4)
}

/// What the cache did, for `probe forward` and run metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WeightStats {
    /// The budget for converted weights in bytes; `None` for no limit.
    pub budget_bytes: Option<usize>,
    /// The most bytes of converted weights held at once.
    pub peak_converted_bytes: usize,
    /// Bytes of converted weights held now.
    pub converted_bytes: usize,
    /// Bytes converted so far; more than the model's converted size when
    /// blocks streamed through a small budget and were converted again.
    pub total_converted_bytes: usize,
    /// Tensors (or row ranges) converted so far.
    pub conversions: usize,
    /// Converted tensors dropped to make room.
    pub evictions: usize,
    /// Bytes of stored weights read in place from the mapping (aligned F32).
    pub borrowed_bytes: usize,
    /// Weight bytes copied from host memory to the device (CUDA): weights
    /// are graph inputs fed from host memory, so every session run on the
    /// GPU copies those it reads. 0 on the CPU, where they are read in place.
    pub host_to_device_bytes: usize,
}

struct Held {
    values: Vec<f32>,
    last_use: u64,
}

pub(crate) struct WeightCache<'c> {
    checkpoint: &'c Checkpoint,
    /// The shape of every tensor a graph reads.
    shapes: HashMap<String, Vec<usize>>,
    /// Tensors read in place from the mapping.
    borrowed: HashMap<String, &'c [f32]>,
    held: HashMap<String, Held>,
    /// Bytes held plus bytes reserved by short-lived conversions.
    used: usize,
    budget: Option<usize>,
    tick: u64,
    stats: WeightStats,
    /// Whether fed weights cross to a device, and how many bytes have.
    on_device: bool,
    fed_to_device: Cell<usize>,
}

impl<'c> WeightCache<'c> {
    /// A cache over `names` (the tensors the graphs read). A budget smaller
    /// than the largest tensor that must be converted whole is refused here,
    /// before any work; `by_rows` are read a few rows at a time (the
    /// embedding table, the unembedding) and need only a row to fit.
    pub(crate) fn new<'n>(
        checkpoint: &'c Checkpoint,
        names: impl Iterator<Item = &'n String>,
        by_rows: &[&str],
        budget: Option<usize>,
    ) -> Result<Self, ForwardError> {
        let mut shapes = HashMap::new();
        let mut borrowed = HashMap::new();
        let mut largest: Option<(&str, usize)> = None;
        let mut stats = WeightStats {
            budget_bytes: budget,
            ..WeightStats::default()
        };
        for name in names {
            if shapes.contains_key(name) {
                continue;
            }
            let view = checkpoint.tensor(name)?;
            shapes.insert(name.clone(), view.shape().to_vec());
            if view.dtype() == probe_contract::Dtype::F32 {
                // Aligned F32 is borrowed; anything else would be converted
                // here and again later, so it is dropped and converted on use.
                if let std::borrow::Cow::Borrowed(values) = view.to_f32()? {
                    stats.borrowed_bytes += f32_bytes(values.len());
                    borrowed.insert(name.clone(), values);
                    continue;
                }
            }
            let bytes = if by_rows.contains(&name.as_str()) {
                let row = view.shape().iter().skip(1).product();
                f32_bytes(row)
            } else {
                f32_bytes(view.entry.numel())
            };
            if largest.is_none_or(|(_, most)| bytes > most) {
                largest = Some((view.name(), bytes));
            }
        }
        if let (Some(budget), Some((tensor, bytes))) = (budget, largest) {
            if bytes > budget {
                return Err(ForwardError::Budget {
                    file: checkpoint.path.clone(),
                    what: format!("tensor `{tensor}`"),
                    needed: bytes,
                    budget,
                });
            }
        }
        Ok(WeightCache {
            checkpoint,
            shapes,
            borrowed,
            held: HashMap::new(),
            used: 0,
            budget,
            tick: 0,
            stats,
            on_device: false,
            fed_to_device: Cell::new(0),
        })
    }

    pub(crate) fn stats(&self) -> WeightStats {
        WeightStats {
            converted_bytes: self.used,
            host_to_device_bytes: self.fed_to_device.get(),
            ..self.stats
        }
    }

    /// Count fed weights as host-to-device copies (the graphs run on a GPU).
    pub(crate) fn feeds_a_device(&mut self, on_device: bool) {
        self.on_device = on_device;
    }

    /// A graph run was fed `values` of weights from host memory.
    pub(crate) fn fed(&self, values: usize) {
        if self.on_device {
            self.fed_to_device
                .set(self.fed_to_device.get().saturating_add(f32_bytes(values)));
        }
    }

    /// The stored shape of a tensor the graphs read.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    pub(crate) fn shapes(&self) -> &HashMap<String, Vec<usize>> {
        &self.shapes
    }

    /// The values of a tensor that is borrowed or loaded.
    pub(crate) fn get(&self, name: &str) -> Option<&[f32]> {
        match self.borrowed.get(name) {
            Some(values) => Some(values),
            None => self.held.get(name).map(|h| h.values.as_slice()),
        }
    }

    /// Bytes a set of tensors would hold once converted (borrowed ones are free).
    pub(crate) fn converted_size<'n>(&self, names: impl Iterator<Item = &'n str>) -> usize {
        let mut seen = HashSet::new();
        names
            .filter(|n| !self.borrowed.contains_key(*n) && seen.insert(*n))
            .map(|n| f32_bytes(self.shapes.get(n).map_or(0, |s| s.iter().product())))
            .sum()
    }

    /// Whether `bytes` of converted weights can ever be held at once.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.budget.is_none_or(|budget| bytes <= budget)
    }

    /// Make every tensor in `names` readable through [`WeightCache::get`]:
    /// convert what is missing, dropping the least recently used others
    /// when the budget requires. `what` names the part of the model for an
    /// error (they must fit at once).
    pub(crate) fn load(&mut self, names: &[&str], what: &str) -> Result<(), ForwardError> {
        self.tick += 1;
        let wanted: HashSet<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.borrowed.contains_key(*n))
            .collect();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|n| !self.held.contains_key(*n))
            .collect();
        let needed = self.converted_size(wanted.iter().copied());
        if let Some(budget) = self.budget {
            if needed > budget {
                return Err(self.too_small(what, needed, budget));
            }
        }
        let adding = self.converted_size(missing.iter().copied());
        self.make_room(adding, &wanted);
        for name in missing {
            let view = self.checkpoint.tensor(name)?;
            let values = self.checkpoint.f32_values(view.entry)?.into_owned();
            let bytes = f32_bytes(values.len());
            self.used += bytes;
            self.stats.total_converted_bytes += bytes;
            self.stats.conversions += 1;
            self.held.insert(
                name.to_string(),
                Held {
                    values,
                    last_use: 0,
                },
            );
        }
        self.stats.peak_converted_bytes = self.stats.peak_converted_bytes.max(self.used);
        let tick = self.tick;
        for name in wanted {
            if let Some(held) = self.held.get_mut(name) {
                held.last_use = tick;
            }
        }
        Ok(())
    }

    /// Count `bytes` of short-lived converted values against the budget
    /// until [`WeightCache::unreserve`], dropping held tensors other than
    /// `keep` (those the same run reads) to make room.
    pub(crate) fn reserve(
        &mut self,
        bytes: usize,
        keep: &[&str],
        what: &str,
    ) -> Result<(), ForwardError> {
        if let Some(budget) = self.budget {
            if bytes > budget {
                return Err(self.too_small(what, bytes, budget));
            }
        }
        self.make_room(bytes, &keep.iter().copied().collect());
        self.used += bytes;
        self.stats.peak_converted_bytes = self.stats.peak_converted_bytes.max(self.used);
        Ok(())
    }

    pub(crate) fn unreserve(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Bytes that can be reserved now without exceeding the budget once
    /// every held tensor outside `keep` is dropped.
    pub(crate) fn room(&self, keep: &[&str]) -> Option<usize> {
        let budget = self.budget?;
        let kept: usize = keep
            .iter()
            .filter_map(|n| self.held.get(*n))
            .map(|h| f32_bytes(h.values.len()))
            .sum();
        let held: usize = self.held.values().map(|h| f32_bytes(h.values.len())).sum();
        let reserved = self.used - held;
        Some(budget.saturating_sub(kept + reserved))
    }

    /// Rows `rows` of a tensor as f32: sliced from the borrowed or held
    /// values, else read and converted from the file (the caller reserves
    /// their bytes while it keeps them).
    pub(crate) fn rows(
        &mut self,
        name: &str,
        rows: Range<usize>,
    ) -> Result<std::borrow::Cow<'_, [f32]>, ForwardError> {
        let shape = self.shapes.get(name).cloned().unwrap_or_default();
        let width: usize = shape.iter().skip(1).product();
        if self.get(name).is_some() {
            let values = self.get(name).unwrap_or_default();
            return Ok(std::borrow::Cow::Borrowed(
                &values[rows.start * width..rows.end * width],
            ));
        }
        let view = self.checkpoint.tensor(name)?;
        let values = view.rows_f32(rows)?;
        self.stats.total_converted_bytes += f32_bytes(values.len());
        self.stats.conversions += 1;
        Ok(values)
    }

    /// Drop least recently used tensors outside `keep` until `bytes` more fit.
    fn make_room(&mut self, bytes: usize, keep: &HashSet<&str>) {
        let Some(budget) = self.budget else {
            return;
        };
        while self.used + bytes > budget {
            let oldest = self
                .held
                .iter()
                .filter(|(name, _)| !keep.contains(name.as_str()))
                .min_by_key(|(name, held)| (held.last_use, name.as_str()))
                .map(|(name, _)| name.clone());
            let Some(name) = oldest else {
                return;
            };
            if let Some(held) = self.held.remove(&name) {
                self.used -= f32_bytes(held.values.len());
                self.stats.evictions += 1;
            }
        }
    }

    fn too_small(&self, what: &str, needed: usize, budget: usize) -> ForwardError {
        ForwardError::Budget {
            file: self.checkpoint.path.clone(),
            what: what.to_string(),
            needed,
            budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BF16 checkpoint of named tensors, each `rows × 4`.
    fn checkpoint(tensors: &[(&str, usize)]) -> Checkpoint {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, rows) in tensors {
            let start = data.len();
            for i in 0..rows * 4 {
                data.extend_from_slice(&half::bf16::from_f32(i as f32).to_le_bytes());
            }
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "BF16", "shape": [rows, 4], "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&data);
        Checkpoint::from_bytes("cache-test.safetensors", bytes, None).unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn least_recently_used_tensors_make_room_and_the_budget_holds() {
        // Each tensor is 4 rows × 4 values × 4 bytes = 64 bytes once converted.
        let file = checkpoint(&[("a", 4), ("b", 4), ("c", 4)]);
        let all = names(&["a", "b", "c"]);
        let mut cache = WeightCache::new(&file, all.iter(), &[], Some(128)).unwrap();
        cache.load(&["a"], "a").unwrap();
        cache.load(&["b"], "b").unwrap();
        cache.load(&["a"], "a").unwrap(); // a is now newer than b
        cache.load(&["c"], "c").unwrap(); // evicts b, the least recent
        assert!(cache.get("a").is_some() && cache.get("c").is_some());
        assert!(cache.get("b").is_none());
        let stats = cache.stats();
        assert_eq!(stats.peak_converted_bytes, 128);
        assert_eq!(stats.converted_bytes, 128);
        assert_eq!(stats.total_converted_bytes, 192);
        assert_eq!((stats.conversions, stats.evictions), (3, 1));
        assert_eq!(cache.get("a").unwrap()[5], 5.0);
        // Two tensors at once fit; three do not, and the error says so.
        let error = cache.load(&["a", "b", "c"], "three tensors").unwrap_err();
        assert_eq!(
            error.to_string(),
            "cache-test.safetensors: three tensors needs 192 B of f32 weights at once, \
             more than the memory budget of 128 B (--memory-budget)"
        );
        // A reservation evicts too, and is counted until released.
        cache.reserve(100, &[], "rows").unwrap();
        assert!(cache.stats().converted_bytes <= 128 + 100 - 64);
        assert!(cache.stats().peak_converted_bytes <= 128);
        cache.unreserve(100);
    }

    #[test]
    fn a_budget_below_one_tensor_is_refused_when_the_cache_is_made() {
        let file = checkpoint(&[("small", 1), ("large", 8)]);
        let all = names(&["small", "large"]);
        let error = WeightCache::new(&file, all.iter(), &[], Some(100))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("tensor `large` needs 128 B"), "{error}");
        assert!(WeightCache::new(&file, all.iter(), &[], Some(128)).is_ok());
        assert!(WeightCache::new(&file, all.iter(), &[], None).is_ok());
        // Read by rows, the large tensor needs one row (16 bytes) to fit.
        assert!(WeightCache::new(&file, all.iter(), &["large"], Some(16)).is_ok());
    }

    #[test]
    fn rows_convert_only_the_rows_asked_for() {
        let file = checkpoint(&[("table", 6)]);
        let all = names(&["table"]);
        let mut cache = WeightCache::new(&file, all.iter(), &["table"], Some(20)).unwrap();
        let rows = cache.rows("table", 2..4).unwrap().into_owned();
        assert_eq!(rows, (8..16).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(cache.stats().total_converted_bytes, 32);
        assert_eq!(cache.stats().peak_converted_bytes, 0);
    }
}
