//! Structural checks of an Arrow C Data Interface table before it is
//! imported. The interface carries raw pointers without buffer sizes, so an
//! importer that trusts them reads wherever a broken producer points; these
//! checks refuse, with a message, every inconsistency that can be seen
//! without knowing the buffers' sizes: missing structs or release callbacks,
//! a top level that is not a struct, unknown or unsupported formats,
//! child and buffer counts that do not match the format, null buffers where
//! data must be, and lengths, offsets and null counts out of range.

use std::ffi::{c_char, c_void, CStr};

use polars_arrow::ffi::{ArrowArray, ArrowSchema};

/// Mirror of the C Data Interface's `ArrowSchema` (same layout as
/// polars-arrow's, whose fields are private), for reading — and, in the
/// tests' broken plugin, for breaking — the struct field by field.
#[repr(C)]
pub struct RawSchema {
    /// Format string (NUL-terminated).
    pub format: *const c_char,
    /// Field name, or null.
    pub name: *const c_char,
    /// Metadata, or null.
    pub metadata: *const c_char,
    /// Nullable, dictionary-ordered, map-keys-sorted flags.
    pub flags: i64,
    /// Number of children.
    pub n_children: i64,
    /// `n_children` child schemas.
    pub children: *mut *mut RawSchema,
    /// Dictionary schema, or null.
    pub dictionary: *mut RawSchema,
    /// Frees what the producer owns; null once released.
    pub release: Option<unsafe extern "C" fn(*mut RawSchema)>,
    /// Producer-private.
    pub private_data: *mut c_void,
}

/// Mirror of `ArrowArray`.
#[repr(C)]
pub struct RawArray {
    /// Rows.
    pub length: i64,
    /// Nulls, or -1 if not computed.
    pub null_count: i64,
    /// Rows skipped at the start.
    pub offset: i64,
    /// Number of buffers.
    pub n_buffers: i64,
    /// Number of children.
    pub n_children: i64,
    /// `n_buffers` buffer pointers.
    pub buffers: *mut *const c_void,
    /// `n_children` child arrays.
    pub children: *mut *mut RawArray,
    /// Dictionary array, or null.
    pub dictionary: *mut RawArray,
    /// Frees what the producer owns; null once released.
    pub release: Option<unsafe extern "C" fn(*mut RawArray)>,
    /// Producer-private.
    pub private_data: *mut c_void,
}

const _: () = assert!(std::mem::size_of::<RawSchema>() == std::mem::size_of::<ArrowSchema>());
const _: () = assert!(std::mem::size_of::<RawArray>() == std::mem::size_of::<ArrowArray>());

/// Columns and rows a table may have (limits, not expectations).
pub const MAX_COLUMNS: i64 = 10_000;
/// The most rows a table may have.
pub const MAX_ROWS: i64 = 1 << 34;
const MAX_DEPTH: usize = 8;

/// Check `schema`/`array` before importing them.
///
/// # Safety
/// Every non-null pointer in the structs (format and name strings, child
/// lists, children, the buffer list) must be readable as the C Data
/// Interface describes it: this follows them, but checks each for null and
/// every count against the format before it reads further.
pub unsafe fn check(schema: &ArrowSchema, array: &ArrowArray) -> Result<(), String> {
    // SAFETY: same #[repr(C)] layout (checked above); only read.
    let schema = unsafe { &*(schema as *const ArrowSchema as *const RawSchema) };
    // SAFETY: as above.
    let array = unsafe { &*(array as *const ArrowArray as *const RawArray) };
    if schema.release.is_none() {
        return Err("the table's schema is missing or released (no release callback)".into());
    }
    if array.release.is_none() {
        return Err("the table's array is missing or released (no release callback)".into());
    }
    let format = format_of(schema, "the table")?;
    if format != "+s" {
        return Err(format!(
            "the table must be a struct array (format `+s`, one child per column), got format `{format}`"
        ));
    }
    if schema.n_children > MAX_COLUMNS {
        return Err(format!(
            "the table has {} columns (limit {MAX_COLUMNS})",
            schema.n_children
        ));
    }
    // SAFETY: the caller's promise about the pointers.
    unsafe { node(schema, array, "the table", 0) }
}

fn format_of(schema: &RawSchema, what: &str) -> Result<String, String> {
    if schema.format.is_null() {
        return Err(format!("{what} has no format string"));
    }
    // SAFETY: non-null; the producer promises a NUL-terminated string.
    let text = unsafe { CStr::from_ptr(schema.format) };
    text.to_str()
        .map(str::to_string)
        .map_err(|_| format!("{what} has a format string that is not UTF-8"))
}

fn name_of(schema: &RawSchema, index: usize) -> String {
    if schema.name.is_null() {
        return format!("column {index}");
    }
    // SAFETY: non-null, NUL-terminated by contract.
    let name = unsafe { CStr::from_ptr(schema.name) }.to_string_lossy();
    format!("column `{name}`")
}

/// (buffers, children) a format needs; `None` for formats not accepted.
fn layout(format: &str) -> Option<(i64, i64)> {
    Some(match format {
        "n" => (0, 0),
        "b" | "c" | "C" | "s" | "S" | "i" | "I" | "l" | "L" | "e" | "f" | "g" => (2, 0),
        "u" | "U" | "z" | "Z" => (3, 0),
        "+l" | "+L" => (2, 1),
        "+s" => (1, -1),
        // Views: validity, views, then variadic data buffers and their sizes.
        "vu" | "vz" => (-3, 0),
        f if f.starts_with("w:") => (2, 0),
        f if f.starts_with("ts")
            || f.starts_with("td")
            || f.starts_with("tt")
            || f.starts_with("tD") =>
        {
            (2, 0)
        }
        f if f.starts_with("+w:") => (1, 1),
        _ => return None,
    })
}

/// # Safety
/// As [`check`], for this node and everything below it.
unsafe fn node(
    schema: &RawSchema,
    array: &RawArray,
    what: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{what} nests deeper than {MAX_DEPTH} levels"));
    }
    if array.release.is_none() {
        return Err(format!("{what} is released (no release callback)"));
    }
    let format = format_of(schema, what)?;
    let Some((buffers, children)) = layout(&format) else {
        return Err(format!(
            "{what} has the unsupported Arrow format `{format}`"
        ));
    };
    if !schema.dictionary.is_null() || !array.dictionary.is_null() {
        return Err(format!(
            "{what} is dictionary-encoded, which the host does not accept"
        ));
    }
    if array.length < 0 || array.length > MAX_ROWS {
        return Err(format!(
            "{what} has length {} (limit {MAX_ROWS})",
            array.length
        ));
    }
    if array.offset < 0 || array.offset > MAX_ROWS {
        return Err(format!("{what} has offset {}", array.offset));
    }
    if array.null_count < -1 || array.null_count > array.length {
        return Err(format!(
            "{what} has {} nulls in {} rows",
            array.null_count, array.length
        ));
    }
    let buffers_ok = if buffers < 0 {
        array.n_buffers >= -buffers
    } else {
        array.n_buffers == buffers
    };
    if !buffers_ok {
        return Err(format!(
            "{what} (format `{format}`) has {} buffers, the format needs {}",
            array.n_buffers,
            buffers.abs()
        ));
    }
    if array.n_buffers > 0 && array.buffers.is_null() {
        return Err(format!("{what} has a null buffer list"));
    }
    let rows = array.length + array.offset;
    if rows > 0 && array.n_buffers > 1 {
        // SAFETY: n_buffers pointers, checked non-null above.
        let data = unsafe { *array.buffers.add(1) };
        if data.is_null() {
            return Err(format!(
                "{what} has {} rows but no data buffer",
                array.length
            ));
        }
    }
    if schema.n_children != array.n_children {
        return Err(format!(
            "{what}: the schema has {} children, the array {}",
            schema.n_children, array.n_children
        ));
    }
    if children >= 0 && array.n_children != children {
        return Err(format!(
            "{what} (format `{format}`) has {} children, the format needs {children}",
            array.n_children
        ));
    }
    if array.n_children > MAX_COLUMNS {
        return Err(format!(
            "{what} has {} children (limit {MAX_COLUMNS})",
            array.n_children
        ));
    }
    if array.n_children > 0 && (schema.children.is_null() || array.children.is_null()) {
        return Err(format!("{what} has a null child list"));
    }
    for i in 0..array.n_children as usize {
        // SAFETY: n_children pointers, lists checked non-null.
        let (child_schema, child_array) =
            unsafe { (*schema.children.add(i), *array.children.add(i)) };
        if child_schema.is_null() || child_array.is_null() {
            return Err(format!("{what} has a null child {i}"));
        }
        // SAFETY: non-null child structs, readable by the caller's promise.
        let (child_schema, child_array) = unsafe { (&*child_schema, &*child_array) };
        let child = if depth == 0 {
            name_of(child_schema, i)
        } else {
            format!("{what}'s child {i}")
        };
        if format == "+s" && child_array.length < rows {
            return Err(format!(
                "{child} has {} rows, the table {rows}",
                child_array.length
            ));
        }
        // SAFETY: the caller's promise covers the children.
        unsafe { node(child_schema, child_array, &child, depth + 1) }?;
    }
    Ok(())
}
