//! The checkpoint store: memory-mapped safetensors or GGUF files, single or
//! sharded (split).
//!
//! Opening a checkpoint maps each file and parses only its header, so it
//! costs milliseconds and touches no weight pages. Tensor bytes are borrowed
//! straight from the mapping; they are converted (to f32, dequantized for
//! GGUF block types) only on request and only for the tensor asked for.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Metadata, SafeTensorError};
use safetensors::SafeTensors;

use crate::error::StoreError;
use crate::gguf;
use crate::gguf_model::{self, Transform};
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
        Dtype::Quant(_) | Dtype::Other(_) => return None,
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
    /// How stored values become the layout `shape` describes (GGUF only).
    transform: Transform,
}

impl TensorEntry {
    /// Number of elements (the product of the shape; validated not to overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the tensor takes in its file.
    pub fn stored_bytes(&self) -> usize {
        self.bytes.len()
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
    /// The parsed `config.json`, when one sits beside the weights; for a
    /// GGUF file, the same keys made from its metadata.
    pub config: Option<serde_json::Value>,
    /// A GGUF checkpoint's metadata (its first split's).
    gguf: Option<gguf::Metadata>,
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
    /// BF16 and F64 (and unaligned F32) are converted into a new buffer, GGUF
    /// block types dequantized, and GGUF storage conventions undone (see
    /// `gguf_model`).
    pub fn to_f32(&self) -> Result<Cow<'a, [f32]>, StoreError> {
        let values = self.stored_f32()?;
        match self.entry.transform {
            Transform::None => Ok(values),
            transform => {
                let mut values = values.into_owned();
                let stored_shape = match transform {
                    Transform::Transpose => self.entry.shape.iter().rev().copied().collect(),
                    _ => self.entry.shape.clone(),
                };
                transform.apply(&mut values, &stored_shape);
                Ok(Cow::Owned(values))
            }
        }
    }

    /// The tensor as a safetensors file can hold it: its own bytes when
    /// they are its values as read (a plain dtype, no GGUF convention to
    /// undo), else the values as F32.
    pub fn safetensors_bytes(&self) -> Result<(Dtype, Cow<'a, [u8]>), StoreError> {
        let plain = dtype_to_safetensors(self.entry.dtype).is_some();
        if plain && self.entry.transform == Transform::None {
            return Ok((self.entry.dtype, Cow::Borrowed(self.bytes)));
        }
        let values = self.to_f32()?;
        Ok((
            Dtype::F32,
            Cow::Owned(bytemuck::cast_slice(&values).to_vec()),
        ))
    }

    /// The values of rows `rows` (along the first axis) as f32: what
    /// [`TensorView::to_f32`] gives for those rows, reading and converting
    /// only their bytes — an embedding's few tokens, or one tile of a large
    /// vocabulary's head. A layout transform that moves values between rows
    /// (a transpose, llama.cpp's Q/K permutation) converts the whole tensor
    /// first; no stored embedding or head has one.
    pub fn rows_f32(&self, rows: Range<usize>) -> Result<Cow<'a, [f32]>, StoreError> {
        let count = self.entry.shape.first().copied().unwrap_or(1);
        if rows.start > rows.end || rows.end > count {
            return Err(StoreError::Malformed {
                file: self.file.to_path_buf(),
                problem: format!(
                    "rows {}..{} of tensor `{}`, which has {count}",
                    rows.start, rows.end, self.entry.name
                ),
            });
        }
        let row_values = self.entry.shape.iter().skip(1).product::<usize>();
        match self.entry.transform {
            Transform::None | Transform::MinusOne if count > 0 => {}
            _ => {
                let all = self.to_f32()?;
                let span = rows.start * row_values..rows.end * row_values;
                return Ok(match all {
                    Cow::Borrowed(values) => Cow::Borrowed(&values[span]),
                    Cow::Owned(values) => Cow::Owned(values[span].to_vec()),
                });
            }
        }
        // Every row takes the same bytes: a whole number of quantized
        // blocks for GGUF types (checked when the file was read).
        let row_bytes = self.bytes.len() / count;
        let part = TensorView {
            bytes: &self.bytes[rows.start * row_bytes..rows.end * row_bytes],
            ..*self
        };
        let values = part.stored_f32()?;
        Ok(match self.entry.transform {
            Transform::None => values,
            transform => {
                let mut values = values.into_owned();
                transform.apply(&mut values, &[rows.len(), row_values]);
                Cow::Owned(values)
            }
        })
    }

    fn stored_f32(&self) -> Result<Cow<'a, [f32]>, StoreError> {
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
            Dtype::Quant(quant) => crate::quants::dequantize(quant, bytes)
                .map(Cow::Owned)
                .map_err(|problem| StoreError::Malformed {
                    file: self.file.to_path_buf(),
                    problem: format!("tensor `{}` {problem}", self.entry.name),
                }),
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
        let mapped = files
            .iter()
            .map(|file| map_file(file))
            .collect::<Result<Vec<_>, _>>()?;
        if mapped.iter().any(|bytes| gguf::has_magic(bytes)) {
            let named: Vec<(PathBuf, ShardBytes)> = files.iter().cloned().zip(mapped).collect();
            return Self::from_gguf(label, path.to_path_buf(), dir, named);
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = Vec::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for ((shard_index, file), bytes) in files.iter().enumerate().zip(mapped) {
            let (shard, entries) = parse_shard(file, shard_index, bytes)?;
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
            None,
        ))
    }

    /// A GGUF checkpoint: one file, or the splits of one
    /// (`…-00001-of-00003.gguf`), ordered by their `split.no`. Its config
    /// comes from the metadata of the first split.
    fn from_gguf(
        label: String,
        path: PathBuf,
        dir: PathBuf,
        files: Vec<(PathBuf, ShardBytes)>,
    ) -> Result<Self, StoreError> {
        let mut parsed = Vec::with_capacity(files.len());
        for (file, bytes) in files {
            if !gguf::has_magic(&bytes) {
                return Err(StoreError::Unsupported {
                    path: file,
                    problem: "is not a GGUF file, but the other files of this checkpoint are"
                        .into(),
                });
            }
            let header = gguf::parse(&file, &bytes)?;
            parsed.push((file, bytes, header));
        }
        let split_no = |header: &gguf::Header| header.metadata.u64("split.no").unwrap_or(0);
        parsed.sort_by_key(|(_, _, header)| split_no(header));
        let count = parsed.len() as u64;
        for (position, (file, _, header)) in parsed.iter().enumerate() {
            let declared = header.metadata.u64("split.count").unwrap_or(1);
            if declared != count || split_no(header) != position as u64 {
                return Err(StoreError::Unsupported {
                    path: file.clone(),
                    problem: format!(
                        "is split {} of {declared} (0-based), but {count} split file(s) were found: a split is missing or from another model",
                        split_no(header)
                    ),
                });
            }
        }
        let metadata = parsed[0].2.metadata.clone();
        let mut shards = Vec::with_capacity(parsed.len());
        let mut tensors = Vec::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        let mut all_infos = Vec::new();
        let mut frequency_factors = None;
        for (shard_index, (file, bytes, header)) in parsed.into_iter().enumerate() {
            for info in &header.tensors {
                if let Some(&other) = first_seen.get(&info.name) {
                    return Err(StoreError::DuplicateTensor {
                        file: file.clone(),
                        tensor: info.name.clone(),
                        other: shards
                            .get(other)
                            .map_or(file.clone(), |s: &Shard| s.path.clone()),
                    });
                }
                first_seen.insert(info.name.clone(), shard_index);
                let stored_shape: Vec<usize> = info.extents.iter().rev().copied().collect();
                let transform = gguf_model::transform(&metadata, &info.name, &stored_shape)
                    .map_err(|problem| StoreError::Malformed {
                        file: file.clone(),
                        problem,
                    })?;
                if info.name == "rope_freqs.weight" {
                    frequency_factors = gguf_model::f32_values(
                        &bytes[info.start..info.start + info.len],
                        info.dtype,
                    );
                }
                tensors.push(TensorEntry {
                    name: info.name.clone(),
                    dtype: info.dtype,
                    shape: transform.shape(&stored_shape),
                    shard: shard_index,
                    bytes: info.start..info.start + info.len,
                    transform,
                });
            }
            limits::check_tensor_count(&file, tensors.len())?;
            all_infos.extend(header.tensors.iter().cloned());
            shards.push(Shard {
                path: file,
                data: bytes,
                user_metadata: HashMap::new(),
            });
        }
        let config = gguf_model::hf_config(&metadata, &all_infos, frequency_factors);
        // Scalar metadata reaches plugins and tables as text; arrays (the
        // vocabulary) stay in the store.
        if let Some(first) = shards.first_mut() {
            first.user_metadata = metadata
                .values
                .iter()
                .filter(|(_, v)| v.as_array().is_none())
                .map(|(k, v)| (k.clone(), v.summary()))
                .collect();
        }
        Ok(Self::assemble(
            label,
            path,
            dir,
            shards,
            tensors,
            Some(config),
            Some(metadata),
        ))
    }

    /// The metadata of a GGUF checkpoint (its vocabulary included).
    pub fn gguf_metadata(&self) -> Option<&gguf::Metadata> {
        self.gguf.as_ref()
    }

    /// The file the config is read from: `config.json` beside the weights,
    /// or the GGUF file whose metadata stands in for it.
    pub fn config_source(&self) -> PathBuf {
        match (&self.gguf, self.shards.first()) {
            (Some(_), Some(shard)) => shard.path.clone(),
            _ => self.dir.join("config.json"),
        }
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
        gguf: Option<gguf::Metadata>,
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
            gguf,
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
        if gguf::has_magic(&bytes) {
            return Self::from_gguf(
                name.to_string(),
                path.clone(),
                PathBuf::from("."),
                vec![(path, ShardBytes::Owned(bytes))],
            );
        }
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
            None,
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

    /// A tensor's f32 values for a reader that keeps them: a conversion no
    /// longer needs the file's pages, so they are given back at once (a
    /// borrow keeps them; its reader gives them back when done).
    pub fn f32_values<'a>(&'a self, entry: &'a TensorEntry) -> Result<Cow<'a, [f32]>, StoreError> {
        let values = self.view(entry).to_f32()?;
        if matches!(values, Cow::Owned(_)) {
            self.release_pages(entry);
        }
        Ok(values)
    }

    /// Give back the mapped file pages under one tensor, once its values
    /// are no longer read from the mapping (converted, or done with): they
    /// count toward a job's memory (Slurm, Kubernetes cgroups) until the
    /// kernel needs them, and a pass over a large checkpoint would otherwise
    /// keep every page it ever read. Reading the tensor again faults them
    /// back in from the file; a no-op for bytes held in memory.
    pub fn release_pages(&self, entry: &TensorEntry) {
        let bytes = &self.shards[entry.shard].data[entry.bytes.clone()];
        self.release_pages_at(bytes.as_ptr() as usize, bytes.len());
    }

    /// The same for the bytes at an address this checkpoint lent out (a
    /// borrowed tensor handed back by a plugin); an address outside every
    /// mapping is ignored.
    pub fn release_pages_at(&self, address: usize, len: usize) {
        for shard in &self.shards {
            let ShardBytes::Mapped(mmap) = &shard.data else {
                continue;
            };
            let base = mmap.as_ptr() as usize;
            let Some(offset) = address.checked_sub(base) else {
                continue;
            };
            if offset.checked_add(len).is_none_or(|end| end > mmap.len()) {
                continue;
            }
            // Whole pages only: the first and last may hold a neighbour's
            // bytes, which a neighbour still in use should not have to
            // fault back in.
            let page = page_size();
            let start = offset.div_ceil(page) * page;
            let end = (offset + len) / page * page;
            if end > start {
                // SAFETY: `DontNeed` on a read-only file mapping drops the
                // pages from this process; later reads (any live borrow of
                // these bytes included) fault the same file contents back
                // in. The hazard memmap2 marks it unchecked for — losing
                // writes to a private mapping — cannot arise: nothing
                // writes to this mapping.
                // Advice only: a kernel that declines it costs memory, not results.
                let _ = unsafe {
                    mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
                };
            }
            return;
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

/// The system's page size (the unit `madvise` works in).
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system; no memory is touched.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .unwrap_or(4096)
    })
}

fn map_file(file: &Path) -> Result<ShardBytes, StoreError> {
    let handle = File::open(file).map_err(|source| StoreError::io(file, source))?;
    let len = handle
        .metadata()
        .map_err(|source| StoreError::io(file, source))?
        .len();
    if len < 8 {
        return Err(StoreError::Malformed {
            file: file.to_path_buf(),
            problem: format!("file is {len} bytes, too short to hold a safetensors or GGUF header"),
        });
    }
    // SAFETY: the mapping is read-only and private to this process. Like every
    // memory-mapped reader (safetensors' own loaders included) we rely on the
    // file not being truncated or rewritten while probe runs.
    let mmap = unsafe { Mmap::map(&handle) }.map_err(|source| StoreError::io(file, source))?;
    Ok(ShardBytes::Mapped(mmap))
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
            transform: Transform::None,
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
