//! DataFrames across the boundary as one Arrow struct array (the way Arrow
//! moves a record batch through the C Data Interface): each column a child.
//! The producer owns the buffers; the consumer calls the release callbacks.

use polars::prelude::*;
use polars_arrow::ffi::{self, ArrowArray, ArrowSchema};

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
    if let Err(problem) = crate::validate::check(&schema, &array) {
        polars_bail!(ComputeError: "{problem}");
    }
    let field = unsafe { ffi::import_field_from_c(&schema) }?;
    if !matches!(field.dtype, ArrowDataType::Struct(_)) {
        polars_bail!(ComputeError: "expected a struct array (one child per column), got {:?}", field.dtype);
    }
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
        let back = unsafe { import_frame(schema, array) }.unwrap();
        assert_eq!(back.height(), 0);
        assert_eq!(back.column("x").unwrap().dtype(), &DataType::Float64);
    }
}
