//! Result tables out: parquet, CSV, JSON or a terminal table.
//!
//! Files are written to a temporary name in the destination folder and
//! renamed into place once complete, so an interrupted run never leaves a
//! half-written file behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use polars::prelude::*;

/// Output format of a result table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
    Parquet,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "table" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            "parquet" | "pq" => Ok(Self::Parquet),
            other => Err(format!(
                "unknown format `{other}` (expected table, json, csv or parquet)"
            )),
        }
    }
}

impl Format {
    /// The format an output file's extension implies.
    pub fn from_extension(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" | "pq" => Some(Self::Parquet),
            "csv" => Some(Self::Csv),
            "json" => Some(Self::Json),
            "txt" => Some(Self::Table),
            _ => None,
        }
    }

    /// `--format` if given, else the extension of `--out`, else a terminal table.
    pub fn resolve(explicit: Option<Format>, out: Option<&Path>) -> Format {
        explicit
            .or_else(|| out.and_then(Format::from_extension))
            .unwrap_or(Format::Table)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}: could not write the table: {cause}", path.display())]
    Polars { path: PathBuf, cause: PolarsError },
    #[error("parquet is binary: name an output file with --out, or pipe stdout to a file")]
    ParquetToTerminal,
}

/// Write `contents` to `path` whole or not at all.
pub fn write_atomically(
    path: &Path,
    contents: impl FnOnce(&mut std::fs::File) -> Result<(), TableError>,
) -> Result<(), TableError> {
    let io = |source| TableError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".probe-").suffix(".tmp");
    // tempfile's private 0600 would make results unreadable to the group
    // that shares them; use what any new file gets (0644 less the umask).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut temp = builder.tempfile_in(&dir).map_err(|e| TableError::Io {
        // Name the destination, not the temporary file's random name.
        path: path.to_path_buf(),
        cause: std::io::Error::new(
            e.kind(),
            match e.kind() {
                std::io::ErrorKind::NotFound => "its folder does not exist".to_string(),
                std::io::ErrorKind::PermissionDenied => {
                    "cannot create files in its folder".to_string()
                }
                kind => kind.to_string(),
            },
        ),
    })?;
    contents(temp.as_file_mut())?;
    temp.as_file_mut().flush().map_err(io)?;
    temp.as_file().sync_all().map_err(io)?;
    temp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Write a frame in a format to a file (atomically) or to stdout.
///
/// `metadata` is stored as parquet key-value metadata (ignored by the text formats).
pub fn write_frame(
    df: &mut DataFrame,
    format: Format,
    out: Option<&Path>,
    metadata: &[(String, String)],
) -> Result<(), TableError> {
    match out {
        Some(path) => write_atomically(path, |file| encode(df, format, file, path, metadata)),
        None => {
            if format == Format::Parquet && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                return Err(TableError::ParquetToTerminal);
            }
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            encode(df, format, &mut lock, Path::new("<stdout>"), metadata)?;
            lock.flush().map_err(|source| TableError::Io {
                path: "<stdout>".into(),
                cause: source,
            })
        }
    }
}

fn encode<W: Write>(
    df: &mut DataFrame,
    format: Format,
    writer: &mut W,
    path: &Path,
    metadata: &[(String, String)],
) -> Result<(), TableError> {
    let polars_err = |source| TableError::Polars {
        path: path.to_path_buf(),
        cause: source,
    };
    match format {
        Format::Parquet => {
            let kv =
                (!metadata.is_empty()).then(|| KeyValueMetadata::from_static(metadata.to_vec()));
            ParquetWriter::new(writer)
                .with_key_value_metadata(kv)
                .finish(df)
                .map_err(polars_err)?;
        }
        Format::Csv => {
            let mut flat = lists_as_text(df).map_err(polars_err)?;
            CsvWriter::new(writer)
                .include_header(true)
                .finish(&mut flat)
                .map_err(polars_err)?;
        }
        Format::Json => {
            JsonWriter::new(&mut *writer)
                .with_json_format(JsonFormat::Json)
                .finish(df)
                .map_err(polars_err)?;
            writeln!(writer).map_err(|source| TableError::Io {
                path: path.to_path_buf(),
                cause: source,
            })?;
        }
        Format::Table => {
            writeln!(writer, "{}", render(df)).map_err(|source| TableError::Io {
                path: path.to_path_buf(),
                cause: source,
            })?;
        }
    }
    Ok(())
}

/// CSV has no list type: write `[576, 576]` as text.
fn lists_as_text(df: &DataFrame) -> PolarsResult<DataFrame> {
    let mut columns = Vec::with_capacity(df.width());
    for column in df.columns() {
        if let DataType::List(_) = column.dtype() {
            let series = column.as_materialized_series();
            let lists = series.list()?;
            let text: StringChunked = (0..lists.len())
                .map(|row| lists.get_as_series(row).map(|inner| list_text(&inner)))
                .collect();
            columns.push(text.with_name(column.name().clone()).into_column());
        } else {
            columns.push(column.clone());
        }
    }
    DataFrame::new(df.height(), columns)
}

fn list_text(inner: &Series) -> String {
    let parts: Vec<String> = inner.iter().map(|v| cell_text(&v)).collect();
    format!("[{}]", parts.join(", "))
}

/// One cell as a human reads it: floats to 4 significant digits.
pub fn cell_text(value: &AnyValue) -> String {
    match value {
        AnyValue::Null => String::new(),
        AnyValue::Float32(v) => float_text(*v as f64),
        AnyValue::Float64(v) => float_text(*v),
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        AnyValue::List(inner) => list_text(inner),
        other => other.to_string(),
    }
}

fn float_text(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let magnitude = v.abs().log10().floor() as i32;
    if !(-3..6).contains(&magnitude) {
        format!("{v:.3e}")
    } else {
        let decimals = (3 - magnitude).clamp(0, 6) as usize;
        format!("{v:.decimals$}")
    }
}

/// A frame as a terminal table, every row shown.
pub fn render(df: &DataFrame) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(df.get_column_names().iter().map(|n| n.as_str()));
    let columns: Vec<&Series> = df
        .columns()
        .iter()
        .map(|c| c.as_materialized_series())
        .collect();
    for row in 0..df.height() {
        table.add_row(
            columns
                .iter()
                .map(|s| s.get(row).map(|v| cell_text(&v)).unwrap_or_default()),
        );
    }
    for (index, column) in df.columns().iter().enumerate() {
        if column.dtype().is_primitive_numeric() {
            if let Some(c) = table.column_mut(index) {
                c.set_cell_alignment(comfy_table::CellAlignment::Right);
            }
        }
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_well() {
        assert_eq!(float_text(0.123456), "0.1235");
        assert_eq!(float_text(12.3456), "12.35");
        assert_eq!(float_text(123456789.0), "1.235e8");
        assert_eq!(float_text(0.00001234), "1.234e-5");
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(
            Format::resolve(None, Some(Path::new("a.parquet"))),
            Format::Parquet
        );
        assert_eq!(
            Format::resolve(Some(Format::Csv), Some(Path::new("a.parquet"))),
            Format::Csv
        );
        assert_eq!(Format::resolve(None, None), Format::Table);
    }

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.csv");
        let result = write_atomically(&path, |file| {
            file.write_all(b"partial").unwrap();
            Err(TableError::ParquetToTerminal)
        });
        assert!(result.is_err());
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
