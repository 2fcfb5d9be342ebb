//! GGUF files (llama.cpp's checkpoint format): a strict parser of the
//! header — magic, version, metadata, tensor table — from bytes.
//!
//! Like the safetensors crate for its format, this reads only the header and
//! validates every number before it is used: a string or array never claims
//! more bytes than the file has, a tensor's bytes lie inside the data
//! section at its alignment and overlap no other, and its size follows from
//! its type and shape with checked arithmetic. Tensor data stays in the
//! mapping; [`crate::quants`] dequantizes one tensor when it is asked for.
//!
//! Layout (little-endian, versions 2 and 3): `GGUF`, u32 version, u64 tensor
//! count, u64 metadata count; the metadata as (string key, u32 type, value);
//! per tensor a string name, u32 dims, u64 × dims extents (fastest first),
//! u32 `ggml_type`, u64 offset into the data section; the data section
//! starts at the next multiple of `general.alignment` (default 32).

use std::collections::BTreeMap;
use std::path::Path;

use probe_contract::{Dtype, Quant};

use crate::error::StoreError;
use crate::limits;

/// The default alignment of tensor data (`GGUF_DEFAULT_ALIGNMENT`).
const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`: llama.cpp stores at most four extents.
const MAX_DIMS: u32 = 4;
/// Arrays inside arrays deeper than this are no model's metadata.
const MAX_NESTING: usize = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, stored by element type (a vocabulary of 150 000
/// strings is one `Vec<String>`, not 150 000 tagged values).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer elements as i64 (token types, per-layer head counts).
    pub fn integers(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
            Array::U64(v) => v.iter().map(|&x| x.min(i64::MAX as u64) as i64).collect(),
            Array::I64(v) => v.clone(),
            Array::Bool(v) => v.iter().map(|&x| x as i64).collect(),
            _ => return None,
        })
    }
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for `inspect`: arrays as their length.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 80 => {
                format!(
                    "{}… ({} bytes)",
                    s.chars().take(77).collect::<String>(),
                    s.len()
                )
            }
            Value::String(s) => s.clone(),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

/// The metadata of a GGUF file, by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    pub values: BTreeMap<String, Value>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    pub fn strings(&self, key: &str) -> Option<&[String]> {
        match self.get(key)?.as_array()? {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn floats(&self, key: &str) -> Option<&[f32]> {
        match self.get(key)?.as_array()? {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }

    /// `general.architecture`: `llama`, `qwen2`, `gemma3`, …
    pub fn architecture(&self) -> Option<&str> {
        self.str("general.architecture")
    }
}

/// One entry of the tensor table, validated against the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Extents as GGUF lists them: the fastest-varying (a row's length) first.
    pub extents: Vec<usize>,
    pub dtype: Dtype,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// A parsed GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts.
    pub data_start: usize,
}

/// The GGUF type of a `ggml_type` id that is not a block type.
fn plain_dtype(id: u32) -> Option<Dtype> {
    Some(match id {
        0 => Dtype::F32,
        1 => Dtype::F16,
        24 => Dtype::I8,
        25 => Dtype::I16,
        26 => Dtype::I32,
        27 => Dtype::I64,
        28 => Dtype::F64,
        30 => Dtype::BF16,
        _ => return None,
    })
}

/// (weights per block, bytes per block) of a tensor type.
pub fn block_layout(dtype: Dtype) -> Option<(usize, usize)> {
    Some(match dtype {
        Dtype::Quant(q) => (q.block_weights(), q.block_bytes()),
        Dtype::F32 | Dtype::I32 => (1, 4),
        Dtype::F16 | Dtype::BF16 | Dtype::I16 => (1, 2),
        Dtype::I8 => (1, 1),
        Dtype::F64 | Dtype::I64 => (1, 8),
        _ => return None,
    })
}

/// Whether these bytes start like a GGUF file.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(b"GGUF")
}

struct Reader<'a> {
    file: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn fail(&self, problem: String) -> StoreError {
        StoreError::Malformed {
            file: self.file.to_path_buf(),
            problem,
        }
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], StoreError> {
        if n > self.left() {
            return Err(self.fail(format!(
                "{} needs {n} bytes at offset {} but the file ends {} bytes later: truncated, or not a GGUF file",
                what(),
                self.pos,
                self.left()
            )));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], StoreError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed UTF-8 string whose length the file can hold.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, StoreError> {
        let len = self.u64(what)?;
        if len > self.left() as u64 {
            return Err(self.fail(format!(
                "{} claims a string of {len} bytes at offset {}, but only {} bytes are left in the file: corrupt header",
                what(),
                self.pos - 8,
                self.left()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            self.fail(format!(
                "{} is not valid UTF-8 ({e}): corrupt header",
                what()
            ))
        })
    }

    fn value(
        &mut self,
        kind: u32,
        what: &dyn Fn() -> String,
        depth: usize,
    ) -> Result<Value, StoreError> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => {
                    return Err(self.fail(format!(
                        "{} is a bool stored as {other}, neither 0 nor 1: corrupt header",
                        what()
                    )))
                }
            },
            8 => Value::String(self.string(what)?),
            9 => Value::Array(self.array_value(what, depth)?),
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(self.fail(format!(
                    "{} has value type {other}, which GGUF does not define: corrupt header",
                    what()
                )))
            }
        })
    }

    fn array_value(
        &mut self,
        what: &dyn Fn() -> String,
        depth: usize,
    ) -> Result<Array, StoreError> {
        if depth >= MAX_NESTING {
            return Err(self.fail(format!(
                "{} nests arrays more than {MAX_NESTING} deep: corrupt header",
                what()
            )));
        }
        let kind = self.u32(what)?;
        let count = self.u64(what)?;
        // Every element takes at least one byte (a string at least eight):
        // a count the rest of the file cannot hold is refused before any
        // memory is set aside for it.
        let least = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        };
        if count.saturating_mul(least) > self.left() as u64 {
            return Err(self.fail(format!(
                "{} claims an array of {count} elements at offset {}, more than the {} bytes left in the file can hold: corrupt header",
                what(),
                self.pos - 12,
                self.left()
            )));
        }
        let count = count as usize;
        macro_rules! fixed {
            ($variant:ident, $ty:ty) => {{
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(<$ty>::from_le_bytes(self.array(what)?));
                }
                Array::$variant(items)
            }};
        }
        Ok(match kind {
            0 => Array::U8(self.take(count, what)?.to_vec()),
            1 => Array::I8(self.take(count, what)?.iter().map(|&b| b as i8).collect()),
            2 => fixed!(U16, u16),
            3 => fixed!(I16, i16),
            4 => fixed!(U32, u32),
            5 => fixed!(I32, i32),
            6 => fixed!(F32, f32),
            7 => {
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    match self.value(7, what, depth)? {
                        Value::Bool(b) => items.push(b),
                        _ => unreachable!("type 7 reads a bool"),
                    }
                }
                Array::Bool(items)
            }
            8 => {
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.string(what)?);
                }
                Array::String(items)
            }
            9 => {
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.array_value(what, depth + 1)?);
                }
                Array::Array(items)
            }
            10 => fixed!(U64, u64),
            11 => fixed!(I64, i64),
            12 => fixed!(F64, f64),
            other => {
                return Err(self.fail(format!(
                "{} is an array of value type {other}, which GGUF does not define: corrupt header",
                what()
            )))
            }
        })
    }
}

/// Parse a GGUF header from the file's bytes (`file` names it in messages)
/// and check every tensor's place in the data.
pub fn parse(file: &Path, bytes: &[u8]) -> Result<Header, StoreError> {
    let mut r = Reader {
        file,
        bytes,
        pos: 0,
    };
    let magic = r.array::<4>(&|| "the GGUF magic".to_string())?;
    if &magic != b"GGUF" {
        return Err(r.fail("does not start with the GGUF magic bytes: not a GGUF file".into()));
    }
    let version = r.u32(&|| "the GGUF version".to_string())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(r.fail(
                "is a GGUF version 1 file, which llama.cpp dropped in 2023: convert it again with a current llama.cpp".into(),
            ))
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(r.fail(
                "is a big-endian GGUF file; probe reads little-endian GGUF only".into(),
            ))
        }
        v => {
            return Err(r.fail(format!(
                "says GGUF version {v}; probe reads versions 2 and 3"
            )))
        }
    }
    let tensor_count = r.u64(&|| "the tensor count".to_string())?;
    let kv_count = r.u64(&|| "the metadata count".to_string())?;
    // A tensor entry takes at least 8 + 4 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
    if tensor_count.saturating_mul(24) > r.left() as u64 {
        return Err(r.fail(format!(
            "says it holds {tensor_count} tensors, more than its {} bytes can describe: corrupt header",
            bytes.len()
        )));
    }
    limits::check_tensor_count(file, tensor_count as usize)?;
    if kv_count.saturating_mul(13) > r.left() as u64 {
        return Err(r.fail(format!(
            "says it holds {kv_count} metadata entries, more than its {} bytes can describe: corrupt header",
            bytes.len()
        )));
    }

    let mut metadata = Metadata::default();
    for index in 0..kv_count {
        let key = r.string(&|| format!("metadata key {index}"))?;
        let what = || format!("metadata `{key}`");
        let kind = r.u32(&what)?;
        let value = r.value(kind, &what, 0)?;
        if metadata.values.insert(key.clone(), value).is_some() {
            return Err(r.fail(format!(
                "metadata key `{key}` appears twice: corrupt header"
            )));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
        Some(other) => {
            return Err(r.fail(format!(
                "metadata `general.alignment` is {}, not a power of two as a u32: corrupt header",
                other.summary()
            )))
        }
    };

    struct Raw {
        name: String,
        extents: Vec<usize>,
        kind: u32,
        offset: u64,
    }
    let mut raw = Vec::with_capacity(tensor_count as usize);
    for index in 0..tensor_count {
        let name = r.string(&|| format!("the name of tensor {index}"))?;
        let what = || format!("tensor `{name}`");
        let dims = r.u32(&what)?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(r.fail(format!(
                "tensor `{name}` has {dims} dimensions; GGUF allows 1 to {MAX_DIMS}: corrupt header"
            )));
        }
        let mut extents = Vec::with_capacity(dims as usize);
        for _ in 0..dims {
            let extent = r.u64(&what)?;
            extents.push(usize::try_from(extent).map_err(|_| {
                r.fail(format!(
                    "tensor `{name}` has an extent of {extent}: corrupt header"
                ))
            })?);
        }
        let kind = r.u32(&what)?;
        let offset = r.u64(&what)?;
        raw.push(Raw {
            name,
            extents,
            kind,
            offset,
        });
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    if data_start > bytes.len() as u64 && !raw.is_empty() {
        return Err(r.fail(format!(
            "ends at byte {} inside its header, before the tensor data at {data_start}: truncated",
            bytes.len()
        )));
    }

    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::with_capacity(raw.len());
    for t in raw {
        if !seen.insert(t.name.clone()) {
            return Err(r.fail(format!(
                "tensor `{}` is listed twice: corrupt header",
                t.name
            )));
        }
        let dtype = Quant::from_ggml_id(t.kind)
            .map(Dtype::Quant)
            .or_else(|| plain_dtype(t.kind))
            .ok_or_else(|| {
                r.fail(format!(
                    "tensor `{}` has GGML type {}, which probe does not know (known: F32, F16, BF16, F64, I8–I64 and {}); a newer llama.cpp type, or a corrupt header",
                    t.name,
                    t.kind,
                    Quant::ALL.map(|q| q.2).join(", ")
                ))
            })?;
        // Shapes as the model code writes them: slowest first.
        let shape: Vec<usize> = t.extents.iter().rev().copied().collect();
        limits::check_shape(file, &t.name, &shape)?;
        let numel: usize = shape.iter().product();
        let (block, block_bytes) = block_layout(dtype).expect("every GGUF type has a layout");
        if t.extents[0] % block != 0 {
            return Err(r.fail(format!(
                "tensor `{}` is {dtype} with rows of {} weights, not a multiple of its block of {block}: corrupt header",
                t.name, t.extents[0]
            )));
        }
        let len = (numel / block).checked_mul(block_bytes).ok_or_else(|| {
            r.fail(format!(
                "tensor `{}`'s size overflows: corrupt header",
                t.name
            ))
        })?;
        if t.offset % alignment != 0 {
            return Err(r.fail(format!(
                "tensor `{}` starts at data offset {}, not a multiple of the alignment {alignment}: corrupt header",
                t.name, t.offset
            )));
        }
        let start = data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= bytes.len() as u64 => tensors.push(TensorInfo {
                name: t.name,
                extents: t.extents,
                dtype,
                start: start as usize,
                len,
            }),
            _ => {
                return Err(r.fail(format!(
                    "tensor `{}` ({dtype}, {len} bytes at data offset {}) runs past the end of the file ({} bytes): truncated (an interrupted download?) or corrupt",
                    t.name,
                    t.offset,
                    bytes.len()
                )))
            }
        }
    }
    // No two tensors share bytes.
    let mut by_start: Vec<&TensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
    by_start.sort_by_key(|t| t.start);
    for pair in by_start.windows(2) {
        if pair[0].start + pair[0].len > pair[1].start {
            return Err(r.fail(format!(
                "tensors `{}` and `{}` overlap in the data section: corrupt header",
                pair[0].name, pair[1].name
            )));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start: data_start as usize,
    })
}

/// GGUF bytes from their parts, for tests and fuzz seeds: metadata as
/// (key, value type, encoded value) and tensors as (name, extents fastest
/// first, `ggml_type`, data), each tensor's data at the next multiple of 32.
#[doc(hidden)]
pub mod testing {
    /// A GGUF file from its parts, written the way the format says.
    pub fn file(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, &[u8])]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        for (key, kind, value) in kv {
            string(&mut out, key);
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, extents, kind, data) in tensors {
            string(&mut out, name);
            out.extend((extents.len() as u32).to_le_bytes());
            for e in *extents {
                out.extend(e.to_le_bytes());
            }
            out.extend(kind.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        let start = out.len();
        for ((.., data), off) in tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend(*data);
        }
        out
    }

    /// A metadata string value, encoded.
    pub fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_bytes(bytes: &[u8]) -> Result<Header, String> {
        parse(Path::new("m.gguf"), bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let data: Vec<u8> = (0..24).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend(2u64.to_le_bytes());
        tokens.extend(testing::string("a"));
        tokens.extend(testing::string("bc"));
        let bytes = testing::file(
            &[
                ("general.architecture", 8, testing::string("llama")),
                ("llama.block_count", 4, 2u32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.tokens", 9, tokens),
            ],
            &[("blk.0.attn_q.weight", &[4, 6], 0, &data)],
        );
        let header = parse_bytes(&bytes).unwrap();
        assert_eq!(header.metadata.architecture(), Some("llama"));
        assert_eq!(header.metadata.u64("llama.block_count"), Some(2));
        assert_eq!(
            header.metadata.strings("tokenizer.ggml.tokens").unwrap(),
            ["a", "bc"]
        );
        let t = &header.tensors[0];
        assert_eq!(
            (t.extents.as_slice(), t.dtype, t.len),
            (&[4, 6][..], Dtype::F32, 96)
        );
        assert_eq!(&bytes[t.start..t.start + 4], &0f32.to_le_bytes());
    }

    #[test]
    fn refuses_what_the_file_cannot_hold() {
        // A string claiming u64::MAX bytes.
        let mut absurd = u64::MAX.to_le_bytes().to_vec();
        absurd.extend(b"abc");
        let bytes = testing::file(&[("general.name", 8, absurd)], &[]);
        let err = parse_bytes(&bytes).unwrap_err();
        assert!(
            err.contains("metadata `general.name` claims a string of 18446744073709551615 bytes"),
            "{err}"
        );

        // An array of 2^40 u32 in a small file.
        let mut array = 4u32.to_le_bytes().to_vec();
        array.extend((1u64 << 40).to_le_bytes());
        let err = parse_bytes(&testing::file(&[("x", 9, array)], &[])).unwrap_err();
        assert!(
            err.contains("claims an array of 1099511627776 elements"),
            "{err}"
        );

        // An unknown tensor type.
        let err = parse_bytes(&testing::file(&[], &[("w", &[32], 99, &[0; 32])])).unwrap_err();
        assert!(
            err.contains("tensor `w` has GGML type 99, which probe does not know"),
            "{err}"
        );

        // Q4_0 rows must hold whole blocks of 32.
        let err = parse_bytes(&testing::file(&[], &[("w", &[16, 2], 2, &[0; 18])])).unwrap_err();
        assert!(
            err.contains("rows of 16 weights, not a multiple of its block of 32"),
            "{err}"
        );

        // Data past the end, and a truncated header.
        let mut bytes = testing::file(&[], &[("w", &[8], 0, &[0; 32])]);
        bytes.truncate(bytes.len() - 4);
        let err = parse_bytes(&bytes).unwrap_err();
        assert!(
            err.contains("tensor `w` (F32, 32 bytes at data offset 0) runs past the end"),
            "{err}"
        );
        let err = parse_bytes(&bytes[..30]).unwrap_err();
        assert!(
            err.contains("holds 1 tensors, more than its 30 bytes can describe"),
            "{err}"
        );
        let err = parse_bytes(&bytes[..50]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(parse_bytes(b"GGUF\x01\x00\x00\x00")
            .unwrap_err()
            .contains("version 1"));
        assert!(parse_bytes(b"PK\x03\x04")
            .unwrap_err()
            .contains("not a GGUF file"));
    }
}
