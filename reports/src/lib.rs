//! Result tables → one self-contained HTML page of SVG charts.
//!
//! Which charts a table gets is decided by a small registry keyed on the
//! plugin that produced it (the parquet metadata `probe.plugin`): each plugin
//! adds its charts in one place, [`REGISTRY`]. Tables from unknown plugins get
//! a default: a metric by layer. Charts are drawn with plotters, as inline
//! SVG (no network, no scripts but one inline check) and optionally as PNG.

#![forbid(unsafe_code)]

mod chart;
mod html;
mod registry;

pub use chart::ChartSpec;
pub use html::page;
pub use registry::{charts_for, REGISTRY};

use polars::prelude::DataFrame;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot draw a chart: {0}")]
    Draw(String),
    #[error("{table}: {problem}")]
    Table { table: String, problem: String },
}

/// One result table with what the report needs to know about it.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// A label: the file name it came from.
    pub name: String,
    pub plugin: Option<String>,
    pub plugin_version: Option<String>,
    /// The parameters, as the run recorded them (JSON).
    pub params: Option<String>,
    pub frame: DataFrame,
    /// Companion tables (e.g. spectral's `singular_values`).
    pub companions: Vec<(String, DataFrame)>,
}

/// What the user may choose.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The metric of heat maps and by-layer charts (spectral: `pr_rank_ratio`).
    pub metric: Option<String>,
}

/// A chart drawn for a table.
#[derive(Clone, Debug)]
pub struct Chart {
    pub spec: ChartSpec,
    pub svg: String,
}

/// Charts for every table, drawn.
pub fn render(
    tables: &[Table],
    options: &Options,
) -> Result<Vec<(Table, Vec<Chart>)>, ReportError> {
    tables
        .iter()
        .map(|table| {
            let charts = charts_for(table, options)?
                .into_iter()
                .map(|spec| {
                    Ok(Chart {
                        svg: spec.svg()?,
                        spec,
                    })
                })
                .collect::<Result<Vec<_>, ReportError>>()?;
            Ok((table.clone(), charts))
        })
        .collect()
}
