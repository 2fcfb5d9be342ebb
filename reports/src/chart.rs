//! Chart specifications and their drawing, once for SVG and once for PNG,
//! through the same plotters code.

use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use crate::ReportError;

pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 520;
const FONT: &str = "sans-serif";

/// Bundled so charts look the same on every machine (DejaVu Sans, free license).
static FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled file is a valid TrueType font; registration only fails
        // on unparsable bytes, which a test would catch.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

/// What to draw. Each variant holds its data, already aggregated.
#[derive(Clone, Debug, PartialEq)]
pub enum ChartSpec {
    /// Cells `rows × columns` coloured by value (missing cells left blank).
    Heatmap {
        title: String,
        x_label: String,
        y_label: String,
        columns: Vec<String>,
        rows: Vec<String>,
        values: Vec<Vec<Option<f64>>>,
    },
    /// One bar per category; several stacks are piled up.
    Bars {
        title: String,
        x_label: String,
        y_label: String,
        categories: Vec<String>,
        stacks: Vec<(String, Vec<f64>)>,
    },
    /// Named series of (x, y) points, joined by lines unless `points_only`.
    Lines {
        title: String,
        x_label: String,
        y_label: String,
        series: Vec<(String, Vec<(f64, f64)>)>,
        log_y: bool,
        points_only: bool,
    },
}

impl ChartSpec {
    pub fn title(&self) -> &str {
        match self {
            ChartSpec::Heatmap { title, .. }
            | ChartSpec::Bars { title, .. }
            | ChartSpec::Lines { title, .. } => title,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ChartSpec::Heatmap { .. } => "heatmap",
            ChartSpec::Bars { .. } => "bars",
            ChartSpec::Lines {
                points_only: true, ..
            } => "scatter",
            ChartSpec::Lines { .. } => "lines",
        }
    }

    /// Drawn marks: filled cells, bar segments, or points.
    pub fn marks(&self) -> usize {
        match self {
            ChartSpec::Heatmap { values, .. } => values
                .iter()
                .flatten()
                .filter(|v| v.is_some_and(f64::is_finite))
                .count(),
            ChartSpec::Bars { stacks, .. } => stacks.iter().map(|(_, v)| v.len()).sum(),
            ChartSpec::Lines { series, .. } => series.iter().map(|(_, p)| p.len()).sum(),
        }
    }

    /// The chart as an SVG document.
    pub fn svg(&self) -> Result<String, ReportError> {
        register_font();
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
            self.draw(&root)?;
            root.present()
                .map_err(|e| ReportError::Draw(e.to_string()))?;
        }
        Ok(out)
    }

    /// The chart as a PNG file.
    pub fn png(&self, path: &std::path::Path) -> Result<(), ReportError> {
        register_font();
        let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
        self.draw(&root)?;
        root.present()
            .map_err(|e| ReportError::Draw(format!("{}: {e}", path.display())))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), ReportError> {
        let fail = |e: &dyn std::fmt::Display| ReportError::Draw(e.to_string());
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        match self {
            ChartSpec::Heatmap {
                title,
                x_label,
                y_label,
                columns,
                rows,
                values,
            } => {
                let finite: Vec<f64> = values
                    .iter()
                    .flatten()
                    .flatten()
                    .copied()
                    .filter(|v| v.is_finite())
                    .collect();
                let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let (lo, hi) = if lo < hi {
                    (lo, hi)
                } else {
                    (lo - 0.5, lo + 0.5)
                };
                let caption = format!("{title}  (colour: {lo:.3} → {hi:.3})");
                let (nx, ny) = (columns.len().max(1), rows.len().max(1));
                let mut chart = ChartBuilder::on(root)
                    .caption(caption, (FONT, 20))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(60)
                    .build_cartesian_2d(0f64..nx as f64, 0f64..ny as f64)
                    .map_err(|e| fail(&e))?;
                let x_names = columns.clone();
                let y_names = rows.clone();
                let x_fmt = move |v: &f64| label_at(&x_names, *v);
                let y_fmt = move |v: &f64| label_at(&y_names, *v);
                chart
                    .configure_mesh()
                    .disable_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_labels(nx * 2 + 1)
                    .y_labels((ny * 2 + 1).min(61))
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&y_fmt)
                    .label_style((FONT, 13))
                    .axis_desc_style((FONT, 15))
                    .draw()
                    .map_err(|e| fail(&e))?;
                let cells = values.iter().enumerate().flat_map(|(y, row)| {
                    row.iter().enumerate().filter_map(move |(x, v)| {
                        let v = (*v)?;
                        v.is_finite().then(|| {
                            let colour = ViridisRGB::get_color_normalized(v, lo, hi);
                            Rectangle::new(
                                [(x as f64, y as f64), (x as f64 + 1.0, y as f64 + 1.0)],
                                colour.filled(),
                            )
                        })
                    })
                });
                chart.draw_series(cells).map_err(|e| fail(&e))?;
            }
            ChartSpec::Bars {
                title,
                x_label,
                y_label,
                categories,
                stacks,
            } => {
                let n = categories.len().max(1);
                let totals: Vec<f64> = (0..n)
                    .map(|i| {
                        stacks
                            .iter()
                            .map(|(_, v)| v.get(i).copied().unwrap_or(0.0).max(0.0))
                            .sum()
                    })
                    .collect();
                let top = totals
                    .iter()
                    .copied()
                    .fold(0.0, f64::max)
                    .max(f64::MIN_POSITIVE)
                    * 1.08;
                let mut chart = ChartBuilder::on(root)
                    .caption(title, (FONT, 20))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(70)
                    .build_cartesian_2d(0f64..n as f64, 0f64..top)
                    .map_err(|e| fail(&e))?;
                let names = categories.clone();
                let x_fmt = move |v: &f64| label_at(&names, *v);
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_labels((n * 2 + 1).min(61))
                    .x_label_formatter(&x_fmt)
                    .label_style((FONT, 13))
                    .axis_desc_style((FONT, 15))
                    .draw()
                    .map_err(|e| fail(&e))?;
                let mut base = vec![0.0; n];
                for (s, (name, values)) in stacks.iter().enumerate() {
                    let colour = Palette99::pick(s).mix(0.9);
                    let bars: Vec<_> = values
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let (y0, y1) = (base[i], base[i] + v.max(0.0));
                            base[i] = y1;
                            Rectangle::new(
                                [(i as f64 + 0.12, y0), (i as f64 + 0.88, y1)],
                                colour.filled(),
                            )
                        })
                        .collect();
                    chart
                        .draw_series(bars)
                        .map_err(|e| fail(&e))?
                        .label(name.clone())
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                        });
                }
                if stacks.len() > 1 {
                    chart
                        .configure_series_labels()
                        .label_font((FONT, 13))
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK)
                        .draw()
                        .map_err(|e| fail(&e))?;
                }
            }
            ChartSpec::Lines {
                title,
                x_label,
                y_label,
                series,
                log_y,
                points_only,
            } => {
                let points: Vec<(f64, f64)> = series
                    .iter()
                    .flat_map(|(_, p)| p.iter().copied())
                    .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
                    .collect();
                let (x0, x1) = bounds(points.iter().map(|p| p.0));
                let (y0, y1) = if *log_y {
                    let (lo, hi) = points.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
                        (lo.min(p.1), hi.max(p.1))
                    });
                    if lo.is_finite() {
                        (lo / 1.25, hi * 1.25)
                    } else {
                        (0.1, 1.0)
                    }
                } else {
                    bounds(points.iter().map(|p| p.1))
                };
                let legend = series.len() > 1;
                // Blocks, indices and checkpoints are whole numbers: no "5.0".
                let whole = points.iter().all(|p| p.0.fract() == 0.0);
                let x_fmt = move |v: &f64| {
                    if whole {
                        format!("{v:.0}")
                    } else {
                        format!("{v}")
                    }
                };
                macro_rules! body {
                    ($chart:expr) => {{
                        let mut chart = $chart;
                        chart
                            .configure_mesh()
                            .x_label_formatter(&x_fmt)
                            .x_desc(x_label)
                            .y_desc(y_label)
                            .label_style((FONT, 13))
                            .axis_desc_style((FONT, 15))
                            .draw()
                            .map_err(|e| fail(&e))?;
                        for (s, (name, values)) in series.iter().enumerate() {
                            let colour = Palette99::pick(s);
                            let values: Vec<(f64, f64)> = values
                                .iter()
                                .copied()
                                .filter(|(x, y)| {
                                    x.is_finite() && y.is_finite() && (!log_y || *y > 0.0)
                                })
                                .collect();
                            if !points_only {
                                chart
                                    .draw_series(LineSeries::new(
                                        values.clone(),
                                        colour.stroke_width(2),
                                    ))
                                    .map_err(|e| fail(&e))?;
                            }
                            chart
                                .draw_series(
                                    values.iter().map(|&p| Circle::new(p, 3, colour.filled())),
                                )
                                .map_err(|e| fail(&e))?
                                .label(name.clone())
                                .legend(move |(x, y)| {
                                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                                });
                        }
                        if legend {
                            chart
                                .configure_series_labels()
                                .label_font((FONT, 13))
                                .background_style(WHITE.mix(0.85))
                                .border_style(BLACK)
                                .draw()
                                .map_err(|e| fail(&e))?;
                        }
                    }};
                }
                let mut builder = ChartBuilder::on(root);
                builder
                    .caption(title, (FONT, 20))
                    .margin(12)
                    .x_label_area_size(40)
                    .y_label_area_size(70);
                if *log_y {
                    let chart = builder
                        .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                        .map_err(|e| fail(&e))?;
                    body!(chart);
                } else {
                    let chart = builder
                        .build_cartesian_2d(x0..x1, y0..y1)
                        .map_err(|e| fail(&e))?;
                    body!(chart);
                }
            }
        }
        Ok(())
    }
}

/// The name of the cell whose centre is at `v` (labels sit at i + 0.5).
fn label_at(names: &[String], v: f64) -> String {
    let centre = v - v.floor();
    if (centre - 0.5).abs() > 1e-6 || v < 0.0 {
        return String::new();
    }
    names.get(v.floor() as usize).cloned().unwrap_or_default()
}

/// A plotting range around the values, never empty.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if lo == hi {
        return (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0));
    }
    let pad = (hi - lo) * 0.04;
    (lo - pad, hi + pad)
}
