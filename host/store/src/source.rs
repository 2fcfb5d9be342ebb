//! What a path the user names holds: one safetensors or GGUF file, a sharded
//! (or split) checkpoint, or a folder of several checkpoints of one
//! training run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::store::Checkpoint;

/// The shape of what sits at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One `.safetensors` file.
    Single(PathBuf),
    /// Shards, read through their index when there is one (shards named
    /// `*-0000i-of-0000n.safetensors` without an index are accepted too, and
    /// the splits of a GGUF file, `*-0000i-of-0000n.gguf`).
    Sharded {
        index: Option<PathBuf>,
        shards: Vec<PathBuf>,
    },
    /// Several checkpoints of one training run, in natural name order
    /// (`step-900` before `step-1000`).
    Run(Vec<RunMember>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMember {
    pub label: String,
    pub path: PathBuf,
    pub layout: Layout,
}

const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// Decide what `path` holds without reading any tensor data.
pub fn classify(path: &Path) -> Result<Layout, StoreError> {
    let meta = std::fs::metadata(path).map_err(|source| StoreError::io(path, source))?;
    if meta.is_file() {
        return classify_file(path);
    }
    let mut safetensors = Vec::new();
    let mut indexes = Vec::new();
    let mut subdirs = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|source| StoreError::io(path, source))?;
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::io(path, source))?;
        let child = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if child.is_dir() {
            subdirs.push(child);
        } else if name.ends_with(INDEX_SUFFIX) {
            indexes.push(child);
        } else if name.ends_with(".safetensors") || name.ends_with(".gguf") {
            safetensors.push(child);
        }
    }
    natural_sort(&mut safetensors);
    natural_sort(&mut subdirs);
    natural_sort(&mut indexes);

    if !indexes.is_empty() {
        let index = match indexes.iter().find(|p| p.ends_with("model.safetensors.index.json")) {
            Some(preferred) => preferred.clone(),
            None if indexes.len() == 1 => indexes[0].clone(),
            None => {
                return Err(StoreError::Unsupported {
                    path: path.to_path_buf(),
                    problem: format!(
                        "holds {} shard indexes and none is model.safetensors.index.json; name the index to open",
                        indexes.len()
                    ),
                })
            }
        };
        return sharded_from_index(&index);
    }
    match safetensors.len() {
        1 => return Ok(Layout::Single(safetensors.remove(0))),
        0 => {}
        _ => {
            if let Some(layout) = shards_by_name(path, &safetensors)? {
                return Ok(layout);
            }
            let members = safetensors
                .into_iter()
                .map(|file| RunMember {
                    label: file_name(&file),
                    path: file.clone(),
                    layout: Layout::Single(file),
                })
                .collect();
            return Ok(Layout::Run(members));
        }
    }
    // No weights at this level: a run folder holds one checkpoint per subfolder.
    let mut members = Vec::new();
    for dir in subdirs {
        match classify(&dir) {
            Ok(layout @ (Layout::Single(_) | Layout::Sharded { .. })) => members.push(RunMember {
                label: file_name(&dir),
                path: dir,
                layout,
            }),
            // Folders without weights (logs, tokenizer folders) are not checkpoints.
            Ok(Layout::Run(_)) | Err(StoreError::NoCheckpoint { .. }) => {}
            Err(other) => return Err(other),
        }
    }
    if members.is_empty() {
        return Err(StoreError::NoCheckpoint {
            path: path.to_path_buf(),
        });
    }
    Ok(Layout::Run(members))
}

fn classify_file(path: &Path) -> Result<Layout, StoreError> {
    let name = file_name(path);
    if name.ends_with(INDEX_SUFFIX) || name.ends_with(".index.json") {
        return sharded_from_index(path);
    }
    let lower = name.to_ascii_lowercase();
    for (ext, what) in [
        (".bin", "a PyTorch pickle"),
        (".pt", "a PyTorch pickle"),
        (".pth", "a PyTorch pickle"),
        (".ckpt", "a pickle checkpoint"),
        (".onnx", "an ONNX model"),
    ] {
        if lower.ends_with(ext) {
            return Err(StoreError::Unsupported {
                path: path.to_path_buf(),
                problem: format!(
                    "this is {what}; probe reads safetensors and GGUF checkpoints (convert it first)"
                ),
            });
        }
    }
    // One split of a GGUF file stands for all of them.
    if let Some((_, total)) = shard_numbers(&name) {
        if lower.ends_with(".gguf") && total > 1 {
            let dir = path.parent().unwrap_or(Path::new("."));
            return gguf_splits(dir, &name, total);
        }
    }
    // Any other file is tried as safetensors or GGUF (by its first bytes,
    // so Ollama's extensionless blobs open too); the header check says if
    // it is neither.
    Ok(Layout::Single(path.to_path_buf()))
}

/// Every split of `name` (`model-00002-of-00003.gguf`) in `dir`.
fn gguf_splits(dir: &Path, name: &str, total: u32) -> Result<Layout, StoreError> {
    let stem = name
        .strip_suffix(".gguf")
        .and_then(|s| s.rsplit_once("-of-"))
        .and_then(|(head, _)| head.rsplit_once('-'))
        .map_or(name, |(stem, _)| stem);
    let width = name
        .rsplit_once("-of-")
        .map_or(5, |(_, tail)| tail.trim_end_matches(".gguf").len());
    let mut shards = Vec::with_capacity(total as usize);
    for i in 1..=total {
        let split = dir.join(format!("{stem}-{i:0width$}-of-{total:0width$}.gguf"));
        if !split.is_file() {
            return Err(StoreError::Unsupported {
                path: dir.join(name),
                problem: format!(
                    "is one of {total} GGUF splits, and split {i} ({}) is missing",
                    split.display()
                ),
            });
        }
        shards.push(split);
    }
    Ok(Layout::Sharded {
        index: None,
        shards,
    })
}

/// Read the `weight_map` of a shard index: tensor name → shard file name.
pub fn read_index(index: &Path) -> Result<BTreeMap<String, String>, StoreError> {
    let bytes = std::fs::read(index).map_err(|source| StoreError::io(index, source))?;
    parse_index(index, &bytes)
}

/// A shard index's bytes (`index` names it in messages): tensor → shard file.
pub fn parse_index(index: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>, StoreError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Index {
            file: index.to_path_buf(),
            problem: format!("not valid JSON: {e}"),
        })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| StoreError::Index {
            file: index.to_path_buf(),
            problem: "has no `weight_map` object".into(),
        })?;
    map.iter()
        .map(|(tensor, shard)| match shard.as_str() {
            Some(shard) if is_plain_file_name(shard) => Ok((tensor.clone(), shard.to_string())),
            Some(shard) => Err(StoreError::Index {
                file: index.to_path_buf(),
                problem: format!(
                    "names shard `{shard}` for `{tensor}`, which is not a file name in this folder"
                ),
            }),
            None => Err(StoreError::Index {
                file: index.to_path_buf(),
                problem: format!("maps `{tensor}` to {shard}, not to a shard file name"),
            }),
        })
        .collect()
}

/// Shard names must stay inside the index's folder.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\\') && name != "." && name != ".."
}

fn sharded_from_index(index: &Path) -> Result<Layout, StoreError> {
    let map = read_index(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let names: BTreeSet<&String> = map.values().collect();
    if names.is_empty() {
        return Err(StoreError::Index {
            file: index.to_path_buf(),
            problem: "`weight_map` is empty".into(),
        });
    }
    let mut shards = Vec::with_capacity(names.len());
    for name in names {
        let shard = dir.join(name);
        if !shard.is_file() {
            return Err(StoreError::Index {
                file: index.to_path_buf(),
                problem: format!(
                    "names shard {name}, which does not exist in {}",
                    dir.display()
                ),
            });
        }
        shards.push(shard);
    }
    natural_sort(&mut shards);
    Ok(Layout::Sharded {
        index: Some(index.to_path_buf()),
        shards,
    })
}

/// `model-00001-of-00003.safetensors` … without an index: one sharded checkpoint,
/// provided every shard is there.
fn shards_by_name(dir: &Path, files: &[PathBuf]) -> Result<Option<Layout>, StoreError> {
    let parsed: Vec<Option<(u32, u32)>> =
        files.iter().map(|f| shard_numbers(&file_name(f))).collect();
    if parsed.iter().any(Option::is_none) {
        return Ok(None);
    }
    let parsed: Vec<(u32, u32)> = parsed.into_iter().flatten().collect();
    let total = parsed[0].1;
    if parsed.iter().any(|&(_, t)| t != total) {
        return Ok(None);
    }
    let present: BTreeSet<u32> = parsed.iter().map(|&(i, _)| i).collect();
    if let Some(missing) = (1..=total).find(|i| !present.contains(i)) {
        return Err(StoreError::Unsupported {
            path: dir.to_path_buf(),
            problem: format!(
                "shard {missing} of {total} is missing and there is no model.safetensors.index.json"
            ),
        });
    }
    Ok(Some(Layout::Sharded {
        index: None,
        shards: files.to_vec(),
    }))
}

/// `…-00002-of-00005.safetensors` (or `.gguf`) → (2, 5).
fn shard_numbers(name: &str) -> Option<(u32, u32)> {
    let stem = name
        .strip_suffix(".safetensors")
        .or_else(|| name.strip_suffix(".gguf"))?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (_, index) = head.rsplit_once('-')?;
    Some((index.parse().ok()?, total.parse().ok()?))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn natural_sort(paths: &mut [PathBuf]) {
    paths.sort_by(|a, b| natord::compare(&file_name(a), &file_name(b)));
}

/// Open everything at `path`: one checkpoint, or each checkpoint of a run in order.
pub fn open_all(path: &Path) -> Result<Vec<Checkpoint>, StoreError> {
    locate_all(path)?.iter().map(Located::open).collect()
}

/// A checkpoint found at a path, not yet opened: a long run over many
/// checkpoints opens, uses and drops them one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub label: String,
    pub path: PathBuf,
    layout: Layout,
    in_run: bool,
}

impl Located {
    /// Map its files and parse their headers.
    pub fn open(&self) -> Result<Checkpoint, StoreError> {
        open_layout(
            self.label.clone(),
            &self.path,
            self.layout.clone(),
            self.in_run,
        )
    }
}

/// Every checkpoint at `path` (one, or a run folder's members in order),
/// located from directory listings alone.
pub fn locate_all(path: &Path) -> Result<Vec<Located>, StoreError> {
    Ok(match classify(path)? {
        Layout::Run(members) => members
            .into_iter()
            .map(|member| Located {
                label: member.label,
                path: member.path,
                layout: member.layout,
                in_run: true,
            })
            .collect(),
        layout => vec![Located {
            label: file_name(path),
            path: path.to_path_buf(),
            layout,
            in_run: false,
        }],
    })
}

fn open_layout(
    label: String,
    path: &Path,
    layout: Layout,
    in_run: bool,
) -> Result<Checkpoint, StoreError> {
    match layout {
        Layout::Single(file) => Checkpoint::from_files(label, path, &[file], None, in_run),
        Layout::Sharded { index, shards } => {
            Checkpoint::from_files(label, path, &shards, index.as_deref(), in_run)
        }
        Layout::Run(_) => Err(StoreError::IsRun {
            path: path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_numbers_parse_hf_names() {
        assert_eq!(
            shard_numbers("model-00002-of-00005.safetensors"),
            Some((2, 5))
        );
        assert_eq!(shard_numbers("model.safetensors"), None);
        assert_eq!(shard_numbers("step-10.safetensors"), None);
    }

    #[test]
    fn plain_file_names_only() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        assert!(!is_plain_file_name("../secret.safetensors"));
        assert!(!is_plain_file_name("/etc/passwd"));
        assert!(!is_plain_file_name(""));
    }
}
