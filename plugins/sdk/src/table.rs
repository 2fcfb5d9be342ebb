//! DataFrames across the boundary as one Arrow struct array (the way Arrow
//! moves a record batch through the C Data Interface): each column a child.
//! The producer owns the buffers; the consumer calls the release callbacks.

use polars::prelude::*;
use polars_arrow::ffi;
pub use polars_arrow::ffi::{ArrowArray, ArrowSchema};

use crate::abi;

// The contract names the C Data Interface structs opaquely; polars-arrow's
// are the interface's layout. These casts are the only place the two meet.

/// polars-arrow's schema struct as the contract's opaque pointer.
pub fn c_schema(schema: &mut ArrowSchema) -> *mut abi::ArrowSchema {
    (schema as *mut ArrowSchema).cast()
}

/// polars-arrow's array struct as the contract's opaque pointer.
pub fn c_array(array: &mut ArrowArray) -> *mut abi::ArrowArray {
    (array as *mut ArrowArray).cast()
}

/// The contract's opaque schema pointer as polars-arrow's struct.
pub fn c_schema_out(schema: *mut abi::ArrowSchema) -> *mut ArrowSchema {
    schema.cast()
}

/// The contract's opaque array pointer as polars-arrow's struct.
pub fn c_array_out(array: *mut abi::ArrowArray) -> *mut ArrowArray {
    array.cast()
}

/// Export a frame as (schema, array). Every column is rechunked into one chunk.
pub fn export_frame(df: DataFrame) -> PolarsResult<(ArrowSchema, ArrowArray)> {
    if df.width() == 0 {
        polars_bail!(ComputeError: "a result table needs at least one column");
    }
    let series = df.into_struct("probe_table".into()).into_series().rechunk();
    let field = series.field().to_arrow(CompatLevel::newest());
    let array = series.to_arrow(0, CompatLevel::newest());
    Ok((
        ffi::export_field_to_c(&field),
        ffi::export_array_to_c(array),
    ))
}

/// Import a frame a plugin exported with [`export_frame`].
///
/// # Safety
/// `schema` and `array` must be valid Arrow C Data Interface structs whose
/// release callbacks free what they own.
pub unsafe fn import_frame(schema: ArrowSchema, array: ArrowArray) -> PolarsResult<DataFrame> {
    // Refuse what would make the importer read through bad pointers; the
    // structs are dropped (released) on the way out.
    // SAFETY: the caller promises valid structs; `check` reads only what
    // the interface says they hold.
    if let Err(problem) = unsafe { crate::validate::check(&schema, &array) } {
        polars_bail!(ComputeError: "{problem}");
    }
    // SAFETY: valid (as promised) and structurally checked above.
    let field = unsafe { ffi::import_field_from_c(&schema) }?;
    if !matches!(field.dtype, ArrowDataType::Struct(_)) {
        polars_bail!(ComputeError: "expected a struct array (one child per column), got {:?}", field.dtype);
    }
    // SAFETY: as above; the import takes ownership of the array.
    let array = unsafe { ffi::import_array_from_c(array, field.dtype.clone()) }?;
    let series = Series::try_from((&field, array))?;
    Ok(series.struct_()?.clone().unnest())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let df = df!(
            "tensor" => ["a", "b", "c"],
            "layer" => [Some(0i64), None, Some(2)],
            "sigma" => [1.5f64, 2.5, f64::NAN],
        )
        .unwrap();
        let (schema, array) = export_frame(df.clone()).unwrap();
        // SAFETY: freshly exported structs.
        let back = unsafe { import_frame(schema, array) }.unwrap();
        assert_eq!(back.get_column_names(), df.get_column_names());
        assert_eq!(back.height(), 3);
        assert_eq!(
            back.column("tensor").unwrap().str().unwrap().get(1),
            Some("b")
        );
        assert_eq!(back.column("layer").unwrap().i64().unwrap().get(1), None);
    }

    #[test]
    fn empty_frames_keep_their_schema() {
        let df = df!("x" => Vec::<f64>::new()).unwrap();
        let (schema, array) = export_frame(df).unwrap();
        // SAFETY: freshly exported structs.
        let back = unsafe { import_frame(schema, array) }.unwrap();
        assert_eq!(back.height(), 0);
        assert_eq!(back.column("x").unwrap().dtype(), &DataType::Float64);
    }
}
