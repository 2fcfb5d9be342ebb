//! The page around the charts: self-contained (inline SVG and CSS), with one
//! inline script that marks each figure drawn once the browser has laid out
//! its SVG — what the end-to-end test reads back.

use crate::{Chart, Table};

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}\
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}\
.meta{color:#555;font-size:.9em}figure{margin:1.5em 0}figcaption{font-size:.95em;color:#333;margin-bottom:.3em}\
svg{max-width:100%;height:auto;border:1px solid #eee}";

const CHECK: &str = "document.querySelectorAll('figure.chart').forEach(function(f){\
var s=f.querySelector('svg');var b=s?s.getBBox():{width:0,height:0};\
f.setAttribute('data-drawn',(b.width>0&&b.height>0)?'yes':'no');\
f.setAttribute('data-elements',s?s.querySelectorAll('*').length:0);});";

/// The whole HTML page.
pub fn page(title: &str, tables: &[(Table, Vec<Chart>)]) -> String {
    let mut html = String::new();
    html.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    html.push_str(&format!(
        "<title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(title)
    ));
    html.push_str(&format!("<h1>{}</h1>\n", escape(title)));
    for (index, (table, charts)) in tables.iter().enumerate() {
        html.push_str(&format!(
            "<section class=\"table\" id=\"table-{index}\"><h2>{}</h2>\n",
            escape(&table.name)
        ));
        let mut meta = vec![format!("{} rows", table.frame.height())];
        if let Some(plugin) = &table.plugin {
            meta.insert(
                0,
                format!(
                    "plugin {} {}",
                    plugin,
                    table.plugin_version.as_deref().unwrap_or("")
                ),
            );
        }
        if let Some(params) = &table.params {
            meta.push(format!("parameters {params}"));
        }
        html.push_str(&format!(
            "<p class=\"meta\">{}</p>\n",
            escape(&meta.join(" · "))
        ));
        if charts.is_empty() {
            html.push_str("<p>No chart: the table has no numeric column to draw.</p>\n");
        }
        for (c, chart) in charts.iter().enumerate() {
            html.push_str(&format!(
                "<figure class=\"chart\" id=\"chart-{index}-{c}\" data-kind=\"{}\" data-marks=\"{}\"><figcaption>{}</figcaption>\n{}\n</figure>\n",
                chart.spec.kind(),
                chart.spec.marks(),
                escape(chart.spec.title()),
                chart.svg
            ));
        }
        html.push_str("</section>\n");
    }
    html.push_str(&format!("<script>{CHECK}</script>\n</body></html>\n"));
    html
}
