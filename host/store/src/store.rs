//! The checkpoint store: memory-mapped safetensors files, single or sharded.
//!
//! Opening a checkpoint maps each file and parses only its JSON header, so it
//! costs milliseconds and touches no weight pages. Tensor bytes are borrowed
//! straight from the mapping; they are converted (to f32) only on request and
//! only for the tensor asked for.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensorError};
use safetensors::SafeTensors;

use crate::error::StoreError;
use crate::limits;

pub use probe_contract::Dtype;

/// The dtype a safetensors header names.
pub fn dtype_from_safetensors(dtype: safetensors::Dtype) -> Dtype {
    use safetensors::Dtype as D;
    let other = |name: &str| Dtype::parse(name).unwrap_or(Dtype::Other("unknown"));
    match dtype {
        D::F64 => Dtype::F64,
        D::F32 => Dtype::F32,
        D::F16 => Dtype::F16,
        D::BF16 => Dtype::BF16,
        D::I64 => Dtype::I64,
        D::I32 => Dtype::I32,
        D::I16 => Dtype::I16,
        D::I8 => Dtype::I8,
        D::U64 => Dtype::U64,
        D::U32 => Dtype::U32,
        D::U16 => Dtype::U16,
        D::U8 => Dtype::U8,
        D::BOOL => Dtype::Bool,
        D::F8_E5M2 => other("F8_E5M2"),
        D::F8_E4M3 => other("F8_E4M3"),
        D::F8_E8M0 => other("F8_E8M0"),
        D::F8_E4M3FNUZ => other("F8_E4M3FNUZ"),
        D::F8_E5M2FNUZ => other("F8_E5M2FNUZ"),
        D::F6_E2M3 => other("F6_E2M3"),
        D::F6_E3M2 => other("F6_E3M2"),
        D::F4 => other("F4"),
        D::C64 => other("C64"),
        _ => Dtype::Other("unknown"),
    }
}

/// Back to the safetensors crate's dtype (for writing files).
pub fn dtype_to_safetensors(dtype: Dtype) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Some(match dtype {
        Dtype::F64 => D::F64,
        Dtype::F32 => D::F32,
        Dtype::F16 => D::F16,
        Dtype::BF16 => D::BF16,
        Dtype::I64 => D::I64,
        Dtype::I32 => D::I32,
        Dtype::I16 => D::I16,
        Dtype::I8 => D::I8,
        Dtype::U64 => D::U64,
        Dtype::U32 => D::U32,
        Dtype::U16 => D::U16,
        Dtype::U8 => D::U8,
        Dtype::Bool => D::BOOL,
        Dtype::Other("F8_E5M2") => D::F8_E5M2,
        Dtype::Other("F8_E4M3") => D::F8_E4M3,
        Dtype::Other("F8_E8M0") => D::F8_E8M0,
        Dtype::Other("F8_E4M3FNUZ") => D::F8_E4M3FNUZ,
        Dtype::Other("F8_E5M2FNUZ") => D::F8_E5M2FNUZ,
        Dtype::Other("F6_E2M3") => D::F6_E2M3,
        Dtype::Other("F6_E3M2") => D::F6_E3M2,
        Dtype::Other("F4") => D::F4,
        Dtype::Other("C64") => D::C64,
        Dtype::Other(_) => return None,
    })
}

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    data: ShardBytes,
    user_metadata: HashMap<String, String>,
}

/// A shard's bytes: mapped from its file, or handed over in memory (the
/// fuzzers, and callers that already hold the bytes).
enum ShardBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for ShardBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(mmap) => mmap,
            ShardBytes::Owned(bytes) => bytes,
        }
    }
}

/// Where one tensor lives: which shard, and its byte range inside the mapping.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    bytes: Range<usize>,
}

impl TensorEntry {
    /// Number of elements (the product of the shape; validated not to overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checkpoint: one model state, possibly spread over several shard files.
pub struct Checkpoint {
    /// A short label: the file or folder name, or the path inside a run folder.
    pub label: String,
    /// The path the user named, or the file/folder this checkpoint was found at.
    pub path: PathBuf,
    /// The folder holding `config.json` / `tokenizer.json`, if any.
    pub dir: PathBuf,
    shards: Vec<Shard>,
    /// Sorted by name, so listing order never depends on file order.
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    /// The parsed `config.json`, when one sits beside the weights.
    pub config: Option<serde_json::Value>,
}

/// A tensor's bytes, borrowed from the mapping.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub entry: &'a TensorEntry,
    pub bytes: &'a [u8],
    file: &'a Path,
}

impl<'a> TensorView<'a> {
    pub fn name(&self) -> &'a str {
        &self.entry.name
    }

    pub fn shape(&self) -> &'a [usize] {
        &self.entry.shape
    }

    pub fn dtype(&self) -> Dtype {
        self.entry.dtype
    }

    /// The values as f32. F32 data aligned in the mapping is borrowed; F16,
    /// BF16 and F64 (and unaligned F32) are converted into a new buffer.
    pub fn to_f32(&self) -> Result<Cow<'a, [f32]>, StoreError> {
        let bytes = self.bytes;
        match self.entry.dtype {
            Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                Ok(values) => Ok(Cow::Borrowed(values)),
                Err(_) => Ok(Cow::Owned(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )),
            },
            Dtype::F16 => Ok(Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            )),
            Dtype::BF16 => Ok(Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            )),
            Dtype::F64 => Ok(Cow::Owned(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                    .collect(),
            )),
            other => Err(StoreError::NotFloat {
                file: self.file.to_path_buf(),
                tensor: self.entry.name.clone(),
                dtype: other.as_str(),
            }),
        }
    }
}

impl Checkpoint {
    /// Open one checkpoint given by a `.safetensors` file, a shard index
    /// (`*.safetensors.index.json`), or a folder holding either; a folder of
    /// several checkpoints is refused (see `source::open_all`).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut all = crate::source::open_all(path)?;
        if all.len() != 1 {
            return Err(StoreError::IsRun {
                path: path.to_path_buf(),
            });
        }
        Ok(all.remove(0))
    }

    pub(crate) fn from_files(
        label: String,
        path: &Path,
        files: &[PathBuf],
        index: Option<&Path>,
        in_run: bool,
    ) -> Result<Self, StoreError> {
        let dir = files
            .first()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = Vec::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for (shard_index, file) in files.iter().enumerate() {
            let (shard, entries) = map_shard(file, shard_index)?;
            for entry in entries {
                if let Some(&other) = first_seen.get(&entry.name) {
                    return Err(StoreError::DuplicateTensor {
                        file: file.clone(),
                        tensor: entry.name,
                        other: files[other].clone(),
                    });
                }
                first_seen.insert(entry.name.clone(), shard_index);
                tensors.push(entry);
            }
            shards.push(shard);
            limits::check_tensor_count(file, tensors.len())?;
        }
        if let Some(index) = index {
            check_index_consistency(index, files, &tensors)?;
        }
        let config = read_config(&dir, in_run)?;
        Ok(Self::assemble(
            label,
            path.to_path_buf(),
            dir,
            shards,
            tensors,
            config,
        ))
    }

    /// The checkpoint of parsed shards: tensors sorted by name (never file
    /// order) and indexed by it.
    fn assemble(
        label: String,
        path: PathBuf,
        dir: PathBuf,
        shards: Vec<Shard>,
        mut tensors: Vec<TensorEntry>,
        config: Option<serde_json::Value>,
    ) -> Self {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            label,
            path,
            dir,
            shards,
            tensors,
            by_name,
            config,
        }
    }

    /// A single-file checkpoint from bytes in memory (the same checks as a
    /// file), with `config.json`'s bytes if there is one. `name` stands in
    /// for the file's path in messages.
    pub fn from_bytes(
        name: &str,
        bytes: Vec<u8>,
        config_json: Option<&[u8]>,
    ) -> Result<Self, StoreError> {
        let path = PathBuf::from(name);
        let (shard, tensors) = parse_shard(&path, 0, ShardBytes::Owned(bytes))?;
        limits::check_tensor_count(&path, tensors.len())?;
        let config = config_json
            .map(|bytes| parse_config(&PathBuf::from("config.json"), bytes))
            .transpose()?;
        Ok(Self::assemble(
            name.to_string(),
            path,
            PathBuf::from("."),
            vec![shard],
            tensors,
            config,
        ))
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Borrow a tensor's bytes from the mapping.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, StoreError> {
        let entry = self.entry(name).ok_or_else(|| StoreError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        Ok(self.view(entry))
    }

    pub fn view<'a>(&'a self, entry: &'a TensorEntry) -> TensorView<'a> {
        let shard = &self.shards[entry.shard];
        TensorView {
            entry,
            bytes: &shard.data[entry.bytes.clone()],
            file: &shard.path,
        }
    }

    /// The files this checkpoint is made of.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// `__metadata__` of every shard, merged (first shard wins on conflicts).
    pub fn user_metadata(&self) -> BTreeMap<String, String> {
        let mut merged = BTreeMap::new();
        for shard in self.shards.iter().rev() {
            for (k, v) in &shard.user_metadata {
                merged.insert(k.clone(), v.clone());
            }
        }
        merged
    }
}

fn map_shard(file: &Path, shard_index: usize) -> Result<(Shard, Vec<TensorEntry>), StoreError> {
    let handle = File::open(file).map_err(|source| StoreError::io(file, source))?;
    let len = handle
        .metadata()
        .map_err(|source| StoreError::io(file, source))?
        .len();
    if len < 8 {
        return Err(StoreError::Malformed {
            file: file.to_path_buf(),
            problem: format!("file is {len} bytes, too short to hold a safetensors header"),
        });
    }
    // SAFETY: the mapping is read-only and private to this process. Like every
    // memory-mapped reader (safetensors' own loaders included) we rely on the
    // file not being truncated or rewritten while probe runs.
    let mmap = unsafe { Mmap::map(&handle) }.map_err(|source| StoreError::io(file, source))?;
    parse_shard(file, shard_index, ShardBytes::Mapped(mmap))
}

/// Parse a shard's header (the safetensors crate's checked parser) and
/// validate every tensor's place in the data.
fn parse_shard(
    file: &Path,
    shard_index: usize,
    data: ShardBytes,
) -> Result<(Shard, Vec<TensorEntry>), StoreError> {
    if data.len() < 8 {
        return Err(StoreError::Malformed {
            file: file.to_path_buf(),
            problem: format!(
                "file is {} bytes, too short to hold a safetensors header",
                data.len()
            ),
        });
    }
    let (header_len, metadata) = SafeTensors::read_metadata(&data)
        .map_err(|e| describe_safetensors_error(file, &data, e))?;
    let data_start = 8 + header_len;
    let entries = entries_of(file, shard_index, data_start, &metadata)?;
    let user_metadata = metadata.metadata().clone().unwrap_or_default();
    Ok((
        Shard {
            path: file.to_path_buf(),
            data,
            user_metadata,
        },
        entries,
    ))
}

fn entries_of(
    file: &Path,
    shard_index: usize,
    data_start: usize,
    metadata: &Metadata,
) -> Result<Vec<TensorEntry>, StoreError> {
    let mut entries = Vec::with_capacity(metadata.tensors().len());
    for (name, info) in metadata.tensors() {
        // safetensors has already checked that offsets are contiguous, in
        // bounds and consistent with dtype × shape (with checked arithmetic).
        let (begin, end) = info.data_offsets;
        limits::check_shape(file, &name, &info.shape)?;
        entries.push(TensorEntry {
            name,
            dtype: dtype_from_safetensors(info.dtype),
            shape: info.shape.clone(),
            shard: shard_index,
            bytes: data_start + begin..data_start + end,
        });
    }
    Ok(entries)
}

/// Turn the safetensors crate's terse errors into a sentence a user can act on.
fn describe_safetensors_error(file: &Path, buffer: &[u8], error: SafeTensorError) -> StoreError {
    let header_len = buffer
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let problem = match error {
        SafeTensorError::HeaderTooLarge => format!(
            "header length field says {} bytes, more than safetensors allows: not a safetensors file, or a corrupt one",
            header_len.unwrap_or(0)
        ),
        SafeTensorError::HeaderTooSmall => "file too short to hold a safetensors header".into(),
        SafeTensorError::InvalidHeaderLength => format!(
            "header length field says {} bytes but the file has only {}: truncated, or not a safetensors file",
            header_len.unwrap_or(0),
            buffer.len()
        ),
        SafeTensorError::InvalidHeader(e) => format!("header is not valid UTF-8 ({e}): corrupt header"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("header is not valid safetensors JSON ({e}): corrupt header")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "file size does not match the tensor data the header describes: the file is truncated (an interrupted download?) or has trailing bytes".into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets that overlap, leave gaps or run past the data: corrupt header")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte size does not match its dtype and shape: corrupt header".into()
        }
        SafeTensorError::ValidationOverflow => {
            "a tensor's shape is so large that its size overflows: corrupt header".into()
        }
        other => format!("invalid safetensors file: {other}"),
    };
    StoreError::Malformed {
        file: file.to_path_buf(),
        problem,
    }
}

/// The index must name every tensor we found, in the file we found it in.
fn check_index_consistency(
    index: &Path,
    files: &[PathBuf],
    tensors: &[TensorEntry],
) -> Result<(), StoreError> {
    let map = crate::source::read_index(index)?;
    let found: HashMap<&str, &TensorEntry> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for (tensor, shard_name) in &map {
        match found.get(tensor.as_str()) {
            None => {
                return Err(StoreError::Index {
                    file: index.to_path_buf(),
                    problem: format!(
                        "names tensor `{tensor}` in {shard_name}, but that shard does not hold it"
                    ),
                })
            }
            Some(entry) => {
                let actual = &files[entry.shard];
                if actual.file_name().map(|n| n.to_string_lossy())
                    != Some(shard_name.as_str().into())
                {
                    return Err(StoreError::Index {
                        file: index.to_path_buf(),
                        problem: format!(
                            "places tensor `{tensor}` in {shard_name}, but it is stored in {}",
                            actual.display()
                        ),
                    });
                }
            }
        }
    }
    if let Some(extra) = tensors.iter().find(|t| !map.contains_key(&t.name)) {
        return Err(StoreError::Index {
            file: index.to_path_buf(),
            problem: format!(
                "does not list tensor `{}`, which {} holds",
                extra.name,
                files[extra.shard].display()
            ),
        });
    }
    Ok(())
}

fn read_config(dir: &Path, in_run: bool) -> Result<Option<serde_json::Value>, StoreError> {
    // A run folder's checkpoints may share one config.json in the run folder.
    let parent = if in_run {
        dir.parent().map(|p| p.join("config.json"))
    } else {
        None
    };
    for candidate in [Some(dir.join("config.json")), parent]
        .into_iter()
        .flatten()
    {
        if candidate.is_file() {
            let bytes =
                std::fs::read(&candidate).map_err(|source| StoreError::io(&candidate, source))?;
            return parse_config(&candidate, &bytes).map(Some);
        }
    }
    Ok(None)
}

/// `config.json`'s bytes: a JSON object, or an error naming the file.
pub fn parse_config(file: &Path, bytes: &[u8]) -> Result<serde_json::Value, StoreError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Config {
            file: file.to_path_buf(),
            problem: format!("not valid JSON: {e}"),
        })?;
    if !value.is_object() {
        return Err(StoreError::Config {
            file: file.to_path_buf(),
            problem: "expected a JSON object at the top level".into(),
        });
    }
    Ok(value)
}
